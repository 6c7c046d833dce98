"""ETO's tasks and how they are played: a task is a reset seed and a goal category, played once per round by the
policy (greedy or sampled) or by the env's built-in expert, in waves of N plain envs.

    tasks = training_tasks(256, first_seed=0, categories=["grasp"])
    runner = TaskRunner(env_fn, num_envs=16)
    expert = runner.play(tasks, act=None, budget=None, tag="x")          # env.expert_action() at every step
    explored = runner.play(tasks, act=act_greedy, budget=5000, tag="r0")  # stops starting waves past the budget

Two plays of one task reset the env identically (same seed, same category), so they share
``sacglam.algos.eto.dpo.task_id`` (goal + first observation) and can be paired. Like the collector and the evaluation,
this
module never imports ``envs``: envs come in as a factory.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from sacglam.collector import episode_success
from sacglam.episodes import EpisodeRecord
from sacglam.types import ActFn


@dataclass(frozen=True)
class Task:
    """One training task: ``env.reset(seed=seed, options={"goal_category": category})``."""

    index: int
    seed: int
    category: str


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


@dataclass
class _Running:
    goal: str
    category: str
    observations: list[str]
    candidates: list[list[str]]
    actions: list[int]
    rewards: list[float]
    achieved: list[list[str]]


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

    def close(self) -> None:
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
        """
        out: list[EpisodeRecord] = []
        taken = 0
        n = len(self.envs)
        for start in range(0, len(tasks), n):
            if budget is not None and taken >= budget:
                break
            wave = tasks[start : start + n]
            records, steps = self._wave(wave, act, tag, env_steps + taken, policy_version)
            out.extend(records)
            taken += steps
        return out

    def _wave(self, wave: Sequence[Task], act: ActFn | None, tag: str, env_steps: int,
              policy_version: int) -> tuple[list[EpisodeRecord], int]:
        runs: list[_Running] = []
        obs: list[str] = []
        infos: list[dict[str, Any]] = []
        for env, task in zip(self.envs, wave, strict=False):
            o, info = env.reset(seed=task.seed, options={"goal_category": task.category})
            if info.get("goal_category") != task.category:
                raise ValueError(f"reset(options={{'goal_category': {task.category!r}}}) gave goal "
                                 f"{info.get('goal')!r} of category {info.get('goal_category')!r}; the env must "
                                 "honour the goal_category option")
            runs.append(_Running(str(info["goal"]), task.category, [o], [], [], [], []))
            obs.append(o)
            infos.append(info)
        done: list[EpisodeRecord | None] = [None] * len(wave)
        steps = 0
        for _ in range(self.max_steps):
            idx = [i for i in range(len(wave)) if done[i] is None]
            if not idx:
                break
            cands = [list(infos[i]["admissible_actions"]) for i in idx]
            if act is None:
                chosen = [cands[k].index(self.envs[i].expert_action()) for k, i in enumerate(idx)]
            else:
                with torch.inference_mode():
                    chosen = act([runs[i].goal for i in idx], [obs[i] for i in idx], cands).action.reshape(-1).tolist()
            for k, i in enumerate(idx):
                a = int(chosen[k])
                if not 0 <= a < len(cands[k]):
                    raise IndexError(f"task {wave[i].index}: action {a} outside its {len(cands[k])} candidates")
                o, reward, term, trunc, info = self.envs[i].step(cands[k][a])
                steps += 1
                run = runs[i]
                run.candidates.append(cands[k])
                run.actions.append(a)
                run.rewards.append(float(reward))
                run.achieved.append(list(info.get("achieved_goals", [])))
                run.observations.append(o)
                obs[i], infos[i] = o, info
                if term or trunc:
                    L = len(run.actions)
                    done[i] = EpisodeRecord(
                        id=f"t{wave[i].index}{tag}", env_index=i, goal=run.goal, goal_category=run.category,
                        observations=run.observations, candidates=run.candidates, actions=run.actions,
                        rewards=run.rewards, achieved=run.achieved, policy_version=[policy_version] * L,
                        terminated=bool(term), truncated=bool(trunc),
                        success=episode_success(float(reward), bool(term), info), env_step=env_steps + steps)
        else:
            if any(d is None for d in done):
                raise RuntimeError(f"tasks {[t.index for t, d in zip(wave, done, strict=True) if d is None]} did "
                                   f"not end within {self.max_steps} steps; the env should truncate at its limit")
        return [d for d in done if d is not None], steps


__all__ = ["Task", "TaskRunner", "training_tasks"]
