"""A tuning sweep of any method on any env: the grid of the ``--grid`` options, each point a few seeded runs.

    python scripts/sweep.py --env babyai --algo ppo --grid algo.lr=3e-4,1e-3,3e-3 --grid algo.ent_coef=0,0.01 \
        --seeds 2 --steps 12000 --jobs 2 --series sampled/all --out docs/sweep_babyai_ppo.md \
        env.kwargs.level=BabyAI-GoToRedBallNoDists-v0 eval.every=2000

So that a comparison does not pit a tuned method against an untuned one. Each grid point is the method's preset
(``sacglam.run.launch.METHODS``) plus the point's overrides, run through ``reproduce.py``'s runner (isolated
subprocesses, ``resume=auto``, a finished run skipped on a rerun) into ``RUNS/<point>/<env>/<method>/seed<k>``.

The table gives, per point and mean over seeds, the final success and the mean success over all evaluations (the
area under the learning curve divided by its length: it rewards learning early, which the final value does not
once several points reach 1.0) of each ``--series`` (an ``aggregate.load_curves`` series name: ``all``,
``sampled/all``, a category, ``heldout``...). Points are ranked by ``--rank`` (``mean`` or ``final``) of the first
series.
"""

from __future__ import annotations

import argparse
import itertools
import os
import re
import sys
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from sacglam.run.aggregate import aggregate, wall_minutes
from sacglam.run.launch import CATEGORIES, METHODS, Run, execute, plan_runs

ROOT = Path(__file__).resolve().parents[2]  # the repository (the package is installed editable)


def parse_grid(options: Sequence[str]) -> list[tuple[str, list[str]]]:
    """``["algo.lr=1e-3,3e-3", "algo.ent_coef=0"]`` -> ``[("algo.lr", ["1e-3", "3e-3"]), ("algo.ent_coef", ["0"])]``.

    A key of several overrides joined by ``+`` (``algo.lr_actor+algo.lr_critic=1e-3,3e-3``) sets them all to each
    value together: one axis of the grid, not their product (see :func:`point_overrides`).

    Raises:
        ValueError: an option without ``=``, an empty key or value, or a key given twice.
    """
    grid: list[tuple[str, list[str]]] = []
    for option in options:
        key, sep, values = option.partition("=")
        key = key.strip()
        choices = [v.strip() for v in values.split(",")]
        if not sep or not all(key.split("+")) or not all(choices):
            raise ValueError(f"--grid {option!r}: expected KEY=V1,V2,... (a train.py override key and its values)")
        if key in dict(grid):
            raise ValueError(f"--grid: {key} is given twice")
        grid.append((key, choices))
    return grid


def point_overrides(point: Sequence[tuple[str, str]]) -> list[str]:
    """The train.py overrides of one grid point (a ``+``-joined key gives one override per part)."""
    return [f"{part}={v}" for k, v in point for part in k.split("+")]


def point_name(point: Sequence[tuple[str, str]]) -> str:
    """The folder of one grid point: ``algo.lr_1e-3__algo.ent_coef_0``.

    Only ``[A-Za-z0-9._-]`` (any other character becomes ``-``): the folder goes into ``hydra.run.dir=...``, whose
    override grammar refuses a second ``=``.
    """
    name = "__".join(f"{k}_{v}" for k, v in point) or "preset"
    return re.sub(r"[^A-Za-z0-9._-]", "-", name)


def summarise_point(runs_dir: Path, env: str, method: str, series: Sequence[str]) -> dict[str, tuple[float, float]]:
    """Series -> (final, mean over evaluations) of one point's runs, each the mean over seeds (NaN if not logged)."""
    try:
        results = aggregate(runs_dir).get(env, {}).get(method, {})
    except FileNotFoundError:  # every run of the point failed before its first evaluation (its train.log says why)
        results = {}
    out = {}
    for name in series:
        s = results.get(name)
        out[name] = (float(s.mean[-1]), float(s.mean.mean())) if s is not None else (float("nan"), float("nan"))
    return out


def format_table(rows: Sequence[tuple[Sequence[tuple[str, str]], dict[str, tuple[float, float]], str]],
                 keys: Sequence[str], series: Sequence[str]) -> str:
    """Markdown: one row per point (its values, final / mean of each series, minutes per run)."""
    head = [*keys, *(f"{s}: final / mean" for s in series), "minutes per run"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for point, values, wall in rows:
        cells = [v for _, v in point] + [f"{values[s][0]:.3f} / {values[s][1]:.3f}" for s in series] + [wall]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--env", required=True, choices=sorted(METHODS))
    p.add_argument("--algo", required=True, help="a method of the env (scripts/reproduce.py's names: sac_her, ppo...)")
    p.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2",
                   help="one swept override and its values (repeat for each key; the grid is their product)")
    p.add_argument("--seeds", type=int, default=1)
    p.add_argument("--steps", type=int, default=20000, help="total_env_steps of every run")
    p.add_argument("--jobs", type=int, default=1)
    p.add_argument("--series", default="all", help="comma-separated series to report; the first ranks the points")
    p.add_argument("--rank", default="mean", choices=["mean", "final"])
    p.add_argument("--categories", default=CATEGORIES, help="Playground goal categories (default: reproduce.py's)")
    p.add_argument("--runs-dir", type=Path, default=None, help="default: runs/sweep_<env>_<algo>")
    p.add_argument("--out", type=Path, default=None, help="the markdown report (default: <runs-dir>/sweep.md)")
    p.add_argument("overrides", nargs="*", help="extra train.py overrides for every run")
    opts = p.parse_intermixed_args(argv)
    if opts.algo not in METHODS[opts.env]:
        p.error(f"--algo: {opts.env} has no {opts.algo!r} preset; choose from {', '.join(METHODS[opts.env])}")
    try:
        grid = parse_grid(opts.grid)
    except ValueError as e:
        p.error(str(e))
    runs_dir = opts.runs_dir or ROOT / "runs" / f"sweep_{opts.env}_{opts.algo}"
    out = opts.out or runs_dir / "sweep.md"
    series = [s.strip() for s in opts.series.split(",") if s.strip()]
    keys = [k for k, _ in grid]
    points = [list(zip(keys, values, strict=True)) for values in itertools.product(*(v for _, v in grid))]
    point_dirs = [runs_dir / point_name(point) for point in points]
    threads = [f"threads={max(1, (os.cpu_count() or 1) // opts.jobs)}"] if opts.jobs > 1 else []
    runs: list[Run] = []
    for point, point_dir in zip(points, point_dirs, strict=True):
        extra = [f"total_env_steps={opts.steps}", *threads, *opts.overrides, *point_overrides(point)]
        runs += plan_runs([opts.env], range(opts.seeds), point_dir, extra, [opts.algo], opts.categories)
    print(f"{len(points)} points x {opts.seeds} seed(s) = {len(runs)} runs ({opts.jobs} at a time) into {runs_dir}",
          flush=True)
    with ThreadPoolExecutor(max_workers=opts.jobs) as pool:
        done = list(pool.map(execute, runs))

    rows = []
    for point, point_dir in zip(points, point_dirs, strict=True):
        walls = [w for ws in wall_minutes(point_dir).values() for w in ws]
        wall = f"{np.mean(walls):.1f}" if walls else "-"
        rows.append((point, summarise_point(point_dir, opts.env, opts.algo, series), wall))
    which = 0 if opts.rank == "final" else 1
    best = max(rows, key=lambda r: np.nan_to_num(r[1][series[0]][which], nan=-1.0))
    best_text = ", ".join(f"{k}={v}" for k, v in best[0]) or "the preset"
    table = format_table(rows, keys, series)
    out.parent.mkdir(parents=True, exist_ok=True)
    command = " ".join(argv if argv is not None else sys.argv[1:])
    out.write_text(
        f"# Sweep: {opts.algo} on {opts.env}\n\n`python scripts/sweep.py {command}`\n\n"
        f"After {opts.steps:,} env steps, mean over {opts.seeds} seed(s): final success / mean success over the "
        f"evaluations. Best by {opts.rank} {series[0]}: {best_text} "
        f"({best[1][series[0]][which]:.3f}).\n\n{table}\n")
    print(table)
    print(f"best: {best_text} ({opts.rank} {series[0]} {best[1][series[0]][which]:.3f}); wrote {out}")
    return 1 if any(rc != 0 for _, rc, _ in done) else 0

