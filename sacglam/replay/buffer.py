"""Device-resident replay buffer of tokenised text transitions, with hindsight relabelling at sampling time.

Layout (as SB3's buffers): every tensor has leading dims ``[C, N]`` where ``N`` is the number of parallel envs and
``C = capacity // N`` the rows per env; each env's steps are contiguous in its column and one write pointer serves all
columns because every ``add`` carries all N envs. Positions are counted in *absolute* steps ``a`` (row = ``a % C``).

Each row stores s_t (observation, candidates) and s_{t+1} (next observation, next candidates), so the n-step bootstrap
state s_{t+k} is row (t+k-1)'s next state, final observations included, with no special case.

Only transitions of completed episodes are sampled (SB3's HER does the same; a running episode has no future yet).
Per column the sampleable rows then form one window ``[lo_e, hi_e)`` of absolute positions: ``hi_e`` is the start of
the running episode and ``lo_e`` the start of the oldest episode none of whose rows was overwritten. ``add`` advances
``lo_e`` when the ring overwrites a row, so an episode whose start was overwritten is never sampled nor used as a
relabelling source. Sampling picks a column weighted by ``hi_e - lo_e`` (cumsum + searchsorted) and a uniform offset:
O(N + B) work, no capacity-sized operation and no host-device synchronisation.

HER ``future`` in O(1): each row keeps the number of achieving steps before it in its episode, and the episode's rows
double as a table "r-th achieving step -> its step index" (the r-th achieving step happens at a step >= r, so row
``start + r`` exists when it is written).

Achieved goals known only after the episode (``relabel.source=rule|llm``, a judge reading the whole episode): the
steps are added with ``achieved`` all -1, and once the episode has ended ``set_achieved(env, start, achieved)``
(start from ``episode_start(env)`` before its first add) rewrites the stored ids and every table derived from them
(ach_before, ``_ranks``, ep_ach; with a rarity option goal_count and the episode's rare_goal marks) in place, so the
torch and the native code read them as if ``add`` had received them (exactly so without rarity; the marks use the
counts at that call). It refuses a running episode and returns False when the ring has already overwritten the
episode's first row.

``Batch.goal_gap`` is t' - t for relabelled rows and -1 otherwise. With ``her.strategy`` ``final`` or ``episode`` the
source step can precede t, so a relabelled row can carry a negative gap too: a hindsight supervised term
(docs/design/ALGORITHM.md
section 9) must select ``relabelled & (goal_gap >= 0)``.

On a CPU buffer ``sample`` is one C call (``sacglam/replay/csrc/sample.c``, built on first use by
``sacglam.replay.native``;
``BufferConfig.native``) that computes the torch path below from the same draws and tables, equal field for field
(tests/test_native_sampler.py), 2.5-4x faster than it (scripts/bench_buffer.py); ``sample(out=batch)`` writes into an
earlier batch instead of allocating one. ``add`` is one C call too (``sacglam/replay/csrc/add.c``: the same storage and
tables after it as the torch path's ~80 ops, about 10x faster). On a GPU, and wherever the C code does not apply (int64
tokens; for sampling also a custom reward function or ``compile``), the torch path runs.

Torch path cost (B = 256, CPU): about 100 tensor ops, most of them on [B] vectors, plus the random row reads of the
token fields. What makes it cheap:

- the int32 per-row fields sit in one table ``_rows`` [C, N, F + G] (step, goal, ach_before, action, achieved are
  views into it; reward/logp bits, the episode's slot and the lengths are copied in by ``add``), so one gather reads
  all of a sampled row's scalars (and, for n > 1, of its whole n-step window);
- HER sources come from ``_ranks``: at row start + r, the r-th achieving step's index, goal count and goals, so the
  relabelled goal is one gather away from the sampled row (ach_step is a view of its first column);
- the sampling window (cumulative column sizes) is recomputed once per ``add``, lazily, not per sample;
- both prompts of a transition are built by one table-driven gather over [2, B] rows (``PromptAssembler``) from
  per-goal heads ``[bos?] + pre + goal + mid`` precomputed at ``register_goal``; token rows are gathered straight into
  the gather's source buffer; candidate masks are one lookup per candidate.

All derived columns and tables are rebuilt from the saved fields on ``load_state_dict`` (``_rebuild_derived``), so
``state_dict`` holds the same fields as before and older checkpoints load. ``BufferConfig.compile`` runs the sampling
path through ``torch.compile`` (all randomness is drawn before the compiled part, which is a pure function of the
storage); on CPU the inductor kernel gathers token by token and is slower than this eager path (see
scripts/bench_buffer.py --all-configs).

Large CPU tensors get ``madvise(MADV_HUGEPAGE)`` before their first write (``native.advise_huge_pages``):
random row reads then cost fewer page walks (where the kernel grants huge pages; nothing changes elsewhere).

This module imports torch only (never transformers, peft, accelerate or the agent).
"""

from __future__ import annotations

import ctypes
import operator
import warnings
from dataclasses import dataclass, field, fields
from typing import Any

import torch

from sacglam.prompting import PromptAssembler, PromptCodec, PromptPieces
from sacglam.replay import native
from sacglam.replay.her import HERConfig, equality_reward, n_step_window, pick_achieving_rank
from sacglam.types import Batch, RewardFn, TransitionBatch

_TOKEN_DTYPES = {"int16": torch.int16, "int32": torch.int32, "int64": torch.int64}
_NATIVE_MODES = ("auto", "on", "off")
_STRATEGY_CODES = {"future": 0, "episode": 1, "final": 2}  # as sacglam/replay/csrc/sample.c numbers them
# Batch fields in declaration order, and the SampleArgs field the native sampler writes each through (goal_limit and
# policy_version end in _out there, since the inputs of those names are the buffer's tables).
_BATCH_FIELDS = tuple(f.name for f in fields(Batch))
_NATIVE_OUTPUTS = tuple(f"{name}_out" if name in ("goal_limit", "policy_version") else name for name in _BATCH_FIELDS)
_batch_tensors = operator.attrgetter(*_BATCH_FIELDS)  # Batch -> its tensors in field order, as one tuple

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

# Columns of the derived per-row table ReplayBuffer._rows (int32; floats stored as their bits), then G achieved ids.
_T, _EPK, _GOAL, _ACHB, _TERM, _ACT, _OL, _NOL, _REW, _LOGP = range(10)
_F = 10


@dataclass
class BufferConfig:
    """Replay buffer options (shapes are fixed at construction; the buffer is preallocated)."""

    capacity: int = 100_000  # transitions over all envs; each env gets capacity // n_envs rows
    n_step: int = 1  # n of the n-step return (1 = one-step TD)
    gamma: float = 0.99  # discount used for the n-step return and the bootstrap factor
    device: str = "auto"  # where the storage lives; "auto" = cuda when available, else cpu
    max_obs_tokens: int = 128  # Lo, observation width in tokens
    max_goal_tokens: int = 16  # Lg, goal width in tokens
    max_cands: int = 16  # K, candidate actions per state
    max_cand_tokens: int = 8  # Lc, tokens per candidate
    max_goals: int = 4096  # rows of the goal table (distinct goals ever registered)
    max_achieved: int = 4  # G, goals newly achieved by one step (fixed width, padded with -1)
    token_dtype: str = "int32"  # int16 halves token memory and is exact when the vocabulary has < 32768 ids
    her: HERConfig = field(default_factory=HERConfig)  # hindsight relabelling (ratio 0 disables it)
    compile: bool = False  # torch.compile the sampling path (one-off compile per batch size; slower than eager on CPU)
    # CPU buffers add and sample with one C call each (sacglam/replay/native.py) instead of ~80 / ~100 torch ops; same
    # result, several times faster. auto: when it builds (else torch, with a warning); on: required (an error says why
    # not); off: torch.
    native: str = "auto"

    def __post_init__(self) -> None:
        if self.token_dtype not in _TOKEN_DTYPES:
            raise ValueError(f"token_dtype must be one of {sorted(_TOKEN_DTYPES)}, got {self.token_dtype!r}")
        if self.n_step < 1:
            raise ValueError(f"n_step must be >= 1, got {self.n_step}")
        if self.native not in _NATIVE_MODES:
            raise ValueError(f"native must be one of {_NATIVE_MODES}, got {self.native!r}")
        if isinstance(self.her, dict):  # Hydra/OmegaConf may hand a plain mapping
            self.her = HERConfig(**self.her)


def _resolve_device(device: str | torch.device) -> torch.device:
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


class ReplayBuffer:
    """Ring buffer of tokenised transitions from N envs on one device, with n-step returns and HER on sampling.

    Args:
        cfg: the options.
        n_envs: N, the number of envs every ``add`` carries.
        pad_id: token id written in padding positions of stored and sampled token tensors.
        device: overrides ``cfg.device`` when given.
        prompt: the prompt codec (or just its template token pieces) used to assemble prompts from stored tokens.
        reward_fn: reward and termination over goal ids for relabelled goals (default: equality with an achieved goal).
    """

    # Names of the per-row storage tensors, in state_dict order.
    _ROW_FIELDS = (
        "obs", "obs_len", "next_obs", "next_obs_len", "cands", "cand_len", "next_cands", "next_cand_len", "goal",
        "action", "reward", "terminated", "truncated", "episode", "step", "achieved", "logp", "policy_version",
        "ach_before", "ach_step",
    )  # fmt: skip
    _STATE_FIELDS = ("ep_len", "ep_ach", "cur_start", "cur_k", "cur_step", "cur_ach", "lo", "goal_tokens",
                     "goal_len", "goal_limit")  # fmt: skip
    # Rarity bookkeeping (her.rarity_draws / her.rare_fraction); states saved before it existed load with defaults.
    _RARITY_FIELDS = ("rare_goal", "goal_count")

    def __init__(
        self,
        cfg: BufferConfig,
        n_envs: int,
        *,
        pad_id: int,
        device: str | torch.device | None = None,
        prompt: PromptCodec | PromptPieces,
        reward_fn: RewardFn = equality_reward,
    ) -> None:
        if n_envs < 1 or cfg.capacity < n_envs:
            raise ValueError(f"need 1 <= n_envs <= capacity, got n_envs={n_envs}, capacity={cfg.capacity}")
        self.cfg = cfg
        self.n_envs = N = n_envs
        self.capacity_per_env = C = cfg.capacity // n_envs
        self.pad_id = pad_id
        self.device = dev = _resolve_device(device if device is not None else cfg.device)
        self.reward_fn = reward_fn
        if isinstance(prompt, PromptCodec):
            for name in ("max_obs_tokens", "max_goal_tokens", "max_cands", "max_cand_tokens"):
                if getattr(prompt, name) > getattr(cfg, name):
                    raise ValueError(f"PromptCodec.{name}={getattr(prompt, name)} exceeds the buffer's "
                                     f"{name}={getattr(cfg, name)}; make the buffer's limit at least as large")
            prompt = prompt.pieces
        self.pieces = prompt.to(dev)
        tdt = _TOKEN_DTYPES[cfg.token_dtype]
        self._token_max = int(torch.iinfo(tdt).max)
        Lo, K, Lc, G = cfg.max_obs_tokens, cfg.max_cands, cfg.max_cand_tokens, cfg.max_achieved

        def z(*shape: int, dtype: torch.dtype, fill: float = 0) -> torch.Tensor:
            if dev.type != "cpu":
                return torch.full(shape, fill, dtype=dtype, device=dev)
            out = torch.empty(shape, dtype=dtype)  # large CPU storage: huge pages (advised before the first touch)
            native.advise_huge_pages(out)
            return out.fill_(fill)

        # Row storage [C, N, ...]. Lengths are int16: no text field here is 32k tokens wide.
        # A row's tokens are one record, [obs | cands | cand_len | next_obs | next_cands | next_cand_len] (the
        # candidate lengths in the token dtype), so a sampled transition reads one contiguous block of memory instead
        # of six scattered ones (with n_step = 1, the bootstrap row is the sampled row). The fields are views into it.
        KL, H = K * Lc, Lo + K * Lc + K
        self._tok = z(C, N, 2 * H, dtype=tdt, fill=pad_id)
        self.obs, self.next_obs = self._tok[..., :Lo], self._tok[..., H : H + Lo]
        self.cands = self._tok[..., Lo : Lo + KL].unflatten(-1, (K, Lc))
        self.next_cands = self._tok[..., H + Lo : H + Lo + KL].unflatten(-1, (K, Lc))
        self.cand_len, self.next_cand_len = self._tok[..., Lo + KL : H], self._tok[..., H + Lo + KL :]
        self.cand_len.zero_()
        self.next_cand_len.zero_()
        self.obs_len = z(C, N, dtype=torch.int16)
        self.next_obs_len = z(C, N, dtype=torch.int16)
        self.terminated = z(C, N, dtype=torch.bool)
        self.truncated = z(C, N, dtype=torch.bool)
        self.episode = z(C, N, dtype=torch.int64)  # id = k * N + e for the k-th episode of env e
        self.policy_version = z(C, N, dtype=torch.int64)
        self.reward = z(C, N, dtype=torch.float32)
        self.logp = z(C, N, dtype=torch.float32)
        # The int32 per-row fields live in one table, so sampling reads all of a row's scalars with one gather:
        # _rows[c, e] = [step, episode slot, goal, ach_before, terminated, action, obs_len, next_obs_len, reward bits,
        # logp bits, achieved (G)] (columns _T ... _F + G). The named fields below are views into it (saved, loaded and
        # written as before); the other columns are copies of fields (torch.save refuses int32 and float32 views of
        # one storage, hence reward and logp are kept apart too).
        self._rows = z(C, N, _F + G, dtype=torch.int32)
        self._rows[..., _F:] = -1
        self.goal = self._rows[..., _GOAL]
        self.action = self._rows[..., _ACT]
        self.step = self._rows[..., _T]  # step index within the episode
        self.achieved = self._rows[..., _F:]  # left-aligned, padded with -1
        self.ach_before = self._rows[..., _ACHB]  # achieving steps of the episode strictly before this one
        # HER sources: at row start+r, [t', count, max(count - 1, 0), goals (G)] of the episode's r-th achieving step
        # (it happens at step t' >= r, so that row exists when t' is written); ach_step = t' is the saved field.
        self._rank_reset = torch.tensor([-1, 0, 0] + [-1] * G, dtype=torch.int32, device=dev)
        self._ranks = z(C, N, 3 + G, dtype=torch.int32)
        self._ranks[:] = self._rank_reset
        self.ach_step = self._ranks[..., 0]  # at row start+r: step index of the r-th achieving step
        # Episode table per column, slot = k % (C + 1): at most C completed episodes plus the running one are alive.
        S = C + 1
        self._eps = z(S, N, 2, dtype=torch.int32)
        self.ep_len = self._eps[..., 0]  # steps stored so far (final once the episode ended)
        self.ep_ach = self._eps[..., 1]  # achieving steps in the episode
        # Per-env bookkeeping [N] (absolute positions).
        self.cur_start = z(N, dtype=torch.int64)  # start of the running episode (= hi_e, end of the sampleable window)
        self.cur_k = z(N, dtype=torch.int64)  # per-env index of the running episode
        self.cur_step = z(N, dtype=torch.int64)
        self.cur_ach = z(N, dtype=torch.int64)
        self.lo = z(N, dtype=torch.int64)  # start of the oldest intact episode (= lo_e)
        # Goal table: each distinct goal's tokens once.
        self.goal_tokens = z(cfg.max_goals, cfg.max_goal_tokens, dtype=tdt, fill=pad_id)
        self.goal_len = z(cfg.max_goals, dtype=torch.int16)
        self.goal_limit = z(cfg.max_goals, dtype=torch.int64)
        self._goal_ids: dict[tuple[int, ...], int] = {}
        self._max_limit = 1  # host copy of max(goal_limit): how far back an achievement marks rows (rare_goal)
        # Rarity (her.rarity_draws, her.rare_fraction): achievements per goal over the whole run, and per row the
        # rarest goal achieved within its step limit later in the row's episode (-1: none).
        self.goal_count = z(cfg.max_goals, dtype=torch.int64)
        self.rare_goal = z(C, N, dtype=torch.int32, fill=-1)
        self._rare_w = self._rare_cdf = self._rare_total = torch.zeros((), device=dev)
        self.pos = 0  # adds so far (host int: the write pointer is the same for every column)
        self._n_sampleable = 0  # host copy, refreshed by add's single synchronisation
        # Sampling helpers derived from the fields above (rebuilt on load by _rebuild_derived, never saved).
        self._asm = PromptAssembler(self.pieces, cfg.max_goal_tokens, Lo, dev)
        pieces_fit = all(int(x.min()) >= torch.iinfo(tdt).min and int(x.max()) <= self._token_max
                         for x in (self.pieces.prefix, self.pieces.mid, self.pieces.post) if x.numel())
        self._src_dtype = tdt if pieces_fit else torch.int32  # prompt sources hold template ids next to tokens
        self._heads = z(cfg.max_goals, self._asm.head_width, dtype=self._src_dtype)  # [bos?] + pre + goal + mid
        self._goal_len32 = z(cfg.max_goals, dtype=torch.int32)
        self._cols = torch.arange(N, device=dev)
        self._positions: dict[int, torch.Tensor] = {}  # arange(L) per token width, for _pad_past
        self._steps = torch.arange(cfg.n_step, device=dev)
        self._window_pos = -1  # self.pos when the column window below was computed (-1: stale)
        self._cum = self._base = self._total_f = self._total_m1 = torch.zeros((), device=dev)
        # The native CPU sampler and add (None: the torch path samples / adds) and what they read besides the storage.
        self._native, self._native_add = self._pick_native(reward_fn)
        self._nargs, self._aargs = native.SampleArgs(), native.AddArgs()
        self._add_stats = torch.zeros(11, dtype=torch.int64)  # what sacglam_add reports (see csrc/add.c)
        self._add_scratch = torch.zeros(2 * N, dtype=torch.int64)
        if self._native is not None:
            self._heads64 = z(cfg.max_goals, self._asm.head_width, dtype=torch.int64)
            self._post64 = self.pieces.post.to(torch.int64).contiguous()
            # gamma ** j as the torch path computes it (float32 pow over a vector); for n = 1 its discount is gamma.
            width = max(64, cfg.n_step + 1)
            self._powers = (torch.tensor([1.0, cfg.gamma], dtype=torch.float32) if cfg.n_step == 1 else
                            (cfg.gamma ** torch.arange(width, dtype=torch.float32))[: cfg.n_step + 1].contiguous())
            self._scratch: dict[int, torch.Tensor] = {}
        self._draws: dict[int, torch.Tensor] = {}  # per batch size: the uniforms of a call, drawn into in place
        self._out_ok: dict[int, tuple[torch.Tensor, ...]] = {}  # per batch size: the last `out` checked
        self._layouts: dict[int, list[tuple[str, tuple[int, ...], torch.dtype]]] = {}  # per batch size
        self._rebuild_derived()
        # torch.compile fuses the sampling path's small ops: meant for GPUs, where each op is a kernel launch.
        self._sample_core = (torch.compile(self._sample_from_draws, dynamic=False) if cfg.compile
                             else self._sample_from_draws)

    # ------------------------------------------------------------------ goals

    @property
    def n_goals(self) -> int:
        """Goals registered so far."""
        return len(self._goal_ids)

    def register_goal(self, tokens: list[int] | tuple[int, ...] | torch.Tensor, limit: int = 0) -> int:
        """Store a goal's token ids once and return its id (the same id for the same tokens).

        Args:
            tokens: the goal's token ids (no padding).
            limit: the goal's step limit (0 = unknown), reported as ``Batch.goal_limit``.

        Raises:
            ValueError: the goal is wider than ``max_goal_tokens`` or the table already holds ``max_goals`` goals.
        """
        key = tuple(int(x) for x in (tokens.tolist() if isinstance(tokens, torch.Tensor) else tokens))
        if key and max(key) > self._token_max:
            raise ValueError(f"goal token id {max(key)} exceeds token_dtype={self.cfg.token_dtype}'s maximum "
                             f"{self._token_max}; set buffer token_dtype='int32'")
        gid = self._goal_ids.get(key)
        self._max_limit = max(self._max_limit, limit)
        if gid is not None:
            if limit:
                self.goal_limit[gid] = limit
            return gid
        if len(key) > self.cfg.max_goal_tokens:
            raise ValueError(f"goal has {len(key)} tokens > max_goal_tokens={self.cfg.max_goal_tokens}; "
                             f"set buffer max_goal_tokens >= {len(key)}")
        gid = len(self._goal_ids)
        if gid >= self.cfg.max_goals:
            raise ValueError(f"goal table overflow: {gid} goals already registered = max_goals; "
                             f"set buffer max_goals larger (e.g. {2 * self.cfg.max_goals})")
        self.goal_tokens[gid, : len(key)] = torch.tensor(key, dtype=self.goal_tokens.dtype)
        self.goal_len[gid] = len(key)
        self.goal_limit[gid] = limit
        self._set_heads(slice(gid, gid + 1))
        self._goal_ids[key] = gid
        return gid

    # ------------------------------------------------------------------ add

    def __len__(self) -> int:
        """Transitions stored (sampleable or not)."""
        return min(self.pos, self.capacity_per_env) * self.n_envs

    @property
    def num_sampleable(self) -> int:
        """Transitions of completed, intact episodes (what ``sample`` draws from)."""
        return self._n_sampleable

    def _fit(self, x: torch.Tensor, lens: torch.Tensor, width: int, what: str, limit_name: str) -> torch.Tensor:
        """Pad/cut the last dim of ``x`` to ``width``; wider than ``width`` with content there is an error."""
        have = x.shape[-1]
        if have > width:
            need = int(lens.max())
            if need > width:
                raise self._width_error(what, need, width, limit_name)
            return x[..., :width]
        if have < width:
            pad = x.new_full((*x.shape[:-1], width - have), self.pad_id)
            return torch.cat([x, pad], dim=-1)
        return x

    @staticmethod
    def _width_error(what: str, need: int, width: int, limit_name: str) -> ValueError:
        return ValueError(f"{what} has {need} tokens > {limit_name}={width}; set buffer {limit_name} >= {need}")

    def _check_step(self, stats: list[int], goal: torch.Tensor, achieved: torch.Tensor, action: torch.Tensor) -> None:
        """Raise for the first failed check of an add, from ``stats`` = [max token id (or none), max cur_step, goal
        min, goal max, achieved min, achieved max, action min, action max] (the ids in the messages: the step's)."""
        cfg, N, C = self.cfg, self.n_envs, self.capacity_per_env
        tok_max, ep_steps, g_min, g_max, a_min, a_max, act_min, act_max = stats
        if tok_max > self._token_max:
            raise ValueError(f"a token id exceeds token_dtype={cfg.token_dtype}'s maximum {self._token_max}; "
                             f"set buffer token_dtype='int32' (int16 only fits vocabularies below 32768)")
        if ep_steps >= C:
            raise ValueError(f"an episode reached {ep_steps + 1} steps > capacity_per_env={C} (capacity "
                             f"{cfg.capacity} // n_envs {N}); an episode must fit in its env's rows: set capacity "
                             f">= {(ep_steps + 1) * N}")
        if g_min < 0 or g_max >= self.n_goals:
            raise ValueError(f"TransitionBatch.goal holds an id outside the goal table [0, {self.n_goals}): "
                             f"{goal.tolist()}; register goals with register_goal(tokens) first")
        if a_min < -1 or a_max >= self.n_goals:
            raise ValueError(f"TransitionBatch.achieved holds an id outside [-1, {self.n_goals}) (padding is -1): "
                             f"{achieved.tolist()}; register achieved goals with register_goal(tokens) first")
        if act_min < 0 or act_max >= cfg.max_cands:
            raise ValueError(f"TransitionBatch.action holds an index outside [0, max_cands={cfg.max_cands}): "
                             f"{action.tolist()}")

    def _check_shapes(self, t: TransitionBatch) -> None:
        N, cfg = self.n_envs, self.cfg
        for name in ("obs", "next_obs", "cands", "next_cands", "goal", "action", "reward", "terminated", "truncated",
                     "achieved", "logp", "policy_version"):
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

    def add(self, t: TransitionBatch) -> None:
        """Store one step of all N envs.

        Args:
            t: the step (tensors on any device; moved here). Token widths may be smaller than the buffer's limits
                (padded) or larger when the extra positions are padding.

        Raises:
            ValueError: wrong number of envs, a transition wider than a configured limit (names the limit and the value
                needed), an unregistered goal id, or an episode longer than ``capacity // n_envs``. A refused step
                leaves the buffer unchanged.
        """
        self._check_shapes(t)
        if self._native_add is not None:
            self._add_native(t)
        else:
            self._add_torch(t)

    def _add_native(self, t: TransitionBatch) -> None:
        """``_add_torch`` in one C call (``sacglam/replay/csrc/add.c``): the same storage and tables after it."""
        lib, a = self._native_add, self._aargs
        assert lib is not None
        x = {name: getattr(t, name).to("cpu", dtype).contiguous() for name, dtype, _ in _ADD_INPUTS}
        for name, _, arg in _ADD_INPUTS:
            setattr(a, arg, x[name].data_ptr())
        a.Lo_in, (a.K_in, a.Lc_in), a.G_in = x["obs"].shape[1], x["cands"].shape[1:], x["achieved"].shape[1]
        a.P, a.n_goals, a.max_limit = self.pos, self.n_goals, self._max_limit
        for name in ("cur_start", "cur_k", "cur_step", "cur_ach", "lo"):  # [N] bookkeeping, updated in place
            setattr(a, name, getattr(self, name).data_ptr())
        code = lib.sacglam_add(ctypes.byref(a))
        if code:
            stats = self._add_stats.tolist()
            if code == 1:
                what = ("observation", "next observation", "candidate action", "candidate action")[stats[0]]
                name = "max_obs_tokens" if stats[0] < 2 else "max_cand_tokens"
                raise self._width_error(what, stats[1], getattr(self.cfg, name), name)
            self._check_step(stats[2:10], x["goal"], x["achieved"], x["action"])
            raise AssertionError(f"sacglam_add refused a step with code {code} that no check explains: {stats}")
        self.pos += 1
        self._n_sampleable = int(self._add_stats[10])

    def _add_torch(self, t: TransitionBatch) -> None:
        """``add`` with torch ops on the buffer's device (one host synchronisation, for the checks)."""
        cfg, dev, N, C = self.cfg, self.device, self.n_envs, self.capacity_per_env
        S = C + 1
        P = self.pos
        row = P % C
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
        goal, action = to(t.goal).long(), to(t.action).long()
        achieved = to(t.achieved).long()
        # Left-align the achieved ids (valid first) so a uniform pick among the first `count` entries is exact.
        achieved = achieved.gather(1, torch.sort((achieved < 0).to(torch.uint8), dim=1, stable=True).indices)
        if achieved.shape[1] < cfg.max_achieved:
            achieved = torch.cat([achieved, achieved.new_full((N, cfg.max_achieved - achieved.shape[1]), -1)], 1)
        terminated, truncated = to(t.terminated).bool(), to(t.truncated).bool()
        done = terminated | truncated
        cols = self._cols

        # Bookkeeping computed before any write, so a failed check leaves the buffer unchanged.
        lo = self.lo
        if P >= C:  # the row about to be overwritten (absolute P - C) breaks its episode: lo moves past that episode
            old = self._rows[row]  # [N, F + G]: the overwritten step's index and its episode's row of _eps_flat
            old_end = self._eps_flat[:, 0].index_select(0, old[:, _EPK]) - old[:, _T] + (P - C)
            lo = torch.maximum(lo, old_end)
        new_start = torch.where(done, P + 1, self.cur_start)
        achieving = (achieved >= 0).any(1)
        # The single synchronisation: the checks' extremes and the new sampleable count in one transfer.
        no_ach = torch.full((), -1, dtype=torch.long, device=dev)
        ach_range = torch.aminmax(achieved) if achieved.numel() else (no_ach, no_ach)
        stats = [self.cur_step.max(), *torch.aminmax(goal), *ach_range, *torch.aminmax(action), (new_start - lo).sum()]
        if self._token_max < torch.iinfo(torch.int64).max:
            stats += [obs.max(), next_obs.max(), cands.max(), next_cands.max()]
        ep_steps, g_min, g_max, a_min, a_max, act_min, act_max, n_sampleable, *tok_max = torch.stack(stats).tolist()
        self._check_step([max(tok_max, default=-1), ep_steps, g_min, g_max, a_min, a_max, act_min, act_max], goal,
                         achieved, action)

        # Row writes (copies convert to the storage dtypes).
        self.obs[row] = obs
        self.obs_len[row] = obs_len
        self.next_obs[row] = next_obs
        self.next_obs_len[row] = next_obs_len
        for dst, dst_len, ids, lens in ((self.cands, self.cand_len, cands, cand_len),
                                        (self.next_cands, self.next_cand_len, next_cands, next_cand_len)):
            K = ids.shape[1]
            if cfg.max_cands > K:
                dst[row, :, K:] = self.pad_id
                dst_len[row, :, K:] = 0
            dst[row, :, :K] = ids
            dst_len[row, :, :K] = lens
        self.terminated[row] = terminated
        self.truncated[row] = truncated
        self.episode[row] = self.cur_k * N + cols
        self.policy_version[row] = to(t.policy_version)
        # One block of the row table: step, goal, ach_before, action, reward, logp, achieved and the derived columns.
        slot = self.cur_k % S
        self.reward[row] = to(t.reward)
        self.logp[row] = to(t.logp)
        bits = torch.stack([self.reward[row], self.logp[row]]).view(torch.int32)
        self._rows[row] = torch.cat([torch.stack([self.cur_step, slot * N + cols, goal, self.cur_ach, terminated,
                                                  action, obs_len, next_obs_len, bits[0], bits[1]], 1), achieved], 1)
        # The r-th achieving step (r = cur_ach) is recorded at row start + r, which is <= this row.
        ach_row = torch.where(achieving, (self.cur_start + self.cur_ach) % C, row)
        self._ranks[row] = self._rank_reset
        self._ranks[ach_row, cols] = torch.where(achieving.unsqueeze(1), self._rank_values(self.cur_step, achieved),
                                                 self._rank_reset).to(torch.int32)
        cur_ach = self.cur_ach + achieving.long()
        self._eps[slot, cols] = torch.stack([self.cur_step + 1, cur_ach], 1).to(torch.int32)  # ep_len, ep_ach
        if cfg.her.counts_goals:
            self._mark_rare(row, achieved, achieving)

        # Episode ends: the next row starts a new episode.
        self.lo = lo
        self.cur_start = new_start
        self.cur_k = self.cur_k + done.long()
        self.cur_step = torch.where(done, 0, self.cur_step + 1)
        self.cur_ach = torch.where(done, 0, cur_ach)
        self.pos = P + 1
        self._n_sampleable = n_sampleable

    def _mark_rare(self, row: int, achieved: torch.Tensor, achieving: torch.Tensor) -> None:
        """Count this step's achievements and mark the rows that lead to its rarest one (no synchronisation).

        The rows of the running episode at most ``limit - 1`` steps before this one (``limit`` = the goal's step
        limit, or the largest known when unset) and this row get ``rare_goal = g`` unless they already lead to a goal
        achieved fewer times.

        Args:
            row: the storage row just written.
            achieved: [N, G] long goal ids achieved by the step, left-aligned, padded with -1.
            achieving: [N] bool, the step achieved something.
        """
        C = self.capacity_per_env
        valid = achieved >= 0
        ids = achieved.clamp(min=0)
        self.goal_count.index_add_(0, ids.view(-1), valid.view(-1).long())
        big = torch.iinfo(torch.int64).max
        count = torch.where(valid, self.goal_count.index_select(0, ids.view(-1)).view_as(ids), big)  # [N, G]
        g_count, best = count.min(1)  # the first of ties, as argmin
        g = ids.gather(1, best.unsqueeze(1)).squeeze(1)  # [N] the rarest achieved goal
        limit = self.goal_limit.index_select(0, g)
        limit = torch.where(limit > 0, limit, self._max_limit)
        back = torch.arange(min(self._max_limit, C), device=self.device).unsqueeze(1)  # [W, 1] steps back
        rows = (row - back.squeeze(1)) % C  # [W] rows of this episode's last W steps (episodes fit in C rows)
        ok = achieving & (back <= self.cur_step) & (back < limit)  # [W, N]
        self.rare_goal[row] = -1  # the row was just overwritten: forget the old episode's mark
        old = self.rare_goal.index_select(0, rows).long()  # [W, N]
        old_count = torch.where(old >= 0, self.goal_count.index_select(0, old.clamp(min=0).view(-1)).view_as(old), big)
        take = ok & (g_count < old_count)  # where nothing was achieved, g_count is big and ok is False
        self.rare_goal.index_copy_(0, rows, torch.where(take, g, old).to(torch.int32))

    # ------------------------------------------------------------------ achieved goals known after the episode

    def episode_start(self, env: int) -> int:
        """The absolute position where env ``env``'s running episode started (its first step's ``pos`` before the
        add; ``cur_start[env]``), to be passed later to ``set_achieved``. One host read."""
        if not 0 <= env < self.n_envs:
            raise ValueError(f"env {env} is outside [0, n_envs={self.n_envs})")
        return int(self.cur_start[env])

    def set_achieved(self, env: int, start: int, achieved: torch.Tensor) -> bool:
        """Replace the achieved goal ids of env ``env``'s finished episode whose first step was added at absolute
        position ``start`` (``buffer.pos``, or ``episode_start(env)``, before the add of its first step).

        Afterwards every table is what ``add`` would have left had the episode been added with these ids: the
        stored ids (left-aligned as ``add`` aligns them), ``ach_before``, the "r-th achieving step" table
        ``_ranks``, the episode's ``ep_ach`` and, with ``her.counts_goals``, ``goal_count`` (the episode's old
        achievements subtracted, the new ones added) and the episode's ``rare_goal`` marks. The marks are computed
        with the goal counts (and step limits) at the time of this call, not with the counts each step would have
        seen when added one by one, so they can differ from an incremental ``add`` of the same ids; other episodes'
        marks are left as they are. The rarity sampling distribution is refreshed on the next ``sample``.

        Cost: O(L * G) elementwise work in about 35 small tensor ops and one host synchronisation (two with
        ``her.counts_goals``, whose marks take O(L * A) for the episode's A achieving steps).

        Args:
            env: the env (column) in [0, n_envs).
            start: absolute position of the episode's first step.
            achieved: [L, G'] integer goal ids, -1 padded, any order within a row (any device), with L the episode's
                stored length and G' <= ``max_achieved``.

        Returns:
            True when the episode was rewritten; False (nothing changed) when it is no longer intact in storage (its
            first row was overwritten by the ring).

        Raises:
            ValueError: (the buffer unchanged) ``env`` out of range, ``achieved`` not a 2-D integer tensor, G' >
                ``max_achieved``, an id outside [-1, n_goals), the episode not finished yet (``start`` at or past
                the running episode's start), ``start`` not the first step of a stored episode, or L not the stored
                length (the messages name the values).
        """
        cfg, dev, N, C = self.cfg, self.device, self.n_envs, self.capacity_per_env
        G = cfg.max_achieved
        if not 0 <= env < N:
            raise ValueError(f"set_achieved: env {env} is outside [0, n_envs={N})")
        if not isinstance(achieved, torch.Tensor):
            achieved = torch.as_tensor(achieved)
        if achieved.dim() != 2 or achieved.is_floating_point() or achieved.is_complex() or \
                achieved.dtype == torch.bool:
            raise ValueError(f"set_achieved: achieved must be a 2-D [L, G'] integer tensor of goal ids, got shape "
                             f"{tuple(achieved.shape)} dtype {achieved.dtype}")
        L, width = achieved.shape
        if width > G:
            raise ValueError(f"set_achieved: achieved has width {width} > max_achieved={G}; set buffer "
                             f"max_achieved >= {width}")
        if start < 0:
            raise ValueError(f"set_achieved: start {start} < 0 is no absolute position")
        ach = achieved.to(dev).long()
        row0 = start % C
        # The single synchronisation of the checks: bookkeeping of the column, the stored row at `start`, the
        # length of its episode and the range of the new ids.
        epk = self._rows[row0, env, _EPK]
        no_ach = torch.full((), -1, dtype=torch.long, device=dev)
        a_min, a_max = torch.aminmax(ach) if ach.numel() else (no_ach, no_ach)
        cur_start, lo, step0, ep_len, a_min_h, a_max_h = torch.stack([
            self.cur_start[env], self.lo[env], self._rows[row0, env, _T].long(),
            self._eps_flat[epk.long(), 0].long(), a_min, a_max]).tolist()
        if a_min_h < -1 or a_max_h >= self.n_goals:
            raise ValueError(f"set_achieved: achieved holds an id outside [-1, {self.n_goals}) (padding is -1): "
                             f"min {a_min_h}, max {a_max_h}; register achieved goals with register_goal first")
        if start >= cur_start:
            raise ValueError(f"set_achieved: env {env}'s episode starting at {start} is not finished (the running "
                             f"episode started at {cur_start}, pos = {self.pos}); call it once the episode's last "
                             f"step (terminated or truncated) has been added")
        if start < lo or start < self.pos - C:
            return False  # its first row was overwritten: the episode is gone from the sampleable window
        if step0 != 0:
            raise ValueError(f"set_achieved: position {start} holds step {step0} of an episode of env {env}, not "
                             f"its first step; pass the position of the episode's first step (episode_start)")
        if ep_len != L:
            raise ValueError(f"set_achieved: achieved has {L} rows but env {env}'s episode starting at {start} "
                             f"has {ep_len} stored steps")

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
                            self._rank_values(order.to(torch.int32), ach.index_select(0, order).to(torch.int32)),
                            self._rank_reset)  # [L, 3 + G]
        old = self._rows[rows, env, _F:].long() if cfg.her.counts_goals else None  # [L, G] the replaced ids
        self._rows[rows, env, _F:] = ach.to(torch.int32)
        self._rows[rows, env, _ACHB] = n_before
        self._ranks[rows, env] = ranks
        self._eps_flat[epk.long(), 1] = n_ach
        if old is not None:
            self._remark_rare(env, rows, old, ach, achieving)
        self._window_pos = -1  # the rarity weights read the marks and counts: recomputed on the next sample
        return True

    def _remark_rare(self, env: int, rows: torch.Tensor, old: torch.Tensor, new: torch.Tensor,
                     achieving: torch.Tensor) -> None:
        """``set_achieved``'s rarity update: recount and mark one episode's rows anew.

        ``goal_count`` loses the episode's old achievements and gains the new ones; then each row r of the episode
        gets, as ``_mark_rare`` would with these (now fixed) counts, the rarest goal g*(t') of the achieving step t'
        >= r with t' - r < limit(g*(t')) that has the fewest achievements, the earliest such t' among ties (-1:
        none). g*(t') is the step's goal achieved fewest times (the first of ties).

        Args:
            env: the column.
            rows: [L] storage rows of the episode, in step order.
            old: [L, G] long, the ids stored before (-1 padded).
            new: [L, G] long, the new ids, left-aligned, -1 padded.
            achieving: [L] bool, the step achieves something under ``new``.
        """
        L, dev = rows.shape[0], self.device
        count = self.goal_count
        for ids, sign in ((old, -1), (new, 1)):
            count.index_add_(0, ids.clamp(min=0).view(-1), (ids >= 0).view(-1).long() * sign)
        steps = achieving.nonzero().squeeze(1)  # [A] achieving steps (a host synchronisation)
        if steps.numel() == 0:
            self.rare_goal[rows, env] = -1
            return
        big = torch.iinfo(torch.int64).max
        ids = new.index_select(0, steps)  # [A, G]
        c = torch.where(ids >= 0, count.index_select(0, ids.clamp(min=0).view(-1)).view_as(ids), big)
        g_count, best = c.min(1)  # [A] the count of each achieving step's rarest goal (the first of ties, as add)
        g = ids.gather(1, best.unsqueeze(1)).squeeze(1)  # [A]
        limit = self.goal_limit.index_select(0, g)
        limit = torch.where(limit > 0, limit, self._max_limit)  # <= _max_limit; t' - r < L <= C needs no cap
        back = steps.unsqueeze(0) - torch.arange(L, device=dev).unsqueeze(1)  # [L, A] t' - r
        # Fewest achievements first, then the earliest step (add keeps a mark unless a later step is strictly rarer).
        key = torch.where((back >= 0) & (back < limit), g_count * L + steps, big)  # [L, A]
        best_key, pick = key.min(1)
        self.rare_goal[rows, env] = torch.where(best_key < big, g.index_select(0, pick), -1).to(torch.int32)

    # ------------------------------------------------------------------ sample

    def sample(self, batch_size: int, generator: torch.Generator, *, out: Batch | None = None) -> Batch:
        """Sample transitions of completed episodes uniformly, relabel per ``cfg.her``, and build model inputs.

        Runs entirely on the buffer's device with no host-device synchronisation.

        Args:
            batch_size: B.
            generator: a ``torch.Generator`` on the buffer's device (the only source of randomness).
            out: a ``Batch`` of B transitions returned by an earlier ``sample`` of this buffer, to be overwritten in
                place and returned instead of allocating a new one (as torch's ``out=``). The training loop passes
                its previous batch once the update is done with it; on a CPU buffer this saves the allocation of
                ~20 tensors (a fifth of a call at B = 256). The batch is the same as without ``out``.

        Returns:
            A ``Batch`` (see ``sacglam.types``) with prompts [B, Lp], candidates [B, K, Lc] and the n-step quantities.

        Raises:
            ValueError: no completed episode is stored yet, the generator is on another device, or ``out`` does not
                have this buffer's batch layout for ``batch_size`` (names the field).
        """
        if self._n_sampleable == 0:
            raise ValueError("the replay buffer has no completed episode yet (only finished episodes are sampled); "
                             "collect until at least one episode ends before sampling")
        dev = self.device
        if generator.device.type != dev.type:
            raise ValueError(f"sample needs a torch.Generator on the buffer's device {dev}, got one on "
                             f"{generator.device}; use torch.Generator(device={str(dev)!r})")
        if self._native is not None:
            # The sampler's worker threads, if this batch is split over them, get ready while the draws are made.
            self._native.sacglam_wake(torch.get_num_threads(), batch_size)
        if self._window_pos != self.pos:
            self._refresh_window()
        # All randomness is drawn here, so the rest is a pure function of the storage (and can be compiled).
        her = self.cfg.her
        draws = self._draws.get(batch_size)
        if draws is None:
            draws = self._draws[batch_size] = torch.empty(batch_size, 3 + her.rarity_draws, device=dev,
                                                          dtype=torch.float64)
        torch.rand(draws.shape, generator=generator, device=dev, dtype=torch.float64, out=draws)
        n_rare = round(batch_size * her.rare_fraction)
        rare_u = torch.rand(n_rare, generator=generator, device=dev, dtype=torch.float64) if n_rare else None
        if out is not None:
            self._check_out(out, batch_size)
        if self._native is not None:
            return self._sample_native(draws, rare_u, out)
        rare_rows = None
        if rare_u is not None:  # inverse-CDF draws: O(R log(C N)) per call, the cumulative sum is built once per add
            rare_rows = torch.searchsorted(self._rare_cdf, rare_u * self._rare_total, right=True)
            rare_rows = rare_rows.clamp_(max=self._rare_cdf.shape[0] - 1)
        result = self._sample_core(draws, rare_rows)
        if out is None:
            return Batch(**result)
        for name in _BATCH_FIELDS:
            getattr(out, name).copy_(result[name])
        return out

    def _batch_layout(self, batch_size: int) -> list[tuple[str, tuple[int, ...], torch.dtype]]:
        """(field, shape, dtype) of every ``Batch`` field that ``sample(batch_size)`` returns, in field order."""
        cached = self._layouts.get(batch_size)
        if cached is not None:
            return cached
        B, K, Lc, Lp = batch_size, self.cfg.max_cands, self.cfg.max_cand_tokens, self._asm.prompt_width
        i64, bl, f32 = torch.int64, torch.bool, torch.float32
        ids, cands, row = ((B, Lp), (B, K, Lc), (B,))
        layout = dict(prompt_ids=(ids, i64), prompt_mask=(ids, bl), cand_ids=(cands, i64), cand_mask=(cands, bl),
                      action=(row, i64), reward=(row, f32), discount=(row, f32), n_steps=(row, i64),
                      terminated=(row, bl), truncated=(row, bl), goal=(row, i64), relabelled=(row, bl),
                      goal_gap=(row, i64), goal_limit=(row, i64), logp=(row, f32), policy_version=(row, i64))
        cached = self._layouts[batch_size] = [(name, *layout[name.removeprefix("next_")]) for name in _BATCH_FIELDS]
        return cached

    def _check_out(self, out: Batch, batch_size: int) -> None:
        """Raise unless every tensor of ``out`` has the shape and dtype ``sample(batch_size)`` returns, contiguous, on
        this buffer's device: what may be written in place (the native sampler writes through raw pointers)."""
        ok = self._out_ok.get(batch_size)  # the tensors checked last time (held, so `is` cannot match a new object)
        if ok is not None and all(map(operator.is_, _batch_tensors(out), ok)):
            return
        for name, shape, dtype in self._batch_layout(batch_size):
            t = getattr(out, name)
            if (not isinstance(t, torch.Tensor) or tuple(t.shape) != shape or t.dtype != dtype
                    or t.device.type != self.device.type or not t.is_contiguous()):
                got = f"{tuple(t.shape)} {t.dtype} on {t.device}" if isinstance(t, torch.Tensor) else type(t).__name__
                raise ValueError(f"sample(out=...): out.{name} is {got}, but a batch of {batch_size} from this buffer "
                                 f"has {shape} {dtype} on {self.device}, contiguous; pass a Batch that sample("
                                 f"{batch_size}, ...) returned, or out=None")
        self._out_ok[batch_size] = _batch_tensors(out)

    def _refresh_window(self) -> None:
        """Per-column sampling window, recomputed once per ``add`` (lazily, on the device, no synchronisation).

        A draw x in [0, total) picks column ``col = searchsorted(cum, x, right=True)`` and absolute position
        ``a = lo[col] + x - (cum[col] - w[col])``; sampling works with ``z = a * N + col = base[col] + x * N`` (the
        column's offset folded into ``base``), whose storage row is ``z % (C * N)`` and whose step j later is z + j N.
        """
        N = self.n_envs
        w = self.cur_start - self.lo  # [N] sampleable rows per column
        cum = torch.cumsum(w, 0)
        self._cum = cum
        self._base = (self.lo - (cum - w)) * N + torch.arange(N, device=self.device)
        self._total_f, self._total_m1 = cum[-1].to(torch.float64), cum[-1] - 1
        if self._native is not None:  # a CPU buffer: reading these scalars is no device synchronisation
            a = self._nargs
            a.cum, a.base = self._cum.data_ptr(), self._base.data_ptr()
            a.total_f, a.total_m1 = float(self._total_f), int(self._total_m1)
        if self.cfg.her.rare_fraction > 0:
            # Sampleable rows: absolute positions [lo, cur_start) of each column, stored at position % C.
            C = self.capacity_per_env
            offset = (torch.arange(C, device=self.device).unsqueeze(1) - self.lo) % C  # [C, N]
            sampleable = (offset < w).to(torch.float64)
            g = self.rare_goal.long()
            inv = 1.0 / self.goal_count.index_select(0, g.clamp(min=0).view(-1)).view_as(g).clamp(min=1)
            # A tiny floor keeps the total positive (uniform over sampleable rows when none leads to anything).
            self._rare_w = ((torch.where(g >= 0, inv, 0.0) + 1e-30) * sampleable).view(-1)
            # Row r is drawn for u in [cdf[r - 1], cdf[r]): weight-0 rows (cdf unchanged) are never drawn; the scale
            # just below 1 keeps u < cdf[-1] despite rounding.
            self._rare_cdf = torch.cumsum(self._rare_w, 0)
            self._rare_total = self._rare_cdf[-1] * (1 - 1e-9)
            if self._native is not None:
                self._nargs.rare_cdf, self._nargs.rare_total = self._rare_cdf.data_ptr(), float(self._rare_total)
        self._window_pos = self.pos

    def _sample_from_draws(
        self, draws: torch.Tensor, rare_rows: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        """The sampling path given its uniforms ``draws`` [B, 3 + m] (row pick, relabel coin, rank, goal in step,
        then the other m - 1 rank draws of ``her.rarity_draws``) and the rows drawn by rarity ``rare_rows`` [R]
        (flat storage rows; they replace the last R uniform picks).

        Reads the derived tables (``_rows``, ``_ranks``, ``_eps``, ``_heads``): per sampled row one gather of its
        scalars, one of the episode and one of the relabelling source, then row gathers of the token fields straight
        into the prompt sources; both prompts (s_t and s_{t+k}) come from one table-driven gather over [2, B] rows.
        """
        N, cfg = self.n_envs, self.cfg
        B, n, G, CN = draws.shape[0], cfg.n_step, cfg.max_achieved, self.capacity_per_env * self.n_envs
        dev = draws.device

        # Column weighted by its window size, then a uniform offset inside the window (see _refresh_window).
        x = torch.minimum((draws[:, 0] * self._total_f).long(), self._total_m1)
        col = torch.searchsorted(self._cum, x, right=True)  # [B]
        z = torch.add(self._base.index_select(0, col), x, alpha=N)  # [B] a * N + col, a = absolute step of s_t
        if rare_rows is not None:  # a flat row r * N + col is z modulo C * N, and z is only ever used modulo C * N
            z = torch.cat([z[: B - rare_rows.shape[0]], rare_rows])
        if n == 1:
            flat = z % CN  # storage row (flattened [C * N])
            win_rows = self._rows_flat.index_select(0, flat).unsqueeze(1)  # [B, 1, F + G]
        else:
            win = torch.add(z.unsqueeze(1), self._steps, alpha=N) % CN  # [B, n] rows of steps t .. t + n - 1
            flat = win[:, 0]
            win_rows = self._rows_flat.index_select(0, win.view(-1)).view(B, n, -1)  # [B, n, F + G]
        row = win_rows[:, 0]  # [B, F + G] int32
        t = row[:, _T]
        ep = self._eps_flat.index_select(0, row[:, _EPK])  # [B, 2]: ep_len, ep_ach
        reward = win_rows[:, :, _REW].view(torch.float32)  # [B, n]
        term = win_rows[:, :, _TERM].bool()
        if cfg.her.ratio > 0:  # a static switch: ratio 0 returns exactly the stored transitions
            m = cfg.her.rarity_draws
            if m == 1:
                rank, eligible = pick_achieving_rank(cfg.her.strategy, row[:, _ACHB], ep[:, 1], draws[:, 2])
                src = self._ranks_flat.index_select(0, torch.add(z, rank - t, alpha=N) % CN)  # [B, 3 + G] (_ranks)
                # pick_goal_of_step on the source step's goals, with count and max(count - 1, 0) precomputed by add.
                q = torch.minimum((draws[:, 3] * src[:, 1]).long(), src[:, 2])
                new_goal = src[:, 3:].gather(1, q.unsqueeze(1)).squeeze(1)
            else:  # m candidate sources; the goal achieved fewest times wins (argmin takes the first of ties)
                u = torch.cat([draws[:, 2:3], draws[:, 4:]], 1)  # [B, m]
                rank, eligible = pick_achieving_rank(cfg.her.strategy, row[:, _ACHB, None], ep[:, 1, None], u)
                eligible = eligible[:, 0]
                srcs = self._ranks_flat.index_select(0, (torch.add(z.unsqueeze(1), rank - t.unsqueeze(1), alpha=N)
                                                         % CN).view(-1)).view(B, m, -1)  # [B, m, 3 + G]
                q = torch.minimum((draws[:, 3:4] * srcs[:, :, 1]).long(), srcs[:, :, 2])
                goals = srcs[:, :, 3:].gather(2, q.unsqueeze(2)).squeeze(2)  # [B, m]
                count = self.goal_count.index_select(0, goals.clamp(min=0).view(-1).long()).view(B, m)
                best = count.argmin(1, keepdim=True)  # [B, 1]
                src = srcs.gather(1, best.unsqueeze(2).expand(B, 1, srcs.shape[2])).squeeze(1)
                new_goal = goals.gather(1, best).squeeze(1)
            # An eligible source is an achieving step: its picked goal is >= 0 (the check pick_goal_of_step needs).
            relabelled = (draws[:, 1] < cfg.her.ratio) & eligible
            goal = torch.where(relabelled, new_goal, row[:, _GOAL]).long()
            achieved = win_rows[:, :, _F:].long().view(B * n, G)
            r_new, term_new = self.reward_fn(achieved, goal if n == 1 else goal.repeat_interleave(n))
            rel = relabelled.unsqueeze(1)
            reward = torch.where(rel, r_new.view(B, n).to(torch.float32), reward)
            term = torch.where(rel, term_new.view(B, n).bool(), term)
            goal_gap = torch.where(relabelled, src[:, 0] - t, -1).long()
        else:
            goal = row[:, _GOAL].long()
            relabelled = torch.zeros(B, dtype=torch.bool, device=dev)
            goal_gap = torch.full((B,), -1, dtype=torch.long, device=dev)
        # Termination is recomputed for the relabelled goal: an episode that ended because the *stored* goal was
        # reached is, for a goal g' not reached there, cut short like a time limit, so its window bootstraps from the
        # final state (stored in next_obs) with g'.
        steps_left = ep[:, 0] - t
        if n == 1:  # n_step_window in closed form for n = 1: k = 1, the return is the reward
            term_end = term[:, 0]
            ret = reward[:, 0].contiguous()
            trunc_end = torch.where(term_end, False, steps_left == 1)
            discount = torch.where(term_end, 0.0, cfg.gamma)  # float32, = gamma ** 1 * (1 - terminated)
            k = torch.ones(B, dtype=torch.long, device=dev)
            boot, next_obs_len = flat, row[:, _NOL]
        else:
            ret, discount, k, term_end, trunc_end = n_step_window(reward, term, steps_left, cfg.gamma)
            boot = torch.add(z, k - 1, alpha=N) % CN
            next_obs_len = win_rows[:, :, _NOL].gather(1, (k - 1).unsqueeze(1)).squeeze(1)

        # Tokens: gathered rows go straight into the prompt sources [head | obs | post | pad] and candidate blocks.
        asm = self._asm
        Hw, Lo = asm.head_width, cfg.max_obs_tokens
        src_tok = torch.empty((2, B, asm.source_width), dtype=self._src_dtype, device=dev)
        src_tok[:, :, :Hw] = self._heads.index_select(0, goal)
        self._gather_rows(src_tok[0, :, Hw : Hw + Lo], self._obs_flat, flat)
        self._gather_rows(src_tok[1, :, Hw : Hw + Lo], self._next_obs_flat, boot)
        src_tok[:, :, Hw + Lo :] = asm.tail_tokens
        prompt_ids, prompt_mask = asm.gather(src_tok, self._goal_len32.index_select(0, goal),
                                             torch.stack([row[:, _OL], next_obs_len]))
        K, Lc = cfg.max_cands, cfg.max_cand_tokens
        cands = torch.empty((2, B, K * Lc), dtype=self.cands.dtype, device=dev)
        self._gather_rows(cands[0], self._cands_flat, flat)
        self._gather_rows(cands[1], self._next_cands_flat, boot)
        cand_len = torch.empty((2, B, K), dtype=self.cand_len.dtype, device=dev)
        self._gather_rows(cand_len[0], self._cand_len_flat, flat)
        self._gather_rows(cand_len[1], self._next_cand_len_flat, boot)
        cand_ids = cands.long().view(2, B, K, Lc)
        # Mask rows looked up by length; the table's rows are read as one wider integer each where Lc allows it.
        cand_mask = self._cand_mask_table.index_select(0, cand_len.view(-1).to(torch.int32))
        cand_mask = cand_mask.view(torch.bool).view(2, B, K, Lc)
        return dict(
            prompt_ids=prompt_ids[0],
            prompt_mask=prompt_mask[0],
            cand_ids=cand_ids[0],
            cand_mask=cand_mask[0],
            action=row[:, _ACT].long(),
            reward=ret,
            discount=discount,
            next_prompt_ids=prompt_ids[1],
            next_prompt_mask=prompt_mask[1],
            next_cand_ids=cand_ids[1],
            next_cand_mask=cand_mask[1],
            terminated=term_end,
            truncated=trunc_end,
            n_steps=k,
            goal=goal,
            relabelled=relabelled,
            goal_gap=goal_gap,
            goal_limit=self.goal_limit.index_select(0, goal),
            logp=row[:, _LOGP].view(torch.float32).contiguous(),
            policy_version=self._policy_version_flat.index_select(0, flat),
        )

    def _gather_rows(self, out: torch.Tensor, table: torch.Tensor, index: torch.Tensor) -> None:
        """``out[i] = table[index[i]]`` for [B, L] ``out`` (a view, e.g. a column block), [R, L] ``table``.

        Eager, the rows are written in place (no temporary). torch.compile cannot trace ``out=`` into a strided view,
        and a widened ``out`` (template ids that do not fit the token dtype) cannot take it: those copy.
        """
        if out.dtype == table.dtype and not self.cfg.compile:
            torch.index_select(table, 0, index, out=out)
        else:
            out.copy_(table.index_select(0, index))

    # ------------------------------------------------------------------ native CPU sampler

    def _pick_native(self, reward_fn: RewardFn) -> tuple[ctypes.CDLL | None, ctypes.CDLL | None]:
        """The native library for sampling and for adding when ``cfg.native`` and this buffer allow each, else None
        (torch runs). Adding needs a CPU buffer of int16 or int32 tokens; sampling needs more (see below).

        Raises:
            ValueError: ``native="on"`` and the sampler cannot be used (says why).
        """
        cfg = self.cfg
        if cfg.native == "off":
            return None, None
        why_add = ""
        if self.device.type != "cpu":
            why_add = f"the buffer is on {self.device} (the native code is for CPU buffers)"
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
        lib = None if why_add else native.load()
        if not why_add and lib is None:
            why = why_add = f"it could not be built: {native.load_error()}"
            if cfg.native == "auto":
                warnings.warn(f"the native CPU code is off ({why}); adding and sampling with torch ops instead (same "
                              f"results, several times slower)", RuntimeWarning, stacklevel=3)
        if why and cfg.native == "on":
            raise ValueError(f"buffer.native=on, but the native sampler cannot be used: {why}")
        return (None if why else lib), (None if why_add else lib)

    def _set_native_tables(self) -> None:
        """Point the native sampler's arguments at the storage and derived tables (after each rebuild)."""
        cfg, a, asm = self.cfg, self._nargs, self._asm
        a.rows, a.ranks, a.eps = self._rows.data_ptr(), self._ranks.data_ptr(), self._eps.data_ptr()
        a.goal_count, a.goal_limit = self.goal_count.data_ptr(), self.goal_limit.data_ptr()
        a.goal_len, a.heads = self._goal_len32.data_ptr(), self._heads64.data_ptr()
        a.obs, a.next_obs = self.obs.data_ptr(), self.next_obs.data_ptr()  # views into one [CN, tok_w] record
        a.cands, a.next_cands = self.cands.data_ptr(), self.next_cands.data_ptr()
        a.cand_len, a.next_cand_len = self.cand_len.data_ptr(), self.next_cand_len.data_ptr()
        a.tok_w = self._tok.shape[-1]
        a.policy_version, a.post, a.powers = self.policy_version.data_ptr(), self._post64.data_ptr(), \
            self._powers.data_ptr()
        a.row_w, a.rank_w, a.head_w, a.n_post = self._rows.shape[-1], self._ranks.shape[-1], asm.head_width, \
            self._post64.numel()
        a.N, a.CN, a.n_step, a.G = self.n_envs, self.capacity_per_env * self.n_envs, cfg.n_step, cfg.max_achieved
        a.Lo, a.K, a.Lc, a.Lp = cfg.max_obs_tokens, cfg.max_cands, cfg.max_cand_tokens, asm.prompt_width
        a.pre_mid = self.pieces.prefix.numel() + self.pieces.mid.numel()
        a.token_bytes, a.pad_id = self.obs.element_size(), self.pad_id
        a.strategy, a.her_on, a.m = _STRATEGY_CODES[cfg.her.strategy], int(cfg.her.ratio > 0), cfg.her.rarity_draws
        a.ratio = cfg.her.ratio

    def _set_add_tables(self) -> None:
        """Point the native add's arguments at the storage (after each rebuild); the [N] bookkeeping is set per add."""
        cfg, a = self.cfg, self._aargs
        for name in ("obs_len", "next_obs_len", "terminated", "truncated", "episode", "policy_version", "reward",
                     "logp", "rare_goal", "goal_count", "goal_limit"):
            setattr(a, name, getattr(self, name).data_ptr())
        a.tok, a.rows, a.ranks, a.eps = self._tok.data_ptr(), self._rows.data_ptr(), self._ranks.data_ptr(), \
            self._eps.data_ptr()
        a.tok_w, a.token_bytes, a.row_w, a.rank_w = self._tok.shape[-1], self._tok.element_size(), \
            self._rows.shape[-1], self._ranks.shape[-1]
        a.N, a.C, a.G, a.Lo, a.K, a.Lc = self.n_envs, self.capacity_per_env, cfg.max_achieved, cfg.max_obs_tokens, \
            cfg.max_cands, cfg.max_cand_tokens
        a.pad_id, a.token_max, a.counts_goals = self.pad_id, self._token_max, int(cfg.her.counts_goals)
        a.scratch, a.stats = self._add_scratch.data_ptr(), self._add_stats.data_ptr()

    def _sample_native(self, draws: torch.Tensor, rare_u: torch.Tensor | None, out: Batch | None) -> Batch:
        """``_sample_from_draws`` in one C call (``sacglam/replay/csrc/sample.c``): the same batch from the same draws,
        written into ``out`` (checked by ``_check_out``) or into a new ``Batch`` (one plain allocation per field)."""
        a, lib = self._nargs, self._native
        assert lib is not None
        B = draws.shape[0]
        if out is None:
            out = Batch(**{name: torch.empty(shape, dtype=dtype) for name, shape, dtype in self._batch_layout(B)})
        scratch = self._scratch.get(B)
        if scratch is None:
            scratch = self._scratch[B] = torch.empty((6, B), dtype=torch.int64)
        a.draws, a.draw_w, a.B = draws.data_ptr(), draws.shape[1], B
        a.rare_u, a.R = (0, 0) if rare_u is None else (rare_u.data_ptr(), rare_u.shape[0])
        a.scratch, a.threads = scratch.data_ptr(), torch.get_num_threads()  # torch's intra-op threads, as its ops
        for arg, t in zip(_NATIVE_OUTPUTS, _batch_tensors(out), strict=True):
            setattr(a, arg, t.data_ptr())
        if lib.sacglam_sample(ctypes.byref(a)) != 0:
            raise RuntimeError("the native sampler refused its arguments (n_step or rarity_draws above its limits)")
        return out

    # ------------------------------------------------------------------ derived tables

    @staticmethod
    def _rank_values(t: torch.Tensor, achieved: torch.Tensor) -> torch.Tensor:
        """``_ranks`` entries [..., 3 + G] int32 from the achieving step's index [...] and its goals [..., G]."""
        count = (achieved >= 0).sum(-1, dtype=torch.int32)
        return torch.cat([torch.stack([t, count, (count - 1).clamp(min=0)], -1), achieved], -1)

    def _set_heads(self, g: slice) -> None:
        """Prompt heads and int32 lengths of goal table rows ``g``."""
        heads = self._asm.heads(self.goal_tokens[g].long(), self.goal_len[g].long())
        self._heads[g] = heads.to(self._src_dtype)
        self._goal_len32[g] = self.goal_len[g].to(torch.int32)
        if self._native is not None:
            self._heads64[g] = heads

    def _rebuild_derived(self) -> None:
        """Recompute the derived columns and tables from the saved fields (at construction and on load)."""
        N, C, S, dev = self.n_envs, self.capacity_per_env, self.capacity_per_env + 1, self.device
        i32 = torch.int32
        cols = torch.arange(N, device=dev)
        self._rows[..., _EPK] = ((self.episode // N) % S * N + cols).to(i32)  # row of _eps_flat
        self._rows[..., _TERM] = self.terminated.to(i32)
        self._rows[..., _OL] = self.obs_len.to(i32)
        self._rows[..., _NOL] = self.next_obs_len.to(i32)
        self._rows[..., _REW] = self.reward.view(i32)
        self._rows[..., _LOGP] = self.logp.view(i32)
        # At row start+r (step r of its episode) ach_step holds t', the step of the r-th achieving step, whose row is
        # start + t' = row - r + t'. Rows without one hold add's reset value.
        r = torch.arange(C, device=dev).unsqueeze(1)
        src_row = (r - self.step.long() + self.ach_step.long().clamp(min=0)) % C  # [C, N]
        vals = self._rank_values(self.ach_step.clone(), self.achieved[src_row, cols])
        self._ranks.copy_(torch.where((self.ach_step >= 0).unsqueeze(-1), vals, self._rank_reset))
        self._set_heads(slice(None))
        # Candidate mask rows by length [Lc + 1, Lc] bool, viewed as the widest integer that divides a row (one int64
        # per candidate when Lc = 8): a lookup of B * K small rows is then a plain 1-D gather.
        Lc = self.cfg.max_cand_tokens
        mask = torch.arange(Lc, device=dev) < torch.arange(Lc + 1, device=dev).unsqueeze(1)
        width, wide = next((w, d) for w, d in ((8, torch.int64), (4, torch.int32), (2, torch.int16), (1, torch.bool))
                           if Lc % w == 0)
        self._cand_mask_table = mask.view(wide).view(-1) if Lc == width else mask.view(wide)
        self._window_pos = -1
        # Flat [C * N, ...] views of the storage for row gathers.
        self._rows_flat = self._rows.view(C * N, -1)
        self._ranks_flat = self._ranks.view(C * N, -1)
        self._eps_flat = self._eps.view(S * N, 2)
        self._obs_flat = self.obs.view(C * N, -1)
        self._next_obs_flat = self.next_obs.view(C * N, -1)
        self._cands_flat = self.cands.view(C * N, -1)
        self._next_cands_flat = self.next_cands.view(C * N, -1)
        self._cand_len_flat = self.cand_len.view(C * N, -1)
        self._next_cand_len_flat = self.next_cand_len.view(C * N, -1)
        self._policy_version_flat = self.policy_version.view(C * N)
        if self._native is not None:
            self._set_native_tables()
        if self._native_add is not None:
            self._set_add_tables()

    def _pad_past(self, ids: torch.Tensor, lens: torch.Tensor) -> torch.Tensor:
        """``ids`` [..., L] with ``pad_id`` written past ``lens`` [...] (done once on add, not on every sample)."""
        L = ids.shape[-1]
        positions = self._positions.get(L)
        if positions is None:
            positions = self._positions[L] = torch.arange(L, device=ids.device)
        return torch.where(positions < lens.unsqueeze(-1), ids, self.pad_id)

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict[str, Any]:
        """Everything needed for an exact resume: storage, goal table, episode bookkeeping and the write pointer.

        The tensors are the live storage (no copy, as ``nn.Module.state_dict``): save them before the next ``add``.
        The int32 per-row fields (step, goal, action, achieved, ach_before) are views of one table and ach_step,
        ep_len, ep_ach of two others; ``torch.save`` writes each table once.
        """
        names = self._ROW_FIELDS + self._STATE_FIELDS + self._RARITY_FIELDS
        state: dict[str, Any] = {name: getattr(self, name) for name in names}
        state["pos"] = self.pos
        state["n_sampleable"] = self._n_sampleable
        state["goal_keys"] = [list(k) for k in self._goal_ids]  # in id order (dicts keep insertion order)
        state["shape"] = {"n_envs": self.n_envs, "capacity_per_env": self.capacity_per_env}
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a ``state_dict``; the buffer must have been built with the same shapes.

        Raises:
            ValueError: the saved buffer has another n_envs, capacity or tensor shape (names the field).
        """
        want = {"n_envs": self.n_envs, "capacity_per_env": self.capacity_per_env}
        if state["shape"] != want:
            raise ValueError(f"buffer state was saved with {state['shape']} but this buffer has {want}; "
                             f"build it with the same capacity and n_envs")
        names = self._ROW_FIELDS + self._STATE_FIELDS + tuple(n for n in self._RARITY_FIELDS if n in state)
        for name in names:
            src, dst = state[name], getattr(self, name)
            if tuple(src.shape) != tuple(dst.shape):
                raise ValueError(f"buffer state field {name!r} has shape {tuple(src.shape)} but this buffer needs "
                                 f"{tuple(dst.shape)}; build the buffer with the saved config")
        for name in names:  # copied in place: several fields are views of shared tables
            getattr(self, name).copy_(state[name])
        self.pos = int(state["pos"])
        self._n_sampleable = int(state["n_sampleable"])
        self._goal_ids = {tuple(k): i for i, k in enumerate(state["goal_keys"])}
        self._max_limit = max(1, int(self.goal_limit.max()))
        self._rebuild_derived()

    def bytes_per_transition(self) -> float:
        """Storage bytes per transition (row tensors, tables and the per-column episode table), for capacity planning.

        Counts every per-row allocation once, the derived sampling columns included (not the per-goal tables).
        """
        seen: dict[int, int] = {}
        for name in (*self._ROW_FIELDS, "rare_goal", "_rows", "_ranks", "_eps", "_tok"):
            storage = getattr(self, name).untyped_storage()
            seen[storage.data_ptr()] = storage.nbytes()
        return sum(seen.values()) / (self.capacity_per_env * self.n_envs)
