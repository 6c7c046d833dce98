"""Agent: heads on the scorer's hidden states, the target network (LoRA adapter or trunk copy), Polyak, act."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM, T5Config, T5ForConditionalGeneration

from sacglam.agent import Agent, AgentConfig
from sacglam.types import Batch

torch.set_num_threads(1)

VOCAB = 64


def tiny_model(seed: int = 0) -> LlamaForCausalLM:
    """A 2-layer, hidden-32 random Llama (no download)."""
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=128,
    )
    return LlamaForCausalLM(cfg)


def tiny_lora(seed: int = 0) -> torch.nn.Module:
    """The tiny model with LoRA on q/v; ``init_lora_weights=False`` makes B non-zero so every LoRA weight gets a
    gradient and the target copy is distinguishable from the base."""
    model = tiny_model(seed)
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    return get_peft_model(model, cfg)


def tiny_agent(lora: bool = True, seed: int = 0, **kw: object) -> Agent:
    model = tiny_lora(seed) if lora else tiny_model(seed)
    torch.manual_seed(seed + 100)
    return Agent(model, AgentConfig(critic_hidden=[16], **kw))  # type: ignore[arg-type]


def _states(gen: torch.Generator, n: int, k: int, lp: int, lc: int) -> tuple[torch.Tensor, ...]:
    plen = torch.randint(2, lp + 1, (n,), generator=gen)
    prompt_mask = torch.arange(lp) < plen[:, None]
    prompt_ids = torch.randint(1, VOCAB, (n, lp), generator=gen) * prompt_mask
    clen = torch.randint(1, lc + 1, (n, k), generator=gen)
    n_cands = torch.randint(2, k + 1, (n,), generator=gen)
    clen = clen * (torch.arange(k) < n_cands[:, None])  # trailing slots absent
    cand_mask = torch.arange(lc) < clen[..., None]
    cand_ids = torch.randint(1, VOCAB, (n, k, lc), generator=gen) * cand_mask
    return prompt_ids, prompt_mask, cand_ids, cand_mask, n_cands


def make_batch(size: int = 8, k: int = 4, lp: int = 7, lc: int = 3, seed: int = 0) -> Batch:
    """A hand-made replay batch: varied prompt/candidate lengths, absent slots, one terminal next state with no
    candidate at all, half the rows relabelled by HER."""
    gen = torch.Generator().manual_seed(seed)
    p_ids, p_mask, c_ids, c_mask, n_cands = _states(gen, size, k, lp, lc)
    np_ids, np_mask, nc_ids, nc_mask, _ = _states(gen, size, k, lp, lc)
    nc_mask[0] = False  # a terminated transition whose final state offers no action
    nc_ids[0] = 0
    action = (torch.rand(size, generator=gen) * n_cands).long()
    terminated = torch.zeros(size, dtype=torch.bool)
    terminated[0] = True
    terminated[1] = True
    truncated = torch.zeros(size, dtype=torch.bool)
    truncated[2] = True
    n_steps = torch.full((size,), 3, dtype=torch.long)
    discount = 0.9**n_steps * (~terminated)
    relabelled = torch.arange(size) % 2 == 1
    goal_gap = torch.where(relabelled, torch.arange(size) % 4, -1)
    return Batch(
        prompt_ids=p_ids,
        prompt_mask=p_mask,
        cand_ids=c_ids,
        cand_mask=c_mask,
        action=action,
        reward=(torch.arange(size) % 3 == 0).float(),
        discount=discount.float(),
        next_prompt_ids=np_ids,
        next_prompt_mask=np_mask,
        next_cand_ids=nc_ids,
        next_cand_mask=nc_mask,
        terminated=terminated,
        truncated=truncated,
        n_steps=n_steps,
        goal=torch.zeros(size, dtype=torch.long),
        relabelled=relabelled,
        goal_gap=goal_gap,
        goal_limit=torch.full((size,), 3, dtype=torch.long),
        logp=torch.zeros(size),
        policy_version=torch.zeros(size, dtype=torch.long),
    )


def _inputs(b: Batch) -> tuple[torch.Tensor, ...]:
    return b.prompt_ids, b.prompt_mask, b.cand_ids, b.cand_mask


@pytest.mark.parametrize("lora", [True, False])
def test_forward_shapes_policy_and_target_equals_online_at_init(lora: bool) -> None:
    agent = tiny_agent(lora=lora)
    b = make_batch()
    out = agent(*_inputs(b))
    B, K = b.action.shape[0], b.cand_ids.shape[1]
    assert out.log_pi.shape == (B, K) and out.q.shape == (2, B, K)
    valid = b.cand_mask.any(-1)
    assert torch.equal(out.valid, valid)
    torch.testing.assert_close(out.pi.sum(-1), torch.ones(B))
    assert (out.pi[~valid] == 0).all() and (out.q[:, ~valid] == 0).all()
    assert not torch.equal(out.q[0], out.q[1])  # independent twin heads
    tgt = agent(*_inputs(b), target=True)
    assert not tgt.q.requires_grad
    # The target starts as an exact copy of the online network (LoRA B is non-zero here, so a missed copy shows).
    torch.testing.assert_close(tgt.q, out.q.detach(), rtol=0, atol=1e-6)
    torch.testing.assert_close(tgt.log_pi, out.log_pi.detach(), rtol=0, atol=1e-6)


def test_lora_target_adapter_and_trainable_sets() -> None:
    agent = tiny_agent(lora=True)
    names = {n for n, p in agent.model.named_parameters() if p.requires_grad}
    assert names and all(".default." in n for n in names)  # only the online adapter trains
    assert any(".target." in n for n, _ in agent.model.named_parameters())
    actor = agent.actor_parameters()
    assert len(actor) == len(names) == 8  # 2 layers x (q, v) x (A, B)
    assert len(agent.critic_parameters()) == 2 * 4  # 2 heads x (Linear, Linear) x (weight, bias)
    # Flags survive forward passes that switch adapters.
    agent(*_inputs(make_batch()), target=True)
    assert {n for n, p in agent.model.named_parameters() if p.requires_grad} == names


@pytest.mark.parametrize(("lora", "separate"), [(True, False), (True, True), (False, False)])
def test_update_target_moves_by_exactly_tau(lora: bool, separate: bool) -> None:
    agent = tiny_agent(lora=lora, separate_adapter=separate)
    frozen = {n: p.detach().clone() for n, p in agent.model.named_parameters() if not p.requires_grad}
    pairs = agent._polyak_pairs
    with torch.no_grad():  # move the online weights away from the target
        for online, _ in pairs:
            online.add_(torch.randn_like(online))
    before = [(o.detach().clone(), t.detach().clone()) for o, t in pairs]
    tau = 0.25
    agent.update_target(tau)
    for (o_new, t_new), (o_old, t_old) in zip(pairs, before, strict=True):
        torch.testing.assert_close(t_new, (1 - tau) * t_old + tau * o_old, rtol=0, atol=1e-6)
        assert torch.equal(o_new, o_old)
    n_heads = 2 * 2 * 2  # n_q x layers x (weight, bias)
    n_trunk = 8 if lora else sum(1 for p in agent.model.parameters() if p.requires_grad)
    assert len(pairs) == n_trunk + n_heads
    # Frozen base weights are never averaged (a target adapter lives beside them, not on them).
    for n, p in agent.model.named_parameters():
        if n in frozen and ".target." not in n:
            assert torch.equal(p, frozen[n]), n
    with pytest.raises(ValueError, match="tau"):
        agent.update_target(1.5)


def test_separate_adapter_critic_reads_own_adapter_and_both_get_gradients() -> None:
    agent = tiny_agent(lora=True, separate_adapter=True)
    critic_names = {n for n, p in agent.model.named_parameters() if p.requires_grad and ".critic." in n}
    assert len(critic_names) == 8
    b = make_batch()
    out = agent(*_inputs(b))
    (out.q.sum() + out.log_pi.sum()).backward()
    for n, p in agent.model.named_parameters():
        if ".default." in n or ".critic." in n:
            assert p.grad is not None and p.grad.abs().sum() > 0, n
        elif p.grad is not None:
            raise AssertionError(f"{n} got a gradient")
    # The critic adapter starts as a fresh adapter, so Q differs from the shared-adapter agent with the same heads.
    shared = tiny_agent(lora=True)
    shared.heads.load_state_dict(agent.heads.state_dict())
    assert not torch.allclose(shared(*_inputs(b)).q, out.q)


def test_separate_adapter_needs_peft() -> None:
    with pytest.raises(ValueError, match="separate_adapter"):
        tiny_agent(lora=False, separate_adapter=True)


def test_act_greedy_sampled_and_logp() -> None:
    agent = tiny_agent(lora=True, temperature=0.5)
    b = make_batch(size=6, k=4)
    log_pi = agent(*_inputs(b)).log_pi.detach()
    greedy = agent.act(*_inputs(b), greedy=True)
    valid = b.cand_mask.any(-1)
    assert torch.equal(greedy.action, log_pi.masked_fill(~valid, float("-inf")).argmax(-1))
    torch.testing.assert_close(greedy.logp, log_pi.gather(-1, greedy.action[:, None]).squeeze(-1))
    draws = [agent.act(*_inputs(b), greedy=False, generator=torch.Generator().manual_seed(s)) for s in range(30)]
    again = agent.act(*_inputs(b), greedy=False, generator=torch.Generator().manual_seed(0))
    assert torch.equal(draws[0].action, again.action)  # reproducible with the generator
    actions = torch.stack([d.action for d in draws])
    assert valid.gather(-1, actions.T).all()  # never an absent slot
    assert len({tuple(a.tolist()) for a in actions}) > 1  # sampling is not greedy
    b.cand_mask[2] = False
    with pytest.raises(ValueError, match=r"states \[2\]"):
        agent.act(*_inputs(b), greedy=True)


@pytest.mark.parametrize("lora", [True, False])
def test_seq2seq_target_and_act_run_without_dropout(lora: bool) -> None:
    torch.manual_seed(0)
    cfg = T5Config(vocab_size=VOCAB, d_model=32, d_ff=64, num_layers=2, num_heads=2, d_kv=16, dropout_rate=0.5)
    model: torch.nn.Module = T5ForConditionalGeneration(cfg)
    if lora:
        model = get_peft_model(model, LoraConfig(r=4, target_modules=["q", "v"], init_lora_weights=False))
    agent = Agent(model, AgentConfig(critic_hidden=[16]))
    b = make_batch()
    agent.train()  # dropout 0.5 is active in the online pass
    t1, t2 = agent(*_inputs(b), target=True), agent(*_inputs(b), target=True)
    assert torch.equal(t1.q, t2.q) and torch.equal(t1.log_pi, t2.log_pi)
    assert torch.equal(agent.act(*_inputs(b), greedy=True).logp, agent.act(*_inputs(b), greedy=True).logp)
    assert agent.training and agent.model.training  # the mode is restored
    agent.eval()
    online = agent(*_inputs(b))
    torch.testing.assert_close(t1.q, online.q, rtol=0, atol=1e-5)
