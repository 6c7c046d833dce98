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
import operator
import warnings
from typing import NoReturn

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
# TransitionBatch fields the native add reads: the AddArgs field it goes through, the dtype a field is converted to
# when it has none of the dtypes the C code reads in place (bool flags are read as their uint8 bytes).
_I64, _F32, _FLAGS = (torch.int64,), (torch.float32,), (torch.uint8, torch.bool)
_ADD_INPUTS = (
    ("obs", "obs", _I64), ("obs_len", "obs_len_in", _I64), ("next_obs", "next_obs", _I64),
    ("next_obs_len", "next_obs_len_in", _I64), ("cands", "cands", _I64), ("cand_len", "cand_len_in", _I64),
    ("next_cands", "next_cands", _I64), ("next_cand_len", "next_cand_len_in", _I64), ("goal", "goal", _I64),
    ("action", "action", _I64), ("achieved", "achieved", _I64), ("policy_version", "policy_version_in", _I64),
    ("reward", "reward_in", _F32), ("logp", "logp_in", _F32), ("terminated", "terminated_in", _FLAGS),
    ("truncated", "truncated_in", _FLAGS),
)  # fmt: skip
_BOOKKEEPING = ("cur_start", "cur_k", "cur_step", "cur_ach", "lo")  # ReplayStorage's [N] int64 per-env tensors


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
        self._stats = (ctypes.c_int64 * 11)()  # what sacglam_add reports (see csrc/add.c); read without torch
        self._scratch = torch.zeros(2 * store.n_envs, dtype=torch.int64)
        self._bound: tuple[torch.Tensor | None, ...] = (None,) * len(_BOOKKEEPING)  # the [N] tensors pointed at

    def bind(self) -> None:
        """Point the arguments at the storage (after each rebuild); the [N] bookkeeping is checked per add."""
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
        a.scratch, a.stats = self._scratch.data_ptr(), ctypes.addressof(self._stats)
        self._bound = (None,) * len(_BOOKKEEPING)

    def add(self, t: TransitionBatch) -> None:
        """Store one step of all N envs (shapes already checked); raises as ``TorchWriter.add``.

        The Python around the C call is most of an add's time (the C code stores 16 envs' steps in ~6 us), so the
        inputs already on the CPU, contiguous, in a dtype the C code reads, are passed as they are (no ``.to``), and
        the [N] bookkeeping pointers are set only when the storage holds other tensors than at the last add.
        """
        a, s = self._args, self.store
        _keep = self._inputs(t)  # converted copies of inputs: alive until the C call has returned
        a.P, a.n_goals, a.max_limit = s.pos, self.goals.n_goals, self.goals.max_limit
        bookkeeping = (s.cur_start, s.cur_k, s.cur_step, s.cur_ach, s.lo)  # [N] int64, updated in place
        if not all(map(operator.is_, bookkeeping, self._bound)):  # the torch writer or a test replaced one
            for name, x in zip(_BOOKKEEPING, bookkeeping, strict=True):
                setattr(a, name, x.data_ptr())
            self._bound = bookkeeping
        code = self.lib.sacglam_add(ctypes.byref(a))
        if code:
            self._raise(code, t)
        s.pos += 1
        s.n_sampleable = self._stats[10]

    def _inputs(self, t: TransitionBatch) -> list[torch.Tensor]:
        """Point the arguments at the inputs of ``t`` (and set their widths); returns the converted copies made, which
        must live until the C call returns."""
        a, keep = self._args, []
        for name, arg, dtypes in _ADD_INPUTS:
            x = getattr(t, name)
            if x.dtype not in dtypes or not x.is_cpu or not x.is_contiguous():
                x = x.to("cpu", dtypes[0]).contiguous()
                keep.append(x)
            setattr(a, arg, x.data_ptr())
        a.Lo_in, (a.K_in, a.Lc_in), a.G_in = t.obs.shape[1], t.cands.shape[1:], t.achieved.shape[1]
        return keep

    def _raise(self, code: int, t: TransitionBatch) -> NoReturn:
        """The torch writer's error for a step ``sacglam_add`` refused with ``code`` (nothing was written)."""
        stats = list(self._stats)
        if code == 1:
            what = ("observation", "next observation", "candidate action", "candidate action")[stats[0]]
            name = "max_obs_tokens" if stats[0] < 2 else "max_cand_tokens"
            raise width_error(what, stats[1], getattr(self.cfg, name), name)
        check_step(self.cfg, self.store, self.goals.n_goals, stats[2:10], t.goal.cpu().long(),
                   t.achieved.cpu().long(), t.action.cpu().long())
        raise AssertionError(f"sacglam_add refused a step with code {code} that no check explains: {stats}")


class NativeSampler:
    """``TorchSampler.sample`` in one C call (``sacglam_sample``): the same batch from the same draws, written into
    ``out`` or into a new ``Batch`` (one plain allocation per field).

    Args:
        cfg, store, goals, window: as ``TorchSampler`` (the goal table keeps int32 heads, ``heads32``).
        asm: the prompt assembler (its widths); pieces: its template tokens (``post`` is read by the C code).
        layout: the batch layout (allocates a new batch).
        lib: the loaded library (``load()``).
    """

    def __init__(self, cfg: BufferConfig, store: ReplayStorage, goals: GoalTable, window: SamplingWindow,
                 asm: PromptAssembler, pieces: PromptPieces, layout: BatchLayout, lib: ctypes.CDLL) -> None:
        self.cfg, self.store, self.goals, self.window, self.lib = cfg, store, goals, window, lib
        self.asm, self.pieces, self.layout = asm, pieces, layout
        self._args = SampleArgs()
        self._post32 = pieces.post.to(torch.int32).contiguous()
        # gamma ** j as the torch path computes it (float32 pow over a vector); for n = 1 its discount is gamma.
        width = max(64, cfg.n_step + 1)
        self._powers = (torch.tensor([1.0, cfg.gamma], dtype=torch.float32) if cfg.n_step == 1 else
                        (cfg.gamma ** torch.arange(width, dtype=torch.float32))[: cfg.n_step + 1].contiguous())
        self._scratch: dict[int, torch.Tensor] = {}  # per batch size: [6, B] int64 for the C call
        # the output tensors the arguments point at (none yet: no identity matches)
        self._bound_out: tuple[torch.Tensor | None, ...] = (None,) * len(BATCH_FIELDS)

    def bind(self) -> None:
        """Point the arguments at the storage and derived tables (after each rebuild)."""
        cfg, a, asm, s, g = self.cfg, self._args, self.asm, self.store, self.goals
        assert g.heads32 is not None
        a.rows, a.ranks, a.eps = s.rows.data_ptr(), s.ranks.data_ptr(), s.eps.data_ptr()
        a.goal_count, a.goal_limit = g.goal_count.data_ptr(), g.goal_limit.data_ptr()
        a.goal_len, a.heads = g.goal_len32.data_ptr(), g.heads32.data_ptr()
        a.obs, a.next_obs = s.obs.data_ptr(), s.next_obs.data_ptr()  # views into one [CN, tok_w] record
        a.cands, a.next_cands = s.cands.data_ptr(), s.next_cands.data_ptr()
        a.cand_len, a.next_cand_len = s.cand_len.data_ptr(), s.next_cand_len.data_ptr()
        a.tok_w = s.tok.shape[-1]
        a.policy_version, a.post, a.powers = s.policy_version.data_ptr(), self._post32.data_ptr(), \
            self._powers.data_ptr()
        a.row_w, a.rank_w, a.head_w, a.n_post = s.rows.shape[-1], s.ranks.shape[-1], asm.head_width, \
            self._post32.numel()
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
        """The sampler's worker threads, if this batch is split over them, get ready while the draws are made (nothing
        to do on one thread: the C call is skipped)."""
        threads = torch.get_num_threads()
        if threads > 1:
            self.lib.sacglam_wake(threads, batch_size)

    def sample(self, draws: torch.Tensor, rare_u: torch.Tensor | None, out: Batch | None) -> Batch:
        """The batch of ``draws`` and ``rare_u`` (as ``TorchSampler.sample``) in one C call.

        The pointers of the draws, the scratch and the outputs are set only when they change: ``Draws`` reuses its
        draws tensor per batch size and the training loop passes its last batch as ``out``, so a call usually sets
        only the thread count and the rarity uniforms (20 output pointers cost ~3 us, 2-3% of a call of 256).
        """
        a = self._args
        B = draws.shape[0]
        if out is None:
            out = Batch(**{name: torch.empty(shape, dtype=dtype) for name, shape, dtype in self.layout.layout(B)})
        if B != a.B or draws.data_ptr() != a.draws:
            scratch = self._scratch.get(B)
            if scratch is None:
                scratch = self._scratch[B] = torch.empty((6, B), dtype=torch.int64)
            a.draws, a.draw_w, a.B, a.scratch = draws.data_ptr(), draws.shape[1], B, scratch.data_ptr()
        a.rare_u, a.R = (0, 0) if rare_u is None else (rare_u.data_ptr(), rare_u.shape[0])
        a.threads = torch.get_num_threads()  # torch's intra-op threads, as its ops
        tensors = batch_tensors(out)
        if not all(map(operator.is_, tensors, self._bound_out)):  # other output tensors than the last call's
            for arg, t in zip(_NATIVE_OUTPUTS, tensors, strict=True):
                setattr(a, arg, t.data_ptr())
            self._bound_out = tensors  # held, so a later tensor cannot reuse a freed one's identity
        if self.lib.sacglam_sample(ctypes.byref(a)) != 0:
            raise RuntimeError("the native sampler refused its arguments (n_step or rarity_draws above its limits)")
        return out


__all__ = ["SOURCES", "AddArgs", "NativeSampler", "NativeWriter", "SampleArgs", "advise_huge_pages", "build",
           "cache_dir", "load", "load_error", "pick_native"]
