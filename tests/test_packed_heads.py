"""The SAC update's work on real data only (issue 28): the critic heads on real candidate slots, the online pass's
heads backward on the taken candidates, the target pass on the non-terminal transitions (``rows``). Each gives the
values and the gradients of the full, masked computation."""

from __future__ import annotations

import pytest
import torch

from sacglam.agent import QHeads
from sacglam.losses import actor_loss, critic_loss, critic_target, soft_value
from sacglam.scoring import score_candidates
from tests.test_agent import make_batch, tiny_agent
from tests.test_scoring import _build, _random_inputs

torch.set_num_threads(1)


def _ragged(b: int = 6, k: int = 5, h: int = 8, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Hidden states [b, k, h] and a ragged valid mask: counts 1, k, 0, 3, 2, 1 (trailing and interior gaps)."""
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(b, k, h, generator=gen)
    valid = torch.zeros(b, k, dtype=torch.bool)
    valid[0, 0] = True  # a single candidate
    valid[1] = True  # all slots
    # row 2: no candidate at all (a terminal next state)
    valid[3, [0, 2, 4]] = True  # gaps inside the row
    valid[4, :2] = True
    valid[5, 3] = True  # a single candidate, not in slot 0
    return hidden, valid


def _grads(heads: QHeads, hidden: torch.Tensor, q: torch.Tensor, w: torch.Tensor) -> list[torch.Tensor]:
    params = list(heads.parameters())
    return list(torch.autograd.grad((q * w).sum(), [hidden, *params], retain_graph=True))


@pytest.mark.parametrize(("hidden_sizes", "n_q"), [([16, 16], 2), ([], 1)])
def test_packed_heads_equal_the_masked_full_computation(hidden_sizes: list[int], n_q: int) -> None:
    torch.manual_seed(0)
    heads = QHeads(8, hidden_sizes, n_q)
    hidden, valid = _ragged()
    w = torch.randn(n_q, *valid.shape)  # a loss weighting every slot differently
    h_full = hidden.clone().requires_grad_(True)
    h_packed = hidden.clone().requires_grad_(True)
    full = heads(h_full, valid)
    packed = heads(h_packed, valid, int(valid.sum()))
    assert packed.shape == full.shape == (n_q, *valid.shape)
    assert (packed[:, ~valid] == 0).all()
    torch.testing.assert_close(packed, full, rtol=1e-6, atol=1e-6)
    # by hand: each real slot is the MLP of its own hidden state
    for i, j in valid.nonzero().tolist():
        torch.testing.assert_close(packed[:, i, j], heads.rows(hidden[i, j][None]).squeeze(1), rtol=1e-6, atol=1e-6)
    for g_full, g_packed in zip(_grads(heads, h_full, full, w), _grads(heads, h_packed, packed, w), strict=True):
        torch.testing.assert_close(g_packed, g_full, rtol=1e-5, atol=1e-6)
    grad_absent = torch.autograd.grad(packed.sum(), h_packed)[0][~valid]
    assert grad_absent.abs().sum() == 0  # absent slots take no gradient


def test_packed_heads_with_no_candidate_in_the_batch() -> None:
    heads = QHeads(8, [4], 2)
    hidden = torch.randn(3, 4, 8)
    valid = torch.zeros(3, 4, dtype=torch.bool)
    assert torch.equal(heads(hidden, valid, 0), torch.zeros(2, 3, 4))


@pytest.mark.parametrize("lora", [True, False])
def test_taken_action_pass_gives_the_full_passes_q_and_gradients(lora: bool) -> None:
    """``agent(..., action=a)``: q (detached) equals the full pass's q, q_taken its gather at a, and the critic and
    actor losses back-propagate the same gradients into every trainable weight (heads, adapter or trunk)."""
    batch = make_batch(size=10, k=5, seed=3)
    batch.cand_mask[4, 1:] = False  # a state with a single candidate
    batch.cand_ids[4, 1:] = 0
    batch.action[4] = 0
    agent = tiny_agent(lora=lora, n_q=2)
    agent.eval()  # no dropout, so the two passes are the same function
    args = (batch.prompt_ids, batch.prompt_mask, batch.cand_ids, batch.cand_mask)
    action = batch.action.long()
    y = torch.linspace(-1.0, 1.0, len(action))
    params = [p for p in agent.parameters() if p.requires_grad]

    def grads(loss: torch.Tensor) -> list[torch.Tensor]:
        got = torch.autograd.grad(loss, params, allow_unused=True)
        return [torch.zeros_like(p) if g is None else g for g, p in zip(got, params, strict=True)]

    full = agent(*args)
    full_taken = full.q.gather(-1, action.view(1, -1, 1).expand(2, -1, 1)).squeeze(-1)
    want_critic = grads(critic_loss(full_taken, y).loss)
    full = agent(*args)
    want_actor = grads(actor_loss(full.pi, full.log_pi, full.q.min(0).values, 0.1).loss)

    split = agent(*args, action=action)
    assert split.q_taken is not None and not split.q.requires_grad and split.q_taken.requires_grad
    torch.testing.assert_close(split.q, full.q.detach(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(split.q_taken, full_taken.detach(), rtol=1e-6, atol=1e-6)
    got_critic = grads(critic_loss(split.q_taken, y).loss)
    split = agent(*args, action=action)
    got_actor = grads(actor_loss(split.pi, split.log_pi, split.q.min(0).values, 0.1).loss)
    assert any(g.abs().sum() > 0 for g in got_critic) and any(g.abs().sum() > 0 for g in got_actor)
    for got, want in zip(got_critic + got_actor, want_critic + want_actor, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_action_is_refused_on_the_target_pass() -> None:
    batch = make_batch()
    agent = tiny_agent()
    with pytest.raises(ValueError, match="online pass"):
        agent(batch.prompt_ids, batch.prompt_mask, batch.cand_ids, batch.cand_mask, target=True, action=batch.action)


@pytest.mark.parametrize("family", ["llama", "t5"])
@pytest.mark.parametrize("trim", [True, False])
def test_scoring_selected_rows_equals_scoring_all_of_them(family: str, trim: bool) -> None:
    model = _build(family, "eager")
    inputs = _random_inputs(5, b=7, lp=6, k=4, lc=3)
    rows = torch.tensor([True, False, True, True, False, False, True])
    full = score_candidates(model, *inputs, trim=trim)
    part = score_candidates(model, *inputs, trim=trim, rows=rows)
    assert torch.equal(part.valid, full.valid & rows[:, None])
    for got, want in ((part.logp, full.logp), (part.hidden, full.hidden), (part.prompt_hidden, full.prompt_hidden)):
        torch.testing.assert_close(got[rows], want[rows], rtol=0, atol=1e-5)
        assert got[~rows].abs().sum() == 0
    if trim:
        assert part.n_valid == int(part.valid.sum()) and full.n_valid == int(full.valid.sum())
    none = score_candidates(model, *inputs, trim=trim, rows=torch.zeros(7, dtype=torch.bool))
    assert not none.valid.any() and none.logp.abs().sum() == 0 and none.hidden.shape == full.hidden.shape
    with pytest.raises(ValueError, match="rows must be"):
        score_candidates(model, *inputs, rows=rows[:3])


@pytest.mark.parametrize("lora", [True, False])
def test_target_pass_on_non_terminal_rows_gives_the_same_bootstrap(lora: bool) -> None:
    """``rows = discount > 0``: the critic target y equals the one of the target pass over every row, exactly where
    the discount is zero and to float precision elsewhere; the skipped rows get a zero soft value."""
    batch = make_batch(size=10, k=4, seed=4)
    batch.discount[[3, 5, 8]] = 0.0  # more terminal rows, one of them (0) with no candidate in s'
    agent = tiny_agent(lora=lora, n_q=2)
    args = (batch.next_prompt_ids, batch.next_prompt_mask, batch.next_cand_ids, batch.next_cand_mask)
    live = batch.discount > 0
    full = agent(*args, target=True)
    part = agent(*args, target=True, rows=live)
    v_full = soft_value(full.pi, full.log_pi, full.q.min(0).values, 0.2)
    v_part = soft_value(part.pi, part.log_pi, part.q.min(0).values, 0.2)
    torch.testing.assert_close(v_part[live], v_full[live], rtol=1e-6, atol=1e-6)
    assert v_part[~live].abs().sum() == 0
    y_full = critic_target(batch.reward, batch.discount, v_full)
    y_part = critic_target(batch.reward, batch.discount, v_part)
    assert torch.equal(y_part[~live], y_full[~live])
    torch.testing.assert_close(y_part, y_full, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="target pass"):
        agent(*args, rows=live)
