"""Time and memory policy: the one place that decides where and how big the work runs.

Decisions that depend on the machine (fp16, CPU threads, memory limits, time per file) are made here
from the facts :mod:`fusemycells.runtime.devices` reports, and recorded in the run report; so are the
measured phase times (:data:`CPU_2CORE`) and the stage costs they give (:class:`LinearCost`,
:func:`default_stage_costs`). The degradation ladder that spends the time budget on them is
:mod:`fusemycells.runtime.ladder`.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace

import numpy as np

from fusemycells.runtime.cuda_support import log_cuda_failure
from fusemycells.runtime.deadline import RunClock
from fusemycells.runtime.devices import (
    DeviceHealth,
    available_ram_bytes,
    choose_device,
    free_vram_gib,
    is_out_of_memory,
    nvidia_driver_version,
)
from fusemycells.runtime.precision import cpu_flags, cpu_precision
from fusemycells.sources import Shape3, Spacing3, shape_for_spacing

log = logging.getLogger(__name__)

VRAM_SAFE_FRACTION = 0.8
"""Share of the free device memory used when no ``--vram-budget`` is given."""
COMPACT_OUTPUT_VOXELS = 1 << 27
"""Stacks above this many voxels (≈ 512³) keep the blended output in float16 (see ``compact_output``)."""
RAM_SAFE_FRACTION = 0.85
"""Share of the available RAM a file may need when no ``--ram-budget`` is given."""
LEARN_MARGIN = 1.25
"""Safety factor on a per-voxel rate learned from a finished file (see :class:`LinearCost`)."""


@dataclass
class LinearCost:
    """Seconds of a stage ≈ ``fixed_s + per_voxel_s × voxels + per_h_voxel_s × h_voxels``, learned across files.

    ``voxels`` counts the input grid (for the global stage: input + H voxels), ``h_voxels`` the
    high-resolution grid H. A file only teaches the rates when its per-voxel part dominates (more
    than ``fixed_s``), so small files, whose time is mostly fixed overhead, never inflate the
    estimate for a large one; both rates are then scaled by the same factor.
    """

    fixed_s: float
    per_voxel_s: float
    per_h_voxel_s: float = 0.0

    def estimate(self, voxels: float, h_voxels: float = 0.0) -> float:
        """Expected seconds for ``voxels`` input(-grid) voxels and ``h_voxels`` voxels of H."""
        return self.fixed_s + self.per_voxel_s * voxels + self.per_h_voxel_s * h_voxels

    def scaled(self, factor: float, fixed: bool = False) -> LinearCost:
        """The same cost with the per-voxel rates × ``factor`` (a margin), and ``fixed_s`` too when
        ``fixed`` (a slower machine)."""
        return LinearCost(
            self.fixed_s * (factor if fixed else 1.0), self.per_voxel_s * factor, self.per_h_voxel_s * factor
        )

    def learn(self, voxels: float, seconds: float, h_voxels: float = 0.0) -> None:
        """Scale the rates so that they predict the measured ``seconds`` × :data:`LEARN_MARGIN`, when the
        per-voxel part dominates."""
        variable = seconds - self.fixed_s
        predicted = self.per_voxel_s * voxels + self.per_h_voxel_s * h_voxels
        if predicted > 0 and variable > self.fixed_s:
            factor = LEARN_MARGIN * variable / predicted
            self.per_voxel_s *= factor
            self.per_h_voxel_s *= factor


def default_stage_costs() -> dict[str, LinearCost]:
    """First-file estimates of the stages the deadline plans with, for 2 CPU cores (Grand Challenge's
    4 vCPUs are 2 hyperthreaded cores: README *Budgets*); later files learn them (``learn``).

    Each is :data:`CPU_2CORE` (measured) × a margin: ``global`` (resize to H and to the global grid,
    the stage-1 forward) × 1.25, since over-estimating it skips the networks needlessly; ``fallback``
    (the stage-1 correction on H, degradation level 2) and ``finish`` (post-processing: the weight
    map and the blend read the correction on H; writing) × 1.5, since they are what is reserved to
    write the output before the budget ends, also on a machine 0.7× as fast.
    """
    measured = CPU_2CORE
    return {
        "global": measured.global_stage.scaled(1.25),
        "fallback": measured.fallback.scaled(1.5),
        "finish": measured.finish.scaled(1.5),
    }


@dataclass(frozen=True)
class PhaseRates:
    """Seconds of the pipeline's phases on one machine, as linear functions of the voxel counts
    (what a run took there, not what the policy assumes). Input voxels and H voxels: see :class:`LinearCost`."""

    startup_s: float  # process start to the first file: interpreter, imports, setup
    read: LinearCost  # reading the TIFF, per input voxel (uint16)
    load_s: float  # loading and warming up a channel's two networks
    preprocess: LinearCost  # sanitise, normalisation, noise estimate
    global_stage: LinearCost
    patch_s: float  # one 64³ patch of the patch stage (steady rate)
    first_batch_s: float  # the first batch of a run: its row of patches resampled from the input, warm-up
    fallback: LinearCost
    finish: LinearCost  # post-processing (weight map, blend) and writing
    level3_finish: LinearCost  # level 3: the output's normalisation and filters, computed as it is written


CPU_2CORE = PhaseRates(
    startup_s=5.0,
    read=LinearCost(0.0, 1.25e-8),
    load_s=1.5,
    preprocess=LinearCost(0.0, 1.85e-9),
    global_stage=LinearCost(1.0, 2.0e-9, 2.0e-9),
    patch_s=0.131,
    first_batch_s=4.0,
    fallback=LinearCost(1.0, 3.5e-9, 1.25e-8),
    finish=LinearCost(2.0, 3.6e-8, 1.0e-9),
    level3_finish=LinearCost(1.0, 3.5e-8),
)
"""Phase times on the development machine's 2 CPU cores (ONNX Runtime, shipped networks).

Global stage, level-2 fallback and post-processing: the pipeline after issue #16 (torch band products,
memory reuse), quiet machine, ``benchmarks/budget_costs.py`` on 150×960×960 @ 1.01 µm, 40×960×960 @
5 µm and 309×1920×1920 @ 1.01 µm (global 0.81 / 0.70 / 2.87 s, fallback 0.98 / 1.00 / 13.1 s,
post-processing 2.01 / 1.14 / 11.2 s; measured while the global stage and the fallback still ran inside
memory-reuse blocks), fitted per input and per H voxel and rounded up; the global stage raised to the real
level-2 run with the final code (``inference.py`` on 309×1920×1920: global stage 3.83 s, patch attempt and
fallback 14.6 s). Writing is kept at the slowest real-run figure, 31.1 s for the 4.5 GB output of
309×1920×1920 (2.73e-8 s per input voxel; quiet now: 20.2 s, but a host's disk may be slower than this
one's page cache), so ``finish`` (post-processing + writing) is ≈ 0.88e-8 + 2.73e-8 s per input voxel; level 3's finish
(filters and normalisation as the output is written) measured 15.8 s on that stack, 2.6 s on
120×1200×1200 (``inference.py --time-budget 15``), again with the slow disk's write. Patch rate,
start-up, loading, preprocessing and reading (14.2–18.2 s for the 2.1 GiB file, not in the page
cache) from the real 309×1920×1920 runs of README *Budgets* and *Performance*."""


PATCH_S_CPU_2CORE = {
    ("onnx", "fp32"): CPU_2CORE.patch_s,
    ("openvino", "fp32"): 0.071,
    ("torchscript", "fp32"): 0.354,
    ("torchscript", "bf16"): 0.073,
}
"""Seconds per 64³ patch on the development machine's 2 CPU cores by (backend, precision): ONNX Runtime's is
:data:`CPU_2CORE`'s, measured quietly; the others are it × the ratio measured back to back on the same machine
(docs/performance-cpu.md, *Budget*): OpenVINO fp32 0.54× (the patch-stage forward of ``inference.py`` on
80×800×800 at level 0, 166.7 s against 308.4 s, 1 024 patches), TorchScript fp32 2.7× (``bench_precision.py``);
TorchScript bf16 is the issue's Xeon with AMX (0.119 against 0.214 s per batch, 0.56×), unmeasured here."""


def cpu_rates(backend: str, precision: str = "fp32") -> PhaseRates:
    """:data:`CPU_2CORE` with the patch rate of the backend and precision a CPU run uses (ONNX Runtime's fp32
    rate for a pair not in :data:`PATCH_S_CPU_2CORE`: OpenVINO bf16 is unmeasured)."""
    patch_s = PATCH_S_CPU_2CORE.get((backend, precision), CPU_2CORE.patch_s)
    return replace(CPU_2CORE, patch_s=patch_s)


def estimate_peak_bytes(
    shape: Shape3, itemsize: int, spacing: Spacing3, target_spacing: float, patch: Sequence[int] | None = None
) -> int:
    """Conservative peak host memory (bytes) of :meth:`Fuser.fuse` for a ZYX stack (``spacing`` µm).

    The input pixels (``itemsize`` each; the blended output reuses them, or needs 4 bytes a voxel
    more for small stacks, counted always), the correction on the high-resolution grid H (float16,
    2 bytes a voxel, on big stacks; float32 below :data:`COMPACT_OUTPUT_VOXELS`), z-slab buffers
    (a 16-plane input slab and a 64-plane H slab, float32 ×8; the H slab as wide as the stitching
    pads it to a ``patch``), a fixed 1 GiB for the networks, the global grid and the libraries, and,
    when H is smaller than a ``patch`` (ZYX voxels) along some axis, the network inputs the
    stitching materialises and pads (:func:`padded_input_bytes`).
    """
    n_input = float(np.prod(shape, dtype=np.float64))
    high = shape_for_spacing(shape, spacing, (target_spacing,) * 3)
    n_high = float(np.prod(high, dtype=np.float64))
    wide = high if patch is None else tuple(max(n, p) for n, p in zip(high, patch))
    slabs = 8 * 4 * (16 * shape[1] * shape[2] + 64 * wide[1] * wide[2])
    compact = n_input > COMPACT_OUTPUT_VOXELS and itemsize in (2, 4)
    correction = 2 if n_high > COMPACT_OUTPUT_VOXELS else 4  # float16 on big stacks (PatchStage)
    padded = 0 if patch is None else padded_input_bytes(high, patch)
    return int(n_input * (itemsize + (0 if compact else 4)) + correction * n_high + slabs + padded + (1 << 30))


def padded_input_bytes(high: Shape3, patch: Sequence[int], channels: int = 2) -> int:
    """Bytes the stitching holds for a volume of ``high`` voxels (H, ZYX) smaller than ``patch`` along
    some axis; 0 when H is at least a patch everywhere (the inputs are then read one row of patches
    at a time).

    Each of the ``channels`` float32 inputs is materialised on H and reflect-padded to at least the
    patch on every axis (``stitching._as_rows``), and numpy's reflect padding copies overlapping
    chunks: measured 1.47× one padded channel for a 5000×10×10 volume padded to 5000×64×64, so one
    more padded channel is counted. A 100000×16×16 stack at 1.0/0.39 µm: H 166667×10×10, padded
    166667×64×64, 8.2 GB.
    """
    if all(n >= p for n, p in zip(high, patch)):
        return 0
    n_high = float(np.prod(high, dtype=np.float64))
    n_padded = float(np.prod([max(n, p) for n, p in zip(high, patch)], dtype=np.float64))
    return int(4 * (channels * (n_high + n_padded) + n_padded))


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
    its :class:`~fusemycells.runtime.ladder.PatchRateWatcher`, the stage costs by the Fuser's
    :class:`~fusemycells.runtime.ladder.Ladder`. ``time_budget_s`` is the whole run's, counted from
    ``clock``; :meth:`file_deadline` shares it among the files. ``events``
    only records. ``health`` is the one mutable fact about the device: once it faulted, every step of the
    run uses :attr:`active_device` ('cpu'), see :meth:`device_fault`.
    """

    device: str
    half: bool
    vram_budget_gib: float | None
    time_budget_s: float | None
    threads: int | None
    ram_budget_bytes: int | None = None
    clock: RunClock = field(default_factory=RunClock.now)  # where the time budget counts from
    nvidia_driver: str | None = None  # host NVIDIA driver version (None: no driver visible)
    cuda_error: str | None = None  # the ERROR logged when a driver is there but CUDA did not start
    compact_voxels: int = COMPACT_OUTPUT_VOXELS  # stacks above this keep float16 (see compact_output)
    cpu_precision: str = "fp32"  # a CPU forward's precision, 'fp32' or 'bf16' (fusemycells.runtime.precision)
    events: EventLog = field(default_factory=EventLog, compare=False)
    health: DeviceHealth = field(default_factory=DeviceHealth, compare=False)

    @property
    def active_device(self) -> str:
        """Where the run's work goes now: :attr:`device`, or 'cpu' once the device faulted."""
        return "cpu" if self.health.failed else self.device

    def device_fault(self, step: str, exc: BaseException) -> bool:
        """Whether ``exc``, raised in ``step``, is a device fault to recover from by rerunning the step on the
        CPU: True when the step ran on the device (the fault is recorded, logged at ERROR once with the
        original error, and listed in ``events``; the device is not used again in this run), False when the
        run is on the CPU already (the error is the step's own: the caller re-raises it).

        Any exception on the device path counts: CUDA, cuDNN, cuBLAS and ONNX Runtime CUDA-provider errors
        have no common type, and an unexpected error in GPU code is no reason to lose the case while the
        CPU path is there. Out-of-memory errors count too when they reach here (the stages' own OOM
        handling takes them first, without distrusting the device).
        """
        if self.active_device == "cpu":
            return False
        fault = self.health.record(step, exc)
        kind = "out of memory" if is_out_of_memory(exc) else "device fault"
        log.error(
            "%s on %s in the %s: %s; the step is rerun on the CPU, and the rest of the run stays there",
            kind, self.device, step, fault.error,
        )  # fmt: skip
        self.events.messages.append(f"{kind} in the {step} ({fault.error}): rerun on the CPU; device not used again")
        return True

    @classmethod
    def create(
        cls,
        device: str,
        vram_budget_gib: float | None,
        time_budget_s: float | None,
        threads: int | None,
        ram_budget_gib: float | None = None,
        clock: RunClock | None = None,
        *,
        precision: str = "auto",
        read_driver: Callable[[], str | None] = nvidia_driver_version,
        cuda_check: Callable[[str, str, str | None], str | None] = log_cuda_failure,
        read_cpu_flags: Callable[[], Iterable[str]] = cpu_flags,
    ) -> BudgetPolicy:
        """The policy for this machine: device, VRAM/RAM budgets from what is free, all threads.

        ``precision`` ('auto', 'fp32', 'bf16') decides a CPU forward's precision from ``read_cpu_flags()``
        (:func:`fusemycells.runtime.precision.cpu_precision`: bf16 only where the CPU has it natively).

        ``clock``: where the time budget counts from (default: now). ``read_driver()`` gives the host's
        NVIDIA driver version; ``cuda_check(chosen, requested, driver)`` logs and returns the ERROR text
        when a driver is there but CUDA did not start (:func:`fusemycells.runtime.cuda_support.log_cuda_failure`).
        """
        chosen = choose_device(device)
        driver = read_driver()
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
            clock=RunClock.now() if clock is None else clock,
            nvidia_driver=driver,
            cuda_error=cuda_check(chosen, device, driver),
            cpu_precision=cpu_precision(precision, read_cpu_flags()),
        )
        log.info("%s", policy.describe())
        if time_budget_s is not None:
            log.info(
                "time budget %.0f s counted from %s at %s (%.1f s ago)",
                time_budget_s, policy.clock.origin, policy.clock.iso(), policy.clock.elapsed(),
            )  # fmt: skip
        return policy

    def describe(self) -> str:
        """One log line: device, budgets, threads, driver."""
        ram = "unknown" if self.ram_budget_bytes is None else f"{self.ram_budget_bytes / (1 << 30):.1f}"
        return (
            f"device {self.device} (fp16 {self.half}), CPU precision {self.cpu_precision}, "
            f"VRAM budget {self.vram_budget_gib} GiB, "
            f"RAM budget {ram} GiB, time budget {self.time_budget_s} s, {self.threads} CPU threads, "
            f"NVIDIA driver {self.nvidia_driver or 'none'}"
        )

    def remaining_s(self) -> float | None:
        """Seconds left of the run's time budget (None: no budget)."""
        if self.time_budget_s is None:
            return None
        return self.time_budget_s - self.clock.elapsed()

    def file_deadline(self, files_left: int) -> float | None:
        """perf_counter() time by which the current file must be written: an equal share of what is left."""
        remaining = self.remaining_s()
        if remaining is None:
            return None
        return time.perf_counter() + max(0.0, remaining) / max(1, files_left)

    def check_memory(
        self, shape: Shape3, itemsize: int, spacing: Spacing3, target_spacing: float, patch: Sequence[int] | None = None
    ) -> None:
        """Raise :class:`MemoryBudgetExceeded` (before any allocation) when a stack would exceed the RAM
        budget (see :func:`estimate_peak_bytes`)."""
        if self.ram_budget_bytes is None:
            return
        need = estimate_peak_bytes(shape, itemsize, spacing, target_spacing, patch)
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
            "cpu_precision": self.cpu_precision,
            "vram_budget_gib": self.vram_budget_gib,
            "time_budget_s": self.time_budget_s,
            "clock_started": self.clock.iso(),
            "clock_origin": self.clock.origin,
            "threads": self.threads,
            "nvidia_driver": self.nvidia_driver,
            "cuda_error": self.cuda_error,
            "events": list(self.events),
        }


class MemoryBudgetExceeded(MemoryError):
    """A stack would need more host memory than the RAM budget (refused before loading its pixels)."""

