"""The replay buffer's storage: the preallocated device tensors of the rows, the episode tables, the per-env
bookkeeping and the write pointer, and the derived tables rebuilt from them.

Layout (as SB3's buffers): every tensor has leading dims ``[C, N]`` where ``N`` is the number of parallel envs and
``C = capacity // N`` the rows per env; each env's steps are contiguous in its column and one write pointer serves all
columns because every ``add`` carries all N envs. Positions are counted in *absolute* steps ``a`` (row = ``a % C``).

Each row stores s_t (observation, candidates) and s_{t+1} (next observation, next candidates), so the n-step bootstrap
state s_{t+k} is row (t+k-1)'s next state, final observations included, with no special case.

Only transitions of completed episodes are sampled (SB3's HER does the same; a running episode has no future yet).
Per column the sampleable rows form one window ``[lo_e, hi_e)`` of absolute positions: ``hi_e = cur_start`` is the
start of the running episode and ``lo_e = lo`` the start of the oldest episode none of whose rows was overwritten.

HER ``future`` in O(1): each row keeps the number of achieving steps before it in its episode (``ach_before``), and the
episode's rows double as a table "r-th achieving step -> its step index" (``ranks``; the r-th achieving step happens
at a step >= r, so row ``start + r`` exists when it is written).

What makes sampling cheap:

- a row's tokens are one record ``tok`` [C, N, 2H], ``[obs | cands | cand_len | next_obs | next_cands |
  next_cand_len]``, so a sampled transition reads one contiguous block; the token fields are views into it;
- the int32 per-row fields sit in one table ``rows`` [C, N, F + G] (step, goal, ach_before, action, achieved are
  views into it; reward/logp bits, the episode's slot and the lengths are copies kept by the writers), so one gather
  reads all of a sampled row's scalars (and, for n > 1, of its whole n-step window);
- HER sources come from ``ranks`` [C, N, 3 + G]: at row start + r, the r-th achieving step's index, goal count,
  max(count - 1, 0) and goals, so the relabelled goal is one gather away from the sampled row.

All derived columns and tables are rebuilt from the saved fields by ``rebuild`` (at construction and on load), so the
buffer's ``state_dict`` holds the same fields as before and older checkpoints load. Large CPU tensors get
``madvise(MADV_HUGEPAGE)`` before their first write (``native.advise_huge_pages``): random row reads then cost fewer
page walks.

This module imports torch only.
"""

from __future__ import annotations

import math

import torch

from sacglam.replay.clib import advise_huge_pages
from sacglam.replay.config import BufferConfig
from sacglam.validate import ConfigError

TOKEN_DTYPES = {"int16": torch.int16, "int32": torch.int32, "int64": torch.int64}

# Columns of the per-row table ``rows`` (int32; floats stored as their bits), then G achieved ids from column F.
T, EPK, GOAL, ACHB, TERM, ACT, OL, NOL, REW, LOGP = range(10)
F = 10

# Names of the saved per-row tensors, then of the other saved tensors, in state_dict order (the goal table's tensors
# are among them: ``ReplayBuffer.state_dict`` reads each name from the buffer).
ROW_FIELDS = (
    "obs", "obs_len", "next_obs", "next_obs_len", "cands", "cand_len", "next_cands", "next_cand_len", "goal",
    "action", "reward", "terminated", "truncated", "episode", "step", "achieved", "logp", "policy_version",
    "ach_before", "ach_step",
)  # fmt: skip
STATE_FIELDS = ("ep_len", "ep_ach", "cur_start", "cur_k", "cur_step", "cur_ach", "lo", "goal_tokens", "goal_len",
                "goal_limit")  # fmt: skip
# Rarity bookkeeping (her.rarity_draws / her.rare_fraction); states saved before it existed load with defaults.
RARITY_FIELDS = ("rare_goal", "goal_count")


def resolve_device(device: str | torch.device) -> torch.device:
    """``device`` as a torch device; ``"auto"`` is cuda when available, else cpu."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def rank_values(t: torch.Tensor, achieved: torch.Tensor) -> torch.Tensor:
    """``ranks`` entries [..., 3 + G] int32 from the achieving step's index [...] and its goals [..., G]."""
    count = (achieved >= 0).sum(-1, dtype=torch.int32)
    return torch.cat([torch.stack([t, count, (count - 1).clamp(min=0)], -1), achieved], -1)


class ReplayStorage:
    """The tensors of a ring buffer of N env columns with C rows each, on one device.

    Args:
        cfg: the buffer's options (widths, capacity, token dtype).
        n_envs: N.
        pad_id: token id of the padding positions.
        device: where the tensors live (already resolved).
    """

    def __init__(self, cfg: BufferConfig, n_envs: int, pad_id: int, device: torch.device) -> None:
        self.n_envs = N = n_envs
        self.capacity_per_env = C = cfg.capacity // n_envs
        self.pad_id = pad_id
        self.device = device
        self.token_dtype = tdt = TOKEN_DTYPES[cfg.token_dtype]
        # The largest id stored: the token dtype's, and never above int32's, which sampled batches carry
        # (sacglam.types.BATCH_ID_DTYPE): a wider id is refused at add, not wrapped at sampling.
        self.token_max = min(int(torch.iinfo(tdt).max), int(torch.iinfo(torch.int32).max))
        Lo, K, Lc, G = cfg.max_obs_tokens, cfg.max_cands, cfg.max_cand_tokens, cfg.max_achieved
        z = self.alloc
        # Row storage [C, N, ...]. Lengths are int16: no text field here is 32k tokens wide. The candidate lengths
        # are stored in the token dtype inside the token record; the token fields are views into it.
        KL, H = K * Lc, Lo + K * Lc + K
        self.tok = z(C, N, 2 * H, dtype=tdt, fill=pad_id)
        self.obs, self.next_obs = self.tok[..., :Lo], self.tok[..., H : H + Lo]
        self.cands = self.tok[..., Lo : Lo + KL].unflatten(-1, (K, Lc))
        self.next_cands = self.tok[..., H + Lo : H + Lo + KL].unflatten(-1, (K, Lc))
        self.cand_len, self.next_cand_len = self.tok[..., Lo + KL : H], self.tok[..., H + Lo + KL :]
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
        # rows[c, e] = [step, episode slot, goal, ach_before, terminated, action, obs_len, next_obs_len, reward bits,
        # logp bits, achieved (G)]. The named fields below are views into it (saved, loaded and written as before);
        # the other columns are copies (torch.save refuses int32 and float32 views of one storage, hence reward and
        # logp are kept apart too).
        self.rows = z(C, N, F + G, dtype=torch.int32)
        self.rows[..., F:] = -1
        self.goal = self.rows[..., GOAL]
        self.action = self.rows[..., ACT]
        self.step = self.rows[..., T]  # step index within the episode
        self.achieved = self.rows[..., F:]  # left-aligned, padded with -1
        self.ach_before = self.rows[..., ACHB]  # achieving steps of the episode strictly before this one
        # HER sources: at row start+r, [t', count, max(count - 1, 0), goals (G)] of the episode's r-th achieving step;
        # ach_step = t' is the saved field.
        self.rank_reset = torch.tensor([-1, 0, 0] + [-1] * G, dtype=torch.int32, device=device)
        self.ranks = z(C, N, 3 + G, dtype=torch.int32)
        self.ranks[:] = self.rank_reset
        self.ach_step = self.ranks[..., 0]  # at row start+r: step index of the r-th achieving step
        # Episode table per column, slot = k % (C + 1): at most C completed episodes plus the running one are alive.
        self.eps = z(C + 1, N, 2, dtype=torch.int32)
        self.ep_len = self.eps[..., 0]  # steps stored so far (final once the episode ended)
        self.ep_ach = self.eps[..., 1]  # achieving steps in the episode
        # Per-env bookkeeping [N] (absolute positions).
        self.cur_start = z(N, dtype=torch.int64)  # start of the running episode (= hi_e, end of the sampleable window)
        self.cur_k = z(N, dtype=torch.int64)  # per-env index of the running episode
        self.cur_step = z(N, dtype=torch.int64)
        self.cur_ach = z(N, dtype=torch.int64)
        self.lo = z(N, dtype=torch.int64)  # start of the oldest intact episode (= lo_e)
        # Rarity (her.rarity_draws, her.rare_fraction): per row the rarest goal achieved within its step limit later
        # in the row's episode (-1: none).
        self.rare_goal = z(C, N, dtype=torch.int32, fill=-1)
        self.pos = 0  # adds so far (host int: the write pointer is the same for every column)
        self.n_sampleable = 0  # host copy, refreshed by each add's single synchronisation
        self.cols = torch.arange(N, device=device)
        self.rebuild()

    def alloc(self, *shape: int, dtype: torch.dtype, fill: float = 0) -> torch.Tensor:
        """A new tensor of ``shape`` filled with ``fill`` on the storage's device (huge pages advised on CPU).

        Raises:
            ConfigError: the memory is not there (names ``buffer.capacity``, the tensor's size and the device).
        """
        try:
            if self.device.type != "cpu":
                return torch.full(shape, fill, dtype=dtype, device=self.device)
            out = torch.empty(shape, dtype=dtype)  # large CPU storage: huge pages (advised before the first touch)
        except (RuntimeError, MemoryError) as exc:  # torch.OutOfMemoryError is a RuntimeError
            gib = math.prod(shape) * dtype.itemsize / 2**30
            capacity = self.capacity_per_env * self.n_envs
            raise ConfigError(
                f"buffer.capacity={capacity} does not fit: the replay storage could not allocate a {list(shape)} "
                f"{dtype} tensor ({gib:.1f} GiB) on {self.device} ({str(exc).splitlines()[0]}); lower "
                f"buffer.capacity or the token widths (buffer.max_obs_tokens, max_cands, max_cand_tokens)"
            ) from None
        advise_huge_pages(out)
        return out.fill_(fill)

    def __len__(self) -> int:
        """Transitions stored (sampleable or not)."""
        return min(self.pos, self.capacity_per_env) * self.n_envs

    def bytes_per_transition(self) -> float:
        """Storage bytes per transition (row tensors, tables and the per-column episode table).

        Counts every per-row allocation once, the derived sampling columns included (not the per-goal tables).
        """
        seen: dict[int, int] = {}
        for name in (*ROW_FIELDS, "rare_goal", "rows", "ranks", "eps", "tok"):
            storage = getattr(self, name).untyped_storage()
            seen[storage.data_ptr()] = storage.nbytes()
        return sum(seen.values()) / (self.capacity_per_env * self.n_envs)

    def rebuild(self) -> None:
        """Recompute the derived columns of ``rows``, the ``ranks`` table and the flat views from the saved fields."""
        N, C, S, dev = self.n_envs, self.capacity_per_env, self.capacity_per_env + 1, self.device
        i32 = torch.int32
        cols = self.cols
        self.rows[..., EPK] = ((self.episode // N) % S * N + cols).to(i32)  # row of eps_flat
        self.rows[..., TERM] = self.terminated.to(i32)
        self.rows[..., OL] = self.obs_len.to(i32)
        self.rows[..., NOL] = self.next_obs_len.to(i32)
        self.rows[..., REW] = self.reward.view(i32)
        self.rows[..., LOGP] = self.logp.view(i32)
        # At row start+r (step r of its episode) ach_step holds t', the step of the r-th achieving step, whose row is
        # start + t' = row - r + t'. Rows without one hold add's reset value.
        r = torch.arange(C, device=dev).unsqueeze(1)
        src_row = (r - self.step.long() + self.ach_step.long().clamp(min=0)) % C  # [C, N]
        vals = rank_values(self.ach_step.clone(), self.achieved[src_row, cols])
        self.ranks.copy_(torch.where((self.ach_step >= 0).unsqueeze(-1), vals, self.rank_reset))
        # Flat [C * N, ...] views of the storage for row gathers.
        self.rows_flat = self.rows.view(C * N, -1)
        self.ranks_flat = self.ranks.view(C * N, -1)
        self.eps_flat = self.eps.view(S * N, 2)
        self.obs_flat = self.obs.view(C * N, -1)
        self.next_obs_flat = self.next_obs.view(C * N, -1)
        self.cands_flat = self.cands.view(C * N, -1)
        self.next_cands_flat = self.next_cands.view(C * N, -1)
        self.cand_len_flat = self.cand_len.view(C * N, -1)
        self.next_cand_len_flat = self.next_cand_len.view(C * N, -1)
        self.policy_version_flat = self.policy_version.view(C * N)


__all__ = ["ACHB", "ACT", "EPK", "GOAL", "LOGP", "NOL", "OL", "RARITY_FIELDS", "REW", "ROW_FIELDS", "STATE_FIELDS",
           "TERM", "TOKEN_DTYPES", "F", "ReplayStorage", "T", "rank_values", "resolve_device"]  # fmt: skip
