"""Reproduce the SAC-GLAM comparison: seeds x {SAC + HER, SAC, PPO-GLAM, ETO} on Playground-Text (all four goal
categories) and {SAC + HER, SAC} on BitFlip-Text, under one env-step budget, then aggregate.

    python scripts/reproduce.py                                   # 5 seeds, both envs, the presets' step budgets
    python scripts/reproduce.py --envs playground --algos sac_her,sac,ppo --steps 60000 --jobs 2
    python scripts/reproduce.py --envs playground --algos eto --categories grasp --steps 12000   # ETO alone
    python scripts/reproduce.py --seeds 10 --steps 200000 --jobs 2
    python scripts/reproduce.py --quick --out /tmp/q              # minutes: tiny budget, 2 seeds (the tests)
    python scripts/reproduce.py --aggregate-only runs/reproduce --out docs/
    python scripts/reproduce.py --dry-run                         # print the train.py commands only

Runs: one ``train.py`` subprocess per (env, method, seed), in ``RUNS/<env>/<method>/seed<k>/`` with ``resume=auto``,
so an interrupted reproduction continues where it stopped and a finished run (marked by a ``DONE`` file) is skipped.
A loop of subprocesses rather than a Hydra multirun: every run is isolated (a crash or OOM loses one run, whose
``train.log`` says why, not the sweep), finished runs are skipped on a rerun, and ``--jobs`` runs several at once
without a joblib launcher; the price is one interpreter start (about 3 s) per run.

Aggregation (per env, method and goal category, from every run's ``metrics.jsonl``):

* curves: ``eval/greedy/success`` ("all"), ``eval/greedy/success/<category>`` and the held-out
  ``eval/heldout/greedy/success`` ("heldout") against env steps; a step logged twice keeps its last value;
* common grid: the union of the runs' evaluation steps between the latest first evaluation and the earliest last
  one; each run is linearly interpolated onto it (no extrapolation; runs with the same ``eval.every`` and
  ``env.num_envs`` evaluate at the same steps, so nothing is interpolated);
* band: mean over seeds +- a Student-t 95% interval, ``t_{0.975, n-1} * sd / sqrt(n)`` (``sd`` with ``n - 1``);
  none with one seed;
* steps to a success threshold: the first crossing of the seed-mean curve, linearly interpolated between the last
  grid point below the threshold and the first one at or above it (the first grid step if the curve starts above it);
  beside it, how many seeds reach the threshold on their own curve.

Outputs in ``--out``: ``<name>.png`` (one panel per env and category, one line per method with its band) and
``<name>.md`` (the steps-to-threshold table and the final success with its interval).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from sacglam.run.aggregate import (
    Summary,
    aggregate,
    common_grid,
    load_curves,
    mean_ci,
    on_grid,
    series_order,
    steps_to_threshold,
    summarise,
    t_quantile,
    wall_minutes,
)
from sacglam.run.launch import CATEGORIES, QUICK, QUICK_STEPS, Run, execute, plan_runs

# The aggregation (sacglam/run/aggregate.py) and the runs (sacglam/run/launch.py) are the package's, shared with the
# sweep scripts; their names stay importable from here as well.
__all__ = ["METHOD_LABELS", "THRESHOLDS", "Run", "Summary", "aggregate", "common_grid", "format_separation",
           "format_table", "format_wall", "load_curves", "main", "mean_ci", "on_grid", "parse_floors", "plan_runs",
           "plot", "separation", "steps_to_threshold", "summarise", "t_quantile", "wall_minutes",
           "write_report"]

ROOT = Path(__file__).resolve().parents[1]

METHOD_LABELS = {"sac_her": "SAC + HER", "sac": "SAC", "ppo": "PPO-GLAM", "eto": "ETO",
                 "eto_ws32": "ETO, small warm start",  # these two: variants linked in by hand (results.md)
                 "sac_her_alp": "SAC + HER, ALP curriculum", "sac_head256": "SAC, critic heads 256 x 256",
                 "sac_her_oracle": "SAC + HER, oracle goals",
                 "ppo_playground": "PPO-GLAM, Playground settings", "ppo_no_kl": "PPO-GLAM, no target KL"}
THRESHOLDS = (0.5, 0.8, 0.9)


# ---------------------------------------------------------------------------------------------------------------------
# report


def _fmt_steps(steps: float | None, seeds: int, n: int) -> str:
    head = "not reached" if steps is None else f"{steps:,.0f}"
    return f"{head} ({seeds}/{n})"


def _method_order(methods: Iterable[str]) -> list[str]:
    return sorted(methods, key=lambda m: list(METHOD_LABELS).index(m) if m in METHOD_LABELS else 99)


def format_wall(runs_dir: str | Path) -> str:
    """Markdown: wall-clock minutes per run (mean, min-max) per env and method."""
    walls = wall_minutes(runs_dir)
    if not walls:
        return ""
    lines = ["| env | method | runs | minutes per run: mean (min-max) |", "|---|---|---|---|"]
    for env in sorted({e for e, _ in walls}):
        for method in _method_order([m for e, m in walls if e == env]):
            w = walls[(env, method)]
            label = METHOD_LABELS.get(method, method)
            lines.append(f"| {env} | {label} | {len(w)} | {np.mean(w):.1f} ({min(w):.1f}-{max(w):.1f}) |")
    return "\n".join(lines)


def separation(a: Summary, b: Summary) -> tuple[float | None, int, int]:
    """Where ``a``'s 95% band lies wholly above ``b``'s: (first such step, how many steps, steps compared).

    Methods with one grid (runs with the same ``eval.every`` and ``env.num_envs``) are compared at its steps. Methods
    whose runs evaluate at other steps (ETO evaluates after rounds, whose env-step counts vary by seed) are compared
    at the union of both grids within their overlap, each seed's curve linearly interpolated there and the bands
    recomputed. With one seed there is no band and nothing separates.
    """
    if np.array_equal(a.grid, b.grid):
        steps, a_lo, b_hi = a.grid, a.lo, b.hi
    else:
        lo, hi = max(a.grid[0], b.grid[0]), min(a.grid[-1], b.grid[-1])
        steps = np.union1d(a.grid, b.grid)
        steps = steps[(steps >= lo) & (steps <= hi)]
        a_lo = mean_ci(on_grid([(a.grid, row) for row in a.per_seed], steps))[1]
        b_hi = mean_ci(on_grid([(b.grid, row) for row in b.per_seed], steps))[2]
    above = a_lo > b_hi  # NaN (one seed) compares False
    first = float(steps[above][0]) if above.any() else None
    return first, int(above.sum()), int(steps.size)


def format_separation(results: dict[str, dict[str, dict[str, Summary]]]) -> str:
    """Markdown: for every pair of methods (in the order SAC + HER, SAC, PPO-GLAM, either way round), per series,
    the first env step at which one's 95% band lies wholly above the other's."""
    lines = ["| env | category | above | below | first step with separate bands | steps separate / compared |",
             "|---|---|---|---|---|---|"]
    for env, methods in results.items():
        order = _method_order(methods)
        for name in series_order({n for m in methods.values() for n in m}):
            for i, m1 in enumerate(order):
                for m2 in order[i + 1 :]:
                    s1, s2 = methods[m1].get(name), methods[m2].get(name)
                    if s1 is None or s2 is None:
                        continue
                    for hi_m, lo_m, hi_s, lo_s in ((m1, m2, s1, s2), (m2, m1, s2, s1)):
                        first, n, total = separation(hi_s, lo_s)
                        if n:
                            lines.append(f"| {env} | {name} | {METHOD_LABELS.get(hi_m, hi_m)} | "
                                         f"{METHOD_LABELS.get(lo_m, lo_m)} | {first:,.0f} | {n} / {total} |")
    return "\n".join(lines) if len(lines) > 2 else ""


def format_table(results: dict[str, dict[str, dict[str, Summary]]], thresholds: Sequence[float] = THRESHOLDS) -> str:
    """Markdown: per env, category and method, the final success (mean [95% CI]) and the steps to each threshold."""
    cols = " | ".join(f"steps to {t:.0%}" for t in thresholds)
    lines = [
        f"| env | category | method | seeds | last step | final success [95% CI] | {cols} |",
        "|" + "---|" * (6 + len(thresholds)),
    ]
    for env, methods in results.items():
        names = series_order({n for m in methods.values() for n in m})
        for name in names:
            for method in _method_order(methods):
                s = methods[method].get(name)
                if s is None:
                    continue
                n = s.per_seed.shape[0]
                final = f"{s.mean[-1]:.3f}"
                if n > 1:
                    final += f" [{s.lo[-1]:.3f}, {s.hi[-1]:.3f}]"
                reach = " | ".join(_fmt_steps(*s.reach(t), n) for t in thresholds)
                label = METHOD_LABELS.get(method, method)
                lines.append(f"| {env} | {name} | {label} | {n} | {s.grid[-1]:,.0f} | {final} | {reach} |")
    return "\n".join(lines)


LEGEND_INCHES = 0.8
"""Height under the panels for the one legend of the plot (up to 3 rows of 4 entries)."""


def plot(results: dict[str, dict[str, dict[str, Summary]]], out_png: str | Path,
         floors: dict[str, float] | None = None, series: Sequence[str] | None = None) -> Path:
    """One panel per (env, series), one line per method with its 95% band (clipped to [0, 1]), and the env's random
    agent as a dashed line where ``floors`` has it; Agg canvas. ``series``: only these series get a panel (None:
    all).

    Raises:
        SystemExit: a name in ``series`` that no env logged (names the ones there are).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    logged = {env: series_order({n for m in methods.values() for n in m}) for env, methods in results.items()}
    if series is not None:
        known = {n for names in logged.values() for n in names}
        unknown = [n for n in series if n not in known]
        if unknown:
            raise SystemExit(f"--plot-series {','.join(unknown)}: not a series of these runs; they have "
                             f"{', '.join(series_order(known))}")
    panels = [(env, name) for env, names in logged.items() for name in names if series is None or name in series]
    cols = min(3, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig = Figure(figsize=(4.5 * cols, 3.4 * rows + LEGEND_INCHES))
    FigureCanvasAgg(fig)
    colors = {"sac": "tab:blue", "sac_her": "tab:red", "ppo": "tab:green", "eto": "tab:purple",
              "eto_ws32": "tab:orange", "sac_her_alp": "tab:brown", "sac_her_oracle": "tab:pink",
              "ppo_playground": "tab:olive", "sac_head256": "tab:cyan", "ppo_no_kl": "tab:gray"}
    legend: dict[str, Any] = {}  # label -> line, over every panel: one legend under the panels
    for i, (env, name) in enumerate(panels):
        ax = fig.add_subplot(rows, cols, i + 1)
        for method in _method_order(results[env]):
            s = results[env][method].get(name)
            if s is None:
                continue
            color = colors.get(method)
            label = f"{METHOD_LABELS.get(method, method)} (n={s.per_seed.shape[0]})"
            (line,) = ax.plot(s.grid, s.mean, label=label, color=color, marker="." if s.grid.size < 30 else None)
            legend.setdefault(label, line)
            if not np.isnan(s.lo).all():
                ax.fill_between(s.grid, np.clip(s.lo, 0, 1), np.clip(s.hi, 0, 1), color=color, alpha=0.2, lw=0)
        if floors and env in floors:
            floor = f"random agent, {env} ({floors[env]:.2f})"
            legend.setdefault(floor, ax.axhline(floors[env], color="grey", ls="--", lw=1, label=floor))
        ax.set_title(f"{env}: {name}")
        ax.set_xlabel("env steps")
        ax.set_ylabel("sampled success" if name.startswith("sampled/") else "greedy success")
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
    fig.legend(list(legend.values()), list(legend), loc="lower center", ncol=min(4, max(1, len(legend))),
               fontsize="small", frameon=False)
    fig.tight_layout(rect=(0, LEGEND_INCHES / fig.get_figheight(), 1, 1))
    out = Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    return out


def write_report(runs_dir: Path, out_dir: Path, name: str, note: str = "", floors: dict[str, float] | None = None,
                 plot_series: Sequence[str] | None = None) -> tuple[Path, Path]:
    """Aggregate ``runs_dir`` and write ``out_dir/<name>.png`` and ``out_dir/<name>.md``; returns both paths.
    ``floors``: env -> a uniform random agent's success (``scripts/random_baseline.py``), drawn and listed.
    ``plot_series``: the series the PNG shows (None: all); the table always has every series."""
    results = aggregate(runs_dir)
    png = plot(results, out_dir / f"{name}.png", floors, plot_series)
    if floors:
        listed = ", ".join(f"{env} {value:.3f}" for env, value in sorted(floors.items()))
        note += f"Uniform random agent (`scripts/random_baseline.py`, dashed in the plot): {listed}.\n\n"
    table = format_table(results)
    wall = format_wall(runs_dir)
    wall = f"\n\nWall-clock time per run (this machine, `--jobs` runs sharing its cores):\n\n{wall}" if wall else ""
    sep = format_separation(results)
    sep = (f"\n\nWhere one method's 95% band lies wholly above another's (pairs with no such step are not "
           f"listed):\n\n{sep}" if sep else "")
    wall = sep + wall
    md = out_dir / f"{name}.md"
    md.write_text(
        f"# {name}\n\n{note}Runs: `{runs_dir}`. Evaluation success (greedy; the sampled policy's under `sampled/`), "
        f"mean over seeds with a Student-t 95% interval; steps to a threshold: first crossing of the seed mean "
        f"(linear interpolation), (seeds reaching it on their own / seeds).\n\n![success]({png.name})\n\n"
        f"{table}{wall}\n"
    )
    print(table + wall)
    print(f"wrote {png} and {md}")
    return png, md



def parse_floors(items: Sequence[str]) -> dict[str, float]:
    """``["babyai=0.28", ...]`` -> ``{"babyai": 0.28}``; SystemExit naming a malformed item or a value outside
    [0, 1]."""
    floors: dict[str, float] = {}
    for item in items:
        env, sep, value = item.partition("=")
        try:
            success = float(value)
        except ValueError:
            success = math.nan
        if not sep or not env or not 0 <= success <= 1:
            raise SystemExit(f"--floor {item!r}: expected ENV=SUCCESS with SUCCESS in [0, 1], e.g. babyai=0.28")
        floors[env] = success
    return floors


def main(argv: Sequence[str] | None = None) -> int:
    """Run (or only aggregate) the reproduction; returns the exit status (1 if any run failed)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help=f"tiny budget ({QUICK_STEPS} steps, 4 envs), 2 seeds")
    p.add_argument("--seeds", type=int, default=None, help="number of seeds, 0..N-1 (default 5; 2 with --quick)")
    p.add_argument("--steps", type=int, default=None, help="total_env_steps of every run (default: the preset's)")
    p.add_argument("--envs", default="playground,bitflip",
                   help="comma-separated: playground, bitflip, babyai, textworld")
    p.add_argument("--algos", default=None,
                   help="comma-separated methods: sac_her, sac, ppo (default: every method of each env)")
    p.add_argument("--categories", default=CATEGORIES,
                   help=f"Playground-Text goal categories of every run (default {CATEGORIES}; '' keeps the preset's)")
    p.add_argument("--out", type=Path, default=ROOT / "docs", help="where the PNG and the markdown go")
    p.add_argument("--name", default=None, help="file stem of the outputs (default reproduce, reproduce_quick)")
    p.add_argument("--runs-dir", type=Path, default=None,
                   help="run folders (default runs/reproduce or runs/reproduce_quick)")  # fmt: skip
    p.add_argument("--aggregate-only", type=Path, default=None, metavar="DIR", help="re-aggregate runs in DIR")
    p.add_argument("--jobs", type=int, default=1, help="trainings at once (default 1; each gets cores/jobs threads)")
    p.add_argument("--dry-run", action="store_true", help="print the commands and exit")
    p.add_argument("--floor", action="append", default=[], metavar="ENV=SUCCESS",
                   help="a uniform random agent's success on ENV (scripts/random_baseline.py), drawn in every panel "
                        "of ENV and listed; repeat for several envs")
    p.add_argument("--plot-series", default=None, metavar="S1,S2",
                   help="only these series get a panel in the PNG, e.g. all,sampled/objective (default: every "
                        "series; the table keeps them all)")
    p.add_argument("overrides", nargs="*", help="extra train.py overrides for every run, e.g. eval.every=10000")
    opts = p.parse_intermixed_args(argv)  # overrides may come before and after the options
    floors = parse_floors(opts.floor)
    plot_series = [x.strip() for x in opts.plot_series.split(",") if x.strip()] if opts.plot_series else None
    name = opts.name or ("reproduce_quick" if opts.quick else "reproduce")
    if opts.aggregate_only is not None:
        write_report(opts.aggregate_only, opts.out, name, floors=floors, plot_series=plot_series)
        return 0
    if opts.jobs < 1:
        raise SystemExit(f"--jobs must be >= 1, got {opts.jobs}")
    seeds = list(range(opts.seeds if opts.seeds is not None else (2 if opts.quick else 5)))
    runs_dir = opts.runs_dir or ROOT / "runs" / name
    extra: list[str] = list(QUICK) if opts.quick else []
    algos = [a.strip() for a in opts.algos.split(",") if a.strip()] if opts.algos else None
    steps = opts.steps or (QUICK_STEPS if opts.quick else None)
    if steps is not None:
        extra.append(f"total_env_steps={steps}")
    if opts.jobs > 1 and not opts.quick:
        extra.append(f"threads={max(1, (os.cpu_count() or 1) // opts.jobs)}")
    extra += opts.overrides
    runs = plan_runs([e.strip() for e in opts.envs.split(",") if e.strip()], seeds, runs_dir, extra, algos,
                     opts.categories, opts.quick)
    runs.sort(key=lambda r: r.seed)  # seed-major: a reproduction stopped early still has every method's first seeds
    if opts.dry_run:
        for run in runs:
            print(" ".join(run.command()))
        return 0
    print(f"{len(runs)} runs ({opts.jobs} at a time) into {runs_dir}", flush=True)
    with ThreadPoolExecutor(max_workers=opts.jobs) as pool:
        results = list(pool.map(execute, runs))
    failed = [r for r, rc, _ in results if rc != 0]
    note = "**Quick mode: a smoke run of the pipeline; these numbers say nothing about learning.**\n\n"
    note = note if opts.quick else ""
    write_report(runs_dir, opts.out, name, note, floors, plot_series)
    if failed:
        print(f"{len(failed)} run(s) failed: " + ", ".join(str(r.run_dir) for r in failed), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
