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
import json
import math
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]

# The methods per env, as train.py overrides. BitFlip has no plain-SAC preset: HER and its hindsight term off.
METHODS: dict[str, dict[str, list[str]]] = {
    "playground": {
        "sac": ["experiment=playground_sac"],
        "sac_her": ["experiment=playground_sac_her"],
        "ppo": ["experiment=playground_ppo"],
        "eto": ["experiment=playground_eto"],  # its expert's env steps count toward the same budget
    },
    "bitflip": {
        "sac": ["experiment=bitflip_her", "buffer.her.ratio=0", "algo.hindsight_bc_coef=0"],
        "sac_her": ["experiment=bitflip_her"],
    },
}
METHOD_LABELS = {"sac_her": "SAC + HER", "sac": "SAC", "ppo": "PPO-GLAM", "eto": "ETO",
                 "eto_ws32": "ETO, small warm start",  # these two: variants linked in by hand (results.md)
                 "sac_her_alp": "SAC + HER, ALP curriculum"}
# Playground-Text goal categories of every run (the preset's default since 2026-12-07 too): the comparison of the
# SAC-GLAM paper covers all four.
CATEGORIES = "grasp,grow_plant,grow_herbivore,grow_carnivore"
THRESHOLDS = (0.5, 0.8, 0.9)
# Every run: no wall-clock stop (seeds must reach the same step count), no progress bar in the log file.
COMMON = ["time_limit_min=0", "logger.progress=false", "resume=auto"]
# --quick: a bounded smoke reproduction (tiny budget; the curves mean nothing, the pipeline is what is checked).
QUICK = [
    "env.num_envs=4", "eval.every=128", "eval.episodes_per_category=4", "eval.num_envs=4", "env.corpus_episodes=10",
    "checkpoint.every=0", "threads=1",
]  # fmt: skip
QUICK_REPLAY = ["batch_size=16", "learning_starts=32", "buffer.capacity=2048"]  # off-policy methods only
QUICK_ON_POLICY = ["algo.rollout_steps=8", "algo.minibatch_size=16"]  # PPO: rollouts of 4 envs x 8 steps
QUICK_ROUNDS = ["algo.tasks=8", "algo.warm_start_episodes=8", "algo.epochs=1"]  # ETO: rounds of 8 tasks
QUICK_BY_METHOD = {"ppo": QUICK_ON_POLICY, "eto": QUICK_ROUNDS}  # the rest: QUICK_REPLAY
QUICK_STEPS = 256
DONE_FILE = "DONE"
METRICS_FILE = "metrics.jsonl"
_SUCCESS_KEY = re.compile(r"^eval/(heldout/)?greedy/success(?:/(.+))?$")

Curve = tuple[np.ndarray, np.ndarray]  # (steps [T] float64 increasing, values [T] float64)


# ---------------------------------------------------------------------------------------------------------------------
# statistics


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the regularised incomplete beta function (modified Lentz, Numerical Recipes 6.4)."""
    tiny, eps = 1e-300, 1e-15
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 400):
        m2 = 2 * m
        for aa in (m * (b - m) * x / ((qam + m2) * (a + m2)), -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))):
            d = 1.0 + aa * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + aa / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < eps:
            break
    return h


def betainc(a: float, b: float, x: float) -> float:
    """Regularised incomplete beta function ``I_x(a, b)`` for ``a, b > 0`` and ``0 <= x <= 1``."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _betacf(a, b, x) / a
    return 1.0 - math.exp(log_front) * _betacf(b, a, 1.0 - x) / b


def t_cdf(t: float, df: float) -> float:
    """Student-t cumulative distribution function with ``df`` degrees of freedom."""
    tail = 0.5 * betainc(df / 2.0, 0.5, df / (df + t * t))
    return 1.0 - tail if t >= 0 else tail


def t_quantile(q: float, df: float) -> float:
    """The ``q`` quantile of Student's t with ``df`` degrees of freedom (bisection on :func:`t_cdf`; |error| < 1e-9).

    Raises:
        ValueError: ``q`` outside (0, 1) or ``df <= 0``.
    """
    if not 0.0 < q < 1.0 or df <= 0:
        raise ValueError(f"t_quantile needs 0 < q < 1 and df > 0, got q={q}, df={df}")
    if q < 0.5:
        return -t_quantile(1.0 - q, df)
    lo, hi = 0.0, 1.0
    while t_cdf(hi, df) < q:
        hi *= 2.0
    while hi - lo > 1e-10 * max(1.0, hi):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if t_cdf(mid, df) < q else (lo, mid)
    return 0.5 * (lo + hi)


def mean_ci(values: np.ndarray, level: float = 0.95) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mean over seeds and its Student-t confidence interval.

    Args:
        values: [S, G] one row per seed on a common grid of G steps.
        level: two-sided confidence level.

    Returns:
        (mean, lo, hi), each [G]; with one seed lo and hi are NaN (no interval).
    """
    values = np.asarray(values, dtype=np.float64)
    if values.ndim != 2 or values.shape[0] < 1:
        raise ValueError(f"mean_ci expects [seeds, grid] values with at least one seed, got shape {values.shape}")
    n = values.shape[0]
    mean = values.mean(0)
    if n < 2:
        nan = np.full_like(mean, np.nan)
        return mean, nan, nan.copy()
    half = t_quantile(0.5 + level / 2.0, n - 1) * values.std(0, ddof=1) / math.sqrt(n)
    return mean, mean - half, mean + half


def steps_to_threshold(steps: np.ndarray, values: np.ndarray, threshold: float) -> float | None:
    """Env steps at which a curve first reaches ``threshold``.

    The first grid point with ``value >= threshold`` decides: if it is the first point, its step; otherwise the
    linear interpolation between it and the point before it (which is below the threshold).

    Returns:
        The step (a float), or None when the curve never reaches the threshold.
    """
    steps = np.asarray(steps, dtype=np.float64)
    values = np.asarray(values, dtype=np.float64)
    hits = np.flatnonzero(values >= threshold)
    if hits.size == 0:
        return None
    i = int(hits[0])
    if i == 0:
        return float(steps[0])
    x0, x1, y0, y1 = steps[i - 1], steps[i], values[i - 1], values[i]
    return float(x0 + (threshold - y0) / (y1 - y0) * (x1 - x0))


# ---------------------------------------------------------------------------------------------------------------------
# curves


def load_curves(metrics_path: str | Path) -> dict[str, Curve]:
    """Success curves of one run: series name -> (steps, values).

    Series: ``all`` (``eval/greedy/success``), ``<category>`` (``eval/greedy/success/<category>``), ``heldout`` and
    ``heldout/<category>`` (``eval/heldout/greedy/...``). Null values and torn lines are skipped; a step logged twice
    keeps its last value.
    """
    points: dict[str, dict[int, float]] = {}
    with Path(metrics_path).open() as f:
        for line in f:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # a run killed mid-write leaves a torn last line
            for key, value in record.items():
                m = _SUCCESS_KEY.match(key)
                if m is None or value is None:
                    continue
                heldout, category = m.group(1), m.group(2)
                name = (category or "all") if not heldout else "heldout" + (f"/{category}" if category else "")
                points.setdefault(name, {})[int(record["step"])] = float(value)
    out: dict[str, Curve] = {}
    for name, by_step in points.items():
        steps = np.array(sorted(by_step), dtype=np.float64)
        out[name] = steps, np.array([by_step[int(s)] for s in steps], dtype=np.float64)
    return out


def common_grid(curves: Sequence[Curve]) -> np.ndarray:
    """The union of the curves' steps between the latest first step and the earliest last step.

    Raises:
        ValueError: no curve, or curves that do not overlap.
    """
    if not curves:
        raise ValueError("common_grid needs at least one curve")
    lo = max(float(x[0]) for x, _ in curves)
    hi = min(float(x[-1]) for x, _ in curves)
    if lo > hi:
        raise ValueError(f"the runs' evaluation steps do not overlap (latest first {lo:g} > earliest last {hi:g})")
    grid = np.unique(np.concatenate([x for x, _ in curves]))
    return grid[(grid >= lo) & (grid <= hi)]


def on_grid(curves: Sequence[Curve], grid: np.ndarray) -> np.ndarray:
    """[S, G]: every curve linearly interpolated onto ``grid`` (which lies inside each curve's step range)."""
    return np.stack([np.interp(grid, x, y) for x, y in curves])


@dataclass
class Summary:
    """One (env, method, series) aggregated over seeds."""

    grid: np.ndarray  # [G] env steps
    mean: np.ndarray  # [G]
    lo: np.ndarray  # [G] (NaN with one seed)
    hi: np.ndarray  # [G]
    per_seed: np.ndarray  # [S, G]

    def reach(self, threshold: float) -> tuple[float | None, int]:
        """(steps for the seed mean to reach ``threshold``, number of seeds that reach it on their own)."""
        seeds = sum(steps_to_threshold(self.grid, row, threshold) is not None for row in self.per_seed)
        return steps_to_threshold(self.grid, self.mean, threshold), seeds


def summarise(curves: Sequence[Curve], level: float = 0.95) -> Summary:
    """Aggregate one series over seeds: common grid, interpolation, mean and t-interval."""
    grid = common_grid(curves)
    per_seed = on_grid(curves, grid)
    mean, lo, hi = mean_ci(per_seed, level)
    return Summary(grid, mean, lo, hi, per_seed)


def _series_order(names: set[str]) -> list[str]:
    """``all`` first, then the categories, then the held-out series."""
    return sorted(names, key=lambda n: (n.startswith("heldout"), n != "all", n))


def discover_runs(runs_dir: str | Path) -> dict[str, dict[str, list[Path]]]:
    """``RUNS/<env>/<method>/<seed>/metrics.jsonl`` files: env -> method -> metrics paths (sorted by seed folder)."""
    found: dict[str, dict[str, list[Path]]] = {}
    for path in sorted(Path(runs_dir).glob(f"*/*/*/{METRICS_FILE}")):
        env, method = path.parts[-4], path.parts[-3]
        found.setdefault(env, {}).setdefault(method, []).append(path)
    return found


def aggregate(runs_dir: str | Path, level: float = 0.95) -> dict[str, dict[str, dict[str, Summary]]]:
    """env -> method -> series -> :class:`Summary`, over the runs found under ``runs_dir``.

    A series is aggregated over the runs that logged it; runs without any evaluation yet are skipped.

    Raises:
        FileNotFoundError: no ``metrics.jsonl`` under ``runs_dir`` in the ``<env>/<method>/<seed>/`` layout.
    """
    runs = discover_runs(runs_dir)
    if not runs:
        raise FileNotFoundError(
            f"no runs under {runs_dir}: expected {runs_dir}/<env>/<method>/<seed>/{METRICS_FILE} "
            "(the layout scripts/reproduce.py writes)"
        )
    out: dict[str, dict[str, dict[str, Summary]]] = {}
    for env, methods in runs.items():
        for method, paths in methods.items():
            per_run = [load_curves(p) for p in paths]
            names = _series_order({n for c in per_run for n in c})
            for name in names:
                curves = [c[name] for c in per_run if name in c]
                out.setdefault(env, {}).setdefault(method, {})[name] = summarise(curves, level)
    return out


# ---------------------------------------------------------------------------------------------------------------------
# report


def _fmt_steps(steps: float | None, seeds: int, n: int) -> str:
    head = "not reached" if steps is None else f"{steps:,.0f}"
    return f"{head} ({seeds}/{n})"


def _method_order(methods: Iterable[str]) -> list[str]:
    return sorted(methods, key=lambda m: list(METHOD_LABELS).index(m) if m in METHOD_LABELS else 99)


def wall_minutes(runs_dir: str | Path) -> dict[tuple[str, str], list[float]]:
    """(env, method) -> wall-clock minutes of each finished run (from its ``DONE`` file; runs without are left out)."""
    out: dict[tuple[str, str], list[float]] = {}
    for done in sorted(Path(runs_dir).glob(f"*/*/*/{DONE_FILE}")):
        first = done.read_text().splitlines()[:2]
        if len(first) == 2 and first[1].startswith("seconds "):
            out.setdefault((done.parts[-4], done.parts[-3]), []).append(float(first[1].split()[1]) / 60)
    return out


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
        for name in _series_order({n for m in methods.values() for n in m}):
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
        names = _series_order({n for m in methods.values() for n in m})
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


def plot(results: dict[str, dict[str, dict[str, Summary]]], out_png: str | Path) -> Path:
    """One panel per (env, series), one line per method with its 95% band (clipped to [0, 1]); Agg canvas."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    panels = [
        (env, name)
        for env, methods in results.items()
        for name in _series_order({n for m in methods.values() for n in m})
    ]
    cols = min(3, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig = Figure(figsize=(4.5 * cols, 3.4 * rows))
    FigureCanvasAgg(fig)
    colors = {"sac": "tab:blue", "sac_her": "tab:red", "ppo": "tab:green", "eto": "tab:purple",
              "eto_ws32": "tab:orange", "sac_her_alp": "tab:brown"}
    for i, (env, name) in enumerate(panels):
        ax = fig.add_subplot(rows, cols, i + 1)
        for method in _method_order(results[env]):
            s = results[env][method].get(name)
            if s is None:
                continue
            color = colors.get(method)
            label = f"{METHOD_LABELS.get(method, method)} (n={s.per_seed.shape[0]})"
            ax.plot(s.grid, s.mean, label=label, color=color, marker="." if s.grid.size < 30 else None)
            if not np.isnan(s.lo).all():
                ax.fill_between(s.grid, np.clip(s.lo, 0, 1), np.clip(s.hi, 0, 1), color=color, alpha=0.2, lw=0)
        ax.set_title(f"{env}: {name}")
        ax.set_xlabel("env steps")
        ax.set_ylabel("greedy success")
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small", loc="best")
    fig.tight_layout()
    out = Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    return out


def write_report(runs_dir: Path, out_dir: Path, name: str, note: str = "") -> tuple[Path, Path]:
    """Aggregate ``runs_dir`` and write ``out_dir/<name>.png`` and ``out_dir/<name>.md``; returns both paths."""
    results = aggregate(runs_dir)
    png = plot(results, out_dir / f"{name}.png")
    table = format_table(results)
    wall = format_wall(runs_dir)
    wall = f"\n\nWall-clock time per run (this machine, `--jobs` runs sharing its cores):\n\n{wall}" if wall else ""
    sep = format_separation(results)
    sep = (f"\n\nWhere one method's 95% band lies wholly above another's (pairs with no such step are not "
           f"listed):\n\n{sep}" if sep else "")
    wall = sep + wall
    md = out_dir / f"{name}.md"
    md.write_text(
        f"# {name}\n\n{note}Runs: `{runs_dir}`. Greedy evaluation success, mean over seeds with a Student-t 95% "
        f"interval; steps to a threshold: first crossing of the seed mean (linear interpolation), (seeds reaching "
        f"it on their own / seeds).\n\n![success]({png.name})\n\n{table}{wall}\n"
    )
    print(table + wall)
    print(f"wrote {png} and {md}")
    return png, md


# ---------------------------------------------------------------------------------------------------------------------
# running


@dataclass
class Run:
    """One train.py run of the reproduction."""

    env: str
    method: str
    seed: int
    run_dir: Path
    overrides: list[str]

    def command(self) -> list[str]:
        return [sys.executable, str(ROOT / "train.py"), *self.overrides, f"seed={self.seed}",
                f"hydra.run.dir={self.run_dir}"]  # fmt: skip


def plan_runs(envs: Sequence[str], seeds: Sequence[int], runs_dir: Path, extra: Sequence[str],
              algos: Sequence[str] | None = None, categories: str = CATEGORIES, quick: bool = False) -> list[Run]:
    """Every (env, method, seed) run with its overrides (method preset + common + ``extra``).

    Args:
        algos: the methods to run (default: every method of each env); a method an env has no preset for is
            skipped with a note.
        categories: Playground-Text goal categories (comma-separated) of every Playground run.
        quick: add the quick overrides (replay or on-policy ones by method).

    Raises:
        ValueError: an unknown env or method name (names the known ones).
    """
    known = {m for methods in METHODS.values() for m in methods}
    for a in algos or []:
        if a not in known:
            raise ValueError(f"--algos: unknown method {a!r}; choose from {', '.join(sorted(known))}")
    runs = []
    for env in envs:
        if env not in METHODS:
            raise ValueError(f"--envs: unknown env {env!r}; choose from {', '.join(METHODS)}")
        env_extra = [f"env.kwargs.goal_categories=[{categories}]"] if env == "playground" and categories else []
        for method in algos or list(METHODS[env]):
            if method not in METHODS[env]:
                print(f"note: {env} has no {method} preset; skipped", flush=True)
                continue
            by_kind = QUICK_BY_METHOD.get(method, QUICK_REPLAY) if quick else []
            for seed in seeds:
                run_dir = runs_dir / env / method / f"seed{seed}"
                overrides = [*METHODS[env][method], *COMMON, *env_extra, *by_kind, *extra]
                runs.append(Run(env, method, seed, run_dir, overrides))
    return runs


def execute(run: Run) -> tuple[Run, int, float]:
    """Run one training (skipped if already DONE); its output goes to ``run_dir/train.log``.

    Returns:
        (run, exit status, seconds).
    """
    if (run.run_dir / DONE_FILE).exists():
        print(f"skip (done): {run.run_dir}", flush=True)
        return run, 0, 0.0
    run.run_dir.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    t0 = time.perf_counter()
    with (run.run_dir / "train.log").open("a") as log:
        rc = subprocess.run(run.command(), cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env).returncode
    seconds = time.perf_counter() - t0
    if rc == 0:
        (run.run_dir / DONE_FILE).write_text(" ".join(run.command()) + f"\nseconds {seconds:.1f}\n")
    status = "ok" if rc == 0 else f"FAILED (exit {rc}; see {run.run_dir / 'train.log'})"
    print(f"{status}: {run.env} {run.method} seed {run.seed} in {seconds:.0f} s", flush=True)
    return run, rc, seconds


def main(argv: Sequence[str] | None = None) -> int:
    """Run (or only aggregate) the reproduction; returns the exit status (1 if any run failed)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help=f"tiny budget ({QUICK_STEPS} steps, 4 envs), 2 seeds")
    p.add_argument("--seeds", type=int, default=None, help="number of seeds, 0..N-1 (default 5; 2 with --quick)")
    p.add_argument("--steps", type=int, default=None, help="total_env_steps of every run (default: the preset's)")
    p.add_argument("--envs", default="playground,bitflip", help="comma-separated: playground, bitflip")
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
    p.add_argument("overrides", nargs="*", help="extra train.py overrides for every run, e.g. eval.every=10000")
    opts = p.parse_intermixed_args(argv)  # overrides may come before and after the options
    name = opts.name or ("reproduce_quick" if opts.quick else "reproduce")
    if opts.aggregate_only is not None:
        write_report(opts.aggregate_only, opts.out, name)
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
    write_report(runs_dir, opts.out, name, note)
    if failed:
        print(f"{len(failed)} run(s) failed: " + ", ".join(str(r.run_dir) for r in failed), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
