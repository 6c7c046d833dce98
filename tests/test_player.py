"""The episode player (sacglam.player): waves of tasks by (seed, category), idle envs, its errors, and one step of
a subset of the envs. The collector, evaluation and ETO tests check the loops built on it."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pytest
import torch

from sacglam.player import Player
from sacglam.types import ActFn, ActOutput
from sacglam.waves import EnvList, Task, play_wave, play_waves
from tests.test_collector import CountEnv, MiniSyncVec


class LoggedEnv(CountEnv):
    """A ``CountEnv`` that logs every reset as ``(seed, goal category)`` in a list shared by all its instances."""

    def __init__(self, log: list[tuple[int | None, str | None]], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.log = log

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> tuple[str, dict[str, Any]]:
        self.log.append((seed, (options or {}).get("goal_category")))
        return super().reset(seed=seed, options=options)


def _first(goals: Sequence[str], observations: Sequence[str], candidates: Sequence[Sequence[str]]) -> ActOutput:
    """Always the first candidate (``go p+1``: reaches any ``Reach k`` in k steps)."""
    return ActOutput(action=torch.zeros(len(goals), dtype=torch.long), logp=torch.zeros(len(goals)))


def _constant(index: int, size: int | None = None) -> ActFn:
    """Candidate ``index`` for every state (``size`` actions whatever the number of states, when given)."""

    def act(goals: Sequence[str], observations: Sequence[str], candidates: Sequence[Sequence[str]]) -> ActOutput:
        n = len(goals) if size is None else size
        return ActOutput(action=torch.full((n,), index, dtype=torch.long), logp=torch.zeros(n))

    return act


def _tasks(n: int, first_seed: int = 10) -> list[Task]:
    return [Task(j, first_seed + j, ["near", "far"][j % 2]) for j in range(n)]


@pytest.mark.parametrize("fill", [False, True])
def test_waves_play_each_task_once_in_order(fill: bool) -> None:
    log: list[tuple[int | None, str | None]] = []
    player = Player(EnvList([LoggedEnv(log) for _ in range(3)]))
    tasks = _tasks(7)
    waves = list(play_waves(player, tasks, _first, max_steps=100, fill=fill))
    episodes = [ep for wave, _ in waves for ep in wave]
    assert [len(wave) for wave, _ in waves] == [3, 3, 1]
    assert [ep.task for ep in episodes] == tasks
    assert [ep.env_index for ep in episodes] == [0, 1, 2, 0, 1, 2, 0]
    played = [(t.seed, t.category) for t in tasks]
    # The short last wave resets its spare envs (seed + i, last category) only when asked to fill.
    spare = [(16 + 1, "near"), (16 + 2, "near")] if fill else []
    assert log == played + spare
    for ep in episodes:
        k = int(ep.goal.split()[1])
        assert ep.length == k and ep.actions == [0] * k and ep.rewards == [0.0] * (k - 1) + [1.0]
        assert ep.success and ep.terminated and not ep.truncated and ep.return_ == 1.0
        assert ep.observations == [f"pos {p}" for p in range(k + 1)]
        assert ep.achieved == [[f"Reach {p}"] for p in range(1, k + 1)]
    assert [steps for _, steps in waves] == [sum(ep.length for ep in wave) for wave, _ in waves]


def test_steps_at_end_count_acting_envs_in_env_order() -> None:
    player = Player(EnvList([CountEnv() for _ in range(2)]))
    # Both "Reach 1": one step each; env 0's step is counted before env 1's.
    episodes, steps = play_wave(player, [Task(0, 0, "near"), Task(1, 1, "near")], _first, max_steps=10)
    assert [ep.steps_at_end for ep in episodes] == [1, 2] and steps == 2


def test_a_vector_env_gives_the_same_episodes_and_idles_finished_envs() -> None:
    tasks = _tasks(5)
    player = Player(EnvList([CountEnv() for _ in range(2)]))
    from_list = [ep for wave, _ in play_waves(player, tasks, _first, max_steps=100) for ep in wave]
    vec = MiniSyncVec([CountEnv() for _ in range(2)])
    from_vec = [ep for wave, _ in play_waves(Player(vec), tasks, _first, max_steps=100, fill=True) for ep in wave]
    assert from_vec == from_list
    assert vec.reset_seeds == [10, 12, 14]  # one reset per wave, env i with seed + i


def test_a_vector_env_needs_one_task_per_env_with_consecutive_seeds() -> None:
    player = Player(MiniSyncVec([CountEnv() for _ in range(2)]))
    with pytest.raises(ValueError, match="consecutive seeds"):
        play_wave(player, [Task(0, 0, "near"), Task(1, 5, "near")], _first, max_steps=10)
    with pytest.raises(ValueError, match="consecutive seeds"):
        play_wave(player, [Task(0, 0, "near")], _first, max_steps=10)
    with pytest.raises(TypeError, match="expert"):
        play_wave(player, [Task(0, 0, "near"), Task(1, 1, "near")], None, max_steps=10)


def test_expert_play() -> None:
    player = Player(EnvList([CountEnv(), CountEnv()]))
    episodes, _ = play_wave(player, _tasks(2), None, max_steps=10)
    assert all(ep.success and ep.actions == [0] * ep.length for ep in episodes)


def test_errors_name_the_env_or_the_tasks() -> None:
    class Endless(CountEnv):
        def goal_step_limit(self, goal: str) -> int | None:
            return 10**9

    player = Player(EnvList([Endless(), Endless()]))
    with pytest.raises(RuntimeError, match=r"tasks \[3, 4\] did not end within max_steps=5"):
        play_wave(player, [Task(3, 0, "near"), Task(4, 1, "far")], _constant(1), max_steps=5)

    class IgnoresCategory(CountEnv):
        def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> Any:
            return super().reset(seed=seed)

    player = Player(EnvList([CountEnv(), IgnoresCategory()]))
    with pytest.raises(ValueError, match=r"env 1: .* of category 'near'; the env must honour the goal_category"):
        play_wave(player, [Task(0, 0, "far"), Task(1, 1, "far")], _first, max_steps=10)

    player = Player(EnvList([CountEnv(), CountEnv()]))
    with pytest.raises(IndexError, match="env 0: act chose candidate index 7 but the state has 2 candidates"):
        play_wave(player, _tasks(2), _constant(7), max_steps=10)
    with pytest.raises(ValueError, match="act returned 1 actions and 1 log-probs for 2 envs"):
        play_wave(player, _tasks(2), _constant(0, size=1), max_steps=10)


def test_play_waves_starts_a_wave_only_when_asked() -> None:
    log: list[tuple[int | None, str | None]] = []
    waves = play_waves(Player(EnvList([LoggedEnv(log)])), _tasks(3), _first, max_steps=10)
    next(waves)
    assert log == [(10, "near")]


def test_step_of_a_subset_idles_the_others() -> None:
    vec = MiniSyncVec([CountEnv(["Reach 2"]), CountEnv(["Reach 2"]), CountEnv(["Reach 2"])])
    player = Player(vec)
    player.reset(seed=0)
    seen: list[list[str]] = []

    def act(goals: Sequence[str], observations: Sequence[str], candidates: Sequence[Sequence[str]]) -> ActOutput:
        assert torch.is_inference_mode_enabled()
        seen.append(list(observations))
        return ActOutput(action=torch.tensor([1, 0]), logp=torch.tensor([-1.0, -2.0]))

    step = player.step(act, [0, 2])
    assert step.envs == [0, 2] and step.actions == [1, 0] and step.logp == [-1.0, -2.0]
    assert step.last_observations == ["pos 0", "pos 1"] and step.lengths == [1, 1]
    # The idle env 1 took its first admissible action ("go 1") but its running episode was not counted.
    assert player.observations == ["pos 0", "pos 1", "pos 1"]
    assert player.episode_length.tolist() == [1, 0, 1]
    assert seen == [["pos 0", "pos 0"]]
    with pytest.raises(RuntimeError, match="before reset"):
        Player(vec).step(act)
