"""Replay buffer tests: exact hand-computed n-step cases, wrap-around, state_dict, errors, a plain-Python reference.

Token conventions used here (so every sampled field can be decoded back to the stored step):
    observation of (absolute step P, env e): one token ``1 + P * N + e``; next observation: ``NEXT + P * N + e``.
    goal g: tokens ``[GOAL + g] * (1 + g % 2)``; prompt pieces: prefix [PRE], mid [MID], post [POST]; pad 0.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass, field

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sacglam.prompting import PromptPieces
from sacglam.replay.buffer import BufferConfig, ReplayBuffer
from sacglam.replay.her import HERConfig
from sacglam.types import Batch, TransitionBatch

torch.set_num_threads(1)

PRE, MID, POST, GOAL, NEXT = 90001, 90002, 90003, 80000, 100000
PIECES = PromptPieces(torch.tensor([PRE]), torch.tensor([MID]), torch.tensor([POST]), pad_id=0)
K, LC = 2, 2


def goal_tokens(g: int) -> list[int]:
    return [GOAL + g] * (1 + g % 2)


@dataclass
class Step:
    """What the reference remembers of one stored (P, e) step."""

    P: int
    e: int
    ep: int  # per-env episode index
    t: int  # step in episode
    goal: int
    achieved: list[int]
    reward: float
    terminated: bool
    truncated: bool


@dataclass
class Sim:
    """A buffer plus a plain-Python log of everything added to it (the reference for every check)."""

    n_envs: int
    capacity: int
    n_step: int = 1
    gamma: float = 0.5
    her: HERConfig = field(default_factory=lambda: HERConfig(ratio=0.0))
    n_goals: int = 4
    G: int = 2
    limits: tuple[int, ...] = (10, 11, 12, 13)  # step limit of goal g

    def __post_init__(self) -> None:
        cfg = BufferConfig(capacity=self.capacity, n_step=self.n_step, gamma=self.gamma, device="cpu",
                           max_obs_tokens=1, max_goal_tokens=2, max_cands=K, max_cand_tokens=LC, max_goals=8,
                           max_achieved=self.G, her=self.her)
        self.buf = ReplayBuffer(cfg, self.n_envs, pad_id=0, prompt=PIECES)
        for g in range(self.n_goals):
            assert self.buf.register_goal(goal_tokens(g), limit=self.limits[g]) == g
        self.C = self.capacity // self.n_envs
        self.log: dict[tuple[int, int], Step] = {}
        self.ep = [0] * self.n_envs
        self.t = [0] * self.n_envs
        self.ep_start: dict[tuple[int, int], int] = {(e, 0): 0 for e in range(self.n_envs)}
        self.ep_len: dict[tuple[int, int], int] = {}  # completed episodes only
        self.pos = 0

    def add(self, goals: list[int], achieved: list[list[int]], rewards: list[float], term: list[bool],
            trunc: list[bool]) -> TransitionBatch:
        N, P = self.n_envs, self.pos
        ach = torch.full((N, self.G), -1, dtype=torch.long)
        for e in range(N):
            for i, g in enumerate(achieved[e]):
                ach[e, self.G - 1 - i] = g  # right-aligned on purpose: the buffer must left-align
        idx = torch.tensor([1 + P * N + e for e in range(N)])
        cands = torch.stack([torch.tensor([[i + 1, 7], [i + 2, 0]]) for i in idx.tolist()])
        tb = TransitionBatch(
            obs=idx.view(N, 1), obs_len=torch.ones(N, dtype=torch.long),
            next_obs=(idx - 1 + NEXT).view(N, 1), next_obs_len=torch.ones(N, dtype=torch.long),
            cands=cands, cand_len=torch.tensor([[2, 1]] * N),
            next_cands=cands + 5, next_cand_len=torch.tensor([[1, 2]] * N),
            goal=torch.tensor(goals), action=torch.tensor([P % K] * N),
            reward=torch.tensor(rewards), terminated=torch.tensor(term), truncated=torch.tensor(trunc),
            achieved=ach, logp=-(idx.float()) / 10, policy_version=idx * 3,
        )
        self.buf.add(tb)
        for e in range(N):
            self.log[(P, e)] = Step(P, e, self.ep[e], self.t[e], goals[e], list(achieved[e]), rewards[e], term[e],
                                    trunc[e])
            self.t[e] += 1
            if term[e] or trunc[e]:
                self.ep_len[(e, self.ep[e])] = self.t[e]
                self.ep[e] += 1
                self.t[e] = 0
                self.ep_start[(e, self.ep[e])] = P + 1
        self.pos += 1
        return tb

    # --- reference queries
    def intact(self, e: int, ep: int) -> bool:
        return (e, ep) in self.ep_len and self.ep_start[(e, ep)] >= self.pos - self.C

    def sampleable(self) -> set[tuple[int, int]]:
        return {(P, e) for (P, e), s in self.log.items() if self.intact(e, s.ep)}

    def episode_steps(self, e: int, ep: int) -> list[Step]:
        s0 = self.ep_start[(e, ep)]
        return [self.log[(s0 + i, e)] for i in range(self.ep_len[(e, ep)])]


def decode(sim: Sim, b: Batch, i: int) -> tuple[int, int]:
    """(P, e) of sampled row i, from its observation token."""
    goal_w = int(b.prompt_mask[i].sum()) - 4  # pre, mid, obs, post are one token each
    tok = int(b.prompt_ids[i, 2 + goal_w])
    return divmod(tok - 1, sim.n_envs)


def expected(sim: Sim, P: int,  # noqa: N803 - P is the absolute step, as in the module docstring
             e: int, goal: int, relabelled: bool) -> dict[str, float | int | bool]:
    """Plain-Python n-step return for the transition (P, e) under ``goal``."""
    s = sim.log[(P, e)]
    steps = sim.episode_steps(e, s.ep)
    L = len(steps)
    ret, k, term_end = 0.0, 0, False
    for j in range(sim.n_step):
        st = steps[s.t + j]
        if relabelled:
            r, d = (1.0, True) if goal in st.achieved else (0.0, False)
        else:
            r, d = st.reward, st.terminated
        ret += sim.gamma**j * r
        k = j + 1
        if d:
            term_end = True
            break
        if s.t + j == L - 1:
            break
    return {"reward": ret, "n_steps": k, "terminated": term_end, "truncated": (not term_end) and s.t + k == L,
            "discount": 0.0 if term_end else sim.gamma**k, "boot": NEXT + (P + k - 1) * sim.n_envs + e}


def check_row(sim: Sim, b: Batch, i: int) -> tuple[int, int]:
    """Check every field of sampled row i against the reference; returns (P, e)."""
    P, e = decode(sim, b, i)
    s = sim.log[(P, e)]
    assert sim.intact(e, s.ep), f"sampled ({P}, {e}) from a running or overwritten episode"
    goal = int(b.goal[i])
    rel = bool(b.relabelled[i])
    if not rel:
        assert goal == s.goal
        assert int(b.goal_gap[i]) == -1
    gt = goal_tokens(goal)
    Lg = len(gt)
    want_prompt = [PRE, *gt, MID, 1 + P * sim.n_envs + e, POST]
    assert b.prompt_ids[i, : len(want_prompt)].tolist() == want_prompt
    assert b.prompt_ids[i, len(want_prompt):].eq(0).all()
    assert b.prompt_mask[i].tolist() == [True] * len(want_prompt) + [False] * (b.prompt_ids.shape[1] - 3 - Lg - 1)
    ex = expected(sim, P, e, goal, rel)
    assert math.isclose(float(b.reward[i]), float(ex["reward"]), rel_tol=1e-6), (float(b.reward[i]), ex)
    assert math.isclose(float(b.discount[i]), float(ex["discount"]), rel_tol=1e-6)
    assert int(b.n_steps[i]) == ex["n_steps"]
    assert bool(b.terminated[i]) == ex["terminated"]
    assert bool(b.truncated[i]) == ex["truncated"]
    assert b.next_prompt_ids[i, : len(want_prompt)].tolist() == [PRE, *gt, MID, ex["boot"], POST]
    idx = 1 + P * sim.n_envs + e
    assert int(b.action[i]) == P % K
    assert math.isclose(float(b.logp[i]), -idx / 10, rel_tol=1e-6)
    assert int(b.policy_version[i]) == idx * 3
    assert b.cand_ids[i].tolist() == [[idx + 1, 7], [idx + 2, 0]]
    assert b.cand_mask[i].tolist() == [[True, True], [True, False]]
    bidx = ex["boot"] - NEXT + 1
    assert b.next_cand_ids[i].tolist() == [[bidx + 6, 0], [bidx + 7, 5]]
    assert b.next_cand_mask[i].tolist() == [[True, False], [True, True]]
    assert int(b.goal_limit[i]) == sim.limits[goal]
    return P, e


def fill_layout(sim: Sim, ends: list[str], goal: int = 1) -> None:
    """N = 1: one add per char: '.' continues, 'T' terminates, 'R' truncates. Reward of global step P is P + 1."""
    for c in ends:
        P = sim.pos
        sim.add([goal], [[]], [float(P + 1)], [c == "T"], [c == "R"])


def test_nstep_exact_hand_computed() -> None:
    """N = 1, n = 3, gamma = 0.5: episodes ..T (0-2), ...R (3-6), .. running (7-8). Values computed by hand."""
    sim = Sim(n_envs=1, capacity=20, n_step=3, gamma=0.5)
    fill_layout(sim, list("..T...R.."))
    b = sim.buf.sample(400, torch.Generator().manual_seed(0))
    # Hand-computed (reward, discount, n_steps, terminated, truncated, bootstrap step) per start step P.
    hand = {
        0: (1 + 0.5 * 2 + 0.25 * 3, 0.0, 3, True, False, 2),
        1: (2 + 0.5 * 3, 0.0, 2, True, False, 2),
        2: (3.0, 0.0, 1, True, False, 2),
        3: (4 + 0.5 * 5 + 0.25 * 6, 0.125, 3, False, False, 5),
        4: (5 + 0.5 * 6 + 0.25 * 7, 0.125, 3, False, True, 6),
        5: (6 + 0.5 * 7, 0.25, 2, False, True, 6),
        6: (7.0, 0.5, 1, False, True, 6),
    }
    seen = set()
    for i in range(len(b)):
        P, _ = check_row(sim, b, i)
        r, d, k, te, tr, boot = hand[P]
        assert math.isclose(float(b.reward[i]), r) and math.isclose(float(b.discount[i]), d)
        assert (int(b.n_steps[i]), bool(b.terminated[i]), bool(b.truncated[i])) == (k, te, tr)
        assert int(b.next_prompt_ids[i, 4]) == NEXT + boot  # goal 1 has two tokens: [PRE, g, g, MID, obs, POST]
        seen.add(P)
    assert seen == set(hand)  # running episode (7, 8) never sampled, every completed step is
    assert len(sim.buf) == 9 and sim.buf.num_sampleable == 7


def test_wraparound_never_samples_overwritten_episode() -> None:
    """N = 1, capacity 6: after 10 adds rows 0-3 are gone; the episode 2-4 lost its start and is never sampled."""
    sim = Sim(n_envs=1, capacity=6, n_step=2)
    fill_layout(sim, list(".T..T.T..."))  # episodes 0-1, 2-4, 5-6, 7-9 (running)
    assert sim.buf.num_sampleable == 2  # only 5-6 is complete and intact
    b = sim.buf.sample(100, torch.Generator().manual_seed(1))
    got = {check_row(sim, b, i)[0] for i in range(len(b))}
    assert got == {5, 6}


def test_multi_env_layout_and_len() -> None:
    sim = Sim(n_envs=3, capacity=30, n_step=2)
    ends = [".T", "..R", "T"]
    for P in range(6):
        term = [ends[e][P % len(ends[e])] == "T" for e in range(3)]
        trunc = [ends[e][P % len(ends[e])] == "R" for e in range(3)]
        sim.add([0, 1, 2], [[], [3], []], [float(P)] * 3, term, trunc)
    assert len(sim.buf) == 18
    b = sim.buf.sample(300, torch.Generator().manual_seed(2))
    got = {check_row(sim, b, i) for i in range(len(b))}
    assert got == sim.sampleable()


def test_state_dict_round_trip_same_samples() -> None:
    sim = Sim(n_envs=2, capacity=16, n_step=3, her=HERConfig("future", 0.5))
    for P in range(13):
        sim.add([P % 4, (P + 1) % 4], [[P % 3], []], [1.0, 0.0], [P % 5 == 4, False], [False, P % 3 == 2])
    state = sim.buf.state_dict()
    f = io.BytesIO()
    torch.save(state, f)
    f.seek(0)
    before = sim.buf.sample(64, torch.Generator().manual_seed(7))
    other = Sim(n_envs=2, capacity=16, n_step=3, her=HERConfig("future", 0.5)).buf
    other.load_state_dict(torch.load(f, weights_only=False))
    after = other.sample(64, torch.Generator().manual_seed(7))
    for name in Batch.__dataclass_fields__:
        assert torch.equal(getattr(before, name), getattr(after, name)), name
    assert other.register_goal(goal_tokens(3)) == 3  # goal table keys came back too
    assert other.num_sampleable == sim.buf.num_sampleable and len(other) == len(sim.buf)
    # Both keep going identically after the resume (episode bookkeeping restored), wrap-around included.
    for P in range(13, 20):
        other.add(sim.add([1, 2], [[2], [P % 4]], [0.5, 0.0], [P % 2 == 0, False], [False, P % 4 == 1]))
    before = sim.buf.sample(64, torch.Generator().manual_seed(8))
    after = other.sample(64, torch.Generator().manual_seed(8))
    for name in Batch.__dataclass_fields__:
        assert torch.equal(getattr(before, name), getattr(after, name)), name
    for i in range(len(after)):
        check_row(sim, after, i)
    with pytest.raises(ValueError, match="saved with"):
        Sim(n_envs=1, capacity=16).buf.load_state_dict(state)


@pytest.mark.parametrize("native", ["on", "off"])
def test_sample_into_out_writes_the_same_batch_in_place(native: str) -> None:
    """``sample(out=b)`` returns b with the batch a fresh call returns for the same draws, written into b's tensors."""
    sim = Sim(n_envs=2, capacity=16, n_step=2, her=HERConfig("future", 0.5))
    sim.buf = ReplayBuffer(BufferConfig(**{**sim.buf.cfg.__dict__, "native": native}), 2, pad_id=0, prompt=PIECES)
    for g in range(sim.n_goals):
        sim.buf.register_goal(goal_tokens(g), limit=sim.limits[g])
    for P in range(11):
        sim.add([P % 4, (P + 1) % 4], [[P % 3], []], [1.0, 0.0], [P % 5 == 4, False], [False, P % 3 == 2])
    reused = sim.buf.sample(32, torch.Generator().manual_seed(1))
    ptrs = {name: getattr(reused, name).data_ptr() for name in Batch.__dataclass_fields__}
    for seed in (2, 3):
        if seed == 3:  # an add between the calls (the sampling window moves), and a field the caller replaced
            sim.add([0, 1], [[1], [2]], [0.0, 1.0], [True, False], [False, True])
            reused.reward = torch.full_like(reused.reward, float("nan"))
            ptrs["reward"] = reused.reward.data_ptr()
        want = sim.buf.sample(32, torch.Generator().manual_seed(seed))
        got = sim.buf.sample(32, torch.Generator().manual_seed(seed), out=reused)
        assert got is reused
        for name in Batch.__dataclass_fields__:
            assert torch.equal(getattr(got, name), getattr(want, name)), name
            assert getattr(got, name).data_ptr() == ptrs[name], name  # written in place, nothing allocated
        for i in range(len(got)):
            check_row(sim, got, i)


def test_sample_into_out_rejects_a_batch_of_another_layout() -> None:
    sim = Sim(n_envs=1, capacity=8)
    fill_layout(sim, list("..T."))
    gen = torch.Generator().manual_seed(0)
    small = sim.buf.sample(4, gen)
    with pytest.raises(ValueError, match=r"out\.prompt_ids is \(4, 6\).*a batch of 8"):
        sim.buf.sample(8, gen, out=small)
    ok = sim.buf.sample(4, gen, out=small)  # the same object still works for its own size
    ok.cand_mask = ok.cand_mask.long()
    with pytest.raises(ValueError, match=r"out\.cand_mask is .*torch\.int64.*torch\.bool"):
        sim.buf.sample(4, gen, out=ok)
    ok.cand_mask = torch.zeros(K, LC, 4, dtype=torch.bool).permute(2, 0, 1)  # right shape, not contiguous
    with pytest.raises(ValueError, match=r"out\.cand_mask .*contiguous"):
        sim.buf.sample(4, gen, out=ok)


@pytest.mark.parametrize("native", ["on", "off"])
def test_errors_name_the_limit(native: str) -> None:
    """Each refused add names what to change, on the native and the torch path, and leaves the buffer unchanged."""
    sim = Sim(n_envs=2, capacity=8)
    sim.buf = ReplayBuffer(BufferConfig(**{**sim.buf.cfg.__dict__, "native": native}), 2, pad_id=0, prompt=PIECES)
    for g in range(sim.n_goals):
        sim.buf.register_goal(goal_tokens(g), limit=sim.limits[g])
    sim.buf.add(_batch(2))
    with pytest.raises(ValueError, match="no completed episode"):
        sim.buf.sample(4, torch.Generator())
    with pytest.raises(ValueError, match="n_envs=2"):
        Sim(n_envs=3, capacity=9).buf.add(_batch(2))
    wide = _batch(2)
    wide.obs = torch.tensor([[5, 6, 7], [5, 0, 0]])
    wide.obs_len = torch.tensor([3, 1])
    with pytest.raises(ValueError, match="max_obs_tokens=1; set buffer max_obs_tokens >= 3"):
        sim.buf.add(wide)
    many = _batch(2)
    many.cands = torch.ones(2, 5, 2, dtype=torch.long)
    with pytest.raises(ValueError, match="max_cands >= 5"):
        sim.buf.add(many)
    with pytest.raises(ValueError, match="max_goal_tokens >= 3"):
        sim.buf.register_goal([1, 2, 3])
    for g in range(4, 8):
        sim.buf.register_goal([g + 1000])
    with pytest.raises(ValueError, match="goal table overflow"):
        sim.buf.register_goal([999])
    before = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in sim.buf.state_dict().items()}
    bad_goal = _batch(2)
    bad_goal.goal = torch.tensor([0, 8])
    with pytest.raises(ValueError, match="register_goal"):
        sim.buf.add(bad_goal)
    bad_achieved = _batch(2)
    bad_achieved.achieved = torch.tensor([[-1, 9], [-1, -1]])
    with pytest.raises(ValueError, match=r"achieved holds an id outside \[-1, 8\)"):
        sim.buf.add(bad_achieved)
    bad_action = _batch(2)
    bad_action.action = torch.tensor([0, K])
    with pytest.raises(ValueError, match=f"action holds an index outside \\[0, max_cands={K}\\)"):
        sim.buf.add(bad_action)
    wide_cands = _batch(2)
    wide_cands.cands, wide_cands.cand_len = torch.ones(2, K, LC + 2, dtype=torch.long), torch.full((2, K), LC + 1)
    with pytest.raises(ValueError, match=f"max_cand_tokens={LC}; set buffer max_cand_tokens >= {LC + 1}"):
        sim.buf.add(wide_cands)
    assert sim.buf.pos == 1
    after = sim.buf.state_dict()
    for k, v in before.items():  # failed adds changed nothing
        assert torch.equal(v, after[k]) if isinstance(v, torch.Tensor) else v == after[k], k
    for _ in range(3):
        sim.buf.add(_batch(2))
    with pytest.raises(ValueError, match="capacity_per_env=4"):
        sim.buf.add(_batch(2))


def _batch(N: int) -> TransitionBatch:  # noqa: N803 - N envs, the project-wide shape letter
    one = torch.ones(N, 1, dtype=torch.long)
    return TransitionBatch(
        obs=one, obs_len=one[:, 0], next_obs=one, next_obs_len=one[:, 0], cands=torch.ones(N, 1, 1, dtype=torch.long),
        cand_len=torch.ones(N, 1, dtype=torch.long), next_cands=torch.ones(N, 1, 1, dtype=torch.long),
        next_cand_len=torch.ones(N, 1, dtype=torch.long), goal=torch.zeros(N, dtype=torch.long),
        action=torch.zeros(N, dtype=torch.long), reward=torch.zeros(N), terminated=torch.zeros(N, dtype=torch.bool),
        truncated=torch.zeros(N, dtype=torch.bool), achieved=torch.full((N, 1), -1), logp=torch.zeros(N),
        policy_version=torch.zeros(N, dtype=torch.long),
    )


def test_bytes_per_transition_int16_halves_tokens() -> None:
    kw = dict(capacity=64, max_obs_tokens=128, max_cands=16, max_cand_tokens=8, device="cpu")
    b32 = ReplayBuffer(BufferConfig(**kw), 4, pad_id=0, prompt=PIECES)  # type: ignore[arg-type]
    b16 = ReplayBuffer(BufferConfig(token_dtype="int16", **kw), 4, pad_id=0, prompt=PIECES)  # type: ignore[arg-type]
    tokens = 2 * 128 + 2 * 16 * 8 + 2 * 16  # obs, next_obs, cands, next_cands and the candidate lengths (one record)
    assert b32.bytes_per_transition() - b16.bytes_per_transition() == pytest.approx(tokens * 2, abs=1e-6)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_sample_has_no_host_sync_on_cuda() -> None:
    cfg = BufferConfig(capacity=64, n_step=3, device="cuda", max_obs_tokens=1, max_goal_tokens=2, max_cands=K,
                       max_cand_tokens=LC, max_goals=8, max_achieved=2, her=HERConfig("future", 0.8))
    buf = ReplayBuffer(cfg, 2, pad_id=0, prompt=PIECES)
    for g in range(4):
        buf.register_goal(goal_tokens(g))
    for P in range(20):
        t = _batch(2)
        t.terminated = torch.tensor([P % 4 == 3, P % 5 == 4])
        t.achieved = torch.tensor([[P % 3], [-1]])
        buf.add(t)
    gen = torch.Generator(device="cuda").manual_seed(0)
    buf.sample(8, gen)  # warm-up (lazy CUDA init may sync)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        b = buf.sample(256, gen)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert b.prompt_ids.is_cuda and b.prompt_ids.shape == (256, 1 + 2 + 1 + 1 + 1)


def test_bench_script_quick_runs_and_prints_table() -> None:
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, str(root / "scripts" / "bench_buffer.py"), "--quick", "--threads", "1,2",
                          "--rounds", "2", "--passes"], capture_output=True, text=True, timeout=240, cwd=root,
                         check=True)
    table, passes = out.stdout.split("One sample(out=) call")
    lines = [ln for ln in table.splitlines() if ln.startswith("| ")]
    assert lines[0].startswith("| buffer | threads | add") and len(lines) == 4, out.stdout  # header, ours x 2, SB3
    assert lines[1].startswith("| sacglam ReplayBuffer (int16, native sampler) | 1 |")
    assert lines[2].startswith("| sacglam ReplayBuffer (int16, native sampler) | 2 |")
    assert lines[3].startswith("| SB3 HerReplayBuffer | 1 |")
    cells = [c.strip() for c in lines[1].strip("|").split("|")]
    assert len(cells) == 9 and all(c.endswith("x") for c in (cells[4], cells[6])), cells  # both ratios printed
    assert "ratio (first row / SB3): add" in out.stdout
    parts = [ln.strip("|").split("|") for ln in passes.splitlines() if ln.startswith("| ") and "---" not in ln][1:]
    assert [p[0].split(":")[0].strip() for p in parts[:4]] == ["A", "B0", "B", "C"], passes
    us = [float(p[1]) for p in parts]
    assert len(us) == 6 and all(u > 0 for u in us), passes  # the Python share is the call minus its passes


def test_int16_tokens_reject_large_ids() -> None:
    cfg = BufferConfig(capacity=4, device="cpu", max_obs_tokens=1, max_goal_tokens=2, max_cands=1, max_cand_tokens=1,
                       max_goals=2, max_achieved=1, token_dtype="int16")
    buf = ReplayBuffer(cfg, 2, pad_id=0, prompt=PIECES)
    with pytest.raises(ValueError, match="token_dtype='int32'"):
        buf.register_goal([40000])
    buf.register_goal([7])
    big = _batch(2)
    big.obs = torch.tensor([[5], [40000]])
    with pytest.raises(ValueError, match="token_dtype='int32'"):
        buf.add(big)
    buf.add(_batch(2))
    assert len(buf) == 2


def test_int64_tokens_reject_ids_a_batch_cannot_carry() -> None:
    """Sampled batches carry int32 ids: int64 storage refuses a wider id at add instead of wrapping it at sampling."""
    cfg = BufferConfig(capacity=4, device="cpu", max_obs_tokens=1, max_goal_tokens=2, max_cands=1, max_cand_tokens=1,
                       max_goals=2, max_achieved=1, token_dtype="int64")
    buf = ReplayBuffer(cfg, 2, pad_id=0, prompt=PIECES)
    buf.register_goal([7])
    big = _batch(2)
    big.obs = torch.tensor([[5], [2**31]])
    with pytest.raises(ValueError, match="largest token_dtype=int64 stores; sampled batches carry int32 ids"):
        buf.add(big)
    widest = _batch(2)
    widest.obs = torch.tensor([[5], [2**31 - 1]])
    buf.add(widest)
    assert len(buf) == 2


@pytest.mark.slow
@pytest.mark.ci
def test_compiled_sampling_equals_eager() -> None:
    """BufferConfig.compile changes speed only: same draws, same batch (compiles for ~1 min on a small CPU)."""
    sims = [Sim(n_envs=2, capacity=16, n_step=3, her=HERConfig("future", 0.5)) for _ in range(2)]
    sims[1].buf.cfg.compile = True
    sims[1].buf._sample_core = torch.compile(sims[1].buf._sample_from_draws, dynamic=False)
    for sim in sims:
        for P in range(13):
            sim.add([P % 4, (P + 1) % 4], [[P % 3], []], [1.0, 0.0], [P % 5 == 4, False], [False, P % 3 == 2])
    eager = sims[0].buf.sample(64, torch.Generator().manual_seed(4))
    compiled = sims[1].buf.sample(64, torch.Generator().manual_seed(4))
    for name in Batch.__dataclass_fields__:
        assert torch.equal(getattr(eager, name), getattr(compiled, name)), name


def _pack(steps: list[dict[str, list]], key: str, width: int, fill: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids [N, width] (``fill`` past each length) and lengths [N] of one token field of N steps."""
    ids = torch.full((len(steps), width), fill)
    for e, step in enumerate(steps):
        ids[e, : len(step[key])] = torch.tensor(step[key], dtype=torch.long)
    return ids, torch.tensor([len(step[key]) for step in steps])


def _pack_cands(steps: list[dict[str, list]], key: str, K: int, Lc: int,  # noqa: N803 - shape letters
                fill: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Candidate ids [N, K, Lc] (``fill`` past each length) and lengths [N, K] of N steps."""
    ids = torch.full((len(steps), K, Lc), fill)
    lens = torch.zeros(len(steps), K, dtype=torch.long)
    for e, step in enumerate(steps):
        for j, c in enumerate(step[key]):
            ids[e, j, : len(c)] = torch.tensor(c, dtype=torch.long)
            lens[e, j] = len(c)
    return ids, lens


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.integers(0, 2**16),
    n_envs=st.integers(1, 3),
    rows=st.integers(3, 7),
    n_step=st.integers(1, 3),
    cand_tokens=st.sampled_from([1, 2, 3, 6, 8]),
    token_dtype=st.sampled_from(["int16", "int32"]),
    joint=st.booleans(),
    ratio=st.sampled_from([0.0, 1.0]),
)
def test_sampled_tokens_are_the_stored_tokens(seed: int, n_envs: int, rows: int, n_step: int, cand_tokens: int,
                                              token_dtype: str, joint: bool, ratio: float) -> None:
    """Variable-length goals, observations and candidates (token ids that equal pad_id inside the lengths included):
    every sampled prompt is the plain-Python concatenation pre + goal + mid + obs + post of the stored step (and of the
    bootstrap step's next observation for next_prompt), every candidate block the stored candidates; for both prompt
    table layouts, int16/int32 tokens and template ids that do not fit int16."""
    import random

    import sacglam.prompting as prompting

    rng = random.Random(seed)
    N, Lo, Lg, Kmax, Lc, pad = n_envs, 4, 3, 3, cand_tokens, rng.randint(0, 1)
    prefix = [40000 if rng.random() < 0.5 else 7][: rng.randint(0, 1)]
    pieces = PromptPieces(torch.tensor([*prefix, 5]), torch.tensor([6] * rng.randint(0, 2), dtype=torch.long),
                          torch.tensor([9, 8][: rng.randint(0, 2)]), pad_id=pad)
    cfg = BufferConfig(capacity=rows * N, n_step=n_step, gamma=0.5, device="cpu", max_obs_tokens=Lo,
                       max_goal_tokens=Lg, max_cands=Kmax, max_cand_tokens=Lc, max_goals=6, max_achieved=2,
                       token_dtype=token_dtype, her=HERConfig("episode", ratio))
    limit = prompting.JOINT_TABLE_MAX_ENTRIES
    prompting.JOINT_TABLE_MAX_ENTRIES = limit if joint else -1
    try:
        buf = ReplayBuffer(cfg, N, pad_id=pad, prompt=pieces)
    finally:
        prompting.JOINT_TABLE_MAX_ENTRIES = limit
    assert (buf._asm.joint_index is not None) == joint
    goals = [[300 + g] * (g % (Lg + 1)) for g in range(4)]  # lengths 0, 1, 2, 3
    for g, toks in enumerate(goals):
        assert buf.register_goal(toks) == g

    def tokens(width: int) -> list[int]:
        return [rng.randint(0, 3000) for _ in range(rng.randint(0, width))]  # 0 and 1 may equal pad_id

    log: dict[tuple[int, int], dict[str, list]] = {}
    t_ep = [0] * N
    for P in range(rng.randint(rows, 3 * rows)):
        steps: list[dict[str, list]] = [{"obs": tokens(Lo), "next_obs": tokens(Lo),
                                          "cands": [tokens(Lc) for _ in range(Kmax)],
                                          "next_cands": [tokens(Lc) for _ in range(Kmax)]} for _ in range(N)]
        ends = []
        for e in range(N):
            t_ep[e] += 1
            ends.append(t_ep[e] >= rows - 1 or rng.random() < 0.3)
            t_ep[e] = 0 if ends[e] else t_ep[e]
            log[(P, e)] = steps[e]
        (obs, ol), (nobs, nol) = _pack(steps, "obs", Lo, pad + 1), _pack(steps, "next_obs", Lo, pad + 1)
        c, cl = _pack_cands(steps, "cands", Kmax, Lc, pad + 1)  # garbage past the lengths: add must pad it
        nc, ncl = _pack_cands(steps, "next_cands", Kmax, Lc, pad + 1)
        buf.add(TransitionBatch(
            obs=obs, obs_len=ol, next_obs=nobs, next_obs_len=nol, cands=c, cand_len=cl, next_cands=nc,
            next_cand_len=ncl, goal=torch.tensor([rng.randint(0, 3) for _ in range(N)]),
            action=torch.zeros(N, dtype=torch.long), reward=torch.zeros(N), terminated=torch.tensor(ends),
            truncated=torch.zeros(N, dtype=torch.bool),
            achieved=torch.tensor([[rng.choice([-1, 0, 1, 2, 3]), -1] for _ in range(N)]), logp=torch.zeros(N),
            policy_version=torch.tensor([P * N + e for e in range(N)]),
        ))
    if buf.num_sampleable == 0:
        return
    b = buf.sample(64, torch.Generator().manual_seed(seed))
    pre, mid, post = pieces.prefix.tolist(), pieces.mid.tolist(), pieces.post.tolist()
    Lp = b.prompt_ids.shape[1]
    for i in range(len(b)):
        P, e = divmod(int(b.policy_version[i]), N)
        boot = log[(P + int(b.n_steps[i]) - 1, e)]
        gt = goals[int(b.goal[i])]
        want_prompt = pre + gt + mid + log[(P, e)]["obs"] + post
        want_next = pre + gt + mid + boot["next_obs"] + post
        for ids, mask, want in ((b.prompt_ids[i], b.prompt_mask[i], want_prompt),
                                (b.next_prompt_ids[i], b.next_prompt_mask[i], want_next)):
            assert ids.tolist() == want + [pad] * (Lp - len(want))
            assert mask.tolist() == [True] * len(want) + [False] * (Lp - len(want))
        for ids, mask, want_c in ((b.cand_ids[i], b.cand_mask[i], log[(P, e)]["cands"]),
                                  (b.next_cand_ids[i], b.next_cand_mask[i], boot["next_cands"])):
            assert ids.tolist() == [cnd + [pad] * (Lc - len(cnd)) for cnd in want_c]
            assert mask.tolist() == [[True] * len(cnd) + [False] * (Lc - len(cnd)) for cnd in want_c]
