"""ETO in the harness (sacglam.algos.eto.rollout, sacglam.algos.eto.trainer, ``train.py algo=eto``): tasks and expert
play, a round's
reference and pairs, exact resume inside a round, env-step accounting, the user-file DPO path, and the learning
test (slow): an SFT warm start followed by ETO rounds beats the warm start alone on grasp goals."""

from __future__ import annotations

import copy
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import gymnasium
import numpy as np
import pytest
import torch

import envs  # noqa: F401 - registers the envs
from sacglam.agent import Agent
from sacglam.algos.eto.dpo import read_pairs, reference_logps, task_id
from sacglam.algos.eto.rollout import TaskRunner, training_tasks
from sacglam.algos.eto.trainer import ETOTrainer
from sacglam.pipeline import make_act_fn
from sacglam.run.builders import build_model, make_agent, seed_everything
from sacglam.run.tools import compose_config

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "tests" / "data" / "eto_pairs_example.jsonl"
PLAYGROUND = "sacglam/PlaygroundText-v0"


def grasp_env() -> Any:
    return gymnasium.make(PLAYGROUND, goal_categories=["grasp"]).unwrapped


# ------------------------------------------------------------------------------------------------ tasks and play


def test_training_tasks_cycle_categories_and_check_arguments() -> None:
    tasks = training_tasks(5, 100, ["grasp", "grow_plant"])
    assert [(t.index, t.seed, t.category) for t in tasks] == [
        (0, 100, "grasp"), (1, 101, "grow_plant"), (2, 102, "grasp"), (3, 103, "grow_plant"), (4, 104, "grasp")]
    with pytest.raises(ValueError, match="n must be >= 1"):
        training_tasks(0, 0, ["grasp"])
    with pytest.raises(ValueError, match="at least one goal category"):
        training_tasks(3, 0, [])


def test_expert_solves_every_task_and_replays_are_the_same_task() -> None:
    runner = TaskRunner(lambda: gymnasium.make(PLAYGROUND).unwrapped, num_envs=3)
    tasks = training_tasks(7, 40, ["grasp", "grow_plant"])
    expert = runner.play(tasks, None, tag="x", env_steps=10)
    assert [ep.id for ep in expert] == [f"t{j}x" for j in range(7)]
    assert all(ep.success and ep.terminated and sum(ep.rewards) == 1.0 for ep in expert)
    assert [ep.goal_category for ep in expert] == [t.category for t in tasks]
    assert all(ep.env_step > 10 for ep in expert)
    for ep in expert:
        ep.check()
    again = runner.play(tasks, None, tag="y")
    assert [task_id(e) for e in again] == [task_id(e) for e in expert]
    assert [e.actions for e in again] == [e.actions for e in expert]  # the expert is deterministic
    assert len({task_id(e) for e in expert}) == 7  # different seeds: different tasks
    runner.close()


def test_budget_stops_starting_waves_and_a_started_wave_finishes() -> None:
    runner = TaskRunner(grasp_env, num_envs=4)
    tasks = training_tasks(12, 0, ["grasp"])
    first_wave = runner.play(tasks[:4], None)
    steps = sum(e.length for e in first_wave)
    played = runner.play(tasks, None, budget=steps)  # spent by the first wave: no second wave
    assert len(played) == 4
    played = runner.play(tasks, None, budget=steps + 1)  # one step left: the second wave starts and finishes
    assert len(played) == 8
    assert len(runner.play(tasks, None, budget=None)) == 12


def test_policy_play_uses_the_act_function_and_rejects_bad_actions() -> None:
    runner = TaskRunner(grasp_env, num_envs=2)
    tasks = training_tasks(2, 0, ["grasp"])

    def first(goals: Any, obs: Any, cands: Any) -> Any:
        from sacglam.types import ActOutput
        return ActOutput(action=torch.zeros(len(goals), dtype=torch.long), logp=torch.zeros(len(goals)))

    eps = runner.play(tasks, first, policy_version=7, tag="r0")
    assert all(ep.actions == [0] * ep.length and ep.policy_version == [7] * ep.length for ep in eps)
    assert all(ep.truncated or ep.terminated for ep in eps)

    def bad(goals: Any, obs: Any, cands: Any) -> Any:
        from sacglam.types import ActOutput
        return ActOutput(action=torch.full((len(goals),), 99), logp=torch.zeros(len(goals)))

    with pytest.raises(IndexError, match="action 99 outside"):
        runner.play(tasks, bad)


# ------------------------------------------------------------------------------------------- the trainer in-process


def _setup(overrides: list[str], seed: int = 0) -> dict[str, Any]:
    cfg = compose_config(["experiment=playground_eto", "env.kwargs.goal_categories=[grasp]", "env.num_envs=8",
                          "env.corpus_episodes=20", f"seed={seed}", *overrides])
    seed_everything(cfg.seed)
    probe = grasp_env()
    model, _, codec = build_model(cfg, probe, torch.device("cpu"))
    agent = make_agent(cfg, model, torch.device("cpu"))
    assert isinstance(agent, Agent)
    return {"cfg": cfg, "agent": agent, "codec": codec}


def _trainer(s: dict[str, Any], seed: int = 0) -> ETOTrainer:
    cfg, agent, codec = s["cfg"], s["agent"], s["codec"]
    act = make_act_fn(agent, codec, greedy=True, device="cpu")
    return ETOTrainer(cfg.algo, agent, codec, torch.device("cpu"), 0, ["grasp"], TaskRunner(grasp_env, 8), act,
                      torch.Generator().manual_seed(seed))


def _weights(agent: Agent) -> list[torch.Tensor]:
    return [p.detach().clone() for p in agent.actor_parameters()]


SMALL_ETO = ["algo.tasks=24", "algo.warm_start_episodes=8", "algo.sft_epochs=2", "algo.epochs=3", "algo.batch_size=4"]


def test_a_round_raises_accuracy_and_margin_against_a_reference_fixed_at_its_start() -> None:
    s = _setup(SMALL_ETO)
    trainer = _trainer(s)
    trainer.collect_expert(10_000)
    assert trainer.expert_steps == sum(e.length for e in trainer.expert) > 0
    trainer.start_phase(1e-3)
    trainer.sft_epoch()
    start = _weights(s["agent"])
    explored = trainer.explore_and_pair(10_000, None)
    assert len(explored) == 24 and trainer.explore_steps == sum(e.length for e in explored)
    m = trainer.round_metrics
    assert m["charts/pairs"] + m["charts/pairs_ties"] == 24 and m["charts/pairs_swapped"] == 0
    assert m["charts/pairs"] == sum(not e.success for e in explored) > 0  # the expert always succeeds
    assert trainer.ref is not None
    ref_c, ref_r = (t.clone() for t in trainer.ref)
    # The reference is the policy at the round's start ...
    now_c, now_r = reference_logps(s["agent"], s["codec"], trainer.pairs, "cpu")
    torch.testing.assert_close(now_c, ref_c)
    torch.testing.assert_close(now_r, ref_r)
    epochs = [trainer.dpo_epoch(0.1) for _ in range(3)]
    # ... and stays that while the policy moves.
    torch.testing.assert_close(trainer.ref[0], ref_c)
    torch.testing.assert_close(trainer.ref[1], ref_r)
    assert any(not torch.equal(a, b) for a, b in zip(start, _weights(s["agent"]), strict=True))
    assert epochs[0]["charts/reward_margin"] < epochs[-1]["charts/reward_margin"]
    assert epochs[0]["charts/pair_accuracy"] < epochs[-1]["charts/pair_accuracy"] == pytest.approx(1.0)
    assert epochs[-1]["losses/dpo"] < epochs[0]["losses/dpo"] < 0.7  # log 2 = 0.693 at the start
    # After the round, the policy prefers the chosen trajectories: log pi(chosen) - log pi(rejected) grew.
    after_c, after_r = reference_logps(s["agent"], s["codec"], trainer.pairs, "cpu")
    assert float(((after_c - after_r) - (ref_c - ref_r)).mean()) > 0
    # The next round's reference is the policy as this round left it.
    trainer.round = 1
    trainer.explore_and_pair(10_000, None)
    assert trainer.ref is not None
    torch.testing.assert_close(trainer.ref[0], reference_logps(s["agent"], s["codec"], trainer.pairs, "cpu")[0])


def test_trainer_state_dict_resumes_inside_the_dpo_epochs_exactly() -> None:
    def run(stop_after: int | None) -> tuple[list[torch.Tensor], dict[str, Any] | None]:
        s = _setup(SMALL_ETO, seed=1)
        trainer = _trainer(s, seed=1)
        trainer.collect_expert(10_000)
        trainer.start_phase(1e-3)
        trainer.sft_epoch()
        trainer.explore_and_pair(10_000, None)
        for epoch in range(3):
            if epoch == stop_after:
                state = {"agent": s["agent"].state_dict(), "eto": trainer.state_dict(),
                         "shuffle": trainer.shuffle_gen.get_state()}
                return [], copy.deepcopy(state)
            trainer.dpo_epoch(0.1)
        return _weights(s["agent"]), None

    reference, _ = run(None)
    _, saved = run(1)
    assert saved is not None
    s = _setup(SMALL_ETO, seed=1)  # the same run rebuilt (the tiny tokenizer's vocabulary depends on the seed) ...
    with torch.no_grad():
        for p in s["agent"].actor_parameters():
            p.add_(torch.randn_like(p))  # ... with other weights: everything must come from the state
    trainer = _trainer(s, seed=5)
    s["agent"].load_state_dict(saved["agent"])
    trainer.load_state_dict(saved["eto"], 1e-3)
    trainer.shuffle_gen.set_state(saved["shuffle"])
    assert trainer.epoch == 1 and trainer.phase == "dpo" and len(trainer.pairs) > 0
    for _ in range(2):
        trainer.dpo_epoch(0.1)
    for a, b in zip(reference, _weights(s["agent"]), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_best_pairing_uses_the_best_trajectory_seen_and_swaps_roles() -> None:
    s = _setup([*SMALL_ETO, "algo.pair_with=best", "algo.warm_start_episodes=0"])
    trainer = _trainer(s)
    assert trainer.need_expert() == 0
    trainer.collect_expert(10_000)
    assert trainer.expert == [] and trainer.best == {}
    explored = trainer.explore_and_pair(10_000, None)
    m = trainer.round_metrics
    assert m["charts/pairs_missing"] == len(explored) and m["charts/pairs"] == 0  # nothing to pair with yet
    assert set(trainer.best) == {task_id(e) for e in explored}
    # Round 2: a task whose best so far failed and is now solved pairs with roles swapped (and vice versa).
    trainer.round = 1
    trainer.act_explore = make_act_fn(s["agent"], s["codec"], greedy=False, device="cpu",
                                      generator=torch.Generator().manual_seed(3))
    second = trainer.explore_and_pair(10_000, None)
    m = trainer.round_metrics
    before = {task_id(e): sum(e.rewards) for e in explored}
    wins = sum(sum(e.rewards) > before[task_id(e)] for e in second)
    losses = sum(sum(e.rewards) < before[task_id(e)] for e in second)
    assert m["charts/pairs_swapped"] == wins and m["charts/pairs"] == wins + losses


# ----------------------------------------------------------------------------------------------- train.py algo=eto

SMALL = ["experiment=playground_eto", "env.kwargs.goal_categories=[grasp]", "env.num_envs=4", "eval.num_envs=4",
         "eval.episodes_per_category=4", "env.corpus_episodes=20", "time_limit_min=0", "threads=1",
         "logger.progress=false", "algo.tasks=16", "algo.warm_start_episodes=8", "algo.sft_epochs=2",
         "algo.epochs=2", "algo.batch_size=4", "'~env.heldout_kwargs.split'"]


def run_train(args: list[str], run_dir: Path, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled", "PYTHONUNBUFFERED": "1"}
    args = [a.strip("'") for a in args]
    return subprocess.run([sys.executable, str(ROOT / "train.py"), *args, f"hydra.run.dir={run_dir}"], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=timeout)


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


@pytest.mark.integration
def test_train_eto_logs_rounds_counts_every_env_step_and_writes_pairs(tmp_path: Path) -> None:
    result = run_train([*SMALL, "total_env_steps=150", "eval.every=60", "checkpoint.every=1"], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = read_metrics(tmp_path)
    steps = [m["step"] for m in metrics]
    assert steps == sorted(set(steps)), "metrics steps must strictly increase"
    first, rounds = metrics[0], metrics[1:]
    assert first["step"] == first["charts/expert_env_steps"] > 0 and "losses/sft" in first
    assert "eval/greedy/success" in first  # the warm-started policy is the curve's first point
    assert rounds and [m["charts/round"] for m in rounds] == list(range(1, len(rounds) + 1))
    for m in rounds:
        assert m["step"] == m["charts/expert_env_steps"] + m["charts/explore_env_steps"]
        assert {"losses/dpo", "charts/reward_margin", "charts/pair_accuracy", "charts/pairs"} <= set(m)
    assert 150 <= rounds[-1]["step"] < 150 + 4 * 3  # stops within one wave of 4 grasp episodes (<= 3 steps)
    assert "eval/greedy/success" in rounds[-1]
    files = sorted((tmp_path / "pairs").glob("round*.jsonl"))
    assert len(files) == len(rounds)
    assert [len(read_pairs(f)) for f in sorted(files, key=lambda f: int(f.stem[5:]))] == [
        int(m["charts/pairs"]) for m in rounds]
    assert "final greedy success" in result.stdout and result.stdout.count("final greedy success") == 1


def kill_after_pairs(args: list[str], run_dir: Path, round_index: int) -> None:
    """Start ``train.py`` and SIGKILL it once round ``round_index``'s pairs are written (inside its DPO epochs)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled"}
    args = [a.strip("'") for a in args]
    proc = subprocess.Popen([sys.executable, str(ROOT / "train.py"), *args, f"hydra.run.dir={run_dir}"], cwd=ROOT,
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 180
    target = run_dir / "pairs" / f"round{round_index}.jsonl"
    while not target.exists() and time.monotonic() < deadline:
        assert proc.poll() is None, "the run ended before it could be killed"
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()


@pytest.mark.integration
def test_sigkill_inside_a_round_then_resume_matches_uninterrupted_run(tmp_path: Path) -> None:
    args = [*SMALL, "total_env_steps=200", "eval.every=50", "checkpoint.every=1", "checkpoint.keep=2",
            "algo.epochs=4", "seed=2"]
    reference = tmp_path / "reference"
    result = run_train(args, reference)
    assert result.returncode == 0, result.stderr[-3000:]
    killed = tmp_path / "killed"
    kill_after_pairs(args, killed, 2)
    result = run_train([*args, "resume=auto"], killed)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resumed from" in result.stdout
    assert read_metrics(killed) == read_metrics(reference)
    for f in sorted((reference / "pairs").glob("*.jsonl")):
        assert (killed / "pairs" / f.name).read_text() == f.read_text()


@pytest.mark.integration
def test_time_limit_stops_at_a_phase_boundary_and_resume_continues_exactly(tmp_path: Path) -> None:
    """``time_limit_min`` (the shared harness's, as for SAC): the run stops at the next phase boundary with its final
    checkpoint and an evaluation as its last row; ``resume=auto`` then continues it into the uninterrupted run."""
    args = [a for a in SMALL if a != "time_limit_min=0"] + [
        "total_env_steps=200", "eval.every=50", "checkpoint.every=0", "algo.epochs=4", "seed=2"]
    reference = tmp_path / "reference"
    result = run_train([*args, "time_limit_min=0"], reference)
    assert result.returncode == 0, result.stderr[-3000:]
    stopped = tmp_path / "stopped"
    result = run_train([*args, "time_limit_min=0.01"], stopped)  # 0.6 s: long before the run's end
    assert result.returncode == 0, result.stderr[-3000:]
    assert "time limit of 0.01 min reached at env step" in result.stdout
    assert result.stdout.count("final greedy success") == 1
    rows = read_metrics(stopped)
    last = rows[-1]
    assert "eval/greedy/success" in last and last["step"] < read_metrics(reference)[-1]["step"]
    # checkpoint.every=0: the final checkpoint alone, of the step the run stopped at
    assert sorted(p.name for p in (stopped / "checkpoints").glob("step_*.pt")) == [f"step_{last['step']:010d}.pt"]
    result = run_train([*args, "time_limit_min=0", "resume=auto"], stopped)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resumed from" in result.stdout
    assert read_metrics(stopped) == read_metrics(reference)
    for f in sorted((reference / "pairs").glob("*.jsonl")):
        assert (stopped / "pairs" / f.name).read_text() == f.read_text()


@pytest.mark.integration
def test_resuming_a_sac_run_with_eto_is_refused(tmp_path: Path) -> None:
    sac = ["env.num_envs=4", "batch_size=8", "learning_starts=48", "eval.episodes_per_category=2", "eval.num_envs=2",
           "env.corpus_episodes=20", "time_limit_min=0", "threads=1", "logger.progress=false"]
    result = run_train([*sac, "total_env_steps=64"], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    result = run_train([*SMALL, "resume=auto"], tmp_path, timeout=120)
    assert result.returncode != 0 and "algo=sac" in result.stderr and "algo=eto" in result.stderr


@pytest.mark.integration
def test_dpo_on_a_user_pairs_file(tmp_path: Path) -> None:
    result = run_train([*SMALL, f"algo.pairs_file={EXAMPLE}", "algo.epochs=3", "'algo.lrs=[1e-2]'"], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    (line,) = read_metrics(tmp_path)
    assert line["step"] == 0 and line["charts/expert_env_steps"] == 0 and line["charts/explore_env_steps"] == 0
    assert line["charts/updates"] == 3  # 2 pairs, batch 4: one step per epoch
    assert line["charts/reward_margin"] > 0 and np.isfinite(line["losses/dpo"])
    assert "eval/greedy/success" in line
    assert not (tmp_path / "pairs").exists()  # no round of its own


@pytest.mark.integration
def test_a_malformed_pairs_file_names_its_line(tmp_path: Path) -> None:
    lines = EXAMPLE.read_text().splitlines()
    bad = json.loads(lines[1])
    del bad["chosen"][1]["candidates"]
    path = tmp_path / "bad.jsonl"
    path.write_text(lines[0] + "\n" + json.dumps(bad) + "\n")
    result = run_train([*SMALL, f"algo.pairs_file={path}"], tmp_path / "run", timeout=120)
    assert result.returncode != 0
    assert f"{path}:2:" in result.stderr and "candidates" in result.stderr


# --------------------------------------------------------------------------------------------------- learning (slow)


@pytest.mark.slow
@pytest.mark.ci
def test_eto_rounds_beat_the_warm_start_alone_on_grasp(tmp_path: Path) -> None:
    """SFT warm start + one ETO round against the same warm start alone (rounds=0), 2 seeds, grasp goals.

    The preset's 1,024 tasks (the expert's 2,048 env steps) with a small warm start (3 epochs on 32 of the expert's
    episodes; the preset's own, 10 epochs on all 1,024, already reaches 0.99 on grasp and leaves a round nothing to
    show), then one round of about 2,900 steps. Measured on the old scenes (docs/results.md, "ETO"): warm start
    0.17-0.23, after the round 0.77-1.00 (5 of 5 seeds). On the reference scenes (2026-12-07, this test's seeds 0
    and 1) the warm start is stronger, 0.45 and 0.50, and the round brings 0.75 and 0.80 (gaps 0.30 both); the test
    asks for a gap of 0.2 on each of 2 seeds. About 1.5 minutes."""
    common = ["experiment=playground_eto", "env.kwargs.goal_categories=[grasp]", "eval.episodes_per_category=64",
              "algo.warm_start_episodes=32", "algo.sft_epochs=3",
              "time_limit_min=0", "threads=1", "logger.progress=false", "checkpoint.every=0",
              "'~env.heldout_kwargs.split'", "total_env_steps=5000", "eval.every=100000"]
    gaps = []
    for seed in (0, 1):
        warm = run_train([*common, "algo.rounds=0", f"seed={seed}"], tmp_path / f"warm{seed}", timeout=600)
        assert warm.returncode == 0, warm.stderr[-3000:]
        eto = run_train([*common, f"seed={seed}"], tmp_path / f"eto{seed}", timeout=600)
        assert eto.returncode == 0, eto.stderr[-3000:]
        w = read_metrics(tmp_path / f"warm{seed}")[-1]["eval/greedy/success"]
        e = read_metrics(tmp_path / f"eto{seed}")[-1]["eval/greedy/success"]
        gaps.append(e - w)
    assert min(gaps) >= 0.2, f"ETO minus warm start, per seed: {gaps}"


def test_sweep_eto_variants_replace_the_swept_keys_and_parse() -> None:
    from tests.scripts_util import load_script

    sweep = load_script("sweep_eto")
    assert sweep.merged(["algo.tasks=128", "algo.sft_coef=0"], ["algo.tasks=512"]) == ["algo.sft_coef=0",
                                                                                       "algo.tasks=512"]
    assert sweep.parse_variant("a:algo.sft_coef=1 algo.lrs=[1e-4]") == ("a", ["algo.sft_coef=1", "algo.lrs=[1e-4]"])
    with pytest.raises(ValueError, match="NAME:OVERRIDES"):
        sweep.parse_variant("no-colon")
    for name, overrides in sweep.DEFAULT_VARIANTS.items():  # every variant states what it changes, once per key
        keys = [o.split("=", 1)[0] for o in sweep.merged(sweep.SWEPT, overrides)]
        assert len(keys) == len(set(keys)), name
