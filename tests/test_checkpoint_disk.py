"""A full disk: a checkpoint save that fails at any write call leaves the previous checkpoint intact and no partial
file, and names the path and the free space; the run stops or goes on (``checkpoint.on_error``); the metrics file is
never left with a torn line.

No real small filesystem (that needs root): ENOSPC is injected at each write call of a save in turn -- the temporary
file's writes, its fsync, the rename, the folder's open and fsync, the pruning's unlinks -- until the save succeeds.
"""

from __future__ import annotations

import errno
import json
import os
import pathlib
import warnings
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

import sacglam.checkpoint as ckpt
from sacglam.checkpoint import (
    CheckpointWriteError,
    find_latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    save_checkpoint,
)
from sacglam.config import CheckpointConfig, LoggerConfig, SACConfig, TrainConfig
from sacglam.logging import LineFile, RunLogger, read_metrics
from sacglam.run.harness import RunContext

QUIET = LoggerConfig(wandb_mode="disabled", progress=False)


def _state(step: int) -> dict[str, Any]:
    """A state with a 2 MiB tensor (written and hashed on the helper thread) and small ones (hashed inline)."""
    return {"step": step, "big": torch.full((512, 1024), float(step)), "small": torch.arange(10) + step,
            "nested": {"x": [torch.ones(3) * step, "text"]}}


class _Injector:
    """Raises ENOSPC at the ``fail_at``-th write call of a save (1-based, counted over every kind), once."""

    def __init__(self, fail_at: int) -> None:
        self.fail_at, self.calls, self.failed = fail_at, 0, ""
        self.kinds: list[str] = []

    def hit(self, kind: str) -> None:
        self.calls += 1
        self.kinds.append(kind)
        if self.calls == self.fail_at:
            self.failed = kind
            raise OSError(errno.ENOSPC, "No space left on device")

    def wrap(self, kind: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def wrapped(*args: Any, **kwargs: Any) -> Any:
            self.hit(kind)
            return fn(*args, **kwargs)

        return wrapped


class _File:
    """The temporary file of a save, with every write and flush counted (and possibly failed)."""

    def __init__(self, f: Any, injector: _Injector) -> None:
        self._f, self._inj = f, injector

    def write(self, data: Any) -> int:
        self._inj.hit("file.write")
        return int(self._f.write(data))

    def flush(self) -> None:
        self._inj.hit("file.flush")
        self._f.flush()

    def seek(self, pos: int) -> int:
        return int(self._f.seek(pos))

    def fileno(self) -> int:
        return int(self._f.fileno())

    def __enter__(self) -> _File:
        return self

    def __exit__(self, *exc: object) -> None:
        self._f.close()


def _inject(monkeypatch: pytest.MonkeyPatch, injector: _Injector) -> None:
    real_open = open
    monkeypatch.setattr(ckpt, "open", lambda *a, **k: _File(real_open(*a, **k), injector), raising=False)
    monkeypatch.setattr(os, "fsync", injector.wrap("os.fsync", os.fsync))
    monkeypatch.setattr(os, "replace", injector.wrap("os.replace", os.replace))
    monkeypatch.setattr(os, "open", injector.wrap("os.open", os.open))
    monkeypatch.setattr(pathlib.Path, "unlink", injector.wrap("Path.unlink", pathlib.Path.unlink))


def _temps(run_dir: Path) -> list[str]:
    return sorted(p.name for p in (run_dir / "checkpoints").iterdir() if p.name.endswith(".tmp"))


@pytest.mark.parametrize("keep", [1, 0])
def test_enospc_at_each_write_call_leaves_the_previous_checkpoint(
    keep: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    failed_kinds: Counter[str] = Counter()
    fail_at = 0
    while True:
        fail_at += 1
        assert fail_at < 500, "the save never succeeded"
        run_dir = tmp_path / f"k{fail_at}"
        previous = save_checkpoint(run_dir, 100, _state(100), keep=keep)
        injector = _Injector(fail_at)
        with monkeypatch.context() as m:
            _inject(m, injector)
            try:
                new = save_checkpoint(run_dir, 200, _state(200), keep=keep)
            except CheckpointWriteError as exc:
                error: CheckpointWriteError | None = exc
            else:
                error = None
        if error is None:  # every write call has failed once: the next index is past the last one
            assert injector.calls == fail_at - 1 and load_checkpoint(new)["step"] == 200
            break
        failed_kinds[injector.failed] += 1
        final = run_dir / "checkpoints" / "step_0000000200.pt"
        message = str(error)
        assert str(final) in message and "No space left on device" in message and "MiB free" in message
        assert error.path == final and error.free_bytes is not None and error.free_bytes > 0
        assert _temps(run_dir) == [], f"failure at call {fail_at} ({injector.failed}) left {_temps(run_dir)}"
        latest = find_latest_checkpoint(run_dir)
        if error.written:  # the rename happened: the new file is complete; what is left of the old one loads too
            assert injector.kinds.index("os.replace") < fail_at - 1 and latest == final
            assert load_checkpoint(final)["step"] == 200
        else:
            assert latest == previous and list_checkpoints(run_dir) == [previous], injector.failed
            assert f"the newest checkpoint left is {previous}" in message
        if previous.exists():
            state = load_checkpoint(previous)
            assert state["step"] == 100 and torch.equal(state["big"], _state(100)["big"])
    # Every kind of write call was failed at least once (keep=1 also prunes the old file: one unlink more).
    kinds = {"file.write", "file.flush", "os.fsync", "os.replace", "os.open"} | ({"Path.unlink"} if keep else set())
    assert kinds <= set(failed_kinds), failed_kinds
    assert failed_kinds["file.write"] > 3, "torch.save's own writes (the payload) were not all tried"


def test_a_failed_write_inside_torch_save_is_reported_as_itself(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """torch.save turns an exception of the file's write into "unexpected pos"; the error names the OS error."""
    save_checkpoint(tmp_path, 1, _state(1), keep=0)
    with monkeypatch.context() as m:
        _inject(m, _Injector(3))  # the 1st write is the header placeholder, the 2nd and 3rd torch.save's
        match = r"Could not write checkpoint .*step_0000000002\.pt: \[Errno 28\] No space"
        with pytest.raises(CheckpointWriteError, match=match):
            save_checkpoint(tmp_path, 2, _state(2), keep=0)


# --------------------------------------------------------------------------------------------- the run's choice


def _context(tmp_path: Path, on_error: str) -> RunContext:
    cfg = TrainConfig(algo=SACConfig(), checkpoint=CheckpointConfig(every=10, keep=2, on_error=on_error))
    return RunContext(cfg, {}, tmp_path, torch.device("cpu"))


@pytest.mark.parametrize("on_error", ["stop", "continue"])
def test_on_error_stops_or_goes_on(on_error: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ctx = _context(tmp_path, on_error)
    first = ctx.save(10, {"x": torch.ones(2)})
    assert first is not None
    with monkeypatch.context() as m:
        m.setattr(os, "replace", _Injector(1).wrap("os.replace", os.replace))
        if on_error == "stop":
            with pytest.raises(CheckpointWriteError, match=r"step_0000000020\.pt.*MiB free.*on_error=continue"):
                ctx.save(20, {"x": torch.ones(2)})
        else:
            with pytest.warns(UserWarning, match=r"checkpoint of env step 20 failed, training goes on.*step_0+20\.pt"):
                assert ctx.save(20, {"x": torch.ones(2)}) is None
    assert find_latest_checkpoint(tmp_path) == first and _temps(tmp_path) == []
    assert ctx.save(30, {"x": torch.ones(2)}) is not None  # space is back: the next one is written


def test_on_error_option_is_checked() -> None:
    with pytest.raises(ValueError, match=r"checkpoint\.on_error='ignore'.*'stop', 'continue'"):
        CheckpointConfig(on_error="ignore")


# ------------------------------------------------------------------------------------------------ metrics file


class _ShortThenFull:
    """``os.write`` that writes ``part`` bytes of the ``at``-th call, then fails the next call with ENOSPC."""

    def __init__(self, at: int, part: int) -> None:
        self.at, self.part, self.calls, self.real = at, part, 0, os.write

    def __call__(self, fd: int, data: Any) -> int:
        self.calls += 1
        if self.calls == self.at:
            return self.real(fd, bytes(data)[: self.part])
        if self.calls == self.at + 1:
            raise OSError(errno.ENOSPC, "No space left on device")
        return self.real(fd, data)


def test_metrics_line_failing_mid_write_leaves_no_torn_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    log = RunLogger(tmp_path, QUIET, {})
    log.log(1, {"charts/success": 0.5})
    log.log(2, {"charts/success": 0.25})
    before = (tmp_path / "metrics.jsonl").read_bytes()
    with monkeypatch.context() as m:
        m.setattr(os, "write", _ShortThenFull(at=1, part=7))  # 7 bytes of the 3rd line reach the file, then ENOSPC
        with pytest.raises(OSError, match=r"could not append a line to .*metrics\.jsonl.*MiB free.*partial line was "
                                          r"removed") as info:
            log.log(3, {"charts/success": 0.75})
    assert info.value.errno == errno.ENOSPC
    assert (tmp_path / "metrics.jsonl").read_bytes() == before and log.lines == 2
    log.log(4, {"charts/success": 1.0})  # space is back: the file goes on whole
    log.close()
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [1, 2, 4]


def test_line_file_writes_the_rest_of_a_short_write(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``os.write`` may write part of a line without an error; the rest follows in the next call."""
    f = LineFile(tmp_path / "m.jsonl")
    real = os.write
    sizes: list[int] = []

    def short(fd: int, data: Any) -> int:
        sizes.append(len(data))
        return real(fd, bytes(data)[:3])

    with monkeypatch.context() as m:
        m.setattr(os, "write", short)
        f.write_line('{"step": 1}\n')
    f.close()
    assert (tmp_path / "m.jsonl").read_text() == '{"step": 1}\n' and sizes == [12, 9, 6, 3]


def test_readers_skip_a_torn_last_line(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    path.write_text(json.dumps({"step": 1, "a": 0.5}) + "\n" + '{"step": 2, "a": 0.')
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert read_metrics(path) == [{"step": 1, "a": 0.5}]
    assert any("metrics.jsonl:2: skipping an unreadable line" in str(w.message) for w in caught)
