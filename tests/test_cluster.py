"""Cluster-style launches of ``train.py`` (issue 18, the single-process parts): a Hydra multirun through the submitit
launcher (its local executor, the one SLURM's replaces) whose run folders ``scripts/reproduce.py`` aggregates, and
the Optuna sweep preset whose result names the best trial's parameters and value."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.scripts_util import load_script

ROOT = Path(__file__).resolve().parents[1]
TINY = ["env.num_envs=4", "batch_size=8", "learning_starts=48", "eval.episodes_per_category=2", "eval.num_envs=2",
        "env.corpus_episodes=20", "time_limit_min=0", "threads=1", "logger.progress=false"]


def multirun(args: list[str], timeout: float = 300) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled"}
    return subprocess.run([sys.executable, str(ROOT / "train.py"), "--multirun", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def final_success(run: Path) -> float:
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return float([m for m in lines if "eval/greedy/success" in m][-1]["eval/greedy/success"])


@pytest.mark.integration
def test_submitit_local_multirun_lands_where_reproduce_aggregates(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    sweep = runs / "playground" / "sac_her"
    result = multirun(["hydra/launcher=submitit_local", "seed=0,1", f"hydra.sweep.dir={sweep}",
                       "hydra.sweep.subdir=seed${seed}", *TINY, "total_env_steps=96", "eval.every=48"])
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Submitit 'local' sweep output dir" in result.stderr + result.stdout
    for seed in (0, 1):
        run = sweep / f"seed{seed}"
        assert (run / "metrics.jsonl").is_file() and any((run / "checkpoints").glob("step_*.pt")), seed
        saved = yaml.safe_load((run / ".hydra" / "config.yaml").read_text())
        assert saved["seed"] == seed
    logs = sorted((sweep / ".submitit").glob("*/*_log.out"))
    assert len(logs) == 2, "one submitit job per seed"
    reproduce = load_script("reproduce")
    results = reproduce.aggregate(runs)
    summary = results["playground"]["sac_her"]["all"]
    assert summary.per_seed.shape[0] == 2
    assert summary.mean[-1] == (final_success(sweep / "seed0") + final_success(sweep / "seed1")) / 2
    _, md = reproduce.write_report(runs, tmp_path / "out", "sweep", "")
    assert "| playground | all | SAC + HER | 2 |" in md.read_text()


@pytest.mark.integration
def test_optuna_sweep_preset_reports_its_best_trial(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    result = multirun(["experiment=sweep_sac_her", "hydra.sweeper.n_trials=3", f"hydra.sweep.dir={sweep}", *TINY,
                       "total_env_steps=64", "eval.every=0", "env.kwargs.goal_categories=[grasp]"])
    assert result.returncode == 0, result.stderr[-3000:]
    best = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    trials: list[tuple[float, dict[str, Any]]] = []
    for k in range(3):
        run = sweep / str(k)
        overrides = yaml.safe_load((run / ".hydra" / "overrides.yaml").read_text())
        params = {o.split("=", 1)[0]: o.split("=", 1)[1] for o in overrides
                  if o.split("=", 1)[0] in best["best_params"]}
        assert set(params) == {"algo.lr_actor", "algo.lr_critic", "algo.target_entropy_ratio", "buffer.her.ratio"}
        assert 1e-4 <= float(params["algo.lr_actor"]) <= 3e-3
        assert 0.3 <= float(params["algo.target_entropy_ratio"]) <= 0.9
        config = yaml.safe_load((run / ".hydra" / "config.yaml").read_text())
        assert config["logger"]["group"] == "sweep_sac_her"  # one wandb group per sweep
        trials.append((final_success(run), params))
    assert len({json.dumps(p, sort_keys=True) for _, p in trials}) == 3, "every trial samples its own parameters"
    top = max(v for v, _ in trials)
    assert math.isclose(best["best_value"], top)
    winners = [p for v, p in trials if v == top]
    assert any(all(math.isclose(float(p[k]), float(v)) for k, v in best["best_params"].items()) for p in winners)


@pytest.mark.integration
def test_slurm_multigpu_preset_asks_slurm_for_one_task_per_gpu(tmp_path: Path) -> None:
    """The sbatch file the launcher writes for ``hydra/launcher=slurm_multigpu``, caught by a stand-in ``sbatch`` (it
    copies the file and fails; ``srun`` only has to exist): N tasks on one node, N GPUs for the node, none bound
    per task, the requeue signal set."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, body in (("srun", "exit 1"), ("sbatch", 'cp "$1" "$SBATCH_CAPTURE"; exit 1')):
        (bin_dir / name).write_text(f"#!/bin/sh\n{body}\n")
        (bin_dir / name).chmod(0o755)
    capture = tmp_path / "sbatch.sh"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
           "SBATCH_CAPTURE": str(capture)}
    result = subprocess.run([sys.executable, str(ROOT / "train.py"), "--multirun", "hydra/launcher=slurm_multigpu",
                             "hydra.launcher.tasks_per_node=3", "hydra.launcher.partition=gpu",
                             f"hydra.sweep.dir={tmp_path / 'sweep'}"], cwd=ROOT, env=env, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode != 0 and capture.is_file(), result.stderr[-2000:]
    lines = set(capture.read_text().splitlines())
    for want in ("#SBATCH --ntasks-per-node=3", "#SBATCH --gpus-per-node=3", "#SBATCH --nodes=1",
                 "#SBATCH --partition=gpu", "#SBATCH --signal=USR2@120", "export SUBMITIT_EXECUTOR=slurm"):
        assert want in lines, want
    assert not any("gpus-per-task" in line or "--gres" in line for line in lines)


def test_slurm_task_variables_become_torchrun_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    """Task 3 of a 2-node x 2-task SLURM job: rank 3 of 4, local rank 1 of 2, the first node as the rendezvous."""
    from sacglam.distributed import export_submitit_env

    for key in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE",
                "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID"):
        monkeypatch.setenv(key, "")  # recorded, so that undo removes what export_submitit_env sets (a bare
        monkeypatch.delenv(key)  # delenv of an absent key records nothing: the variables leaked into later tests)
    assert not export_submitit_env(), "outside submitit nothing is set"
    assert "RANK" not in os.environ
    slurm = {"SUBMITIT_EXECUTOR": "slurm", "SLURM_JOB_ID": "4242", "SLURM_NTASKS": "4", "SLURM_JOB_NUM_NODES": "2",
             "SLURM_NODEID": "1", "SLURM_JOB_NODELIST": "gpu[07-08]", "SLURM_PROCID": "3", "SLURM_LOCALID": "1"}
    for key, value in slurm.items():
        monkeypatch.setenv(key, value)
    assert export_submitit_env()
    assert {k: os.environ[k] for k in ("MASTER_ADDR", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")} == {
        "MASTER_ADDR": "gpu07", "RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"}
    assert 20000 <= int(os.environ["MASTER_PORT"]) <= 60000  # the same on every task: drawn from the job id
    assert not export_submitit_env(), "a launcher's RANK is left alone"
    monkeypatch.setenv("SLURM_NTASKS", "1")
    monkeypatch.delenv("RANK")
    assert not export_submitit_env(), "one task: a single process"
