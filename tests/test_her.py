"""HER tests: the strategies against a plain-Python reference over random episode layouts (hypothesis), ratio 0,
the relabelled fraction, and the pure helpers of sacglam.replay.her on hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sacglam.replay.her import HERConfig, equality_reward, n_step_window, pick_achieving_rank, pick_goal_of_step
from sacglam.types import Batch
from tests.test_buffer import Sim, check_row

torch.set_num_threads(1)


def test_equality_reward() -> None:
    ach = torch.tensor([[1, 2, -1], [-1, -1, -1], [3, -1, -1]])
    r, d = equality_reward(ach, torch.tensor([2, -1, 1]))
    assert r.tolist() == [1.0, 0.0, 0.0] and d.tolist() == [True, False, False]


def test_pick_achieving_rank_hand_values() -> None:
    before, total = torch.tensor([1, 3, 0]), torch.tensor([4, 3, 2])
    u = torch.tensor([0.0, 0.5, 0.99])
    r, ok = pick_achieving_rank("future", before, total, u)
    assert r.tolist()[0] == 1 and r.tolist()[2] == 1 and ok.tolist() == [True, False, True]
    r, ok = pick_achieving_rank("final", before, total, u)
    assert r.tolist() == [3, 2, 1] and ok.tolist() == [True, True, True]
    r, ok = pick_achieving_rank("episode", before, total, u)
    assert r.tolist() == [0, 1, 1] and ok.all()
    assert pick_achieving_rank("final", before, torch.tensor([0, 0, 0]), u)[1].tolist() == [False] * 3
    with pytest.raises(ValueError, match=r"her\.strategy"):
        HERConfig(strategy="last")


def test_pick_goal_of_step() -> None:
    ach = torch.tensor([[5, 6, -1], [7, -1, -1]])
    assert pick_goal_of_step(ach, torch.tensor([0.0, 0.9])).tolist() == [5, 7]
    assert pick_goal_of_step(ach, torch.tensor([0.6, 0.0])).tolist() == [6, 7]


def test_n_step_window_termination_and_truncation_inside_window() -> None:
    r = torch.tensor([[1.0, 2.0, 4.0], [1.0, 2.0, 4.0], [1.0, 2.0, 4.0]])
    d = torch.tensor([[False, True, False], [False, False, False], [False, False, False]])
    ret, disc, k, te, tr = n_step_window(r, d, torch.tensor([5, 2, 9]), gamma=0.5)
    assert ret.tolist() == [2.0, 2.0, 3.0]  # 1 + .5*2 ; 1 + .5*2 (ends at episode end) ; 1 + .5*2 + .25*4
    assert disc.tolist() == [0.0, 0.25, 0.125]
    assert k.tolist() == [2, 2, 3] and te.tolist() == [True, False, False] and tr.tolist() == [False, True, False]


def _reference_goal_check(sim: Sim, b: Batch, i: int, strategy: str) -> bool:
    """Check the relabelled goal of row i against the reference; returns whether the row was eligible."""
    P, e = check_row(sim, b, i)  # every field, reward recomputed in plain Python for the goal used
    s = sim.log[(P, e)]
    steps = sim.episode_steps(e, s.ep)  # the sampled step's own episode only: sources never cross episodes
    achieving = [x for x in steps if x.achieved]
    if strategy == "future":
        allowed = [x for x in achieving if x.t >= s.t]
    elif strategy == "final":
        allowed = achieving[-1:]
    else:
        allowed = achieving
    if b.relabelled[i]:
        gap = int(b.goal_gap[i])
        src = [x for x in allowed if x.t == s.t + gap]
        assert src, f"relabel source t'={s.t + gap} not allowed for {strategy} (allowed {[x.t for x in allowed]})"
        assert int(b.goal[i]) in src[0].achieved
        # The source row is stored and intact: its episode is intact (checked by check_row) and it lies inside it.
        assert sim.intact(e, src[0].ep) and src[0].ep == s.ep
    return bool(allowed)


episode_plan = st.lists(
    st.tuples(st.integers(1, 5), st.sampled_from(["T", "R"]),
              st.lists(st.lists(st.integers(0, 3), max_size=2), min_size=5, max_size=5)),
    min_size=1, max_size=8,
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    n_envs=st.integers(1, 3),
    rows=st.integers(5, 8),
    n_step=st.integers(1, 3),
    strategy=st.sampled_from(["future", "final", "episode"]),
    plans=st.lists(episode_plan, min_size=3, max_size=3),
    n_adds=st.integers(4, 30),
    seed=st.integers(0, 2**16),
    rarity=st.sampled_from([(1, 0.0), (3, 0.0), (1, 1.0), (3, 0.5)]),
)
def test_her_properties_random_layouts(n_envs: int, rows: int, n_step: int, strategy: str,
                                       plans: list[list[tuple[int, str, list[list[int]]]]], n_adds: int,
                                       seed: int, rarity: tuple[int, float]) -> None:
    """ratio 1: every eligible transition is relabelled from an allowed step of its own intact episode (future:
    t' >= t, final: the last achieving step); rewards equal the plain-Python ones; wrap-around included. The same
    holds with the rarity options (rarest of m draws, rows drawn by rarity), which change only which rows and goals
    are drawn."""
    draws, frac = rarity
    sim = Sim(n_envs=n_envs, capacity=rows * n_envs, n_step=n_step,
              her=HERConfig(strategy, 1.0, rarity_draws=draws, rare_fraction=frac))
    # Expand each env's plan into per-step (achieved, end-kind) events, cycling through it.
    events: list[list[tuple[list[int], str]]] = []
    for e in range(n_envs):
        ev: list[tuple[list[int], str]] = []
        while len(ev) < n_adds:
            for length, kind, ach in plans[e]:
                ev += [(ach[j], kind if j == length - 1 else ".") for j in range(length)]
        events.append(ev)
    for P in range(n_adds):
        sim.add([P % 4] * n_envs, [events[e][P][0] for e in range(n_envs)], [0.25] * n_envs,
                [events[e][P][1] == "T" for e in range(n_envs)], [events[e][P][1] == "R" for e in range(n_envs)])
    assert sim.buf.num_sampleable == len(sim.sampleable())
    if not sim.sampleable():
        return
    b = sim.buf.sample(64, torch.Generator().manual_seed(seed))
    for i in range(len(b)):
        eligible = _reference_goal_check(sim, b, i, strategy)
        assert bool(b.relabelled[i]) == eligible  # ratio 1: exactly the eligible ones


def test_ratio_zero_returns_stored_transitions() -> None:
    sim = Sim(n_envs=2, capacity=40, n_step=2, her=HERConfig("future", 0.0))
    for P in range(17):
        sim.add([P % 4, 3], [[1, 2], [P % 4]], [float(P), -1.0], [P % 6 == 5, P % 4 == 3], [P % 7 == 6, False])
    b = sim.buf.sample(200, torch.Generator().manual_seed(3))
    assert not b.relabelled.any() and (b.goal_gap == -1).all()
    for i in range(len(b)):
        P, e = check_row(sim, b, i)  # stored goal, stored rewards and terminations (see expected(relabelled=False))
        assert int(b.goal[i]) == sim.log[(P, e)].goal


@pytest.mark.parametrize("ratio", [0.3, 0.8])
def test_relabelled_fraction_matches_ratio(ratio: float) -> None:
    sim = Sim(n_envs=1, capacity=50, n_step=1, her=HERConfig("episode", ratio))
    for P in range(40):  # every episode has an achieving step, so every transition is eligible under `episode`
        sim.add([0], [[2] if P % 4 == 1 else []], [0.0], [P % 4 == 3], [False])
    B = 4000
    b = sim.buf.sample(B, torch.Generator().manual_seed(5))
    frac = float(b.relabelled.float().mean())
    assert abs(frac - ratio) < 4 * math.sqrt(ratio * (1 - ratio) / B)
    # Relabelled to goal 2 (achieved at t = 1): reward 1 and termination exactly at that step.
    rel = b.relabelled
    assert (b.goal[rel] == 2).all()
    assert torch.equal(b.reward[rel], (b.goal_gap[rel] == 0).float())
    assert torch.equal(b.terminated[rel], b.goal_gap[rel] == 0)
