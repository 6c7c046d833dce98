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

``Batch.goal_gap`` is t' - t for relabelled rows and -1 otherwise. With ``her.strategy`` ``final`` or ``episode`` the
source step can precede t, so a relabelled row can carry a negative gap too: a hindsight supervised term (ALGORITHM.md
section 9) must select ``relabelled & (goal_gap >= 0)``.

Sampling is launch/overhead bound at B = 256 (about 150 small tensor ops); ``BufferConfig.compile`` runs it through
``torch.compile`` (all randomness is drawn before the compiled part, which is a pure function of the storage).

This module imports torch only (never transformers, peft, accelerate or the agent).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from sacglam.her import HERConfig, equality_reward, n_step_window, pick_achieving_rank, pick_goal_of_step
from sacglam.prompting import PromptCodec, PromptPieces, assemble_prompt
from sacglam.types import Batch, RewardFn, TransitionBatch

_TOKEN_DTYPES = {"int16": torch.int16, "int32": torch.int32, "int64": torch.int64}


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
    compile: bool = False  # torch.compile the sampling path (one-off compile per batch size; faster sampling)

    def __post_init__(self) -> None:
        if self.token_dtype not in _TOKEN_DTYPES:
            raise ValueError(f"token_dtype must be one of {sorted(_TOKEN_DTYPES)}, got {self.token_dtype!r}")
        if self.n_step < 1:
            raise ValueError(f"n_step must be >= 1, got {self.n_step}")
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
            return torch.full(shape, fill, dtype=dtype, device=dev)

        # Row storage [C, N, ...]. Lengths are int16: no text field here is 32k tokens wide.
        self.obs = z(C, N, Lo, dtype=tdt, fill=pad_id)
        self.obs_len = z(C, N, dtype=torch.int16)
        self.next_obs = z(C, N, Lo, dtype=tdt, fill=pad_id)
        self.next_obs_len = z(C, N, dtype=torch.int16)
        self.cands = z(C, N, K, Lc, dtype=tdt, fill=pad_id)
        self.cand_len = z(C, N, K, dtype=torch.int16)
        self.next_cands = z(C, N, K, Lc, dtype=tdt, fill=pad_id)
        self.next_cand_len = z(C, N, K, dtype=torch.int16)
        self.goal = z(C, N, dtype=torch.int32)
        self.action = z(C, N, dtype=torch.int32)
        self.reward = z(C, N, dtype=torch.float32)
        self.terminated = z(C, N, dtype=torch.bool)
        self.truncated = z(C, N, dtype=torch.bool)
        self.episode = z(C, N, dtype=torch.int64)  # id = k * N + e for the k-th episode of env e
        self.step = z(C, N, dtype=torch.int32)  # step index within the episode
        self.achieved = z(C, N, G, dtype=torch.int32, fill=-1)  # left-aligned, padded with -1
        self.logp = z(C, N, dtype=torch.float32)
        self.policy_version = z(C, N, dtype=torch.int64)
        self.ach_before = z(C, N, dtype=torch.int32)  # achieving steps of the episode strictly before this one
        self.ach_step = z(C, N, dtype=torch.int32, fill=-1)  # at row start+r: step index of the r-th achieving step
        # Episode table per column, slot = k % (C + 1): at most C completed episodes plus the running one are alive.
        S = C + 1
        self.ep_len = z(S, N, dtype=torch.int32)  # steps stored so far (final once the episode ended)
        self.ep_ach = z(S, N, dtype=torch.int32)  # achieving steps in the episode
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
        self.pos = 0  # adds so far (host int: the write pointer is the same for every column)
        self._n_sampleable = 0  # host copy, refreshed by add's single synchronisation
        # torch.compile fuses the ~150 small ops of the sampling path (it is launch/overhead bound at B = 256).
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
                raise ValueError(f"{what} has {need} tokens > {limit_name}={width}; set buffer {limit_name} >= {need}")
            return x[..., :width]
        if have < width:
            pad = x.new_full((*x.shape[:-1], width - have), self.pad_id)
            return torch.cat([x, pad], dim=-1)
        return x

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
                needed), an unregistered goal id, or an episode longer than ``capacity // n_envs``.
        """
        self._check_shapes(t)
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
        terminated, truncated = to(t.terminated).bool(), to(t.truncated).bool()
        done = terminated | truncated
        cols = torch.arange(N, device=dev)

        # Bookkeeping computed before any write, so a failed check leaves the buffer unchanged.
        lo = self.lo
        if P >= C:  # the row about to be overwritten (absolute P - C) breaks its episode: lo moves past that episode
            old_slot = (self.episode[row] // N) % S
            old_end = (P - C) - self.step[row].long() + self.ep_len[old_slot, cols].long()
            lo = torch.maximum(lo, old_end)
        new_start = torch.where(done, P + 1, self.cur_start)
        achieving = (achieved >= 0).any(1)
        checks = torch.stack([
            (self.cur_step >= C).any(),
            ((goal < 0) | (goal >= self.n_goals)).any(),
            ((achieved < -1) | (achieved >= self.n_goals)).any(),
            ((action < 0) | (action >= cfg.max_cands)).any(),
            torch.stack([obs.max(), next_obs.max(), cands.max(), next_cands.max()]).max() > self._token_max,
        ]).long()
        host = torch.cat([checks, (new_start - lo).sum().view(1), self.cur_step.max().view(1)]).cpu().tolist()
        ep_steps, n_sampleable = host[-1], int(host[-2])
        if host[4]:
            raise ValueError(f"a token id exceeds token_dtype={cfg.token_dtype}'s maximum {self._token_max}; "
                             f"set buffer token_dtype='int32' (int16 only fits vocabularies below 32768)")
        if host[0]:
            raise ValueError(f"an episode reached {ep_steps + 1} steps > capacity_per_env={C} (capacity "
                             f"{cfg.capacity} // n_envs {N}); an episode must fit in its env's rows: set capacity "
                             f">= {(ep_steps + 1) * N}")
        if host[1]:
            raise ValueError(f"TransitionBatch.goal holds an id outside the goal table [0, {self.n_goals}): "
                             f"{goal.tolist()}; register goals with register_goal(tokens) first")
        if host[2]:
            raise ValueError(f"TransitionBatch.achieved holds an id outside [-1, {self.n_goals}) (padding is -1): "
                             f"{achieved.tolist()}; register achieved goals with register_goal(tokens) first")
        if host[3]:
            raise ValueError(f"TransitionBatch.action holds an index outside [0, max_cands={cfg.max_cands}): "
                             f"{action.tolist()}")

        # Row writes.
        tdt = self.obs.dtype
        self.obs[row] = obs.to(tdt)
        self.obs_len[row] = obs_len.to(torch.int16)
        self.next_obs[row] = next_obs.to(tdt)
        self.next_obs_len[row] = next_obs_len.to(torch.int16)
        K = cands.shape[1]
        self.cands[row].fill_(self.pad_id)
        self.cands[row, :, :K] = cands.to(tdt)
        self.cand_len[row].zero_()
        self.cand_len[row, :, :K] = cand_len.to(torch.int16)
        Kn = next_cands.shape[1]
        self.next_cands[row].fill_(self.pad_id)
        self.next_cands[row, :, :Kn] = next_cands.to(tdt)
        self.next_cand_len[row].zero_()
        self.next_cand_len[row, :, :Kn] = next_cand_len.to(torch.int16)
        self.goal[row] = goal.to(torch.int32)
        self.action[row] = action.to(torch.int32)
        self.reward[row] = to(t.reward).float()
        self.terminated[row] = terminated
        self.truncated[row] = truncated
        self.episode[row] = self.cur_k * N + cols
        self.step[row] = self.cur_step.to(torch.int32)
        G = achieved.shape[1]
        self.achieved[row].fill_(-1)
        self.achieved[row, :, :G] = achieved.to(torch.int32)
        self.logp[row] = to(t.logp).float()
        self.policy_version[row] = to(t.policy_version).long()
        self.ach_before[row] = self.cur_ach.to(torch.int32)
        self.ach_step[row] = -1
        # The r-th achieving step (r = cur_ach) is recorded at row start + r, which is <= this row.
        ach_row = torch.where(achieving, (self.cur_start + self.cur_ach) % C, row)
        self.ach_step[ach_row, cols] = torch.where(achieving, self.cur_step, -1).to(torch.int32)
        cur_ach = self.cur_ach + achieving.long()
        slot = self.cur_k % S
        self.ep_len[slot, cols] = (self.cur_step + 1).to(torch.int32)
        self.ep_ach[slot, cols] = cur_ach.to(torch.int32)

        # Episode ends: the next row starts a new episode.
        self.lo = lo
        self.cur_start = new_start
        self.cur_k = self.cur_k + done.long()
        self.cur_step = torch.where(done, 0, self.cur_step + 1)
        self.cur_ach = torch.where(done, 0, cur_ach)
        self.pos = P + 1
        self._n_sampleable = n_sampleable

    # ------------------------------------------------------------------ sample

    def sample(self, batch_size: int, generator: torch.Generator) -> Batch:
        """Sample transitions of completed episodes uniformly, relabel per ``cfg.her``, and build model inputs.

        Runs entirely on the buffer's device with no host-device synchronisation.

        Args:
            batch_size: B.
            generator: a ``torch.Generator`` on the buffer's device (the only source of randomness).

        Returns:
            A ``Batch`` (see ``sacglam.types``) with prompts [B, Lp], candidates [B, K, Lc] and the n-step quantities.

        Raises:
            ValueError: no completed episode is stored yet, or the generator is on another device.
        """
        if self._n_sampleable == 0:
            raise ValueError("the replay buffer has no completed episode yet (only finished episodes are sampled); "
                             "collect until at least one episode ends before sampling")
        dev = self.device
        if generator.device.type != dev.type:
            raise ValueError(f"sample needs a torch.Generator on the buffer's device {dev}, got one on "
                             f"{generator.device}; use torch.Generator(device={str(dev)!r})")
        # All randomness is drawn here, so the rest is a pure function of the storage (and can be compiled).
        draws = torch.rand(batch_size, 4, generator=generator, device=dev, dtype=torch.float64)
        return Batch(**self._sample_core(draws))

    def _sample_from_draws(self, draws: torch.Tensor) -> dict[str, torch.Tensor]:
        """The sampling path given its uniforms ``draws`` [B, 4] (row pick, relabel coin, rank, goal in step)."""
        dev, N, C, cfg = self.device, self.n_envs, self.capacity_per_env, self.cfg
        B, n, S = draws.shape[0], cfg.n_step, C + 1

        # Column weighted by its window size, then a uniform offset inside the window.
        w = self.cur_start - self.lo  # [N]
        cum = torch.cumsum(w, 0)
        total = cum[-1]
        u = draws[:, 0]
        x = torch.minimum((u * total).long(), total - 1)
        col = torch.searchsorted(cum, x, right=True)  # [B]
        a = self.lo[col] + x - (cum[col] - w[col])  # absolute position
        flat = (a % C) * N + col

        def rows(name: str) -> torch.Tensor:
            t: torch.Tensor = getattr(self, name)
            return t.view(C * N, *t.shape[2:])

        t = rows("step")[flat].long()
        slot = (rows("episode")[flat] // N) % S
        ep_len = self.ep_len[slot, col].long()
        start = a - t
        j = torch.arange(n, device=dev)
        win = ((a.unsqueeze(1) + j) % C) * N + col.unsqueeze(1)  # [B, n]
        reward = rows("reward")[win]
        term = rows("terminated")[win]
        goal = rows("goal")[flat].long()
        relabelled = torch.zeros(B, dtype=torch.bool, device=dev)
        goal_gap = torch.full((B,), -1, dtype=torch.long, device=dev)
        if cfg.her.ratio > 0:  # a static switch: ratio 0 returns exactly the stored transitions
            u_her = draws[:, 1:]
            rank, eligible = pick_achieving_rank(
                cfg.her.strategy, rows("ach_before")[flat].long(), self.ep_ach[slot, col].long(), u_her[:, 1]
            )
            t_new = rows("ach_step")[((start + rank) % C) * N + col].long()
            ach = rows("achieved")[((start + t_new.clamp(min=0)) % C) * N + col]  # [B, G]
            new_goal = pick_goal_of_step(ach, u_her[:, 2])
            relabelled = (u_her[:, 0] < cfg.her.ratio) & eligible & (new_goal >= 0)
            goal = torch.where(relabelled, new_goal, goal)
            G = ach.shape[1]
            r_new, term_new = self.reward_fn(
                rows("achieved")[win].long().view(B * n, G), goal.unsqueeze(1).expand(B, n).reshape(B * n)
            )
            reward = torch.where(relabelled.unsqueeze(1), r_new.view(B, n).to(reward.dtype), reward)
            term = torch.where(relabelled.unsqueeze(1), term_new.view(B, n).bool(), term)
            goal_gap = torch.where(relabelled, t_new - t, -1)
        # Termination is recomputed for the relabelled goal: an episode that ended because the *stored* goal was
        # reached is, for a goal g' not reached there, cut short like a time limit, so its window bootstraps from the
        # final state (stored in next_obs) with g'.
        ret, discount, k, term_end, trunc_end = n_step_window(reward, term, ep_len - t, cfg.gamma)
        boot = ((a + k - 1) % C) * N + col

        g_ids, g_len = self.goal_tokens[goal].long(), self.goal_len[goal]
        prompt_ids, prompt_mask = assemble_prompt(self.pieces, g_ids, g_len, rows("obs")[flat].long(),
                                                  rows("obs_len")[flat])
        next_prompt_ids, next_prompt_mask = assemble_prompt(self.pieces, g_ids, g_len, rows("next_obs")[boot].long(),
                                                            rows("next_obs_len")[boot])
        cand_ids, cand_mask = self._cands(rows("cands")[flat], rows("cand_len")[flat])
        next_cand_ids, next_cand_mask = self._cands(rows("next_cands")[boot], rows("next_cand_len")[boot])
        return dict(
            prompt_ids=prompt_ids,
            prompt_mask=prompt_mask,
            cand_ids=cand_ids,
            cand_mask=cand_mask,
            action=rows("action")[flat].long(),
            reward=ret,
            discount=discount,
            next_prompt_ids=next_prompt_ids,
            next_prompt_mask=next_prompt_mask,
            next_cand_ids=next_cand_ids,
            next_cand_mask=next_cand_mask,
            terminated=term_end,
            truncated=trunc_end,
            n_steps=k,
            goal=goal,
            relabelled=relabelled,
            goal_gap=goal_gap,
            goal_limit=self.goal_limit[goal],
            logp=rows("logp")[flat],
            policy_version=rows("policy_version")[flat],
        )

    def _cands(self, ids: torch.Tensor, lens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[B, K, Lc] stored ids (pad_id past each length, ensured by add), [B, K] lengths -> long ids, bool mask."""
        mask = torch.arange(ids.shape[-1], device=ids.device).view(1, 1, -1) < lens.long().unsqueeze(-1)
        return ids.long(), mask

    def _pad_past(self, ids: torch.Tensor, lens: torch.Tensor) -> torch.Tensor:
        """``ids`` [..., L] with ``pad_id`` written past ``lens`` [...] (done once on add, not on every sample)."""
        keep = torch.arange(ids.shape[-1], device=ids.device) < lens.unsqueeze(-1)
        return torch.where(keep, ids, self.pad_id)

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict[str, Any]:
        """Everything needed for an exact resume: storage, goal table, episode bookkeeping and the write pointer.

        The tensors are the live storage (no copy, as ``nn.Module.state_dict``): save them before the next ``add``.
        """
        state: dict[str, Any] = {name: getattr(self, name) for name in self._ROW_FIELDS + self._STATE_FIELDS}
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
        for name in self._ROW_FIELDS + self._STATE_FIELDS:
            src, dst = state[name], getattr(self, name)
            if tuple(src.shape) != tuple(dst.shape):
                raise ValueError(f"buffer state field {name!r} has shape {tuple(src.shape)} but this buffer needs "
                                 f"{tuple(dst.shape)}; build the buffer with the saved config")
            setattr(self, name, src.to(device=self.device, dtype=dst.dtype).clone())
        self.pos = int(state["pos"])
        self._n_sampleable = int(state["n_sampleable"])
        self._goal_ids = {tuple(k): i for i, k in enumerate(state["goal_keys"])}

    def bytes_per_transition(self) -> float:
        """Storage bytes per transition (row tensors plus the per-column episode table), for capacity planning."""
        rows = sum(getattr(self, n).element_size() * getattr(self, n).numel() for n in self._ROW_FIELDS)
        eps = sum(getattr(self, n).element_size() * getattr(self, n).numel() for n in ("ep_len", "ep_ach"))
        return (rows + eps) / (self.capacity_per_env * self.n_envs)
