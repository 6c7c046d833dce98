"""Exact, hand-computed checks of sacglam.losses on a 2-state, 3-candidate example.

State 0 has three candidates with scores (0, ln 2, 0): pi = (1/4, 1/2, 1/4).
State 1 has two candidates with scores (ln 3, 0) and an absent third slot: pi = (3/4, 1/4, 0).
Twin critics q1 = [[1, 2, 3], [4, 0, 9]], q2 = [[2, 1, 3], [3, 1, 7]], so min Q = [[1, 1, 3], [3, 0, 7]].
alpha = 1/2.
"""

from __future__ import annotations

import math

import pytest
import torch

from sacglam.losses import (
    actor_loss,
    alpha_loss,
    candidate_policy,
    critic_loss,
    critic_target,
    hindsight_bc_loss,
    soft_value,
    target_entropy,
)

LN2, LN3 = math.log(2.0), math.log(3.0)
ALPHA = 0.5
# Entropies by hand: H = -sum pi ln pi.
H0 = -(0.25 * math.log(0.25) * 2 + 0.5 * math.log(0.5))
H1 = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
# Soft values by hand: V = sum pi (min Q) + alpha H.
V0 = 0.25 * 1 + 0.5 * 1 + 0.25 * 3 + ALPHA * H0
V1 = 0.75 * 3 + 0.25 * 0 + ALPHA * H1


def _example(requires_grad: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    scores = torch.tensor([[0.0, LN2, 0.0], [LN3, 0.0, 100.0]], dtype=torch.float64, requires_grad=requires_grad)
    valid = torch.tensor([[True, True, True], [True, True, False]])
    q = torch.tensor([[[1.0, 2.0, 3.0], [4.0, 0.0, 9.0]], [[2.0, 1.0, 3.0], [3.0, 1.0, 7.0]]], dtype=torch.float64)
    return scores, valid, q


def test_candidate_policy_exact_and_absent_slot_zero() -> None:
    scores, valid, _ = _example()
    log_pi, pi = candidate_policy(scores, valid)
    expected_pi = torch.tensor([[0.25, 0.5, 0.25], [0.75, 0.25, 0.0]], dtype=torch.float64)
    torch.testing.assert_close(pi, expected_pi, rtol=0, atol=1e-12)
    expected_log_pi = torch.tensor(
        [[math.log(0.25), math.log(0.5), math.log(0.25)], [math.log(0.75), math.log(0.25), 0.0]], dtype=torch.float64
    )
    torch.testing.assert_close(log_pi, expected_log_pi, rtol=0, atol=1e-12)
    assert pi[1, 2].item() == 0.0 and log_pi[1, 2].item() == 0.0  # exactly zero, not just small


def test_candidate_policy_temperature_and_empty_state() -> None:
    scores = torch.tensor([[0.0, math.log(4.0)], [5.0, -3.0]])
    valid = torch.tensor([[True, True], [False, False]])
    log_pi, pi = candidate_policy(scores, valid, temperature=2.0)
    # score / 2 = (0, ln 2): pi = (1/3, 2/3); the state with no candidate is all zeros and finite.
    torch.testing.assert_close(pi, torch.tensor([[1 / 3, 2 / 3], [0.0, 0.0]]), rtol=0, atol=1e-6)
    assert torch.isfinite(log_pi).all() and (log_pi[1] == 0).all()
    with pytest.raises(ValueError, match="temperature"):
        candidate_policy(scores, valid, temperature=0.0)


def test_soft_value_and_critic_target_truncated_vs_terminated() -> None:
    scores, valid, q = _example()
    log_pi, pi = candidate_policy(scores, valid)
    v = soft_value(pi, log_pi, q.min(0).values, ALPHA)
    torch.testing.assert_close(v, torch.tensor([V0, V1], dtype=torch.float64), rtol=0, atol=1e-12)
    # Row 0 was truncated after k = 2 steps (bootstraps: discount = 0.9^2); row 1 terminated (discount 0).
    reward = torch.tensor([0.5, 1.0], dtype=torch.float64)
    discount = torch.tensor([0.81, 0.0], dtype=torch.float64)
    y = critic_target(reward, discount, v)
    torch.testing.assert_close(y, torch.tensor([0.5 + 0.81 * V0, 1.0], dtype=torch.float64), rtol=0, atol=1e-12)
    assert not y.requires_grad


def test_critic_loss_mse_and_huber() -> None:
    _, _, q = _example()
    action = torch.tensor([1, 0])
    q_taken = q[:, torch.arange(2), action]  # q1: (2, 4), q2: (1, 3)
    y = torch.tensor([0.5 + 0.81 * V0, 1.0], dtype=torch.float64)
    out = critic_loss(q_taken, y)
    diffs = [2 - y[0].item(), 4 - 1.0, 1 - y[0].item(), 3 - 1.0]
    assert out.loss.item() == pytest.approx(sum(d * d for d in diffs) / 4, abs=1e-12)
    torch.testing.assert_close(out.td_error, torch.tensor([[diffs[0], diffs[1]], [diffs[2], diffs[3]]]).double())
    # Huber (delta 1): 0.5 d^2 inside [-1, 1], |d| - 0.5 outside.
    qs = torch.tensor([[0.5, 3.0]])
    huber = critic_loss(qs, torch.zeros(2), huber=True)
    assert huber.loss.item() == pytest.approx((0.5 * 0.25 + (3.0 - 0.5)) / 2, abs=1e-7)
    with pytest.raises(ValueError, match="n_q, B"):
        critic_loss(torch.zeros(2, 3), torch.zeros(2))


def test_actor_loss_exact_and_finite_gradient_with_absent_slot() -> None:
    scores, valid, q = _example(requires_grad=True)
    log_pi, pi = candidate_policy(scores, valid)
    out = actor_loss(pi, log_pi, q.min(0).values, torch.tensor(ALPHA))
    # sum_a pi (alpha log pi - Qmin) = -alpha H - E_pi[Qmin] per state.
    expected = ((-ALPHA * H0 - 1.5) + (-ALPHA * H1 - 2.25)) / 2
    assert out.loss.item() == pytest.approx(expected, abs=1e-12)
    torch.testing.assert_close(out.entropy, torch.tensor([H0, H1], dtype=torch.float64), rtol=0, atol=1e-12)
    out.loss.backward()
    assert scores.grad is not None
    assert torch.isfinite(scores.grad).all()
    assert scores.grad[1, 2].item() == 0.0  # the absent slot gets no gradient
    # The gradient descends towards higher Q: in state 0, candidate 2 (Q 3) has a negative gradient.
    assert scores.grad[0, 2].item() < 0


def test_alpha_loss_exact_and_target_entropy() -> None:
    valid = torch.tensor([[True, True, True], [True, True, False]])
    h_target = target_entropy(valid, ratio=0.5)
    torch.testing.assert_close(h_target, torch.tensor([0.5 * LN3, 0.5 * LN2]), rtol=0, atol=1e-6)
    log_alpha = torch.tensor(math.log(ALPHA), requires_grad=True)
    entropy = torch.tensor([H0, H1])
    out = alpha_loss(log_alpha, entropy, h_target)
    expected = ALPHA * ((H0 - 0.5 * LN3) + (H1 - 0.5 * LN2)) / 2
    assert out.loss.item() == pytest.approx(expected, abs=1e-6)
    assert out.alpha.item() == pytest.approx(ALPHA)
    out.loss.backward()
    assert log_alpha.grad is not None
    assert log_alpha.grad.item() == pytest.approx(expected, abs=1e-6)  # d(alpha)/d(log alpha) = alpha
    # A state with one candidate has target 0; a state with none is clamped to one (no -inf).
    assert target_entropy(torch.tensor([[True, False], [False, False]]), 0.9).tolist() == [0.0, 0.0]


@pytest.mark.parametrize(("entropy", "direction"), [(0.1, 1.0), (1.0, -1.0)])
def test_alpha_rises_below_target_and_falls_above(entropy: float, direction: float) -> None:
    valid = torch.ones(4, 3, dtype=torch.bool)
    h_target = target_entropy(valid, ratio=0.5)  # 0.5 ln 3 = 0.549
    log_alpha = torch.nn.Parameter(torch.tensor(math.log(0.01)))
    before = log_alpha.item()
    opt = torch.optim.SGD([log_alpha], lr=1.0)
    alpha_loss(log_alpha, torch.full((4,), entropy), h_target).loss.backward()
    opt.step()
    assert (log_alpha.item() - before) * direction > 0


def test_hindsight_bc_loss_eligibility_and_discount() -> None:
    log_pi_taken = torch.tensor([-1.0, -2.0, -3.0, -4.0], requires_grad=True)
    relabelled = torch.tensor([True, True, False, True])
    goal_gap = torch.tensor([0, 5, -1, 2])
    goal_limit = torch.tensor([3, 3, 0, 0])  # row 1 is out of its limit (5 + 1 > 3); row 3's limit is unknown
    out = hindsight_bc_loss(log_pi_taken, relabelled, goal_gap, goal_limit)
    assert out.loss.item() == pytest.approx((1.0 + 4.0) / 4)
    assert out.fraction.item() == pytest.approx(0.5)
    out.loss.backward()
    assert log_pi_taken.grad is not None
    assert log_pi_taken.grad.tolist() == [-0.25, 0.0, 0.0, -0.25]
    weighted = hindsight_bc_loss(log_pi_taken, relabelled, goal_gap, goal_limit, discount=0.5)
    assert weighted.loss.item() == pytest.approx((1.0 * 1 + 4.0 * 0.25) / 4)
    no_limit = hindsight_bc_loss(log_pi_taken, relabelled, goal_gap, goal_limit, within_limit=False)
    assert no_limit.loss.item() == pytest.approx((1.0 + 2.0 + 4.0) / 4)
    none = hindsight_bc_loss(log_pi_taken, torch.zeros(4, dtype=torch.bool), goal_gap, goal_limit)
    assert none.loss.item() == 0.0
