"""Sampling from the replay storage with torch ops (``TorchSampler``), and what every sampler shares: the sampling
window, the uniforms of a call, and the layout of the ``Batch`` it returns.

Per column the sampleable rows form one window ``[lo_e, hi_e)`` of absolute positions (completed, intact episodes).
Sampling picks a column weighted by ``hi_e - lo_e`` (cumsum + searchsorted) and a uniform offset: O(N + B) work, no
capacity-sized operation and no host-device synchronisation. The window (``SamplingWindow``) is recomputed once per
``add``, lazily, not per sample. All randomness of a call is drawn first (``Draws``), so the rest is a pure function
of the storage: the torch path can run under ``torch.compile`` (``BufferConfig.compile``; on CPU the inductor kernel
gathers token by token and is slower than this eager path, see scripts/bench_buffer.py --all-configs), and
``sacglam.replay.native.NativeSampler`` computes the same batch from the same draws in one C call.

Torch path cost (B = 256, CPU): about 100 tensor ops, most of them on [B] vectors, plus the random row reads of the
token fields: one gather of the sampled row's scalars (``rows``; for n > 1 of its n-step window), one of the episode
and one of the relabelling source (``sacglam.replay.her.relabel``), then row gathers of the token fields straight into
the prompt sources; both prompts (s_t and s_{t+k}) come from one table-driven gather over [2, B] rows
(``PromptAssembler``) from the per-goal heads of the goal table; candidate masks are one lookup per candidate.

This module imports torch only.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from dataclasses import fields

import torch

from sacglam.prompting import PromptAssembler, PromptPieces
from sacglam.replay.config import BufferConfig
from sacglam.replay.goals import GoalTable
from sacglam.replay.her import n_step_window, relabel
from sacglam.replay.rarity import rare_weights
from sacglam.replay.storage import ACHB, ACT, EPK, GOAL, LOGP, NOL, OL, REW, TERM, F, ReplayStorage, T
from sacglam.types import BATCH_ID_DTYPE, Batch, RewardFn

BATCH_FIELDS = tuple(f.name for f in fields(Batch))  # Batch fields in declaration order
batch_tensors = operator.attrgetter(*BATCH_FIELDS)  # Batch -> its tensors in field order, as one tuple
Layout = list[tuple[str, tuple[int, ...], torch.dtype]]


def source_dtype(pieces: PromptPieces, token_dtype: torch.dtype) -> torch.dtype:
    """Dtype of the prompt sources, which hold template ids next to tokens: the token dtype when the template ids fit
    it, else int32."""
    fit = all(int(x.min()) >= torch.iinfo(token_dtype).min and int(x.max()) <= torch.iinfo(token_dtype).max
              for x in (pieces.prefix, pieces.mid, pieces.post) if x.numel())
    return token_dtype if fit else torch.int32


class SamplingWindow:
    """Per-column sampling window over the storage, and with ``her.rare_fraction`` the rarity distribution.

    A draw x in [0, total) picks column ``col = searchsorted(cum, x, right=True)`` and absolute position
    ``a = lo[col] + x - (cum[col] - w[col])``; sampling works with ``z = a * N + col = base[col] + x * N`` (the
    column's offset folded into ``base``), whose storage row is ``z % (C * N)`` and whose step j later is z + j N.
    """

    def __init__(self, cfg: BufferConfig, store: ReplayStorage, goals: GoalTable) -> None:
        self.cfg, self.store, self.goals = cfg, store, goals
        dev = store.device
        self.pos = -1  # store.pos when the window was computed (-1: stale)
        self.cum = self.base = self.total_f = self.total_m1 = torch.zeros((), device=dev)
        self.rare_w = self.rare_cdf = self.rare_total = torch.zeros((), device=dev)

    def refresh(self) -> None:
        """Recompute the window from the storage (on the device, no synchronisation)."""
        store, N = self.store, self.store.n_envs
        w = store.cur_start - store.lo  # [N] sampleable rows per column
        cum = torch.cumsum(w, 0)
        self.cum = cum
        self.base = (store.lo - (cum - w)) * N + torch.arange(N, device=store.device)
        self.total_f, self.total_m1 = cum[-1].to(torch.float64), cum[-1] - 1
        if self.cfg.her.rare_fraction > 0:
            self.rare_w = rare_weights(store, self.goals, w)
            # Row r is drawn for u in [cdf[r - 1], cdf[r]): weight-0 rows (cdf unchanged) are never drawn; the scale
            # just below 1 keeps u < cdf[-1] despite rounding.
            self.rare_cdf = torch.cumsum(self.rare_w, 0)
            self.rare_total = self.rare_cdf[-1] * (1 - 1e-9)
        self.pos = store.pos


class Draws:
    """The uniforms of one ``sample`` call, drawn in a fixed order from the caller's generator: [B, 3 + m] float64
    (row pick, relabel coin, rank, goal in step, then the other m - 1 rank draws of ``her.rarity_draws``), then R =
    round(B * ``her.rare_fraction``) float64 for the rows drawn by rarity. The [B, 3 + m] tensor is reused per B."""

    def __init__(self, cfg: BufferConfig, device: torch.device) -> None:
        self.cfg, self.device = cfg, device
        self._draws: dict[int, torch.Tensor] = {}  # per batch size: the uniforms of a call, drawn into in place

    def draw(self, batch_size: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(draws [B, 3 + m], rarity uniforms [R] or None when R = 0)."""
        her, dev = self.cfg.her, self.device
        draws = self._draws.get(batch_size)
        if draws is None:
            draws = self._draws[batch_size] = torch.empty(batch_size, 3 + her.rarity_draws, device=dev,
                                                          dtype=torch.float64)
        draws.uniform_(generator=generator)  # torch.rand(out=draws) in fewer Python steps: the same numbers
        n_rare = round(batch_size * her.rare_fraction)
        rare_u = torch.rand(n_rare, generator=generator, device=dev, dtype=torch.float64) if n_rare else None
        return draws, rare_u


class BatchLayout:
    """Shapes and dtypes of the ``Batch`` a sampler returns per batch size, and the check of an ``out=`` batch."""

    def __init__(self, cfg: BufferConfig, prompt_width: int, device: torch.device) -> None:
        self.cfg, self.prompt_width, self.device = cfg, prompt_width, device
        self._out_ok: dict[int, tuple[torch.Tensor, ...]] = {}  # per batch size: the last `out` checked
        self._layouts: dict[int, Layout] = {}  # per batch size

    def layout(self, batch_size: int) -> Layout:
        """(field, shape, dtype) of every ``Batch`` field that ``sample(batch_size)`` returns, in field order."""
        cached = self._layouts.get(batch_size)
        if cached is not None:
            return cached
        B, K, Lc, Lp = batch_size, self.cfg.max_cands, self.cfg.max_cand_tokens, self.prompt_width
        tok, i64, bl, f32 = BATCH_ID_DTYPE, torch.int64, torch.bool, torch.float32
        ids, cands, row = ((B, Lp), (B, K, Lc), (B,))
        layout = dict(prompt_ids=(ids, tok), prompt_mask=(ids, bl), cand_ids=(cands, tok), cand_mask=(cands, bl),
                      action=(row, i64), reward=(row, f32), discount=(row, f32), n_steps=(row, i64),
                      terminated=(row, bl), truncated=(row, bl), goal=(row, i64), relabelled=(row, bl),
                      goal_gap=(row, i64), goal_limit=(row, i64), logp=(row, f32), policy_version=(row, i64))
        cached = self._layouts[batch_size] = [(name, *layout[name.removeprefix("next_")]) for name in BATCH_FIELDS]
        return cached

    def check_out(self, out: Batch, batch_size: int) -> None:
        """Raise unless every tensor of ``out`` has the shape and dtype ``sample(batch_size)`` returns, contiguous, on
        this buffer's device: what may be written in place (the native sampler writes through raw pointers)."""
        ok = self._out_ok.get(batch_size)  # the tensors checked last time (held, so `is` cannot match a new object)
        if ok is not None and all(map(operator.is_, batch_tensors(out), ok)):
            return
        for name, shape, dtype in self.layout(batch_size):
            t = getattr(out, name)
            if (not isinstance(t, torch.Tensor) or tuple(t.shape) != shape or t.dtype != dtype
                    or t.device.type != self.device.type or not t.is_contiguous()):
                got = f"{tuple(t.shape)} {t.dtype} on {t.device}" if isinstance(t, torch.Tensor) else type(t).__name__
                raise ValueError(f"sample(out=...): out.{name} is {got}, but a batch of {batch_size} from this buffer "
                                 f"has {shape} {dtype} on {self.device}, contiguous; pass a Batch that sample("
                                 f"{batch_size}, ...) returned, or out=None")
        self._out_ok[batch_size] = batch_tensors(out)


class TorchSampler:
    """The sampling path in torch ops on the storage's device: rows from the draws, HER, n-step returns, prompts.

    Args:
        cfg: the buffer's options.
        store, goals, window: the storage, the goal table and the sampling window read.
        asm: the prompt assembler (prompt sources from goal heads and observations).
        src_dtype: dtype of the prompt sources (the token dtype, or int32 when template ids do not fit it).
        reward_fn: reward and termination over goal ids for relabelled goals.
    """

    lib = None  # no native library: the interface NativeSampler shares

    def __init__(self, cfg: BufferConfig, store: ReplayStorage, goals: GoalTable, window: SamplingWindow,
                 asm: PromptAssembler, src_dtype: torch.dtype, reward_fn: RewardFn) -> None:
        self.cfg, self.store, self.goals, self.window = cfg, store, goals, window
        self.asm, self.src_dtype, self.reward_fn = asm, src_dtype, reward_fn
        self._steps = torch.arange(cfg.n_step, device=store.device)
        self._cand_mask_table = torch.zeros((), dtype=torch.bool, device=store.device)
        # torch.compile fuses the sampling path's small ops: meant for GPUs, where each op is a kernel launch.
        self.core: Callable[..., dict[str, torch.Tensor]] = (
            torch.compile(self.sample_from_draws, dynamic=False) if cfg.compile else self.sample_from_draws)

    def bind(self) -> None:
        """Candidate mask rows by length [Lc + 1, Lc] bool, viewed as the widest integer that divides a row (one int64
        per candidate when Lc = 8): a lookup of B * K small rows is then a plain 1-D gather."""
        Lc, dev = self.cfg.max_cand_tokens, self.store.device
        mask = torch.arange(Lc, device=dev) < torch.arange(Lc + 1, device=dev).unsqueeze(1)
        width, wide = next((w, d) for w, d in ((8, torch.int64), (4, torch.int32), (2, torch.int16), (1, torch.bool))
                           if Lc % w == 0)
        self._cand_mask_table = mask.view(wide).view(-1) if Lc == width else mask.view(wide)

    def window_changed(self) -> None:
        """Nothing to do when the window was recomputed (the native sampler's hook)."""

    def wake(self, batch_size: int) -> None:
        """Nothing to prepare before the draws (the native sampler's hook)."""

    def sample(self, draws: torch.Tensor, rare_u: torch.Tensor | None, out: Batch | None) -> Batch:
        """The batch of the draws ``Draws.draw`` made, written into ``out`` (already checked) or a new ``Batch``."""
        rare_rows = None
        if rare_u is not None:  # inverse-CDF draws: O(R log(C N)) per call, the cumulative sum is built once per add
            win = self.window
            rare_rows = torch.searchsorted(win.rare_cdf, rare_u * win.rare_total, right=True)
            rare_rows = rare_rows.clamp_(max=win.rare_cdf.shape[0] - 1)
        result = self.core(draws, rare_rows)
        if out is None:
            return Batch(**result)
        for name in BATCH_FIELDS:
            getattr(out, name).copy_(result[name])
        return out

    def sample_from_draws(self, draws: torch.Tensor, rare_rows: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """The sampling path given its uniforms ``draws`` [B, 3 + m] (see ``Draws``) and the rows drawn by rarity
        ``rare_rows`` [R] (flat storage rows; they replace the last R uniform picks): the ``Batch`` fields by name."""
        cfg, store = self.cfg, self.store
        B, dev = draws.shape[0], draws.device
        z, flat, win_rows = self._rows_of(draws, rare_rows)
        row = win_rows[:, 0]  # [B, F + G] int32
        t = row[:, T]
        ep = store.eps_flat.index_select(0, row[:, EPK])  # [B, 2]: ep_len, ep_ach
        reward = win_rows[:, :, REW].view(torch.float32)  # [B, n]
        term = win_rows[:, :, TERM].bool()
        if cfg.her.ratio > 0:  # a static switch: ratio 0 returns exactly the stored transitions
            rl = relabel(cfg.her, self.reward_fn, draws, z,
                         dict(t=t, goal=row[:, GOAL], count_before=row[:, ACHB], count_total=ep[:, 1]),
                         dict(achieved=win_rows[:, :, F:], reward=reward, terminated=term),
                         store.ranks_flat, self.goals.goal_count, store.n_envs)
            goal, relabelled, goal_gap, reward, term = rl.goal, rl.relabelled, rl.goal_gap, rl.reward, rl.terminated
        else:
            goal = row[:, GOAL].long()
            relabelled = torch.zeros(B, dtype=torch.bool, device=dev)
            goal_gap = torch.full((B,), -1, dtype=torch.long, device=dev)
        ret, discount, k, term_end, trunc_end = self._returns(reward, term, ep[:, 0] - t)
        if cfg.n_step == 1:
            boot, next_obs_len = flat, row[:, NOL]
        else:
            boot = torch.add(z, k - 1, alpha=store.n_envs) % (store.capacity_per_env * store.n_envs)
            next_obs_len = win_rows[:, :, NOL].gather(1, (k - 1).unsqueeze(1)).squeeze(1)
        prompt_ids, prompt_mask, cand_ids, cand_mask = self._tokens(goal, flat, boot, row[:, OL], next_obs_len)
        return dict(
            prompt_ids=prompt_ids[0], prompt_mask=prompt_mask[0], cand_ids=cand_ids[0], cand_mask=cand_mask[0],
            action=row[:, ACT].long(), reward=ret, discount=discount,
            next_prompt_ids=prompt_ids[1], next_prompt_mask=prompt_mask[1], next_cand_ids=cand_ids[1],
            next_cand_mask=cand_mask[1], terminated=term_end, truncated=trunc_end, n_steps=k, goal=goal,
            relabelled=relabelled, goal_gap=goal_gap, goal_limit=self.goals.goal_limit.index_select(0, goal),
            logp=row[:, LOGP].view(torch.float32).contiguous(),
            policy_version=store.policy_version_flat.index_select(0, flat),
        )

    def _rows_of(self, draws: torch.Tensor,
                 rare_rows: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Column weighted by its window size, then a uniform offset inside the window (see ``SamplingWindow``).

        Returns:
            z: [B] long, ``a * N + col`` (a = absolute step of s_t; only used modulo C * N); flat: [B] long, its
            storage row (flattened [C * N]); win_rows: [B, n, F + G] int32, the ``rows`` entries of steps t .. t +
            n - 1.
        """
        store, win, n = self.store, self.window, self.cfg.n_step
        B, N, CN = draws.shape[0], store.n_envs, store.capacity_per_env * store.n_envs
        x = torch.minimum((draws[:, 0] * win.total_f).long(), win.total_m1)
        col = torch.searchsorted(win.cum, x, right=True)  # [B]
        z = torch.add(win.base.index_select(0, col), x, alpha=N)  # [B] a * N + col, a = absolute step of s_t
        if rare_rows is not None:  # a flat row r * N + col is z modulo C * N, and z is only ever used modulo C * N
            z = torch.cat([z[: B - rare_rows.shape[0]], rare_rows])
        if n == 1:
            flat = z % CN  # storage row (flattened [C * N])
            return z, flat, store.rows_flat.index_select(0, flat).unsqueeze(1)  # [B, 1, F + G]
        win_idx = torch.add(z.unsqueeze(1), self._steps, alpha=N) % CN  # [B, n] rows of steps t .. t + n - 1
        return z, win_idx[:, 0], store.rows_flat.index_select(0, win_idx.view(-1)).view(B, n, -1)

    def _returns(self, reward: torch.Tensor, term: torch.Tensor,
                 steps_left: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """``n_step_window`` (ret, discount, k, term_end, trunc_end) of the [B, n] rewards and terminations for the
        batch's goal; ``steps_left`` [B] = L - t.

        Termination is recomputed for the relabelled goal: an episode that ended because the *stored* goal was
        reached is, for a goal g' not reached there, cut short like a time limit, so its window bootstraps from the
        final state (stored in next_obs) with g'.
        """
        if self.cfg.n_step > 1:
            return n_step_window(reward, term, steps_left, self.cfg.gamma)
        # n_step_window in closed form for n = 1: k = 1, the return is the reward
        term_end = term[:, 0]
        trunc_end = torch.where(term_end, False, steps_left == 1)
        discount = torch.where(term_end, 0.0, self.cfg.gamma)  # float32, = gamma ** 1 * (1 - terminated)
        k = torch.ones(reward.shape[0], dtype=torch.long, device=reward.device)
        return reward[:, 0].contiguous(), discount, k, term_end, trunc_end

    def _tokens(self, goal: torch.Tensor, flat: torch.Tensor, boot: torch.Tensor, obs_len: torch.Tensor,
                next_obs_len: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Prompt ids and mask [2, B, Lp], candidate ids and mask [2, B, K, Lc] of the sampled rows ``flat`` (s_t)
        and the bootstrap rows ``boot`` (s_{t+k}) under ``goal`` [B]: gathered rows go straight into the prompt
        sources [head | obs | post | pad] and candidate blocks."""
        store, asm, cfg = self.store, self.asm, self.cfg
        B, dev = goal.shape[0], goal.device
        Hw, Lo = asm.head_width, cfg.max_obs_tokens
        src_tok = torch.empty((2, B, asm.source_width), dtype=self.src_dtype, device=dev)
        src_tok[:, :, :Hw] = self.goals.heads.index_select(0, goal)
        self._gather_rows(src_tok[0, :, Hw : Hw + Lo], store.obs_flat, flat)
        self._gather_rows(src_tok[1, :, Hw : Hw + Lo], store.next_obs_flat, boot)
        src_tok[:, :, Hw + Lo :] = asm.tail_tokens
        prompt_ids, prompt_mask = asm.gather(src_tok, self.goals.goal_len32.index_select(0, goal),
                                             torch.stack([obs_len, next_obs_len]), dtype=BATCH_ID_DTYPE)
        K, Lc = cfg.max_cands, cfg.max_cand_tokens
        cands = torch.empty((2, B, K * Lc), dtype=store.cands.dtype, device=dev)
        self._gather_rows(cands[0], store.cands_flat, flat)
        self._gather_rows(cands[1], store.next_cands_flat, boot)
        cand_len = torch.empty((2, B, K), dtype=store.cand_len.dtype, device=dev)
        self._gather_rows(cand_len[0], store.cand_len_flat, flat)
        self._gather_rows(cand_len[1], store.next_cand_len_flat, boot)
        cand_ids = cands.to(BATCH_ID_DTYPE).view(2, B, K, Lc)
        # Mask rows looked up by length; the table's rows are read as one wider integer each where Lc allows it.
        cand_mask = self._cand_mask_table.index_select(0, cand_len.view(-1).to(torch.int32))
        return prompt_ids, prompt_mask, cand_ids, cand_mask.view(torch.bool).view(2, B, K, Lc)

    def _gather_rows(self, out: torch.Tensor, table: torch.Tensor, index: torch.Tensor) -> None:
        """``out[i] = table[index[i]]`` for [B, L] ``out`` (a view, e.g. a column block), [R, L] ``table``.

        Eager, the rows are written in place (no temporary). torch.compile cannot trace ``out=`` into a strided view,
        and a widened ``out`` (template ids that do not fit the token dtype) cannot take it: those copy.
        """
        if out.dtype == table.dtype and not self.cfg.compile:
            torch.index_select(table, 0, index, out=out)
        else:
            out.copy_(table.index_select(0, index))


__all__ = ["BATCH_FIELDS", "BatchLayout", "Draws", "SamplingWindow", "TorchSampler", "batch_tensors", "source_dtype"]
