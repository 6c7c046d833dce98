"""The replay buffer's parts driven without the facade: the torch and the native writer give the same storage, the
torch and the native sampler the same batch from the same draws (into a new batch and into ``out=``), through one
writer/sampler interface; and the options module imports without torch."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from sacglam.prompting import PromptAssembler, PromptPieces
from sacglam.replay import native
from sacglam.replay.config import BufferConfig, HERConfig
from sacglam.replay.goals import GoalTable
from sacglam.replay.her import equality_reward
from sacglam.replay.native import NativeSampler, NativeWriter
from sacglam.replay.sampler import BatchLayout, Draws, SamplingWindow, TorchSampler
from sacglam.replay.storage import ReplayStorage
from sacglam.replay.writer import TorchWriter, check_shapes
from sacglam.types import Batch, TransitionBatch

PIECES = PromptPieces(torch.tensor([2, 5]), torch.tensor([6]), torch.tensor([9]), pad_id=0)
CFG = BufferConfig(capacity=24, n_step=2, gamma=0.5, device="cpu", max_obs_tokens=3, max_goal_tokens=2, max_cands=2,
                   max_cand_tokens=2, max_goals=4, max_achieved=2, her=HERConfig("future", 0.7, 2, 0.25))


def _parts(use_native: bool) -> tuple[ReplayStorage, TorchWriter | NativeWriter, TorchSampler | NativeSampler]:
    """Storage, writer and sampler wired as the facade wires them (native: the C implementations)."""
    dev = torch.device("cpu")
    store = ReplayStorage(CFG, 3, 0, dev)
    asm = PromptAssembler(PIECES, CFG.max_goal_tokens, CFG.max_obs_tokens, dev)
    lib = native.load() if use_native else None
    goals = GoalTable(CFG, store.alloc, pad_id=0, token_max=store.token_max, asm=asm, head_dtype=store.token_dtype,
                      wide_heads=lib is not None)
    window = SamplingWindow(CFG, store, goals)
    writer = TorchWriter(CFG, store, goals) if lib is None else NativeWriter(CFG, store, goals, lib)
    torch_sampler = TorchSampler(CFG, store, goals, window, asm, store.token_dtype, equality_reward)
    sampler = torch_sampler if lib is None else NativeSampler(
        CFG, store, goals, window, asm, PIECES, BatchLayout(CFG, asm.prompt_width, dev), lib)
    goals.set_heads(slice(None))
    for g in range(3):
        goals.register([100 + g] * (1 + g % 2), limit=g)
    for part in (torch_sampler, sampler, writer):
        part.bind()
    return store, writer, sampler


def _step(pos: int) -> TransitionBatch:
    gen = torch.Generator().manual_seed(pos)
    N = 3
    ends = torch.tensor([pos % 3 == 2, pos % 4 == 3, pos % 5 == 4])
    return TransitionBatch(
        obs=torch.randint(1, 999, (N, 3), generator=gen), obs_len=torch.randint(0, 4, (N,), generator=gen),
        next_obs=torch.randint(1, 999, (N, 3), generator=gen), next_obs_len=torch.randint(0, 4, (N,), generator=gen),
        cands=torch.randint(1, 999, (N, 2, 2), generator=gen), cand_len=torch.randint(0, 3, (N, 2), generator=gen),
        next_cands=torch.randint(1, 999, (N, 2, 2), generator=gen),
        next_cand_len=torch.randint(0, 3, (N, 2), generator=gen), goal=torch.randint(0, 3, (N,), generator=gen),
        action=torch.randint(0, 2, (N,), generator=gen), reward=torch.rand(N, generator=gen),
        terminated=ends & (torch.arange(N) == 0), truncated=ends & (torch.arange(N) > 0),
        achieved=torch.randint(-1, 3, (N, 2), generator=gen), logp=torch.randn(N, generator=gen),
        policy_version=torch.full((N,), pos))


@pytest.mark.skipif(native.load() is None, reason=f"native code unavailable: {native.load_error()}")
def test_torch_and_native_parts_agree_through_one_interface() -> None:
    parts = [_parts(False), _parts(True)]
    draws = Draws(CFG, torch.device("cpu"))
    outs: list[Batch | None] = [None, None]
    for P in range(30):
        for _, writer, _ in parts:
            check_shapes(_step(P), CFG, 3)
            writer.add(_step(P))
        for name in ("tok", "rows", "ranks", "eps", "rare_goal", "cur_start", "lo"):
            assert torch.equal(getattr(parts[0][0], name), getattr(parts[1][0], name)), (P, name)
        assert parts[0][0].n_sampleable == parts[1][0].n_sampleable
        if parts[0][0].n_sampleable == 0:
            continue
        d, rare_u = draws.draw(16, torch.Generator().manual_seed(P))
        batches = []
        for i, (_, _, sampler) in enumerate(parts):
            sampler.window.refresh()
            sampler.window_changed()
            batches.append(sampler.sample(d, rare_u, outs[i] if P % 2 else None))
        outs = list(batches)
        for name in Batch.__dataclass_fields__:
            a, b = getattr(batches[0], name), getattr(batches[1], name)
            if name in ("reward", "discount"):  # n_step > 1: float32 sums in another order
                torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
            else:
                assert torch.equal(a, b), (P, name)


NEEDS_NATIVE = pytest.mark.skipif(native.load() is None, reason=f"native code unavailable: {native.load_error()}")
STORED = ("tok", "rows", "ranks", "eps", "rare_goal", "cur_start", "cur_k", "cur_step", "cur_ach", "lo",
          "obs_len", "next_obs_len", "terminated", "truncated", "episode", "policy_version", "reward", "logp")


def _other_dtypes(t: TransitionBatch) -> TransitionBatch:
    """``t`` with every field the native add reads in place given otherwise: int32 ids and lengths, a non-contiguous
    observation, uint8 flags, float64 reward and logp (each then converted before the C call)."""
    i32 = {name: getattr(t, name).to(torch.int32) for name in (
        "obs_len", "next_obs", "next_obs_len", "cands", "cand_len", "next_cands", "next_cand_len", "goal", "action",
        "achieved", "policy_version")}
    obs = torch.stack([t.obs, t.obs], -1)[..., 0]  # the same values, strided
    assert not obs.is_contiguous()
    return TransitionBatch(**{**t.__dict__, **i32, "obs": obs, "terminated": t.terminated.to(torch.uint8),
                              "truncated": t.truncated.to(torch.uint8), "reward": t.reward.double(),
                              "logp": t.logp.double()})


@NEEDS_NATIVE
def test_native_add_reads_inputs_in_place_or_converted_alike() -> None:
    """The native add passes canonical CPU inputs (int64, float32, bool) to C as they are and converts the others:
    both give the storage of the torch writer."""
    ref, direct, converted = _parts(False), _parts(True), _parts(True)
    for P in range(30):
        ref[1].add(_step(P))
        direct[1].add(_step(P))
        converted[1].add(_other_dtypes(_step(P)))
        for name in STORED:
            want = getattr(ref[0], name)
            assert torch.equal(getattr(direct[0], name), want), (P, name)
            assert torch.equal(getattr(converted[0], name), want), (P, name)
        assert direct[0].n_sampleable == converted[0].n_sampleable == ref[0].n_sampleable


@NEEDS_NATIVE
def test_native_add_follows_bookkeeping_tensors_replaced_between_adds() -> None:
    """The native writer points at the [N] bookkeeping tensors once and again only when the storage holds other
    ones: here the torch writer, which replaces them at each add, alternates with it on one storage."""
    ref = _parts(False)
    store, native_writer, _ = _parts(True)
    torch_writer = TorchWriter(CFG, store, native_writer.goals)
    for P in range(30):
        ref[1].add(_step(P))
        (torch_writer if P % 3 == 1 else native_writer).add(_step(P))
        for name in STORED:
            assert torch.equal(getattr(store, name), getattr(ref[0], name)), (P, name)


@NEEDS_NATIVE
def test_native_sample_writes_into_the_out_batch_it_is_given() -> None:
    """The native sampler sets its output pointers only when ``out`` holds other tensors than at the last call:
    sampling into A, then B, then A again writes each batch in turn (and B keeps its batch)."""
    _, writer, sampler = _parts(True)
    for P in range(30):
        writer.add(_step(P))
    sampler.window.refresh()
    sampler.window_changed()
    draws = Draws(CFG, torch.device("cpu"))
    gen = torch.Generator().manual_seed(0)
    a = sampler.sample(*draws.draw(8, gen), None)
    b = sampler.sample(*draws.draw(8, gen), None)
    b_before = {name: getattr(b, name).clone() for name in Batch.__dataclass_fields__}
    d, rare_u = draws.draw(8, gen)
    want = sampler.sample(d, rare_u, None)
    assert sampler.sample(d, rare_u, a) is a
    for name in Batch.__dataclass_fields__:
        assert torch.equal(getattr(a, name), getattr(want, name)), name
        assert torch.equal(getattr(b, name), b_before[name]), name
    a.prompt_ids = a.prompt_ids.clone()  # one field replaced: written through its new tensor
    d, rare_u = draws.draw(8, gen)
    want = sampler.sample(d, rare_u, None)
    sampler.sample(d, rare_u, a)
    assert torch.equal(a.prompt_ids, want.prompt_ids)


def test_draws_are_torch_rand_of_the_generator() -> None:
    """``Draws.draw`` fills its reused tensor with exactly the numbers ``torch.rand`` draws from the same generator
    state, and leaves the generator where ``torch.rand`` does (the draw order resumed runs depend on)."""
    draws = Draws(CFG, torch.device("cpu"))
    gen, ref = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    for B in (5, 16, 5):
        d, rare_u = draws.draw(B, gen)
        assert torch.equal(d, torch.rand(B, 3 + CFG.her.rarity_draws, generator=ref, dtype=torch.float64))
        assert rare_u is not None
        assert torch.equal(rare_u, torch.rand(round(B * 0.25), generator=ref, dtype=torch.float64))
    assert torch.equal(gen.get_state(), ref.get_state())


def test_options_import_without_torch() -> None:
    code = ("import sys; import sacglam.replay.config as c; c.BufferConfig(her={'ratio': 0.5}); "
            "assert 'torch' not in sys.modules and 'numpy' not in sys.modules, sorted(sys.modules)")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_storage_that_does_not_fit_names_the_capacity(monkeypatch: pytest.MonkeyPatch) -> None:
    """An allocation failure (a huge buffer.capacity) is an error naming the option, not torch's bare one."""
    import sacglam.replay.storage as storage_module

    def no_memory(*shape: int, dtype: torch.dtype) -> torch.Tensor:
        raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 800000000000 bytes.")

    monkeypatch.setattr(storage_module.torch, "empty", no_memory)
    cfg = BufferConfig(capacity=10**9, max_obs_tokens=8, max_cands=2, max_cand_tokens=2)
    with pytest.raises(ValueError, match=r"^buffer\.capacity=1000000000 does not fit: .* \(DefaultCPUAllocator: "
                                         r"can't allocate memory.*lower buffer\.capacity"):
        ReplayStorage(cfg, n_envs=4, pad_id=0, device=torch.device("cpu"))
