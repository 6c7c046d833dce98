"""The ``train.py`` runs of a reproduction or sweep: one subprocess per (env, method, seed), each in its own folder.

Runs go to ``RUNS/<env>/<method>/seed<k>/`` with ``resume=auto``, so an interrupted reproduction continues where it
stopped and a finished run (marked by a ``DONE`` file holding its command and wall-clock seconds) is skipped. A loop
of subprocesses rather than a Hydra multirun: every run is isolated (a crash or OOM loses one run, whose
``train.log`` says why, not the sweep), and finished runs are skipped on a rerun. Used by ``scripts/reproduce.py``,
``scripts/sweep.py`` (``sacglam/run/sweep.py``) and ``scripts/sweep_eto.py``.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]  # the repository: train.py (the package is installed editable)

# The methods per env, as train.py overrides. BitFlip's plain SAC: its HER preset with HER and the hindsight term off.
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
        "ppo": ["experiment=bitflip_ppo"],
    },
    "babyai": {
        "sac": ["experiment=babyai_sac"],
        "sac_her": ["experiment=babyai_sac_her"],
        "ppo": ["experiment=babyai_ppo"],
        "eto": ["experiment=babyai_eto"],  # its expert's env steps count toward the same budget
    },
    "textworld": {  # a suite of coin collectors (make it first: conf/env/textworld_suite.yaml says how)
        "sac": ["experiment=textworld_suite_sac"],
        "sac_her": ["experiment=textworld_suite_sac_her"],
        "ppo": ["experiment=textworld_suite_ppo"],
        "eto": ["experiment=textworld_suite_eto"],  # its expert's env steps count toward the same budget
    },
}
# Playground-Text goal categories of every run (the preset's default since 2026-12-07 too): the comparison of the
# SAC-GLAM paper covers all four.
CATEGORIES = "grasp,grow_plant,grow_herbivore,grow_carnivore"
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


@dataclass
class Run:
    """One train.py run of the reproduction."""

    env: str
    method: str
    seed: int
    run_dir: Path
    overrides: list[str]

    def command(self) -> list[str]:
        """The ``python train.py ...`` command line of this run."""
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
