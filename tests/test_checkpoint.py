"""Tests of sacglam.checkpoint: atomic, verified, pruned checkpoints and exact RNG restore."""

from __future__ import annotations

import hashlib
import os
import random
import re
import signal
import socket
import subprocess
import sys
import textwrap
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from sacglam.checkpoint import (
    FORMAT_VERSION,
    HEADER_SIZE,
    CheckpointConfig,
    CheckpointError,
    capture_rng_state,
    checkpoint_path,
    find_latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    resolve_resume,
    restore_rng_state,
    save_checkpoint,
    verify_checkpoint,
)

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


def _assert_same(a: Any, b: Any, where: str = "state") -> None:
    """Recursive exact equality: same types, same keys, torch.equal tensors with the same dtype."""
    assert type(a) is type(b), f"{where}: {type(a).__name__} != {type(b).__name__}"
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape, where
        assert torch.equal(a, b), where
    elif isinstance(a, dict):
        assert list(a) == list(b), where
        for k in a:
            _assert_same(a[k], b[k], f"{where}[{k!r}]")
    elif isinstance(a, list | tuple):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def _nested_state() -> dict[str, Any]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Tanh(), torch.nn.Linear(3, 2))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(2):  # populate Adam's exp_avg / exp_avg_sq / step
        opt.zero_grad()
        model(torch.randn(5, 4)).pow(2).sum().backward()
        opt.step()
    g = torch.Generator().manual_seed(7)
    torch.rand(3, generator=g)
    return {
        "heads": model.state_dict(),
        "optim": opt.state_dict(),
        "log_alpha": torch.tensor(-1.25, dtype=torch.float64),
        "buffer": {
            "obs": torch.arange(24, dtype=torch.int32).reshape(2, 3, 4),
            "terminated": torch.tensor([True, False, True]),
            "half": torch.linspace(0, 1, 5, dtype=torch.bfloat16),
            "ptr": 17,
            "episodes": [(0, 3), (3, 9)],
        },
        "step": 123_456,
        "name": "sacglam/PlaygroundText-v0",
        "maybe": None,
        "generator": g.get_state(),
        "rng": capture_rng_state({"actor": g}),
    }


def test_round_trip_of_nested_state_is_exact(tmp_path: Path) -> None:
    state = _nested_state()
    path = save_checkpoint(tmp_path, 123_456, state, keep=3)
    assert path == tmp_path / "checkpoints" / "step_0000123456.pt"
    assert list(path.parent.iterdir()) == [path]  # no temp file left behind
    loaded = load_checkpoint(path, map_location="cpu")
    _assert_same(state, loaded)
    # The optimizer state is usable, not just equal: loading it into a fresh optimizer keeps Adam's step count.
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Tanh(), torch.nn.Linear(3, 2))
    model.load_state_dict(loaded["heads"])
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    opt.load_state_dict(loaded["optim"])
    assert float(opt.state_dict()["state"][0]["step"]) == 2.0


def test_header_records_version_size_and_sha256_of_payload(tmp_path: Path) -> None:
    # "big" (2 MiB) goes through the threaded hash path, "x" through the inline one.
    path = save_checkpoint(
        tmp_path, 5, {"x": torch.ones(10), "big": torch.arange(1 << 19, dtype=torch.float32)}, keep=0
    )
    raw = path.read_bytes()
    payload = raw[HEADER_SIZE:]
    assert HEADER_SIZE == 64
    assert raw[:8] == b"SACGLAMC"
    assert int.from_bytes(raw[8:12], "little") == FORMAT_VERSION
    assert int.from_bytes(raw[16:24], "little") == len(payload)
    assert raw[24:56] == hashlib.sha256(payload).digest()
    assert payload[:4] == b"PK\x03\x04"  # torch.save's zip archive starts right after the header


def test_keep_prunes_oldest_first(tmp_path: Path) -> None:
    for step in (10, 40, 20, 30):  # out of order on purpose: pruning goes by step, not by write time
        if step in (20, 30):
            with pytest.warns(UserWarning, match=r"newer than the one just saved .*\['step_0000000040.pt'\]"):
                save_checkpoint(tmp_path, step, {"step": step}, keep=0)
        else:
            save_checkpoint(tmp_path, step, {"step": step}, keep=0)
    assert [p.name for p in list_checkpoints(tmp_path)] == [f"step_{s:010d}.pt" for s in (10, 20, 30, 40)]
    with pytest.warns(UserWarning, match="newer than the one just saved"):
        save_checkpoint(tmp_path, 35, {"step": 35}, keep=2)
    # 35 was just written and is protected; the oldest (10, 20, 30) go, leaving 35 and the newer 40.
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_0000000035.pt", "step_0000000040.pt"]
    save_checkpoint(tmp_path, 50, {"step": 50}, keep=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_0000000040.pt", "step_0000000050.pt"]
    save_checkpoint(tmp_path, 60, {"step": 60}, keep=1)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_0000000060.pt"]
    assert load_checkpoint(checkpoint_path(tmp_path, 60))["step"] == 60


def _two_good(tmp_path: Path) -> Path:
    save_checkpoint(tmp_path, 100, {"step": 100, "w": torch.arange(1000.0)}, keep=0)
    return save_checkpoint(tmp_path, 200, {"step": 200, "w": torch.arange(1000.0) * 2}, keep=0)


def test_truncated_checkpoint_is_skipped_with_warning_and_refused_by_load(tmp_path: Path) -> None:
    good = _two_good(tmp_path)
    raw = good.read_bytes()
    bad = checkpoint_path(tmp_path, 300)
    bad.write_bytes(raw[: len(raw) // 2])  # first half of a real checkpoint, under a final name
    with pytest.warns(UserWarning, match=r"step_0000000300\.pt.*truncated"):
        latest = find_latest_checkpoint(tmp_path)
    assert latest == good
    assert load_checkpoint(latest)["step"] == 200
    with pytest.raises(CheckpointError, match=r"step_0000000300\.pt is truncated"):
        load_checkpoint(bad)


def test_corrupt_payload_and_missing_header_are_skipped(tmp_path: Path) -> None:
    good = _two_good(tmp_path)
    raw = bytearray(good.read_bytes())
    raw[len(raw) // 2] ^= 0xFF  # one flipped bit pattern mid-payload: same size, wrong hash
    corrupt = checkpoint_path(tmp_path, 300)
    corrupt.write_bytes(bytes(raw))
    headerless = checkpoint_path(tmp_path, 400)
    headerless.write_bytes(bytes(HEADER_SIZE) + bytes(raw[HEADER_SIZE:]))  # the placeholder never overwritten
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        latest = find_latest_checkpoint(tmp_path)
    messages = [str(w.message) for w in caught]
    assert latest == good
    assert len(messages) == 2
    assert "step_0000000400.pt" in messages[0] and "no sacglam header" in messages[0]
    assert "step_0000000300.pt" in messages[1] and "sha256" in messages[1]
    with pytest.raises(CheckpointError, match=r"step_0000000300\.pt is corrupt"):
        verify_checkpoint(corrupt)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nope.pt")


def test_file_damaged_after_a_verified_load_is_caught_again(tmp_path: Path) -> None:
    path = save_checkpoint(tmp_path, 7, {"w": torch.arange(100.0)}, keep=0)
    assert torch.equal(load_checkpoint(path)["w"], torch.arange(100.0))  # verified and cached
    raw = bytearray(path.read_bytes())
    raw[-100] ^= 0x01
    path.write_bytes(bytes(raw))  # a rewrite changes mtime, so the cached verification no longer applies
    with pytest.raises(CheckpointError, match=r"step_0000000007\.pt is corrupt"):
        load_checkpoint(path)


def test_partial_temp_file_is_skipped_with_warning(tmp_path: Path) -> None:
    good = _two_good(tmp_path)
    raw = good.read_bytes()
    tmp = good.parent / f".step_0000000300.pt.{os.getpid()}@{socket.gethostname()}.0123abcd.tmp"
    tmp.write_bytes(raw[: len(raw) // 2])
    with pytest.warns(UserWarning, match=re.escape(tmp.name) + ".*interrupted save"):
        assert find_latest_checkpoint(tmp_path) == good
    # A live process's temp (ours) survives the next save; one of a dead process on this host is removed.
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = good.parent / f".step_0000000400.pt.{int(dead.stdout)}@{socket.gethostname()}.0123abcd.tmp"
    stale.write_bytes(raw[:10])
    save_checkpoint(tmp_path, 500, {"step": 500}, keep=0)
    assert tmp.exists() and not stale.exists()


def test_failed_save_leaves_no_file(tmp_path: Path) -> None:
    save_checkpoint(tmp_path, 1, {"ok": 1}, keep=0)
    with pytest.raises(Exception, match="lambda"):
        save_checkpoint(tmp_path, 2, {"bad": lambda: 0}, keep=0)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_0000000001.pt"]


@dataclass
class _Opaque:
    value: int


def test_weights_only_refusal_names_file_and_fix(tmp_path: Path) -> None:
    path = save_checkpoint(tmp_path, 3, {"obj": _Opaque(4)}, keep=0)
    with pytest.raises(CheckpointError, match=r"step_0000000003\.pt holds objects that weights_only=True refuses"):
        load_checkpoint(path)
    assert load_checkpoint(path, weights_only=False)["obj"] == _Opaque(4)


def test_find_latest_and_resolve_resume(tmp_path: Path) -> None:
    assert find_latest_checkpoint(tmp_path) is None
    assert resolve_resume("auto", tmp_path) is None
    good = _two_good(tmp_path)
    first = checkpoint_path(tmp_path, 100)
    assert resolve_resume("never", tmp_path) is None
    assert resolve_resume(None, tmp_path) is None
    assert resolve_resume("auto", tmp_path) == good
    assert resolve_resume(str(first), tmp_path / "elsewhere") == first
    assert resolve_resume(str(tmp_path), tmp_path / "elsewhere") == good
    assert resolve_resume(str(tmp_path / "checkpoints"), tmp_path / "elsewhere") == good
    with pytest.raises(FileNotFoundError, match=r"missing\.pt"):
        resolve_resume(str(tmp_path / "missing.pt"), tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        resolve_resume(str(tmp_path / "empty"), tmp_path)


def test_config_validation() -> None:
    cfg = CheckpointConfig()
    assert (cfg.every, cfg.keep) == (10_000, 3)
    with pytest.raises(ValueError, match="every=-1"):
        CheckpointConfig(every=-1)
    with pytest.raises(ValueError, match="keep=-2"):
        CheckpointConfig(keep=-2)


def _draws(gens: dict[str, torch.Generator]) -> dict[str, Any]:
    return {
        "python": [random.random() for _ in range(5)] + [random.gauss(0, 1)],
        "numpy": [*np.random.rand(5).tolist(), float(np.random.randn())],
        "torch": torch.rand(5),
        **{name: torch.rand(5, generator=g, device=g.device).cpu() for name, g in gens.items()},
    }


def _generators() -> dict[str, torch.Generator]:
    gens = {"buffer": torch.Generator().manual_seed(1), "actor": torch.Generator().manual_seed(2)}
    if torch.cuda.is_available():
        gens["cuda"] = torch.Generator(device="cuda").manual_seed(3)
    return gens


def test_rng_restore_through_a_checkpoint_matches_uninterrupted_draws(tmp_path: Path) -> None:
    random.seed(11)
    np.random.seed(12)
    torch.manual_seed(13)
    gens = _generators()
    _draws(gens)  # advance every stream, and leave a cached gaussian in numpy and random
    random.gauss(0, 1)
    np.random.randn()
    path = save_checkpoint(tmp_path, 1, {"rng": capture_rng_state(gens)}, keep=0)
    uninterrupted = _draws(gens)

    # "A new process": every stream reseeded elsewhere, fresh generator objects.
    random.seed(99)
    np.random.seed(98)
    torch.manual_seed(97)
    resumed_gens = {name: torch.Generator(device=g.device).manual_seed(1234) for name, g in gens.items()}
    assert not torch.equal(_draws(resumed_gens)["torch"], uninterrupted["torch"])  # the check below can fail
    restore_rng_state(load_checkpoint(path)["rng"], resumed_gens)
    _assert_same(_draws(resumed_gens), uninterrupted)


def test_restore_unknown_generator_name_is_a_clear_error() -> None:
    state = capture_rng_state({"buffer": torch.Generator()})
    with pytest.raises(KeyError, match=r"\['actor'\] were not captured \(captured: \['buffer'\]\)"):
        restore_rng_state(state, {"actor": torch.Generator()})


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_tensors_and_global_cuda_rng_round_trip(tmp_path: Path) -> None:
    torch.cuda.manual_seed_all(5)
    q = torch.randn(4, 3, device="cuda")
    state = {"q": q, "rng": capture_rng_state()}
    expected = torch.rand(6, device="cuda")
    loaded = load_checkpoint(save_checkpoint(tmp_path, 1, state, keep=0), map_location="cuda")
    assert loaded["q"].is_cuda and torch.equal(loaded["q"], q)
    torch.cuda.manual_seed_all(6)
    restore_rng_state(loaded["rng"])
    assert torch.equal(torch.rand(6, device="cuda"), expected)


_KILL_CHILD = textwrap.dedent(
    """
    import sys
    import torch
    from sacglam.checkpoint import save_checkpoint

    big = torch.empty(8 << 20, dtype=torch.float32)  # 32 MiB, so a save spends real time writing
    for step in range(1, 10_000):
        big.fill_(step)
        print(f"begin {step}", flush=True)
        save_checkpoint(sys.argv[1], step, {"step": step, "big": big}, keep=2)
        print(f"done {step}", flush=True)
    """
)


def test_sigkill_during_save_leaves_a_complete_earlier_checkpoint(tmp_path: Path) -> None:
    script = tmp_path / "child.py"
    script.write_text(_KILL_CHILD)
    run_dir = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, str(script), str(run_dir)], stdout=subprocess.PIPE, text=True, env=env)
    assert proc.stdout is not None
    last_done = 0
    try:
        for line in proc.stdout:
            kind, step = line.split()
            if kind == "done":
                last_done = int(step)
            elif int(step) == 3:
                break  # save 3 has begun; two complete checkpoints (1, 2) are on disk
        assert last_done == 2
        # Kill as soon as save 3's temporary file exists, i.e. in the middle of writing it.
        deadline = time.monotonic() + 20
        while not any(p.name.endswith(".tmp") for p in (run_dir / "checkpoints").iterdir()):
            assert time.monotonic() < deadline, "child never started writing checkpoint 3"
            time.sleep(0.001)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=20)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL

    finals = list_checkpoints(run_dir)
    for p in finals:
        verify_checkpoint(p)  # atomic rename: a file under a final name is always complete
    temps = [p for p in (run_dir / "checkpoints").iterdir() if p.name.endswith(".tmp")]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        latest = find_latest_checkpoint(run_dir)
    assert [str(w.message).split(":")[0] for w in caught] == [f"Skipping {p}" for p in sorted(temps)]
    assert latest is not None
    state = load_checkpoint(latest)
    print(f"killed mid-save: {len(temps)} temp file(s) left, resumed from step {state['step']}")
    # Killed mid-save 3: the newest complete one is 2, or 3 if the rename won the race against the signal.
    assert state["step"] in (2, 3) and (state["step"] == 3) == (len(temps) == 0)
    assert torch.equal(state["big"], torch.full((8 << 20,), float(state["step"])))
    # The next save of a resumed run removes the dead process's temp file.
    save_checkpoint(run_dir, 3, {"step": 3}, keep=2)
    assert not any(p.name.endswith(".tmp") for p in (run_dir / "checkpoints").iterdir())
