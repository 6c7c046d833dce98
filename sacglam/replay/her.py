"""Hindsight experience replay for text goals: goal strategies, the relabelling of a sampled batch, a reward over
goal ids and n-step returns.

Everything here runs on tensors of the sampled batch, on its device, with no host-device synchronisation; the torch
sampler (``sacglam.replay.sampler``) gathers the stored rows and calls ``relabel`` (and ``n_step_window``) on them.
Storage is never modified: relabelling changes the sampled copy only (docs/design/ALGORITHM.md section 4). The reward
comes from a function over goal ids, never from an env object, so a buffer can be saved and resumed without its env (a
choice SB3's HER does not make). The sources come from the storage's ``ranks`` table (at row start + r: the r-th
achieving step's index t', its goal count, max(count - 1, 0) and goals), so a relabelled goal is one gather away.

``Batch.goal_gap`` is t' - t for relabelled rows and -1 otherwise. With ``her.strategy`` ``final`` or ``episode`` the
source step can precede t, so a relabelled row can carry a negative gap too: a hindsight supervised term
(docs/design/ALGORITHM.md section 9) must select ``relabelled & (goal_gap >= 0)``.

This module imports torch only.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sacglam.replay.config import STRATEGIES, HERConfig, Strategy
from sacglam.types import RewardFn


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


@dataclass
class Relabelled:
    """A sampled batch after relabelling: the goal per row [B] long, whether it was relabelled [B] bool, t' - t of
    its source (-1 where not relabelled) [B] long, and the window's rewards [B, n] float32 and terminations [B, n]
    bool for that goal."""

    goal: torch.Tensor
    relabelled: torch.Tensor
    goal_gap: torch.Tensor
    reward: torch.Tensor
    terminated: torch.Tensor


def pick_source(
    her: HERConfig, draws: torch.Tensor, z: torch.Tensor, t: torch.Tensor, count_before: torch.Tensor,
    count_total: torch.Tensor, ranks_flat: torch.Tensor, goal_count: torch.Tensor, n_envs: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each sampled row's relabelling source: a ``ranks`` entry of its episode and one goal achieved there.

    With ``her.rarity_draws`` m > 1, m sources are drawn and the goal achieved fewest times wins (argmin takes the
    first of ties).

    Args:
        her: the options (strategy, rarity_draws).
        draws: [B, 3 + m] float64 uniforms (column 2 the rank draw, 3 the goal-in-step draw, 4.. the other m - 1
            rank draws).
        z: [B] long, ``a * N + col`` of each sampled step (only used modulo C * N).
        t: [B] int32, the sampled step's index in its episode.
        count_before: [B] int32, achieving steps of the episode before t; count_total: [B] int32, in the episode.
        ranks_flat: [C * N, 3 + G] int32, the storage's ``ranks`` table.
        goal_count: [max_goals] long, achievements per goal (read when m > 1).
        n_envs: N.

    Returns:
        src: [B, 3 + G] int32, the source entry (column 0 its step t'); new_goal: [B] int32 (>= 0 where eligible);
        eligible: [B] bool, the strategy has a goal to offer.
    """
    N, CN, B, m = n_envs, ranks_flat.shape[0], draws.shape[0], her.rarity_draws
    if m == 1:
        rank, eligible = pick_achieving_rank(her.strategy, count_before, count_total, draws[:, 2])
        src = ranks_flat.index_select(0, torch.add(z, rank - t, alpha=N) % CN)  # [B, 3 + G]
        # pick_goal_of_step on the source step's goals, with count and max(count - 1, 0) precomputed by add.
        q = torch.minimum((draws[:, 3] * src[:, 1]).long(), src[:, 2])
        return src, src[:, 3:].gather(1, q.unsqueeze(1)).squeeze(1), eligible
    u = torch.cat([draws[:, 2:3], draws[:, 4:]], 1)  # [B, m]
    rank, eligible = pick_achieving_rank(her.strategy, count_before[:, None], count_total[:, None], u)
    srcs = ranks_flat.index_select(0, (torch.add(z.unsqueeze(1), rank - t.unsqueeze(1), alpha=N)
                                       % CN).view(-1)).view(B, m, -1)  # [B, m, 3 + G]
    q = torch.minimum((draws[:, 3:4] * srcs[:, :, 1]).long(), srcs[:, :, 2])
    goals = srcs[:, :, 3:].gather(2, q.unsqueeze(2)).squeeze(2)  # [B, m]
    count = goal_count.index_select(0, goals.clamp(min=0).view(-1).long()).view(B, m)
    best = count.argmin(1, keepdim=True)  # [B, 1]
    src = srcs.gather(1, best.unsqueeze(2).expand(B, 1, srcs.shape[2])).squeeze(1)
    return src, goals.gather(1, best).squeeze(1), eligible[:, 0]


def relabel(
    her: HERConfig, reward_fn: RewardFn, draws: torch.Tensor, z: torch.Tensor, row: dict[str, torch.Tensor],
    window: dict[str, torch.Tensor], ranks_flat: torch.Tensor, goal_count: torch.Tensor, n_envs: int,
) -> Relabelled:
    """Relabel sampled rows with probability ``her.ratio`` (where the strategy offers a goal), recomputing the
    window's rewards and terminations for the new goal with ``reward_fn``.

    Args:
        her: the options; reward_fn: reward and termination over goal ids.
        draws: [B, 3 + m] float64 uniforms (column 1 the relabel coin; see ``pick_source``).
        z: [B] long, ``a * N + col`` of each sampled step.
        row: the sampled step's ``t``, ``goal`` (stored), ``count_before`` and ``count_total`` [B] int32.
        window: the n-step window's stored ``achieved`` [B, n, G] int32, ``reward`` [B, n] float32 and
            ``terminated`` [B, n] bool.
        ranks_flat, goal_count, n_envs: as ``pick_source``.
    """
    t = row["t"]
    src, new_goal, eligible = pick_source(her, draws, z, t, row["count_before"], row["count_total"], ranks_flat,
                                          goal_count, n_envs)
    # An eligible source is an achieving step: its picked goal is >= 0 (the check pick_goal_of_step needs).
    relabelled = (draws[:, 1] < her.ratio) & eligible
    goal = torch.where(relabelled, new_goal, row["goal"]).long()
    B, n, G = window["achieved"].shape
    achieved = window["achieved"].long().view(B * n, G)
    r_new, term_new = reward_fn(achieved, goal if n == 1 else goal.repeat_interleave(n))
    rel = relabelled.unsqueeze(1)
    reward = torch.where(rel, r_new.view(B, n).to(torch.float32), window["reward"])
    term = torch.where(rel, term_new.view(B, n).bool(), window["terminated"])
    goal_gap = torch.where(relabelled, src[:, 0] - t, -1).long()
    return Relabelled(goal, relabelled, goal_gap, reward, term)


__all__ = [
    "STRATEGIES",
    "HERConfig",
    "Relabelled",
    "RewardFn",
    "Strategy",
    "equality_reward",
    "n_step_window",
    "pick_achieving_rank",
    "pick_goal_of_step",
    "pick_source",
    "relabel",
]
