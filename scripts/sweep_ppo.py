"""The PPO-GLAM tuning sweep: learning rate x entropy coefficient on Playground-Text (all four goal categories).

    python scripts/sweep_ppo.py --steps 20000 --jobs 2                 # 3 x 3 grid, 1 seed, docs/sweep_ppo.md
    python scripts/sweep_ppo.py --lrs 1e-3,3e-3 --ent-coefs 0,0.01 --seeds 2 --runs-dir runs/sweep2

So that the comparison of scripts/reproduce.py does not pit a tuned SAC against an untuned PPO. Each grid point is
an ``experiment=playground_ppo`` run (through ``reproduce.py``'s runner: isolated subprocesses, ``resume=auto``, a
finished run is skipped on a rerun) in ``RUNS/lr<lr>_ent<c>/playground/ppo/seed<k>``; the table gives the final greedy
success per category (mean over seeds) and the mean over categories, the sweep's objective.
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from sacglam.run.aggregate import aggregate, wall_minutes
from sacglam.run.launch import Run, execute, plan_runs

ROOT = Path(__file__).resolve().parents[1]


def final_success(runs_dir: Path) -> dict[str, float]:
    """Series name -> mean over seeds of the last evaluation (``all`` and each category) of one grid point."""
    results = aggregate(runs_dir)
    return {name: float(s.mean[-1]) for name, s in results["playground"]["ppo"].items()}


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lrs", default="3e-4,1e-3,3e-3", help="comma-separated algo.lr values")
    p.add_argument("--ent-coefs", default="0,0.01,0.05", help="comma-separated algo.ent_coef values")
    p.add_argument("--seeds", type=int, default=1)
    p.add_argument("--steps", type=int, default=20000, help="total_env_steps of every run")
    p.add_argument("--jobs", type=int, default=1)
    p.add_argument("--runs-dir", type=Path, default=ROOT / "runs" / "sweep_ppo")
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "sweep_ppo.md")
    p.add_argument("overrides", nargs="*", help="extra train.py overrides for every run")
    opts = p.parse_intermixed_args(argv)
    grid = list(itertools.product(opts.lrs.split(","), opts.ent_coefs.split(",")))
    runs: list[Run] = []
    threads = [f"threads={max(1, (os.cpu_count() or 1) // opts.jobs)}"] if opts.jobs > 1 else []
    for lr, ent in grid:
        extra = [f"total_env_steps={opts.steps}", f"algo.lr={lr}", f"algo.ent_coef={ent}", "checkpoint.every=0",
                 "~env.heldout_kwargs.split", *threads, *opts.overrides]
        runs += plan_runs(["playground"], range(opts.seeds), opts.runs_dir / f"lr{lr}_ent{ent}", extra, ["ppo"])
    print(f"{len(runs)} runs ({opts.jobs} at a time) into {opts.runs_dir}", flush=True)
    with ThreadPoolExecutor(max_workers=opts.jobs) as pool:
        done = list(pool.map(execute, runs))
    cats = ["grasp", "grow_plant", "grow_herbivore", "grow_carnivore"]
    lines = [f"| algo.lr | algo.ent_coef | {' | '.join(cats)} | mean (objective) | minutes per run |",
             "|---|---|" + "---|" * (len(cats) + 2)]
    best: tuple[float, str, str] = (-1.0, "", "")
    for lr, ent in grid:
        point = opts.runs_dir / f"lr{lr}_ent{ent}"
        final = final_success(point)
        walls = [w for ws in wall_minutes(point).values() for w in ws]
        wall = f"{np.mean(walls):.1f}" if walls else "-"
        cells = " | ".join(f"{final.get(c, float('nan')):.2f}" for c in cats)
        lines.append(f"| {lr} | {ent} | {cells} | {final['all']:.3f} | {wall} |")
        best = max(best, (final["all"], lr, ent))
    table = "\n".join(lines)
    opts.out.parent.mkdir(parents=True, exist_ok=True)
    opts.out.write_text(
        f"# PPO-GLAM sweep: lr x entropy coefficient\n\n`python scripts/sweep_ppo.py {' '.join(argv or sys.argv[1:])}`"
        f"\n\nFinal greedy success after {opts.steps:,} env steps, mean over {opts.seeds} seed(s), Playground-Text "
        f"with all four goal categories. Best: lr {best[1]}, ent_coef {best[2]} ({best[0]:.3f}).\n\n{table}\n")
    print(table)
    print(f"best: algo.lr={best[1]} algo.ent_coef={best[2]} ({best[0]:.3f}); wrote {opts.out}")
    return 1 if any(rc != 0 for _, rc, _ in done) else 0


if __name__ == "__main__":
    sys.exit(main())
