"""Exact, kill-safe checkpoints: atomic save, integrity-checked load, keep-last-K pruning, RNG capture and restore.

A checkpoint is one file ``run_dir/checkpoints/step_<step:010d>.pt``::

    header (64 bytes): magic b"SACGLAMC" | format version u32 | reserved u32 | payload size u64 | sha256 (32 bytes)
    payload:           the bytes of ``torch.save(state)`` (a zip archive)

``save_checkpoint`` streams ``torch.save`` straight into a temporary file in the same folder while hashing the bytes
as they pass (no in-memory copy of large tensors such as the replay buffer), writes the header last, flushes and
fsyncs the file, renames it over the final name (atomic on POSIX) and fsyncs the folder so the rename itself is
durable. A process killed at any moment therefore leaves either the previous set of complete checkpoints plus a
stray temporary file, or the new complete checkpoint -- never a half-written file under a final name. A save that
fails with an ``OSError`` (a full disk: ENOSPC at any write, the fsync, the rename or the pruning) removes its own
temporary file and raises :class:`CheckpointWriteError`, naming the file, the error and the free space; the earlier
checkpoints are untouched. The header's size and sha256 still catch files damaged later (truncated copies, disk
errors), and ``find_latest_checkpoint`` skips such files with a warning instead of loading them.

The agent's part (``agent_state`` / ``load_agent_state``) is lean with a frozen base (LoRA): the adapters, heads and
target copies, without the base weights, plus the base's name and a cheap fingerprint (``base_identity``) that a
resume checks against the base it rebuilt from its config. Full fine-tuning, ``checkpoint.lean=false`` and
checkpoints written before lean ones hold every weight and load as they are.

RNG states (Python ``random``, numpy's global generator, torch CPU and CUDA, and named ``torch.Generator`` objects)
are captured as plain tensors, ints and strings, so a checkpoint loads with ``torch.load(weights_only=True)``.

The options (:class:`CheckpointConfig`) live in the light ``sacglam.config`` (the Hydra schema) and are re-exported
here.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import pickle
import random
import re
import shutil
import socket
import struct
import uuid
import warnings
from collections import OrderedDict
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch
from torch import nn

from sacglam.config import CheckpointConfig

FORMAT_VERSION = 1
MAGIC = b"SACGLAMC"
# magic, version, reserved, payload size, sha256 digest, padding: fixed 64 bytes, so the payload offset is fixed.
_HEADER = struct.Struct("<8sIIQ32s8x")
HEADER_SIZE = _HEADER.size
CHECKPOINT_DIRNAME = "checkpoints"
_FINAL_RE = re.compile(r"^step_(\d{10})\.pt$")
_TEMP_RE = re.compile(r"^\.step_\d{10}\.pt\.(?P<pid>\d+)@(?P<host>[^/]+)\.(?P<token>[0-9a-f]+)\.tmp$")
_OVERLAP_MIN = 1 << 20  # writes from 1 MiB up are hashed on a helper thread, overlapping the file write
_CHUNK = 8 << 20  # 8 MiB reads when hashing: large enough to run at disk speed, small enough to stay out of memory
# Files already verified by this process, keyed by identity and stat, so resume (find_latest, then load) hashes a
# multi-GB buffer checkpoint once instead of twice. A rewritten file has a new inode/mtime and is verified again.
_VERIFIED: dict[tuple[str, int, int, int], str] = {}

__all__ = [
    "FORMAT_VERSION",
    "HEADER_SIZE",
    "CheckpointConfig",
    "CheckpointError",
    "CheckpointWriteError",
    "agent_state",
    "base_differences",
    "base_identity",
    "capture_rng_state",
    "check_run_state",
    "checkpoint_dir",
    "checkpoint_path",
    "checkpoint_step",
    "find_latest_checkpoint",
    "frozen_base_keys",
    "list_checkpoints",
    "load_agent_state",
    "load_checkpoint",
    "resolve_resume",
    "restore_rng_state",
    "save_checkpoint",
    "verify_checkpoint",
]


class CheckpointError(RuntimeError):
    """A checkpoint file is missing, truncated, corrupt or of an unknown format; the message names the file."""


class CheckpointWriteError(CheckpointError):
    """A checkpoint could not be written (a full disk, a quota, an I/O error): the message names the file, the error,
    the free space left and the newest complete checkpoint, which the failed save left intact.

    Attributes:
        path: the checkpoint file that was being written.
        free_bytes: free bytes on the checkpoint folder's filesystem after the failure (None if unknown).
        written: True when the new checkpoint is complete under its final name and a later step (folder fsync,
            pruning) failed; False when nothing of it is left.
    """

    def __init__(self, message: str, path: Path, free_bytes: int | None, written: bool) -> None:
        super().__init__(message)
        self.path, self.free_bytes, self.written = path, free_bytes, written


# ----------------------------------------------------------------------------------------------------------- paths


def checkpoint_dir(run_dir: str | os.PathLike[str]) -> Path:
    """The folder holding a run's checkpoints: ``run_dir/checkpoints``."""
    return Path(run_dir) / CHECKPOINT_DIRNAME


def checkpoint_path(run_dir: str | os.PathLike[str], step: int) -> Path:
    """The final path of the checkpoint for ``step``: ``run_dir/checkpoints/step_<step:010d>.pt``."""
    return checkpoint_dir(run_dir) / f"step_{step:010d}.pt"


def checkpoint_step(path: Path) -> int | None:
    """The step a final-named checkpoint file belongs to (``step_<step:010d>.pt``), None for any other name."""
    match = _FINAL_RE.match(path.name)
    return int(match.group(1)) if match else None


def check_run_state(state: dict[str, Any], path: str | os.PathLike[str], algo: str, world: int = 1) -> None:
    """Refuse to resume from a checkpoint of another algorithm or another number of processes (names both).

    Raises:
        ValueError: ``state["algo"]`` is not ``algo``, or ``state["world"]`` (1 when absent) is not ``world``.
    """
    if state.get("algo") != algo:
        raise ValueError(f"{path} was written by algo={state.get('algo')}, this run is algo={algo}; resume with the "
                         "same algo")
    if state.get("world", 1) != world:
        raise ValueError(f"{path} was written by a run of {state.get('world', 1)} process(es); this run has {world}; "
                         "resume with the same number of processes")


def list_checkpoints(run_dir: str | os.PathLike[str]) -> list[Path]:
    """Final-named checkpoint files of a run, oldest step first (not verified; see ``find_latest_checkpoint``)."""
    folder = checkpoint_dir(run_dir)
    if not folder.is_dir():
        return []
    found = [(step, p) for p in folder.iterdir() if (step := checkpoint_step(p)) is not None and p.is_file()]
    return [p for _, p in sorted(found)]


# ------------------------------------------------------------------------------------------------------------ save


class _HashingWriter:
    """A write-only file proxy that hashes and counts every byte on its way to the file (no extra copy).

    Large writes (tensor storages) are hashed on a helper thread while the main thread writes them: both release the
    GIL, so a save costs about max(write, hash) instead of their sum (sha256 runs at ~0.5-2 GB/s, as fast as the
    write). Hash updates stay in order because each write waits for its own update before returning.
    """

    def __init__(self, f: BinaryIO, pool: ThreadPoolExecutor) -> None:
        self._f = f
        self._pool = pool
        self.sha256 = hashlib.sha256()
        self.size = 0
        self.error: OSError | None = None  # the first failed write: torch.save re-raises it as a bare RuntimeError

    def write(self, data: bytes | bytearray | memoryview) -> int:
        try:
            if len(data) >= _OVERLAP_MIN:
                pending = self._pool.submit(self.sha256.update, data)
                try:
                    n = self._f.write(data)
                finally:
                    pending.result()
            else:
                self.sha256.update(data)
                n = self._f.write(data)
        except OSError as exc:
            self.error = self.error or exc
            raise
        self.size += n
        return n

    def flush(self) -> None:
        self._f.flush()


def _fsync_dir(folder: Path) -> None:
    # Without this, a power loss after the rename can still lose the directory entry on some filesystems (ext4 with
    # data=writeback, XFS); fsync of the folder makes the new name itself durable.
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _remove_stale_temps(folder: Path) -> None:
    # A process killed mid-save leaves its temporary file; remove those of dead processes on this host so a crashing
    # job does not fill the disk with half buffers. Temps of other hosts (shared filesystems) are left alone.
    host = socket.gethostname()
    for p in folder.iterdir():
        match = _TEMP_RE.match(p.name)
        if match and match.group("host") == host and not _pid_alive(int(match.group("pid"))):
            p.unlink(missing_ok=True)


def save_checkpoint(run_dir: str | os.PathLike[str], step: int, state: dict[str, Any], keep: int) -> Path:
    """Atomically write ``state`` as the checkpoint of ``step``, then prune the run to its newest ``keep`` checkpoints.

    Args:
        run_dir: the run's output folder; checkpoints go to ``run_dir/checkpoints/`` (created if missing).
        step: the env-step counter the state belongs to (>= 0); it names the file.
        state: nested dicts/lists/tuples of tensors (any device; saved as their storages, no extra host copy for CPU
            tensors), numbers, strings, None -- e.g. adapters, heads, optimizer state_dicts, ``log_alpha``, the
            buffer's ``state_dict()`` and ``capture_rng_state()``. Keep it to those types so that it loads with
            ``weights_only=True``. A view is saved with its whole storage: ``clone()`` small views of big tensors.
        keep: number of newest checkpoints to keep (0 keeps all). The file just written is never pruned.

    Returns:
        The path of the written checkpoint.

    Raises:
        ValueError: ``step`` or ``keep`` is negative.
        CheckpointWriteError: a write, fsync, rename or pruning failed with an ``OSError`` (a full disk, a quota, an
            I/O error). A failure before the rename leaves no part of the new file and every earlier checkpoint
            intact; one after it (``written=True``) leaves the new file complete. The message names the file, the
            error and the free space.
    """
    if step < 0:
        raise ValueError(f"save_checkpoint: step={step} is negative; pass the run's env-step counter (>= 0).")
    if keep < 0:
        raise ValueError(f"save_checkpoint: keep={keep} is negative; pass K >= 1 to keep the last K, or 0 for all.")
    folder = checkpoint_dir(run_dir)
    final = checkpoint_path(run_dir, step)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        _write_atomic(folder, final, state)
    except OSError as exc:
        raise _write_error(final, exc, written=False) from exc
    try:
        _fsync_dir(folder)
        _prune(run_dir, keep, protect=final)
        _remove_stale_temps(folder)
    except OSError as exc:
        raise _write_error(final, exc, written=True) from exc
    return final


def _write_atomic(folder: Path, final: Path, state: dict[str, Any]) -> None:
    """Write ``state`` to a temporary file in ``folder``, fsync it and rename it to ``final``; on any failure remove
    the temporary file and raise (an ``OSError`` raised by a write inside ``torch.save`` is re-raised as itself)."""
    # Same folder as the final file, so the rename stays on one filesystem and is atomic; the leading dot and the
    # .tmp suffix keep it from ever matching a checkpoint name.
    tmp = folder / f".{final.name}.{os.getpid()}@{socket.gethostname()}.{uuid.uuid4().hex[:12]}.tmp"
    try:
        with open(tmp, "wb") as f:
            f.write(bytes(HEADER_SIZE))  # placeholder: an all-zero header never verifies (wrong magic)
            with ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoint-hash") as pool:
                writer = _HashingWriter(f, pool)
                try:
                    torch.save(state, writer)  # type: ignore[arg-type]  # torch only calls write() and flush()
                except RuntimeError as exc:
                    if writer.error is None:
                        raise
                    raise writer.error from exc  # torch reports a failed write as "unexpected pos": say what it was
            header = _HEADER.pack(MAGIC, FORMAT_VERSION, 0, writer.size, writer.sha256.digest())
            f.seek(0)
            f.write(header)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, final)
    except BaseException:
        with contextlib.suppress(OSError):  # the original error is the one to report
            tmp.unlink(missing_ok=True)
        raise


def _free_bytes(path: Path) -> int | None:
    """Free bytes on the filesystem of ``path`` (or of its nearest existing parent); None if it cannot be read."""
    for folder in (path, *path.parents):
        if folder.exists():
            try:
                return shutil.disk_usage(folder).free
            except OSError:
                return None
    return None


def _write_error(final: Path, exc: OSError, *, written: bool) -> CheckpointWriteError:
    """The error of a failed save: the file, the OS error, the free space, and the newest checkpoint left."""
    free = _free_bytes(final.parent)
    space = f"{free / 2**20:.1f} MiB free on its filesystem" if free is not None else "free space unknown"
    if written:
        what = (f"Checkpoint {final} was written completely, but a step after it (the folder's fsync, pruning older "
                f"checkpoints) failed: {exc}; {space}. The new file is complete and loads")
    else:
        others = [p for p in list_checkpoints(final.parent.parent) if p != final]
        left = f"the newest checkpoint left is {others[-1]}" if others else "no earlier checkpoint exists"
        what = f"Could not write checkpoint {final}: {exc}; {space}. No part of it was left on disk; {left}"
    return CheckpointWriteError(
        f"{what}. Free space (or lower checkpoint.keep / buffer.capacity) and continue with resume=auto, or set "
        "checkpoint.on_error=continue to keep training when a checkpoint fails.",
        final, free, written,
    )


def _prune(run_dir: str | os.PathLike[str], keep: int, protect: Path) -> None:
    paths = list_checkpoints(run_dir)
    newer = [p.name for p in paths if (checkpoint_step(p) or 0) > (checkpoint_step(protect) or 0)]
    if newer:
        # A resume from an explicit, older checkpoint: the newer files belong to an abandoned continuation, and
        # "auto" resume would prefer them. We do not delete them silently, but say so.
        warnings.warn(
            f"Checkpoint folder {protect.parent} holds checkpoints newer than the one just saved ({protect.name}): "
            f"{newer}. They come from an earlier continuation of this run; resume='auto' would pick them. Delete "
            "them if this run supersedes them.",
            stacklevel=3,
        )
    if keep == 0:
        return
    doomed = [p for p in paths if p != protect][: max(0, len(paths) - keep)]  # oldest step first
    for p in doomed:
        p.unlink(missing_ok=True)
    if doomed:
        _fsync_dir(protect.parent)


# ------------------------------------------------------------------------------------------------------------ load


def _verify(path: Path) -> None:
    """Check magic, version, size and sha256 of ``path``; raise CheckpointError naming the file and the reason."""
    try:
        st = path.stat()
    except FileNotFoundError:
        raise CheckpointError(f"Checkpoint {path} does not exist; check the path or use resume='auto'.") from None
    key = (str(path.resolve()), st.st_ino, st.st_size, st.st_mtime_ns)
    if key in _VERIFIED:
        return
    with open(path, "rb") as f:
        raw = f.read(HEADER_SIZE)
        if len(raw) < HEADER_SIZE:
            raise CheckpointError(
                f"Checkpoint {path} is truncated: {len(raw)} bytes, shorter than its {HEADER_SIZE}-byte header."
            )
        magic, version, _reserved, size, digest = _HEADER.unpack(raw)
        if magic != MAGIC:
            raise CheckpointError(
                f"Checkpoint {path} has no sacglam header (magic {magic!r}, expected {MAGIC!r}): not written by "
                "save_checkpoint, or its header was never completed."
            )
        if version != FORMAT_VERSION:
            raise CheckpointError(
                f"Checkpoint {path} has format version {version}; this sacglam reads version {FORMAT_VERSION}. "
                "Load it with the sacglam version that wrote it."
            )
        if st.st_size != HEADER_SIZE + size:
            raise CheckpointError(
                f"Checkpoint {path} is truncated or padded: {st.st_size - HEADER_SIZE} payload bytes on disk, "
                f"{size} recorded in its header."
            )
        h = hashlib.sha256()
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    if h.digest() != digest:
        raise CheckpointError(
            f"Checkpoint {path} is corrupt: payload sha256 {h.hexdigest()} differs from {digest.hex()} in its header."
        )
    _VERIFIED[key] = digest.hex()


def verify_checkpoint(path: str | os.PathLike[str]) -> None:
    """Verify a checkpoint's header, size and payload sha256 without loading it.

    Raises:
        CheckpointError: the file is missing, truncated, corrupt or of another format version (message names it).
    """
    _verify(Path(path))


def load_checkpoint(
    path: str | os.PathLike[str],
    map_location: str | torch.device | None = None,
    *,
    weights_only: bool = True,
) -> dict[str, Any]:
    """Verify and load a checkpoint written by ``save_checkpoint``.

    Args:
        path: the checkpoint file.
        map_location: where tensors go (``torch.load`` semantics), e.g. ``"cpu"`` or the run's device.
        weights_only: load with torch's restricted unpickler (tensors, containers, numbers, strings). Pass False only
            for a trusted file whose state holds other Python objects.

    Returns:
        The ``state`` dict that was saved.

    Raises:
        CheckpointError: the file is missing, truncated, corrupt, of another format, or holds objects that
            ``weights_only=True`` refuses (the message names the file and the fix).
    """
    p = Path(path)
    _verify(p)
    with open(p, "rb") as f:
        f.seek(HEADER_SIZE)  # torch's zip reader takes the current position as the start of the archive
        try:
            state = torch.load(f, map_location=map_location, weights_only=weights_only)
        except pickle.UnpicklingError as e:
            raise CheckpointError(
                f"Checkpoint {p} holds objects that weights_only=True refuses ({e}). Keep checkpoint state to "
                "tensors, numbers, strings and containers, or pass weights_only=False for a file you trust."
            ) from e
    if not isinstance(state, dict):
        raise CheckpointError(f"Checkpoint {p} holds a {type(state).__name__}, expected the dict save_checkpoint got.")
    return state


def find_latest_checkpoint(run_dir: str | os.PathLike[str]) -> Path | None:
    """The newest complete checkpoint of a run, or None when there is none.

    Looks in ``run_dir/checkpoints/``. Temporary files (a save that was interrupted) and checkpoints whose header,
    size or sha256 do not verify are skipped with a ``warnings.warn`` naming the file and the reason; they are never
    loaded. Verification hashes the newest file in full (cached for the following ``load_checkpoint``).
    """
    folder = checkpoint_dir(run_dir)
    if not folder.is_dir():
        return None
    for p in sorted(folder.iterdir()):
        if p.name.endswith(".tmp"):
            warnings.warn(
                f"Skipping {p}: a temporary file from an interrupted save (the process died before its atomic "
                "rename). It is never loaded; delete it to reclaim space.",
                stacklevel=2,
            )
    for p in reversed(list_checkpoints(run_dir)):
        try:
            _verify(p)
        except CheckpointError as e:
            warnings.warn(f"Skipping checkpoint {p}: {e}", stacklevel=2)
            continue
        return p
    return None


def resolve_resume(resume: str | os.PathLike[str] | None, run_dir: str | os.PathLike[str]) -> Path | None:
    """Turn the ``resume`` option into the checkpoint to load, or None to start fresh.

    Args:
        resume: ``"auto"`` (newest complete checkpoint of ``run_dir``, None if there is none), ``"never"`` or None
            (start fresh), or a path: a checkpoint file, a run folder, or its ``checkpoints`` folder (newest
            complete checkpoint in it).
        run_dir: the current run's output folder.

    Returns:
        The checkpoint path (for a folder, verified; for a file, verified by ``load_checkpoint``), or None.

    Raises:
        FileNotFoundError: an explicit path does not exist, or a folder holds no complete checkpoint.
    """
    if resume is None or str(resume) == "never":
        return None
    if str(resume) == "auto":
        return find_latest_checkpoint(run_dir)
    p = Path(resume)
    if p.is_file():
        return p
    if p.is_dir():
        run = p.parent if p.name == CHECKPOINT_DIRNAME and not checkpoint_dir(p).is_dir() else p
        latest = find_latest_checkpoint(run)
        if latest is None:
            raise FileNotFoundError(
                f"resume={str(resume)!r}: no complete checkpoint in {checkpoint_dir(run)}. Point it at a checkpoint "
                'file or a run folder that has one, or use resume="auto" / "never".'
            )
        return latest
    raise FileNotFoundError(
        f'resume={str(resume)!r} is neither "auto", "never", nor an existing checkpoint file or run folder.'
    )


# ------------------------------------------------------------------------------------------------ lean agent state
#
# With a frozen base (LoRA through peft, with or without ``model.lora.top_layers``) the base weights never change, yet
# they were most of every checkpoint (723 MB of the SmolLM2 run's). A lean checkpoint leaves them out and names the
# base instead; the run that loads it rebuilds the base from its config (as it does anyway) and checks that it is the
# same one. Full fine-tuning has no frozen base: its checkpoints hold every weight, as before.

_SAMPLES_PER_TENSOR = 8
# Config entries that differ between runs of the same weights (dtype, attention kernel, cache, versions, paths).
_VOLATILE_CONFIG_KEYS = frozenset({"transformers_version", "torch_dtype", "dtype", "_name_or_path", "use_cache",
                                   "_attn_implementation", "attn_implementation", "_attn_implementation_autoset",
                                   "_commit_hash", "_attn_implementation_internal", "output_attentions"})


def _peft_modules(agent: nn.Module) -> list[tuple[str, nn.Module]]:
    """The outermost peft models inside ``agent`` (modules with a non-empty ``peft_config``), by their name."""
    found: list[tuple[str, nn.Module]] = []
    for name, module in agent.named_modules():
        adapters = getattr(module, "peft_config", None)
        inside = any(name.startswith(f"{outer}.") or not outer for outer, _ in found)
        if isinstance(adapters, Mapping) and adapters and not inside:
            found.append((name, module))
    return found


def frozen_base_keys(agent: nn.Module) -> list[str]:
    """The ``agent.state_dict()`` keys of the frozen base weights under a peft model: parameters that do not require
    grad and belong to no adapter (no dot-separated part of their name is an adapter's name). A target adapter, which
    changes by Polyak averaging without a gradient, is an adapter and so is kept. Empty for full fine-tuning.
    Buffers are never counted as frozen (transformer LMs keep none that is large and persistent)."""
    keys: list[str] = []
    for prefix, module in _peft_modules(agent):
        adapters = set(getattr(module, "peft_config"))  # noqa: B009 - duck-typed: no peft import here
        for name, param in module.named_parameters(remove_duplicate=False):
            if not param.requires_grad and adapters.isdisjoint(name.split(".")):
                keys.append(f"{prefix}.{name}" if prefix else name)
    return keys


def _config_sha256(agent: nn.Module) -> str:
    """sha256 of the base model's config (``config.to_dict()`` without its volatile entries) as sorted JSON."""
    configs = []
    for _, module in _peft_modules(agent):
        config = getattr(module, "config", None)
        to_dict = getattr(config, "to_dict", None)
        raw = to_dict() if callable(to_dict) else {}
        configs.append({k: v for k, v in raw.items() if k not in _VOLATILE_CONFIG_KEYS})
    return hashlib.sha256(json.dumps(configs, sort_keys=True, default=str).encode()).hexdigest()


def _samples(t: torch.Tensor) -> torch.Tensor:
    """``_SAMPLES_PER_TENSOR`` elements of ``t`` at evenly spaced flat positions (first and last included), float32.

    Args:
        t: any tensor (any shape, device and floating dtype); an empty one gives zeros.

    Returns:
        ``[_SAMPLES_PER_TENSOR]`` float32 on ``t``'s device.
    """
    flat = t.detach().reshape(-1)
    if flat.numel() == 0:
        return torch.zeros(_SAMPLES_PER_TENSOR, device=t.device)
    last = flat.numel() - 1  # integer positions: a float32 linspace rounds past the end of a 28M-element tensor
    idx = torch.tensor([i * last // (_SAMPLES_PER_TENSOR - 1) for i in range(_SAMPLES_PER_TENSOR)], device=t.device)
    return flat[idx].float()


def base_identity(agent: nn.Module, name: str, keys: list[str] | None = None) -> dict[str, Any]:
    """The identity of ``agent``'s frozen base: its name and a cheap fingerprint of its config and weights.

    The fingerprint is the sha256 of the config (without dtype, attention kernel, versions and paths), the sha256 of
    the frozen tensors' names and shapes, and 8 elements of every frozen tensor at fixed evenly spaced positions
    (``samples``, one small device-to-host copy; no pass over the weights). It catches another model, another size
    or layout, another config, another initialisation or another pretrained checkpoint of the same architecture (its
    weights differ at almost every position). It does not catch edits confined to elements it does not sample (a
    few rows changed by hand), and with another dtype (bf16 against fp32) the samples are compared to bf16 precision,
    so a base fine-tuned by less than about 1% relative change could pass.

    Args:
        agent: the agent (or any module) holding the peft model.
        name: the base's name or path as configured (``model.name``).
        keys: ``frozen_base_keys(agent)`` when the caller already has them.

    Returns:
        ``{"name", "dtype", "tensors", "config_sha256", "structure_sha256", "samples"}``: strings, an int and a
        ``[tensors, 8]`` float32 CPU tensor (``weights_only``-safe).
    """
    keys = frozen_base_keys(agent) if keys is None else keys
    state = agent.state_dict()
    tensors = [state[k] for k in keys]
    shapes = [[k, list(t.shape)] for k, t in zip(keys, tensors, strict=True)]
    samples = torch.stack([_samples(t) for t in tensors]).cpu() if tensors else torch.zeros(0, _SAMPLES_PER_TENSOR)
    return {
        "name": name,
        "dtype": str(tensors[0].dtype) if tensors else "none",
        "tensors": len(tensors),
        "config_sha256": _config_sha256(agent),
        "structure_sha256": hashlib.sha256(json.dumps(shapes).encode()).hexdigest(),
        "samples": samples,
    }


def _describe_base(identity: Mapping[str, Any]) -> str:
    weights = hashlib.sha256(torch.as_tensor(identity["samples"]).float().numpy().tobytes()).hexdigest()
    return (f"{identity['name']!r} ({identity['tensors']} frozen tensors, {identity['dtype']}, config "
            f"{identity['config_sha256'][:12]}, shapes {identity['structure_sha256'][:12]}, weights {weights[:12]})")


def base_differences(saved: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """What differs between two :func:`base_identity` results: a subset of ``["config", "shapes", "weights"]``.

    Weight samples of the same dtype must be equal; across dtypes they must agree to bf16 precision (relative
    ``2**-7``, absolute ``1e-6``), so a run evaluated in bf16 still loads a checkpoint trained in fp32.
    """
    diffs = []
    if saved["config_sha256"] != current["config_sha256"]:
        diffs.append("config")
    if saved["structure_sha256"] != current["structure_sha256"]:
        diffs.append("shapes")
        return diffs  # samples of other shapes are not comparable
    a, b = torch.as_tensor(saved["samples"]).float().cpu(), torch.as_tensor(current["samples"]).float().cpu()
    same = torch.equal(a, b) if saved["dtype"] == current["dtype"] else torch.allclose(a, b, rtol=2**-7, atol=1e-6)
    if not same:
        diffs.append("weights")
    return diffs


def agent_state(agent: nn.Module, base_name: str, *, lean: bool = True) -> dict[str, Any]:
    """The agent's entries of a checkpoint: ``{"agent": its state dict}``, and with a frozen base and ``lean``, the
    state dict without the base weights plus ``"base"``: the base's :func:`base_identity`.

    Args:
        agent: the agent (SAC, PPO or ETO's), an ``nn.Module``.
        base_name: the configured base model (``model.name``), recorded to name it in errors.
        lean: leave the frozen base out (``checkpoint.lean``); full fine-tuning saves every weight either way.
    """
    state = agent.state_dict()
    keys = frozen_base_keys(agent) if lean else []
    if not keys:
        return {"agent": state}
    frozen = set(keys)
    kept = OrderedDict((k, v) for k, v in state.items() if k not in frozen)
    kept._metadata = getattr(state, "_metadata", None)  # type: ignore[attr-defined]  # module versions for loading
    return {"agent": kept, "base": base_identity(agent, base_name, keys)}


def load_agent_state(agent: nn.Module, state: Mapping[str, Any], path: str | os.PathLike[str],
                     base_name: str) -> None:
    """Load a checkpoint's agent weights into ``agent``: a full state dict (full fine-tuning, ``checkpoint.lean=false``
    or a checkpoint written before lean ones) as is; a lean one over the base the run rebuilt, once that base is
    checked to be the checkpoint's.

    Args:
        agent: the freshly built agent, with its base model loaded from the run's config.
        state: the checkpoint's state (``state["agent"]`` and, for a lean one, ``state["base"]``).
        path: the checkpoint file, for messages.
        base_name: this run's ``model.name``.

    Raises:
        ValueError: the checkpoint was written over another base (the message names both and what differs), or
            its weights do not fill exactly the trainable part of this agent.
        RuntimeError: from ``load_state_dict``, a full state dict that does not fit the agent.
    """
    saved = state.get("base")
    if saved is None:
        agent.load_state_dict(state["agent"])
        return
    keys = frozen_base_keys(agent)
    current = base_identity(agent, base_name, keys)
    diffs = base_differences(saved, current)
    if diffs:
        raise ValueError(
            f"{path} was written over the base model {_describe_base(saved)}; this run's base model is "
            f"{_describe_base(current)}: their {', '.join(diffs)} differ. Resume with the checkpoint's base "
            f"(model.name={saved['name']} and the same model options) or start a new run folder."
        )
    missing, unexpected = agent.load_state_dict(state["agent"], strict=False)
    wrong = sorted(set(missing) ^ set(keys))
    if unexpected or wrong:
        raise ValueError(
            f"{path} is a lean checkpoint whose weights do not fit this agent's trainable part: unexpected "
            f"{sorted(unexpected)[:5]}, missing or extra {wrong[:5]}; were model.lora.* or agent.* options changed?"
        )


# ------------------------------------------------------------------------------------------------------------- RNG


def capture_rng_state(generators: Mapping[str, torch.Generator] | None = None) -> dict[str, Any]:
    """Capture every random state a run draws from, as tensors, ints, floats and strings (``weights_only``-safe).

    Args:
        generators: named ``torch.Generator`` objects owned by the run (e.g. ``{"buffer": g1, "actor": g2}``), CPU
            or CUDA.

    Returns:
        ``{"python": random.getstate(), "numpy": {...}, "torch_cpu": ByteTensor, "torch_cuda": [ByteTensor per
        device] (only when CUDA is available), "generators": {name: ByteTensor}}``.
    """
    kind, key, pos, has_gauss, gauss = np.random.get_state(legacy=True)
    state: dict[str, Any] = {
        "python": random.getstate(),
        # numpy arrays are not weights_only-loadable; the 624-word MT19937 key travels as an int64 tensor instead.
        "numpy": {
            "kind": str(kind),
            "key": torch.from_numpy(np.asarray(key, dtype=np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "gauss": float(gauss),
        },
        "torch_cpu": torch.get_rng_state(),
        "generators": {name: g.get_state() for name, g in (generators or {}).items()},
    }
    if torch.cuda.is_available():
        state["torch_cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: Mapping[str, Any], generators: Mapping[str, torch.Generator] | None = None) -> None:
    """Restore what ``capture_rng_state`` captured, so later draws equal those of an uninterrupted process.

    Args:
        state: a dict from ``capture_rng_state`` (possibly round-tripped through a checkpoint).
        generators: the run's named generators to restore in place; every name must be in ``state["generators"]``.

    Raises:
        KeyError: a generator name passed here was not captured (the message lists the captured ones).
    """
    saved = state.get("generators", {})
    missing = sorted(set(generators or {}) - set(saved))
    if missing:
        raise KeyError(
            f"restore_rng_state: generators {missing} were not captured (captured: {sorted(saved)}); pass the same "
            "names to capture_rng_state when saving."
        )
    random.setstate(_as_python_state(state["python"]))
    npst = state["numpy"]
    key = np.asarray(torch.as_tensor(npst["key"]).cpu().numpy(), dtype=np.uint32)
    np.random.set_state((npst["kind"], key, int(npst["pos"]), int(npst["has_gauss"]), float(npst["gauss"])))
    torch.set_rng_state(torch.as_tensor(state["torch_cpu"]).cpu())
    if "torch_cuda" in state:
        if torch.cuda.is_available():
            cuda_states = list(state["torch_cuda"])
            if len(cuda_states) != torch.cuda.device_count():
                warnings.warn(
                    f"restore_rng_state: {len(cuda_states)} CUDA RNG states saved, {torch.cuda.device_count()} "
                    "devices now; restoring the first ones only, so CUDA draws will not match the original run.",
                    stacklevel=2,
                )
            for i, s in enumerate(cuda_states[: torch.cuda.device_count()]):
                torch.cuda.set_rng_state(s.cpu(), device=i)
        else:
            warnings.warn(
                "restore_rng_state: the checkpoint has CUDA RNG states but CUDA is not available; they are skipped.",
                stacklevel=2,
            )
    for name, g in (generators or {}).items():
        g.set_state(saved[name].cpu())


def _as_python_state(s: Any) -> tuple[Any, ...]:
    # random.setstate wants (version, tuple of 625 ints, gauss_next) exactly; lists (e.g. after a JSON or YAML round
    # trip) are turned back into tuples.
    version, internal, gauss_next = s
    return (int(version), tuple(int(x) for x in internal), gauss_next)
