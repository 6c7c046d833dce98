"""The ETO tuning sweep: named variants of ``experiment=playground_eto`` on Playground-Text grasp goals.

    python scripts/sweep_eto.py --jobs 2 --seeds 2                    # the default variants, docs/sweep_eto.md
    python scripts/sweep_eto.py --variant "lr1e-4:algo.lrs=[1e-4]" --variant "sft:algo.sft_coef=1" --seeds 3
    python scripts/sweep_eto.py --categories grasp,grow_plant --steps 40000 --out /tmp/sweep.md

So that the comparison of scripts/reproduce.py does not pit a tuned SAC against an untuned ETO. Each variant is an
``experiment=playground_eto`` run with the variant's overrides (through ``reproduce.py``'s runner: isolated
subprocesses, ``resume=auto``, a finished run is skipped on a rerun) in ``RUNS/<variant>/playground/eto/seed<k>``;
the table gives, per variant, the greedy success of the warm-started policy (the curve's first point), at the middle
of the budget and at its end (mean over seeds, and each seed), the sweep's objective being the final one.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from sacglam.run.aggregate import aggregate
from sacglam.run.launch import Run, execute, plan_runs

ROOT = Path(__file__).resolve().parents[1]

# The variants of docs/sweep_eto.md. Each is stated against SWEPT, the preset as it was swept (128 tasks, a warm
# start of 3 epochs on 32 expert episodes, no SFT term; conf/algo/eto_tiny.yaml has since taken the sweep's
# answers): the DPO learning rate, beta, the SFT term on the chosen trajectories, the warm start, the number of
# training tasks and sampled exploration. "nosft" is ETO's published recipe (no SFT term) at the preset's lr.
SWEPT = ["algo.tasks=128", "algo.warm_start_episodes=32", "algo.sft_epochs=3", "algo.sft_coef=0"]
DEFAULT_VARIANTS: dict[str, list[str]] = {
    "nosft": [],
    "lr1e-4": ["algo.lrs=[1e-4]"],
    "lr3e-4": ["algo.lrs=[3e-4]"],
    "ws128": ["algo.warm_start_episodes=128"],
    "ws128_lr1e-4": ["algo.warm_start_episodes=128", "algo.lrs=[1e-4]"],
    "sftep10": ["algo.sft_epochs=10"],
    "sft1": ["algo.sft_coef=1"],
    "sft1_lr3e-3": ["algo.sft_coef=1", "algo.lrs=[3e-3]"],
    "sft1_beta0.5": ["algo.sft_coef=1", "algo.betas=[0.5]"],
    "sft1_ws128": ["algo.sft_coef=1", "algo.warm_start_episodes=128"],
    "sft1_sftep10": ["algo.sft_coef=1", "algo.sft_epochs=10"],
    "sft1_sample": ["algo.sft_coef=1", "algo.explore=sample"],
    "sft1_tasks256": ["algo.sft_coef=1", "algo.tasks=256"],
    "sft1_tasks512": ["algo.sft_coef=1", "algo.tasks=512"],
    "sft1_tasks1024": ["algo.sft_coef=1", "algo.tasks=1024"],
    "nosft_tasks512": ["algo.tasks=512"],
    "nosft_tasks512_lr1e-4": ["algo.tasks=512", "algo.lrs=[1e-4]"],
}


def merged(base: Sequence[str], overrides: Sequence[str]) -> list[str]:
    """``base`` with each key that ``overrides`` sets replaced (Hydra refuses a key given twice)."""
    keys = {o.split("=", 1)[0] for o in overrides}
    return [o for o in base if o.split("=", 1)[0] not in keys] + list(overrides)


def parse_variant(text: str) -> tuple[str, list[str]]:
    """``"NAME:key=v key2=v2"`` -> (NAME, [overrides]); raises ``ValueError`` without a name."""
    name, _, rest = text.partition(":")
    if not name or "/" in name or not _:
        raise ValueError(f"--variant {text!r}: expected NAME:OVERRIDES (e.g. 'sft1:algo.sft_coef=1')")
    return name, rest.split()


def curve_points(runs_dir: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """Per seed of one variant: (first, middle, last) greedy success ``all`` on the variant's common grid."""
    results = aggregate(runs_dir)
    summary = results.get("playground", {}).get("eto", {}).get("all")
    if summary is None:
        return None
    rows = summary.per_seed
    mid = int(np.searchsorted(summary.grid, (summary.grid[0] + summary.grid[-1]) / 2))
    return rows[:, 0], rows[:, min(mid, rows.shape[1] - 1)], rows[:, -1]


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variant", action="append", default=[], help="NAME:OVERRIDES (repeatable; default: the built-in "
                   "variants)")
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--steps", type=int, default=12000, help="total_env_steps of every run")
    p.add_argument("--categories", default="grasp", help="Playground-Text goal categories")
    p.add_argument("--jobs", type=int, default=1)
    p.add_argument("--runs-dir", type=Path, default=ROOT / "runs" / "sweep_eto")
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "sweep_eto.md")
    p.add_argument("overrides", nargs="*", help="extra train.py overrides for every run")
    opts = p.parse_intermixed_args(argv)
    variants = dict(parse_variant(v) for v in opts.variant) if opts.variant else {
        name: merged(SWEPT, overrides) for name, overrides in DEFAULT_VARIANTS.items()}
    threads = [f"threads={max(1, (os.cpu_count() or 1) // opts.jobs)}"] if opts.jobs > 1 else []
    runs: list[Run] = []
    for name, overrides in variants.items():
        extra = [f"total_env_steps={opts.steps}", "checkpoint.every=0", "~env.heldout_kwargs.split", *threads,
                 *overrides, *opts.overrides]
        runs += plan_runs(["playground"], range(opts.seeds), opts.runs_dir / name, extra, ["eto"],
                              categories=opts.categories)
    print(f"{len(runs)} runs ({opts.jobs} at a time) into {opts.runs_dir}", flush=True)
    with ThreadPoolExecutor(max_workers=opts.jobs) as pool:
        done = list(pool.map(execute, runs))
    lines = ["| variant | overrides | warm start | middle | final (objective) | final per seed |",
             "|---|---|---|---|---|---|"]
    best: tuple[float, str] = (-1.0, "")
    for name, overrides in variants.items():
        points = curve_points(opts.runs_dir / name)
        if points is None:
            lines.append(f"| {name} | `{' '.join(overrides)}` | no finished run | | | |")
            continue
        first, mid, last = points
        seeds = ", ".join(f"{v:.2f}" for v in last)
        lines.append(f"| {name} | `{' '.join(overrides) or '(preset)'}` | {first.mean():.3f} | {mid.mean():.3f} | "
                     f"**{last.mean():.3f}** | {seeds} |")
        best = max(best, (float(last.mean()), name))
    cmd = " ".join(["python scripts/sweep_eto.py", *(argv if argv is not None else sys.argv[1:])])
    text = (f"# ETO tuning sweep ({opts.categories}, {opts.steps} env steps, {opts.seeds} seeds)\n\n`{cmd}`\n\n"
            + "\n".join(lines) + f"\n\nBest final success: **{best[1]}** ({best[0]:.3f}).\n")
    opts.out.parent.mkdir(parents=True, exist_ok=True)
    opts.out.write_text(text)
    print(text)
    failed = [r for r, rc, _ in done if rc != 0]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
