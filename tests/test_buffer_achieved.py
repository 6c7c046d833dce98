"""ReplayBuffer.set_achieved: achieved goals written after the episode (issue 16) leave the tables ``add`` leaves.

Two buffers of one config get the same random episodes (several envs ending at different steps, ring wrap-around):
buffer A with the true achieved ids, buffer B with all -1 and then ``set_achieved`` per finished episode (right after
the add that finished it, a few adds later, or some episodes late and out of order). Wherever B has every episode
relabelled, every saved field and derived table equals A's and ``sample`` returns the same batch, field for field.
With a rarity option the counts and marks are checked against hand-computed values, and the refusals one by one.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import pytest
import torch

from sacglam.prompting import PromptPieces
from sacglam.replay import native
from sacglam.replay.buffer import BufferConfig, ReplayBuffer
from sacglam.replay.her import HERConfig
from sacglam.types import Batch, TransitionBatch

torch.set_num_threads(1)

PIECES = PromptPieces(torch.tensor([7]), torch.tensor([6]), torch.tensor([9]), pad_id=0)
LO, K, LC, G, N_GOALS = 3, 2, 2, 3, 5
LIMITS = (2, 0, 3, 10, 4)  # step limit per goal (0 = unknown)
# Tables that depend on the achieved ids (the rest must be equal everywhere at every point).
_ROW_ACH = ("achieved", "ach_before", "ach_step", "rare_goal", "_rows", "_ranks")

needs_native = pytest.mark.skipif(native.load() is None, reason=f"native code unavailable: {native.load_error()}")


def _buffer(cfg: BufferConfig, n_envs: int) -> ReplayBuffer:
    buf = ReplayBuffer(cfg, n_envs, pad_id=0, prompt=PIECES)
    for g in range(N_GOALS):
        assert buf.register_goal([300 + g] * (1 + g % 2), limit=LIMITS[g]) == g
    return buf


def _step(rng: random.Random, N: int, P: int, ends: list[bool], achieved: torch.Tensor) -> TransitionBatch:  # noqa: N803
    gen = torch.Generator().manual_seed(rng.randrange(2**31))
    terms = [e and rng.random() < 0.5 for e in ends]
    return TransitionBatch(
        obs=torch.randint(1, 500, (N, LO), generator=gen), obs_len=torch.randint(0, LO + 1, (N,), generator=gen),
        next_obs=torch.randint(1, 500, (N, LO), generator=gen),
        next_obs_len=torch.randint(0, LO + 1, (N,), generator=gen),
        cands=torch.randint(1, 500, (N, K, LC), generator=gen),
        cand_len=torch.randint(0, LC + 1, (N, K), generator=gen),
        next_cands=torch.randint(1, 500, (N, K, LC), generator=gen),
        next_cand_len=torch.randint(0, LC + 1, (N, K), generator=gen),
        goal=torch.randint(0, N_GOALS, (N,), generator=gen), action=torch.randint(0, K, (N,), generator=gen),
        reward=torch.tensor([rng.choice([0.0, 1.0, 0.25]) for _ in range(N)]),
        terminated=torch.tensor(terms),
        truncated=torch.tensor([e and not t for e, t in zip(ends, terms, strict=True)]),
        achieved=achieved, logp=torch.randn(N, generator=gen), policy_version=torch.full((N,), P),
    )


def _random_achieved(rng: random.Random, N: int) -> torch.Tensor:  # noqa: N803
    """[N, G_in] ids in any order (duplicates too), -1 padded anywhere; G_in <= G varies per step."""
    width = rng.randint(1, G)
    return torch.tensor([[rng.choice([-1, -1, -1, *range(N_GOALS)]) for _ in range(width)] for _ in range(N)])


@dataclass
class Pending:
    """An episode B still has to relabel: its env, per-env index k, first position, ids [L, G] and due position."""

    env: int
    k: int
    start: int
    achieved: torch.Tensor
    due: int


def _unsettled(a: ReplayBuffer, pending: list[Pending]) -> tuple[torch.Tensor, torch.Tensor]:
    """Masks of what B may still hold differently: rows [C, N] of running and pending episodes, slots [S, N]."""
    C, N, S, P = a.capacity_per_env, a.n_envs, a.capacity_per_env + 1, a.pos
    rows = torch.zeros(C, N, dtype=torch.bool)
    slots = torch.zeros(S, N, dtype=torch.bool)
    spans = [(p.env, p.k, p.start, p.start + p.achieved.shape[0]) for p in pending]
    spans += [(e, int(a.cur_k[e]), int(a.cur_start[e]), P) for e in range(N)]
    for e, k, s, end in spans:
        assert end - s <= C and s >= P - C  # the tests keep unsettled episodes intact
        for pos in range(s, end):
            rows[pos % C, e] = True
        slots[k % S, e] = True
    return rows, slots


def assert_same_tables(a: ReplayBuffer, b: ReplayBuffer, pending: list[Pending]) -> None:
    """Every saved field and derived table of A and B equal, outside running and pending episodes (none left: all)."""
    rows, slots = _unsettled(a, pending)
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    names = [*sa, "_tok", "_rows", "_ranks", "_eps"]
    for name in names:
        x, y = (sa[name], sb[name]) if name in sa else (getattr(a, name), getattr(b, name))
        if not isinstance(x, torch.Tensor):
            assert x == y, name
            continue
        assert x.dtype == y.dtype and x.shape == y.shape, name
        x, y = x.cpu(), y.cpu()
        if name in _ROW_ACH:
            keep = ~rows
        elif name in ("ep_ach", "_eps"):
            keep = ~slots
        elif name == "cur_ach":
            keep = torch.tensor([int(a.cur_step[e]) == 0 for e in range(a.n_envs)])  # fresh episodes: both 0
        else:
            keep = torch.ones(x.shape[:1], dtype=torch.bool)
        while keep.dim() < x.dim():
            keep = keep.unsqueeze(-1)
        assert torch.equal(torch.where(keep, x, 0), torch.where(keep, y, 0)), name
    assert (a.pos, a.num_sampleable, len(a)) == (b.pos, b.num_sampleable, len(b))


def assert_same_samples(a: ReplayBuffer, b: ReplayBuffer, seed: int) -> None:
    if not a.num_sampleable:
        return
    for batch in (5, 64):
        ga = torch.Generator(device=a.device).manual_seed(seed + batch)
        gb = torch.Generator(device=b.device).manual_seed(seed + batch)
        x, y = a.sample(batch, ga), b.sample(batch, gb)
        for name in Batch.__dataclass_fields__:
            u, v = getattr(x, name), getattr(y, name)
            assert u.dtype == v.dtype and u.shape == v.shape and torch.equal(u, v), name


def run_pair(cfg: BufferConfig, N: int, mode: str, seed: int, adds: int = 45) -> tuple[ReplayBuffer, ReplayBuffer]:  # noqa: N803
    """Adds the same random episodes to A (true ids) and B (-1, then set_achieved per ``mode``); checks A == B
    after every add where B is settled (outside the unsettled episodes otherwise) and fully at the end.

    mode: ``now`` (relabel right after the finishing add), ``delayed`` (3 adds later), ``mixed`` (0-3 adds later per
    episode: relabels out of order across envs and episodes), ``end`` (all at the end, newest first; the capacity must
    then hold every episode).
    """
    rng = random.Random(seed)
    a, b = _buffer(cfg, N), _buffer(cfg, N)
    C = a.capacity_per_env
    max_delay = {"now": 0, "delayed": 3, "mixed": 3, "end": 0}[mode]
    max_len = C - max_delay  # an episode must still be intact when B relabels it
    starts = [0] * N  # per env: the running episode's start and its ids so far
    ach_log: list[list[torch.Tensor]] = [[] for _ in range(N)]
    pending: list[Pending] = []
    for P in range(adds):
        assert [b.episode_start(e) for e in range(N)] == [int(x) for x in a.cur_start] == starts
        ends = [adds - 1 == P or len(ach_log[e]) + 1 >= max_len or rng.random() < 0.3 for e in range(N)]
        achieved = _random_achieved(rng, N)
        step = _step(rng, N, P, ends, achieved)
        a.add(step)
        b.add(TransitionBatch(**{**step.__dict__, "achieved": torch.full_like(achieved, -1)}))
        for e in range(N):
            row = torch.full((G,), -1, dtype=torch.long)
            row[: achieved.shape[1]] = achieved[e]
            ach_log[e].append(row)
            if ends[e]:
                delay = rng.randint(0, max_delay) if mode == "mixed" else max_delay
                due = adds + 10**6 if mode == "end" else P + delay
                pending.append(Pending(e, int(a.cur_k[e]) - 1, starts[e], torch.stack(ach_log[e]), due))
                starts[e], ach_log[e] = P + 1, []
        due_now = [p for p in pending if p.due <= P]
        rng.shuffle(due_now)  # the same due position: any order
        for p in due_now:
            assert b.set_achieved(p.env, p.start, p.achieved)
            pending.remove(p)
        assert_same_tables(a, b, pending)
        if not pending and rng.random() < 0.3:
            assert_same_samples(a, b, seed + P)
    for p in sorted(pending, key=lambda p: (p.due, -p.start)):  # "end": newest first
        assert b.set_achieved(p.env, p.start, p.achieved.to(torch.int32))  # any integer dtype
    assert_same_tables(a, b, [])
    assert_same_samples(a, b, seed)
    return a, b


def _cfg(n_step: int, strategy: str, native_mode: str, rows: int, N: int, device: str = "cpu") -> BufferConfig:  # noqa: N803
    return BufferConfig(capacity=rows * N, n_step=n_step, gamma=0.9, device=device, max_obs_tokens=LO,
                        max_goal_tokens=2, max_cands=K, max_cand_tokens=LC, max_goals=8, max_achieved=G,
                        her=HERConfig(strategy, 0.7), native=native_mode)


@pytest.mark.integration
@pytest.mark.parametrize("mode", ["now", "delayed", "mixed"])
@pytest.mark.parametrize("native_mode", [pytest.param("on", marks=needs_native), "off"])
@pytest.mark.parametrize("strategy", ["future", "final", "episode"])
@pytest.mark.parametrize("n_step", [1, 3])
def test_set_achieved_equals_adding_the_ids(n_step: int, strategy: str, native_mode: str, mode: str) -> None:
    for seed in range(3):
        a, _ = run_pair(_cfg(n_step, strategy, native_mode, rows=9, N=3), 3, mode, seed)
        assert a.pos > 2 * a.capacity_per_env  # the ring wrapped (episodes were overwritten)
        assert (a.ach_step >= 0).any() and (a.ep_ach > 1).any()  # the ids made achieving steps


@pytest.mark.parametrize("native_mode", [pytest.param("on", marks=needs_native), "off"])
def test_relabelling_every_episode_at_the_end_newest_first(native_mode: str) -> None:
    """Episodes relabelled only after all adds, in reverse order (later than other episodes' adds)."""
    for seed in range(3):
        run_pair(_cfg(2, "future", native_mode, rows=40, N=2), 2, "end", seed, adds=38)


@needs_native
@pytest.mark.parametrize("n_step", [1, 3])
def test_native_buffer_relabelled_equals_torch_buffer_added(n_step: int) -> None:
    """B on the native add and sampler, relabelled, against A on the torch path with the true ids: the same tables;
    the same batch (the n-step return and discount up to float32 rounding, as tests/test_native_sampler.py)."""
    rng = random.Random(1)
    N = 2
    a = _buffer(_cfg(n_step, "future", "off", rows=8, N=N), N)
    b = _buffer(_cfg(n_step, "future", "on", rows=8, N=N), N)
    assert b._native is not None and b._native_add is not None
    logs: list[list[torch.Tensor]] = [[] for _ in range(N)]
    for P in range(40):
        starts = [b.episode_start(e) for e in range(N)]
        ends = [P == 39 or len(logs[e]) >= 6 or rng.random() < 0.3 for e in range(N)]
        achieved = _random_achieved(rng, N)
        step = _step(rng, N, P, ends, achieved)
        a.add(step)
        b.add(TransitionBatch(**{**step.__dict__, "achieved": torch.full_like(achieved, -1)}))
        for e in range(N):
            logs[e].append(torch.cat([achieved[e], torch.full((G - achieved.shape[1],), -1)]))
            if ends[e]:
                assert b.set_achieved(e, starts[e], torch.stack(logs[e]))
                logs[e] = []
    assert_same_tables(a, b, [])
    x, y = a.sample(256, torch.Generator().manual_seed(0)), b.sample(256, torch.Generator().manual_seed(0))
    for name in Batch.__dataclass_fields__:
        u, v = getattr(x, name), getattr(y, name)
        if n_step > 1 and name in ("reward", "discount"):
            torch.testing.assert_close(u, v, rtol=1e-6, atol=1e-7, msg=name)
        else:
            assert torch.equal(u, v), name


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("mode", ["now", "mixed"])
def test_set_achieved_on_cuda(mode: str) -> None:
    run_pair(_cfg(3, "future", "off", rows=9, N=3, device="cuda"), 3, mode, 0)


# ---------------------------------------------------------------------------------------------------- rarity


def _rare_buffer(native_mode: str) -> ReplayBuffer:
    """N = 1, 20 rows; goals 0-4 with step limits 2, 3, 10, 10, 10; rarity draws and rare rows on."""
    cfg = BufferConfig(capacity=20, n_step=1, gamma=0.9, device="cpu", max_obs_tokens=LO, max_goal_tokens=2,
                       max_cands=K, max_cand_tokens=LC, max_goals=8, max_achieved=G,
                       her=HERConfig("future", 1.0, rarity_draws=3, rare_fraction=0.5), native=native_mode)
    buf = ReplayBuffer(cfg, 1, pad_id=0, prompt=PIECES)
    for g, limit in enumerate((2, 3, 10, 10, 10)):
        buf.register_goal([300 + g], limit=limit)
    return buf


def _add_episode(buf: ReplayBuffer, rng: random.Random, achieved: list[list[int]]) -> int:
    """One N = 1 episode, ``achieved[t]`` at step t, terminated at its end; returns its start."""
    start = buf.episode_start(0)
    for t, ids in enumerate(achieved):
        row = torch.tensor([(ids + [-1] * G)[:G]])
        buf.add(_step(rng, 1, buf.pos, [t == len(achieved) - 1], row))
    return start


def _ids(rows: list[list[int]]) -> torch.Tensor:
    return torch.tensor([(r + [-1] * G)[:G] for r in rows])


def _assert_rare_cdf_fresh(buf: ReplayBuffer) -> None:
    """The rarity distribution ``sample`` uses equals the one a buffer loaded from this state builds afresh."""
    fresh = _rare_buffer(buf.cfg.native)
    fresh.load_state_dict(buf.state_dict())
    x, y = buf.sample(64, torch.Generator().manual_seed(5)), fresh.sample(64, torch.Generator().manual_seed(5))
    assert torch.equal(buf._rare_cdf, fresh._rare_cdf) and buf._rare_total == fresh._rare_total
    for name in Batch.__dataclass_fields__:
        assert torch.equal(getattr(x, name), getattr(y, name)), name


@pytest.mark.parametrize("native_mode", [pytest.param("on", marks=needs_native), "off"])
def test_rarity_counts_and_marks_hand_computed(native_mode: str) -> None:
    rng = random.Random(0)
    buf = _rare_buffer(native_mode)
    # Episode 1, added with its ids: counts g0 = 2, g1 = 1; marks 0 0 1 1 1 (as tests/test_rarity.py).
    s1 = _add_episode(buf, rng, [[], [0], [], [0], [1]])
    # Episode 2, added without ids: nothing counted or marked.
    s2 = _add_episode(buf, rng, [[]] * 5)
    assert (s1, s2) == (0, 5)
    assert buf.goal_count[:4].tolist() == [2, 1, 0, 0]
    assert buf.rare_goal[:10, 0].tolist() == [0, 0, 1, 1, 1] + [-1] * 5
    buf.sample(8, torch.Generator().manual_seed(0))  # the rarity CDF is now computed for this pos

    # Episode 2 gets g2, -, g1, -, g0: counts g0 3, g1 2, g2 1. Step 0's g2 (count 1) marks row 0; step 2's g1
    # (count 2, limit 3) rows 0-2, row 0 keeps the rarer g2; step 4's g0 (count 3, limit 2) rows 3-4.
    assert buf.set_achieved(0, s2, _ids([[2], [], [1], [], [0]]))
    assert buf.goal_count[:4].tolist() == [3, 2, 1, 0]
    assert buf.rare_goal[:10, 0].tolist() == [0, 0, 1, 1, 1, 2, 1, 1, 0, 0]  # episode 1's: as they were
    _assert_rare_cdf_fresh(buf)

    # Episode 1 relabelled to g3, -, g2, -, -: its old g0, g0, g1 leave the counts (g0 1, g1 1, g2 1), then g3 1,
    # g2 2. Step 0's g3 (count 1) marks row 0; step 2's g2 (count 2, limit 10) rows 0-2, row 0 keeps g3.
    assert buf.set_achieved(0, s1, _ids([[3], [], [2], [], []]))
    assert buf.goal_count[:4].tolist() == [1, 1, 2, 1]
    assert buf.rare_goal[:10, 0].tolist() == [3, 2, 2, -1, -1, 2, 1, 1, 0, 0]
    _assert_rare_cdf_fresh(buf)

    # Ties. Episode 3's step 0 achieves g1 and g0 (given in any order, -1 first): stored left-aligned [1, 0]; with
    # counts g0 2, g1 2 the step's rarest goal is the first of the tie, g1 (limit 3), marking row 0. Step 2's g3
    # (count 2, limit 10) marks rows 0-2; at row 0 the counts tie and the earlier step (g1) keeps the mark.
    s3 = _add_episode(buf, rng, [[]] * 3)
    assert buf.set_achieved(0, s3, torch.tensor([[-1, 1, 0], [-1, -1, -1], [3, -1, -1]]))
    assert buf.goal_count[:4].tolist() == [2, 2, 2, 2]
    assert buf.achieved[10, 0].tolist() == [1, 0, -1]
    assert buf.rare_goal[10:13, 0].tolist() == [1, 3, 3]
    _assert_rare_cdf_fresh(buf)
    # The same ids in another order: the counts stay; step 0's first of the tie is now g0 (limit 2, row 0 only).
    assert buf.set_achieved(0, s3, torch.tensor([[0, 1], [-1, -1], [-1, 3]]))
    assert buf.goal_count[:4].tolist() == [2, 2, 2, 2] and buf.rare_goal[10:13, 0].tolist() == [0, 3, 3]
    assert buf.achieved[10, 0].tolist() == [0, 1, -1]
    # Clearing them takes them out of the counts and the marks.
    assert buf.set_achieved(0, s3, torch.full((3, 1), -1))
    assert buf.goal_count[:4].tolist() == [1, 1, 2, 1] and buf.rare_goal[10:13, 0].tolist() == [-1, -1, -1]
    assert buf.ep_ach[buf.episode[10, 0] % (buf.capacity_per_env + 1), 0] == 0  # N = 1: the id is k
    _assert_rare_cdf_fresh(buf)


# ---------------------------------------------------------------------------------------------------- refusals


def _snapshot(buf: ReplayBuffer) -> dict[str, object]:
    state = {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in buf.state_dict().items()}
    state.update({name: getattr(buf, name).clone() for name in ("_tok", "_rows", "_ranks", "_eps")})
    return state


def _assert_unchanged(buf: ReplayBuffer, before: dict[str, object]) -> None:
    after = _snapshot(buf)
    for name, x in before.items():
        y = after[name]
        if isinstance(x, torch.Tensor):
            assert isinstance(y, torch.Tensor) and torch.equal(x, y), name
        else:
            assert x == y, name


@pytest.mark.parametrize("native_mode", [pytest.param("on", marks=needs_native), "off"])
def test_refusals_leave_the_buffer_unchanged(native_mode: str) -> None:
    rng = random.Random(0)
    buf = _buffer(_cfg(1, "future", native_mode, rows=6, N=2), 2)
    # env 0: episode [0, 3) then a running one from 3; env 1: episode [0, 2), episode [2, 4), running from 4.
    for P, ends in enumerate([[False, False], [False, True], [True, False], [False, True]]):
        buf.add(_step(rng, 2, P, ends, torch.full((2, 1), -1)))
    assert [buf.episode_start(e) for e in range(2)] == [3, 4]
    before = _snapshot(buf)
    three = _ids([[1], [], [2, 0]])
    refusals = [
        ((0, 3, _ids([[1]])), "not finished"),  # the running episode
        ((1, 4, _ids([[1]])), "not finished"),
        ((0, 9, _ids([[1]])), "not finished"),  # not even added
        ((0, 1, _ids([[1], [2]])), "not its first step"),
        ((0, 0, _ids([[1], [2]])), "has 2 rows but env 0's episode starting at 0 has 3 stored steps"),
        ((1, 2, three), "has 3 rows but env 1's episode starting at 2 has 2 stored steps"),
        ((0, 0, _ids([[1], [N_GOALS], [-1]])), rf"outside \[-1, {N_GOALS}\).*max {N_GOALS}"),
        ((0, 0, _ids([[1], [-2], [-1]])), "min -2"),
        ((0, 0, torch.full((3, G + 1), -1)), f"width {G + 1} > max_achieved={G}"),
        ((0, 0, three.float()), "integer tensor"),
        ((0, 0, three[0]), "2-D"),
        ((2, 0, three), r"env 2 is outside \[0, n_envs=2\)"),
        ((0, -1, three), "start -1 < 0"),
    ]
    for args, message in refusals:
        with pytest.raises(ValueError, match=message):
            buf.set_achieved(*args)
        _assert_unchanged(buf, before)
    with pytest.raises(ValueError, match="env 5"):
        buf.episode_start(5)
    assert buf.set_achieved(0, 0, three) and buf.set_achieved(1, 2, _ids([[4], [4, 3]]))
    assert buf.achieved[:3, 0].tolist() == [[1, -1, -1], [-1, -1, -1], [2, 0, -1]]
    assert buf.ach_before[:3, 0].tolist() == [0, 1, 1] and buf.ach_step[:2, 0].tolist() == [0, 2]

    # Ring wrap-around: 6 rows per env. After adds 4-6 row 0 (env 0's episode [0, 3), env 1's [0, 2)) is
    # overwritten: both are gone (False, nothing changed); env 1's [2, 4) is intact until add 8 writes position 8.
    for P, ends in zip(range(4, 7), [[False, False], [True, False], [False, True]], strict=True):
        buf.add(_step(rng, 2, P, ends, torch.full((2, 1), -1)))
    assert buf.pos == 7 and buf.lo.tolist() == [3, 2]
    before = _snapshot(buf)
    assert not buf.set_achieved(0, 0, three)  # start < lo and < pos - C
    assert not buf.set_achieved(1, 0, _ids([[1], [1]]))
    _assert_unchanged(buf, before)
    assert buf.set_achieved(1, 2, _ids([[3], []]))
    buf.add(_step(rng, 2, 7, [False, False], torch.full((2, 1), -1)))
    buf.add(_step(rng, 2, 8, [False, False], torch.full((2, 1), -1)))  # overwrites position 2 (row 2)
    before = _snapshot(buf)
    assert not buf.set_achieved(1, 2, _ids([[3], []]))
    _assert_unchanged(buf, before)
    assert buf.set_achieved(0, 3, _ids([[1], [1], [4]]))  # env 0's [3, 6) is still intact


@pytest.mark.parametrize("native_mode", [pytest.param("on", marks=needs_native), "off"])
def test_rarity_marks_equal_add_when_no_count_moves(native_mode: str) -> None:
    """Where every goal is achieved once in the run, add's incremental counts are the final ones, so set_achieved's
    counts and marks (step limits, unknown limits, the earliest step among ties) must equal add's."""
    n_goals, N = 120, 2
    cfg = BufferConfig(capacity=30, n_step=1, gamma=0.9, device="cpu", max_obs_tokens=LO, max_goal_tokens=2,
                       max_cands=K, max_cand_tokens=LC, max_goals=128, max_achieved=G,
                       her=HERConfig("future", 1.0, rarity_draws=2, rare_fraction=0.3), native=native_mode)
    for seed in range(4):
        rng = random.Random(seed)
        a, b = (ReplayBuffer(cfg, N, pad_id=0, prompt=PIECES) for _ in range(2))
        for buf in (a, b):
            for g in range(N_GOALS):  # the goals of _step's stored goal ids, never achieved
                buf.register_goal([400 + g])
            for g in range(N_GOALS, n_goals):
                buf.register_goal([1000 + g], limit=random.Random(g).choice([0, 1, 2, 3, 5]))
        unused = list(range(N_GOALS, n_goals))
        rng.shuffle(unused)
        logs: list[list[torch.Tensor]] = [[] for _ in range(N)]
        starts = [0] * N
        for P in range(40):
            ends = [P == 39 or len(logs[e]) >= 9 or rng.random() < 0.15 for e in range(N)]
            achieved = torch.tensor([[unused.pop() if unused and hit and rng.random() < 0.5 else -1
                                      for _ in range(G)] for hit in (rng.random() < 0.4 for _ in range(N))])
            step = _step(rng, N, P, ends, achieved)
            a.add(step)
            b.add(TransitionBatch(**{**step.__dict__, "achieved": torch.full_like(achieved, -1)}))
            for e in range(N):
                logs[e].append(achieved[e])
                if ends[e]:
                    assert b.set_achieved(e, starts[e], torch.stack(logs[e]))
                    starts[e], logs[e] = P + 1, []
        assert unused and (a.rare_goal >= 0).sum() > 8
        assert_same_tables(a, b, [])
        assert_same_samples(a, b, seed)
