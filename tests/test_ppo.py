"""PPO-GLAM: GAE, the clipped losses, the value head's pass, accumulation, clipping, bootstrapping, and learning."""

from __future__ import annotations

import copy
import math
import threading
from typing import Any

import pytest
import torch

from sacglam.algos.ppo.learner import (
    PPOAgent,
    PPOConfig,
    PPOLearner,
    PPOUpdater,
    clipped_policy_loss,
    clipped_value_loss,
    compute_gae,
)
from sacglam.distributed import Dist
from sacglam.scoring import score_candidates, score_candidates_naive
from sacglam.types import TextStep
from tests.test_agent import make_batch, tiny_lora, tiny_model
from tests.test_pipeline import codec as small_codec
from tests.test_sac import _bandit_batch

torch.set_num_threads(1)


# --------------------------------------------------------------------------------------------------------- GAE


def test_gae_and_returns_by_hand_with_a_termination_and_a_truncation() -> None:
    g, lam = 0.5, 0.5  # g * lam = 0.25
    rewards = torch.tensor([[0.0, 0.0, 1.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0, 0.0]]).T  # [T=5, N=2]
    values = torch.tensor([[0.1, 0.2, 0.3, 0.4, 0.5], [0.5, 0.4, 0.3, 0.2, 0.1]]).T
    terminated = torch.zeros(5, 2, dtype=torch.bool)
    truncated = torch.zeros(5, 2, dtype=torch.bool)
    terminated[2, 0] = True  # env 0: the episode ends with reward 1 at t=2; a new one starts at t=3
    truncated[1, 1] = True  # env 1: time limit at t=1, bootstrap V(final observation) = 0.8
    bootstrap = torch.zeros(5, 2)
    bootstrap[1, 1] = 0.8
    bootstrap[4] = torch.tensor([0.6, 0.9])  # V(s_T) after the rollout
    bootstrap[2, 0] = 123.0  # must be ignored: a termination bootstraps nothing
    adv, ret = compute_gae(rewards, values, terminated, truncated, bootstrap, g, lam)
    # env 0, backwards: t4 0+.5*.6-.5=-.2; t3 -.15+.25*(-.2)=-.2; t2 1-.3=.7 (terminal); t1 -.05+.25*.7=.125;
    # t0 0+.25*.125=.03125
    # env 1: t4 .5*.9-.1=.35; t3 -.15+.25*.35=-.0625; t2 -.2+.25*(-.0625)=-.215625; t1 1+.5*.8-.4=1 (truncated,
    # no continuation); t0 .5*.4-.5 + .25*1 = -.05
    expected = torch.tensor([[0.03125, 0.125, 0.7, -0.2, -0.2], [-0.05, 1.0, -0.215625, -0.0625, 0.35]]).T
    torch.testing.assert_close(adv, expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(ret, expected + values, rtol=0, atol=1e-6)


def test_gae_termination_wins_over_truncation_and_lambda_one_is_the_discounted_return() -> None:
    rewards = torch.tensor([[1.0], [2.0], [3.0]])
    values = torch.zeros(3, 1)
    terminated = torch.tensor([[False], [False], [True]])
    truncated = torch.tensor([[False], [False], [True]])
    bootstrap = torch.full((3, 1), 100.0)
    _, ret = compute_gae(rewards, values, terminated, truncated, bootstrap, 0.9, 1.0)
    torch.testing.assert_close(ret[:, 0], torch.tensor([1 + 0.9 * 2 + 0.81 * 3, 2 + 0.9 * 3, 3.0]))


# ------------------------------------------------------------------------------------------------------ losses


def test_clipped_policy_loss_by_hand() -> None:
    ratio = torch.tensor([1.5, 0.5, 1.1, 0.7])
    adv = torch.tensor([1.0, 1.0, -1.0, -1.0])
    old = torch.tensor([-1.0, -2.0, -0.5, -1.5])
    logp = (ratio.log() + old).requires_grad_(True)
    out = clipped_policy_loss(logp, old, adv, 0.2)
    # max(-A r, -A clip(r)): -1.2 (clipped), -0.5 (unclipped), 1.1, 0.8 (clipped) -> mean 0.05
    torch.testing.assert_close(out.loss, torch.tensor(0.05), rtol=0, atol=1e-6)
    torch.testing.assert_close(out.clip_fraction, torch.tensor(0.75))
    torch.testing.assert_close(out.approx_kl, ((ratio - 1) - ratio.log()).mean())
    out.loss.backward()
    # gradient -A r / B where the unclipped term is the max, 0 where the clipped one is
    assert logp.grad is not None
    torch.testing.assert_close(logp.grad, torch.tensor([0.0, -0.125, 0.275, 0.0]), rtol=0, atol=1e-6)


def test_clipped_value_loss_by_hand() -> None:
    values, old, returns = torch.tensor([1.0, 0.0]), torch.tensor([0.5, 0.5]), torch.tensor([2.0, 0.0])
    # row 0: max((1-2)^2, (0.5+0.2-2)^2 = 1.69); row 1: max(0, (0.5-0.2)^2 = 0.09)
    torch.testing.assert_close(clipped_value_loss(values, old, returns, 0.2), torch.tensor(0.89))
    torch.testing.assert_close(clipped_value_loss(values, old, returns, 0.0), torch.tensor(0.5))


# ------------------------------------------------------------------------------------------------- value head


def test_prompt_hidden_is_the_models_own_hidden_state_at_the_last_prompt_token() -> None:
    model = tiny_model(1).eval()
    b = make_batch(size=5)
    shared = score_candidates(model, b.prompt_ids, b.prompt_mask, b.cand_ids, b.cand_mask)
    naive = score_candidates_naive(model, b.prompt_ids, b.prompt_mask, b.cand_ids, b.cand_mask)
    plen = b.prompt_mask.sum(-1)
    for i in range(5):
        ids = b.prompt_ids[i, : plen[i]].unsqueeze(0)
        h = model(input_ids=ids, output_hidden_states=True).hidden_states[-1][0, -1]
        torch.testing.assert_close(shared.prompt_hidden[i], h, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(naive.prompt_hidden[i], h, rtol=1e-5, atol=1e-5)


def test_seq2seq_prompt_hidden_is_the_decoder_start_position() -> None:
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(0)
    model = T5ForConditionalGeneration(T5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=64, num_layers=2,
                                                num_heads=2, decoder_start_token_id=0)).eval()
    b = make_batch(size=3)
    out = score_candidates(model, b.prompt_ids, b.prompt_mask, b.cand_ids, b.cand_mask)
    for i in range(3):
        plen = int(b.prompt_mask[i].sum())
        ref = model(input_ids=b.prompt_ids[i : i + 1, :plen], decoder_input_ids=torch.zeros(1, 1, dtype=torch.long),
                    output_hidden_states=True).decoder_hidden_states[-1][0, 0]
        torch.testing.assert_close(out.prompt_hidden[i], ref, rtol=1e-5, atol=1e-5)


def test_value_comes_from_the_same_scoring_pass() -> None:
    calls = []

    def counting(*args: object, **kw: object) -> object:
        calls.append(1)
        return score_candidates(*args, **kw)  # type: ignore[arg-type]

    agent = PPOAgent(tiny_model(), PPOConfig(value_hidden=[8]), scorer=counting)
    b = make_batch(size=6)
    out = agent(b.prompt_ids, b.prompt_mask, b.cand_ids, b.cand_mask)
    assert len(calls) == 1 and out.value.shape == (6,) and out.log_pi.shape == (6, 4)
    act = agent.act(b.prompt_ids, b.prompt_mask, b.cand_ids, b.cand_mask, greedy=True)
    assert act.value is not None
    torch.testing.assert_close(act.value, out.value.detach(), rtol=1e-5, atol=1e-6)


# -------------------------------------------------------------------------------------------------- the update


def _rollout(agent: PPOAgent, size: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """A flat rollout of ``size`` states with behaviour log-probs and values recorded by ``agent.act``."""
    b = make_batch(size=size, seed=seed)
    gen = torch.Generator().manual_seed(seed)
    act = agent.act(b.prompt_ids, b.prompt_mask, b.cand_ids, b.cand_mask, greedy=False, generator=gen)
    assert act.value is not None
    returns = torch.randn(size, generator=gen)
    return {"prompt_ids": b.prompt_ids, "prompt_mask": b.prompt_mask, "cand_ids": b.cand_ids,
            "cand_mask": b.cand_mask, "action": act.action, "logp": act.logp, "value": act.value,
            "advantages": returns - act.value, "returns": returns}


def _ppo_agent(lora: bool, seed: int = 0) -> PPOAgent:
    model = tiny_lora(seed) if lora else tiny_model(seed)
    torch.manual_seed(seed + 100)
    return PPOAgent(model, PPOConfig(value_hidden=[16]))


def test_first_minibatch_ratio_is_one_and_stats_are_logged() -> None:
    agent = _ppo_agent(lora=False)
    updater = PPOUpdater(agent, PPOConfig(minibatch_size=4, epochs=2), batch_size=8)
    stats = updater.update(_rollout(agent, 8))
    # acting (inference mode, batch of 8) and training (minibatch of 4) recompute the same log-probs
    assert stats["charts/first_ratio_dev"] < 1e-5
    for key in ("losses/policy", "losses/value", "losses/total", "losses/approx_kl", "charts/entropy",
                "charts/clip_fraction", "charts/grad_norm", "charts/explained_variance"):
        assert stats[key].dim() == 0 and torch.isfinite(stats[key]), key
    assert updater.step == 1 and stats["charts/epochs"] == 2


@pytest.mark.parametrize("lora", [True, False])
def test_grad_accumulation_4x2_equals_minibatch_of_8_and_every_trainable_param_changes(lora: bool) -> None:
    grads, params = [], []
    for accum in (1, 4):
        agent = _ppo_agent(lora=lora)
        before = {n: p.detach().clone() for n, p in agent.named_parameters()}
        cfg = PPOConfig(minibatch_size=8, epochs=1, grad_accum=accum, max_grad_norm=0.0, value_hidden=[16])
        updater = PPOUpdater(agent, cfg, batch_size=8, generator=torch.Generator().manual_seed(0))
        updater.update(_rollout(agent, 8))
        trainable = {n for n, p in agent.named_parameters() if p.requires_grad}
        for n, p in agent.named_parameters():
            changed = not torch.equal(before[n], p.detach())
            assert changed == (n in trainable), f"{n}: trainable={n in trainable} changed={changed}"
        grads.append({n: p.grad.clone() for n, p in agent.named_parameters() if p.grad is not None})
        params.append({n: p.detach().clone() for n, p in agent.named_parameters()})
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], rtol=1e-4, atol=1e-6, msg=n)


class _ThreadDist(Dist):
    """Rank ``rank`` of two processes played by two threads: ``mean`` waits for every rank's tensor and returns
    their mean, as the all-reduce does (a rank that skips a call times out)."""

    def __init__(self, rank: int, shared: dict[str, Any]) -> None:
        super().__init__(rank=rank, world=2)
        self.shared = shared

    def mean(self, t: torch.Tensor) -> torch.Tensor:
        slots, barrier = self.shared["slots"], self.shared["barrier"]
        slots[self.rank] = t.detach().clone()
        barrier.wait()
        out = torch.stack(slots).mean(0)
        barrier.wait()  # nobody writes the next call's tensor before all have read this one
        return out


@pytest.mark.parametrize("target_kl", [0.0, 1e-6])
def test_two_processes_on_two_halves_make_the_one_process_update(target_kl: float) -> None:
    """Data-parallel PPO, exactly: each rank takes half of every minibatch (here the whole rollout, so the shuffle
    cannot matter); gradients, advantage moments and the target-KL test are means over ranks. Then both ranks hold
    the weights of one process updating on the whole rollout, and log its losses."""
    full_agent = _ppo_agent(lora=True)
    flat = _rollout(full_agent, 16)
    flat["advantages"] = flat["advantages"] * 3 + 1  # normalisation has work to do
    halves = [{k: v[r * 8 : (r + 1) * 8] for k, v in flat.items()} for r in (0, 1)]
    agents = [copy.deepcopy(full_agent) for _ in (0, 1)]
    cfg = PPOConfig(minibatch_size=16, epochs=3, max_grad_norm=0.5, value_hidden=[16], target_kl=target_kl)
    full = PPOUpdater(full_agent, cfg, batch_size=16, generator=torch.Generator().manual_seed(0))
    full_stats = full.update(flat)

    shared: dict[str, Any] = {"slots": [None, None], "barrier": threading.Barrier(2, timeout=60)}
    out = {}
    updaters = [PPOUpdater(a, PPOConfig(minibatch_size=8, epochs=3, max_grad_norm=0.5, value_hidden=[16],
                                        target_kl=target_kl), batch_size=8, generator=torch.Generator().manual_seed(r))
                for r, a in enumerate(agents)]
    for r, u in enumerate(updaters):
        u.dist = _ThreadDist(r, shared)
    threads = [threading.Thread(target=lambda r=r: out.__setitem__(r, updaters[r].update(halves[r]))) for r in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert set(out) == {0, 1}, "a rank hung or raised"
    expected_epochs = 3 if target_kl == 0 else 2  # one minibatch per epoch: KL 0 in the first, > 1e-6 next
    assert full_stats["charts/epochs"] == out[0]["charts/epochs"] == out[1]["charts/epochs"] == expected_epochs
    for (name, p0), p1, pf in zip(agents[0].named_parameters(), agents[1].parameters(), full_agent.parameters(),
                                  strict=True):
        assert torch.equal(p0, p1), name  # the same averaged gradients: the same weights on both ranks
        torch.testing.assert_close(p0, pf, rtol=1e-4, atol=1e-6, msg=name)
    assert any(not torch.equal(p, q) for p, q in zip(agents[0].parameters(), _ppo_agent(lora=True).parameters(),
                                                     strict=True))
    for key in ("losses/policy", "losses/value", "charts/entropy", "losses/approx_kl", "charts/grad_norm"):
        assert torch.equal(out[0][key], out[1][key]), key
        torch.testing.assert_close(out[0][key].cpu(), full_stats[key].float(), rtol=1e-4, atol=1e-6, msg=key)


def test_gradient_norm_clipping_really_clips() -> None:
    agent = _ppo_agent(lora=False)
    cfg = PPOConfig(minibatch_size=8, epochs=1, max_grad_norm=1e-3, value_hidden=[16])
    stats = PPOUpdater(agent, cfg, batch_size=8).update(_rollout(agent, 8))
    total = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in agent.parameters() if p.grad is not None]))
    assert stats["charts/grad_norm"] > 1e-2  # the norm before clipping, logged
    assert math.isclose(float(total), 1e-3, rel_tol=1e-3)


def test_bad_minibatch_and_grad_accum_name_the_option() -> None:
    agent = _ppo_agent(lora=False)
    with pytest.raises(ValueError, match=r"algo\.minibatch_size=48 does not divide"):
        PPOUpdater(agent, PPOConfig(minibatch_size=48), batch_size=64)
    with pytest.raises(ValueError, match=r"algo\.grad_accum=3 does not divide algo\.minibatch_size=16"):
        PPOUpdater(agent, PPOConfig(minibatch_size=16, grad_accum=3), batch_size=64)


def test_ppo_learns_a_contextual_bandit() -> None:
    """The bandit of tests/test_sac.py, on-policy: one-step episodes sampled from the current policy."""
    agent = PPOAgent(tiny_model(3), PPOConfig(value_hidden=[16]))
    cfg = PPOConfig(lr=1e-3, minibatch_size=32, epochs=4, ent_coef=0.0, value_hidden=[16])
    updater = PPOUpdater(agent, cfg, batch_size=64, generator=torch.Generator().manual_seed(0))
    gen = torch.Generator().manual_seed(0)
    test = _bandit_batch(64, torch.Generator().manual_seed(99))
    test_correct = (test.cand_ids[..., 0] == test.prompt_ids[:, 1:]).long().argmax(-1)

    def accuracy() -> float:
        act = agent.act(test.prompt_ids, test.prompt_mask, test.cand_ids, test.cand_mask, greedy=True)
        return (act.action == test_correct).float().mean().item()

    before = accuracy()
    for _ in range(60):
        b = _bandit_batch(64, gen)
        correct = (b.cand_ids[..., 0] == b.prompt_ids[:, 1:]).long().argmax(-1)
        act = agent.act(b.prompt_ids, b.prompt_mask, b.cand_ids, b.cand_mask, greedy=False, generator=gen)
        assert act.value is not None
        reward = (act.action == correct).float()
        done = torch.ones(1, 64, dtype=torch.bool)
        adv, ret = compute_gae(reward[None], act.value[None], done, ~done, torch.zeros(1, 64), 0.9, 0.95)
        updater.update({"prompt_ids": b.prompt_ids, "prompt_mask": b.prompt_mask, "cand_ids": b.cand_ids,
                        "cand_mask": b.cand_mask, "action": act.action, "logp": act.logp, "value": act.value,
                        "advantages": adv[0], "returns": ret[0]})
    after = accuracy()
    assert before < 0.5 and after >= 0.9, (before, after)


# ----------------------------------------------------------------------------------------------- the learner


def _text_step(n: int, terminated: list[bool], truncated: list[bool]) -> TextStep:
    return TextStep(goals=["a"] * n, observations=["x"] * n, candidates=[["take a", "go b"]] * n,
                    actions=[0] * n, logp=[0.0] * n, rewards=[1.0] * n, terminated=terminated, truncated=truncated,
                    next_observations=[["x y", "y", "x x", "y y"][i % 4] for i in range(n)],
                    next_candidates=[["take a"]] * n, achieved_goals=[[]] * n)


def test_learner_bootstraps_truncations_and_the_rollout_end_only() -> None:
    codec = small_codec()
    model = tiny_model()
    agent = PPOAgent(model, PPOConfig(value_hidden=[8]))
    cfg = PPOConfig(rollout_steps=2, minibatch_size=4, epochs=1, reward_scale=2.0, value_hidden=[8])
    learner = PPOLearner(agent, cfg, codec, 4, "cpu", torch.Generator().manual_seed(0), torch.Generator())
    n = 4
    step = _text_step(n, [True, False, True, False], [False, True, True, False])
    learner.act(step.goals, step.observations, step.candidates)
    assert learner.observe(step) == {}  # the rollout is not full yet: no update
    st = learner.storage
    v = learner.actor.values(["a"] * n, step.next_observations)
    expected = torch.tensor([0.0, float(v[1]), 0.0, 0.0])  # only the truncated, not terminated, row
    torch.testing.assert_close(st.bootstrap[0], expected)
    torch.testing.assert_close(st.reward[0], torch.full((n,), 2.0))
    prompt_ids, _ = codec.encode_prompts(step.goals, step.observations)
    assert torch.equal(st.prompt_ids[0], prompt_ids)  # the tokens the policy acted on

    flat: dict[str, torch.Tensor] = {}
    learner.updater.update = lambda data: flat.update(data) or {"x": torch.tensor(1.0)}  # type: ignore[method-assign]
    step2 = _text_step(n, [True, False, False, False], [False, False, True, False])
    learner.act(step2.goals, step2.observations, step2.candidates)
    assert learner.observe(step2) == {"x": torch.tensor(1.0)}
    v2 = learner.actor.values(["a"] * n, step2.next_observations)
    torch.testing.assert_close(st.bootstrap[1], torch.cat([torch.zeros(1), v2[1:]]))  # all but the terminated
    assert st.pos == 0 and flat["action"].shape == (8,)
    adv, _ = compute_gae(st.reward, st.value, st.terminated, st.truncated, st.bootstrap, cfg.gamma, cfg.gae_lambda)
    torch.testing.assert_close(flat["advantages"], adv.flatten())
