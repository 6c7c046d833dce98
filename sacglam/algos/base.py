"""What the shared step loop (``train.py``) asks of an algorithm: the :class:`Learner` protocol.

SAC (:class:`sacglam.algos.sac.learner.SACLearner`) and PPO (:class:`sacglam.algos.ppo.learner.PPOLearner`)
implement it structurally (no inheritance). ETO does not: its rounds of explore -> pair -> DPO are not a step loop, and
``sacglam.algos.eto.run.run_eto`` drives them through the same run harness (``sacglam.run.harness``).

A learner is built for one process of the run (``sacglam.run.builders.make_learner(..., dist=...)``): it is given the
run's :class:`sacglam.distributed.Dist` and its per-rank shares at construction, so the loop never patches it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

import torch

from sacglam.episodes import EpisodeRecord
from sacglam.types import ActFn, TextStep, UpdateStats

Gather = Callable[[Any], list[Any]]
"""``Dist.gather``: one object per process -> the list of every process's object (a collective)."""


@runtime_checkable
class Learner(Protocol):
    """The part of the step loop that is the algorithm's.

    The loop, once per vector step: ``collector.step()`` acts through :attr:`act`; the finished episodes are recorded
    with ``policy_version=updates``; :meth:`observe` stores the step and updates when it is time; its stats and
    :meth:`extra_metrics` go into the step's metrics row. Checkpoints hold :meth:`state_dict` and the states of
    :attr:`generators` (restored by name on resume, so the RNG draws continue exactly).
    """

    @property
    def generators(self) -> Mapping[str, torch.Generator]:
        """Every generator the learner draws from, by a name stable across versions (checkpointed by that name)."""
        ...

    @property
    def act(self) -> ActFn:
        """The collector's act function (samples with ``generators["act"]``)."""
        ...

    @property
    def updates(self) -> int:
        """Completed optimizer updates (the policy version of the data collected next)."""
        ...

    def observe(self, step: TextStep, episodes: Sequence[EpisodeRecord] = ()) -> UpdateStats:
        """Store one vector step (and the episodes that ended at it); update when it is time.

        Returns:
            The last update's scalar stats (0-d tensors by metric name), or {} when no update ran.
        """
        ...

    def extra_metrics(self, gather: Gather) -> dict[str, float]:
        """Metrics of the learner's own beyond the update stats, called on steps where some episode ended and once
        at the end of the run; {} for a learner that has none.

        ``gather`` is ``Dist.gather``, a collective: an implementation that calls it must do so on every call (the
        loop calls this method on every rank together), so that all processes take part.
        """
        ...

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue exactly (optimizers, stored data), without the generators."""
        ...

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`'s output."""
        ...


__all__ = ["Gather", "Learner"]
