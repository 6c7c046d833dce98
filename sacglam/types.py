"""Data types shared across the library: what flows from the collector to the buffer and on to the update.

Shape letters used throughout the project:
    N  parallel environments          B  batch (sampled transitions)
    K  candidate actions per state    Lp prompt tokens
    Lo observation tokens             Lg goal tokens
    Lc tokens per candidate           G  achieved goals per step (fixed width, padded with -1)

This module imports torch only (never transformers, peft, accelerate, the agent or the envs).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Any, Protocol

import torch


@dataclass
class TextStep:
    """One vector step of N environments, in text, as the collector emits it.

    Every list has length N. ``next_*`` describe the state reached by the step: for an env whose episode ended
    (terminated or truncated) they are the episode's *final* observation and candidates, not the auto-reset ones.
    """

    goals: list[str]
    observations: list[str]
    candidates: list[list[str]]
    actions: list[int]  # index into candidates[i]
    logp: list[float]  # behaviour log-prob of the chosen action
    rewards: list[float]
    terminated: list[bool]
    truncated: list[bool]
    next_observations: list[str]
    next_candidates: list[list[str]]
    achieved_goals: list[list[str]]  # goals newly achieved by this step


@dataclass
class TransitionBatch:
    """One step from N environments, tokenised, as ``ReplayBuffer.add`` takes it (tensors on any device).

    Attributes:
        obs: [N, Lo] observation token ids (right padded); obs_len: [N] valid lengths.
        next_obs: [N, Lo]; next_obs_len: [N] -- the state reached (the final one when the episode ended).
        cands: [N, K, Lc] candidate token ids; cand_len: [N, K] (0 = no candidate in that slot).
        next_cands: [N, K, Lc]; next_cand_len: [N, K] -- candidates of the state reached.
        goal: [N] long, ids into the buffer's goal table.
        action: [N] long, index of the chosen candidate.
        reward: [N] float; terminated: [N] bool; truncated: [N] bool.
        achieved: [N, G] long goal ids newly achieved by the step, padded with -1.
        logp: [N] float behaviour log-prob; policy_version: [N] long.
    """

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
    reward: torch.Tensor
    terminated: torch.Tensor
    truncated: torch.Tensor
    achieved: torch.Tensor
    logp: torch.Tensor
    policy_version: torch.Tensor


BATCH_ID_DTYPE = torch.int32
"""Dtype of the token ids in a sampled ``Batch``: int32 halves the bytes a sampler writes per transition (the native
sampler's token pass was bound by writing int64 ids, docs/benchmarks.md "Replay buffer") and the bytes copied to a GPU.
The scorer converts the ids to int64 itself (``sacglam.scoring``), once, on the trimmed tensors. Token ids must fit
int32, as every tokenizer's vocabulary does: a buffer with ``token_dtype='int64'`` refuses a wider id at add."""


@dataclass
class Batch:
    """A sampled minibatch, ready for the model; every tensor on the buffer's device.

    Attributes:
        prompt_ids: [B, Lp] int32 (``BATCH_ID_DTYPE``), prompt of s_t (template + goal + observation), right padded.
        prompt_mask: [B, Lp] bool.
        cand_ids: [B, K, Lc] int32, candidates A(s_t), right padded; cand_mask: [B, K, Lc] bool.
            A candidate slot whose mask is all False is absent (masked to -inf in the policy).
        action: [B] long, index of the taken candidate.
        reward: [B] float, n-step return R = sum_{j<k} gamma^j r_{t+j} for the (possibly relabelled) goal.
        discount: [B] float, gamma^k * (1 - terminated): the factor in y = reward + discount * V(s_{t+k}).
        next_prompt_ids, next_prompt_mask, next_cand_ids, next_cand_mask: the bootstrap state s_{t+k}, same layout.
        terminated: [B] bool, the n-step window ended in termination (no bootstrap).
        truncated: [B] bool, the window ended at a time limit (bootstraps).
        n_steps: [B] long, k <= n, the realised window length.
        goal: [B] long goal id used (after relabelling).
        relabelled: [B] bool, the goal was replaced by HER.
        goal_gap: [B] long, t' - t where t' is the step that achieved the relabelled goal; -1 when not relabelled.
        goal_limit: [B] long, step limit of the goal (0 when unknown).
        logp: [B] float behaviour log-prob; policy_version: [B] long.
    """

    prompt_ids: torch.Tensor
    prompt_mask: torch.Tensor
    cand_ids: torch.Tensor
    cand_mask: torch.Tensor
    action: torch.Tensor
    reward: torch.Tensor
    discount: torch.Tensor
    next_prompt_ids: torch.Tensor
    next_prompt_mask: torch.Tensor
    next_cand_ids: torch.Tensor
    next_cand_mask: torch.Tensor
    terminated: torch.Tensor
    truncated: torch.Tensor
    n_steps: torch.Tensor
    goal: torch.Tensor
    relabelled: torch.Tensor
    goal_gap: torch.Tensor
    goal_limit: torch.Tensor
    logp: torch.Tensor
    policy_version: torch.Tensor

    def to(self, device: torch.device | str) -> Batch:
        """Return a copy with every tensor moved to ``device``."""
        return Batch(**{f.name: getattr(self, f.name).to(device) for f in fields(self)})

    def slice(self, start: int, stop: int) -> Batch:
        """Rows ``start:stop`` of every tensor (for gradient accumulation)."""
        return Batch(**{f.name: getattr(self, f.name)[start:stop] for f in fields(self)})

    def __len__(self) -> int:
        return int(self.action.shape[0])


# Scalar diagnostics from one update, as 0-d tensors (kept on device: logging converts them, not the hot path).
UpdateStats = dict[str, torch.Tensor]


@dataclass
class ActOutput:
    """What an act function returns for N states: action [N] long, logp [N] float (on CPU), and for actors with a
    value head (PPO) value [N] float, V(s) recorded at acting time."""

    action: torch.Tensor
    logp: torch.Tensor
    value: torch.Tensor | None = None


class ActFn(Protocol):
    """The collector's only view of the agent: choose one candidate per state."""

    def __call__(
        self, goals: Sequence[str], observations: Sequence[str], candidates: Sequence[Sequence[str]]
    ) -> ActOutput: ...


class RewardFn(Protocol):
    """Reward over goal ids, for HER: ``(achieved [B, G] ids padded -1, goal [B]) -> (reward [B], terminated [B])``."""

    def __call__(self, achieved: torch.Tensor, goal: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...


class AchievedGoalsFn(Protocol):
    """Where achieved goals come from (oracle, rule, llm): one step's info and observation -> newly achieved goals."""

    def __call__(self, observation: str, info: dict[str, Any]) -> list[str]: ...


class TextEnv(Protocol):
    """The environment contract of docs/design/ENVIRONMENTS.md (implemented by ``envs.base.TextEnvBase``)."""

    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[str, dict[str, Any]]: ...

    def step(self, action: str) -> tuple[str, float, bool, bool, dict[str, Any]]: ...

    def goal_category(self, goal: str) -> str: ...

    def goal_step_limit(self, goal: str) -> int | None: ...

    def expert_action(self) -> str: ...
