"""Device and memory policy: the one place that decides where and how big the work runs.

Everything that depends on the machine (device choice, fp16, patch batch size, CPU threads,
memory limits) is decided here and recorded in the run report.
"""

from __future__ import annotations

import logging
import os
import resource
import sys
from dataclasses import dataclass, field

log = logging.getLogger(__name__)

VRAM_SAFE_FRACTION = 0.8
"""Share of the free device memory used when no ``--vram-budget`` is given."""


def cuda_available() -> bool:
    """True when torch sees a CUDA device (False when torch is missing or CPU-only)."""
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


def choose_device(requested: str) -> str:
    """'cuda' or 'cpu' for a ``--device`` value; 'cuda' without a GPU is an error, 'auto' falls back."""
    if requested not in ("auto", "cuda", "cpu"):
        raise ValueError(f"unknown device '{requested}' (expected auto, cuda or cpu)")
    if requested == "cpu":
        return "cpu"
    if cuda_available():
        return "cuda"
    if requested == "cuda":
        raise RuntimeError("--device cuda requested but no CUDA device is available")
    return "cpu"


def free_vram_gib() -> float | None:
    """Free memory of CUDA device 0 in GiB, or None without CUDA."""
    if not cuda_available():
        return None
    import torch

    free, _total = torch.cuda.mem_get_info()
    return free / 2**30


def peak_rss_mib() -> float:
    """Peak resident set size of this process so far (MiB)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (2**20 if sys.platform == "darwin" else 2**10)


def available_ram_bytes() -> int | None:
    """Memory the process may still use: MemAvailable, capped by a cgroup limit when one is set."""
    candidates: list[int] = []
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    candidates.append(int(line.split()[1]) * 1024)
    except OSError:
        pass
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            text = open(path).read().strip()
        except OSError:
            continue
        if text.isdigit() and int(text) < 1 << 60:
            usage_path = path.replace("memory.max", "memory.current").replace("limit_in_bytes", "usage_in_bytes")
            try:
                used = int(open(usage_path).read().strip())
            except (OSError, ValueError):
                used = 0
            candidates.append(int(text) - used)
    return min(candidates) if candidates else None


@dataclass
class BudgetPolicy:
    """Run-wide decisions; mutable so that a fallback found once is kept for later patches and files."""

    device: str
    half: bool
    vram_budget_gib: float | None
    time_budget_s: float | None
    threads: int | None
    events: list[str] = field(default_factory=list)

    @classmethod
    def create(cls, device: str, vram_budget_gib: float | None, time_budget_s: float | None, threads: int | None) -> BudgetPolicy:
        chosen = choose_device(device)
        if chosen == "cuda" and vram_budget_gib is None:
            free = free_vram_gib()
            vram_budget_gib = None if free is None else round(free * VRAM_SAFE_FRACTION, 2)
        if threads is None:
            threads = os.cpu_count() or 1
        policy = cls(
            device=chosen,
            half=chosen == "cuda",
            vram_budget_gib=vram_budget_gib,
            time_budget_s=time_budget_s,
            threads=threads,
        )
        log.info("device %s (fp16 %s), VRAM budget %s GiB, time budget %s s, %d CPU threads", policy.device, policy.half, vram_budget_gib, time_budget_s, threads)
        return policy

    def patch_batch_size(self, manifest_batch: int) -> int:
        """Patches per forward call: the manifest's value (the OOM ladder may lower it later)."""
        return max(1, manifest_batch)

    def as_report(self) -> dict[str, object]:
        return {
            "device": self.device,
            "fp16": self.half,
            "vram_budget_gib": self.vram_budget_gib,
            "time_budget_s": self.time_budget_s,
            "threads": self.threads,
            "events": list(self.events),
        }
