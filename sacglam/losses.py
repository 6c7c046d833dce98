"""Discrete soft actor-critic losses over variable candidate sets (docs/design/ALGORITHM.md sections 1, 3 and 9).

Pure functions over tensors, in the TorchRL manner: no optimizer, no module state, each returning its named terms.
Expectations over the candidate set are exact (sums weighted by ``pi``), never sampled. Absent candidate slots
(``valid == False``) carry ``pi = 0`` and ``log_pi = 0`` exactly, so ``pi * log_pi`` and ``pi * Q`` vanish there and
no ``inf``/``NaN`` can reach a gradient, even for a state with no candidate at all (e.g. a terminal next state).

Shape letters: B batch, K candidate slots, n_q twin critics.

This module imports torch only.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F


class CriticLoss(NamedTuple):
    """Named terms of :func:`critic_loss`.

    Attributes:
        loss: 0-d, mean over critics and batch of the (squared or Huber) TD error.
        td_error: [n_q, B] ``Q_i(s, a) - y`` (detached), for diagnostics and prioritisation.
    """

    loss: torch.Tensor
    td_error: torch.Tensor


class ActorLoss(NamedTuple):
    """Named terms of :func:`actor_loss`.

    Attributes:
        loss: 0-d, ``mean_B sum_a pi(a|s) [alpha log pi(a|s) - min_i Q_i(s, a)]``.
        entropy: [B] policy entropy ``-sum_a pi log pi`` (detached), for the temperature loss and logging.
    """

    loss: torch.Tensor
    entropy: torch.Tensor


class AlphaLoss(NamedTuple):
    """Named terms of :func:`alpha_loss`.

    Attributes:
        loss: 0-d, ``mean_B alpha (H(s) - H_target(s))`` with gradient to ``log_alpha`` only.
        alpha: 0-d, ``exp(log_alpha)`` (detached).
    """

    loss: torch.Tensor
    alpha: torch.Tensor


class HindsightBCLoss(NamedTuple):
    """Named terms of :func:`hindsight_bc_loss`.

    Attributes:
        loss: 0-d, ``sum_B w * (-log pi(a|s, g')) / B`` over eligible transitions (0 when none is eligible).
        fraction: 0-d, share of the batch that was eligible (detached).
    """

    loss: torch.Tensor
    fraction: torch.Tensor


def candidate_policy(
    scores: torch.Tensor, valid: torch.Tensor, temperature: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """The policy over a candidate set: ``pi(a|s) = softmax_{a in A(s)} score(a|s) / temperature``.

    Args:
        scores: [B, K] float, ``score(a|s)`` (sum of the candidate's token log-probs, see ``scoring.py``).
        valid: [B, K] bool, False for absent candidate slots.
        temperature: policy temperature (> 0); scores are divided by it before the softmax.

    Returns:
        ``(log_pi, pi)``, both [B, K] in the dtype of ``scores``; absent slots hold exactly 0.0 in both. A state with
        no valid candidate gets an all-zero row (its soft value is then 0).

    Raises:
        ValueError: if ``temperature`` is not positive or the shapes differ.
    """
    if temperature <= 0:
        raise ValueError(f"candidate_policy: temperature must be > 0, got {temperature}; use e.g. 1.0.")
    if scores.shape != valid.shape:
        raise ValueError(f"candidate_policy: scores {tuple(scores.shape)} and valid {tuple(valid.shape)} must match.")
    logits = scores / temperature
    # A finite fill (not -inf) keeps a row with no valid candidate finite; exp(min - max) underflows to exactly 0.
    logits = logits.masked_fill(~valid, torch.finfo(logits.dtype).min)
    log_pi = torch.where(valid, F.log_softmax(logits, dim=-1), torch.zeros_like(logits))
    pi = torch.where(valid, log_pi.exp(), torch.zeros_like(logits))
    return log_pi, pi


def choose_candidates(
    log_pi: torch.Tensor,
    pi: torch.Tensor,
    valid: torch.Tensor,
    *,
    greedy: bool,
    generator: torch.Generator | None = None,
    who: str = "act",
) -> tuple[torch.Tensor, torch.Tensor]:
    """One candidate per state from a candidate policy: the argmax of pi, or a sample from it.

    Args:
        log_pi, pi: [N, K] (``candidate_policy``); valid: [N, K] bool.
        greedy: argmax instead of sampling.
        generator: random generator for sampling (its device may differ from the policy's).
        who: the caller's name for the error message.

    Returns:
        action [N] long and its log pi [N], on the policy's device.

    Raises:
        ValueError: if a state has no candidate (one host sync per call; acting ends in a host copy anyway).
    """
    has_cand = valid.any(-1)
    if not bool(has_cand.all()):
        rows = (~has_cand).nonzero().flatten().tolist()
        raise ValueError(f"{who}: states {rows} have no candidate action; every state needs at least one.")
    if greedy:
        action = log_pi.masked_fill(~valid, float("-inf")).argmax(-1)
    else:
        probs = pi.float()
        if generator is not None and generator.device != probs.device:
            probs = probs.to(generator.device)
        action = torch.multinomial(probs, 1, generator=generator).squeeze(-1).to(log_pi.device)
    return action, log_pi.gather(-1, action.unsqueeze(-1)).squeeze(-1)


def soft_value(
    pi: torch.Tensor, log_pi: torch.Tensor, q_min: torch.Tensor, alpha: torch.Tensor | float
) -> torch.Tensor:
    """Soft state value ``V(s) = sum_a pi(a|s) [min_i Q_i(s, a) - alpha log pi(a|s)]``.

    Args:
        pi: [B, K] policy (0 on absent slots).
        log_pi: [B, K] log policy (0 on absent slots).
        q_min: [B, K] ``min_i Q_i(s, a)``; any finite value on absent slots.
        alpha: entropy temperature, a float or a 0-d tensor.

    Returns:
        [B] soft value.
    """
    return (pi * (q_min - alpha * log_pi)).sum(-1)


def critic_target(reward: torch.Tensor, discount: torch.Tensor, next_v: torch.Tensor) -> torch.Tensor:
    """TD target ``y = R^(n) + gamma^k (1 - terminated) V_targ(s_{t+k})`` (detached).

    Truncation is not termination: the buffer folds only ``terminated`` into ``discount``, so a time-limited
    transition still bootstraps.

    Args:
        reward: [B] n-step return ``R^(n)`` for the (possibly relabelled) goal.
        discount: [B] ``gamma^k * (1 - terminated)``, as in ``sacglam.types.Batch.discount``.
        next_v: [B] soft value of the bootstrap state from the target critic.

    Returns:
        [B] target ``y``, without gradient.
    """
    return (reward + discount * next_v).detach()


def critic_loss(q_taken: torch.Tensor, y: torch.Tensor, huber: bool = False) -> CriticLoss:
    """Critic loss ``mean over i and batch of (Q_i(s, a) - y)^2`` (or Huber with delta 1).

    The mean (not the sum) over critics follows docs/design/ALGORITHM.md section 3; with Adam the overall scale barely
    matters,
    but it keeps the critic's weight against the actor loss on a shared trunk independent of ``n_q``.

    Args:
        q_taken: [n_q, B] ``Q_i(s, a)`` of the taken action for every critic.
        y: [B] TD target (no gradient).
        huber: use the smooth-L1 (Huber, delta 1) loss instead of the squared error.

    Returns:
        :class:`CriticLoss`.

    Raises:
        ValueError: if ``q_taken`` is not [n_q, B] with B = len(y).
    """
    if q_taken.dim() != 2 or q_taken.shape[1:] != y.shape:
        raise ValueError(
            f"critic_loss: q_taken must be [n_q, B] and y [B]; got {tuple(q_taken.shape)}, {tuple(y.shape)}."
        )
    target = y.detach().unsqueeze(0).expand_as(q_taken)
    loss = F.smooth_l1_loss(q_taken, target, beta=1.0) if huber else F.mse_loss(q_taken, target)
    return CriticLoss(loss=loss, td_error=(q_taken - target).detach())


def actor_loss(pi: torch.Tensor, log_pi: torch.Tensor, q_min: torch.Tensor, alpha: torch.Tensor | float) -> ActorLoss:
    """Actor loss ``mean_B sum_a pi(a|s) [alpha log pi(a|s) - min_i Q_i(s, a)]`` with Q held fixed.

    Args:
        pi: [B, K] policy (with gradient).
        log_pi: [B, K] log policy (with gradient).
        q_min: [B, K] ``min_i Q_i(s, a)``; detached here so that the actor loss never trains the critic.
        alpha: entropy temperature (float or 0-d tensor; detached here).

    Returns:
        :class:`ActorLoss`.
    """
    if isinstance(alpha, torch.Tensor):
        alpha = alpha.detach()
    loss = (pi * (alpha * log_pi - q_min.detach())).sum(-1).mean()
    entropy = -(pi * log_pi).sum(-1).detach()
    return ActorLoss(loss=loss, entropy=entropy)


def target_entropy(valid: torch.Tensor, ratio: float) -> torch.Tensor:
    """Per-state entropy target ``H_target(s) = ratio * log |A(s)|`` (candidate sets vary in size).

    Args:
        valid: [B, K] bool candidate mask.
        ratio: fraction of the maximum (uniform) entropy to aim for, e.g. 0.6-0.9.

    Returns:
        [B] float target; 0 for a state with at most one candidate.
    """
    n = valid.sum(-1).clamp(min=1).to(torch.float32)
    return ratio * n.log()


def alpha_loss(log_alpha: torch.Tensor, entropy: torch.Tensor, target_entropy: torch.Tensor) -> AlphaLoss:
    """Temperature loss ``mean_B alpha (H(pi(.|s)) - H_target(s))``, gradient to ``log_alpha`` only.

    Descending it raises alpha when the entropy is below its target and lowers it when above (standard discrete
    SAC with a per-state target).

    Args:
        log_alpha: 0-d learnable log temperature.
        entropy: [B] policy entropy (detached here).
        target_entropy: [B] per-state target, see :func:`target_entropy`.

    Returns:
        :class:`AlphaLoss`.
    """
    alpha = log_alpha.exp()
    gap = (entropy.detach() - target_entropy.detach()).to(alpha.dtype)
    return AlphaLoss(loss=(alpha * gap).mean(), alpha=alpha.detach())


def hindsight_bc_loss(
    log_pi_taken: torch.Tensor,
    relabelled: torch.Tensor,
    goal_gap: torch.Tensor,
    goal_limit: torch.Tensor,
    *,
    within_limit: bool = True,
    discount: float | None = None,
) -> HindsightBCLoss:
    """Hindsight supervised term ``-log pi(a_t | s_t, g')`` on HER-relabelled transitions (docs/design/ALGORITHM.md
    section 9).

    A relabelled goal ``g'`` was achieved at step ``t' = t + goal_gap`` of the same episode, so the taken action is
    a demonstration for it. With ``within_limit`` only transitions with ``t' - t + 1 <= limit`` count (when the goal's
    step limit is known, i.e. > 0). With ``discount`` each term is weighted by ``discount ** (t' - t)``.

    The sum is divided by the full batch size, as if each eligible transition added its term to a batch-mean actor
    loss; this keeps gradient accumulation over equal micro-batches exact.

    Args:
        log_pi_taken: [B] ``log pi(a_t | s_t)`` of the taken action under the relabelled goal (with gradient).
        relabelled: [B] bool, the goal was replaced by HER.
        goal_gap: [B] long, ``t' - t`` (-1 when not relabelled).
        goal_limit: [B] long, the goal's step limit (0 when unknown).
        within_limit: keep only transitions reached within the goal's step limit.
        discount: if given, weight each term by ``discount ** goal_gap`` (e.g. gamma).

    Returns:
        :class:`HindsightBCLoss`.
    """
    eligible = relabelled & (goal_gap >= 0)
    if within_limit:
        eligible = eligible & ((goal_limit <= 0) | (goal_gap + 1 <= goal_limit))
    weight = eligible.to(log_pi_taken.dtype)
    if discount is not None:
        weight = weight * torch.pow(torch.full_like(weight, discount), goal_gap.clamp(min=0).to(weight.dtype))
    # where() rather than a product: an ineligible row's log-prob never enters the graph (no 0 * -inf).
    terms = torch.where(eligible, -log_pi_taken * weight, torch.zeros_like(log_pi_taken))
    batch = max(int(log_pi_taken.shape[0]), 1)
    return HindsightBCLoss(loss=terms.sum() / batch, fraction=eligible.float().mean().detach())


__all__ = [
    "ActorLoss",
    "AlphaLoss",
    "CriticLoss",
    "HindsightBCLoss",
    "actor_loss",
    "alpha_loss",
    "candidate_policy",
    "critic_loss",
    "critic_target",
    "hindsight_bc_loss",
    "soft_value",
    "target_entropy",
]
