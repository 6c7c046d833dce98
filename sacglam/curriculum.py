"""A goal curriculum over goal categories by absolute learning progress (ALP), as in CURIOUS (Colas et al. 2019,
https://arxiv.org/abs/1810.06284) and MAGELLAN's online-ALP baseline (Gaven et al. 2025,
https://arxiv.org/abs/2502.07709).

Per goal category ``c``, the outcomes (success or not) of its finished *training* episodes are kept in two sliding
windows: the last ``window`` outcomes and the ``window`` before them. Then::

    ALP_c = |mean(recent) - mean(older)|      (0 until c has 2 * window outcomes: no estimate from half-full windows)
    eps   = eps_start * (1 - f) + eps_end * f,  f = min(1, episodes / anneal_episodes)  (f = 1 if anneal is 0)
    p_c   = eps / |C| + (1 - eps) * ALP_c / sum(ALP)                                  (uniform when sum(ALP) == 0)

``episodes`` counts every training episode the curriculum was fed (over all ranks of a data-parallel run). Before a
category has two full windows its ALP is 0 rather than a difference of a few outcomes (noise); the uniform share
``eps`` (1.0 at the start by default) and the uniform fallback cover that time.

The curriculum draws nothing itself: ``train.py`` pushes ``p`` to every training env (``set_goal_weights``) at the
start and after every vector step in which an episode ended (on any rank: every rank feeds the same pooled episodes,
in rank order, so all hold the same statistics and push the same ``p``). The env's own seeded generator then draws
the category at each later reset; the envs that auto-reset within the step that changed ``p`` drew with the one
before (a one-step lag). No RNG is used here, so a resumed run, with this object's ``state_dict`` and the envs'
pickled state, draws the same categories.

The issue asked for the category through the ``goal_category`` reset option; vector envs auto-reset without options,
so the env is given the weights instead, which is the same distribution.

This module is pure (numpy only): it imports neither torch nor the envs.
Its options (:class:`CurriculumConfig`, ``KINDS``) live in the light ``sacglam.config`` (the Hydra schema) and are
re-exported here.
"""

from __future__ import annotations

import warnings
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Protocol

import numpy as np

from sacglam.config import KINDS, CurriculumConfig


class EpisodeLike(Protocol):
    """What the curriculum reads of a finished episode (``collector.EpisodeStats``)."""

    goal_category: str
    success: bool


class ALPCurriculum:
    """Absolute-learning-progress sampling probabilities over goal categories.

    Example::

        curriculum = ALPCurriculum(["grasp", "grow_plant"], CurriculumConfig(kind="alp", window=2))
        curriculum.update(finished)            # EpisodeStats of the episodes that ended (all ranks')
        vec.call("set_goal_weights", curriculum.weights())

    Attributes:
        categories: the goal categories, in the env's order.
        episodes: training episodes fed so far (the clock of the eps schedule).
    """

    def __init__(self, categories: Sequence[str], cfg: CurriculumConfig) -> None:
        if not categories or len(set(categories)) != len(categories):
            raise ValueError(f"the curriculum needs distinct goal categories, got {list(categories)}")
        self.categories = list(categories)
        self.cfg = cfg
        self.episodes = 0
        # The last 2 * window outcomes of each category: older window first, recent window last.
        self._outcomes: dict[str, deque[bool]] = {c: deque(maxlen=2 * cfg.window) for c in self.categories}

    def update(self, episodes: Iterable[EpisodeLike]) -> None:
        """Add the outcomes of finished training episodes, in order.

        Raises:
            ValueError: an episode's category is not one of ``categories`` (names both).
        """
        for e in episodes:
            window = self._outcomes.get(e.goal_category)
            if window is None:
                raise ValueError(f"a training episode has goal category {e.goal_category!r}, which the curriculum "
                                 f"does not know (categories {self.categories})")
            window.append(bool(e.success))
            self.episodes += 1

    def eps(self) -> float:
        """The uniform share: linear from ``eps_start`` to ``eps_end`` over ``anneal_episodes``, then constant."""
        c = self.cfg
        frac = 1.0 if c.anneal_episodes == 0 else min(1.0, self.episodes / c.anneal_episodes)
        return c.eps_start * (1.0 - frac) + c.eps_end * frac  # (exactly eps_start at 0 and eps_end from the end)

    def alp(self) -> np.ndarray:
        """``[|C|]`` float64: |mean(recent window) - mean(older window)| per category; 0 while it has fewer than
        ``2 * window`` outcomes."""
        w = self.cfg.window
        out = np.zeros(len(self.categories))
        for i, c in enumerate(self.categories):
            seen = self._outcomes[c]
            if len(seen) == 2 * w:
                outcomes = np.fromiter(seen, dtype=np.float64, count=2 * w)
                out[i] = abs(outcomes[w:].mean() - outcomes[:w].mean())
        return out

    def probabilities(self) -> np.ndarray:
        """``[|C|]`` float64 summing to 1: ``eps / |C| + (1 - eps) * ALP / sum(ALP)`` (uniform when sum(ALP) == 0)."""
        n = len(self.categories)
        alp = self.alp()
        total = alp.sum()
        if total == 0:
            return np.full(n, 1.0 / n)
        eps = self.eps()
        return eps / n + (1.0 - eps) * alp / total

    def weights(self) -> dict[str, float]:
        """``probabilities()`` by category, as the envs' ``set_goal_weights`` takes them."""
        return dict(zip(self.categories, self.probabilities().tolist(), strict=True))

    def metrics(self) -> dict[str, float]:
        """``curriculum/p/<category>`` and ``curriculum/alp/<category>`` for the metrics line."""
        p, alp = self.probabilities(), self.alp()
        out = {f"curriculum/p/{c}": float(v) for c, v in zip(self.categories, p, strict=True)}
        out.update({f"curriculum/alp/{c}": float(v) for c, v in zip(self.categories, alp, strict=True)})
        return out

    def state_dict(self) -> dict[str, Any]:
        """The episode count and every category's kept outcomes (plain ints, bools and strings)."""
        return {"kind": "alp", "episodes": self.episodes,
                "outcomes": {c: list(seen) for c, seen in self._outcomes.items()}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a ``state_dict()`` (a smaller ``window`` keeps the newest outcomes).

        Raises:
            ValueError: the saved categories are not this run's (names both).
        """
        saved = list(state["outcomes"])
        if saved != self.categories:
            raise ValueError(f"the checkpoint's curriculum has goal categories {saved}, this run has "
                             f"{self.categories}; resume with the same env.kwargs.goal_categories")
        self.episodes = int(state["episodes"])
        for c in self.categories:
            self._outcomes[c].clear()
            self._outcomes[c].extend(bool(x) for x in state["outcomes"][c])


def make_curriculum(cfg: CurriculumConfig, env: Any, env_id: str,
                    env_kwargs: Mapping[str, Any]) -> ALPCurriculum | None:
    """The run's curriculum over ``env.goal_categories``, or None for ``uniform`` (the envs draw as they always did).

    Args:
        cfg: the ``curriculum`` group.
        env: one training env (the run's probe), to check for ``set_goal_weights`` and read its categories.
        env_id: its id, for the messages.
        env_kwargs: the training envs' kwargs (``goal_weights`` there would be overridden).

    Raises:
        ValueError: ``alp`` with an env that cannot be reweighted, or with ``env.kwargs.goal_weights`` set.
    """
    if cfg.kind == "uniform":
        return None
    if not callable(getattr(env, "set_goal_weights", None)):
        raise ValueError(f"curriculum={cfg.kind} needs an env with set_goal_weights(weights) to reweight its goal "
                         f"categories; {env_id} ({type(env).__name__}) has none: use curriculum=uniform")
    if env_kwargs.get("goal_weights") is not None:
        raise ValueError(f"curriculum={cfg.kind} sets the goal-category weights itself, but env.kwargs.goal_weights="
                         f"{env_kwargs['goal_weights']} is set too: drop one of them")
    return ALPCurriculum(list(env.goal_categories), cfg)


def resume_curriculum(curriculum: ALPCurriculum | None, saved: Mapping[str, Any] | None, path: Any) -> None:
    """Restore the run's curriculum from a checkpoint's ``"curriculum"`` entry.

    A checkpoint without one (written before the curriculum existed, or by a ``uniform`` run) starts ``alp`` from
    empty windows, with a warning.

    Raises:
        ValueError: an ``alp`` checkpoint resumed with ``uniform``: its envs were pickled with the curriculum's
            weights, so they would go on drawing from its last ``p``.
    """
    if curriculum is None:
        if saved is not None:
            raise ValueError(f"{path} was written with curriculum={saved.get('kind')}, whose goal weights its envs "
                             f"keep; resume it with curriculum={saved.get('kind')}")
        return
    if saved is None:
        warnings.warn(f"{path} holds no curriculum state (written before curriculum existed, or with "
                      f"curriculum=uniform); curriculum={curriculum.cfg.kind} starts from empty windows", stacklevel=2)
        return
    curriculum.load_state_dict(saved)


__all__ = ["KINDS", "ALPCurriculum", "CurriculumConfig", "EpisodeLike", "make_curriculum", "resume_curriculum"]
