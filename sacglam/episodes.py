"""Finished episodes as text: what the achieved-goal sources judge, the episode log records and the hindsight export
reads.

``EpisodeTracker`` is fed every ``TextStep`` the collector emits (with the ``EpisodeStats`` of the episodes that ended
at that step) and returns one ``EpisodeRecord`` per finished episode. It keeps only the running episodes' text, so it
costs a few list appends per env step.

This module imports nothing of the model, the buffer or the envs.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from sacglam.types import TextStep


@dataclass
class EpisodeRecord:
    """One finished episode of length L, in text.

    Attributes:
        id: unique within a run: ``e<env>k<k>`` for the k-th episode of env ``env`` (the buffer's numbering).
        env_index: which of the N training envs ran it.
        goal: the goal pursued; goal_category: its category.
        observations: L + 1 observations, ``o_0 .. o_L`` (``o_L`` is the final one).
        candidates: L candidate lists; ``candidates[t]`` are the actions admissible in ``o_t``.
        actions: L indices into ``candidates[t]``; ``action_text(t)`` is the string.
        rewards: L rewards.
        achieved: L lists, the goals the env's own oracle says step t newly achieved (``info["achieved_goals"]``).
        policy_version: L ints, the number of updates done when step t was acted.
        terminated, truncated: how the episode ended; success: ``collector.episode_success``.
        env_step: the run's env-step count once the episode's last step was taken.
    """

    id: str
    env_index: int
    goal: str
    goal_category: str
    observations: list[str]
    candidates: list[list[str]]
    actions: list[int]
    rewards: list[float]
    achieved: list[list[str]]
    policy_version: list[int]
    terminated: bool
    truncated: bool
    success: bool
    env_step: int = 0

    @property
    def length(self) -> int:
        """L, the number of steps."""
        return len(self.actions)

    def action_text(self, t: int) -> str:
        """The action taken at step t."""
        return self.candidates[t][self.actions[t]]

    def to_json(self) -> dict[str, Any]:
        """A plain dict (``json.dumps`` writes it); ``from_json`` reads it back."""
        return asdict(self)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> EpisodeRecord:
        """An ``EpisodeRecord`` from ``to_json``'s dict.

        Raises:
            ValueError: a field is missing, or the per-step lists disagree in length (names them).
        """
        names = [f for f in cls.__dataclass_fields__ if f != "env_step"]
        missing = [n for n in names if n not in data]
        if missing:
            raise ValueError(f"episode record lacks field(s) {missing}")
        rec = cls(**{k: data[k] for k in (*names, "env_step") if k in data})
        rec.check()
        return rec

    def check(self) -> None:
        """Raise ``ValueError`` when the per-step lists do not fit one episode of ``len(actions)`` steps."""
        L = len(self.actions)
        lens = {"candidates": len(self.candidates), "rewards": len(self.rewards), "achieved": len(self.achieved),
                "policy_version": len(self.policy_version)}
        bad = {k: v for k, v in lens.items() if v != L}
        if len(self.observations) != L + 1:
            bad["observations"] = len(self.observations)
        if bad:
            raise ValueError(f"episode {self.id}: {L} actions but list lengths {bad} (observations need L + 1)")
        for t, (a, cands) in enumerate(zip(self.actions, self.candidates, strict=True)):
            if not 0 <= a < len(cands):
                raise ValueError(f"episode {self.id}: action index {a} at step {t} outside its {len(cands)} "
                                 f"candidates")


@dataclass
class _Running:
    goal: str = ""
    observations: list[str] = field(default_factory=list)
    candidates: list[list[str]] = field(default_factory=list)
    actions: list[int] = field(default_factory=list)
    rewards: list[float] = field(default_factory=list)
    achieved: list[list[str]] = field(default_factory=list)
    policy_version: list[int] = field(default_factory=list)


class EpisodeTracker:
    """Accumulates N envs' steps into ``EpisodeRecord`` s.

    Example::

        tracker = EpisodeTracker(num_envs)
        step, finished = collector.step()
        records = tracker.add(step, finished, policy_version=learner.updates, env_steps=collector.env_steps)

    Episode numbering follows the replay buffer's (``k`` counts env e's episodes from 0), so a record's id names the
    same episode the buffer stores.
    """

    def __init__(self, num_envs: int) -> None:
        self.num_envs = num_envs
        self._running = [_Running() for _ in range(num_envs)]
        self._k = [0] * num_envs

    def add(self, step: TextStep, finished: Sequence[Any], *, policy_version: int = 0,
            env_steps: int = 0) -> list[EpisodeRecord]:
        """Record one vector step; return the episodes that ended at it, in env order.

        Args:
            step: the collector's ``TextStep`` (N envs).
            finished: the collector's ``EpisodeStats`` of this step (``env_index``, ``goal_category``, ``success``).
            policy_version: updates done when the step was acted.
            env_steps: the run's env-step count after the step.
        """
        if len(step.goals) != self.num_envs:
            raise ValueError(f"tracker built for {self.num_envs} envs got a step of {len(step.goals)}")
        stats = {int(s.env_index): s for s in finished}
        out: list[EpisodeRecord] = []
        for i in range(self.num_envs):
            run = self._running[i]
            if not run.actions:
                run.goal = step.goals[i]
                run.observations = [step.observations[i]]
            run.candidates.append(list(step.candidates[i]))
            run.actions.append(int(step.actions[i]))
            run.rewards.append(float(step.rewards[i]))
            run.achieved.append(list(step.achieved_goals[i]))
            run.policy_version.append(int(policy_version))
            run.observations.append(step.next_observations[i])
            if not (step.terminated[i] or step.truncated[i]):
                continue
            s = stats.get(i)
            out.append(EpisodeRecord(
                id=f"e{i}k{self._k[i]}", env_index=i, goal=run.goal,
                goal_category=str(getattr(s, "goal_category", "")), observations=run.observations,
                candidates=run.candidates, actions=run.actions, rewards=run.rewards, achieved=run.achieved,
                policy_version=run.policy_version, terminated=bool(step.terminated[i]),
                truncated=bool(step.truncated[i]), success=bool(getattr(s, "success", False)),
                env_step=int(env_steps)))
            self._running[i] = _Running()
            self._k[i] += 1
        return out

    def state_dict(self) -> dict[str, Any]:
        """The running episodes' text and the episode counters (for an exact resume)."""
        return {"k": list(self._k), "running": [asdict(r) for r in self._running]}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if len(state["k"]) != self.num_envs:
            raise ValueError(f"tracker state has {len(state['k'])} envs, this run has {self.num_envs}")
        self._k = [int(k) for k in state["k"]]
        self._running = [_Running(**r) for r in state["running"]]

    def drop_running(self) -> None:
        """Forget the running episodes (the envs were reset, as ``Collector.load_state_dict`` does without env
        state); ids stay unique since the counters move past them."""
        for i, run in enumerate(self._running):
            if run.actions:
                self._k[i] += 1
            self._running[i] = _Running()


__all__ = ["EpisodeRecord", "EpisodeTracker"]
