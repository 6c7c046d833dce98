"""sacglam/episode_log.py: the gzip JSONL episode log and its reader.

Hand-built EpisodeRecords go through EpisodeLog and back through read_episodes field by field; a tiny max_mb
rotates files without losing or reordering anything; a bad line, a record missing a field and a gzip tail cut by a
kill (also a real SIGKILL of a writing process) are reported with file and line and skipped; the resume rule drops
the episodes logged after the checkpoint a later file resumed from.
"""

from __future__ import annotations

import dataclasses
import gzip
import json
import os
import signal
import subprocess
import sys
import warnings
import zlib
from pathlib import Path

import pytest

from sacglam import episode_log
from sacglam.episode_log import (
    EPISODES_DIRNAME,
    EpisodeLog,
    EpisodeLogError,
    EpisodeLogWarning,
    LogReport,
    log_files,
    read_episodes,
)
from sacglam.episodes import EpisodeRecord

ROOT = Path(__file__).resolve().parents[1]


def _record(k: int, env_step: int | None = None, length: int = 3) -> EpisodeRecord:
    """Episode k: texts that JSON must escape (newlines, quotes, unicode), float rewards, achieved goals."""
    L = length + k % 3
    return EpisodeRecord(
        id=f"e{k % 2}k{k // 2}", env_index=k % 2, goal=f"Grasp \"thing\" {k}", goal_category="grasp",
        observations=[f"obs {k}.{t}\nYou see: café, naïve {'x' * (k % 5)}" for t in range(L + 1)],
        candidates=[[f"Go to {j}" for j in range(1 + (t + k) % 3)] + ["Grasp"] for t in range(L)],
        actions=[(t * k) % (2 + (t + k) % 3) for t in range(L)],
        rewards=[0.0] * (L - 1) + [float(k % 2)],
        achieved=[[f"Grasp {k}"] if t == L - 1 else [] for t in range(L)],
        policy_version=[k * 10 + t for t in range(L)],
        terminated=bool(k % 2), truncated=not k % 2, success=bool(k % 2),
        env_step=(k + 1) * 10 if env_step is None else env_step,
    )


def _same(got: EpisodeRecord, want: EpisodeRecord) -> None:
    for f in dataclasses.fields(EpisodeRecord):
        a, b = getattr(got, f.name), getattr(want, f.name)
        assert a == b and type(a) is type(b), f"{want.id}.{f.name}: {a!r} != {b!r}"


def _read(path: Path, **kw: object) -> tuple[list[EpisodeRecord], LogReport]:
    report = LogReport()
    return list(read_episodes(path, report=report, **kw)), report  # type: ignore[arg-type]


def _gz_lines(path: Path) -> list[bytes]:
    """Every line of a (possibly unfinished) gzip file, by plain zlib."""
    return zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(path.read_bytes()).splitlines()


def test_round_trip_field_by_field(tmp_path: Path) -> None:
    recs = [_record(k) for k in range(12)]
    with EpisodeLog(tmp_path) as log:
        for lo in (0, 1, 5, 12):  # batches of 1, 4, 7 and an empty one
            log.write(recs[lo : {0: 1, 1: 5, 5: 12, 12: 12}[lo]])
        assert log.records_written == 12
    files = log_files(tmp_path / EPISODES_DIRNAME)
    assert [f.name for f in files] == ["episodes-00000.jsonl.gz"]
    assert log.bytes_written == files[0].stat().st_size
    got, report = _read(tmp_path)
    assert len(got) == len(recs)
    for g, w in zip(got, recs, strict=True):
        _same(g, w)
    assert report.records == 12 and not report.errors and not report.unfinished and report.files == files
    # Plain gzip reads the closed file; each line is EpisodeRecord.to_json() and nothing else.
    with gzip.open(files[0], "rt", encoding="utf-8") as f:
        assert [json.loads(line) for line in f] == [r.to_json() for r in recs]
    # The episodes/ folder and the file itself read the same.
    assert [r.id for r in _read(tmp_path / EPISODES_DIRNAME)[0]] == [r.id for r in _read(files[0])[0]] == \
        [r.id for r in recs]


def test_every_write_is_readable_before_close(tmp_path: Path) -> None:
    log = EpisodeLog(tmp_path)
    recs = [_record(k) for k in range(6)]
    for i in range(0, 6, 2):
        log.write(recs[i : i + 2])
        got, report = _read(tmp_path)  # a run still writing: no gzip trailer yet
        assert [r.id for r in got] == [r.id for r in recs[: i + 2]]
        assert not report.errors and report.unfinished == report.files
    log.close()
    log.close()  # idempotent
    with pytest.raises(RuntimeError, match="after close"):
        log.write(recs[:1])


def test_rotation_by_size_keeps_order_and_loses_nothing(tmp_path: Path) -> None:
    recs = [_record(k, length=6) for k in range(60)]
    with EpisodeLog(tmp_path, max_mb=0.0015) as log:  # 1500 compressed bytes per file
        for i in range(0, 60, 3):
            log.write(recs[i : i + 3])
    files = log_files(tmp_path / EPISODES_DIRNAME)
    assert len(files) >= 4, [f.stat().st_size for f in files]
    assert [f.name for f in files] == [f"episodes-{i:05d}.jsonl.gz" for i in range(len(files))]
    per_file = [len(gzip.decompress(f.read_bytes()).splitlines()) for f in files]  # every file is complete gzip
    assert sum(per_file) == 60 and all(n % 3 == 0 for n in per_file)  # batches never split
    assert all(f.stat().st_size >= 1500 for f in files[:-1])
    assert sum(f.stat().st_size for f in files) == log.bytes_written
    got, report = _read(tmp_path)
    for g, w in zip(got, recs, strict=True):
        _same(g, w)
    assert len(got) == 60 and not report.errors and not report.unfinished


def _write_lines(path: Path, lines: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress("".join(line + "\n" for line in lines).encode()))


def test_corrupt_lines_are_reported_with_file_and_line_and_skipped(tmp_path: Path) -> None:
    recs = [_record(k) for k in range(6)]
    good = [json.dumps(r.to_json()) for r in recs]
    missing = {k: v for k, v in recs[0].to_json().items() if k != "actions"}
    bad_len = {**recs[1].to_json(), "rewards": [0.0]}
    lines = [good[0], good[1], '{"id": "e0k9", "env_ind', good[2], json.dumps(missing), good[3], "[1, 2]",
             json.dumps(bad_len), good[4], good[5]]
    path = tmp_path / EPISODES_DIRNAME / "episodes-00000.jsonl.gz"
    _write_lines(path, lines)
    with pytest.warns(EpisodeLogWarning) as caught:
        got, report = _read(tmp_path)
    assert [r.id for r in got] == [r.id for r in recs]
    assert [(e.file, e.line) for e in report.errors] == [(path, 3), (path, 5), (path, 7), (path, 8)]
    assert "bad JSON" in report.errors[0].reason
    assert "actions" in report.errors[1].reason and "not an episode record" in report.errors[1].reason
    assert "list" in report.errors[2].reason and "rewards" in report.errors[3].reason
    assert [str(w.message) for w in caught] == [f"skipping {e}" for e in report.errors]
    assert f"{path}:3:" in str(caught[0].message)
    # skip: no warnings, same counts; raise: the first bad line, named.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got2, report2 = _read(tmp_path, on_error="skip")
    assert len(got2) == 6 and report2.errors == report.errors
    with pytest.raises(EpisodeLogError, match=r"episodes-00000\.jsonl\.gz:3: bad JSON"):
        _read(tmp_path, on_error="raise")


@pytest.mark.parametrize("chunk", ["default", "37 bytes", "straddle"])
def test_truncated_gzip_tail_is_reported_and_the_rest_read(tmp_path: Path, chunk: str,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    recs = [_record(k, length=8) for k in range(9)]
    log = EpisodeLog(tmp_path)
    path = log.path
    log.write(recs[:4])
    log.write(recs[4:6])
    kept = path.stat().st_size
    # The reader reads compressed bytes in chunks: a few at a time (lines straddle reads), or one read ending 100
    # bytes before the end of the first two writes (the corruption below then lies in a read that also ends line 6).
    if chunk != "default":
        monkeypatch.setattr(episode_log, "_READ_CHUNK", 37 if chunk == "37 bytes" else kept - 100)
    log.write(recs[6:])  # the batch a kill interrupts
    full = path.read_bytes()
    log.close()
    assert len(_gz_lines(path)) == 9
    torn = 0
    for cut in range(kept + 1, len(full), 11):  # killed while writing the last batch, at every 11th byte
        path.write_bytes(full[:cut])
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            got, report = _read(tmp_path)
        n = len(got)
        assert 6 <= n <= 9  # everything before the interrupted batch, and whole lines of it
        for g, w in zip(got, recs[:n], strict=True):
            _same(g, w)
        if report.errors:  # a line cut mid-way: named by file and line, and warned about
            torn += 1
            assert [(e.file, e.line) for e in report.errors] == [(path, n + 1)]
            assert "truncated line" in report.errors[0].reason
            assert [str(w.message) for w in caught] == [f"skipping {path}:{n + 1}: {report.errors[0].reason}"]
        else:
            assert not caught and report.unfinished == [path]
    assert torn > 5
    path.write_bytes(full[:kept])  # killed between two writes: nothing lost, nothing to report
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got, report = _read(tmp_path)
    assert len(got) == 6 and not report.errors and report.unfinished == [path]
    # Corrupt compressed bytes: reported at the line where reading stopped; the lines before are kept.
    broken = bytearray(full)
    broken[kept + 10 : kept + 40] = b"\xff" * 30
    path.write_bytes(bytes(broken))
    got, report = _read(tmp_path, on_error="skip")
    assert 6 <= len(got) < 9 and len(report.errors) == 1 and report.errors[0].line == len(got) + 1


_WRITER = """
import sys
from pathlib import Path
sys.path.insert(0, sys.argv[2])
from tests.test_episode_log import _record
from sacglam.episode_log import EpisodeLog
log = EpisodeLog(Path(sys.argv[1]))
k = 0
while True:
    log.write([_record(k + i, length=40) for i in range(8)])
    k += 8
    print(k, flush=True)
"""


@pytest.mark.integration
def test_sigkill_loses_at_most_the_batch_being_written(tmp_path: Path) -> None:
    proc = subprocess.Popen([sys.executable, "-c", _WRITER, str(tmp_path), str(ROOT)], stdout=subprocess.PIPE,
                            text=True, cwd=ROOT)
    assert proc.stdout is not None
    done = 0
    try:
        while done < 400:
            line = proc.stdout.readline()
            assert line, "the writer died"
            done = int(line)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    got, report = _read(tmp_path, on_error="skip")
    assert len(got) >= done and len(report.errors) <= 1  # at most a torn last line
    for k, g in enumerate(got):
        _same(g, _record(k, length=40))


def _log(run: Path, steps: list[int], resume: int | None = None, first: int = 0) -> None:
    with EpisodeLog(run, resume_from_step=resume) as log:
        for i, s in enumerate(steps):
            log.write([_record(first + i, env_step=s)])


def test_resume_drops_what_was_logged_after_the_checkpoint(tmp_path: Path) -> None:
    _log(tmp_path, [10, 20, 30, 40, 50, 60, 70])  # checkpoint at 40, killed at 70
    first = log_files(tmp_path / EPISODES_DIRNAME)[0]
    before = first.read_bytes()
    _log(tmp_path, [50, 60, 70, 80, 90], resume=40, first=100)  # checkpoint at 80, killed at 90
    _log(tmp_path, [90, 100], resume=80, first=200)
    files = log_files(tmp_path / EPISODES_DIRNAME)
    assert len(files) == 3 and first.read_bytes() == before  # an old file is never reopened
    assert _gz_lines(files[1])[0] == b'{"resume_from_step": 40}'
    got, report = _read(tmp_path)
    assert [r.env_step for r in got] == [10, 20, 30, 40, 50, 60, 70, 80, 90, 100]
    assert [r.id for r in got] == [_record(k).id for k in (0, 1, 2, 3, 100, 101, 102, 103, 200, 201)]
    assert report.superseded == 3 + 1 and not report.errors
    # A resume to a checkpoint older than an earlier resume's drops across both earlier files.
    _log(tmp_path, [30, 40], resume=20, first=300)
    assert [r.env_step for r in _read(tmp_path)[0]] == [10, 20, 30, 40]
    # One file alone: no later marker applies.
    assert [r.env_step for r in _read(files[0])[0]] == [10, 20, 30, 40, 50, 60, 70]


def test_resume_marker_is_written_even_without_episodes(tmp_path: Path) -> None:
    _log(tmp_path, [10, 20, 30])
    EpisodeLog(tmp_path, resume_from_step=10).close()  # restarted, killed before an episode ended
    got, report = _read(tmp_path)
    assert [r.env_step for r in got] == [10] and report.superseded == 2


def test_a_fresh_run_moves_an_old_log_aside(tmp_path: Path) -> None:
    _log(tmp_path, [10, 20])
    with pytest.warns(UserWarning, match="not a resume"):
        _log(tmp_path, [5], first=50)
    got, _ = _read(tmp_path)
    assert [r.id for r in got] == [_record(50).id]
    with pytest.warns(UserWarning, match="not a resume"):  # again within the same second: another folder
        _log(tmp_path, [5, 6, 7], first=60)
    assert [r.id for r in _read(tmp_path)[0]] == [_record(k).id for k in (60, 61, 62)]
    moved = sorted(p for p in (tmp_path / EPISODES_DIRNAME).iterdir() if p.is_dir())
    assert [len(list(read_episodes(p))) for p in moved] == [2, 1]


def test_missing_path_and_no_log_name_the_fix(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_episodes(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match=r"logger\.episodes=true"):
        read_episodes(tmp_path)  # raised at the call, not at the first next()
    with pytest.raises(ValueError, match="max_mb"):
        EpisodeLog(tmp_path, max_mb=0)
