"""The allocator settings: freed slabs reused inside a streamed step, memory handed back after it."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

from fusemycells.runtime import allocator

glibc_only = pytest.mark.skipif(not allocator.available(), reason="glibc's mallopt/malloc_trim only (Linux)")

SLAB = 64 * 2**20  # above glibc's largest mmap threshold: mapped anew for every slab by default


def run_child(code: str) -> dict:
    """Run ``code`` in a fresh interpreter (allocator state is process-wide) and parse the JSON it prints."""
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


FAULTS = """
    import json, resource
    import numpy as np
    from fusemycells.runtime import allocator

    def faulted_mib(repeats=8):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        for _ in range(repeats):
            slab = np.empty({slab} // 4, dtype=np.float32)
            slab.fill(1.0)  # touch every page, as a slab's computation does
            del slab
        return (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) * resource.getpagesize() / 2**20

    def rss_mib():
        for line in open("/proc/self/status"):
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024

    allocator.configure()
    outside = faulted_mib()
    with allocator.reuse_freed_memory():
        inside = faulted_mib()
        held = rss_mib()
    after = rss_mib()
    print(json.dumps({{"outside": outside, "inside": inside, "held": held, "after": after}}))
"""


@glibc_only
def test_freed_slabs_are_reused_inside_and_handed_back_after():
    figures = run_child(FAULTS.format(slab=SLAB))
    slab_mib = SLAB / 2**20
    # outside: every one of the 8 slabs is faulted in anew (numpy's huge-page hint is off: 4 KiB pages)
    assert figures["outside"] >= 6 * slab_mib
    # inside: the first slab is faulted in, the others reuse its pages
    assert figures["inside"] <= 2 * slab_mib
    # the reused slab was resident inside the block and is returned to the system on leaving it
    assert figures["held"] - figures["after"] >= 0.8 * slab_mib


@glibc_only
def test_nested_blocks_restore_the_defaults_only_when_the_outermost_ends():
    figures = run_child(
        FAULTS.replace(
            "    with allocator.reuse_freed_memory():\n        inside = faulted_mib()",
            "    with allocator.reuse_freed_memory():\n        with allocator.reuse_freed_memory():\n"
            "            pass\n        inside = faulted_mib()",
        ).format(slab=SLAB)
    )
    assert figures["inside"] <= 2 * SLAB / 2**20  # still reusing after the inner block ended


def test_blocks_work_where_the_allocator_cannot_be_tuned(monkeypatch):
    monkeypatch.setattr(allocator, "_glibc", lambda: None)
    with allocator.reuse_freed_memory():
        with allocator.reuse_freed_memory():
            values = [1, 2, 3]
    assert values == [1, 2, 3]
    allocator.configure()  # numpy's hint only

