"""Online relabelling inside the SAC learner: achieved goals written into the buffer once episodes end.

Three learners receive the same Playground-Text steps (random actions, all four goal categories, a ring that wraps):
A stores the env's achieved goals at add time (``relabel.source=oracle``, the path every run took before sources
existed); B gets them from the env's rules when each episode ends; C from the oracle through the relabeller (inline
and on a background thread). The Playground rules are exact, so all buffers must be equal tensor for tensor and give
the same samples for the same seed, up to the numbering of the goal table (B and C register an achieved goal when
its episode ends rather than at the step, so ids are compared through the goal strings).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import gymnasium
import pytest
import torch
import yaml

import envs  # noqa: F401 - registers the text envs
from envs.vector import make_vector_env
from sacglam.agent import Agent, AgentConfig
from sacglam.algos.sac.learner import SACConfig, SACLearner
from sacglam.collector import Collector
from sacglam.episodes import EpisodeTracker
from sacglam.models import ModelConfig, build_tiny_model, build_tiny_tokenizer
from sacglam.pipeline import StepEncoder, tokenizer_corpus
from sacglam.prompting import PromptCodec
from sacglam.relabel import GoalSpace, OnlineRelabeller, OracleSource, RelabelStats, RuleSource
from sacglam.replay.buffer import BufferConfig, ReplayBuffer
from sacglam.replay.her import HERConfig
from sacglam.types import ActOutput

ROOT = Path(__file__).resolve().parents[1]
CATS = ["grasp", "grow_plant", "grow_herbivore", "grow_carnivore"]
N = 4


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The env, codec and tiny model the learners share, and 150 vector steps of random play (with records)."""
    probe = gymnasium.make("sacglam/PlaygroundText-v0", goal_categories=CATS).unwrapped
    template = "Goal: {goal}\nObservation: {obs}\nAction:"
    tok = build_tiny_tokenizer(tokenizer_corpus(template, probe, 30, seed=0), tmp_path_factory.mktemp("tok"))
    codec = PromptCodec.from_tokenizer(tok, template=template, max_goal_tokens=8, max_obs_tokens=64, max_cands=12,
                                       max_cand_tokens=6)
    model = build_tiny_model(ModelConfig(), len(tok), tok)
    vec = make_vector_env("sacglam/PlaygroundText-v0", N, env_kwargs={"goal_categories": CATS})
    gen = torch.Generator().manual_seed(0)

    def act(goals: Any, observations: Any, candidates: Any) -> ActOutput:
        a = [int(torch.randint(len(c), (1,), generator=gen)) for c in candidates]
        return ActOutput(action=torch.tensor(a), logp=torch.zeros(len(a)))

    collector = Collector(vec, act, seed=5)
    tracker = EpisodeTracker(N)
    steps = []
    for _ in range(150):
        step, finished = collector.step()
        steps.append((step, tracker.add(step, finished, env_steps=collector.env_steps)))
    rules = yaml.safe_load((ROOT / "conf" / "env" / "playground.yaml").read_text())["rules"]
    return {"probe": probe, "codec": codec, "model": model, "steps": steps, "rules": rules}


def learner(world: dict[str, Any], relabeller: OnlineRelabeller | None, her: HERConfig,
            rows: int = 60) -> SACLearner:
    codec = world["codec"]
    cfg = BufferConfig(capacity=N * rows, max_obs_tokens=64, max_goal_tokens=8, max_cands=12, max_cand_tokens=6,
                       n_step=2, her=her)
    buffer = ReplayBuffer(cfg, N, pad_id=codec.pad_id, device="cpu", prompt=codec)
    encoder = StepEncoder(codec, buffer, world["probe"].goal_step_limit, cfg.max_achieved, relabeller is None)
    agent = Agent(world["model"], AgentConfig(critic_hidden=[8]))
    return SACLearner(agent, SACConfig(), buffer, encoder, codec, batch_size=16, replay_ratio=1.0,
                      learning_starts=10**9, device="cpu", act_generator=torch.Generator(),
                      sample_generator=torch.Generator(), relabeller=relabeller)


def feed(lrn: SACLearner, world: dict[str, Any]) -> SACLearner:
    for step, records in world["steps"]:
        lrn.observe(step, records)
    lrn.state_dict()  # waits for a background relabeller
    return lrn


def canonical(lrn: SACLearner) -> tuple[torch.Tensor, torch.Tensor]:
    """(old id -> canonical id [n_goals + 1] with -1 kept, canonical id -> old id): canonical ids number the goal
    strings in sorted order, so two buffers that registered the same goals in another order compare equal."""
    names = sorted(lrn.encoder.goal_ids)
    to_new = torch.full((len(names) + 1,), -1, dtype=torch.long)
    for new, g in enumerate(names):
        to_new[lrn.encoder.goal_ids[g]] = new
    return to_new, torch.tensor([lrn.encoder.goal_ids[g] for g in names])


def goal_free(lrn: SACLearner) -> dict[str, torch.Tensor]:
    """The buffer's tables with every goal id put in canonical numbering (-1 stays -1), running episodes' achieved
    goals cleared (never sampled)."""
    from sacglam.replay.storage import ACHB as _ACHB
    from sacglam.replay.storage import GOAL as _GOAL
    from sacglam.replay.storage import F as _F

    b = lrn.buffer
    to_new, to_old = canonical(lrn)
    remap = lambda x: to_new[x.long()]  # noqa: E731 - index -1 reads the trailing -1
    rows, ranks = b._rows.long().clone(), b._ranks.long().clone()
    rows[..., _GOAL], rows[..., _F:] = remap(rows[..., _GOAL]), remap(rows[..., _F:])
    ranks[..., 3:] = remap(ranks[..., 3:])
    eps = b._eps.clone()
    C, S = b.capacity_per_env, b.capacity_per_env + 1
    for e in range(b.n_envs):  # running episodes: their goals are only known (to B and C) once they end
        for p in range(int(b.cur_start[e]), b.pos):
            rows[p % C, e, _ACHB], rows[p % C, e, _F:], ranks[p % C, e] = 0, -1, b._rank_reset
        eps[int(b.cur_k[e]) % S, e, 1] = 0
    out = {"rows": rows, "ranks": ranks, "eps": eps}
    for name in ("goal_tokens", "goal_len", "goal_limit", "goal_count"):
        out[name] = getattr(b, name)[to_old]
    state = b.state_dict()
    for k, v in state.items():
        skip = ("goal", "achieved", "ach_step", "step", "action", "ach_before", "goal_tokens", "goal_len",
                "goal_limit", "goal_count", "ep_ach", "cur_ach")
        if isinstance(v, torch.Tensor) and k not in skip:
            out[k] = v  # fields without goal ids (row fields, ep_ach: through rows and eps; cur_ach: running)
    return out


def assert_same_buffer(a: SACLearner, b: SACLearner) -> None:
    """Equal storage and tables up to the goal table's order, and equal samples from equal generators."""
    ta, tb = goal_free(a), goal_free(b)
    assert ta.keys() == tb.keys()
    for k in ta:
        assert torch.equal(ta[k], tb[k]), k
    (to_new_a, _), (to_new_b, _) = canonical(a), canonical(b)
    ga, gb = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    for _ in range(3):
        x, y = a.buffer.sample(32, ga), b.buffer.sample(32, gb)
        for f in x.__dataclass_fields__:
            if f == "goal":
                assert torch.equal(to_new_a[x.goal], to_new_b[y.goal])
            else:
                assert torch.equal(getattr(x, f), getattr(y, f)), f


@pytest.mark.parametrize("strategy", ["future", "final"])
def test_rule_and_oracle_relabellers_give_the_oracle_buffer(world: dict[str, Any], strategy: str) -> None:
    her = HERConfig(strategy=strategy, ratio=0.8)
    space = GoalSpace.from_env(world["probe"])
    ref = feed(learner(world, None, her), world)
    assert ref.buffer.num_sampleable > 0 and int((ref.buffer.achieved >= 0).sum()) > 20
    rule = feed(learner(world, OnlineRelabeller(RuleSource(world["rules"], space), RelabelStats(space)), her), world)
    assert_same_buffer(ref, rule)
    m = rule.relabel_metrics()
    assert m["relabel/precision"] == 1.0 and m["relabel/recall"] == 1.0 and m["relabel/stale"] == 0
    for background in (False, True):
        orc = OnlineRelabeller(OracleSource(), RelabelStats(space), background=background)
        assert_same_buffer(ref, feed(learner(world, orc, her), world))
        orc.close()


def test_a_source_that_misses_goals_leaves_them_out_of_the_buffer(world: dict[str, Any]) -> None:
    """Rules that never see water grasped: ``Grasp water`` is absent from the buffer (never relabelled to), every
    other achievement is there, precision stays 1 and recall counts exactly what was missed."""
    space = GoalSpace.from_env(world["probe"])
    grasp = {"pattern": r"^You are standing on: (?P<obj>(?!water$).+)\n.*\n> Grasp$", "goal": "Grasp {obj}"}
    no_water = [grasp, *world["rules"][1:]]  # the env's growth rules as they are
    relabeller = OnlineRelabeller(RuleSource(no_water, space), RelabelStats(space))
    lrn = feed(learner(world, relabeller, HERConfig(), rows=200), world)
    ref = feed(learner(world, None, HERConfig(), rows=200), world)

    def stored(lrn: SACLearner) -> list[str]:  # achieved goals of finished, stored episodes, as strings
        from sacglam.replay.storage import F as _F

        names = sorted(lrn.encoder.goal_ids)
        return sorted(names[int(g)] for g in goal_free(lrn)["rows"][..., _F:].flatten().tolist() if g >= 0)

    stored_ref = stored(ref)
    assert "Grasp water" in stored_ref
    assert stored(lrn) == [g for g in stored_ref if g != "Grasp water"]
    m = lrn.relabel_metrics()
    missed = sum(1 for ep in (r for _, recs in world["steps"] for r in recs) for goals in ep.achieved
                 for g in goals if g == "Grasp water")
    found = sum(len(g) for ep in (r for _, recs in world["steps"] for r in recs) for g in ep.achieved) - missed
    assert m["relabel/precision"] == 1.0
    assert m["relabel/recall"] == pytest.approx(found / (found + missed))
