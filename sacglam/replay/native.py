"""The replay buffer's native CPU path: ``NativeWriter`` and ``NativeSampler``, the writer and sampler interface of
``TorchWriter`` and ``TorchSampler`` implemented by one C call each.

On a CPU buffer ``sample`` is one call of ``sacglam_sample`` (``sacglam/replay/csrc/sample.c``) that computes the torch
sampler's batch from the same draws and tables, equal field for field (tests/test_native_sampler.py), 2.5-4x faster
(scripts/bench_buffer.py); ``sample(out=batch)`` writes into an earlier batch instead of allocating one. ``add`` is one
call of ``sacglam_add`` (``sacglam/replay/csrc/add.c``): the same storage and tables after it as the torch writer's
~80 ops, about 10x faster. On a GPU, and wherever the C code does not apply (int64 tokens; for sampling also a custom
reward function or ``compile``), the torch path runs (``pick_native`` decides). The library is built and loaded by
``sacglam.replay.clib``, whose ``load``, ``load_error`` and ``advise_huge_pages`` this module re-exports.

This module imports torch only.
"""

from __future__ import annotations

import ctypes
import warnings

import torch

from sacglam.prompting import PromptAssembler, PromptPieces
from sacglam.replay.clib import SOURCES, AddArgs, SampleArgs, advise_huge_pages, build, cache_dir, load, load_error
from sacglam.replay.config import BufferConfig
from sacglam.replay.goals import GoalTable
from sacglam.replay.her import equality_reward
from sacglam.replay.sampler import BATCH_FIELDS, BatchLayout, SamplingWindow, batch_tensors
from sacglam.replay.storage import ReplayStorage
from sacglam.replay.writer import check_step, width_error
from sacglam.types import Batch, RewardFn, TransitionBatch

_STRATEGY_CODES = {"future": 0, "episode": 1, "final": 2}  # as sacglam/replay/csrc/sample.c numbers them
# The SampleArgs field the native sampler writes each Batch field through (goal_limit and policy_version end in _out
# there, since the inputs of those names are the buffer's tables).
_NATIVE_OUTPUTS = tuple(f"{name}_out" if name in ("goal_limit", "policy_version") else name for name in BATCH_FIELDS)
# TransitionBatch fields the native add reads: the dtype it reads each in and the AddArgs field it goes through.
_ADD_INPUTS = (
    ("obs", torch.int64, "obs"), ("obs_len", torch.int64, "obs_len_in"), ("next_obs", torch.int64, "next_obs"),
    ("next_obs_len", torch.int64, "next_obs_len_in"), ("cands", torch.int64, "cands"),
    ("cand_len", torch.int64, "cand_len_in"), ("next_cands", torch.int64, "next_cands"),
    ("next_cand_len", torch.int64, "next_cand_len_in"), ("goal", torch.int64, "goal"),
    ("action", torch.int64, "action"), ("achieved", torch.int64, "achieved"),
    ("policy_version", torch.int64, "policy_version_in"), ("reward", torch.float32, "reward_in"),
    ("logp", torch.float32, "logp_in"), ("terminated", torch.uint8, "terminated_in"),
    ("truncated", torch.uint8, "truncated_in"),
)  # fmt: skip


def pick_native(cfg: BufferConfig, device: torch.device,
                reward_fn: RewardFn) -> tuple[ctypes.CDLL | None, ctypes.CDLL | None]:
    """The native library for sampling and for adding when ``cfg.native`` and the buffer allow each, else None
    (torch runs). Adding needs a CPU buffer of int16 or int32 tokens; sampling needs more (see below).

    Raises:
        ValueError: ``native="on"`` and the sampler cannot be used (says why).
    """
    if cfg.native == "off":
        return None, None
    why_add = ""
    if device.type != "cpu":
        why_add = f"the buffer is on {device} (the native code is for CPU buffers)"
    elif cfg.token_dtype not in ("int16", "int32"):
        why_add = f"token_dtype={cfg.token_dtype!r} (the native code reads int16 or int32 tokens)"
    why = why_add
    if not why:
        if reward_fn is not equality_reward:
            why = "a custom reward_fn is set (the native sampler computes the equality reward only)"
        elif cfg.compile:
            why = "buffer.compile=true asks for the torch.compile path"
        elif cfg.n_step > 256 or cfg.her.rarity_draws > 64:
            why = "n_step > 256 or her.rarity_draws > 64 (the native sampler's fixed limits)"
    lib = None if why_add else load()
    if not why_add and lib is None:
        why = why_add = f"it could not be built: {load_error()}"
        if cfg.native == "auto":
            warnings.warn(f"the native CPU code is off ({why}); adding and sampling with torch ops instead (same "
                          f"results, several times slower)", RuntimeWarning, stacklevel=3)
    if why and cfg.native == "on":
        raise ValueError(f"buffer.native=on, but the native sampler cannot be used: {why}")
    return (None if why else lib), (None if why_add else lib)


class NativeWriter:
    """``TorchWriter.add`` in one C call (``sacglam_add``): the same storage and tables after it.

    Args:
        cfg, store, goals: as ``TorchWriter``.
        lib: the loaded library (``load()``).
    """

    def __init__(self, cfg: BufferConfig, store: ReplayStorage, goals: GoalTable, lib: ctypes.CDLL) -> None:
        self.cfg, self.store, self.goals, self.lib = cfg, store, goals, lib
        self._args = AddArgs()
        self._stats = torch.zeros(11, dtype=torch.int64)  # what sacglam_add reports (see csrc/add.c)
        self._scratch = torch.zeros(2 * store.n_envs, dtype=torch.int64)

    def bind(self) -> None:
        """Point the arguments at the storage (after each rebuild); the [N] bookkeeping is set per add."""
        cfg, a, s, g = self.cfg, self._args, self.store, self.goals
        for name in ("obs_len", "next_obs_len", "terminated", "truncated", "episode", "policy_version", "reward",
                     "logp", "rare_goal"):
            setattr(a, name, getattr(s, name).data_ptr())
        a.goal_count, a.goal_limit = g.goal_count.data_ptr(), g.goal_limit.data_ptr()
        a.tok, a.rows, a.ranks, a.eps = s.tok.data_ptr(), s.rows.data_ptr(), s.ranks.data_ptr(), s.eps.data_ptr()
        a.tok_w, a.token_bytes, a.row_w, a.rank_w = s.tok.shape[-1], s.tok.element_size(), s.rows.shape[-1], \
            s.ranks.shape[-1]
        a.N, a.C, a.G, a.Lo, a.K, a.Lc = s.n_envs, s.capacity_per_env, cfg.max_achieved, cfg.max_obs_tokens, \
            cfg.max_cands, cfg.max_cand_tokens
        a.pad_id, a.token_max, a.counts_goals = s.pad_id, s.token_max, int(cfg.her.counts_goals)
        a.scratch, a.stats = self._scratch.data_ptr(), self._stats.data_ptr()

    def add(self, t: TransitionBatch) -> None:
        """Store one step of all N envs (shapes already checked); raises as ``TorchWriter.add``."""
        a, s = self._args, self.store
        x = {name: getattr(t, name).to("cpu", dtype).contiguous() for name, dtype, _ in _ADD_INPUTS}
        for name, _, arg in _ADD_INPUTS:
            setattr(a, arg, x[name].data_ptr())
        a.Lo_in, (a.K_in, a.Lc_in), a.G_in = x["obs"].shape[1], x["cands"].shape[1:], x["achieved"].shape[1]
        a.P, a.n_goals, a.max_limit = s.pos, self.goals.n_goals, self.goals.max_limit
        for name in ("cur_start", "cur_k", "cur_step", "cur_ach", "lo"):  # [N] bookkeeping, updated in place
            setattr(a, name, getattr(s, name).data_ptr())
        code = self.lib.sacglam_add(ctypes.byref(a))
        if code:
            stats = self._stats.tolist()
            if code == 1:
                what = ("observation", "next observation", "candidate action", "candidate action")[stats[0]]
                name = "max_obs_tokens" if stats[0] < 2 else "max_cand_tokens"
                raise width_error(what, stats[1], getattr(self.cfg, name), name)
            check_step(self.cfg, s, self.goals.n_goals, stats[2:10], x["goal"], x["achieved"], x["action"])
            raise AssertionError(f"sacglam_add refused a step with code {code} that no check explains: {stats}")
        s.pos += 1
        s.n_sampleable = int(self._stats[10])


class NativeSampler:
    """``TorchSampler.sample`` in one C call (``sacglam_sample``): the same batch from the same draws, written into
    ``out`` or into a new ``Batch`` (one plain allocation per field).

    Args:
        cfg, store, goals, window: as ``TorchSampler`` (the goal table keeps int64 heads, ``heads64``).
        asm: the prompt assembler (its widths); pieces: its template tokens (``post`` is read by the C code).
        layout: the batch layout (allocates a new batch).
        lib: the loaded library (``load()``).
    """

    def __init__(self, cfg: BufferConfig, store: ReplayStorage, goals: GoalTable, window: SamplingWindow,
                 asm: PromptAssembler, pieces: PromptPieces, layout: BatchLayout, lib: ctypes.CDLL) -> None:
        self.cfg, self.store, self.goals, self.window, self.lib = cfg, store, goals, window, lib
        self.asm, self.pieces, self.layout = asm, pieces, layout
        self._args = SampleArgs()
        self._post64 = pieces.post.to(torch.int64).contiguous()
        # gamma ** j as the torch path computes it (float32 pow over a vector); for n = 1 its discount is gamma.
        width = max(64, cfg.n_step + 1)
        self._powers = (torch.tensor([1.0, cfg.gamma], dtype=torch.float32) if cfg.n_step == 1 else
                        (cfg.gamma ** torch.arange(width, dtype=torch.float32))[: cfg.n_step + 1].contiguous())
        self._scratch: dict[int, torch.Tensor] = {}

    def bind(self) -> None:
        """Point the arguments at the storage and derived tables (after each rebuild)."""
        cfg, a, asm, s, g = self.cfg, self._args, self.asm, self.store, self.goals
        assert g.heads64 is not None
        a.rows, a.ranks, a.eps = s.rows.data_ptr(), s.ranks.data_ptr(), s.eps.data_ptr()
        a.goal_count, a.goal_limit = g.goal_count.data_ptr(), g.goal_limit.data_ptr()
        a.goal_len, a.heads = g.goal_len32.data_ptr(), g.heads64.data_ptr()
        a.obs, a.next_obs = s.obs.data_ptr(), s.next_obs.data_ptr()  # views into one [CN, tok_w] record
        a.cands, a.next_cands = s.cands.data_ptr(), s.next_cands.data_ptr()
        a.cand_len, a.next_cand_len = s.cand_len.data_ptr(), s.next_cand_len.data_ptr()
        a.tok_w = s.tok.shape[-1]
        a.policy_version, a.post, a.powers = s.policy_version.data_ptr(), self._post64.data_ptr(), \
            self._powers.data_ptr()
        a.row_w, a.rank_w, a.head_w, a.n_post = s.rows.shape[-1], s.ranks.shape[-1], asm.head_width, \
            self._post64.numel()
        a.N, a.CN, a.n_step, a.G = s.n_envs, s.capacity_per_env * s.n_envs, cfg.n_step, cfg.max_achieved
        a.Lo, a.K, a.Lc, a.Lp = cfg.max_obs_tokens, cfg.max_cands, cfg.max_cand_tokens, asm.prompt_width
        a.pre_mid = self.pieces.prefix.numel() + self.pieces.mid.numel()
        a.token_bytes, a.pad_id = s.obs.element_size(), s.pad_id
        a.strategy, a.her_on, a.m = _STRATEGY_CODES[cfg.her.strategy], int(cfg.her.ratio > 0), cfg.her.rarity_draws
        a.ratio = cfg.her.ratio

    def window_changed(self) -> None:
        """Point the arguments at the recomputed window (a CPU buffer: reading its scalars is no synchronisation)."""
        a, win = self._args, self.window
        a.cum, a.base = win.cum.data_ptr(), win.base.data_ptr()
        a.total_f, a.total_m1 = float(win.total_f), int(win.total_m1)
        if self.cfg.her.rare_fraction > 0:
            a.rare_cdf, a.rare_total = win.rare_cdf.data_ptr(), float(win.rare_total)

    def wake(self, batch_size: int) -> None:
        """The sampler's worker threads, if this batch is split over them, get ready while the draws are made."""
        self.lib.sacglam_wake(torch.get_num_threads(), batch_size)

    def sample(self, draws: torch.Tensor, rare_u: torch.Tensor | None, out: Batch | None) -> Batch:
        """The batch of ``draws`` and ``rare_u`` (as ``TorchSampler.sample``) in one C call."""
        a = self._args
        B = draws.shape[0]
        if out is None:
            out = Batch(**{name: torch.empty(shape, dtype=dtype) for name, shape, dtype in self.layout.layout(B)})
        scratch = self._scratch.get(B)
        if scratch is None:
            scratch = self._scratch[B] = torch.empty((6, B), dtype=torch.int64)
        a.draws, a.draw_w, a.B = draws.data_ptr(), draws.shape[1], B
        a.rare_u, a.R = (0, 0) if rare_u is None else (rare_u.data_ptr(), rare_u.shape[0])
        a.scratch, a.threads = scratch.data_ptr(), torch.get_num_threads()  # torch's intra-op threads, as its ops
        for arg, t in zip(_NATIVE_OUTPUTS, batch_tensors(out), strict=True):
            setattr(a, arg, t.data_ptr())
        if self.lib.sacglam_sample(ctypes.byref(a)) != 0:
            raise RuntimeError("the native sampler refused its arguments (n_step or rarity_draws above its limits)")
        return out


__all__ = ["SOURCES", "AddArgs", "NativeSampler", "NativeWriter", "SampleArgs", "advise_huge_pages", "build",
           "cache_dir", "load", "load_error", "pick_native"]
