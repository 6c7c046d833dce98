"""Rarity options of HER (her.rarity_draws, her.rare_fraction): exact marks, exact picks from crafted draws, the
rarity-weighted row distribution, exclusion of running/overwritten episodes, and the state_dict round trip.

Uses the reference simulator of tests/test_buffer.py (goal g has tokens [GOAL + g] * (1 + g % 2)); here goals 0-3
have step limits 2, 3, 10, 10.
"""

from __future__ import annotations

import io
import math

import pytest
import torch

from sacglam.replay.her import HERConfig
from sacglam.types import Batch
from tests.test_buffer import Sim, check_row, decode

torch.set_num_threads(1)


def rare_sim(draws: int = 3, frac: float = 0.0, capacity: int = 20, n_envs: int = 1) -> Sim:
    return Sim(n_envs=n_envs, capacity=capacity, n_step=1, limits=(2, 3, 10, 10),
               her=HERConfig("future", 1.0, rarity_draws=draws, rare_fraction=frac))


def add_episode(sim: Sim, achieved: list[list[int]], end: str = "T", goal: int = 3) -> None:
    """N = 1: one episode, ``achieved[t]`` at step t, ended by ``end`` ('T', 'R' or '.' = still running)."""
    for t, ach in enumerate(achieved):
        last = t == len(achieved) - 1
        sim.add([goal], [ach], [0.0], [last and end == "T"], [last and end == "R"])


def test_config_errors() -> None:
    with pytest.raises(ValueError, match="rarity_draws"):
        HERConfig(rarity_draws=0)
    with pytest.raises(ValueError, match="rare_fraction"):
        HERConfig(rare_fraction=1.5)
    assert not HERConfig().counts_goals and HERConfig(rarity_draws=2).counts_goals
    assert HERConfig(rare_fraction=0.1).counts_goals


def test_counts_and_marks_hand_computed() -> None:
    """Steps 0-4 achieve -, g0, -, g0, g1 (limits g0: 2, g1: 3). Counts g0 = 2, g1 = 1. Marks: step 1's g0 marks
    steps 0-1; step 3's g0 marks 2-3; step 4's g1 (rarer) marks 2-4 over g0. So rare_goal = 0 0 1 1 1."""
    sim = rare_sim()
    add_episode(sim, [[], [0], [], [0], [1]])
    assert sim.buf.goal_count[:4].tolist() == [2, 1, 0, 0]
    assert sim.buf.rare_goal[:5, 0].tolist() == [0, 0, 1, 1, 1]
    assert sim.buf.rare_goal[5:, 0].eq(-1).all()
    # A new episode starts fresh: its g1 at step 0 marks only that row (no step before it in this episode).
    add_episode(sim, [[1], []], end="R")
    assert sim.buf.rare_goal[:7, 0].tolist() == [0, 0, 1, 1, 1, 1, -1]
    assert sim.buf.goal_count[:2].tolist() == [2, 2]


def test_rarest_of_m_draws_exact() -> None:
    """The transition at t = 0 has future achieving steps t' = 1 (g0), 3 (g0), 4 (g1); rank r = floor(u * 3)."""
    sim = rare_sim(draws=3)
    add_episode(sim, [[], [0], [], [0], [1]])
    buf = sim.buf
    buf._refresh_window()
    # Columns: row pick (0 -> t = 0), coin (0 < ratio), rank draw 1, goal in step, rank draws 2 and 3.
    draws = torch.tensor([[0.0, 0.0, 0.0, 0.0, 0.5, 0.9],  # ranks 0, 1, 2 -> g0, g0, g1: g1 (count 1) wins
                          [0.0, 0.0, 0.4, 0.0, 0.0, 0.5]], dtype=torch.float64)  # ranks 1, 0, 1 -> all g0: first
    out = Batch(**buf._sample_from_draws(draws))
    assert out.relabelled.tolist() == [True, True]
    assert out.goal.tolist() == [1, 0]
    assert out.goal_gap.tolist() == [4, 3]  # t' - t of the picked source (rank 2 -> t' = 4; rank 1 -> t' = 3)
    for i in range(2):
        check_row(sim, out, i)  # reward, termination and prompt recomputed for the picked goal


def test_rarity_draws_raise_the_rare_goal_share() -> None:
    """From t = 0 under `future`, one draw picks g1 with probability 1/3, three draws 1 - (2/3)^3 = 0.70."""
    shares = []
    for m in (1, 3):
        sim = rare_sim(draws=m)
        add_episode(sim, [[], [0], [], [0], [1]])
        b = sim.buf.sample(6000, torch.Generator().manual_seed(0))
        at0 = torch.tensor([decode(sim, b, i)[0] == 0 for i in range(len(b))])
        shares.append(float((b.goal[at0] == 1).float().mean()))
        n = int(at0.sum())
        p = 1 / 3 if m == 1 else 1 - (2 / 3) ** 3
        assert abs(shares[-1] - p) < 4 * math.sqrt(p * (1 - p) / n), (m, shares[-1], p)


def test_rare_fraction_draws_rows_by_inverse_count() -> None:
    """Episode A (steps 0-3) achieves g0 at t = 1 and t = 3 (limit 2): rows 0-3 marked g0. Episode B (4-6) achieves
    g1 at t = 2 (limit 3): rows 4-6 marked g1. Episode C (7-8) achieves g0 twice more. Episode D (9-10) is running
    and achieves g1 twice: its rows are marked but never drawn, its achievements count. Counts: g0 = 4, g1 = 3.
    Weights (current counts): 1/4 for A's and C's rows, 1/3 for B's: rows 4-6 are drawn with probability
    (3 * 1/3) / (3 * 1/3 + 6 * 1/4) = 0.4."""
    sim = rare_sim(draws=1, frac=1.0)
    add_episode(sim, [[], [0], [], [0]])
    add_episode(sim, [[], [], [1]], end="R")
    add_episode(sim, [[0], [0]])
    add_episode(sim, [[1], [1]], end=".")
    buf = sim.buf
    assert buf.goal_count[:2].tolist() == [4, 3]  # D's achievements are counted too
    sim.buf._refresh_window()
    w = buf._rare_w.view(-1).tolist()
    # D's achievements raised g1's count to 3: weights are read at sampling time from the current counts.
    assert w[:9] == pytest.approx([1 / 4 + 1e-30] * 4 + [1 / 3 + 1e-30] * 3 + [1 / 4 + 1e-30] * 2)
    assert w[9:] == [0.0] * (len(w) - 9)  # running episode and empty rows
    B = 6000
    b = buf.sample(B, torch.Generator().manual_seed(1))
    steps = [check_row(sim, b, i)[0] for i in range(B)]
    share_b = sum(4 <= P <= 6 for P in steps) / B
    p = (3 / 3) / (3 / 3 + 6 / 4)  # 3 rows at 1/3 against 6 rows at 1/4
    assert abs(share_b - p) < 4 * math.sqrt(p * (1 - p) / B)
    assert max(steps) <= 8


def test_rare_rows_replace_the_end_of_the_batch_only() -> None:
    sim = rare_sim(draws=1, frac=0.25)
    add_episode(sim, [[], [], [], [], [], [], [], [], [], [1]])  # only rows 7-9 lead to g1 (limit 3)
    b = sim.buf.sample(400, torch.Generator().manual_seed(2))
    steps = [check_row(sim, b, i)[0] for i in range(400)]
    assert all(7 <= P <= 9 for P in steps[300:])  # the rarity-drawn quarter
    assert sum(P < 7 for P in steps[:300]) > 150  # the uniform rest: 70% of rows are unmarked


def test_unmarked_buffer_falls_back_to_uniform_and_overwritten_rows_are_excluded() -> None:
    sim = rare_sim(draws=2, frac=1.0, capacity=6)
    for _ in range(3):  # episodes of 3 steps with nothing achieved, wrapping twice around 6 rows
        add_episode(sim, [[], [], []], end="R")
    add_episode(sim, [[], []], end=".")  # running: rows 3-4 (P = 9, 10), overwriting the episode P = 3-5
    b = sim.buf.sample(300, torch.Generator().manual_seed(3))
    got = {check_row(sim, b, i)[0] for i in range(300)}
    assert got == {6, 7, 8}  # the only complete intact episode; uniform over it despite no marks


def test_state_dict_round_trip_with_rarity_and_old_states() -> None:
    def build() -> Sim:
        sim = Sim(n_envs=2, capacity=16, n_step=3, her=HERConfig("future", 0.8, rarity_draws=3, rare_fraction=0.5))
        return sim

    sim = build()
    for P in range(13):
        sim.add([P % 4, (P + 1) % 4], [[P % 3], [1] if P % 4 == 0 else []], [1.0, 0.0], [P % 5 == 4, False],
                [False, P % 3 == 2])
    f = io.BytesIO()
    torch.save(sim.buf.state_dict(), f)
    f.seek(0)
    state = torch.load(f, weights_only=False)
    before = sim.buf.sample(64, torch.Generator().manual_seed(7))
    other = build().buf
    other.load_state_dict(state)
    after = other.sample(64, torch.Generator().manual_seed(7))
    for name in Batch.__dataclass_fields__:
        assert torch.equal(getattr(before, name), getattr(after, name)), name
    assert torch.equal(other.goal_count, sim.buf.goal_count) and torch.equal(other.rare_goal, sim.buf.rare_goal)
    # A state saved before the rarity fields existed still loads (counts start from zero).
    old = {k: v for k, v in state.items() if k not in ("rare_goal", "goal_count")}
    third = build().buf
    third.load_state_dict(old)
    assert third.goal_count.eq(0).all() and third.num_sampleable == sim.buf.num_sampleable
