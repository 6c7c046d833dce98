"""Benchmark: data-parallel ``train.py`` throughput, N processes against one, on the same global batch.

Each configuration runs ``train.py`` twice, for a short and a long budget of global env steps, and its rate is the
difference of the two (env steps and updates per second of wall clock): start-up, model loading, the final evaluation
and the final checkpoint cancel out, and so does the warm-up before ``learning_starts`` (both runs must pass it; the
GPU settings lower it to 512 from the published 2,560). N processes are started with ``torchrun --nproc_per_node N``
(what ``accelerate launch --multi_gpu --num_processes N`` starts on GPUs); each steps ``env.num_envs`` envs and samples
``batch_size / N`` of every batch, so the replay ratio (updates per global env step) is the same as one process's.

On CPU the cores are shared fairly: one process gets ``--cores`` threads, each of N processes ``--cores / N``. On GPUs
each process takes the GPU of its local rank (``device=cuda``), so N processes need N GPUs.

    python scripts/bench_data_parallel.py                                  # CPU, tiny model, 1 vs 2 processes
    python scripts/bench_data_parallel.py --device cuda --procs 2 -- experiment=paper_sacglam model.name=/path
    python scripts/bench_data_parallel.py --quick                          # seconds (used by the tests)

Prints a markdown table with the ratio of every N-process rate to the 1-process rate measured in the same run.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FINAL = re.compile(r"final greedy success \S+ after (\d+) env steps and (\d+) updates")
CPU_RUN = ["env.num_envs=4", "batch_size=16", "learning_starts=32", "eval.every=0", "eval.episodes_per_category=2",
           "eval.num_envs=2", "checkpoint.every=0", "time_limit_min=0", "logger.progress=false"]
GPU_RUN = ["learning_starts=512", "eval.every=0", "eval.episodes_per_category=4", "checkpoint.every=0",
           "time_limit_min=0", "logger.progress=false"]


@dataclass
class Rate:
    """One configuration's throughput, from the long run minus the short one."""

    procs: int
    threads: int
    env_steps_per_s: float
    updates_per_s: float
    walls: tuple[float, float]


def run_once(procs: int, threads: int, steps: int, overrides: list[str], run_dir: Path, port: int
             ) -> tuple[float, int, int]:
    """``(wall seconds, env steps, updates)`` of one ``train.py`` run of ``steps`` global env steps."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled", "OMP_NUM_THREADS": str(threads)}
    launcher = [sys.executable] if procs == 1 else [
        str(Path(sys.executable).with_name("torchrun")), "--nproc_per_node", str(procs), "--master_port", str(port)]
    cmd = [*launcher, str(ROOT / "train.py"), *overrides, f"threads={threads}", f"total_env_steps={steps}",
           f"hydra.run.dir={run_dir}"]
    start = time.perf_counter()
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    shutil.rmtree(run_dir, ignore_errors=True)
    match = FINAL.search(result.stdout)
    if result.returncode != 0 or match is None:
        raise RuntimeError(f"{' '.join(cmd)} failed (exit {result.returncode}):\n{result.stderr[-3000:]}")
    return wall, int(match.group(1)), int(match.group(2))


def measure(procs: int, threads: int, short: int, long: int, repeats: int, overrides: list[str], tmp: Path,
            port: int) -> Rate:
    """The median over ``repeats`` of (long - short) env steps and updates per second of extra wall clock."""
    env_rates, update_rates, walls = [], [], []
    for k in range(repeats):
        w0, s0, u0 = run_once(procs, threads, short, overrides, tmp / f"p{procs}_{k}_short", port)
        if u0 == 0:
            raise RuntimeError(f"the short run ({short} env steps) made no update: raise --short past learning_starts")
        w1, s1, u1 = run_once(procs, threads, long, overrides, tmp / f"p{procs}_{k}_long", port)
        if w1 <= w0:
            raise RuntimeError(f"the long run ({long} steps, {w1:.1f} s) was not slower than the short one "
                               f"({short} steps, {w0:.1f} s): raise --long")
        env_rates.append((s1 - s0) / (w1 - w0))
        update_rates.append((u1 - u0) / (w1 - w0))
        walls.append((w0, w1))
    mid = sorted(range(repeats), key=lambda i: env_rates[i])[repeats // 2]
    return Rate(procs, threads, statistics.median(env_rates), statistics.median(update_rates), walls[mid])


def table(rates: list[Rate], short: int, long: int) -> str:
    base = rates[0]
    lines = [f"| processes | threads each | wall {short} / {long} steps (s) | env steps/s | updates/s | "
             "env steps/s vs 1 process |", "|---|---|---|---|---|---|"]
    for r in rates:
        lines.append(f"| {r.procs} | {r.threads} | {r.walls[0]:.1f} / {r.walls[1]:.1f} | {r.env_steps_per_s:.1f} | "
                     f"{r.updates_per_s:.2f} | {r.env_steps_per_s / base.env_steps_per_s:.2f}x |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--procs", type=int, nargs="+", default=[2], help="process counts to compare with 1")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--cores", type=int, default=os.cpu_count() or 1, help="CPU threads shared by the processes")
    parser.add_argument("--short", type=int, default=512, help="global env steps of the short run")
    parser.add_argument("--long", type=int, default=2048, help="global env steps of the long run")
    parser.add_argument("--repeats", type=int, default=3, help="pairs of runs per configuration (median)")
    parser.add_argument("--quick", action="store_true", help="seconds: 64 / 192 steps, one repeat")
    parser.add_argument("overrides", nargs="*", help="train.py overrides (after --), e.g. experiment=paper_sacglam")
    args = parser.parse_args(argv)
    if args.quick:
        args.short, args.long, args.repeats = 64, 192, 1
    if args.long <= args.short:
        parser.error(f"--long ({args.long}) must exceed --short ({args.short})")
    if any(p < 2 for p in args.procs):
        parser.error(f"--procs {args.procs}: each count is compared with 1 process, so give 2 or more")
    if args.device == "cuda":
        import torch

        if torch.cuda.device_count() < max(args.procs):
            parser.error(f"--procs {max(args.procs)} needs as many GPUs; {torch.cuda.device_count()} visible")
    overrides = [*(CPU_RUN if args.device == "cpu" else GPU_RUN), f"device={args.device}", *args.overrides]
    with socket.socket() as sock:  # a free port (a fixed one collides with anything that holds it)
        sock.bind(("127.0.0.1", 0))
        port = int(sock.getsockname()[1])
    rates = []
    with tempfile.TemporaryDirectory(prefix="bench_dp_") as tmp:
        for procs in [1, *args.procs]:
            threads = max(1, args.cores // procs) if args.device == "cpu" else 1
            print(f"{procs} process(es), {threads} thread(s) each ...", file=sys.stderr, flush=True)
            rates.append(measure(procs, threads, args.short, args.long, args.repeats, overrides, Path(tmp), port))
    out = table(rates, args.short, args.long)
    print(out)
    return out


if __name__ == "__main__":
    main()
