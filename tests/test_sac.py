"""SACUpdater on a tiny model: what one update changes, warm-up, accumulation, NaN safety, exact resume."""

from __future__ import annotations

import copy
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sacglam.agent import Agent
from sacglam.algos.sac.learner import NonFiniteLossError, SACConfig, SACUpdater
from sacglam.types import Batch
from tests.test_agent import make_batch, tiny_agent

torch.set_num_threads(1)


def _snapshot(agent: Agent) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in agent.named_parameters()}


def _cfg(**kw: object) -> SACConfig:
    base: dict[str, object] = {"critic_warmup_updates": 0, "alpha_init": 0.05, "alpha_min": 0.0, "lr_alpha": 1e-2}
    base.update(kw)
    return SACConfig(**base)  # type: ignore[arg-type]


@pytest.mark.parametrize("lora", [True, False])
def test_one_update_changes_every_trainable_param_and_no_frozen_one(lora: bool) -> None:
    agent = tiny_agent(lora=lora)
    updater = SACUpdater(agent, _cfg())
    trainable = {n for n, p in agent.named_parameters() if p.requires_grad}
    before = _snapshot(agent)
    log_alpha = updater.log_alpha.item()
    stats = updater.update(make_batch())
    after = _snapshot(agent)
    for n in trainable:
        assert not torch.equal(before[n], after[n]), f"trainable {n} did not change"
    for n in before.keys() - trainable:
        is_target = ".target." in n or n.startswith(("target_heads.", "target_model."))
        assert torch.equal(before[n], after[n]) != is_target, f"{n}: target moved / frozen weight untouched"
    assert updater.log_alpha.item() != log_alpha
    assert updater.step == 1
    for key in ("losses/critic", "losses/actor", "losses/alpha", "losses/hindsight_bc", "charts/alpha"):
        assert stats[key].dim() == 0 and torch.isfinite(stats[key]), key
    # Relabelled rows 1, 3, 5, 7 have gaps 1, 3, 1, 3: the step limit 3 keeps rows 1 and 5.
    assert stats["charts/hindsight_fraction"].item() == pytest.approx(2 / 8)


def test_target_after_update_is_polyak_of_new_online() -> None:
    agent = tiny_agent(lora=True)
    tau = 0.3
    updater = SACUpdater(agent, _cfg(tau=tau))
    old_targets = [t.detach().clone() for _, t in agent._polyak_pairs]
    updater.update(make_batch())
    for (online, target), old in zip(agent._polyak_pairs, old_targets, strict=True):
        torch.testing.assert_close(target, (1 - tau) * old + tau * online.detach(), rtol=0, atol=1e-6)


def test_grad_accumulation_2x4_equals_batch_8() -> None:
    agent_a = tiny_agent(lora=True).double()
    agent_b = copy.deepcopy(agent_a)
    batch = make_batch(size=8)
    one = SACUpdater(agent_a, _cfg(grad_accum=1))
    two = SACUpdater(agent_b, _cfg(grad_accum=2))
    stats_one = one.update(batch)
    stats_two = two.update(batch)
    for (n, p), q in zip(agent_a.named_parameters(), agent_b.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-6, msg=n)
    torch.testing.assert_close(one.log_alpha, two.log_alpha)
    torch.testing.assert_close(stats_one["losses/critic"], stats_two["losses/critic"], rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match="divisible"):
        two.update(make_batch(size=7))


@pytest.mark.parametrize("term", ["reward", "discount"])
def test_nan_raises_before_any_step_and_leaves_weights_untouched(term: str) -> None:
    agent = tiny_agent(lora=True)
    updater = SACUpdater(agent, _cfg())
    updater.update(make_batch(seed=1))  # Adam state exists, so an accidental step would move the weights
    before = _snapshot(agent)
    log_alpha = updater.log_alpha.detach().clone()
    bad = make_batch(seed=2)
    getattr(bad, term)[3] = float("nan")
    with pytest.raises(NonFiniteLossError, match=r"losses/critic at SAC update 1 \(micro-batch 0\)") as err:
        updater.update(bad)
    assert "reward min" in str(err.value)
    after = _snapshot(agent)
    for n, p in before.items():
        assert torch.equal(p, after[n]), n
    assert torch.equal(log_alpha, updater.log_alpha.detach()) and updater.step == 1
    updater.update(make_batch(seed=3))  # recovers on a clean batch
    assert updater.step == 2


@pytest.mark.parametrize("separate", [True, False])
def test_critic_warmup_trains_only_critic_only_params(separate: bool) -> None:
    agent = tiny_agent(lora=True, separate_adapter=separate)
    updater = SACUpdater(agent, _cfg(critic_warmup_updates=1))
    before = _snapshot(agent)
    log_alpha = updater.log_alpha.item()
    stats = updater.update(make_batch())
    after = _snapshot(agent)
    critic_only = {id(p) for p in agent.critic_parameters()}
    names = {id(p): n for n, p in agent.named_parameters()}
    for p in agent.actor_parameters():
        assert torch.equal(before[names[id(p)]], after[names[id(p)]]), f"actor param {names[id(p)]} moved in warm-up"
    for i in critic_only:
        assert not torch.equal(before[names[i]], after[names[i]]), f"critic param {names[i]} did not move"
    assert len(critic_only) == (8 + 8 if separate else 8)
    assert updater.log_alpha.item() == log_alpha
    assert stats["charts/warmup"].item() == 1.0 and torch.isfinite(stats["losses/actor"])
    updater.update(make_batch(seed=1))  # the second update trains the actor
    moved = _snapshot(agent)
    assert all(not torch.equal(after[names[id(p)]], moved[names[id(p)]]) for p in agent.actor_parameters())
    assert updater.log_alpha.item() != log_alpha


def test_fixed_alpha_and_alpha_floor() -> None:
    agent = tiny_agent(lora=True)
    fixed = SACUpdater(agent, _cfg(alpha_mode="fixed", alpha_init=0.2))
    fixed.update(make_batch())
    assert fixed.log_alpha.item() == pytest.approx(math.log(0.2)) and fixed.alpha_opt is None
    # Entropy far above a zero target drives alpha down; the floor holds it.
    floored = SACUpdater(tiny_agent(lora=True), _cfg(alpha_init=0.01, alpha_min=0.01, target_entropy_ratio=0.0))
    floored.update(make_batch())
    assert floored.alpha.item() == pytest.approx(0.01)
    with pytest.raises(ValueError, match="alpha_mode"):
        SACUpdater(agent, _cfg(alpha_mode="learned"))


def _params(agent: Agent) -> list[torch.Tensor]:
    return [p.detach().clone() for p in agent.parameters()]


def test_state_dict_resume_is_exact() -> None:
    batches: list[Batch] = [make_batch(seed=s) for s in range(3)]
    agent = tiny_agent(lora=True)
    updater = SACUpdater(agent, _cfg(critic_warmup_updates=1))
    updater.update(batches[0])
    updater.update(batches[1])
    agent_state = copy.deepcopy(agent.state_dict())
    sac_state = copy.deepcopy(updater.state_dict())
    updater.update(batches[2])
    expected = _params(agent)

    resumed_agent = tiny_agent(lora=True, seed=7)  # different init: everything must come from the state dicts
    resumed_agent.load_state_dict(agent_state)
    resumed = SACUpdater(resumed_agent, _cfg(critic_warmup_updates=1))
    resumed.load_state_dict(sac_state)
    assert resumed.step == 2
    resumed.update(batches[2])
    for p, q in zip(_params(resumed_agent), expected, strict=True):
        assert torch.equal(p, q)
    assert torch.equal(resumed.log_alpha, updater.log_alpha)


_DP_WORKER = """
import sys, torch
sys.path.insert(0, {root!r})
from accelerate import Accelerator
from sacglam.algos.sac.learner import SACConfig, SACUpdater
from tests.test_agent import make_batch, tiny_agent
torch.set_num_threads(1)
acc = Accelerator(cpu=True)
agent = tiny_agent(lora=True).double()
updater = SACUpdater(agent, SACConfig(critic_warmup_updates=0), acc)
r = acc.process_index
updater.update(make_batch(size=8).slice(4 * r, 4 * r + 4))
if r == 0:
    torch.save({{"params": [p.detach() for p in agent.parameters()], "n": acc.num_processes}}, sys.argv[1])
acc.wait_for_everyone()
acc.end_training()  # destroys the process group: a rank exiting with it alive can abort ("terminate called ...")
"""


@pytest.mark.slow
@pytest.mark.ci
def test_data_parallel_2_processes_x_4_equals_batch_8(tmp_path: Path) -> None:
    root = str(Path(__file__).resolve().parents[1])
    worker = tmp_path / "worker.py"
    worker.write_text(_DP_WORKER.format(root=root))
    out = tmp_path / "out.pt"
    with socket.socket() as sock:  # a free port: a fixed one fails when anything else holds it
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(port)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    run = subprocess.run([*cmd, str(worker), str(out)], env=env, timeout=300, capture_output=True, text=True)
    assert run.returncode == 0, f"torch.distributed.run failed ({run.returncode}):\n{run.stderr[-4000:]}"
    result = torch.load(out)
    assert result["n"] == 2
    agent = tiny_agent(lora=True).double()
    SACUpdater(agent, SACConfig(critic_warmup_updates=0)).update(make_batch(size=8))  # same config as the worker
    for p, q in zip(agent.parameters(), result["params"], strict=True):
        torch.testing.assert_close(p.detach(), q, rtol=0, atol=1e-9)


def _bandit_batch(size: int, gen: torch.Generator) -> Batch:
    """One-step bandit: the prompt names a token, candidates are 4 distinct tokens, reward 1 for the matching one."""
    k = 4
    cands = torch.stack([torch.randperm(8, generator=gen)[:k] + 10 for _ in range(size)])  # [B, K] token ids
    correct = torch.randint(0, k, (size,), generator=gen)
    prompt = torch.stack([torch.full((size,), 3), cands.gather(1, correct[:, None]).squeeze(1)], dim=1)  # [B, 2]
    action = torch.randint(0, k, (size,), generator=gen)
    ones = torch.ones(size, dtype=torch.bool)
    return Batch(
        prompt_ids=prompt,
        prompt_mask=torch.ones(size, 2, dtype=torch.bool),
        cand_ids=cands[..., None],
        cand_mask=torch.ones(size, k, 1, dtype=torch.bool),
        action=action,
        reward=(action == correct).float(),
        discount=torch.zeros(size),  # every step terminates
        next_prompt_ids=prompt,
        next_prompt_mask=torch.ones(size, 2, dtype=torch.bool),
        next_cand_ids=cands[..., None],
        next_cand_mask=torch.ones(size, k, 1, dtype=torch.bool),
        terminated=ones,
        truncated=~ones,
        n_steps=torch.ones(size, dtype=torch.long),
        goal=torch.zeros(size, dtype=torch.long),
        relabelled=~ones,
        goal_gap=torch.full((size,), -1),
        goal_limit=torch.zeros(size, dtype=torch.long),
        logp=torch.zeros(size),
        policy_version=torch.zeros(size, dtype=torch.long),
    )


def test_sac_learns_a_contextual_bandit() -> None:
    # End-to-end sign check of critic, actor and temperature: off-policy uniform data, the greedy policy must learn.
    agent = tiny_agent(lora=False, seed=3)
    updater = SACUpdater(agent, SACConfig(critic_warmup_updates=5, hindsight_bc_coef=0.0))
    gen = torch.Generator().manual_seed(0)
    test = _bandit_batch(64, torch.Generator().manual_seed(99))
    correct_idx = (test.cand_ids[..., 0] == test.prompt_ids[:, 1:]).long().argmax(-1)

    def accuracy() -> float:
        act = agent.act(test.prompt_ids, test.prompt_mask, test.cand_ids, test.cand_mask, greedy=True)
        return (act.action == correct_idx).float().mean().item()

    before = accuracy()
    for _ in range(150):
        updater.update(_bandit_batch(32, gen))
    after = accuracy()
    assert before < 0.5 and after >= 0.9, (before, after)


def test_td_target_bootstraps_from_next_candidates_with_target_network() -> None:
    agent = tiny_agent(lora=True)
    updater = SACUpdater(agent, _cfg())
    with torch.no_grad():  # make the online network differ from the target, so using the wrong one shows
        for online, _ in agent._polyak_pairs:
            online.add_(0.1 * torch.randn_like(online))
    b = make_batch()
    nxt = agent(b.next_prompt_ids, b.next_prompt_mask, b.next_cand_ids, b.next_cand_mask, target=True)
    alpha = updater.alpha
    # By hand: V = sum_a pi (min_i Q_i - alpha log pi) over the NEXT state's candidates; y = r + discount * V.
    v = (nxt.pi * (torch.minimum(nxt.q[0], nxt.q[1]) - alpha * nxt.log_pi)).sum(-1)
    assert v[0].item() == 0.0  # the terminal next state has no candidate: V = 0, not NaN
    expected = (b.reward + b.discount * v).mean()
    stats = updater.update(b)
    torch.testing.assert_close(stats["charts/y_mean"], expected, rtol=0, atol=1e-6)
    wrong = agent(b.next_prompt_ids, b.next_prompt_mask, b.cand_ids, b.cand_mask, target=True)  # A(s), not A(s')
    assert not torch.allclose(wrong.q, nxt.q)
