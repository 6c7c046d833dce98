"""The critic heads run on real candidate slots only, and the SAC online pass back-propagates the taken ones only
(issue 28): both give the values and the gradients of the full, masked computation."""

from __future__ import annotations

import pytest
import torch

from sacglam.agent import QHeads
from sacglam.losses import actor_loss, critic_loss
from tests.test_agent import make_batch, tiny_agent

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
