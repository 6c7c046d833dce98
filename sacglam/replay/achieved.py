"""Achieved goals known only after the episode (``relabel.source=rule|llm``, a judge reading the whole episode):
rewriting a finished episode's stored achieved ids and every table derived from them.

The steps are added with ``achieved`` all -1, and once the episode has ended ``set_achieved(..., env, start,
achieved)`` (start from the buffer's ``episode_start(env)`` before its first add) rewrites the stored ids,
``ach_before``, ``ranks``, ``ep_ach`` and, with a rarity option, ``goal_count`` and the episode's ``rare_goal``
marks in place, so the torch and the native samplers read them as if ``add`` had received them (exactly so without
rarity; the marks use the counts at that call). It refuses a running episode and returns False when the ring has
already overwritten the episode's first row.

This module imports torch only.
"""

from __future__ import annotations

import torch

from sacglam.replay.config import BufferConfig
from sacglam.replay.goals import GoalTable
from sacglam.replay.rarity import remark_rare
from sacglam.replay.storage import ACHB, EPK, F, ReplayStorage, T, rank_values


def _as_ids(achieved: torch.Tensor, max_achieved: int) -> torch.Tensor:
    """``achieved`` as a tensor, checked to be 2-D integer ids no wider than ``max_achieved``."""
    if not isinstance(achieved, torch.Tensor):
        achieved = torch.as_tensor(achieved)
    if achieved.dim() != 2 or achieved.is_floating_point() or achieved.is_complex() or achieved.dtype == torch.bool:
        raise ValueError(f"set_achieved: achieved must be a 2-D [L, G'] integer tensor of goal ids, got shape "
                         f"{tuple(achieved.shape)} dtype {achieved.dtype}")
    if achieved.shape[1] > max_achieved:
        raise ValueError(f"set_achieved: achieved has width {achieved.shape[1]} > max_achieved={max_achieved}; set "
                         f"buffer max_achieved >= {achieved.shape[1]}")
    return achieved


def _intact(store: ReplayStorage, n_goals: int, env: int, start: int, ach: torch.Tensor) -> torch.Tensor | None:
    """The episode's row of ``eps_flat`` (a 0-d int32 tensor), or None when its first row was overwritten.

    One host synchronisation reads the column's bookkeeping, the stored row at ``start``, the length of its episode
    and the range of the new ids ``ach`` [L, G'] long.

    Raises:
        ValueError: an id outside [-1, n_goals), the episode not finished, ``start`` not its first step, or L not its
            stored length.
    """
    C, L = store.capacity_per_env, ach.shape[0]
    row0 = start % C
    epk = store.rows[row0, env, EPK]
    no_ach = torch.full((), -1, dtype=torch.long, device=store.device)
    a_min, a_max = torch.aminmax(ach) if ach.numel() else (no_ach, no_ach)
    cur_start, lo, step0, ep_len, a_min_h, a_max_h = torch.stack([
        store.cur_start[env], store.lo[env], store.rows[row0, env, T].long(),
        store.eps_flat[epk.long(), 0].long(), a_min, a_max]).tolist()
    if a_min_h < -1 or a_max_h >= n_goals:
        raise ValueError(f"set_achieved: achieved holds an id outside [-1, {n_goals}) (padding is -1): "
                         f"min {a_min_h}, max {a_max_h}; register achieved goals with register_goal first")
    if start >= cur_start:
        raise ValueError(f"set_achieved: env {env}'s episode starting at {start} is not finished (the running "
                         f"episode started at {cur_start}, pos = {store.pos}); call it once the episode's last "
                         f"step (terminated or truncated) has been added")
    if start < lo or start < store.pos - C:
        return None  # its first row was overwritten: the episode is gone from the sampleable window
    if step0 != 0:
        raise ValueError(f"set_achieved: position {start} holds step {step0} of an episode of env {env}, not "
                         f"its first step; pass the position of the episode's first step (episode_start)")
    if ep_len != L:
        raise ValueError(f"set_achieved: achieved has {L} rows but env {env}'s episode starting at {start} "
                         f"has {ep_len} stored steps")
    return epk


def set_achieved(cfg: BufferConfig, store: ReplayStorage, goals: GoalTable, env: int, start: int,
                 achieved: torch.Tensor) -> bool:
    """Replace the achieved goal ids of env ``env``'s finished episode whose first step was added at absolute
    position ``start``; see ``ReplayBuffer.set_achieved`` (the arguments, the result and the errors).

    Afterwards every table is what ``add`` would have left had the episode been added with these ids: the stored ids
    (left-aligned as ``add`` aligns them), ``ach_before``, the "r-th achieving step" table ``ranks``, the episode's
    ``ep_ach`` and, with ``her.counts_goals``, ``goal_count`` (the episode's old achievements subtracted, the new ones
    added) and the episode's ``rare_goal`` marks. The marks are computed with the goal counts (and step limits) at the
    time of this call, not with the counts each step would have seen when added one by one, so they can differ from an
    incremental ``add`` of the same ids; other episodes' marks are left as they are.

    Cost: O(L * G) elementwise work in about 35 small tensor ops and one host synchronisation (two with
    ``her.counts_goals``, whose marks take O(L * A) for the episode's A achieving steps).
    """
    dev, C, G = store.device, store.capacity_per_env, cfg.max_achieved
    if not 0 <= env < store.n_envs:
        raise ValueError(f"set_achieved: env {env} is outside [0, n_envs={store.n_envs})")
    achieved = _as_ids(achieved, G)
    L, width = achieved.shape
    if start < 0:
        raise ValueError(f"set_achieved: start {start} < 0 is no absolute position")
    ach = achieved.to(dev).long()
    epk = _intact(store, goals.n_goals, env, start, ach)
    if epk is None:
        return False
    # Left-align the ids (valid first, stable) and pad them to G, as add stores them.
    ach = ach.gather(1, torch.sort((ach < 0).to(torch.uint8), dim=1, stable=True).indices)
    if width < G:
        ach = torch.cat([ach, ach.new_full((L, G - width), -1)], 1)
    rows = (start + torch.arange(L, device=dev)) % C  # [L] storage rows of the episode
    achieving = (ach >= 0).any(1)  # [L]
    n_before = torch.cumsum(achieving, 0, dtype=torch.int32) - achieving.to(torch.int32)  # [L] ach_before
    # Step indices of the achieving steps first (in time order), then the others: rank r's entry for r < A.
    order = torch.sort((~achieving).to(torch.uint8), stable=True).indices  # [L]
    n_ach = achieving.sum(dtype=torch.int32)
    ranks = torch.where((torch.arange(L, device=dev) < n_ach).unsqueeze(1),
                        rank_values(order.to(torch.int32), ach.index_select(0, order).to(torch.int32)),
                        store.rank_reset)  # [L, 3 + G]
    old = store.rows[rows, env, F:].long() if cfg.her.counts_goals else None  # [L, G] the replaced ids
    store.rows[rows, env, F:] = ach.to(torch.int32)
    store.rows[rows, env, ACHB] = n_before
    store.ranks[rows, env] = ranks
    store.eps_flat[epk.long(), 1] = n_ach
    if old is not None:
        remark_rare(store, goals, env, rows, old, ach, achieving)
    return True


__all__ = ["set_achieved"]
