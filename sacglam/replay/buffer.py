"""``ReplayBuffer``: the device-resident replay buffer of tokenised text transitions, with hindsight relabelling at
sampling time, as a facade over its parts (in the spirit of TorchRL's ``ReplayBuffer(storage=, sampler=, writer=)``):

``storage`` (the tensors, layout ``[C, N]``), ``goals`` (the goal table), ``writer`` / ``native`` (``add`` by torch
ops, ``TorchWriter``, or one C call, ``NativeWriter``), ``sampler`` / ``native`` (window, draws, and ``sample`` by
``TorchSampler`` with HER from ``her``, or ``NativeSampler``), ``rarity`` (the rarity marks) and ``achieved``
(achieved goals set after the episode), all under ``sacglam.replay``.

The facade keeps the public API (and the attribute names the tests read), the order of the random draws and the
``state_dict`` fields. This module imports torch only (never transformers, peft, accelerate or the agent).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Generic, TypeVar

import torch

from sacglam.prompting import PromptAssembler, PromptCodec, PromptPieces
from sacglam.replay import achieved as achieved_goals
from sacglam.replay.config import BufferConfig
from sacglam.replay.goals import GoalTable
from sacglam.replay.her import equality_reward
from sacglam.replay.native import NativeSampler, NativeWriter, pick_native
from sacglam.replay.sampler import BatchLayout, Draws, SamplingWindow, TorchSampler, source_dtype
from sacglam.replay.storage import RARITY_FIELDS, ROW_FIELDS, STATE_FIELDS, ReplayStorage, resolve_device
from sacglam.replay.writer import TorchWriter, check_shapes
from sacglam.types import Batch, RewardFn, TransitionBatch

V = TypeVar("V")


class _Alias(Generic[V]):
    """A facade attribute that reads and writes the attribute ``name`` (default: its own name) of the part ``part``."""

    def __init__(self, part: str, name: str = "") -> None:
        self.part, self.name = part, name

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = self.name or name

    def __get__(self, obj: Any, owner: type | None = None) -> V:
        return getattr(getattr(obj, self.part), self.name)

    def __set__(self, obj: Any, value: V) -> None:
        setattr(getattr(obj, self.part), self.name, value)


_T = _Alias[torch.Tensor]


def _aliases(part: str, n: int) -> tuple[_Alias[torch.Tensor], ...]:
    """``n`` tensor aliases into ``part``, each named by the class attribute it is assigned to."""
    return tuple(_T(part) for _ in range(n))


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

    _ROW_FIELDS, _STATE_FIELDS, _RARITY_FIELDS = ROW_FIELDS, STATE_FIELDS, RARITY_FIELDS  # state_dict order

    # The storage's tensors under their historical names (views where the storage shares one table).
    (obs, obs_len, next_obs, next_obs_len, cands, cand_len, next_cands, next_cand_len, goal, action, reward,
     terminated, truncated, episode, step, achieved, logp, policy_version, ach_before, ach_step, ep_len, ep_ach,
     cur_start, cur_k, cur_step, cur_ach, lo, rare_goal) = _aliases("storage", 28)
    goal_tokens, goal_len, goal_limit, goal_count = _aliases("goals", 4)
    pos = _Alias[int]("storage")
    _tok, _rows, _ranks, _eps = _T("storage", "tok"), _T("storage", "rows"), _T("storage", "ranks"), \
        _T("storage", "eps")
    _rank_reset = _T("storage", "rank_reset")
    _rare_w, _rare_cdf, _rare_total = _T("window", "rare_w"), _T("window", "rare_cdf"), _T("window", "rare_total")
    # The native libraries in use (None: torch runs) and the torch sampling path (compiled or not).
    _native = _Alias[Any]("sampler", "lib")
    _native_add = _Alias[Any]("writer", "lib")
    _sample_core = _Alias[Callable[..., dict[str, torch.Tensor]]]("torch_sampler", "core")

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
        self.n_envs = n_envs
        self.capacity_per_env = cfg.capacity // n_envs
        self.pad_id = pad_id
        self.device = dev = resolve_device(device if device is not None else cfg.device)
        self.reward_fn = reward_fn
        if isinstance(prompt, PromptCodec):
            for name in ("max_obs_tokens", "max_goal_tokens", "max_cands", "max_cand_tokens"):
                if getattr(prompt, name) > getattr(cfg, name):
                    raise ValueError(f"PromptCodec.{name}={getattr(prompt, name)} exceeds the buffer's "
                                     f"{name}={getattr(cfg, name)}; make the buffer's limit at least as large")
            prompt = prompt.pieces
        self.pieces = prompt.to(dev)
        self.storage = store = ReplayStorage(cfg, n_envs, pad_id, dev)
        self._asm = asm = PromptAssembler(self.pieces, cfg.max_goal_tokens, cfg.max_obs_tokens, dev)
        src_dtype = source_dtype(self.pieces, store.token_dtype)
        sample_lib, add_lib = pick_native(cfg, dev, reward_fn)
        self.goals = goals = GoalTable(cfg, store.alloc, pad_id=pad_id, token_max=store.token_max, asm=asm,
                                       head_dtype=src_dtype, wide_heads=sample_lib is not None)
        self.window = SamplingWindow(cfg, store, goals)
        self._draws = Draws(cfg, dev)
        self._layout = BatchLayout(cfg, asm.prompt_width, dev)
        self.writer: TorchWriter | NativeWriter = (TorchWriter(cfg, store, goals) if add_lib is None
                                                   else NativeWriter(cfg, store, goals, add_lib))
        self.torch_sampler = TorchSampler(cfg, store, goals, self.window, asm, src_dtype, reward_fn)
        self.sampler: TorchSampler | NativeSampler = self.torch_sampler if sample_lib is None else NativeSampler(
            cfg, store, goals, self.window, asm, self.pieces, self._layout, sample_lib)
        self._rebuild_derived()

    # ------------------------------------------------------------------ goals

    @property
    def n_goals(self) -> int:
        """Goals registered so far."""
        return self.goals.n_goals

    def register_goal(self, tokens: list[int] | tuple[int, ...] | torch.Tensor, limit: int = 0) -> int:
        """Store a goal's token ids once and return its id (the same id for the same tokens); see
        ``GoalTable.register`` (``limit``: the goal's step limit, 0 = unknown; the errors)."""
        return self.goals.register(tokens, limit)

    # ------------------------------------------------------------------ add

    def __len__(self) -> int:
        """Transitions stored (sampleable or not)."""
        return len(self.storage)

    @property
    def num_sampleable(self) -> int:
        """Transitions of completed, intact episodes (what ``sample`` draws from)."""
        return self.storage.n_sampleable

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
        check_shapes(t, self.cfg, self.n_envs)
        self.writer.add(t)

    # ------------------------------------------------------------------ achieved goals known after the episode

    def episode_start(self, env: int) -> int:
        """The absolute position where env ``env``'s running episode started (its first step's ``pos`` before the
        add; ``cur_start[env]``), to be passed later to ``set_achieved``. One host read."""
        if not 0 <= env < self.n_envs:
            raise ValueError(f"env {env} is outside [0, n_envs={self.n_envs})")
        return int(self.storage.cur_start[env])

    def set_achieved(self, env: int, start: int, achieved: torch.Tensor) -> bool:
        """Replace the achieved goal ids of env ``env``'s finished episode whose first step was added at absolute
        position ``start`` (``buffer.pos``, or ``episode_start(env)``, before the add of its first step). Afterwards
        every table is what ``add`` would have left with these ids (``sacglam.replay.achieved.set_achieved``).

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
        if done := achieved_goals.set_achieved(self.cfg, self.storage, self.goals, env, start, achieved):
            self.window.pos = -1  # the rarity weights read the marks and counts: recomputed on the next sample
        return done

    # ------------------------------------------------------------------ sample

    def sample(self, batch_size: int, generator: torch.Generator, *, out: Batch | None = None) -> Batch:
        """Sample transitions of completed episodes uniformly, relabel per ``cfg.her``, and build model inputs.

        Runs entirely on the buffer's device with no host-device synchronisation.

        Args:
            batch_size: B.
            generator: a ``torch.Generator`` on the buffer's device (the only source of randomness).
            out: a ``Batch`` of B transitions returned by an earlier ``sample`` of this buffer, overwritten in place
                and returned (as torch's ``out=``; on a CPU buffer this saves ~20 allocations, a fifth of a call at
                B = 256). The batch is the same as without ``out``.

        Returns:
            A ``Batch`` (see ``sacglam.types``) with prompts [B, Lp], candidates [B, K, Lc] and the n-step quantities.

        Raises:
            ValueError: no completed episode is stored yet, the generator is on another device, or ``out`` does not
                have this buffer's batch layout for ``batch_size`` (names the field).
        """
        if self.storage.n_sampleable == 0:
            raise ValueError("the replay buffer has no completed episode yet (only finished episodes are sampled); "
                             "collect until at least one episode ends before sampling")
        dev = self.device
        if generator.device.type != dev.type:
            raise ValueError(f"sample needs a torch.Generator on the buffer's device {dev}, got one on "
                             f"{generator.device}; use torch.Generator(device={str(dev)!r})")
        self.sampler.wake(batch_size)
        if self.window.pos != self.storage.pos:
            self._refresh_window()
        # All randomness is drawn here, so the rest is a pure function of the storage (and can be compiled).
        draws, rare_u = self._draws.draw(batch_size, generator)
        if out is not None:
            self._layout.check_out(out, batch_size)
        return self.sampler.sample(draws, rare_u, out)

    def _refresh_window(self) -> None:
        """Recompute the sampling window (once per ``add``, lazily) and tell the sampler."""
        self.window.refresh()
        self.sampler.window_changed()

    def _sample_from_draws(self, draws: torch.Tensor, rare_rows: torch.Tensor | None = None) -> dict[str, Any]:
        """The torch sampling path on given uniforms (``TorchSampler.sample_from_draws``), whichever sampler runs."""
        return self.torch_sampler.sample_from_draws(draws, rare_rows)

    # ------------------------------------------------------------------ state

    def _rebuild_derived(self) -> None:
        """Recompute the derived columns and tables from the saved fields (at construction and on load)."""
        self.storage.rebuild()
        self.goals.set_heads(slice(None))
        self.torch_sampler.bind()
        self.window.pos = -1
        self.sampler.bind()
        self.writer.bind()

    def state_dict(self) -> dict[str, Any]:
        """Everything needed for an exact resume: storage, goal table, episode bookkeeping and the write pointer.

        The tensors are the live storage (no copy, as ``nn.Module.state_dict``): save them before the next ``add``.
        The int32 per-row fields (step, goal, action, achieved, ach_before) are views of one table and ach_step,
        ep_len, ep_ach of two others; ``torch.save`` writes each table once.
        """
        names = self._ROW_FIELDS + self._STATE_FIELDS + self._RARITY_FIELDS
        state: dict[str, Any] = {name: getattr(self, name) for name in names}
        state["pos"] = self.storage.pos
        state["n_sampleable"] = self.storage.n_sampleable
        state["goal_keys"] = self.goals.keys()  # in id order
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
        self.storage.pos = int(state["pos"])
        self.storage.n_sampleable = int(state["n_sampleable"])
        self.goals.load(state["goal_keys"])
        self._rebuild_derived()

    def bytes_per_transition(self) -> float:
        """Storage bytes per transition, for capacity planning (``ReplayStorage.bytes_per_transition``)."""
        return self.storage.bytes_per_transition()

__all__ = ["BufferConfig", "ReplayBuffer"]
