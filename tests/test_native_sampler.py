"""The native CPU code (sacglam/replay/csrc/): its add leaves the torch path's storage, its sampler returns its batch.

Both buffers get the same adds (random episode layouts with wrap-around, achievements, terminations and truncations)
and the same generator seed. After every add every saved field and derived table must be equal. Integer and boolean
batch fields must be equal; float fields too, except the n-step return and discount for n > 1, where torch's float32
reduction order may differ from the C loop's by an ulp.
The rest of the suite (tests/test_buffer.py, test_her.py, test_rarity.py) runs on the native path as well, since it is
the default for CPU buffers; this file pins it against the torch path and tests its selection rules.
"""

from __future__ import annotations

import multiprocessing
import random
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sacglam.prompting import PromptPieces
from sacglam.replay import native
from sacglam.replay.buffer import BufferConfig, ReplayBuffer
from sacglam.replay.her import HERConfig
from sacglam.types import Batch, TransitionBatch

torch.set_num_threads(1)

pytestmark = pytest.mark.skipif(native.load() is None, reason=f"native sampler unavailable: {native.load_error()}")


def _pair(cfg: BufferConfig, n_envs: int, pieces: PromptPieces, pad: int) -> tuple[ReplayBuffer, ReplayBuffer]:
    fast = ReplayBuffer(BufferConfig(**{**cfg.__dict__, "native": "on"}), n_envs, pad_id=pad, prompt=pieces)
    slow = ReplayBuffer(BufferConfig(**{**cfg.__dict__, "native": "off"}), n_envs, pad_id=pad, prompt=pieces)
    assert fast._native is not None and slow._native is None
    assert fast._native_add is not None and slow._native_add is None
    return fast, slow


def _random_step(rng: random.Random, N: int, Lo: int, K: int, Lc: int, n_goals: int, G: int,  # noqa: N803
                 P: int, ends: list[bool], terms: list[bool]) -> TransitionBatch:  # noqa: N803 - shape letters
    # Input widths vary around the buffer's (narrower is padded; wider holds only padding past the lengths), and the
    # input dtypes too (the native add converts them as torch's copies do).
    Lo_in, K_in, Lc_in, G_in = (max(1, x + rng.choice([-1, 0, 0, 2])) for x in (Lo, K, Lc, G))
    K_in, G_in = min(K_in, K), min(G_in, G)  # more slots than the buffer has are a shape error
    ids_dtype = rng.choice([torch.int64, torch.int32])

    def ids(width: int, limit: int) -> tuple[torch.Tensor, torch.Tensor]:  # a length may pass a narrow input's end
        lens = torch.tensor([rng.randint(0, min(width + 1, limit)) for _ in range(N)])
        gen = torch.Generator().manual_seed(rng.randrange(2**31))
        return torch.randint(1, 3000, (N, width), generator=gen, dtype=ids_dtype), lens

    (obs, ol), (nobs, nol) = ids(Lo_in, Lo), ids(Lo_in, Lo)
    gen = torch.Generator().manual_seed(rng.randrange(2**31))
    cands, next_cands = (torch.randint(1, 3000, (N, K_in, Lc_in), generator=gen) for _ in range(2))
    cl = torch.tensor([[rng.randint(0, min(Lc, Lc_in + 1)) for _ in range(K_in)] for _ in range(N)])
    ncl = torch.tensor([[rng.randint(0, min(Lc, Lc_in + 1)) for _ in range(K_in)] for _ in range(N)])
    achieved = torch.tensor([[rng.choice([-1, -1, *range(n_goals)]) for _ in range(G_in)] for _ in range(N)])
    return TransitionBatch(
        obs=obs, obs_len=ol, next_obs=nobs, next_obs_len=nol, cands=cands, cand_len=cl, next_cands=next_cands,
        next_cand_len=ncl, goal=torch.tensor([rng.randrange(n_goals) for _ in range(N)]),
        action=torch.tensor([rng.randrange(K) for _ in range(N)]),
        reward=torch.tensor([rng.choice([0.0, 1.0, 0.25, 0.1]) for _ in range(N)], dtype=torch.float64),
        terminated=torch.tensor(terms),
        truncated=torch.tensor([e and not t for e, t in zip(ends, terms, strict=True)]),
        achieved=achieved, logp=torch.randn(N, generator=gen), policy_version=torch.full((N,), P),
    )


def assert_same_storage(fast: ReplayBuffer, slow: ReplayBuffer) -> None:
    """Every saved field, derived table and host counter of the two buffers is equal."""
    a, b = fast.state_dict(), slow.state_dict()
    assert a.keys() == b.keys()
    for name in a:
        if isinstance(a[name], torch.Tensor):
            assert a[name].dtype == b[name].dtype and torch.equal(a[name], b[name]), name
        else:
            assert a[name] == b[name], name
    for name in ("_tok", "_rows", "_ranks", "_eps"):
        assert torch.equal(getattr(fast, name), getattr(slow, name)), name
    assert (fast.pos, fast.num_sampleable, len(fast)) == (slow.pos, slow.num_sampleable, len(slow))


def assert_same_batch(fast: Batch, slow: Batch, n_step: int) -> None:
    for name in Batch.__dataclass_fields__:
        a, b = getattr(fast, name), getattr(slow, name)
        assert a.dtype == b.dtype and a.shape == b.shape, (name, a.dtype, b.dtype, a.shape, b.shape)
        if n_step > 1 and name in ("reward", "discount"):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7, msg=name)
        else:
            assert torch.equal(a, b), name


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.integers(0, 2**16),
    n_envs=st.integers(1, 4),
    rows=st.integers(3, 9),
    n_step=st.integers(1, 4),
    strategy=st.sampled_from(["future", "final", "episode"]),
    ratio=st.sampled_from([0.0, 0.5, 1.0]),
    rarity_draws=st.sampled_from([1, 3]),
    rare_fraction=st.sampled_from([0.0, 0.25]),
    token_dtype=st.sampled_from(["int16", "int32"]),
    cand_tokens=st.sampled_from([1, 3, 8, 12]),
    batch=st.sampled_from([1, 7, 64]),
)
def test_native_equals_torch_on_random_layouts(seed: int, n_envs: int, rows: int, n_step: int, strategy: str,
                                               ratio: float, rarity_draws: int, rare_fraction: float,
                                               token_dtype: str, cand_tokens: int, batch: int) -> None:
    rng = random.Random(seed)
    N, Lo, Lg, K, G, n_goals = n_envs, 5, 3, 3, 2, 5
    pieces = PromptPieces(torch.tensor([7, 5][: rng.randint(0, 2)]), torch.tensor([6] * rng.randint(0, 2)),
                          torch.tensor([9, 8][: rng.randint(0, 2)]), pad_id=rng.randint(0, 1))
    cfg = BufferConfig(capacity=rows * N, n_step=n_step, gamma=0.9, device="cpu", max_obs_tokens=Lo,
                       max_goal_tokens=Lg, max_cands=K, max_cand_tokens=cand_tokens, max_goals=8, max_achieved=G,
                       token_dtype=token_dtype, her=HERConfig(strategy, ratio, rarity_draws, rare_fraction))
    fast, slow = _pair(cfg, N, pieces, pieces.pad_id)
    for g in range(n_goals):
        toks = [300 + g] * (g % Lg + 1)
        assert fast.register_goal(toks, limit=g) == slow.register_goal(toks, limit=g) == g
    t_ep = [0] * N
    for P in range(rng.randint(rows, 4 * rows)):
        ends, terms = [], []
        for e in range(N):
            t_ep[e] += 1
            end = t_ep[e] >= rows - 1 or rng.random() < 0.25
            ends.append(end)
            terms.append(end and rng.random() < 0.5)
            t_ep[e] = 0 if end else t_ep[e]
        step = _random_step(rng, N, Lo, K, cand_tokens, n_goals, G, P, ends, terms)
        fast.add(step)
        slow.add(step)
        assert_same_storage(fast, slow)
        if fast.num_sampleable and rng.random() < 0.3:  # sample between adds too (the window is refreshed lazily)
            assert_same_batch(fast.sample(batch, torch.Generator().manual_seed(P)),
                              slow.sample(batch, torch.Generator().manual_seed(P)), n_step)
    if fast.num_sampleable:
        for s in range(3):
            assert_same_batch(fast.sample(batch, torch.Generator().manual_seed(seed + s)),
                              slow.sample(batch, torch.Generator().manual_seed(seed + s)), n_step)


def test_native_after_load_state_dict_equals_torch() -> None:
    """A native buffer restored from a torch buffer's state samples what the torch buffer samples."""
    rng = random.Random(3)
    cfg = BufferConfig(capacity=24, n_step=2, gamma=0.9, device="cpu", max_obs_tokens=4, max_goal_tokens=2,
                       max_cands=2, max_cand_tokens=2, max_goals=4, max_achieved=2, her=HERConfig("future", 0.8, 2))
    pieces = PromptPieces(torch.tensor([7]), torch.tensor([6]), torch.tensor([9]), pad_id=0)
    fast, slow = _pair(cfg, 2, pieces, 0)
    for g in range(3):
        fast.register_goal([300 + g])
        slow.register_goal([300 + g])
    for P in range(30):
        ends = [P % 5 == 4, P % 4 == 3]
        slow.add(_random_step(rng, 2, 4, 2, 2, 3, 2, P, ends, [ends[0], False]))
    fast.load_state_dict(slow.state_dict())
    gen = [torch.Generator().manual_seed(1) for _ in range(2)]
    assert_same_batch(fast.sample(32, gen[0]), slow.sample(32, gen[1]), 2)


@pytest.mark.parametrize("threads", [2, 3])
def test_threads_split_the_batch_without_changing_it(threads: int) -> None:
    """The C sampler splits batches of >= 64 transitions per thread over torch's intra-op thread count."""
    rng = random.Random(5)
    cfg = BufferConfig(capacity=64, n_step=3, gamma=0.9, device="cpu", max_obs_tokens=4, max_goal_tokens=2,
                       max_cands=2, max_cand_tokens=3, max_goals=4, max_achieved=2,
                       her=HERConfig("future", 0.8, 2, 0.25))
    pieces = PromptPieces(torch.tensor([7]), torch.tensor([6]), torch.tensor([9]), pad_id=0)
    fast, slow = _pair(cfg, 2, pieces, 0)
    for g in range(3):
        fast.register_goal([300 + g], limit=3)
        slow.register_goal([300 + g], limit=3)
    for P in range(50):
        ends = [P % 5 == 4, P % 7 == 6]
        step = _random_step(rng, 2, 4, 2, 3, 3, 2, P, ends, [ends[0], False])
        fast.add(step)
        slow.add(step)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for batch in (63, 128, 200, 1000):
            gen = [torch.Generator().manual_seed(batch) for _ in range(2)]
            assert_same_batch(fast.sample(batch, gen[0]), slow.sample(batch, gen[1]), 3)
        # Back-to-back calls reuse the worker pool (workers still spinning from the last job, or asleep).
        gen = [torch.Generator().manual_seed(7) for _ in range(2)]
        for i in range(200):
            torch.set_num_threads(threads if i % 3 else 2)
            assert_same_batch(fast.sample(256, gen[0]), slow.sample(256, gen[1]), 3)
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("top", [2**15 - 1, 2**31 - 1])
def test_batch_token_ids_are_int32_whatever_the_storage(top: int) -> None:
    """Every sampler returns token ids as int32 (``BATCH_ID_DTYPE``) holding the stored ids: int16, int32 and int64
    storage, native and torch samplers, give one batch for one seed, up to the largest id the storage holds."""
    rng = random.Random(11)
    cfg = BufferConfig(capacity=40, n_step=2, gamma=0.9, device="cpu", max_obs_tokens=4, max_goal_tokens=2,
                       max_cands=2, max_cand_tokens=3, max_goals=4, max_achieved=2, her=HERConfig("future", 0.8))
    pieces = PromptPieces(torch.tensor([top - 1]), torch.tensor([6]), torch.tensor([top - 2]), pad_id=0)
    dtypes = ["int16", "int32", "int64"] if top < 2**15 else ["int32", "int64"]
    bufs = [ReplayBuffer(BufferConfig(**{**cfg.__dict__, "token_dtype": dt, "native": nat}), 2, pad_id=0,
                         prompt=pieces)
            for dt in dtypes for nat in (["on", "off"] if dt != "int64" else ["off"])]
    for buf in bufs:
        for g in range(3):
            buf.register_goal([top - 3 - g], limit=3)
    for P in range(30):
        ends = [P % 5 == 4, P % 7 == 6]
        step = _random_step(rng, 2, 4, 2, 3, 3, 2, P, ends, [ends[0], False])
        step.obs[:, 0], step.next_obs[:, 0], step.cands[:, 0, 0], step.next_cands[:, 0, 0] = top, top, top, top
        for buf in bufs:
            buf.add(step)
    batches = [buf.sample(64, torch.Generator().manual_seed(4)) for buf in bufs]
    for b in batches:
        for name in ("prompt_ids", "cand_ids", "next_prompt_ids", "next_cand_ids"):
            assert getattr(b, name).dtype == torch.int32, name
        assert_same_batch(b, batches[0], 2)
    ids = torch.cat([batches[0].prompt_ids.flatten(), batches[0].cand_ids.flatten()])
    assert int(ids.max()) == top and {top - 1, top - 2} <= set(ids.tolist())


def _sample_in_child(buf: ReplayBuffer, out: Any) -> None:
    torch.set_num_threads(2)
    out.put(buf.sample(256, torch.Generator().manual_seed(3)).prompt_ids.sum().item())


def test_a_forked_child_samples_with_its_own_pool() -> None:
    """The parent's workers are not copied by fork(): a child splitting a batch starts its own instead of hanging."""
    rng = random.Random(2)
    cfg = BufferConfig(capacity=64, device="cpu", max_obs_tokens=4, max_goal_tokens=2, max_cands=2,
                       max_cand_tokens=3, max_goals=4, max_achieved=2, her=HERConfig("future", 0.5))
    buf = ReplayBuffer(cfg, 2, pad_id=0, prompt=PromptPieces(torch.tensor([7]), torch.tensor([6]), torch.tensor([9]),
                                                             pad_id=0))
    buf.register_goal([300], limit=3)
    for P in range(20):
        buf.add(_random_step(rng, 2, 4, 2, 3, 1, 2, P, [P % 5 == 4, P % 5 == 4], [False, False]))
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        want = buf.sample(256, torch.Generator().manual_seed(3)).prompt_ids.sum().item()  # the pool now runs
        ctx = multiprocessing.get_context("fork")
        out = ctx.Queue()
        child = ctx.Process(target=_sample_in_child, args=(buf, out))
        child.start()
        child.join(timeout=60)
        alive = child.is_alive()
        if alive:
            child.kill()
        assert not alive, "the forked child hung sampling with 2 threads"
        assert child.exitcode == 0 and out.get(timeout=5) == want
    finally:
        torch.set_num_threads(before)


def test_selection_rules() -> None:
    """auto picks the native code on CPU; off never does; on refuses what it cannot do, saying why."""
    pieces = PromptPieces(torch.tensor([7]), torch.tensor([6]), torch.tensor([9]), pad_id=0)
    base = dict(capacity=8, device="cpu", max_obs_tokens=2, max_goal_tokens=2, max_cands=2, max_cand_tokens=2,
                max_goals=4, max_achieved=1)
    assert ReplayBuffer(BufferConfig(**base), 2, pad_id=0, prompt=pieces)._native is not None
    assert ReplayBuffer(BufferConfig(**base, native="off"), 2, pad_id=0, prompt=pieces)._native is None
    with pytest.raises(ValueError, match="token_dtype='int64'"):
        ReplayBuffer(BufferConfig(**base, native="on", token_dtype="int64"), 2, pad_id=0, prompt=pieces)
    with pytest.raises(ValueError, match="custom reward_fn"):
        ReplayBuffer(BufferConfig(**base, native="on"), 2, pad_id=0, prompt=pieces,
                     reward_fn=lambda a, g: ((a == g.unsqueeze(-1)).any(-1).float(), (a == g.unsqueeze(-1)).any(-1)))
    wide = ReplayBuffer(BufferConfig(**base, token_dtype="int64"), 2, pad_id=0, prompt=pieces)
    assert wide._native is None and wide._native_add is None
    def hit(a: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return (a == g.unsqueeze(-1)).any(-1).float(), (a == g.unsqueeze(-1)).any(-1)

    custom = ReplayBuffer(BufferConfig(**base), 2, pad_id=0, prompt=pieces, reward_fn=hit)
    assert custom._native is None and custom._native_add is not None  # adding does not need the reward
    with pytest.raises(ValueError, match="native must be one of"):
        BufferConfig(**base, native="yes")


def test_build_is_cached_and_atomic(tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """A fresh cache folder gets one library; a second build reuses it; a failing compiler says what failed."""
    monkeypatch.setenv("SACGLAM_CACHE", str(tmp_path))
    lib = native.build()
    assert lib.exists() and lib.is_relative_to(tmp_path)
    mtime = lib.stat().st_mtime_ns
    assert native.build() == lib and lib.stat().st_mtime_ns == mtime
    assert [p.name for p in lib.parent.iterdir()] == [lib.name]  # no temporary left behind
    monkeypatch.setenv("CC", "false")  # a "compiler" that always fails
    with pytest.raises(RuntimeError, match="failed"):
        native.build(force=True)
    assert lib.exists()  # the good build is untouched
