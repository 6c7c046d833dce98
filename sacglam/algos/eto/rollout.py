"""ETO's tasks and how they are played: a task is a reset seed and a goal category, played once per round by the
policy (greedy or sampled) or by the env's built-in expert, in waves of N plain envs.

    tasks = training_tasks(256, first_seed=0, categories=["grasp"])
    runner = TaskRunner(env_fn, num_envs=16)
    expert = runner.play(tasks, act=None, budget=None, tag="x")          # env.expert_action() at every step
    explored = runner.play(tasks, act=act_greedy, budget=5000, tag="r0")  # stops starting waves past the budget

Two plays of one task reset the env identically (same seed, same category), so they share
``sacglam.algos.eto.dpo.task_id`` (goal + first observation) and can be paired. The waves are played by the episode
player (``sacglam.player.play_waves``, which the training collector and the evaluation use too). Like them, this
module never imports ``envs``: envs come in as a factory.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from sacglam.episodes import EpisodeRecord
from sacglam.player import Player
from sacglam.types import ActFn
from sacglam.waves import EnvList, PlayedEpisode, Task, play_waves


def training_tasks(n: int, first_seed: int, categories: Sequence[str]) -> list[Task]:
    """``n`` tasks with seeds ``first_seed .. first_seed + n - 1``, categories in turn (balanced to within one).

    Raises:
        ValueError: ``n`` < 1 or no category.
    """
    if n < 1:
        raise ValueError(f"training_tasks: n must be >= 1, got {n}")
    if not categories:
        raise ValueError("training_tasks: needs at least one goal category")
    return [Task(j, first_seed + j, categories[j % len(categories)]) for j in range(n)]


class TaskRunner:
    """Plays tasks to their end, ``num_envs`` at a time, and returns them as :class:`EpisodeRecord` s.

    Args:
        env_fn: builds one env (a ``TextEnv`` with ``expert_action()`` for expert play).
        num_envs: envs stepped together (the act batch size).
        max_steps: safety bound on the steps of one episode (an env that never ends raises instead of hanging).
    """

    def __init__(self, env_fn: Callable[[], Any], num_envs: int, max_steps: int = 10_000) -> None:
        if num_envs < 1:
            raise ValueError(f"TaskRunner: num_envs must be >= 1, got {num_envs}")
        self.envs: list[Any] = [env_fn() for _ in range(num_envs)]
        self.max_steps = max_steps
        # float64 rewards: the episodes record each env's reward exactly.
        self.player = Player(EnvList(self.envs, rewards_dtype=np.float64))

    def close(self) -> None:
        """Close the envs."""
        for env in self.envs:
            env.close()

    def play(
        self,
        tasks: Sequence[Task],
        act: ActFn | None,
        *,
        budget: int | None = None,
        tag: str = "",
        env_steps: int = 0,
        policy_version: int = 0,
    ) -> list[EpisodeRecord]:
        """Play each task once, in order, in waves of ``num_envs``.

        Args:
            tasks: the tasks to play.
            act: the policy, ``(goals, observations, candidates) -> ActOutput``; None plays ``env.expert_action()``.
            budget: stop starting waves once this many env steps were taken in this call (a started wave finishes,
                so the call may exceed it by less than one wave); None plays every task.
            tag: episode ids are ``t<task index><tag>`` (e.g. ``t12r0``: task 12 in round 0).
            env_steps: the run's env-step count before this call (``EpisodeRecord.env_step`` counts on from it).
            policy_version: recorded at every step.

        Returns:
            the played episodes in task order (fewer than ``tasks`` when the budget ran out).

        Raises:
            ValueError: an env did not honour a task's goal category.
            IndexError: ``act`` chose an index outside a state's candidates.
            RuntimeError: an episode did not end within ``max_steps`` steps.
        """
        out: list[EpisodeRecord] = []
        taken = 0
        waves = play_waves(self.player, tasks, act, max_steps=self.max_steps)
        while budget is None or taken < budget:  # a wave is played only when asked for
            wave = next(waves, None)
            if wave is None:
                break
            episodes, steps = wave
            out.extend(_record(ep, tag, policy_version, env_steps + taken) for ep in episodes)
            taken += steps
        return out


def _record(ep: PlayedEpisode, tag: str, policy_version: int, env_steps: int) -> EpisodeRecord:
    """``ep`` as an :class:`EpisodeRecord` with id ``t<task index><tag>``, ``env_steps`` being the count before its
    wave."""
    return EpisodeRecord(
        id=f"t{ep.task.index}{tag}",
        env_index=ep.env_index,
        goal=ep.goal,
        goal_category=ep.task.category,
        observations=ep.observations,
        candidates=ep.candidates,
        actions=ep.actions,
        rewards=ep.rewards,
        achieved=ep.achieved,
        policy_version=[policy_version] * ep.length,
        terminated=ep.terminated,
        truncated=ep.truncated,
        success=ep.success,
        env_step=env_steps + ep.steps_at_end,
    )


__all__ = ["Task", "TaskRunner", "training_tasks"]
