"""Success rate of a uniform random agent on every text env and goal category, as a markdown table.

The random agent picks uniformly among ``info["admissible_actions"]`` at every step. An episode succeeds by the rule
training and evaluation use (``sacglam.collector.episode_success``: the env's ``won``/``success`` verdict when it gives
one, else terminated with a positive reward). Each row gives the episode count, the success rate with a
95% Wilson interval, and the mean episode length. These are the floors a trained agent must beat.

    python scripts/random_baseline.py                 # 200 episodes per category
    python scripts/random_baseline.py --quick         # 20 episodes per category, no TextWorld game generation
    python scripts/random_baseline.py --episodes 1000 --seed 1
    python scripts/random_baseline.py --games-dir games/ --all-games --tw-episodes 200
    python scripts/random_baseline.py --only playground --episodes 20000 --env-kwargs '{"grown_distractors": 0.5}'

Envs whose module is not present, or TextWorld without a game (and none can be generated), are skipped with a message.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np

import envs  # noqa: F401 - registers the sacglam/ ids
from sacglam.collector import episode_success  # the success rule training and evaluation use
from sacglam.evaluate import wilson_interval

ROOT = Path(__file__).resolve().parents[1]
MAX_STEPS = 1000  # safety cap: every env has its own step limit, far below this


@dataclass
class EnvCase:
    """One env configuration to measure."""

    label: str  # row label, e.g. "BabyAI GoToLocal"
    env_id: str
    kwargs: dict[str, Any]
    module: str  # envs/<module>.py must exist
    by_category: bool  # reset with options={"goal_category": c} for each of env.goal_categories


@dataclass
class Tally:
    """Per (env, category) episode statistics."""

    episodes: int = 0
    successes: int = 0
    lengths: list[int] = field(default_factory=list)


def run_episode(
    env: gym.Env[str, str], rng: np.random.Generator, options: dict[str, Any] | None
) -> tuple[str, bool, int]:
    """One random-agent episode. Returns (goal category, success, length)."""
    _, info = env.reset(options=options)
    category = str(info["goal_category"])
    for t in range(1, MAX_STEPS + 1):
        actions = info["admissible_actions"]
        _, reward, terminated, truncated, info = env.step(actions[int(rng.integers(len(actions)))])
        if terminated or truncated:
            return category, episode_success(float(reward), bool(terminated), info), t
    raise RuntimeError(f"episode of {env.spec.id if env.spec else env} ran past {MAX_STEPS} steps without ending")


def textworld_games(quick: bool, games_dir: Path) -> tuple[list[Path], str]:
    """Existing TextWorld games, generating the default suite (~1 min, cached) when none exist (not in quick mode)."""
    found = sorted(p for ext in ("*.z8", "*.ulx") for p in games_dir.rglob(ext))
    if found:
        return found, ""
    maker = ROOT / "scripts" / "make_textworld_games.py"
    if quick:
        return [], f"no TextWorld game under {games_dir}/ (quick mode does not generate; run scripts/{maker.name})"
    if not maker.exists():
        return [], f"no TextWorld game under {games_dir}/ and scripts/{maker.name} does not exist yet"
    print(f"generating TextWorld games: python scripts/{maker.name} --out {games_dir} ...", file=sys.stderr)
    cmd = [sys.executable, str(maker), "--out", str(games_dir)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    found = sorted(p for ext in ("*.z8", "*.ulx") for p in games_dir.rglob(ext))
    if proc.returncode != 0 or not found:
        return [], f"TextWorld game generation failed (exit {proc.returncode}): {proc.stderr.strip()[-300:]}"
    return found, ""


def cases(quick: bool, games_dir: Path, all_games: bool, only: str = "") -> tuple[list[EnvCase], list[str]]:
    """The env configurations to measure (those whose label contains ``only``, case-insensitive; all when it is
    empty) and the skip messages of those that cannot run."""
    out = [
        EnvCase("Playground-Text", "sacglam/PlaygroundText-v0", {}, "playground_text", True),
        EnvCase("BitFlip-Text n=8", "sacglam/BitFlipText-v0", {"n_bits": 8}, "bitflip_text", False),
        EnvCase("BabyAI GoToLocal", "sacglam/BabyAIText-v0", {"level": "BabyAI-GoToLocal-v0"}, "babyai_text", False),
        EnvCase("BabyAI PickupLoc", "sacglam/BabyAIText-v0", {"level": "BabyAI-PickupLoc-v0"}, "babyai_text", False),
    ]
    skipped = []
    # TextWorld's labels name its games, known once they exist: games are looked for (or generated) only when
    # `only` can match a TextWorld label.
    wants_textworld = not only or only.lower() in "textworld" or only.lower().startswith("tw")
    if wants_textworld and (ROOT / "envs" / "textworld_env.py").exists():
        games, why = textworld_games(quick, games_dir)
        if not all_games:  # one game per kind (tw-coin_collector, tw-simple, tw-cooking): the first of each, sorted
            games = list({g.stem.split("-")[1]: g for g in reversed(games)}.values())[::-1]
        out += [
            EnvCase(f"TextWorld {g.stem}", "sacglam/TextWorld-v0", {"game": str(g)}, "textworld_env", False)
            for g in games
        ]
        if why:
            skipped.append(f"TextWorld: {why}")
    elif wants_textworld:
        skipped.append("TextWorld: envs/textworld_env.py not present yet")
    present = []
    for case in (c for c in out if only.lower() in c.label.lower()):
        if (ROOT / "envs" / f"{case.module}.py").exists():
            present.append(case)
        elif not any(s.startswith(f"{case.label}:") for s in skipped):
            skipped.append(f"{case.label}: envs/{case.module}.py not present yet")
    return present, skipped


def measure(case: EnvCase, episodes: int, seed: int) -> dict[str, Tally]:
    """Run ``episodes`` random episodes per goal category (or in total when the env picks its own categories)."""
    env = gym.make(case.env_id, **case.kwargs)
    rng = np.random.default_rng(seed)
    env.reset(seed=seed)  # later resets continue the env's RNG, so the whole run is a function of --seed
    tallies: dict[str, Tally] = {}
    plans: list[dict[str, Any] | None]
    if case.by_category:
        categories = list(env.get_wrapper_attr("goal_categories"))
        plans = [{"goal_category": c} for c in categories for _ in range(episodes)]
    else:
        plans = [None] * episodes
    for options in plans:
        category, success, length = run_episode(env, rng, options)
        tally = tallies.setdefault(category, Tally())
        tally.episodes += 1
        tally.successes += int(success)
        tally.lengths.append(length)
    env.close()
    return tallies


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--episodes", type=int, default=200, help="episodes per goal category (per env when the "
                        "env samples its own categories)")  # fmt: skip
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="20 episodes per category, no game generation")
    parser.add_argument("--games-dir", type=Path, default=ROOT / "games", help="TextWorld games folder")
    parser.add_argument("--all-games", action="store_true", help="every TextWorld game (default: one per kind)")
    parser.add_argument("--tw-episodes", type=int, default=50, help="episodes per TextWorld game (~5 ms a step)")
    parser.add_argument("--only", default="", help="measure only the envs whose label contains this text, "
                        "case-insensitive (e.g. playground, babyai)")  # fmt: skip
    parser.add_argument("--env-kwargs", type=json.loads, default={}, help="JSON object of constructor arguments "
                        "added to every measured env's (e.g. '{\"grown_distractors\": 0.5}' with --only playground)")
    args = parser.parse_args(argv)
    if not isinstance(args.env_kwargs, dict):
        parser.error(f"--env-kwargs must be a JSON object, got {args.env_kwargs!r}")
    episodes = 20 if args.quick else args.episodes

    present, skipped = cases(args.quick, args.games_dir, args.all_games, args.only)
    present = [EnvCase(c.label, c.env_id, {**c.kwargs, **args.env_kwargs}, c.module, c.by_category) for c in present]
    if not present:
        parser.error(f"--only {args.only!r} matches no env")
    rows = []
    failed = []
    for case in present:
        start = time.perf_counter()
        try:
            n = min(episodes, args.tw_episodes) if case.env_id == "sacglam/TextWorld-v0" else episodes
            tallies = measure(case, n, args.seed)
        except ImportError as exc:  # an optional backend (minigrid, textworld) missing: say so, do not crash
            skipped.append(f"{case.label}: {type(exc).__name__}: {exc}")
            continue
        except Exception as exc:
            failed.append(f"{case.label}: {type(exc).__name__}: {exc}")
            continue
        elapsed = time.perf_counter() - start
        for category, t in sorted(tallies.items()):
            lo, hi = wilson_interval(t.successes, t.episodes)
            rows.append(
                f"| {case.label} | {category} | {t.episodes} | {t.successes} | {t.successes / t.episodes:.3f} | "
                f"[{lo:.3f}, {hi:.3f}] | {np.mean(t.lengths):.1f} | {elapsed:.1f} |"
            )

    print(
        f"Uniform random agent over admissible actions (seed {args.seed}, {episodes} episodes per category, "
        f"{min(episodes, args.tw_episodes)} per TextWorld game"
        + (f", env kwargs {json.dumps(args.env_kwargs)}" if args.env_kwargs else "") + ").\n"
    )
    print("| env | goal category | episodes | successes | success rate | 95% CI (Wilson) | mean length | env s |")
    print("|---|---|---:|---:|---:|---|---:|---:|")
    print("\n".join(rows))
    if skipped:
        print()
    for line in skipped:
        print(f"skipped: {line}")
    for line in failed:
        print(f"\nFAILED: {line}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
