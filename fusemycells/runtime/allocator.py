"""How the process gets memory from the system: the one place that sets glibc's malloc and numpy's
huge-page hint.

The streamed passes over the input grid (blend slabs, output slabs) allocate and free the same
tens-to-hundreds-of-MiB temporaries again and again. glibc serves each block above its mmap
threshold (at most 32 MiB) with a fresh ``mmap`` and unmaps it on ``free``, so every slab is
faulted in and zeroed by the kernel again: on a 120×1200×1200 stack the non-network steps
faulted in ≈ 10 GiB, 7.9 of 20.8 CPU seconds in the kernel (``/usr/bin/time -v`` of
``bench_stages.py``'s worker; README, *Memory reuse*). Inside :func:`reuse_freed_memory` big
blocks come from the heap instead and freed ones are reused as they are; on entering and leaving
it, the free heap is handed back (``malloc_trim``), so the retained memory never outlives the step. Outside
Linux/glibc these are no-ops.
"""

from __future__ import annotations

import ctypes
import platform
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_MMAP_MAX, M_ARENA_MAX = -1, -3, -4, -8
"""``mallopt`` parameters (glibc's malloc.h)."""
MMAP_THRESHOLD = 32 * 2**20
"""Blocks above this are mapped and unmapped one by one outside :func:`reuse_freed_memory` (glibc's maximum)."""
TRIM_THRESHOLD = 64 * 2**20
"""Free memory at the top of the heap kept for reuse outside :func:`reuse_freed_memory` (bytes)."""
MMAP_MAX_DEFAULT = 65536
"""glibc's default cap on mapped blocks (restored on leaving :func:`reuse_freed_memory`)."""

_depth = 0
_lock = threading.Lock()


@cache
def _glibc() -> ctypes.CDLL | None:
    """The C library when it is glibc with ``mallopt`` and ``malloc_trim``, else None."""
    if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return None
    return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None


def available() -> bool:
    """Whether this process's allocator can be tuned (Linux with glibc)."""
    return _glibc() is not None


def configure() -> None:
    """Process-wide settings for a run, called once at start-up (the container's and the CLI's entry points).

    One malloc arena (as the image's ``MALLOC_ARENA_MAX=1``: per-thread arenas each keep their freed
    blocks; 133 MiB less peak RSS on the patch-stage benchmark, see the Dockerfile), fixed mmap and
    trim thresholds (glibc's moving ones depend on the order of frees), and numpy's ``MADV_HUGEPAGE``
    hint off: on this project's development host (THP ``madvise``, defrag ``madvise``) first touching
    a 486 MiB float32 array cost 0.41 s with the hint (the kernel compacts memory to find huge pages)
    against 0.28–0.33 s without, and the whole non-network run on 120×1200×1200 took 12.2 s with it,
    9.9 s without (same worker, ``NUMPY_MADVISE_HUGEPAGE=0``).
    """
    libc = _glibc()
    if libc is not None:
        libc.mallopt(M_ARENA_MAX, 1)
        libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)
        libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD)
    import numpy as np

    setter = getattr(getattr(np, "_core", np).multiarray, "_set_madvise_hugepage", None)
    if setter is not None:  # the runtime form of NUMPY_MADVISE_HUGEPAGE=0 (numpy reads that at import only)
        setter(False)


@contextmanager
def reuse_freed_memory() -> Iterator[None]:
    """Within the block, every allocation comes from the heap and freed blocks are reused without being
    unmapped (no page faults for the next slab of the same size); on entering and on leaving the outermost
    block the free heap is returned to the system. For streamed passes whose temporaries repeat; the
    process's peak RSS then includes what the pass freed but kept. Not for steps that allocate buffers
    outliving them (the patch stage's row caches): freed later, outside the block, such a heap block stays a
    resident hole (measured: the level-2 fallback after a stopped sliding window peaked ≈ 1 GiB higher on
    309×1920×1920 when the sliding window ran inside a block)."""
    global _depth
    libc = _glibc()
    if libc is None:
        yield
        return
    with _lock:
        _depth += 1
        if _depth == 1:
            libc.malloc_trim(0)  # blocks freed since the last step (e.g. its row caches) are not kept resident
            libc.mallopt(M_TRIM_THRESHOLD, 2**31 - 1)  # an int: 2 GiB
            libc.mallopt(M_MMAP_MAX, 0)
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0:
                libc.mallopt(M_MMAP_MAX, MMAP_MAX_DEFAULT)
                libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD)
                libc.malloc_trim(0)
