"""Data-parallel ``train.py`` under ``torchrun --nproc_per_node 2`` (gloo on CPU): one coherent metrics file, ranks
with their own env seeds and equal weights, twice the env steps per vector step, exact SIGKILL + resume, and a
2-process checkpoint refused by 1 process with both world sizes named. Plus the helpers by hand."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from sacglam.distributed import Dist, common_step, rank_device, rank_dir, rank_seed
from tests.test_train import _comparable, read_metrics

ROOT = Path(__file__).resolve().parents[1]
TORCHRUN = Path(sys.executable).with_name("torchrun")
SMALL = ["env.num_envs=4", "batch_size=8", "learning_starts=48", "eval.episodes_per_category=2", "eval.num_envs=2",
         "env.corpus_episodes=20", "time_limit_min=0", "threads=1", "logger.progress=false", "seed=3",
         "total_env_steps=320", "eval.every=160", "checkpoint.every=80", "checkpoint.keep=3"]


def _env() -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}


def free_port() -> int:
    """A port nothing holds now: a fixed one (or one derived from the pid) can collide with a test of another
    pytest-xdist worker or with anything else on the machine."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def launch(args: list[str], run_dir: Path, procs: int, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    cmd = [str(TORCHRUN), "--nproc_per_node", str(procs), "--master_port", str(free_port())]
    if procs == 1:
        cmd = [sys.executable]
    return subprocess.run([*cmd, str(ROOT / "train.py"), *args, f"hydra.run.dir={run_dir}"], cwd=ROOT, env=_env(),
                          capture_output=True, text=True, timeout=timeout)


def _processes() -> dict[int, tuple[int, int, str]]:
    """Every process of the machine: pid -> (parent pid, process group, state letter), from ``/proc``."""
    out = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:  # ended meanwhile
                continue
            fields = stat[stat.rindex(")") + 2 :].split()  # after "pid (comm) "; comm may hold spaces
            out[int(entry.name)] = (int(fields[1]), int(fields[2]), fields[0])
    return out


def kill_run(proc: subprocess.Popen[Any], timeout: float = 30) -> None:
    """SIGKILL a ``torchrun`` launch whole, as a cluster's preemption does, and wait until none of it runs.

    ``torchrun`` starts every worker in a session of its own (torch.distributed.elastic's ``SubprocessHandler``:
    ``start_new_session=True``), so a SIGKILL of torchrun's process group alone leaves the workers training on, and
    writing into the run folder. Every process group of the launch's process tree is killed (a worker's own children
    share its group), then the test waits until no process of those groups is left but zombies.
    """
    table = _processes()
    tree, todo = set(), [proc.pid]
    while todo:
        pid = todo.pop()
        tree.add(pid)
        todo += [child for child, (parent, _, _) in table.items() if parent == pid and child not in tree]
    groups = {table[pid][1] for pid in tree if pid in table}
    for group in groups:
        with contextlib.suppress(ProcessLookupError):  # the group ended meanwhile
            os.killpg(group, signal.SIGKILL)
    proc.wait()
    deadline = time.monotonic() + timeout
    while left := [pid for pid, (_, group, state) in _processes().items() if group in groups and state not in "ZX"]:
        assert time.monotonic() < deadline, f"processes {left} of the killed run still run"
        time.sleep(0.05)


def final_state(run_dir: Path, rank: int) -> dict[str, Any]:
    path = sorted((rank_dir(run_dir, rank) / "checkpoints").glob("step_*.pt"))[-1]
    from sacglam.checkpoint import load_checkpoint

    return load_checkpoint(path, weights_only=False)  # type: ignore[no-any-return]


def test_helpers_by_hand() -> None:
    assert rank_seed(7, 0) == 7 and rank_seed(7, 1) != rank_seed(7, 0)
    assert rank_dir(Path("r"), 0) == Path("r") and rank_dir(Path("r"), 2) == Path("r/ranks/rank2")
    assert common_step([[80, 160, 240], [80, 160]]) == 160  # rank 0 one checkpoint ahead
    assert common_step([[80], [160]]) is None
    assert rank_device(torch.device("cpu"), Dist(1, 2)) == torch.device("cpu")
    assert rank_device(torch.device("cuda", 1), Dist()) == torch.device("cuda", 1), "one process: as given"
    with pytest.raises(ValueError, match="cuda:0 with 2 processes"):
        rank_device(torch.device("cuda", 0), Dist(1, 2))


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, subprocess.CompletedProcess[str]]:
    """The SMALL run under ``torchrun --nproc_per_node 2`` (shared by the tests that read it)."""
    two = tmp_path_factory.mktemp("dp") / "two"
    return two, launch(SMALL, two, 2)


@pytest.mark.integration
def test_two_processes_make_one_coherent_run(
        two_process_run: tuple[Path, subprocess.CompletedProcess[str]], tmp_path: Path) -> None:
    two, result = two_process_run
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("final greedy success") == 1
    rows = read_metrics(two)
    steps = [r["step"] for r in rows]
    # strictly increasing, each step once, but for the final evaluation's row at the last step (as with 1 process)
    assert steps[:-1] == sorted(set(steps[:-1])) and steps[-1] == steps[-2] and "eval/greedy/success" in rows[-1]
    assert len({json.dumps(r, sort_keys=True) for r in rows}) == len(rows), "no row written twice"
    assert steps[-1] == 320 and any("eval/greedy/success" in r for r in rows)
    assert steps[1] - steps[0] == 2 * 4, "one vector step of 2 ranks x 4 envs"
    r0, r1 = final_state(two, 0), final_state(two, 1)
    assert r0["world"] == r1["world"] == 2
    assert r0["collector"]["seed"] != r1["collector"]["seed"], "each rank steps its own env seeds"
    assert r0["collector"]["observations"] != r1["collector"]["observations"]
    for k, v in r0["agent"].items():  # gradients averaged: the same weights on both ranks after the last update
        assert torch.equal(v, r1["agent"][k]), k
    assert any(r.get("charts/updates", 0) > 0 for r in rows)

    one = tmp_path / "one"
    result = launch(SMALL, one, 1)
    assert result.returncode == 0, result.stderr[-3000:]
    single = [r["step"] for r in read_metrics(one)]
    assert single[1] - single[0] == 4 and single[-1] == 320
    assert len(single) - 1 == 2 * (len(steps) - 1), "the same global budget in half the vector steps with 2 ranks"

    result = launch([*SMALL, "resume=auto"], two, 1, timeout=120)  # a 2-process checkpoint, 1 process
    assert result.returncode != 0
    assert "2 process(es)" in result.stderr and "this run has 1" in result.stderr


@pytest.mark.integration
def test_a_submitit_job_of_two_tasks_is_the_same_run(
        two_process_run: tuple[Path, subprocess.CompletedProcess[str]], tmp_path: Path) -> None:
    """What a SLURM job with ``tasks_per_node=2`` does, by submitit's local executor: the two tasks find each other
    (``distributed.export_submitit_env``) and make the torchrun run, row for row."""
    two, result = two_process_run
    assert result.returncode == 0, result.stderr[-3000:]
    sweep = tmp_path / "sweep"
    sub = subprocess.run([sys.executable, str(ROOT / "train.py"), "--multirun", "hydra/launcher=submitit_local",
                          "hydra.launcher.tasks_per_node=2", f"hydra.sweep.dir={sweep}", "hydra.sweep.subdir=run",
                          *SMALL], cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert sub.returncode == 0, sub.stderr[-3000:]
    logs = sorted((sweep / ".submitit").glob("*/*_log.out"))
    assert len(logs) == 2, "one job of two tasks"
    assert [log.read_text().count("final greedy success") for log in logs] == [1, 0], "rank 0 alone prints"
    assert _comparable(read_metrics(sweep / "run")) == _comparable(read_metrics(two))
    assert final_state(sweep / "run", 1)["world"] == 2


@pytest.mark.integration
def test_sigkill_of_two_processes_then_resume_matches(tmp_path: Path) -> None:
    args = [*SMALL, "total_env_steps=960"]  # long enough for the kill at 160 to land mid-run
    reference = tmp_path / "reference"
    result = launch(args, reference, 2)
    assert result.returncode == 0, result.stderr[-3000:]

    killed = tmp_path / "killed"
    cmd = [str(TORCHRUN), "--nproc_per_node", "2", "--master_port", str(free_port()),
           str(ROOT / "train.py"), *args, f"hydra.run.dir={killed}"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.monotonic() + 240
    target = rank_dir(killed, 1) / "checkpoints" / f"step_{160:010d}.pt"
    while not target.exists() and time.monotonic() < deadline:
        assert proc.poll() is None, "the run ended before it could be killed"
        time.sleep(0.05)
    kill_run(proc)  # torchrun and both workers
    assert not (killed / "success.png").exists(), "the run finished before the kill"

    result = launch([*args, "resume=auto"], killed, 2)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resumed from" in result.stdout
    assert _comparable(read_metrics(killed)) == _comparable(read_metrics(reference))


@pytest.mark.integration
@pytest.mark.parametrize("bad, message", [(["batch_size=7"], "batch_size=7 must divide by the 2 processes"),
                                          (["algo=eto"], "run ETO with one process")])
def test_what_two_processes_refuse(bad: list[str], message: str, tmp_path: Path) -> None:
    result = launch([*SMALL, *bad], tmp_path, 2, timeout=120)
    assert result.returncode != 0
    assert message in result.stderr


@pytest.mark.integration
def test_two_processes_relabel_by_rules_and_pool_the_counts(tmp_path: Path) -> None:
    """relabel.source=rule on both ranks: every rank judges its own episodes, the logged precision and counts are
    pooled over ranks (the final line's episodes are both ranks' together), the weights stay equal."""
    run = tmp_path / "rule"
    result = launch([*SMALL, "experiment=playground_sac_her", "relabel.source=rule"], run, 2)
    assert result.returncode == 0, result.stderr[-3000:]
    final = read_metrics(run)[-1]
    r0, r1 = final_state(run, 0), final_state(run, 1)
    judged = [r["learner"]["relabel"]["episodes"] for r in (r0, r1)]
    assert min(judged) > 0 and final["relabel/episodes"] == sum(judged)
    accepted = [r["learner"]["relabel"]["counts"]["accepted"] for r in (r0, r1)]
    assert final["relabel/accepted"] == sum(accepted) > 0
    assert final["relabel/precision"] == 1.0  # the Playground rules are exact
    for k, v in r0["agent"].items():
        assert torch.equal(v, r1["agent"][k]), k


PPO = [o for o in SMALL if not o.startswith(("batch_size=", "learning_starts="))] + [
    "algo=ppo", "algo.rollout_steps=8", "algo.minibatch_size=16", "checkpoint.keep=10"]


@pytest.mark.integration
def test_two_processes_run_ppo_and_resume_exactly(tmp_path: Path) -> None:
    """PPO-GLAM over 2 ranks: each its own rollout of 4 envs x 8 steps and half of every minibatch, gradients
    averaged (equal weights), one update per 64 global env steps; then resumed from the middle checkpoint of both
    ranks (the later ones deleted), the rest of the run is the same, row for row."""
    two = tmp_path / "two"
    result = launch(PPO, two, 2)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = read_metrics(two)
    assert [r["step"] for r in rows][:2] == [8, 16] and rows[-1]["step"] == 320
    updates = [r["step"] for r in rows if "losses/policy" in r]
    assert updates == [64, 128, 192, 256, 320], "one update per rollout of 2 ranks x 4 envs x 8 steps"
    r0, r1 = final_state(two, 0), final_state(two, 1)
    assert r0["collector"]["seed"] != r1["collector"]["seed"]
    for k, v in r0["agent"].items():
        assert torch.equal(v, r1["agent"][k]), k
    reference = _comparable(read_metrics(two))
    for rank in (0, 1):
        for path in (rank_dir(two, rank) / "checkpoints").glob("step_*.pt"):
            if int(path.stem.split("_")[1]) > 160:
                path.unlink()
    result = launch([*PPO, "resume=auto"], two, 2)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "at env step 160" in result.stdout
    assert _comparable(read_metrics(two)) == reference
