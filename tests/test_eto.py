"""ETO's pieces (sacglam.algos.eto.dpo): config, pairing, the DPO loss, trajectory log-likelihoods, the pairs file.

The DPO case by hand, beta = 0.1, two pairs of trajectories with known per-step log-probs:

    pair 0: chosen   policy (-0.5, -1.0)       = -1.5   reference (-0.7, -1.2)       = -1.9
            rejected policy (-2.0, -0.3, -0.2) = -2.5   reference (-1.0, -0.5, -0.5) = -2.0
            chosen reward 0.1 * (-1.5 + 1.9) = 0.04, rejected reward 0.1 * (-2.5 + 2.0) = -0.05, margin 0.09
            loss -logsigmoid(0.09) = log(1 + exp(-0.09)) = 0.649159...
    pair 1: chosen   policy (-3.0)             = -3.0   reference (-2.0)             = -2.0
            rejected policy (-0.4, -0.6)       = -1.0   reference (-0.5, -1.0)       = -1.5
            chosen reward -0.1, rejected reward 0.05, margin -0.15
            loss log(1 + exp(0.15)) = 0.770957...
    mean loss 0.710058..., reward margin (0.09 - 0.15) / 2 = -0.03, accuracy 1/2.
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch

from sacglam.agent import Agent, AgentConfig
from sacglam.algos.eto.dpo import (
    ETOConfig,
    best_trajectories,
    dpo_loss,
    make_pairs,
    pair_logps,
    read_pairs,
    reference_logps,
    sft_loss,
    task_id,
    trajectory_logp,
    write_pairs,
)
from sacglam.algos.ppo.learner import PPOAgent, PPOConfig
from sacglam.episodes import EpisodeRecord
from sacglam.models import ModelConfig, build_tiny_model, build_tiny_tokenizer
from sacglam.prompting import PromptCodec

torch.set_num_threads(1)

EXAMPLE = Path(__file__).resolve().parent / "data" / "eto_pairs_example.jsonl"
TEMPLATE = "Goal: {goal}\nObservation: {obs}\nAction:"


def ep(eid: str, rewards: list[float], *, goal: str = "Grasp tomato", obs0: str = "You see: tomato",
       n_cands: int = 3) -> EpisodeRecord:
    """A synthetic episode with len(rewards) steps; step t takes candidate t % n_cands."""
    L = len(rewards)
    cands = [[f"Go to thing {k}" for k in range(n_cands)] for _ in range(L)]
    return EpisodeRecord(
        id=eid, env_index=2, goal=goal, goal_category="grasp",
        observations=[obs0] + [f"obs {t}" for t in range(1, L + 1)],
        candidates=cands, actions=[t % n_cands for t in range(L)], rewards=list(rewards),
        achieved=[[] for _ in range(L)], policy_version=[0] * L, terminated=True, truncated=False, success=True,
        env_step=17,
    )


# ---------------------------------------------------------------------------------------------------------- config


def test_config_defaults_schedule_and_errors_name_the_field() -> None:
    cfg = ETOConfig()
    assert (cfg.rounds, cfg.epochs, cfg.margin, cfg.sft_coef, cfg.explore, cfg.pair_with) == (
        3, 3, 5, 0.0, "greedy", "expert")
    assert [cfg.beta(r) for r in range(5)] == [0.1, 0.5, 0.5, 0.5, 0.5]
    assert [cfg.lr(r) for r in range(4)] == [1e-6, 5e-7, 5e-7, 5e-7]
    assert ETOConfig(lrs=[3e-6]).lr(2) == 3e-6
    bad: list[tuple[dict[str, Any], str]] = [
        ({"explore": "beam"}, "explore"), ({"pair_with": "worst"}, "pair_with"), ({"margin": -1}, "margin"),
        ({"betas": []}, "betas"), ({"lrs": [1e-6, 0.0]}, "lrs"), ({"batch_size": 0}, "batch_size"),
        ({"epochs": 0}, "epochs"), ({"sft_lr": 0.0}, "sft_lr"), ({"sft_coef": -0.1}, "sft_coef"),
        ({"warm_start_episodes": -1}, "warm_start_episodes"), ({"sft_epochs": 0}, "sft_epochs"),
        ({"pairs_file": ""}, "pairs_file"), ({"rounds": 1.5}, "rounds"),
    ]
    for kwargs, name in bad:
        with pytest.raises(ValueError, match=f"ETOConfig.{name}"):
            ETOConfig(**kwargs)
    ETOConfig(warm_start_episodes=0, sft_epochs=0)  # no SFT: no SFT epochs needed


# --------------------------------------------------------------------------------------------------------- pairing


def test_make_pairs_lower_tie_higher_missing() -> None:
    ref = {"a": ep("xa", [0.0, 1.0], obs0="A"), "b": ep("xb", [0.0, 1.0], obs0="B"),
           "c": ep("xc", [0.5], obs0="C")}
    reference = {task_id(e): e for e in ref.values()}
    lower = ep("e0", [0.0, 0.0, 0.0], obs0="A")
    tie = ep("e1", [1.0, 0.0, 0.0], obs0="B")
    higher = ep("e2", [1.0], obs0="C")
    orphan = ep("e3", [0.0], obs0="nowhere")
    pairs, stats = make_pairs([lower, tie, higher, orphan], reference, margin=5)
    assert [p.id for p in pairs] == ["e0", "e2"]
    assert pairs[0].chosen is ref["a"] and pairs[0].rejected is lower and pairs[0].task == task_id(lower)
    assert pairs[1].chosen is higher and pairs[1].rejected is ref["c"]  # swapped
    assert (stats.pairs, stats.ties, stats.swapped, stats.missing, stats.truncated) == (2, 1, 1, 1, 0)


def test_make_pairs_cuts_rejected_at_chosen_length_plus_margin() -> None:
    expert = ep("x", [0.0, 0.0, 1.0])
    long_fail = ep("e0", [0.0] * 10)
    pairs, stats = make_pairs([long_fail], {task_id(expert): expert}, margin=5)
    rej = pairs[0].rejected
    assert rej.length == 3 + 5 and len(rej.observations) == 9
    rej.check()
    assert rej.observations == long_fail.observations[:9] and rej.actions == long_fail.actions[:8]
    assert rej.truncated and not rej.terminated and long_fail.length == 10  # the original is untouched
    assert stats.truncated == 1
    # swapped: the explored one wins in 2 steps; the 12-step expert is cut to 2 + 1
    long_expert = ep("x2", [0.0] * 12)
    quick = ep("e1", [0.0, 1.0])
    pairs, stats = make_pairs([quick], {task_id(long_expert): long_expert}, margin=1)
    assert pairs[0].chosen is quick and pairs[0].rejected.length == 3 and stats.truncated == 1 and stats.swapped == 1
    # not longer than the limit: kept as is
    pairs, stats = make_pairs([ep("e2", [0.0] * 8)], {task_id(expert): expert}, margin=5)
    assert pairs[0].rejected.length == 8 and stats.truncated == 0


def test_best_trajectories_reward_then_shortest_then_first() -> None:
    a_long = ep("a_long", [0.0, 0.0, 1.0], obs0="A")
    a_short = ep("a_short", [1.0], obs0="A")
    a_short_too = ep("a_short_too", [1.0], obs0="A")
    a_better = ep("a_better", [0.0, 0.0, 0.0, 2.0], obs0="A")
    b_first = ep("b_first", [0.0, 0.0], obs0="B")
    b_second = ep("b_second", [0.0, 0.0], obs0="B")
    best = best_trajectories([a_long, a_short, a_short_too, b_first, b_second])
    assert best[task_id(a_long)].id == "a_short" and best[task_id(b_first)].id == "b_first"
    best = best_trajectories([a_long, a_short, a_better])
    assert best[task_id(a_long)].id == "a_better"  # higher reward beats shorter


# ------------------------------------------------------------------------------------------------------------- DPO


def test_dpo_loss_hand_computed() -> None:
    pi_c = torch.tensor([-0.5 - 1.0, -3.0], dtype=torch.float64, requires_grad=True)
    pi_r = torch.tensor([-2.0 - 0.3 - 0.2, -0.4 - 0.6], dtype=torch.float64, requires_grad=True)
    ref_c = torch.tensor([-0.7 - 1.2, -2.0], dtype=torch.float64)
    ref_r = torch.tensor([-1.0 - 0.5 - 0.5, -0.5 - 1.0], dtype=torch.float64)
    out = dpo_loss(pi_c, pi_r, ref_c, ref_r, beta=0.1)
    l0, l1 = math.log1p(math.exp(-0.09)), math.log1p(math.exp(0.15))
    assert abs(l0 - 0.649159) < 1e-6 and abs(l1 - 0.770957) < 1e-6
    torch.testing.assert_close(out.loss, torch.tensor((l0 + l1) / 2, dtype=torch.float64), rtol=0, atol=1e-12)
    assert abs(out.loss.item() - 0.710058) < 1e-6
    torch.testing.assert_close(out.chosen_reward, torch.tensor([0.04, -0.1], dtype=torch.float64), rtol=0,
                               atol=1e-12)
    torch.testing.assert_close(out.rejected_reward, torch.tensor([-0.05, 0.05], dtype=torch.float64), rtol=0,
                               atol=1e-12)
    assert abs(out.reward_margin.item() - (-0.03)) < 1e-12 and out.accuracy.item() == 0.5
    out.loss.backward()
    # d/d pi_c of -logsigmoid(beta m) / P = -beta * sigmoid(-beta m) / P; the opposite sign for pi_r.
    expect = torch.tensor([-0.1 * (1 / (1 + math.exp(0.09))) / 2, -0.1 * (1 / (1 + math.exp(-0.15))) / 2],
                          dtype=torch.float64)
    assert pi_c.grad is not None and pi_r.grad is not None
    torch.testing.assert_close(pi_c.grad, expect, rtol=0, atol=1e-12)
    torch.testing.assert_close(pi_r.grad, -expect, rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="beta"):
        dpo_loss(pi_c, pi_r, ref_c, ref_r, beta=0.0)
    with pytest.raises(ValueError, match="ref_rejected"):
        dpo_loss(pi_c, pi_r, ref_c, ref_r[:1], beta=0.1)


def test_sft_loss_is_per_step_nll() -> None:
    pi_c = torch.tensor([-1.5, -3.0])
    assert sft_loss(pi_c, torch.tensor([2, 1])).item() == pytest.approx(4.5 / 3)
    with pytest.raises(ValueError, match="no step"):
        sft_loss(pi_c, torch.tensor([0, 0]))


# ------------------------------------------------------------------------------------------------------ pairs file


def test_pairs_file_round_trip_field_by_field(tmp_path: Path) -> None:
    expert = ep("x0", [0.0, 0.0, 1.0])
    explored = ep("e0", [0.0, 0.5, 0.0, 0.0, 0.0], n_cands=4)
    explored.env_index, explored.goal_category, explored.success, explored.terminated = 1, "grasp", False, False
    explored.truncated, explored.env_step = True, 99
    pairs, _ = make_pairs([explored], {task_id(expert): expert}, margin=1)
    path = tmp_path / "pairs.jsonl"
    assert write_pairs(path, pairs) == 1
    back = read_pairs(path)
    assert len(back) == 1
    assert (back[0].id, back[0].task) == (pairs[0].id, pairs[0].task)
    for side in ("chosen", "rejected"):
        a, b = getattr(pairs[0], side), getattr(back[0], side)
        for name in ("id", "env_index", "goal", "goal_category", "observations", "candidates", "actions", "rewards",
                     "terminated", "truncated", "success", "env_step"):
            assert getattr(a, name) == getattr(b, name), (side, name)
        b.check()
    assert back[0].rejected.length == 4 and back[0].rejected.truncated  # cut at 3 + 1
    record = json.loads(path.read_text().splitlines()[0])
    assert record["prompt"] == "Grasp tomato" and [t["from"] for t in record["chosen"]] == ["human", "gpt"] * 3 + [
        "human"]
    assert record["chosen"][1] == {"from": "gpt", "value": "Go to thing 0", "candidates": expert.candidates[0],
                                   "reward": 0.0}


def _turns(actions: list[str]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = [{"from": "human", "value": "o0"}]
    for t, a in enumerate(actions):
        out += [{"from": "gpt", "value": a, "candidates": ["Grasp", "Go to desk"]},
                {"from": "human", "value": f"o{t + 1}"}]
    return out


def _good() -> dict[str, Any]:
    return {"id": "p", "prompt": "Grasp desk", "chosen": _turns(["Go to desk", "Grasp"]),
            "rejected": _turns(["Grasp"])}


def _malformed() -> list[tuple[str, str]]:
    """(line text, what the error must name) for each malformed case."""
    no_rejected = _good()
    del no_rejected["rejected"]
    no_cands = _good()
    del no_cands["chosen"][3]["candidates"]
    foreign = _good()
    foreign["rejected"][1]["value"] = "Dance"
    not_alternating = _good()
    not_alternating["rejected"][2]["from"] = "gpt"
    ends_with_gpt = _good()
    ends_with_gpt["chosen"] = ends_with_gpt["chosen"][:-1]
    no_value = _good()
    del no_value["chosen"][0]["value"]
    return [
        ('{"id": "p", "prompt": ', "bad JSON"),
        (json.dumps(no_rejected), "missing field 'rejected'"),
        (json.dumps(no_cands), "missing field chosen[3].'candidates'"),
        (json.dumps(foreign), "rejected[1].'value' (action 'Dance') is not among its candidates"),
        (json.dumps(not_alternating), "rejected[2].'from' is 'gpt'"),
        (json.dumps(ends_with_gpt), "field 'chosen' has 4 turns"),
        (json.dumps(no_value), "missing field chosen[0].'value'"),
        ("[1, 2]", "must be a JSON object"),
        (json.dumps({**_good(), "chosen_meta": {"env_step": "late"}}), "'chosen_meta'"),
    ]


@pytest.mark.parametrize("case", range(9))
def test_read_pairs_names_file_line_and_field(tmp_path: Path, case: int) -> None:
    bad, what = _malformed()[case]
    path = tmp_path / "pairs.jsonl"
    path.write_text(json.dumps(_good()) + "\n\n" + json.dumps(_good()) + "\n" + bad + "\n")
    with pytest.raises(ValueError) as err:
        read_pairs(path)
    assert str(err.value).startswith(f"{path}:4: ") and what in str(err.value), str(err.value)
    path.write_text(json.dumps(_good()) + "\n")
    assert read_pairs(path)[0].chosen.actions == [1, 0]  # the good line alone parses


def test_shipped_example_parses() -> None:
    pairs = read_pairs(EXAMPLE)
    assert [p.id for p in pairs] == ["e0k0", "e1k0"]
    for p in pairs:
        assert sum(p.chosen.rewards) > sum(p.rejected.rewards) and p.chosen.goal == p.rejected.goal
        assert p.rejected.length <= p.chosen.length + ETOConfig().margin
        p.chosen.check()
        p.rejected.check()
    assert pairs[0].chosen.action_text(1) == "Grasp" and pairs[0].task == task_id(pairs[0].chosen)


# ----------------------------------------------------------------------------------- the policy's log-likelihoods


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A tiny word-level model, its codec and the example pairs (full fine-tuning, no dropout)."""
    pairs = read_pairs(EXAMPLE)
    corpus = [TEMPLATE]
    for p in pairs:
        for e in (p.chosen, p.rejected):
            corpus += [e.goal, *e.observations, *(c for cs in e.candidates for c in cs)]
    tok = build_tiny_tokenizer(corpus, tmp_path_factory.mktemp("tok"))
    codec = PromptCodec.from_tokenizer(tok, template=TEMPLATE, max_goal_tokens=8, max_obs_tokens=48, max_cands=8,
                                       max_cand_tokens=6)
    cfg = ModelConfig()
    cfg.hidden, cfg.layers = 32, 1
    model = build_tiny_model(cfg, len(tok), tok)
    torch.manual_seed(0)
    agent = Agent(model, AgentConfig(critic_hidden=[8], temperature=0.7)).eval()
    return {"agent": agent, "codec": codec, "pairs": pairs}


def test_trajectory_logp_equals_per_state_sum_and_has_gradients(tiny: dict[str, Any]) -> None:
    agent, codec, pairs = tiny["agent"], tiny["codec"], tiny["pairs"]
    episodes = [pairs[0].chosen, pairs[0].rejected, pairs[1].chosen, pairs[1].rejected]
    logp = trajectory_logp(agent, codec, episodes, "cpu", max_steps_per_batch=3)  # chunks cut across episodes
    expected = []
    for e in episodes:
        total = 0.0
        for t in range(e.length):
            args = [*codec.encode_prompts([e.goal], [e.observations[t]], [e.candidates[t]]),
                    *codec.candidate_tensors([e.candidates[t]])]
            with torch.no_grad():
                log_pi = agent(*args).log_pi[0]
            greedy = agent.act(*args, greedy=True)  # act samples from the same policy
            assert greedy.logp.item() == pytest.approx(log_pi[: len(e.candidates[t])].max().item(), abs=1e-5)
            total += log_pi[e.actions[t]].item()
        expected.append(total)
    assert logp.shape == (4,) and all(x < 0 for x in expected)
    torch.testing.assert_close(logp.detach(), torch.tensor(expected), rtol=0, atol=1e-4)
    one_chunk = trajectory_logp(agent, codec, episodes, "cpu", max_steps_per_batch=64)
    torch.testing.assert_close(one_chunk.detach(), logp.detach(), rtol=0, atol=1e-5)
    agent.zero_grad(set_to_none=True)
    logp.sum().backward()
    params = agent.actor_parameters()
    assert params and all(p.grad is not None for p in params)
    assert sum(float(p.grad.abs().sum()) for p in params if p.grad is not None) > 0
    assert all(p.grad is None for p in agent.heads.parameters())  # no critic pass
    agent.zero_grad(set_to_none=True)
    assert trajectory_logp(agent, codec, [], "cpu").shape == (0,)
    ppo = PPOAgent(agent.model, PPOConfig(value_hidden=[8]), temperature=0.7).eval()  # the PPO baseline's policy
    with torch.no_grad():
        torch.testing.assert_close(trajectory_logp(ppo, codec, episodes, "cpu"), logp.detach(), rtol=0, atol=1e-5)
    with pytest.raises(TypeError, match="Agent or PPOAgent"):
        trajectory_logp(agent.heads, codec, episodes, "cpu")


def test_dpo_steps_raise_margin_and_leave_the_reference_alone(tiny: dict[str, Any]) -> None:
    codec, pairs = tiny["codec"], tiny["pairs"]
    policy = copy.deepcopy(tiny["agent"])
    reference = copy.deepcopy(policy).requires_grad_(False)
    frozen = {k: v.clone() for k, v in reference.state_dict().items()}
    ref_c, ref_r = reference_logps(reference, codec, pairs, "cpu")
    start_c, start_r = reference_logps(policy, codec, pairs, "cpu")  # same weights: the round's start
    torch.testing.assert_close(ref_c, start_c)
    assert not (ref_c.requires_grad or start_c.requires_grad or start_r.requires_grad)  # no graph kept
    torch.testing.assert_close(ref_r, start_r)
    opt = torch.optim.Adam(policy.actor_parameters(), lr=1e-3)
    first = None
    for _ in range(20):
        pi_c, pi_r = pair_logps(policy, codec, pairs, "cpu")
        out = dpo_loss(pi_c, pi_r, ref_c, ref_r, beta=0.1)
        first = out if first is None else first
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    assert first is not None and first.reward_margin.item() == pytest.approx(0.0, abs=1e-6)
    pi_c, pi_r = reference_logps(policy, codec, pairs, "cpu")
    final = dpo_loss(pi_c, pi_r, ref_c, ref_r, beta=0.1)
    assert final.accuracy.item() == 1.0 and final.reward_margin.item() > 0.05
    assert final.loss.item() < first.loss.item()
    for k, v in reference.state_dict().items():
        assert torch.equal(v, frozen[k]), k
    assert all(p.grad is None for p in reference.parameters())
