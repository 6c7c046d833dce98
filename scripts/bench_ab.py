"""Benchmark A/B: ``scripts/bench.py`` (or a timed ``train.py`` run) of this tree against a reference tree.

Speed claims compare against the previous commit measured in the same run, because the machines are noisy. Make a
worktree of the reference commit, then let this script alternate the two trees' runs (reference first in odd
rounds, this tree first in even ones), each in its own process with ``PYTHONPATH`` set to its tree, so that both
see the same drift of a shared machine:

    git worktree add /tmp/sacglam_ref HEAD~1
    python scripts/bench_ab.py --ref /tmp/sacglam_ref --rounds 3 -- --threads 1 --steps 40
    python scripts/bench_ab.py --ref /tmp/sacglam_ref --train-minutes 10 --rounds 1   # the default run, 10 minutes
    git worktree remove --force /tmp/sacglam_ref

``bench`` mode parses each run's markdown table (one row per model) and prints the median of every numeric column
per tree and the ratio this/reference. ``--train-minutes`` mode runs the default ``train.py`` run (plus
``--train-args``) of both trees at the same time, one thread each (so give it a machine with two free cores), for that
many minutes in temporary folders, and reports the env steps each reached (its ``metrics.jsonl``'s last row) and its
last greedy evaluation's success.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

HERE = Path(__file__).resolve().parents[1]
KEY_COLUMNS = ("env steps/s", "updates/s", "update tok/s", "update %", "MFU %")


def parse_table(text: str) -> list[dict[str, str]]:
    """Rows of the last markdown table in ``text`` as dicts keyed by the header's column names."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip().startswith("|")]
    header_at = max((i for i, ln in enumerate(lines) if i + 1 < len(lines) and set(lines[i + 1]) <= set("|-: ")),
                    default=None)
    if header_at is None:
        raise ValueError("no markdown table in the output")
    cells = [[c.strip() for c in ln.strip("|").split("|")] for ln in lines[header_at:]]
    header, rows = cells[0], cells[2:]
    return [dict(zip(header, row, strict=True)) for row in rows]


def number(cell: str) -> float | None:
    """``'1,234.5'`` -> 1234.5; None for a cell that is not a number."""
    try:
        return float(cell.replace(",", ""))
    except ValueError:
        return None


def _env(tree: Path) -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=str(tree), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", WANDB_MODE="disabled")
    return env


def run_bench(tree: Path, args: Sequence[str]) -> list[dict[str, str]]:
    """One ``bench.py`` run of ``tree``; its table's rows."""
    cmd = [sys.executable, str(tree / "scripts" / "bench.py"), *args]
    out = subprocess.run(cmd, cwd=tree, env=_env(tree), capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({out.returncode}):\n{out.stderr[-3000:]}")
    return parse_table(out.stdout)


def train_cmd(tree: Path, minutes: float, args: Sequence[str], folder: str) -> list[str]:
    """The default ``train.py`` run of ``tree`` for ``minutes`` on one thread, into ``folder``."""
    return [sys.executable, str(tree / "train.py"), f"time_limit_min={minutes}", "threads=1",
            "logger.progress=false", f"hydra.run.dir={folder}", *args]


def train_result(folder: str) -> dict[str, float]:
    """Env steps reached (the last metrics row's ``step``) and the last greedy evaluation's success of a run."""
    rows = [json.loads(x) for x in (Path(folder) / "metrics.jsonl").read_text().splitlines() if x.strip()]
    success = [r["eval/greedy/success"] for r in rows if "eval/greedy/success" in r]
    last = float(success[-1]) if success else float("nan")
    return {"env steps": float(rows[-1]["step"]), "last greedy success": last}


def run_trains(trees: Sequence[Path], minutes: float, args: Sequence[str]) -> list[dict[str, float]]:
    """The default ``train.py`` run of every tree, all at the same time (one thread each): one result per tree."""
    with tempfile.TemporaryDirectory(prefix="bench-ab-") as root:
        folders = [str(Path(root) / f"run{i}") for i in range(len(trees))]
        cmds = [train_cmd(tree, minutes, args, folder) for tree, folder in zip(trees, folders, strict=True)]
        procs = [subprocess.Popen(cmd, cwd=tree, env=_env(tree), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                  text=True) for cmd, tree in zip(cmds, trees, strict=True)]
        for cmd, proc in zip(cmds, procs, strict=True):
            _, err = proc.communicate()
            if proc.returncode != 0:
                raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{err[-3000:]}")
        return [train_result(folder) for folder in folders]


def median_rows(runs: list[list[dict[str, str]]]) -> dict[str, dict[str, float]]:
    """Per model (the ``model`` column), the median of every numeric column over the runs."""
    out: dict[str, dict[str, list[float]]] = {}
    for rows in runs:
        for row in rows:
            cols = out.setdefault(row.get("model", "run"), {})
            for key, cell in row.items():
                value = number(cell)
                if value is not None:
                    cols.setdefault(key, []).append(value)
    return {m: {k: statistics.median(v) for k, v in cols.items()} for m, cols in out.items()}


def format_ab(ref: dict[str, dict[str, float]], new: dict[str, dict[str, float]], columns: Sequence[str]) -> str:
    """A markdown table: per model and column, reference, this tree, and the ratio this / reference."""
    lines = ["| model | column | reference | this tree | ratio |", "|---|---|---|---|---|"]
    for model in ref:
        for col in columns:
            if col in ref[model] and col in new.get(model, {}):
                a, b = ref[model][col], new[model][col]
                ratio = f"{b / a:.2f}x" if a else "n/a"
                lines.append(f"| {model} | {col} | {a:,.4g} | {b:,.4g} | {ratio} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> str:
    """Parse the arguments, alternate the two trees' runs, print and return the A/B table."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ref", type=Path, required=True, help="a worktree of the reference commit")
    p.add_argument("--rounds", type=int, default=3, help="runs per tree, interleaved")
    p.add_argument("--train-minutes", type=float, default=None,
                   help="time the default train.py run instead of bench.py, for this many minutes per run")
    p.add_argument("--train-args", nargs="*", default=[], help="extra train.py overrides (--train-minutes mode)")
    p.add_argument("bench_args", nargs="*", help="bench.py arguments (after --)")
    opts = p.parse_args(argv)
    ref_tree = opts.ref.resolve()
    if not (ref_tree / "scripts" / "bench.py").is_file():
        raise SystemExit(f"--ref {ref_tree}: not a sacglam tree (no scripts/bench.py)")
    runs: dict[str, list[list[dict[str, str]]]] = {"ref": [], "new": []}
    for r in range(opts.rounds):
        order = [("ref", ref_tree), ("new", HERE)] if r % 2 == 0 else [("new", HERE), ("ref", ref_tree)]
        if opts.train_minutes is not None:  # both trees at once, one core each: the same machine state
            results = run_trains([tree for _, tree in order], opts.train_minutes, opts.train_args)
            for (label, _), got in zip(order, results, strict=True):
                runs[label].append([{"model": "default run", **{k: f"{v}" for k, v in got.items()}}])
                print(f"[bench_ab] round {r + 1}/{opts.rounds} {label}: {got}", file=sys.stderr, flush=True)
            continue
        for label, tree in order:
            rows = run_bench(tree, opts.bench_args)
            runs[label].append(rows)
            print(f"[bench_ab] round {r + 1}/{opts.rounds} {label}: {rows}", file=sys.stderr, flush=True)
    columns = ("env steps", "last greedy success") if opts.train_minutes is not None else KEY_COLUMNS
    table = format_ab(median_rows(runs["ref"]), median_rows(runs["new"]), columns)
    what = f"train.py, {opts.train_minutes} min" if opts.train_minutes is not None else "bench.py " + " ".join(
        opts.bench_args)
    print(f"\nA/B ({what}; median of {opts.rounds} interleaved runs per tree; reference {ref_tree}):\n\n{table}")
    return table


if __name__ == "__main__":
    main()
