"""Tasks played to their end in waves: each env of a wave is reset to one task (a seed and a goal category), and the
wave's episodes are played by the episode player (``sacglam.player``) until all have ended, a finished env idling.

The evaluation (``sacglam.evaluate``: episode j of its plan is a task with seed ``seed + j``) and ETO's expert and
policy play (``sacglam.algos.eto.rollout``) play their episodes this way.

    player = Player(EnvList([env_fn() for _ in range(8)]))
    for episodes, steps in play_waves(player, tasks, act, max_steps=10_000):
        ...  # one PlayedEpisode per task of the wave, in task order

Like the player, this module imports neither the agent, the learners, the replay buffer nor ``envs``.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from sacglam.player import Player, episode_success
from sacglam.types import ActFn, TextEnv


@dataclass(frozen=True)
class Task:
    """One episode to play: ``env.reset(seed=seed, options={"goal_category": category})``.

    Attributes:
        index: the task's number (evaluation: its place in the plan; ETO: the training task).
        seed: the env's reset seed.
        category: the goal category asked for.
    """

    index: int
    seed: int
    category: str


@dataclass
class _EnvListStep:
    """A ``VectorStepLike`` for :class:`EnvList`."""

    observations: list[str]
    rewards: np.ndarray
    terminated: np.ndarray
    truncated: np.ndarray
    infos: list[dict[str, Any]]


class EnvList:
    """Plain envs behind the vector interface, without auto-reset: a finished env is not stepped again until reset.

    Its ``step`` result carries ``final_observation`` / ``final_info`` for an env that just finished, like the vector
    env's, so that the player reads both the same way. Unlike a vector env it can reset each env to its own task
    (:meth:`reset_tasks`) and asks an env for its expert action (:meth:`expert_action`).

    Args:
        envs: the envs (``TextEnv``; ``expert_action()`` where expert play is wanted).
        rewards_dtype: the dtype of the step's ``rewards`` array: float32 reads rewards as a vector env does
            (evaluation, whose numbers must not depend on which of the two ran them); float64 keeps them exactly.
    """

    def __init__(self, envs: Sequence[TextEnv], rewards_dtype: type[np.floating[Any]] = np.float32) -> None:
        self.envs = list(envs)
        self.num_envs = len(self.envs)
        self.rewards_dtype = rewards_dtype
        self._done = [True] * self.num_envs
        self._obs: list[str] = [""] * self.num_envs
        self._infos: list[dict[str, Any]] = [{} for _ in range(self.num_envs)]

    def reset(
        self, *, seed: int | None = None, options: Sequence[dict[str, Any] | None] | None = None
    ) -> tuple[list[str], list[dict[str, Any]]]:
        """Reset every env, env i with ``seed + i`` (None: unseeded) and ``options[i]``, as a vector env does."""
        for i, env in enumerate(self.envs):
            env_seed = None if seed is None else seed + i
            self._obs[i], self._infos[i] = env.reset(seed=env_seed, options=None if options is None else options[i])
            self._done[i] = False
        return list(self._obs), list(self._infos)

    def reset_tasks(self, tasks: Sequence[Task]) -> tuple[list[str], list[dict[str, Any]]]:
        """Reset env i to ``tasks[i]``; the envs past the tasks stay as they are (finished: never stepped)."""
        if len(tasks) > self.num_envs:
            raise ValueError(f"{len(tasks)} tasks for {self.num_envs} envs")
        for i, task in enumerate(tasks):
            self._obs[i], self._infos[i] = self.envs[i].reset(seed=task.seed, options={"goal_category": task.category})
            self._done[i] = False
        return list(self._obs), list(self._infos)

    def step(self, actions: Sequence[str]) -> _EnvListStep:
        """Step every env whose episode runs with its action (the others' actions are ignored)."""
        n = self.num_envs
        rewards = np.zeros(n, dtype=self.rewards_dtype)
        terminated = np.zeros(n, dtype=bool)
        truncated = np.zeros(n, dtype=bool)
        for i, env in enumerate(self.envs):
            if self._done[i]:
                continue  # stepping a finished env would raise in most envs
            obs, reward, term, trunc, info = env.step(actions[i])
            rewards[i], terminated[i], truncated[i] = reward, term, trunc
            if term or trunc:
                info = {**info, "final_observation": obs, "final_info": info}
                self._done[i] = True
            self._obs[i], self._infos[i] = obs, info
        return _EnvListStep(list(self._obs), rewards, terminated, truncated, list(self._infos))

    def expert_action(self, i: int) -> str:
        """Env i's expert action (``env.expert_action()``) in its current state."""
        expert = getattr(self.envs[i], "expert_action", None)
        if expert is None:
            raise TypeError(f"env {i} ({type(self.envs[i]).__name__}) has no expert_action() for expert play")
        return str(expert())

    def close(self) -> None:
        """Close every env that has ``close``."""
        for env in self.envs:
            close = getattr(env, "close", None)
            if close is not None:
                close()


@dataclass
class PlayedEpisode:
    """One task played to its end, L steps.

    Attributes:
        task: the task.
        env_index: which env of the wave played it.
        goal: the goal pursued (the reset info's).
        observations: L + 1 observations, ``o_0 .. o_L``.
        candidates: L candidate lists; actions: L indices into them; rewards: L rewards.
        achieved: L lists, the goals step t newly achieved (``info["achieved_goals"]``, [] when absent).
        terminated, truncated: how the episode ended; success: :func:`episode_success`.
        steps_at_end: env steps the wave had taken once this episode's last step was taken (acting envs counted in
            env order within a vector step).
    """

    task: Task
    env_index: int
    goal: str
    observations: list[str]
    candidates: list[list[str]] = field(default_factory=list)
    actions: list[int] = field(default_factory=list)
    rewards: list[float] = field(default_factory=list)
    achieved: list[list[str]] = field(default_factory=list)
    terminated: bool = False
    truncated: bool = False
    success: bool = False
    steps_at_end: int = 0

    @property
    def length(self) -> int:
        """L, the number of steps."""
        return len(self.actions)

    @property
    def return_(self) -> float:
        """The undiscounted sum of rewards."""
        return float(sum(self.rewards))


def _reset_wave(player: Player, tasks: Sequence[Task]) -> None:
    """Reset env i to ``tasks[i]``.

    An :class:`EnvList` resets each env to its task, and only as many envs as there are tasks. A vector env resets
    all its envs at once, env i with ``seed + i``: it needs one task per env, with consecutive seeds.

    Raises:
        ValueError: a vector env got fewer tasks than envs, or seeds that are not consecutive.
    """
    if isinstance(player.envs, EnvList):
        player.set_state(*player.envs.reset_tasks(tasks))
        return
    n = player.num_envs
    if len(tasks) != n or any(t.seed != tasks[0].seed + i for i, t in enumerate(tasks)):
        raise ValueError(
            f"a vector env resets all {n} envs, env i with seed + i: it needs {n} tasks with consecutive seeds, got "
            f"seeds {[t.seed for t in tasks]}"
        )
    player.reset(seed=tasks[0].seed, options=[{"goal_category": t.category} for t in tasks])


def play_wave(
    player: Player, tasks: Sequence[Task], act: ActFn | None, *, max_steps: int, active: int | None = None
) -> tuple[list[PlayedEpisode], int]:
    """Reset env i to ``tasks[i]`` and play the first ``active`` tasks (all by default) to their end.

    Tasks past ``active`` only fill the envs a vector env resets anyway; they are not played. An env whose episode
    ended idles until the wave ends.

    Args:
        player: the envs.
        tasks: one task per env to reset, at most N.
        act: the policy, or None for the expert (see :meth:`Player.step`).
        max_steps: safety bound on the wave's vector steps (an env that never ends raises instead of hanging).
        active: how many of the tasks to play.

    Returns:
        the played episodes in task order, and the env steps the wave took.

    Raises:
        ValueError: an env did not honour its task's ``goal_category`` option.
        RuntimeError: episodes still ran after ``max_steps`` vector steps (names their tasks).
    """
    count = len(tasks) if active is None else active
    _reset_wave(player, tasks)
    assert player.observations is not None and player.infos is not None
    for i in range(count):
        info = player.infos[i]
        got = info.get("goal_category")
        if got != tasks[i].category:
            raise ValueError(
                f"env {i}: reset(options={{'goal_category': {tasks[i].category!r}}}) gave goal {info.get('goal')!r} "
                f"of category {got!r}; the env must honour the goal_category option"
            )
    runs = [PlayedEpisode(tasks[i], i, str(player.infos[i]["goal"]), [player.observations[i]]) for i in range(count)]
    acting = list(range(count))
    steps = 0
    for _ in range(max_steps):
        if not acting:
            break
        played = player.step(act, acting)
        for k, i in enumerate(played.envs):
            steps += 1
            run = runs[i]
            run.candidates.append(played.candidates[k])
            run.actions.append(played.actions[k])
            run.rewards.append(played.rewards[k])
            run.achieved.append(list(played.last_infos[k].get("achieved_goals", [])))
            run.observations.append(played.last_observations[k])
            if played.ended(k):
                run.terminated, run.truncated = played.terminated[k], played.truncated[k]
                run.success = episode_success(played.rewards[k], run.terminated, played.last_infos[k])
                run.steps_at_end = steps
        acting = [i for k, i in enumerate(played.envs) if not played.ended(k)]
    else:
        if acting:
            raise RuntimeError(
                f"tasks {[tasks[i].index for i in acting]} did not end within max_steps={max_steps}; the env should "
                "truncate at its step limit (or raise max_steps)"
            )
    return runs, steps


def play_waves(
    player: Player, tasks: Sequence[Task], act: ActFn | None, *, max_steps: int, fill: bool = False
) -> Iterator[tuple[list[PlayedEpisode], int]]:
    """Play ``tasks`` in order, in waves of N (one task per env), yielding each wave's episodes and env steps.

    A wave starts only when the next item is asked for, so a caller can stop between waves (e.g. on a budget).

    Args:
        player: the envs.
        tasks: the tasks.
        act: the policy, or None for the expert.
        max_steps: safety bound on each wave's vector steps.
        fill: reset every env in a short last wave (env i with the wave's first seed + i and its last category,
            not played), as a vector env must; otherwise only the wave's envs are reset.
    """
    n = player.num_envs
    for start in range(0, len(tasks), n):
        wave = list(tasks[start : start + n])
        count = len(wave)
        if fill:
            wave += [Task(-1, wave[0].seed + i, wave[-1].category) for i in range(count, n)]
        yield play_wave(player, wave, act, max_steps=max_steps, active=count)


__all__ = ["EnvList", "PlayedEpisode", "Task", "play_wave", "play_waves"]
