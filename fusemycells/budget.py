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

import numpy as np

log = logging.getLogger(__name__)

VRAM_SAFE_FRACTION = 0.8
"""Share of the free device memory used when no ``--vram-budget`` is given."""
RAM_SAFE_FRACTION = 0.85
"""Share of the available RAM a file may need when no ``--ram-budget`` is given."""


def estimate_peak_bytes(shape: tuple[int, int, int], itemsize: int, spacing: tuple[float, float, float], target_spacing: float) -> int:
    """Conservative peak host memory (bytes) of :meth:`Fuser.fuse` for a ZYX stack.

    Input pixels (``itemsize`` each) + two float32 input-grid arrays (the normalised input and a
    transient) + three float32 arrays on the high-resolution grid (the resampled input, the
    upsampled stage-1 prediction, the stitched prediction) + a fixed 512 MiB for the networks.
    """
    n_input = float(np.prod(shape, dtype=np.float64))
    n_high = float(np.prod([max(1, round(n * s / target_spacing)) for n, s in zip(shape, spacing)], dtype=np.float64))
    return int(n_input * (itemsize + 8) + 12 * n_high + (512 << 20))


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
    ram_budget_bytes: int | None = None
    events: list[str] = field(default_factory=list)

    @classmethod
    def create(cls, device: str, vram_budget_gib: float | None, time_budget_s: float | None, threads: int | None, ram_budget_gib: float | None = None) -> BudgetPolicy:
        chosen = choose_device(device)
        if chosen == "cuda" and vram_budget_gib is None:
            free = free_vram_gib()
            vram_budget_gib = None if free is None else round(free * VRAM_SAFE_FRACTION, 2)
        if threads is None:
            threads = os.cpu_count() or 1
        if ram_budget_gib is not None:
            ram_budget = int(ram_budget_gib * (1 << 30))
        else:
            available = available_ram_bytes()
            ram_budget = None if available is None else int(available * RAM_SAFE_FRACTION)
        policy = cls(
            device=chosen,
            half=chosen == "cuda",
            vram_budget_gib=vram_budget_gib,
            time_budget_s=time_budget_s,
            threads=threads,
            ram_budget_bytes=ram_budget,
        )
        ram_text = "unknown" if ram_budget is None else f"{ram_budget / (1 << 30):.1f}"
        log.info("device %s (fp16 %s), VRAM budget %s GiB, RAM budget %s GiB, time budget %s s, %d CPU threads", policy.device, policy.half, vram_budget_gib, ram_text, time_budget_s, threads)
        return policy

    def patch_batch_size(self, manifest_batch: int) -> int:
        """Patches per forward call: the manifest's value (the OOM ladder may lower it later)."""
        return max(1, manifest_batch)

    def check_memory(self, shape: tuple[int, int, int], itemsize: int, spacing: tuple[float, float, float], target_spacing: float) -> None:
        """Raise :class:`MemoryError` (before any allocation) when a stack would exceed the RAM budget."""
        if self.ram_budget_bytes is None:
            return
        need = estimate_peak_bytes(shape, itemsize, spacing, target_spacing)
        if need > self.ram_budget_bytes:
            raise MemoryError(f"shape {shape} at spacing {tuple(round(s, 4) for s in spacing)} µm needs ~{need / (1 << 30):.1f} GiB, over the RAM budget of {self.ram_budget_bytes / (1 << 30):.1f} GiB")

    def as_report(self) -> dict[str, object]:
        return {
            "device": self.device,
            "ram_budget_gib": None if self.ram_budget_bytes is None else round(self.ram_budget_bytes / (1 << 30), 2),
            "fp16": self.half,
            "vram_budget_gib": self.vram_budget_gib,
            "time_budget_s": self.time_budget_s,
            "threads": self.threads,
            "events": list(self.events),
        }
