"""Time and memory policy: the one place that decides where and how big the work runs.

Decisions that depend on the machine (fp16, patch batch size, CPU threads, memory limits, time
per file) are made here from the facts :mod:`fusemycells.devices` reports, and recorded in the
run report.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from .devices import (
    available_ram_bytes,
    choose_device,
    free_device_cache,
    free_vram_gib,
    is_out_of_memory,
    nvidia_driver_version,
)
from .sources import shape_for_spacing

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


def estimate_peak_bytes(shape: tuple[int, int, int], itemsize: int, spacing: tuple[float, float, float], target_spacing: float) -> int:
    """Conservative peak host memory (bytes) of :meth:`Fuser.fuse` for a ZYX stack.

    The input pixels (``itemsize`` each; the blended output reuses them, or needs 4 bytes a voxel
    more for small stacks, counted always), the correction on the high-resolution grid (float16,
    2 bytes a voxel, on big stacks; float32 below :data:`COMPACT_OUTPUT_VOXELS`), z-slab buffers (a 16-plane input slab and a 64-plane H slab, float32 ×8)
    and a fixed 1 GiB for the networks, the global grid and the libraries.
    """
    n_input = float(np.prod(shape, dtype=np.float64))
    high = shape_for_spacing(shape, spacing, (target_spacing,) * 3)
    n_high = float(np.prod(high, dtype=np.float64))
    slabs = 8 * 4 * (16 * shape[1] * shape[2] + 64 * high[1] * high[2])
    compact = n_input > COMPACT_OUTPUT_VOXELS and itemsize in (2, 4)
    correction = 2 if n_high > COMPACT_OUTPUT_VOXELS else 4  # float16 on big stacks (Fuser._patch_correction)
    return int(n_input * (itemsize + (0 if compact else 4)) + correction * n_high + slabs + (1 << 30))


@dataclass
class BudgetPolicy:
    """Run-wide decisions; mutable so that a fallback found once is kept for later patches and files."""

    device: str
    half: bool
    vram_budget_gib: float | None
    time_budget_s: float | None
    threads: int | None
    ram_budget_bytes: int | None = None
    started: float = field(default_factory=time.perf_counter)  # perf_counter() at the start of the run
    max_batch: int | None = None  # lowered by the OOM ladder, kept for later patches and files
    sub_patch: tuple[int, int, int] | None = None  # set by the OOM ladder: tile each patch this small
    forced_cpu: bool = False  # the OOM ladder moved the patch stage to the CPU
    seconds_per_patch: float | None = None  # measured patch-stage rate, kept across files
    stage_costs: dict[str, LinearCost] = field(default_factory=default_stage_costs)  # learned, kept across files
    nvidia_driver: str | None = None  # host NVIDIA driver version (None: no driver visible)
    events: list[str] = field(default_factory=list)

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
            started=time.perf_counter() if started is None else started,
            nvidia_driver=nvidia_driver_version(),
        )
        ram_text = "unknown" if ram_budget is None else f"{ram_budget / (1 << 30):.1f}"
        log.info("device %s (fp16 %s), VRAM budget %s GiB, RAM budget %s GiB, time budget %s s, %d CPU threads, NVIDIA driver %s", policy.device, policy.half, vram_budget_gib, ram_text, time_budget_s, threads, policy.nvidia_driver or "none")
        return policy

    def patch_batch_size(self, manifest_batch: int) -> int:
        """Patches per forward call: the manifest's value, or less once the OOM ladder lowered it."""
        size = max(1, manifest_batch)
        return size if self.max_batch is None else max(1, min(size, self.max_batch))

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

    def event(self, message: str) -> None:
        """Record a policy decision (log + report)."""
        log.warning("budget: %s", message)
        self.events.append(message)

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

    def check_memory(self, shape: tuple[int, int, int], itemsize: int, spacing: tuple[float, float, float], target_spacing: float) -> None:
        """Raise :class:`MemoryError` (before any allocation) when a stack would exceed the RAM budget."""
        if self.ram_budget_bytes is None:
            return
        need = estimate_peak_bytes(shape, itemsize, spacing, target_spacing)
        if need > self.ram_budget_bytes:
            raise MemoryError(f"shape {shape} at spacing {tuple(round(s, 4) for s in spacing)} µm needs ~{need / (1 << 30):.1f} GiB, over the RAM budget of {self.ram_budget_bytes / (1 << 30):.1f} GiB")

    def compact_output(self, shape: tuple[int, int, int]) -> bool:
        """Whether the blended output of a stack is kept in float16 inside the input's own buffer.

        Large stacks (> :data:`COMPACT_OUTPUT_VOXELS`) or a RAM budget too small for a float32
        copy use float16 (relative precision 4.9e-4, far below what N-SSIM resolves) so that the
        peak stays near 2× the input's bytes; smaller stacks get an exact float32 buffer.
        """
        voxels = int(np.prod(shape, dtype=np.int64))
        if voxels > COMPACT_OUTPUT_VOXELS:
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


DEGRADATION_LEVELS = {
    0: "full two-stage prediction",
    1: "patch stage without overlap (fewer patches)",
    2: "global stage only, blended as in post-processing",
    3: "percentile-normalised input (no network)",
}
"""Steps taken, in order, when the time budget cannot be met (reported as ``degradation``)."""


class DeadlineExceeded(RuntimeError):
    """The patch stage would not finish before the file's deadline."""


Predict = Callable[[np.ndarray], np.ndarray]


class OomLadder:
    """A batch predictor that survives out-of-memory errors, step by step.

    On OOM: free the device cache and halve the batch; at one patch, tile the patch into
    half-size sub-patches (Gaussian-stitched, so coverage and weighting stay correct) down to
    ``min_sub_patch``; then finish on the CPU predictor. What worked is stored in ``policy`` and
    kept for later patches and files. Batches are ``(N, C, Z, Y, X)`` float32.
    """

    def __init__(self, predict: Predict, policy: BudgetPolicy, cpu_predict: Callable[[], Predict] | None = None, min_sub_patch: int = 16) -> None:
        self.predict = predict
        self.policy = policy
        self.cpu_predict = cpu_predict
        self.min_sub_patch = min_sub_patch

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        size = self.policy.max_batch or len(batch)
        return np.concatenate([self._run(batch[i : i + size]) for i in range(0, len(batch), size)])

    def _run(self, batch: np.ndarray) -> np.ndarray:
        if len(batch) == 1 and self.policy.sub_patch is not None and any(s < n for s, n in zip(self.policy.sub_patch, batch.shape[2:])):
            return self._tiled(batch)
        try:
            return self.predict(batch)
        except Exception as exc:
            if not is_out_of_memory(exc):
                raise
        free_device_cache()
        if len(batch) > 1:
            half = max(1, len(batch) // 2)
            self.policy.max_batch = half
            self.policy.event(f"out of memory with {len(batch)} patches per batch: batch size {half}")
            return np.concatenate([self._run(batch[:half]), self._run(batch[half:])])
        current = self.policy.sub_patch or tuple(int(n) for n in batch.shape[2:])
        smaller = tuple(max(self.min_sub_patch, (n + 1) // 2) for n in current)
        if smaller != current:
            self.policy.sub_patch = smaller  # type: ignore[assignment]
            self.policy.event(f"out of memory on one {tuple(batch.shape[2:])} patch: tiling it into {smaller} sub-patches")
            return self._tiled(batch)
        if self.cpu_predict is not None and not self.policy.forced_cpu:
            self.policy.forced_cpu = True
            self.policy.event("out of memory at the smallest sub-patch: finishing the patch stage on the CPU")
            self.predict = self.cpu_predict()
            self.policy.sub_patch = None
            return self._run(batch)
        raise MemoryError(f"out of memory even for a {current} patch on the CPU")

    def _tiled(self, batch: np.ndarray) -> np.ndarray:
        from .stitching import sliding_window  # local import: stitching uses this module's types only

        assert self.policy.sub_patch is not None
        channels = [batch[0, c] for c in range(batch.shape[1])]
        sub = tuple(min(s, n) for s, n in zip(self.policy.sub_patch, batch.shape[2:]))
        stitched, _ = sliding_window(channels, self._run, sub, overlap=0.5, batch_size=1)
        return stitched[None, None]
