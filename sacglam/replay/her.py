"""Hindsight experience replay for text goals: goal strategies, a reward over goal ids and n-step returns.

Everything here runs on tensors of the sampled batch, on its device, with no host-device synchronisation; the
replay buffer (``sacglam.replay.buffer``) gathers the stored rows and calls these functions. Storage is never modified:
relabelling changes the sampled copy only (docs/design/ALGORITHM.md section 4). The reward comes from a function over
goal ids,
never from an env object, so a buffer can be saved and resumed without its env (a choice SB3's HER does not make).

This module imports torch only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from sacglam.types import RewardFn

Strategy = Literal["future", "final", "episode"]
STRATEGIES: tuple[str, ...] = ("future", "final", "episode")


@dataclass
class HERConfig:
    """Hindsight relabelling options.

    Attributes:
        strategy: which achieved goal replaces the stored one. ``future``: a goal achieved at a step t' >= t of the
            same episode (uniform over the achieving steps); ``final``: a goal achieved at the episode's last achieving
            step (it may precede t, then t' - t < 0); ``episode``: a goal achieved at any step of the episode.
        ratio: probability that a sampled transition is relabelled (0.8 = SB3's 4 relabelled per real sample).
            Transitions with no eligible achieved goal keep their goal.
        rarity_draws: m achieving steps drawn per relabelled transition; the goal achieved fewest times so far (over
            the whole run, counted by the buffer) wins, ties to the first draw. 1 = plain HER. Rare achievements
            (growing a plant among hundreds of grasps) then become the relabel goal whenever the episode offers one.
        rare_fraction: fraction of each batch drawn not uniformly but in proportion to ``1 / count(g)``, where g is
            the rarest goal achieved within its step limit after the row, in the same episode (rows with none are
            drawn only when nothing else is stored). 0 = uniform sampling. Prioritised replay of what was rarely
            achieved: the few transitions that lead to a rare goal are replayed far more often than uniform sampling
            would, while the rest of the batch stays uniform.
    """

    strategy: str = "future"  # future | final | episode
    ratio: float = 0.8  # in [0, 1]; 0 disables HER
    rarity_draws: int = 1  # >= 1; m draws, the rarest goal wins
    rare_fraction: float = 0.0  # in [0, 1]; share of the batch sampled by rarity

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise ValueError(f"her.strategy must be one of {STRATEGIES}, got {self.strategy!r}")
        if not 0.0 <= self.ratio <= 1.0:
            raise ValueError(f"her.ratio must be in [0, 1], got {self.ratio}")
        if self.rarity_draws < 1:
            raise ValueError(f"her.rarity_draws must be >= 1, got {self.rarity_draws}")
        if not 0.0 <= self.rare_fraction <= 1.0:
            raise ValueError(f"her.rare_fraction must be in [0, 1], got {self.rare_fraction}")

    @property
    def counts_goals(self) -> bool:
        """Whether the buffer must count achievements per goal (a rarity option is on)."""
        return self.rarity_draws > 1 or self.rare_fraction > 0


def equality_reward(achieved: torch.Tensor, goal: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The default reward over goal ids: 1 and terminated iff ``goal`` is among the goals newly achieved by the step.

    Args:
        achieved: [..., G] goal ids achieved by the step, padded with -1.
        goal: [...] goal ids.

    Returns:
        reward: [...] float32 (0 or 1); terminated: [...] bool.
    """
    hit = (achieved == goal.unsqueeze(-1)).any(-1) & (goal >= 0)
    return hit.to(torch.float32), hit


def pick_achieving_rank(
    strategy: str, count_before: torch.Tensor, count_total: torch.Tensor, u: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Choose, per sampled transition, the rank r of the achieving step whose goal becomes the new goal.

    Achieving steps of an episode are numbered 0, 1, ... in time order; the transition at step t has
    ``count_before`` of them strictly before t and ``count_total`` in its whole episode.

    Args:
        strategy: ``future``, ``final`` or ``episode``.
        count_before: [B] long, achieving steps of the episode before step t.
        count_total: [B] long, achieving steps in the whole episode.
        u: [B] float uniforms in [0, 1).

    Returns:
        rank: [B] long (meaningless where not eligible, but always a valid index >= 0);
        eligible: [B] bool, the strategy has a goal to offer.
    """
    if strategy == "future":
        lo, hi = count_before, count_total
    elif strategy == "episode":
        lo, hi = torch.zeros_like(count_total), count_total
    elif strategy == "final":
        lo, hi = (count_total - 1).clamp(min=0), count_total
    else:
        raise ValueError(f"her.strategy must be one of {STRATEGIES}, got {strategy!r}")
    eligible = hi > lo
    span = (hi - lo).clamp(min=1)
    # floor(u * span) < span for u < 1; the minimum guards the float rounding of u * span near the top.
    # rank >= lo >= 0 (no clamp needed).
    rank = lo + torch.minimum((u * span).long(), span - 1)
    return rank, eligible


def pick_goal_of_step(achieved: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """One achieved goal per row, uniformly among its valid (>= 0, left-aligned) entries.

    Args:
        achieved: [B, G] goal ids, valid entries first, padded with -1.
        u: [B] float uniforms in [0, 1).

    Returns:
        goal: [B] long (-1 where the row has no achieved goal).
    """
    count = (achieved >= 0).sum(-1)  # [B]
    q = torch.minimum((u * count).long(), (count - 1).clamp(min=0))
    return achieved.gather(1, q.unsqueeze(1)).squeeze(1).long()


def n_step_window(
    reward: torch.Tensor,
    terminated: torch.Tensor,
    steps_left: torch.Tensor,
    gamma: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The n-step return of a window of up to n steps starting at step t, cut at termination and at episode end.

    Args:
        reward: [B, n] float, r_{t+j} for the (possibly relabelled) goal (anything past the episode end is ignored).
        terminated: [B, n] bool, termination at step t+j for that goal.
        steps_left: [B] long >= 1, steps from t to the episode's end inclusive (L - t).
        gamma: discount.

    Returns:
        ret: [B] float, sum_{j<k} gamma^j r_{t+j}.
        discount: [B] float, gamma^k * (1 - terminated_end): a termination never bootstraps, a time limit does.
        k: [B] long, the realised window length (1 <= k <= n).
        term_end: [B] bool, the window ended with a termination.
        trunc_end: [B] bool, the window ended at the episode's end without termination (bootstraps).
    """
    n = reward.shape[1]
    j = torch.arange(n, device=reward.device).unsqueeze(0)  # [1, n]
    at_end = j == (steps_left.unsqueeze(1) - 1)  # the episode's last step
    stop = terminated | at_end | (j == n - 1)
    k = stop.to(torch.uint8).argmax(1) + 1  # argmax returns the first maximum: the first stop
    in_window = j < k.unsqueeze(1)
    powers = gamma ** j.to(reward.dtype)
    ret = (reward * powers * in_window).sum(1)
    last = (k - 1).unsqueeze(1)
    term_end = terminated.gather(1, last).squeeze(1)
    trunc_end = at_end.gather(1, last).squeeze(1) & ~term_end
    discount = (gamma ** k.to(reward.dtype)) * (~term_end).to(reward.dtype)
    return ret, discount, k.long(), term_end, trunc_end


__all__ = [
    "STRATEGIES",
    "HERConfig",
    "RewardFn",
    "equality_reward",
    "n_step_window",
    "pick_achieving_rank",
    "pick_goal_of_step",
]
