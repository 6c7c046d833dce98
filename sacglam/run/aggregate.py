"""The results of a set of ``train.py`` runs laid out as ``RUNS/<env>/<method>/<seed>/``, aggregated over seeds.

Aggregation (per env, method and goal category, from every run's ``metrics.jsonl``):

* curves: ``eval/greedy/success`` ("all"), ``eval/greedy/success/<category>`` and the held-out
  ``eval/heldout/greedy/success`` ("heldout") against env steps; a step logged twice keeps its last value;
* common grid: the union of the runs' evaluation steps between the latest first evaluation and the earliest last
  one; each run is linearly interpolated onto it (no extrapolation; runs with the same ``eval.every`` and
  ``env.num_envs`` evaluate at the same steps, so nothing is interpolated);
* band: mean over seeds +- a Student-t 95% interval, ``t_{0.975, n-1} * sd / sqrt(n)`` (``sd`` with ``n - 1``);
  none with one seed;
* steps to a success threshold: the first crossing of the seed-mean curve, linearly interpolated between the last
  grid point below the threshold and the first one at or above it (the first grid step if the curve starts above it).

Also the wall-clock minutes of finished runs (their ``DONE`` files, written by :func:`sacglam.run.launch.execute`).
Used by ``scripts/reproduce.py`` (which writes the report), ``scripts/sweep.py`` (``sacglam/run/sweep.py``) and
``scripts/sweep_eto.py``.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sacglam.run.launch import DONE_FILE

METRICS_FILE = "metrics.jsonl"
_SUCCESS_KEY = re.compile(r"^eval/(heldout/)?(greedy|sample)/success(?:/(.+))?$")

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
    ``heldout/<category>`` (``eval/heldout/greedy/...``); with ``eval.sample=true`` the sampled policy's too, the
    same names after ``sampled/`` (``sampled/all``, ``sampled/heldout/<category>``). Null values and torn lines are
    skipped; a step logged twice keeps its last value.
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
                heldout, mode, category = m.group(1), m.group(2), m.group(3)
                name = (category or "all") if not heldout else "heldout" + (f"/{category}" if category else "")
                name = name if mode == "greedy" else f"sampled/{name}"
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


def series_order(names: set[str]) -> list[str]:
    """``all`` first, then the categories, then the held-out series; the sampled policy's series after the greedy."""
    def key(name: str) -> tuple[bool, bool, bool, str]:
        base = name.removeprefix("sampled/")
        return name.startswith("sampled/"), base.startswith("heldout"), base != "all", base

    return sorted(names, key=key)


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
            names = series_order({n for c in per_run for n in c})
            for name in names:
                curves = [c[name] for c in per_run if name in c]
                out.setdefault(env, {}).setdefault(method, {})[name] = summarise(curves, level)
    return out


# ---------------------------------------------------------------------------------------------------------------------
# run times


def wall_minutes(runs_dir: str | Path) -> dict[tuple[str, str], list[float]]:
    """(env, method) -> wall-clock minutes of each finished run (from its ``DONE`` file; runs without are left out)."""
    out: dict[tuple[str, str], list[float]] = {}
    for done in sorted(Path(runs_dir).glob(f"*/*/*/{DONE_FILE}")):
        first = done.read_text().splitlines()[:2]
        if len(first) == 2 and first[1].startswith("seconds "):
            out.setdefault((done.parts[-4], done.parts[-3]), []).append(float(first[1].split()[1]) / 60)
    return out

