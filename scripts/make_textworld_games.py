"""Generate a seeded suite of TextWorld games with ``tw-make`` into a cache folder (default ``games/``, gitignored).

    python scripts/make_textworld_games.py                 # the full suite, seed 1 (about 3-6 s per game)
    python scripts/make_textworld_games.py --seeds 1 2 3   # three seeds of every game kind
    python scripts/make_textworld_games.py --quick         # one small coin-collector game, for tests and demos
    python scripts/make_textworld_games.py --only tw-simple-dense tw-cooking-r1   # some kinds only

Games that already exist are skipped, so the command is cheap to re-run. It prints a markdown table of what it
made (or skipped) and how long each took. Play one with ``envs.textworld_env.TextWorldEnv(game=<path>)``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class GameSpec:
    """One game kind of the suite: a file stem and the ``tw-make`` arguments that make it (the seed is added)."""

    name: str  # file stem without the seed, e.g. "tw-coin_collector-l5"
    args: tuple[str, ...]  # tw-make arguments, e.g. ("tw-coin_collector", "--level", "5")


QUICK: tuple[GameSpec, ...] = (GameSpec("tw-coin_collector-l5", ("tw-coin_collector", "--level", "5")),)

SUITE: tuple[GameSpec, ...] = (
    # Coin collector: find the coin; the level sets the map size and distractor rooms (1-300).
    *(GameSpec(f"tw-coin_collector-l{lv}", ("tw-coin_collector", "--level", str(lv))) for lv in (1, 5, 10, 15, 25)),
    # Simple: a fixed house, a quest of ~9 steps; dense/balanced/sparse rewards.
    *(
        GameSpec(f"tw-simple-{rw}", ("tw-simple", "--rewards", rw, "--goal", "detailed"))
        for rw in ("dense", "balanced", "sparse")
    ),
    # Cooking (First TextWorld Problems): read the recipe, gather, prepare, eat.
    GameSpec("tw-cooking-r1-g1", ("tw-cooking", "--recipe", "1", "--take", "1", "--go", "1")),
    GameSpec(
        "tw-cooking-r2-g6-open-cut", ("tw-cooking", "--recipe", "2", "--take", "2", "--go", "6", "--open", "--cut")
    ),
    GameSpec(
        "tw-cooking-r3-g9-open-cook-cut",
        ("tw-cooking", "--recipe", "3", "--take", "3", "--go", "9", "--open", "--cook", "--cut"),
    ),
)


def tw_make_path() -> str:
    """The ``tw-make`` executable: next to this Python (a virtualenv's bin/), else on PATH."""
    local = Path(sys.executable).parent / "tw-make"
    if local.is_file():
        return str(local)
    found = shutil.which("tw-make")
    if found is None:
        raise FileNotFoundError("tw-make not found next to the Python interpreter nor on PATH; install textworld")
    return found


def make_game(spec: GameSpec, seed: int, out_dir: Path, *, force: bool = False) -> tuple[Path, float | None]:
    """Make one game unless it exists.

    Returns:
        The ``.z8`` path and the seconds it took (None when it already existed).

    Raises:
        RuntimeError: ``tw-make`` failed (its output is included).
    """
    path = out_dir / f"{spec.name}-s{seed}.z8"
    if path.is_file() and path.with_suffix(".json").is_file() and not force:
        return path, None
    out_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    cmd = [tw_make_path(), *spec.args, "--seed", str(seed), "--output", str(path), "-f", "--silent"]
    result = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if result.returncode != 0 or not path.is_file():
        raise RuntimeError(f"{' '.join(cmd)} failed (exit {result.returncode}):\n{result.stdout}\n{result.stderr}")
    return path, time.perf_counter() - start


def main(argv: list[str] | None = None) -> list[Path]:
    """Make the suite (or the quick game) and print a table; returns the game paths."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("games"), help="cache folder (default: games/)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1], help="seeds to make for every game kind")
    parser.add_argument("--quick", action="store_true", help="make one small coin-collector game only")
    parser.add_argument("--force", action="store_true", help="remake games that already exist")
    parser.add_argument("--only", nargs="+", default=None, help="make only the kinds whose name contains one of these")
    args = parser.parse_args(argv)
    specs = QUICK if args.quick else SUITE
    if args.only:
        specs = tuple(s for s in specs if any(part in s.name for part in args.only))
        if not specs:
            names = [s.name for s in SUITE]
            parser.error(f"--only {args.only} matches no game kind; kinds: {names}")
    seeds = args.seeds[:1] if args.quick else args.seeds
    print("| game | status | seconds |\n|---|---|---|")
    paths: list[Path] = []
    total_start = time.perf_counter()
    made = 0
    for spec in specs:
        for seed in seeds:
            path, seconds = make_game(spec, seed, args.out, force=args.force)
            paths.append(path)
            made += seconds is not None
            status, shown = ("made", f"{seconds:.1f}") if seconds is not None else ("exists, skipped", "-")
            print(f"| {os.fspath(path)} | {status} | {shown} |", flush=True)
    print(f"\n{made} made, {len(paths) - made} skipped, {time.perf_counter() - total_start:.1f} s in all")
    return paths


if __name__ == "__main__":
    main()
