"""The run harness (``sacglam.run.harness.RunContext``) and the ``Learner`` protocol (``sacglam.algos.base``), in
process: SAC's and PPO's learners satisfy the protocol, the builder gives a learner its data-parallel place and its
per-rank shares, the harness saves and resumes checkpoints with the run's keys, cuts the metrics file back on resume,
agrees on the time limit, and several processes refuse ETO with the reason."""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import gymnasium
import pytest
import torch

import envs  # noqa: F401 - registers the envs
from sacglam.algos.base import Learner
from sacglam.algos.ppo.learner import PPOLearner
from sacglam.algos.sac.learner import SACLearner
from sacglam.checkpoint import checkpoint_path
from sacglam.config import TrainConfig
from sacglam.distributed import Dist, check_data_parallel, rank_seed
from sacglam.run.builders import build_model, make_learner, rank_config, seed_everything
from sacglam.run.harness import RunContext
from sacglam.run.tools import compose_config

SMALL = ["env.num_envs=4", "batch_size=8", "learning_starts=48", "env.corpus_episodes=20", "logger.progress=false",
         "logger.wandb_mode=disabled"]
PPO = ["algo=ppo", "env.num_envs=4", "algo.rollout_steps=8", "algo.minibatch_size=16", "env.corpus_episodes=20"]


def learner_of(overrides: list[str], dist: Dist | None = None) -> tuple[TrainConfig, Any]:
    """The learner ``train.py OVERRIDES`` builds on this process (tiny model, CPU)."""
    cfg = compose_config(overrides)
    seed_everything(cfg.seed)
    probe = gymnasium.make(cfg.env.id, **cfg.env.kwargs).unwrapped
    model, _, codec = build_model(cfg, probe, torch.device("cpu"))
    _, learner = make_learner(cfg, model, codec, probe, torch.device("cpu"), dist)
    return cfg, learner


# ------------------------------------------------------------------------------------------------------- Learner


@pytest.mark.parametrize("overrides", [SMALL, PPO], ids=["sac", "ppo"])
def test_sac_and_ppo_learners_satisfy_the_learner_protocol(overrides: list[str]) -> None:
    _, learner = learner_of(overrides)
    assert isinstance(learner, SACLearner | PPOLearner)
    assert isinstance(learner, Learner)
    assert learner.extra_metrics(lambda obj: [obj]) == {}  # no relabeller, nothing of its own
    assert set(learner.generators) >= {"act"} and learner.updates == 0


def test_an_object_without_the_loop_hooks_is_not_a_learner() -> None:
    class Partial:  # everything but extra_metrics
        act = None
        updates = 0

        def __init__(self) -> None:
            self.generators: dict[str, torch.Generator] = {}

        def observe(self, step: Any, episodes: Any = ()) -> dict[str, torch.Tensor]:
            return {}

        def state_dict(self) -> dict[str, Any]:
            return {}

        def load_state_dict(self, state: dict[str, Any]) -> None:
            pass

    assert not isinstance(Partial(), Learner)


def test_the_builder_gives_each_rank_its_shares_and_its_dist() -> None:
    dist = Dist(rank=1, world=2)
    cfg, sac = learner_of(SMALL, dist)
    assert isinstance(sac, SACLearner)
    assert sac.dist is dist and sac.batch_size == 4 and sac.learning_starts == 24
    local = rank_config(cfg, dist)
    assert local.seed == rank_seed(cfg.seed, 1) != cfg.seed
    assert rank_config(cfg, Dist()) is cfg  # one process: the run's own options
    _, ppo = learner_of(PPO, dist)
    assert isinstance(ppo, PPOLearner)
    assert ppo.updater.dist is dist and ppo.updater.cfg.minibatch_size == 8
    _, alone = learner_of(PPO)
    assert isinstance(alone, PPOLearner)
    assert alone.updater.dist.world == 1 and alone.updater.cfg.minibatch_size == 16


# ----------------------------------------------------------------------------------------------------- RunContext


def context(tmp_path: Path, overrides: Sequence[str] = ()) -> RunContext:
    cfg = compose_config([*SMALL, *overrides])
    return RunContext(cfg, {"seed": cfg.seed}, tmp_path, torch.device("cpu"))


def test_save_then_resume_carries_the_run_keys_and_cuts_the_metrics_file(tmp_path: Path) -> None:
    ctx = context(tmp_path, ["checkpoint.keep=0", "resume=auto"])
    assert ctx.load_resume() is None and ctx.resumed_from is None  # a fresh run
    ctx.open_logs(None, log_step=0, episode_step=0)
    ctx.log(8, {"a": 1.0})
    ctx.save(8, {"agent": {"w": torch.ones(2)}, "loop": (16, 8)})
    ctx.log(8, {"eval/greedy/success": 0.5})  # a second row of the same step, after the checkpoint
    ctx.log(16, {"a": 2.0})
    assert ctx.close({"eval/greedy/success": 0.5}, "after 16 env steps") == 0.5

    again = context(tmp_path, ["checkpoint.keep=0", "resume=auto"])
    state = again.load_resume()
    assert state is not None and again.resumed_from == checkpoint_path(tmp_path, 8)
    assert state["algo"] == "sac" and state["world"] == 1 and state["metrics_lines"] == 1
    assert state["loop"] == (16, 8) and torch.equal(state["agent"]["w"], torch.ones(2))
    again.open_logs(state, log_step=8, episode_step=8)
    again.close({}, "")
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert rows == [{"step": 8, "a": 1.0}]  # the rows after the checkpoint are gone, that of its step too


def test_resuming_with_another_algorithm_names_both(tmp_path: Path) -> None:
    ctx = context(tmp_path)
    ctx.save(4, {"agent": {}})
    eto = context(tmp_path, ["algo=eto", "resume=auto"])
    with pytest.raises(ValueError, match=r"algo=sac.*algo=eto"):
        eto.load_resume()


def test_time_limit_counts_from_the_clock_start(tmp_path: Path) -> None:
    ctx = context(tmp_path, ["time_limit_min=0.001"])  # 60 ms
    ctx.start_clock()
    assert not ctx.time_up() and not ctx.time_up_everywhere()
    time.sleep(0.1)
    assert ctx.time_up() and ctx.time_up_everywhere()
    ctx.start_clock()
    assert not ctx.time_up()
    unlimited = context(tmp_path, ["time_limit_min=0"])
    unlimited.started -= 3600
    assert not unlimited.time_up()


def test_evaluation_runs_on_rank_zero_only(tmp_path: Path) -> None:
    ctx = context(tmp_path)
    ctx.evaluator = lambda: {"eval/greedy/success": 1.0}
    assert ctx.evaluate() == {"eval/greedy/success": 1.0}
    other = replace(ctx, dist=Dist(rank=1, world=2))
    assert other.evaluate() == {} and other.close({"eval/greedy/success": 1.0}, "") == 0.0


def test_several_processes_refuse_eto_with_the_reason() -> None:
    cfg = compose_config(["algo=eto"])
    check_data_parallel(cfg, Dist())  # one process: ETO runs
    with pytest.raises(ValueError, match="run ETO with one process") as err:
        check_data_parallel(cfg, Dist(rank=0, world=2))
    assert "algo=eto" in str(err.value) and "weights would drift apart" in str(err.value)
