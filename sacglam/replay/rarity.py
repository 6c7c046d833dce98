"""Rarity marks of the replay buffer (``her.rarity_draws``, ``her.rare_fraction``): achievements counted per goal
(``GoalTable.goal_count``), per row the rarest goal achieved within its step limit later in the row's episode
(``ReplayStorage.rare_goal``), and the sampling weights ``1 / count`` that ``her.rare_fraction`` draws rows by.

The marks are kept by the torch writer (``mark_rare``, per add) and by ``set_achieved`` (``remark_rare``, per
episode); the native writer computes ``mark_rare`` in C. This module imports torch only.
"""

from __future__ import annotations

import torch

from sacglam.replay.goals import GoalTable
from sacglam.replay.storage import ReplayStorage

_BIG = torch.iinfo(torch.int64).max


def mark_rare(store: ReplayStorage, goals: GoalTable, row: int, achieved: torch.Tensor,
              achieving: torch.Tensor) -> None:
    """Count one step's achievements and mark the rows that lead to its rarest one (no synchronisation).

    The rows of the running episode at most ``limit - 1`` steps before this one (``limit`` = the goal's step limit,
    or the largest known when unset) and this row get ``rare_goal = g`` unless they already lead to a goal achieved
    fewer times. Call it before the per-env bookkeeping (``cur_step``) moves on.

    Args:
        store: the storage.
        goals: the goal table (counts and limits).
        row: the storage row just written.
        achieved: [N, G] long goal ids achieved by the step, left-aligned, padded with -1.
        achieving: [N] bool, the step achieved something.
    """
    C = store.capacity_per_env
    valid = achieved >= 0
    ids = achieved.clamp(min=0)
    goals.goal_count.index_add_(0, ids.view(-1), valid.view(-1).long())
    count = torch.where(valid, goals.goal_count.index_select(0, ids.view(-1)).view_as(ids), _BIG)  # [N, G]
    g_count, best = count.min(1)  # the first of ties, as argmin
    g = ids.gather(1, best.unsqueeze(1)).squeeze(1)  # [N] the rarest achieved goal
    limit = goals.goal_limit.index_select(0, g)
    limit = torch.where(limit > 0, limit, goals.max_limit)
    back = torch.arange(min(goals.max_limit, C), device=store.device).unsqueeze(1)  # [W, 1] steps back
    rows = (row - back.squeeze(1)) % C  # [W] rows of this episode's last W steps (episodes fit in C rows)
    ok = achieving & (back <= store.cur_step) & (back < limit)  # [W, N]
    store.rare_goal[row] = -1  # the row was just overwritten: forget the old episode's mark
    old = store.rare_goal.index_select(0, rows).long()  # [W, N]
    old_count = torch.where(old >= 0, goals.goal_count.index_select(0, old.clamp(min=0).view(-1)).view_as(old), _BIG)
    take = ok & (g_count < old_count)  # where nothing was achieved, g_count is big and ok is False
    store.rare_goal.index_copy_(0, rows, torch.where(take, g, old).to(torch.int32))


def remark_rare(store: ReplayStorage, goals: GoalTable, env: int, rows: torch.Tensor, old: torch.Tensor,
                new: torch.Tensor, achieving: torch.Tensor) -> None:
    """``set_achieved``'s rarity update: recount and mark one episode's rows anew.

    ``goal_count`` loses the episode's old achievements and gains the new ones; then each row r of the episode
    gets, as ``mark_rare`` would with these (now fixed) counts, the rarest goal g*(t') of the achieving step t'
    >= r with t' - r < limit(g*(t')) that has the fewest achievements, the earliest such t' among ties (-1:
    none). g*(t') is the step's goal achieved fewest times (the first of ties).

    Args:
        store: the storage.
        goals: the goal table (counts and limits).
        env: the column.
        rows: [L] storage rows of the episode, in step order.
        old: [L, G] long, the ids stored before (-1 padded).
        new: [L, G] long, the new ids, left-aligned, -1 padded.
        achieving: [L] bool, the step achieves something under ``new``.
    """
    L, dev = rows.shape[0], store.device
    count = goals.goal_count
    for ids, sign in ((old, -1), (new, 1)):
        count.index_add_(0, ids.clamp(min=0).view(-1), (ids >= 0).view(-1).long() * sign)
    steps = achieving.nonzero().squeeze(1)  # [A] achieving steps (a host synchronisation)
    if steps.numel() == 0:
        store.rare_goal[rows, env] = -1
        return
    ids = new.index_select(0, steps)  # [A, G]
    c = torch.where(ids >= 0, count.index_select(0, ids.clamp(min=0).view(-1)).view_as(ids), _BIG)
    g_count, best = c.min(1)  # [A] the count of each achieving step's rarest goal (the first of ties, as add)
    g = ids.gather(1, best.unsqueeze(1)).squeeze(1)  # [A]
    limit = goals.goal_limit.index_select(0, g)
    limit = torch.where(limit > 0, limit, goals.max_limit)  # <= max_limit; t' - r < L <= C needs no cap
    back = steps.unsqueeze(0) - torch.arange(L, device=dev).unsqueeze(1)  # [L, A] t' - r
    # Fewest achievements first, then the earliest step (add keeps a mark unless a later step is strictly rarer).
    key = torch.where((back >= 0) & (back < limit), g_count * L + steps, _BIG)  # [L, A]
    best_key, pick = key.min(1)
    store.rare_goal[rows, env] = torch.where(best_key < _BIG, g.index_select(0, pick), -1).to(torch.int32)


def rare_weights(store: ReplayStorage, goals: GoalTable, w: torch.Tensor) -> torch.Tensor:
    """Per-row weights [C * N] float64 of ``her.rare_fraction`` sampling: ``1 / count`` of the row's rare goal on
    sampleable rows (a tiny floor keeps the total positive), 0 elsewhere.

    Args:
        store: the storage.
        goals: the goal table (counts).
        w: [N] long, sampleable rows per column (``cur_start - lo``).
    """
    # Sampleable rows: absolute positions [lo, cur_start) of each column, stored at position % C.
    C = store.capacity_per_env
    offset = (torch.arange(C, device=store.device).unsqueeze(1) - store.lo) % C  # [C, N]
    sampleable = (offset < w).to(torch.float64)
    g = store.rare_goal.long()
    inv = 1.0 / goals.goal_count.index_select(0, g.clamp(min=0).view(-1)).view_as(g).clamp(min=1)
    # Uniform over sampleable rows when none leads to anything.
    return ((torch.where(g >= 0, inv, 0.0) + 1e-30) * sampleable).view(-1)


__all__ = ["mark_rare", "rare_weights", "remark_rare"]
