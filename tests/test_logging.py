"""RunLogger: JSONL of floats, resume truncation, the success plot, wandb optional and silent when disabled."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import types
from pathlib import Path
from typing import Any

import pytest
import torch

from sacglam.logging import LoggerConfig, RunLogger, plot_success, read_metrics

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
QUIET = LoggerConfig(wandb_mode="disabled", progress=False)


def _lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_jsonl_floats_from_tensors(tmp_path: Path) -> None:
    log = RunLogger(tmp_path, QUIET, {}, total_steps=100)
    log.log(
        10,
        {
            "losses/critic": torch.tensor(0.25),
            "charts/alpha": torch.tensor(0.125, dtype=torch.float64),
            "charts/count": torch.tensor(3),
            "charts/flag": torch.tensor(True),
            "charts/success": 0.5,
            "charts/bad": float("nan"),
            "charts/inf": torch.tensor(float("inf")),
        },
    )
    log.log(20, {"charts/success": 1})
    log.close()
    rows = _lines(tmp_path / "metrics.jsonl")
    assert rows == [
        {
            "step": 10,
            "losses/critic": 0.25,
            "charts/alpha": 0.125,
            "charts/count": 3.0,
            "charts/flag": 1.0,
            "charts/success": 0.5,
            "charts/bad": None,
            "charts/inf": None,
        },
        {"step": 20, "charts/success": 1.0},
    ]
    assert all(type(v) is float for k, v in rows[0].items() if k != "step" and v is not None)
    assert read_metrics(tmp_path / "metrics.jsonl") == rows


def test_rejects_non_scalar(tmp_path: Path) -> None:
    with RunLogger(tmp_path, QUIET) as log:
        with pytest.raises(ValueError, match=r"'losses/critic' is a tensor of shape \(2,\)"):
            log.log(1, {"losses/critic": torch.ones(2)})
        with pytest.raises(TypeError, match="'name' must be a float or a 0-d tensor, got str"):
            log.log(1, {"name": "abc"})  # type: ignore[dict-item]


def _run(run_dir: Path, steps: range, resume_from_step: int | None = None) -> None:
    log = RunLogger(run_dir, QUIET, {}, resume_from_step=resume_from_step)
    for s in steps:
        log.log(s, {"charts/success": s / 1000, "losses/critic": torch.tensor(1.0 / s)})
    log.close()


def test_resume_truncates_to_an_uninterrupted_file(tmp_path: Path) -> None:
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    _run(full, range(100, 600, 100))
    # Crash after step 400 with a torn last line; the checkpoint was at step 300.
    _run(resumed, range(100, 500, 100))
    with (resumed / "metrics.jsonl").open("a") as f:
        f.write('{"step": 450, "charts/succ')
    with pytest.warns(UserWarning, match="unreadable line"):
        log = RunLogger(resumed, QUIET, {}, resume_from_step=300)
    assert [r["step"] for r in _lines(resumed / "metrics.jsonl")] == [100, 200, 300]
    log.close()
    _run(resumed, range(400, 600, 100), resume_from_step=300)
    assert (resumed / "metrics.jsonl").read_text() == (full / "metrics.jsonl").read_text()


def test_resume_keeps_the_lines_counted_at_the_checkpoint(tmp_path: Path) -> None:
    """Two lines of one step (the last training line, then the final evaluation): the step alone cannot tell which
    came after the checkpoint, the line count can."""
    log = RunLogger(tmp_path, QUIET, {})
    log.log(100, {"charts/success": 0.5})
    log.log(200, {"charts/success": 0.6})
    at_checkpoint = log.lines
    log.log(200, {"eval/greedy/success": 0.9})
    log.close()
    assert at_checkpoint == 2
    log = RunLogger(tmp_path, QUIET, {}, resume_from_step=200, keep_lines=at_checkpoint)
    assert log.lines == 2 and [r["step"] for r in _lines(tmp_path / "metrics.jsonl")] == [100, 200]
    log.log(200, {"eval/greedy/success": 0.9})
    log.close()
    assert len(_lines(tmp_path / "metrics.jsonl")) == 3
    RunLogger(tmp_path, QUIET, {}, resume_from_step=200).close()  # an old checkpoint without the count: by step
    assert len(_lines(tmp_path / "metrics.jsonl")) == 3


def test_fresh_run_replaces_existing_file(tmp_path: Path) -> None:
    _run(tmp_path, range(100, 400, 100))
    with pytest.warns(UserWarning, match="not a resume"):
        _run(tmp_path, range(1, 3))
    assert [r["step"] for r in _lines(tmp_path / "metrics.jsonl")] == [1, 2]


def test_close_writes_png(tmp_path: Path) -> None:
    log = RunLogger(tmp_path, QUIET, {})
    for s in range(0, 500, 100):
        log.log(s, {"charts/success": s / 500})
        log.log(s, {"eval/greedy/success/grasp": 0.9, "eval/greedy/success/grow": 0.1, "eval/greedy/success": 0.5})
    out = log.close()
    assert out == tmp_path / "success.png"
    data = out.read_bytes()
    assert data[:8] == PNG_MAGIC and len(data) > 5000
    assert log.close() is None  # idempotent
    with pytest.raises(RuntimeError, match="after close"):
        log.log(600, {"charts/success": 1.0})


def test_plot_success_standalone_without_success_keys(tmp_path: Path) -> None:
    metrics = tmp_path / "m.jsonl"
    metrics.write_text(json.dumps({"step": 1, "losses/critic": 0.3}) + "\n")
    out = plot_success(metrics, tmp_path / "sub" / "p.png")
    assert out.read_bytes()[:8] == PNG_MAGIC


def test_no_jsonl_no_plot(tmp_path: Path) -> None:
    log = RunLogger(tmp_path, LoggerConfig(wandb_mode="disabled", progress=False, jsonl=False))
    log.log(1, {"charts/success": 1.0})
    assert log.close() is None
    assert not (tmp_path / "metrics.jsonl").exists()


def test_should_log(tmp_path: Path) -> None:
    log = RunLogger(tmp_path, LoggerConfig(wandb_mode="disabled", progress=False, log_every=100))
    assert not log.should_log(99)
    assert log.should_log(100)
    log.log(130, {"x": 1.0})
    assert not log.should_log(229)
    assert log.should_log(230)
    log.close()
    resumed = RunLogger(
        tmp_path, LoggerConfig(wandb_mode="disabled", progress=False, log_every=100), resume_from_step=500
    )
    assert not resumed.should_log(550) and resumed.should_log(600)
    resumed.close()


def test_progress_bar_shows_metrics(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    log = RunLogger(tmp_path, LoggerConfig(wandb_mode="disabled"), {}, total_steps=1000)
    log.log(100, {"charts/success": 0.25, "losses/critic": torch.tensor(0.5), "charts/alpha": torch.tensor(0.01)})
    log.log(200, {"charts/sps": 1.0})  # keys missing from a later log keep their last value
    log.close()
    err = capsys.readouterr().err
    assert "200/1000" in err
    for text in ("success=0.25", "critic=0.5", "alpha=0.01", "sps="):
        assert text in err


class _FakeWandb(types.ModuleType):
    def __init__(self, fail_init: bool = False) -> None:
        super().__init__("wandb")
        self.fail_init = fail_init
        self.inits: list[dict[str, Any]] = []
        self.logged: list[tuple[dict[str, float], int]] = []
        self.finished = 0

    def init(self, **kwargs: Any) -> _FakeWandb:
        if self.fail_init:
            raise RuntimeError("no network")
        self.inits.append(kwargs)
        return self

    def log(self, data: dict[str, float], step: int) -> None:
        self.logged.append((data, step))

    def finish(self) -> None:
        self.finished += 1


def test_wandb_gets_floats_and_resumes_same_id(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake = _FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    cfg = LoggerConfig(progress=False, project="p", run_name="r")
    log = RunLogger(tmp_path, cfg, {"lr": 1e-3})
    log.log(5, {"losses/critic": torch.tensor(0.5), "charts/bad": float("nan")})
    log.close()
    assert fake.inits[0]["mode"] == "offline"  # the default: no account, no network
    assert fake.inits[0]["config"] == {"lr": 1e-3} and fake.inits[0]["project"] == "p"
    assert fake.logged == [({"losses/critic": 0.5}, 5)]
    assert fake.finished == 1
    RunLogger(tmp_path, cfg, {}, resume_from_step=5).close()
    assert fake.inits[1]["id"] == fake.inits[0]["id"]
    with pytest.warns(UserWarning, match="not a resume"):
        RunLogger(tmp_path, cfg, {}).close()  # a fresh run gets a fresh id
    assert fake.inits[2]["id"] != fake.inits[0]["id"]


def test_wandb_failure_warns_and_continues(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "wandb", _FakeWandb(fail_init=True))
    monkeypatch.delenv("WANDB_MODE", raising=False)
    with pytest.warns(UserWarning, match="continuing without wandb"):
        log = RunLogger(tmp_path, LoggerConfig(progress=False))
    log.log(1, {"charts/success": 1.0})
    assert log.close() is not None
    assert _lines(tmp_path / "metrics.jsonl") == [{"step": 1, "charts/success": 1.0}]


def test_bad_wandb_mode(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WANDB_MODE", raising=False)
    with pytest.raises(ValueError, match="wandb_mode must be one of"):
        RunLogger(tmp_path, LoggerConfig(wandb_mode="offlin", progress=False))


@pytest.mark.integration
def test_wandb_disabled_touches_no_network(tmp_path: Path) -> None:
    """WANDB_MODE=disabled overrides an offline config: wandb is never imported and no socket is opened."""
    code = f"""
import socket, sys
def _no_net(*a, **k):
    raise AssertionError("network access")
socket.socket.connect = _no_net
socket.create_connection = _no_net
from sacglam.logging import LoggerConfig, RunLogger
log = RunLogger({str(tmp_path)!r}, LoggerConfig(wandb_mode="offline", progress=False), {{"a": 1}})
log.log(1, {{"charts/success": 1.0}})
log.close()
assert "wandb" not in sys.modules, "wandb was imported"
print("ok")
"""
    env = {**os.environ, "WANDB_MODE": "disabled"}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "ok"
    assert (tmp_path / "success.png").read_bytes()[:8] == PNG_MAGIC
    assert not (tmp_path / "wandb").exists()
    assert math.isclose(_lines(tmp_path / "metrics.jsonl")[0]["charts/success"], 1.0)


@pytest.mark.integration
def test_real_wandb_offline(tmp_path: Path) -> None:
    """The default mode with the real wandb package: an offline run folder, no account needed."""
    pytest.importorskip("wandb")
    code = f"""
from sacglam.logging import LoggerConfig, RunLogger
log = RunLogger({str(tmp_path)!r}, LoggerConfig(progress=False), {{"a": 1}})
assert log._wandb is not None, "wandb.init failed"
log.log(1, {{"charts/success": 0.5}})
log.close()
"""
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    proc = subprocess.run(
        [sys.executable, "-W", "error::UserWarning", "-c", code], env=env, capture_output=True, text=True, timeout=180
    )
    assert proc.returncode == 0, proc.stderr
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    run_id = (tmp_path / "wandb_run_id.txt").read_text()
    assert runs[0].name.endswith(run_id)


def test_moving_average_is_a_trailing_mean() -> None:
    from sacglam.logging import moving_average

    assert moving_average([1.0, 0.0, 1.0, 1.0, 0.0], 2) == [1.0, 0.5, 0.5, 1.0, 0.5]
    assert moving_average([0.0, 3.0], 1) == [0.0, 3.0]
