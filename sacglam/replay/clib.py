"""Building and loading the replay buffer's C library (``csrc/sample.c`` and ``csrc/add.c``) with the system C
compiler, the ctypes mirrors of its argument structs, and ``advise_huge_pages`` for large CPU tensors.

The shared library is compiled on first use (``cc -O3``, a few seconds) into a cache folder keyed by the sources'
hash (``$SACGLAM_CACHE`` or ``~/.cache/sacglam``), written atomically, so concurrent processes and later runs reuse it.
Without a working compiler ``load()`` returns None and says why in ``load_error()``; the buffer then adds and samples
with torch (``buffer.native=auto``) or stops with that reason (``buffer.native=on``). The writer and sampler that call
the library are in ``sacglam.replay.native``.

This module needs only the standard library (ctypes); it names torch for type hints only.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

SOURCES = (Path(__file__).with_name("csrc") / "sample.c", Path(__file__).with_name("csrc") / "add.c")
FLAGS = ("-O3", "-shared", "-fPIC", "-std=c11", "-pthread")

_P, _I, _D = ctypes.c_void_p, ctypes.c_int64, ctypes.c_double


class SampleArgs(ctypes.Structure):
    """Mirror of the C struct ``SampleArgs`` (same field order); pointers are tensor ``data_ptr()`` values."""

    _fields_ = [
        *[(name, _P) for name in (
            "rows", "ranks", "eps", "goal_count", "goal_limit", "goal_len", "heads", "obs", "next_obs", "cands",
            "next_cands", "cand_len", "next_cand_len", "policy_version", "post", "powers")],
        *[(name, _I) for name in (
            "row_w", "rank_w", "head_w", "n_post", "tok_w", "N", "CN", "n_step", "G", "Lo", "K", "Lc", "Lp", "pre_mid",
            "token_bytes", "pad_id", "strategy", "her_on", "m")],
        ("ratio", _D),
        ("cum", _P), ("base", _P), ("total_f", _D), ("total_m1", _I),
        ("rare_cdf", _P), ("rare_total", _D),
        ("draws", _P), ("draw_w", _I), ("B", _I), ("rare_u", _P), ("R", _I), ("scratch", _P),
        *[(name, _P) for name in (
            "prompt_ids", "next_prompt_ids", "prompt_mask", "next_prompt_mask", "cand_ids", "next_cand_ids",
            "cand_mask", "next_cand_mask", "action", "n_steps", "goal", "goal_gap",
            "goal_limit_out", "policy_version_out", "reward", "discount", "logp", "terminated", "truncated",
            "relabelled")],
        ("threads", _I),
    ]  # fmt: skip


class AddArgs(ctypes.Structure):
    """Mirror of the C struct ``AddArgs`` in ``csrc/add.c`` (same field order)."""

    _fields_ = [
        *[(name, _P) for name in (
            "tok", "obs_len", "next_obs_len", "terminated", "truncated", "episode", "policy_version", "reward", "logp",
            "rows", "ranks", "eps", "rare_goal", "goal_count", "goal_limit", "cur_start", "cur_k", "cur_step",
            "cur_ach", "lo")],
        *[(name, _I) for name in (
            "tok_w", "token_bytes", "row_w", "rank_w", "N", "C", "G", "Lo", "K", "Lc", "pad_id", "token_max",
            "n_goals", "counts_goals", "max_limit", "P")],
        *[(name, _P) for name in (
            "obs", "obs_len_in", "next_obs", "next_obs_len_in", "cands", "cand_len_in", "next_cands",
            "next_cand_len_in", "goal", "action", "achieved", "policy_version_in", "reward_in", "logp_in",
            "terminated_in", "truncated_in")],
        *[(name, _I) for name in ("Lo_in", "K_in", "Lc_in", "G_in")],
        ("scratch", _P), ("stats", _P),
    ]  # fmt: skip


_error: list[str] = []
_MADV_HUGEPAGE = 14  # linux/mman.h
_HUGE = 2 << 20


def advise_huge_pages(t: torch.Tensor) -> bool:
    """Ask Linux to back a large, not yet touched CPU tensor with 2 MiB pages (``madvise(MADV_HUGEPAGE)``).

    Random row reads of a buffer of hundreds of MB miss the TLB on nearly every row with 4 KiB pages (expensive under
    a hypervisor); with huge pages the page walks mostly disappear. Call it before the first write: pages touched
    before are only collapsed later by the kernel, if at all. Returns False where it does not apply (not Linux, THP
    off, too small); never raises.
    """
    nbytes = t.numel() * t.element_size()
    if nbytes < 2 * _HUGE or not os.path.exists("/sys/kernel/mm/transparent_hugepage/enabled"):
        return False
    start = (t.data_ptr() + _HUGE - 1) // _HUGE * _HUGE  # the 2 MiB-aligned interior of the allocation
    end = (t.data_ptr() + nbytes) // _HUGE * _HUGE
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        return bool(end > start and libc.madvise(start, end - start, _MADV_HUGEPAGE) == 0)
    except (OSError, AttributeError):
        return False


def cache_dir() -> Path:
    """Where built libraries live: ``$SACGLAM_CACHE`` or ``~/.cache/sacglam``, one subfolder per source hash."""
    root = os.environ.get("SACGLAM_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "sacglam")
    return Path(root) / "native"


def _compiler() -> str | None:
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return name
    return None


def build(force: bool = False, timing: bool = False) -> Path:
    """Compile the C sources into the cache (atomically) unless an identical build is there; return the library path.

    ``timing`` builds the variant that sums each sampler pass's time into ``sacglam_pass_us`` (a few clock reads per
    call; ``scripts/bench_buffer.py --passes`` reads it).

    Raises:
        RuntimeError: no C compiler, or the compilation failed (with the compiler's message).
    """
    cc = _compiler()
    if cc is None:
        raise RuntimeError("no C compiler found (tried $CC, cc, gcc, clang); install one (e.g. apt-get install gcc) "
                           "or set buffer.native=off")
    flags = (*FLAGS, "-DSACGLAM_TIMING") if timing else FLAGS
    sources = b"".join(path.read_bytes() for path in SOURCES)
    key = hashlib.sha256(sources + " ".join((cc, *flags)).encode()).hexdigest()[:16]
    lib = cache_dir() / key / "libsacglam_native.so"
    if lib.exists() and not force:
        return lib
    lib.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=lib.parent)
    os.close(fd)
    first_error = ""
    try:
        # Per-CPU clones of the hot function first; a compiler that does not know their target names (GCC < 12)
        # builds the portable baseline instead.
        for extra in ((), ("-DSACGLAM_NO_CLONES",)):
            run = subprocess.run([cc, *flags, *extra, *map(str, SOURCES), "-o", tmp], capture_output=True,
                                 text=True, timeout=120)
            if run.returncode == 0:
                break
            first_error = first_error or run.stderr
        else:
            raise RuntimeError(f"compiling {' '.join(map(str, SOURCES))} with {cc} failed:\n{first_error[-2000:]}")
        os.replace(tmp, lib)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return lib


@lru_cache(maxsize=2)
def load(timing: bool = False) -> ctypes.CDLL | None:
    """The loaded library with ``sacglam_sample`` and ``sacglam_add`` typed, or None when it cannot be built (see
    ``load_error``); ``timing``: the variant of ``build(timing=True)``."""
    try:
        lib = ctypes.CDLL(str(build(timing=timing)))
    except (OSError, RuntimeError, subprocess.TimeoutExpired) as exc:
        _error.append(str(exc))
        return None
    lib.sacglam_sample.argtypes = [ctypes.POINTER(SampleArgs)]
    lib.sacglam_sample.restype = ctypes.c_int
    lib.sacglam_add.argtypes = [ctypes.POINTER(AddArgs)]
    lib.sacglam_add.restype = ctypes.c_int
    lib.sacglam_wake.argtypes = [ctypes.c_int64, ctypes.c_int64]
    lib.sacglam_wake.restype = None
    return lib


def load_error() -> str:
    """Why ``load()`` returned None (empty when it did not)."""
    return _error[-1] if _error else ""


__all__ = ["SOURCES", "AddArgs", "SampleArgs", "advise_huge_pages", "build", "cache_dir", "load", "load_error"]
