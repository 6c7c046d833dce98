"""The episode log: every finished training episode as text, in gzip JSONL files under ``RUN/episodes/``.

    log = EpisodeLog(run_dir, max_mb=cfg.logger.episodes_max_mb, resume_from_step=resumed_step_or_None)
    log.write(records)                      # the EpisodeRecords that ended at this vector step
    log.close()                             # at the end of the run (finishes the gzip stream)

    report = LogReport()
    for rec in read_episodes(run_dir, report=report):   # a run folder, its episodes/ folder or one file
        ...
    print(report.summary())                 # records read, superseded by a resume, errors with file:line

Files: ``RUN/episodes/episodes-00000.jsonl.gz``, ``-00001``, ...; one JSON object per line, ``EpisodeRecord.to_json()``
and nothing else. A file is one gzip stream (``gzip -dc`` and ``gzip.open`` read it) that grows by one sync-flushed
block per ``write`` call: a SIGKILL loses at most the batch being written, and everything before it stays readable
(also while the run is still writing). Once a file holds ``max_mb`` MB (10^6 bytes, compressed) the next ``write``
goes to a new file; a batch is never split across files.

Resume: a run restarted from a checkpoint taken at env step S never reopens a file; it starts a new one whose first
line is ``{"resume_from_step": S}``. Episodes of earlier files with ``env_step > S`` were logged after the checkpoint
(and are logged again by the resumed run), so ``read_episodes`` drops them: the log then reads as that of an
uninterrupted run. A fresh run (no resume) that finds log files in its folder moves them to
``episodes/replaced-<time>/`` (with a warning), where the reader does not look.

Several processes (data-parallel runs, ``sacglam.distributed``): every rank writes its own log, rank 0 into
``RUN/episodes/`` as above and rank k > 0 into ``RUN/episodes/rank<k>/`` (the same file names), so no two processes
ever write one file. ``max_mb`` caps each rank's files on their own (the log of N ranks rotates at N x ``max_mb`` in
total). Episode ids of rank k > 0 are written as ``r<k>`` + the tracker's id (``r1e0k3``): every rank numbers its
own envs' episodes from ``e0k0``, and the export keys on the id. Given a run folder or its ``episodes/`` folder,
``read_episodes`` reads every rank's files, applies the resume rule to each rank's files on their own (each rank
writes its own resume markers), and merges the ranks' streams by ``env_step``, ties in rank order: one deterministic
order, that of the run's vector steps. A fresh run also moves the folders of ranks it does not have (left by an
earlier run with more processes) to ``episodes/replaced-<time>/``.

Cost: one ``json.dumps`` per episode and one zlib compression (level 6) and sync flush per ``write`` call.
"""

from __future__ import annotations

import heapq
import json
import re
import time
import warnings
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Literal

from sacglam.episodes import EpisodeRecord

EPISODES_DIRNAME = "episodes"
FILE_FORMAT = "episodes-{:05d}.jsonl.gz"
RESUME_KEY = "resume_from_step"
RANK_FORMAT = "rank{}"
_FILE_RE = re.compile(r"^episodes-(\d+)\.jsonl\.gz$")
_RANK_RE = re.compile(r"^rank(\d+)$")
_GZIP_WBITS = 16 + zlib.MAX_WBITS  # zlib writes and reads the gzip header and trailer itself
_READ_CHUNK = 1 << 18
_MAX_WARNINGS = 20  # per read; further errors are still counted in the report

OnError = Literal["warn", "skip", "raise"]


class EpisodeLogError(Exception):
    """An unreadable line of an episode log (raised by ``read_episodes(on_error="raise")``)."""


class EpisodeLogWarning(UserWarning):
    """A line of an episode log was skipped (``read_episodes(on_error="warn")``)."""


def log_files(folder: Path) -> list[Path]:
    """The episode-log files directly in ``folder``, in write order (by their number): one rank's log."""
    found = [(int(m.group(1)), p) for p in folder.iterdir() if p.is_file() and (m := _FILE_RE.match(p.name))]
    return [p for _, p in sorted(found)]


def rank_folders(folder: Path) -> list[tuple[int, Path]]:
    """``(rank, folder)`` of every rank's log under an ``episodes/`` folder, by rank: ``(0, folder)`` itself, then
    each ``rank<k>/`` subfolder (k >= 1) that holds log files."""
    found = [(int(m.group(1)), p) for p in folder.iterdir() if p.is_dir() and (m := _RANK_RE.match(p.name))]
    return [(0, folder), *sorted((k, p) for k, p in found if k > 0 and log_files(p))]


def rank_log_folder(episodes_dir: Path, rank: int) -> Path:
    """Where rank ``rank`` writes its log: ``episodes_dir`` itself for rank 0, ``episodes_dir/rank<k>`` otherwise."""
    return episodes_dir if rank == 0 else episodes_dir / RANK_FORMAT.format(rank)


# ---------------------------------------------------------------------------------------------------------- writing


def _line(rec: EpisodeRecord, id_prefix: str = "") -> str:
    """``json.dumps(rec.to_json())`` as one line, the id prefixed by ``id_prefix``. The record's own ``__dict__`` is
    dumped (its fields are plain JSON types; ``to_json``'s ``asdict`` deep-copies them first, 4x the cost of the dump),
    falling back to ``to_json`` for a field ``json`` cannot write as it is."""
    try:
        fields = {**vars(rec), "id": id_prefix + rec.id} if id_prefix else vars(rec)
        text = json.dumps(fields, ensure_ascii=False, separators=(",", ":"))
    except TypeError:
        fields = {**rec.to_json(), "id": id_prefix + rec.id}
        text = json.dumps(fields, ensure_ascii=False, separators=(",", ":"))
    return text + "\n"


def _move_aside(folder: Path, files: Sequence[Path], rank_dirs: Sequence[Path]) -> None:
    """Move an earlier run's log ``files`` and the folders ``rank_dirs`` (of ranks this run does not have) into a new
    ``folder/replaced-<time>/``, where the reader does not look, with a warning."""
    stamp, n = time.strftime("replaced-%Y%m%d-%H%M%S"), 0
    while (dest := folder / (stamp + (f"-{n}" if n else ""))).exists():
        n += 1
    dest.mkdir()
    for p in [*files, *rank_dirs]:
        p.rename(dest / p.name)
    ranks = f" and the logs of {len(rank_dirs)} rank(s) this run does not have" if rank_dirs else ""
    warnings.warn(f"{folder} held the episode log of an earlier run and this is not a resume: moved its "
                  f"{len(files)} file(s){ranks} to {dest}", stacklevel=3)


class EpisodeLog:
    """Appends finished episodes to ``run_dir/episodes/`` (see the module docstring).

    Args:
        run_dir: the run folder (``episodes/`` is created in it).
        max_mb: start a new file once the current one holds this many MB (10^6 bytes) of compressed data (this
            rank's files).
        resume_from_step: the env step of the checkpoint the run restarted from, or None for a fresh run.
        compresslevel: zlib level (1 fastest .. 9 smallest).
        rank, world: this process's place in a data-parallel run: rank k > 0 writes to ``episodes/rank<k>/`` and
            prefixes its episode ids with ``r<k>``; a fresh rank 0 moves aside the logs of ranks >= ``world``.

    Attributes:
        bytes_written: compressed bytes written by this object (all its files).
        records_written: episodes written by this object.
        path: the file being written.
    """

    def __init__(self, run_dir: str | Path, max_mb: float = 64.0, resume_from_step: int | None = None, *,
                 compresslevel: int = 6, rank: int = 0, world: int = 1) -> None:
        if not max_mb > 0:
            raise ValueError(f"logger.episodes_max_mb must be > 0, got {max_mb}")
        if resume_from_step is not None and resume_from_step < 0:
            raise ValueError(f"resume_from_step must be >= 0 or None, got {resume_from_step}")
        if not 0 <= rank < world:
            raise ValueError(f"rank={rank} must lie in 0 .. world - 1 = {world - 1}")
        root = Path(run_dir) / EPISODES_DIRNAME
        self.folder = rank_log_folder(root, rank)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.id_prefix = f"r{rank}" if rank else ""
        self.max_bytes = int(max_mb * 1e6)
        self.compresslevel = compresslevel
        self.bytes_written = 0
        self.records_written = 0
        existing = log_files(self.folder)
        stale = [p for k, p in rank_folders(root) if k >= world] if rank == 0 else []
        if (existing or stale) and resume_from_step is None:
            _move_aside(self.folder, existing, stale)
            existing = []
        m = _FILE_RE.match(existing[-1].name) if existing else None
        self._index = int(m.group(1)) + 1 if m else 0
        self._file: IO[bytes] | None = None
        self._zip: Any = None
        self._file_bytes = 0
        self._closed = False
        self._open()
        if resume_from_step is not None:  # written now, so it marks the file even if no episode follows
            self._append(json.dumps({RESUME_KEY: int(resume_from_step)}).encode() + b"\n")

    @property
    def path(self) -> Path:
        """The file being written (after a rotation: the one the next ``write`` creates)."""
        return self.folder / FILE_FORMAT.format(self._index)

    def _open(self) -> None:
        self._file = self.path.open("xb")  # never reopen (or overwrite) a file: a gzip member is not appendable
        self._zip = zlib.compressobj(self.compresslevel, zlib.DEFLATED, _GZIP_WBITS)
        self._file_bytes = 0

    def _append(self, data: bytes) -> None:
        assert self._file is not None
        out = self._zip.compress(data) + self._zip.flush(zlib.Z_SYNC_FLUSH)
        self._file.write(out)
        self._file.flush()  # to the OS: a killed process loses nothing written here
        self._file_bytes += len(out)
        self.bytes_written += len(out)

    def _finish(self) -> None:
        if self._file is None:
            return
        tail = self._zip.flush(zlib.Z_FINISH)
        self._file.write(tail)
        self.bytes_written += len(tail)
        self._file.close()
        self._file = self._zip = None

    def write(self, records: Sequence[EpisodeRecord]) -> None:
        """Append ``records`` (one JSON line each) and sync-flush them to the file; rotate afterwards when the file
        has reached ``max_mb``."""
        if self._closed:
            raise RuntimeError("EpisodeLog.write called after close()")
        if not records:
            return
        if self._file is None:  # the previous write filled a file
            self._index += 1
            self._open()
        self._append("".join(_line(r, self.id_prefix) for r in records).encode())
        self.records_written += len(records)
        if self._file_bytes >= self.max_bytes:
            self._finish()

    def close(self) -> None:
        """Finish the current file (gzip trailer) and close it; later calls do nothing."""
        if not self._closed:
            self._finish()
            self._closed = True

    def __enter__(self) -> EpisodeLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ---------------------------------------------------------------------------------------------------------- reading


@dataclass(frozen=True)
class LogError:
    """One skipped line: ``file``, its 1-based ``line`` number (of the decompressed text) and why."""

    file: Path
    line: int
    reason: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.reason}"


@dataclass
class LogReport:
    """What a ``read_episodes`` pass met (filled in as it reads).

    Attributes:
        files: the files read, in order.
        records: episodes yielded.
        superseded: episodes dropped by the resume rule (logged after a checkpoint a later file resumed from).
        errors: skipped lines (bad JSON, not an episode record, truncated by a kill, corrupt gzip data).
        unfinished: files without a gzip trailer that end on a whole line: a run still writing, or killed between
            two writes (nothing lost).
    """

    files: list[Path] = field(default_factory=list)
    records: int = 0
    superseded: int = 0
    errors: list[LogError] = field(default_factory=list)
    unfinished: list[Path] = field(default_factory=list)

    def summary(self) -> str:
        """One line: files, records, superseded, skipped lines."""
        return (f"{len(self.files)} file(s), {self.records} episode(s) read, {self.superseded} superseded by a "
                f"resume, {len(self.errors)} unreadable line(s) skipped")


def resolve_log(path: str | Path) -> list[Path]:
    """The log files of ``path``: a run folder (its ``episodes/``), an ``episodes/`` folder, or one file. Every
    rank's files, rank by rank (rank 0's, then ``rank1/``'s, ...), each rank's in write order.

    Raises:
        FileNotFoundError: the path does not exist, or holds no episode log (names ``logger.episodes=true``).
    """
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{p} does not exist; pass a train.py run folder, its {EPISODES_DIRNAME}/ folder or "
                                f"one {EPISODES_DIRNAME}/episodes-*.jsonl.gz file")
    if p.is_file():
        return [p]
    folder = p / EPISODES_DIRNAME if (p / EPISODES_DIRNAME).is_dir() else p
    files = [f for _, sub in rank_folders(folder) for f in log_files(sub)]
    if not files:
        raise FileNotFoundError(f"no episode log in {p} (no {EPISODES_DIRNAME}/episodes-*.jsonl.gz): train with "
                                "logger.episodes=true to log every finished episode")
    return files


@dataclass
class _Tail:
    """How a file's stream ended: ``partial`` bytes after the last newline, ``finished`` (gzip trailer seen),
    ``corrupt`` (a zlib error message)."""

    partial: bytes = b""
    finished: bool = False
    corrupt: str | None = None


def _inflate(dec: Any, chunk: bytes) -> tuple[bytes, str | None]:
    """``dec.decompress(chunk)``; on corrupt data, what decodes before the bad bytes (fed again in small pieces
    from a copy of the state before the chunk: one call would return nothing) and the zlib message."""
    saved = dec.copy()
    try:
        return dec.decompress(chunk), None
    except zlib.error as exc:
        out = []
        for lo in range(0, len(chunk), 64):
            try:
                out.append(saved.decompress(chunk[lo : lo + 64]))
            except zlib.error:
                break
            if saved.eof:
                break
        return b"".join(out), str(exc)


def _lines(path: Path, tail: _Tail, limit: int | None = None) -> Iterator[bytes]:
    """The newline-terminated lines of a gzip file (concatenated members too); what ends the stream goes to
    ``tail``. ``limit``: stop after that many lines."""
    n = 0
    pending = b""
    dec = zlib.decompressobj(_GZIP_WBITS)
    with path.open("rb") as f:
        while tail.corrupt is None:
            chunk = f.read(_READ_CHUNK)
            if not chunk:
                break
            while chunk:
                data, tail.corrupt = _inflate(dec, chunk)
                chunk = b""
                tail.finished = dec.eof and tail.corrupt is None
                if tail.finished:  # a member ended: another may follow (trailing NUL padding is ignored)
                    chunk = dec.unused_data if dec.unused_data.strip(b"\0") else b""
                    dec = zlib.decompressobj(_GZIP_WBITS)
                parts = (pending + data).split(b"\n")
                pending = parts.pop()
                for line in parts:
                    yield line
                    n += 1
                    if limit is not None and n >= limit:
                        return
                if tail.corrupt is not None:
                    tail.corrupt = f"corrupt gzip data ({tail.corrupt})"
                    break
    tail.partial = pending


def _resume_step(path: Path) -> int | None:
    """S when ``path``'s first line is a resume marker ``{"resume_from_step": S}``."""
    try:
        first = next(_lines(path, _Tail(), limit=1), b"")
        obj = json.loads(first)
    except (OSError, ValueError):
        return None
    if isinstance(obj, dict) and set(obj) == {RESUME_KEY} and isinstance(obj[RESUME_KEY], int):
        return int(obj[RESUME_KEY])
    return None


def read_episodes(path: str | Path, *, on_error: OnError = "warn",
                  report: LogReport | None = None) -> Iterator[EpisodeRecord]:
    """The episodes of a log, in write order, with the resume rule applied.

    A data-parallel run's log (several ranks' folders) reads as one stream: each rank's episodes in write order, the
    ranks merged by ``env_step`` (ties in rank order); the resume rule applies to each rank's files on their own.

    Args:
        path: a run folder, its ``episodes/`` folder, or one log file (then no other file's resume marker applies).
        on_error: for an unreadable line (bad JSON, a record ``EpisodeRecord.from_json`` refuses, a line cut by a
            kill, corrupt gzip data): ``warn`` (``EpisodeLogWarning`` naming file and line, then skip; at most 20
            warnings per read), ``skip`` (silently) or ``raise`` (``EpisodeLogError``). Skipped lines are listed in
            ``report.errors`` either way; nothing but the bad line is lost (corrupt gzip data loses the rest of that
            file, since deflate cannot resynchronise).
        report: filled in while reading (see ``LogReport``).

    Raises:
        FileNotFoundError: at the call (not at the first ``next``): no such path, or no log in it.
    """
    if on_error not in ("warn", "skip", "raise"):
        raise ValueError(f"on_error must be 'warn', 'skip' or 'raise', got {on_error!r}")
    files = resolve_log(path)
    return _read(files, on_error, report if report is not None else LogReport())


def _read(files: list[Path], on_error: OnError, report: LogReport) -> Iterator[EpisodeRecord]:
    """The episodes of ``files``: one rank's files (those of one folder) in order, several ranks' merged by
    ``env_step`` (``heapq.merge`` is stable: ties go to the rank listed first)."""
    ranks: dict[Path, list[Path]] = {}
    for f in files:
        ranks.setdefault(f.parent, []).append(f)
    warned = [0]
    streams = [_read_rank(group, on_error, report, warned) for group in ranks.values()]
    if len(streams) == 1:
        return streams[0]
    return heapq.merge(*streams, key=lambda rec: rec.env_step)


def _read_rank(files: list[Path], on_error: OnError, report: LogReport,
               warned: list[int]) -> Iterator[EpisodeRecord]:
    """One rank's files in write order. Episodes of file i with env_step above the smallest resume step of a later
    file were logged again (after the checkpoint that later file resumed from), so they are dropped. ``warned``
    counts the warnings of the whole read."""
    marks = [_resume_step(p) for p in files]
    cutoffs: list[int | None] = []
    low: int | None = None
    for m in reversed(marks):
        cutoffs.append(low)
        if m is not None:
            low = m if low is None else min(low, m)
    cutoffs.reverse()

    def bad(path: Path, line: int, reason: str) -> None:
        err = LogError(path, line, reason)
        report.errors.append(err)
        if on_error == "raise":
            raise EpisodeLogError(str(err))
        if on_error == "warn":
            warned[0] += 1
            if warned[0] <= _MAX_WARNINGS:
                more = " (further errors are counted, not shown)" if warned[0] == _MAX_WARNINGS else ""
                warnings.warn(f"skipping {err}{more}", EpisodeLogWarning, stacklevel=3)

    for path, cutoff in zip(files, cutoffs, strict=True):
        report.files.append(path)
        tail = _Tail()
        n = 0
        for n, raw in enumerate(_lines(path, tail), 1):
            if not raw.strip():
                continue
            try:
                obj = json.loads(raw)
            except ValueError as exc:
                bad(path, n, f"bad JSON ({exc}): {raw[:80]!r}")
                continue
            if isinstance(obj, dict) and RESUME_KEY in obj and len(obj) == 1:
                if n != 1:
                    bad(path, n, "resume marker not on the first line of a file")
                continue
            try:
                if not isinstance(obj, dict):
                    raise ValueError(f"a JSON {type(obj).__name__}, not an object")
                rec = EpisodeRecord.from_json(obj)
            except (ValueError, TypeError) as exc:
                bad(path, n, f"not an episode record ({exc})")
                continue
            if cutoff is not None and rec.env_step > cutoff:
                report.superseded += 1
                continue
            report.records += 1
            yield rec
        if tail.corrupt is not None:
            bad(path, n + 1, f"{tail.corrupt}; the rest of this file is lost")
        elif tail.partial.strip():
            bad(path, n + 1, f"truncated line ({len(tail.partial)} bytes, no newline; the run was killed while "
                             "writing?)")
        elif not tail.finished:
            report.unfinished.append(path)


__all__ = [
    "EPISODES_DIRNAME",
    "EpisodeLog",
    "EpisodeLogError",
    "EpisodeLogWarning",
    "LogError",
    "LogReport",
    "log_files",
    "rank_folders",
    "rank_log_folder",
    "read_episodes",
    "resolve_log",
]
