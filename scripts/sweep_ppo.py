"""The PPO-GLAM tuning sweep: learning rate x entropy coefficient on Playground-Text (all four goal categories).

    python scripts/sweep_ppo.py --steps 20000 --jobs 2                 # 3 x 3 grid, 1 seed, docs/sweep_ppo.md
    python scripts/sweep_ppo.py --lrs 1e-3,3e-3 --ent-coefs 0,0.01 --seeds 2 --runs-dir runs/sweep2

The grid behind ``algo=ppo``'s defaults, as ``scripts/sweep.py --env playground --algo ppo`` runs it
(``sacglam/run/sweep.py``): final greedy success per category, mean over seeds, ranked by the mean over categories.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from sacglam.run import sweep
from sacglam.run.launch import CATEGORIES

ROOT = Path(__file__).resolve().parents[1]


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
    return sweep.main([
        "--env", "playground", "--algo", "ppo", "--grid", f"algo.lr={opts.lrs}", "--grid",
        f"algo.ent_coef={opts.ent_coefs}", "--seeds", str(opts.seeds), "--steps", str(opts.steps), "--jobs",
        str(opts.jobs), "--series", f"all,{CATEGORIES}", "--rank", "final", "--runs-dir", str(opts.runs_dir),
        "--out", str(opts.out), "checkpoint.every=0", "~env.heldout_kwargs.split", *opts.overrides,
    ])


if __name__ == "__main__":
    sys.exit(main())
