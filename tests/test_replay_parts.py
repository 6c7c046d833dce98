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


def test_options_import_without_torch() -> None:
    code = ("import sys; import sacglam.replay.config as c; c.BufferConfig(her={'ratio': 0.5}); "
            "assert 'torch' not in sys.modules and 'numpy' not in sys.modules, sorted(sys.modules)")
    subprocess.run([sys.executable, "-c", code], check=True)
