"""Time and memory policy: the one place that decides where and how big the work runs.

Decisions that depend on the machine (fp16, patch batch size, CPU threads, memory limits, time
per file) are made here from the facts :mod:`fusemycells.devices` reports, and recorded in the
run report.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np

from .devices import available_ram_bytes, choose_device, free_vram_gib, nvidia_driver_version
from .sources import Shape3, Spacing3, shape_for_spacing

log = logging.getLogger(__name__)

VRAM_SAFE_FRACTION = 0.8
"""Share of the free device memory used when no ``--vram-budget`` is given."""
COMPACT_OUTPUT_VOXELS = 1 << 27
"""Stacks above this many voxels (≈ 512³) keep the blended output in float16 (see ``compact_output``)."""
MAX_CPU_WORKERS = 8
"""Most patch batches run side by side on a CPU (see :meth:`BudgetPolicy.patch_workers`)."""
RAM_SAFE_FRACTION = 0.85
"""Share of the available RAM a file may need when no ``--ram-budget`` is given."""
LEARN_MARGIN = 1.25
"""Safety factor on a per-voxel rate learned from a finished file (see :class:`LinearCost`)."""


@dataclass
class LinearCost:
    """Seconds of a stage ≈ ``fixed_s + per_voxel_s × voxels``; the rate is learned across files.

    A file only teaches the rate when its per-voxel part dominates (more than ``fixed_s``), so
    small files, whose time is mostly fixed overhead, never inflate the estimate for a large one.
    """

    fixed_s: float
    per_voxel_s: float

    def estimate(self, voxels: float) -> float:
        """Expected seconds for ``voxels`` voxels."""
        return self.fixed_s + self.per_voxel_s * voxels

    def learn(self, voxels: float, seconds: float) -> None:
        """Adopt the measured rate (× :data:`LEARN_MARGIN`) when the per-voxel part dominates."""
        variable = seconds - self.fixed_s
        if voxels > 0 and variable > self.fixed_s:
            self.per_voxel_s = LEARN_MARGIN * variable / voxels


def default_stage_costs() -> dict[str, LinearCost]:
    """First-file estimates, conservative for 2 CPU cores (measured on a 309×1920×1920 stack).

    * ``global``: resize to H and to the global grid, plus the stage-1 forward, per input + H
      voxel (59.7 s for 1.14e9 + 8.0e8 voxels: 3.1e-8 s/voxel).
    * ``finish``: post-processing and writing, per input voxel ((165 + 40) s / 1.14e9 voxels:
      1.8e-7 s/voxel).
    """
    return {"global": LinearCost(fixed_s=2.0, per_voxel_s=5e-8), "finish": LinearCost(fixed_s=2.0, per_voxel_s=2.5e-7)}


def estimate_peak_bytes(shape: Shape3, itemsize: int, spacing: Spacing3, target_spacing: float) -> int:
    """Conservative peak host memory (bytes) of :meth:`Fuser.fuse` for a ZYX stack.

    The input pixels (``itemsize`` each; the blended output reuses them, or needs 4 bytes a voxel
    more for small stacks, counted always), the correction on the high-resolution grid (float16,
    2 bytes a voxel, on big stacks; float32 below :data:`COMPACT_OUTPUT_VOXELS`), z-slab buffers
    (a 16-plane input slab and a 64-plane H slab, float32 ×8) and a fixed 1 GiB for the networks,
    the global grid and the libraries.
    """
    n_input = float(np.prod(shape, dtype=np.float64))
    high = shape_for_spacing(shape, spacing, (target_spacing,) * 3)
    n_high = float(np.prod(high, dtype=np.float64))
    slabs = 8 * 4 * (16 * shape[1] * shape[2] + 64 * high[1] * high[2])
    compact = n_input > COMPACT_OUTPUT_VOXELS and itemsize in (2, 4)
    correction = 2 if n_high > COMPACT_OUTPUT_VOXELS else 4  # float16 on big stacks (PatchStage)
    return int(n_input * (itemsize + (0 if compact else 4)) + correction * n_high + slabs + (1 << 30))


class EventLog:
    """The run's record of budget decisions (out-of-memory fallbacks, degradations), in order.

    Each message is logged as a warning and listed in the run report (``policy.events``).
    """

    def __init__(self) -> None:
        self.messages: list[str] = []

    def add(self, message: str) -> None:
        log.warning("budget: %s", message)
        self.messages.append(message)

    def __iter__(self) -> Iterator[str]:
        return iter(self.messages)

    def __len__(self) -> int:
        return len(self.messages)


@dataclass(frozen=True)
class BudgetPolicy:
    """Run-wide limits and the decisions derived from them; fixed once the run starts.

    What is learned while running is kept by its owner: the OOM ladder's batch size, sub-patch and
    CPU fallback by the patch stage (:class:`fusemycells.patch_stage.PatchStage`), the patch rate by
    its deadline watcher, the stage costs by the :class:`fusemycells.pipeline.Fuser`. ``events``
    only records.
    """

    device: str
    half: bool
    vram_budget_gib: float | None
    time_budget_s: float | None
    threads: int | None
    ram_budget_bytes: int | None = None
    started: float = field(default_factory=time.perf_counter)  # perf_counter() at the start of the run
    nvidia_driver: str | None = None  # host NVIDIA driver version (None: no driver visible)
    compact_voxels: int = COMPACT_OUTPUT_VOXELS  # stacks above this keep float16 (see compact_output)
    events: EventLog = field(default_factory=EventLog, compare=False)

    @classmethod
    def create(
        cls,
        device: str,
        vram_budget_gib: float | None,
        time_budget_s: float | None,
        threads: int | None,
        ram_budget_gib: float | None = None,
        started: float | None = None,
    ) -> BudgetPolicy:
        """The policy for this machine: device, VRAM/RAM budgets from what is free, all threads."""
        chosen = choose_device(device)
        if chosen == "cuda" and vram_budget_gib is None:
            free = free_vram_gib()
            vram_budget_gib = None if free is None else round(free * VRAM_SAFE_FRACTION, 2)
        if ram_budget_gib is not None:
            ram_budget: int | None = int(ram_budget_gib * (1 << 30))
        else:
            available = available_ram_bytes()
            ram_budget = None if available is None else int(available * RAM_SAFE_FRACTION)
        policy = cls(
            device=chosen,
            half=chosen == "cuda",
            vram_budget_gib=vram_budget_gib,
            time_budget_s=time_budget_s,
            threads=(os.cpu_count() or 1) if threads is None else threads,
            ram_budget_bytes=ram_budget,
            started=time.perf_counter() if started is None else started,
            nvidia_driver=nvidia_driver_version(),
        )
        log.info("%s", policy.describe())
        return policy

    def describe(self) -> str:
        """One log line: device, budgets, threads, driver."""
        ram = "unknown" if self.ram_budget_bytes is None else f"{self.ram_budget_bytes / (1 << 30):.1f}"
        return (
            f"device {self.device} (fp16 {self.half}), VRAM budget {self.vram_budget_gib} GiB, "
            f"RAM budget {ram} GiB, time budget {self.time_budget_s} s, {self.threads} CPU threads, "
            f"NVIDIA driver {self.nvidia_driver or 'none'}"
        )

    def patch_workers(self, backend: str, device: str) -> int:
        """Patch batches run at once by a patch stage of ``backend`` on ``device``.

        TorchScript on a CPU: one single-threaded forward per thread (up to
        :data:`MAX_CPU_WORKERS`); on 2 cores two side by side ran 1.8× the batches per second of
        one 2-thread forward, since torch spreads the small 3D convolutions of these networks over
        threads poorly. 1 otherwise: ONNX Runtime's own threads gained nothing from it (measured),
        and a GPU runs one batch at a time.
        """
        if device != "cpu" or backend != "torchscript" or (self.threads or 1) < 2:
            return 1
        return min(int(self.threads or 1), MAX_CPU_WORKERS)

    def remaining_s(self) -> float | None:
        """Seconds left of the run's time budget (None: no budget)."""
        if self.time_budget_s is None:
            return None
        return self.time_budget_s - (time.perf_counter() - self.started)

    def file_deadline(self, files_left: int) -> float | None:
        """perf_counter() time by which the current file must be written: an equal share of what is left."""
        remaining = self.remaining_s()
        if remaining is None:
            return None
        return time.perf_counter() + max(0.0, remaining) / max(1, files_left)

    def check_memory(self, shape: Shape3, itemsize: int, spacing: Spacing3, target_spacing: float) -> None:
        """Raise :class:`MemoryBudgetExceeded` (before any allocation) when a stack would exceed the RAM budget."""
        if self.ram_budget_bytes is None:
            return
        need = estimate_peak_bytes(shape, itemsize, spacing, target_spacing)
        if need > self.ram_budget_bytes:
            where = f"shape {shape} at spacing {tuple(round(s, 4) for s in spacing)} µm"
            budget = self.ram_budget_bytes / (1 << 30)
            needed = need / (1 << 30)
            raise MemoryBudgetExceeded(f"{where} needs ~{needed:.1f} GiB, over the RAM budget of {budget:.1f} GiB")

    def compact_output(self, shape: Sequence[int]) -> bool:
        """Whether a stack's blended output (and the correction on H) is kept in float16.

        Large stacks (> ``compact_voxels``) or a RAM budget too small for a float32 copy use
        float16 (relative precision 4.9e-4, far below what N-SSIM resolves) so that the peak stays
        near 2× the input's bytes; smaller stacks get an exact float32 buffer.
        """
        voxels = int(np.prod(shape, dtype=np.int64))
        if voxels > self.compact_voxels:
            return True
        return self.ram_budget_bytes is not None and 4 * voxels > self.ram_budget_bytes // 2

    def as_report(self) -> dict[str, object]:
        return {
            "device": self.device,
            "ram_budget_gib": None if self.ram_budget_bytes is None else round(self.ram_budget_bytes / (1 << 30), 2),
            "fp16": self.half,
            "vram_budget_gib": self.vram_budget_gib,
            "time_budget_s": self.time_budget_s,
            "threads": self.threads,
            "nvidia_driver": self.nvidia_driver,
            "events": list(self.events),
        }


class MemoryBudgetExceeded(MemoryError):
    """A stack would need more host memory than the RAM budget (refused before loading its pixels)."""


DEGRADATION_LEVELS = {
    0: "full two-stage prediction",
    1: "patch stage without overlap (fewer patches)",
    2: "global stage only, blended as in post-processing",
    3: "percentile-normalised input (no network)",
}
"""Steps taken, in order, when the time budget cannot be met (reported as ``degradation``)."""
