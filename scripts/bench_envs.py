"""Env steps per second of every text env: one env, and N envs batched (sync versus subprocess), as a markdown table.

Every measurement steps with uniformly random admissible actions and includes the auto-reset cost (episodes end
often), so the numbers are what a collector sees minus the model. The reference of the ratio column is the sync
vector env measured in the same run: ``subprocess/sync > 1`` means the worker processes pay off for that env on this
machine (they do when a step costs much more than a pipe round trip of ~0.1 ms, and there are cores to spare).

    python scripts/bench_envs.py                  # 4000 env steps per measurement, 8 envs batched
    python scripts/bench_envs.py --quick          # 400 env steps, 4 envs batched: small and fast
    python scripts/bench_envs.py --steps 20000 --num-envs 16
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np

from envs.vector import make_vector_env  # also registers the sacglam/ ids

ROOT = Path(__file__).resolve().parents[1]
WARMUP_STEPS = 10  # untimed steps first: imports, caches and lazy initialisation are not what we measure


def env_cases(games_dir: Path) -> tuple[list[tuple[str, str, dict[str, Any]]], list[str]]:
    """(label, env id, kwargs) of every env whose module exists, and skip messages for the others."""
    wanted: list[tuple[str, str, dict[str, Any], str]] = [
        ("Playground-Text", "sacglam/PlaygroundText-v0", {}, "playground_text"),
        ("BitFlip-Text n=8", "sacglam/BitFlipText-v0", {"n_bits": 8}, "bitflip_text"),
        ("BabyAI GoToLocal", "sacglam/BabyAIText-v0", {"level": "BabyAI-GoToLocal-v0"}, "babyai_text"),
    ]
    games = sorted(p for ext in ("*.z8", "*.ulx") for p in games_dir.rglob(ext))
    skipped = []
    if games:
        wanted.append((f"TextWorld {games[0].stem}", "sacglam/TextWorld-v0", {"game": str(games[0])}, "textworld_env"))
    else:
        skipped.append(f"TextWorld: no game under {games_dir}/ (make one: python scripts/make_textworld_games.py)")
    out = []
    for label, env_id, kwargs, module in wanted:
        if (ROOT / "envs" / f"{module}.py").exists():
            out.append((label, env_id, kwargs))
        else:
            skipped.append(f"{label}: envs/{module}.py not present yet")
    return out, skipped


def bench_single(env_id: str, kwargs: dict[str, Any], steps: int, seed: int) -> float:
    """Env steps per second of one env stepped directly (resetting by hand when an episode ends)."""
    env = gym.make(env_id, **kwargs)
    rng = np.random.default_rng(seed)
    _, info = env.reset(seed=seed)
    start = 0.0
    for t in range(WARMUP_STEPS + steps):
        if t == WARMUP_STEPS:
            start = time.perf_counter()
        actions = info["admissible_actions"]
        _, _, terminated, truncated, info = env.step(actions[int(rng.integers(len(actions)))])
        if terminated or truncated:
            _, info = env.reset()
    elapsed = time.perf_counter() - start
    env.close()
    return steps / elapsed


def bench_vector(env_id: str, kwargs: dict[str, Any], num_envs: int, steps: int, seed: int, mode: str) -> float:
    """Env steps per second (vector steps x num_envs) of a vector env; worker start-up is not timed."""
    venv = make_vector_env(env_id, num_envs, env_kwargs=kwargs, mode=mode)
    rng = np.random.default_rng(seed)
    try:
        _, infos = venv.reset(seed=seed)
        n_vector_steps = max(1, steps // num_envs)
        start = 0.0
        for t in range(WARMUP_STEPS + n_vector_steps):
            if t == WARMUP_STEPS:
                start = time.perf_counter()
            actions = [a[int(rng.integers(len(a)))] for a in (i["admissible_actions"] for i in infos)]
            infos = venv.step(actions).infos
        elapsed = time.perf_counter() - start
    finally:
        venv.close()
    return n_vector_steps * num_envs / elapsed


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=4000, help="env steps per measurement")
    parser.add_argument("--num-envs", type=int, default=None, help="envs in the batched measurements (8; 4 quick)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="400 env steps per measurement, 4 envs batched")
    parser.add_argument("--games-dir", type=Path, default=ROOT / "games", help="TextWorld games folder")
    args = parser.parse_args(argv)
    steps = 400 if args.quick else args.steps
    n = args.num_envs or (4 if args.quick else 8)  # worker start-up dominates a quick run on a small machine

    cases, skipped = env_cases(args.games_dir)
    rows = []
    failed = []
    for label, env_id, kwargs in cases:
        try:
            single = bench_single(env_id, kwargs, steps, args.seed)
            sync = bench_vector(env_id, kwargs, n, steps, args.seed, "sync")
            sub = bench_vector(env_id, kwargs, n, steps, args.seed, "subprocess")
        except ImportError as exc:  # an optional backend (minigrid, textworld) missing: say so, do not crash
            skipped.append(f"{label}: {type(exc).__name__}: {exc}")
            continue
        except Exception as exc:
            failed.append(f"{label}: {type(exc).__name__}: {exc}")
            continue
        rows.append(f"| {label} | {single:,.0f} | {sync:,.0f} | {sub:,.0f} | {sub / sync:.2f} |")

    print(f"Env steps per second, random admissible actions, {steps} env steps per measurement, "
          f"{os.cpu_count()} CPUs.\n")  # fmt: skip
    print(f"| env | 1 env | sync x{n} | subprocess x{n} | subprocess/sync |")
    print("|---|---:|---:|---:|---:|")
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
