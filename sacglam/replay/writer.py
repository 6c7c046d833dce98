"""Writing steps into the replay storage with torch ops (``TorchWriter``), and the checks every writer shares.

A writer stores one step of all N envs per ``add``: the row fields, the derived columns of ``rows``, the HER source
table ``ranks``, the episode table, the rarity marks, then moves the per-env bookkeeping and the write pointer on.
``add`` advances ``lo`` when the ring overwrites a row, so an episode whose start was overwritten is never sampled nor
used as a relabelling source. ``sacglam.replay.native.NativeWriter`` does the same in one C call and gives the same
storage; this torch writer runs on GPUs and wherever the C code does not apply. A refused step leaves the storage
unchanged: every check runs before the first write.

This module imports torch only.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sacglam.replay.config import BufferConfig
from sacglam.replay.goals import GoalTable
from sacglam.replay.rarity import mark_rare
from sacglam.replay.storage import EPK, ReplayStorage, T, rank_values
from sacglam.types import TransitionBatch

_SHAPE_FIELDS = ("obs", "next_obs", "cands", "next_cands", "goal", "action", "reward", "terminated", "truncated",
                 "achieved", "logp", "policy_version")  # fmt: skip


def width_error(what: str, need: int, width: int, limit_name: str) -> ValueError:
    """The error for a token field of ``need`` tokens wider than the buffer's ``limit_name`` = ``width``."""
    return ValueError(f"{what} has {need} tokens > {limit_name}={width}; set buffer {limit_name} >= {need}")


def check_shapes(t: TransitionBatch, cfg: BufferConfig, n_envs: int) -> None:
    """Raise unless ``t`` carries ``n_envs`` envs and fits the buffer's candidate and achieved widths."""
    N = n_envs
    for name in _SHAPE_FIELDS:
        got = getattr(t, name).shape[0]
        if got != N:
            raise ValueError(f"add got TransitionBatch.{name} for {got} envs, but this buffer was built for "
                             f"n_envs={N}; add one step of all {N} envs at once (or build the buffer with "
                             f"n_envs={got})")
    for name in ("cands", "next_cands"):
        K = getattr(t, name).shape[1]
        if cfg.max_cands < K:
            raise ValueError(f"TransitionBatch.{name} has {K} candidate slots > max_cands={cfg.max_cands}; "
                             f"set buffer max_cands >= {K}")
    if t.achieved.shape[1] > cfg.max_achieved:
        raise ValueError(f"TransitionBatch.achieved has width {t.achieved.shape[1]} > max_achieved="
                         f"{cfg.max_achieved}; set buffer max_achieved >= {t.achieved.shape[1]}")


def check_step(cfg: BufferConfig, store: ReplayStorage, n_goals: int, stats: list[int], goal: torch.Tensor,
               achieved: torch.Tensor, action: torch.Tensor) -> None:
    """Raise for the first failed check of an add, from ``stats`` = [max token id (or none), max cur_step, goal
    min, goal max, achieved min, achieved max, action min, action max] (the ids in the messages: the step's)."""
    N, C = store.n_envs, store.capacity_per_env
    tok_max, ep_steps, g_min, g_max, a_min, a_max, act_min, act_max = stats
    if tok_max > store.token_max:
        fix = ("set buffer token_dtype='int32' (int16 only fits vocabularies below 32768)"
               if cfg.token_dtype == "int16"
               else "sampled batches carry int32 ids, and no tokenizer has that many: check the codec's ids")
        raise ValueError(f"a token id exceeds {store.token_max}, the largest token_dtype={cfg.token_dtype} stores; "
                         f"{fix}")
    if ep_steps >= C:
        raise ValueError(f"an episode reached {ep_steps + 1} steps > capacity_per_env={C} (capacity "
                         f"{cfg.capacity} // n_envs {N}); an episode must fit in its env's rows: set capacity "
                         f">= {(ep_steps + 1) * N}")
    if g_min < 0 or g_max >= n_goals:
        raise ValueError(f"TransitionBatch.goal holds an id outside the goal table [0, {n_goals}): "
                         f"{goal.tolist()}; register goals with register_goal(tokens) first")
    if a_min < -1 or a_max >= n_goals:
        raise ValueError(f"TransitionBatch.achieved holds an id outside [-1, {n_goals}) (padding is -1): "
                         f"{achieved.tolist()}; register achieved goals with register_goal(tokens) first")
    if act_min < 0 or act_max >= cfg.max_cands:
        raise ValueError(f"TransitionBatch.action holds an index outside [0, max_cands={cfg.max_cands}): "
                         f"{action.tolist()}")


@dataclass
class _Step:
    """One step of N envs on the storage's device, fitted to the buffer's widths (token ids [N, L], candidates
    [N, K', Lc], achieved ids [N, G] left-aligned), padding past each length set to ``pad_id``."""

    obs: torch.Tensor
    obs_len: torch.Tensor
    next_obs: torch.Tensor
    next_obs_len: torch.Tensor
    cands: torch.Tensor
    cand_len: torch.Tensor
    next_cands: torch.Tensor
    next_cand_len: torch.Tensor
    goal: torch.Tensor
    action: torch.Tensor
    achieved: torch.Tensor
    terminated: torch.Tensor
    truncated: torch.Tensor


class TorchWriter:
    """``add`` with torch ops on the storage's device (one host synchronisation, for the checks).

    Args:
        cfg: the buffer's options.
        store: the storage written.
        goals: the goal table (ids checked against it; achievement counts kept in it).
    """

    lib = None  # no native library: the interface NativeWriter shares

    def __init__(self, cfg: BufferConfig, store: ReplayStorage, goals: GoalTable) -> None:
        self.cfg, self.store, self.goals = cfg, store, goals
        self._positions: dict[int, torch.Tensor] = {}  # arange(L) per token width, for _pad_past

    def bind(self) -> None:
        """Nothing to point at the storage (the native writer's hook after each rebuild)."""

    def add(self, t: TransitionBatch) -> None:
        """Store one step of all N envs (shapes already checked by ``check_shapes``).

        Raises:
            ValueError: a transition wider than a configured limit, an unregistered goal id, or an episode longer
                than ``capacity // n_envs`` (the storage unchanged).
        """
        store, C = self.store, self.store.capacity_per_env
        P = store.pos
        row = P % C
        x = self._fitted(t)
        done = x.terminated | x.truncated
        # Bookkeeping computed before any write, so a failed check leaves the buffer unchanged.
        lo = store.lo
        if P >= C:  # the row about to be overwritten (absolute P - C) breaks its episode: lo moves past that episode
            old = store.rows[row]  # [N, F + G]: the overwritten step's index and its episode's row of eps_flat
            old_end = store.eps_flat[:, 0].index_select(0, old[:, EPK]) - old[:, T] + (P - C)
            lo = torch.maximum(lo, old_end)
        new_start = torch.where(done, P + 1, store.cur_start)
        n_sampleable = self._check(x, (new_start - lo).sum())
        achieving = (x.achieved >= 0).any(1)
        cur_ach = self._write(row, x, t, achieving)
        # Episode ends: the next row starts a new episode.
        store.lo = lo
        store.cur_start = new_start
        store.cur_k = store.cur_k + done.long()
        store.cur_step = torch.where(done, 0, store.cur_step + 1)
        store.cur_ach = torch.where(done, 0, cur_ach)
        store.pos = P + 1
        store.n_sampleable = n_sampleable

    def _fitted(self, t: TransitionBatch) -> _Step:
        """The step's tensors on the storage's device, fitted to the buffer's widths and padded past their lengths."""
        cfg, dev, N = self.cfg, self.store.device, self.store.n_envs
        to = lambda x: x.to(dev, non_blocking=True)  # noqa: E731 - local shorthand
        obs_len, next_obs_len = to(t.obs_len).long(), to(t.next_obs_len).long()
        obs = self._fit(to(t.obs), obs_len, cfg.max_obs_tokens, "observation", "max_obs_tokens")
        next_obs = self._fit(to(t.next_obs), next_obs_len, cfg.max_obs_tokens, "next observation", "max_obs_tokens")
        cand_len, next_cand_len = to(t.cand_len).long(), to(t.next_cand_len).long()
        cands = self._fit(to(t.cands), cand_len, cfg.max_cand_tokens, "candidate action", "max_cand_tokens")
        next_cands = self._fit(to(t.next_cands), next_cand_len, cfg.max_cand_tokens, "candidate action",
                               "max_cand_tokens")
        # Stored padding is pad_id whatever the caller had there, so sampled ids need no masking.
        obs, next_obs = self._pad_past(obs, obs_len), self._pad_past(next_obs, next_obs_len)
        cands, next_cands = self._pad_past(cands, cand_len), self._pad_past(next_cands, next_cand_len)
        achieved = to(t.achieved).long()
        # Left-align the achieved ids (valid first) so a uniform pick among the first `count` entries is exact.
        achieved = achieved.gather(1, torch.sort((achieved < 0).to(torch.uint8), dim=1, stable=True).indices)
        if achieved.shape[1] < cfg.max_achieved:
            achieved = torch.cat([achieved, achieved.new_full((N, cfg.max_achieved - achieved.shape[1]), -1)], 1)
        return _Step(obs, obs_len, next_obs, next_obs_len, cands, cand_len, next_cands, next_cand_len,
                     to(t.goal).long(), to(t.action).long(), achieved, to(t.terminated).bool(), to(t.truncated).bool())

    def _check(self, x: _Step, n_sampleable: torch.Tensor) -> int:
        """The single synchronisation: the checks' extremes and the new sampleable count in one transfer; raises
        for the first failed check (``check_step``), else returns the sampleable count."""
        store = self.store
        no_ach = torch.full((), -1, dtype=torch.long, device=store.device)
        ach_range = torch.aminmax(x.achieved) if x.achieved.numel() else (no_ach, no_ach)
        stats = [store.cur_step.max(), *torch.aminmax(x.goal), *ach_range, *torch.aminmax(x.action), n_sampleable]
        if store.token_max < torch.iinfo(torch.int64).max:
            stats += [x.obs.max(), x.next_obs.max(), x.cands.max(), x.next_cands.max()]
        ep_steps, g_min, g_max, a_min, a_max, act_min, act_max, n, *tok_max = torch.stack(stats).tolist()
        check_step(self.cfg, store, self.goals.n_goals,
                   [max(tok_max, default=-1), ep_steps, g_min, g_max, a_min, a_max, act_min, act_max], x.goal,
                   x.achieved, x.action)
        return int(n)

    def _write(self, row: int, x: _Step, t: TransitionBatch, achieving: torch.Tensor) -> torch.Tensor:
        """Write the row, its derived columns, the HER source, the episode table and the rarity marks; returns the
        per-env achieving-step counts after this step [N] long."""
        cfg, store, N = self.cfg, self.store, self.store.n_envs
        dev, C, cols = store.device, store.capacity_per_env, store.cols
        store.obs[row] = x.obs
        store.obs_len[row] = x.obs_len
        store.next_obs[row] = x.next_obs
        store.next_obs_len[row] = x.next_obs_len
        for dst, dst_len, ids, lens in ((store.cands, store.cand_len, x.cands, x.cand_len),
                                        (store.next_cands, store.next_cand_len, x.next_cands, x.next_cand_len)):
            K = ids.shape[1]
            if cfg.max_cands > K:
                dst[row, :, K:] = store.pad_id
                dst_len[row, :, K:] = 0
            dst[row, :, :K] = ids
            dst_len[row, :, :K] = lens
        store.terminated[row] = x.terminated
        store.truncated[row] = x.truncated
        store.episode[row] = store.cur_k * N + cols
        store.policy_version[row] = t.policy_version.to(dev, non_blocking=True)
        # One block of the row table: step, goal, ach_before, action, reward, logp, achieved and the derived columns.
        slot = store.cur_k % (C + 1)
        store.reward[row] = t.reward.to(dev, non_blocking=True)
        store.logp[row] = t.logp.to(dev, non_blocking=True)
        bits = torch.stack([store.reward[row], store.logp[row]]).view(torch.int32)
        store.rows[row] = torch.cat([torch.stack([store.cur_step, slot * N + cols, x.goal, store.cur_ach,
                                                  x.terminated, x.action, x.obs_len, x.next_obs_len, bits[0],
                                                  bits[1]], 1), x.achieved], 1)
        # The r-th achieving step (r = cur_ach) is recorded at row start + r, which is <= this row.
        ach_row = torch.where(achieving, (store.cur_start + store.cur_ach) % C, row)
        store.ranks[row] = store.rank_reset
        store.ranks[ach_row, cols] = torch.where(achieving.unsqueeze(1), rank_values(store.cur_step, x.achieved),
                                                 store.rank_reset).to(torch.int32)
        cur_ach = store.cur_ach + achieving.long()
        store.eps[slot, cols] = torch.stack([store.cur_step + 1, cur_ach], 1).to(torch.int32)  # ep_len, ep_ach
        if cfg.her.counts_goals:
            mark_rare(store, self.goals, row, x.achieved, achieving)
        return cur_ach

    def _fit(self, x: torch.Tensor, lens: torch.Tensor, width: int, what: str, limit_name: str) -> torch.Tensor:
        """Pad/cut the last dim of ``x`` to ``width``; wider than ``width`` with content there is an error."""
        have = x.shape[-1]
        if have > width:
            need = int(lens.max())
            if need > width:
                raise width_error(what, need, width, limit_name)
            return x[..., :width]
        if have < width:
            pad = x.new_full((*x.shape[:-1], width - have), self.store.pad_id)
            return torch.cat([x, pad], dim=-1)
        return x

    def _pad_past(self, ids: torch.Tensor, lens: torch.Tensor) -> torch.Tensor:
        """``ids`` [..., L] with ``pad_id`` written past ``lens`` [...] (done once on add, not on every sample)."""
        L = ids.shape[-1]
        positions = self._positions.get(L)
        if positions is None:
            positions = self._positions[L] = torch.arange(L, device=ids.device)
        return torch.where(positions < lens.unsqueeze(-1), ids, self.store.pad_id)


__all__ = ["TorchWriter", "check_shapes", "check_step", "width_error"]
