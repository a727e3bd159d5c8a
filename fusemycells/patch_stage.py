"""Stage 2: the patch network on the high-resolution grid H, with its out-of-memory ladder.

A :class:`PatchStage` is configured once per channel (patch, overlap, batch, workers, backend)
and called once per file: ``stage(x_h, p1_h, countdown)`` returns the correction (prediction −
input on H) and what it did. It owns what it learns across files: the OOM ladder's batch size,
sub-patch and CPU fallback (like MONAI's ``SlidingWindowInfererAdapt`` keeps its own CPU
threshold) and the patch rate of its :class:`~fusemycells.runtime.ladder.PatchRateWatcher`. Which
passes it tries, and when one stops, is the degradation ladder's (:mod:`fusemycells.runtime.ladder`).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import numpy as np
import torch

from fusemycells.backends import LoadedStage, patch_torch_threads, patch_workers
from fusemycells.config import StageSpec
from fusemycells.postprocess import FLOAT16_MAX
from fusemycells.runtime.budget import BudgetPolicy, EventLog
from fusemycells.runtime.deadline import Countdown, Now
from fusemycells.runtime.devices import free_device_cache, is_out_of_memory, torch_threads
from fusemycells.runtime.ladder import PATCH_SKIPPED, Degradation, PatchRateWatcher, patch_attempts
from fusemycells.runtime.progress import ProgressFactory, progress_for
from fusemycells.sources import PlaneSource, Shape3, read_only, slabs
from fusemycells.stitching import Predict, StitchStats, count_windows, sliding_window


class OomLadder:
    """A batch predictor that survives out-of-memory errors, step by step, and device faults.

    On OOM: free the device cache and halve the batch; at one patch, tile the patch into
    half-size sub-patches (Gaussian-stitched, so coverage and weighting stay correct) down to
    ``min_sub_patch``; then finish on the CPU predictor. What worked (``max_batch``,
    ``sub_patch``, ``forced_cpu``) is kept here for later patches and files, and each step is
    recorded in ``events``. Any other error of the device predictor is passed to ``on_fault(exc)``
    (the policy's :meth:`~fusemycells.runtime.budget.BudgetPolicy.device_fault`): when it says so, the batch
    and every later one run on the CPU predictor (without it such errors are raised). Batches are
    ``(N, C, Z, Y, X)`` float32.
    """

    def __init__(
        self,
        predict: Predict,
        cpu_predict: Callable[[], Predict] | None = None,
        events: EventLog | None = None,
        min_sub_patch: int = 16,
        on_fault: Callable[[BaseException], bool] | None = None,
    ) -> None:
        self.predict = predict
        self.cpu_predict = cpu_predict
        self.on_fault = on_fault
        self.events = EventLog() if events is None else events
        self.min_sub_patch = min_sub_patch
        self.max_batch: int | None = None  # lowered on OOM, kept for later batches and files
        self.sub_patch: Shape3 | None = None  # set on OOM at one patch: tile each patch this small
        self.forced_cpu = False  # the ladder moved to the CPU predictor

    def batch_size(self, requested: int) -> int:
        """Patches per forward call: ``requested``, or less once the ladder lowered it."""
        size = max(1, requested)
        return size if self.max_batch is None else max(1, min(size, self.max_batch))

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        size = self.max_batch or len(batch)
        if size >= len(batch):
            return self._run(batch)  # no copy of the prediction through np.concatenate
        return np.concatenate([self._run(batch[i : i + size]) for i in range(0, len(batch), size)])

    def _run(self, batch: np.ndarray) -> np.ndarray:
        sub = self.sub_patch
        if len(batch) == 1 and sub is not None and any(s < n for s, n in zip(sub, batch.shape[2:])):
            return self._tiled(batch)
        try:
            return self.predict(batch)
        except Exception as exc:
            if not is_out_of_memory(exc):
                if self.forced_cpu or self.cpu_predict is None or self.on_fault is None or not self.on_fault(exc):
                    raise
                self.use_cpu()
                return self._run(batch)
        free_device_cache()
        return self._after_oom(batch)

    def use_cpu(self) -> None:
        """Run this and every later batch on the CPU predictor (after a device fault), whole patches."""
        assert self.cpu_predict is not None
        if not self.forced_cpu:
            self.forced_cpu = True
            self.predict = self.cpu_predict()
            self.sub_patch = None

    def _after_oom(self, batch: np.ndarray) -> np.ndarray:
        """The next rung: a smaller batch, a smaller sub-patch, the CPU; MemoryError when none is left."""
        if len(batch) > 1:
            half = max(1, len(batch) // 2)
            self.max_batch = half
            self.events.add(f"out of memory with {len(batch)} patches per batch: batch size {half}")
            return np.concatenate([self._run(batch[:half]), self._run(batch[half:])])
        current: Shape3 = self.sub_patch or tuple(int(n) for n in batch.shape[2:])  # type: ignore[assignment]
        smaller: Shape3 = tuple(max(self.min_sub_patch, (n + 1) // 2) for n in current)  # type: ignore[assignment]
        if smaller != current:
            self.sub_patch = smaller
            self.events.add(
                f"out of memory on one {tuple(batch.shape[2:])} patch: tiling it into {smaller} sub-patches"
            )
            return self._tiled(batch)
        if self.cpu_predict is not None and not self.forced_cpu:
            self.events.add("out of memory at the smallest sub-patch: finishing the patch stage on the CPU")
            self.use_cpu()
            return self._run(batch)
        raise MemoryError(f"out of memory even for a {current} patch on the CPU")

    def _tiled(self, batch: np.ndarray) -> np.ndarray:
        assert self.sub_patch is not None
        channels = [batch[0, c] for c in range(batch.shape[1])]
        sub = tuple(min(s, n) for s, n in zip(self.sub_patch, batch.shape[2:]))
        stitched, _ = sliding_window(channels, self._run, sub, overlap=0.5, batch_size=1)
        assert stitched is not None
        return stitched[None, None]


@dataclass
class PatchResult:
    """What one call of a :class:`PatchStage` produced and did."""

    correction: np.ndarray  # prediction − input on H, ZYX (float16 on big stacks, else float32)
    degradations: list[Degradation] = field(default_factory=list)  # the ladder's steps down, in order
    warnings: list[str] = field(default_factory=list)  # quality caveats that are not time degradations
    info: dict[str, Any] | None = None  # the report's ``stages.patch`` entry; None when the network did not finish


def store(out: np.ndarray, z0: int, z1: int, planes: np.ndarray) -> None:
    """``out[z0:z1] = planes`` (ZYX); into a float16 ``out`` clipped to ±:data:`FLOAT16_MAX` first
    (in ``planes``), since a value beyond it would become ±inf and then NaN (inf·0) downstream."""
    if out.dtype == np.float16:  # torch's clamp and float16 cast took a fifth of numpy's CPU time on 32×1242² planes
        torch.from_numpy(out[z0:z1]).copy_(torch.from_numpy(planes).clamp_(-FLOAT16_MAX, FLOAT16_MAX))
        return
    out[z0:z1] = planes


def store_difference(
    correction: np.ndarray, read_x: Callable[[int, int], np.ndarray], z0: int, z1: int, planes: np.ndarray
) -> None:
    """``correction[z0:z1] = planes − x[z0:z1]``, computed in ``planes`` (ours to change; ZYX)."""
    planes -= read_x(z0, z1)
    store(correction, z0, z1, planes)


def stage1_correction(x_h: PlaneSource, p1_h: PlaneSource, correction: np.ndarray) -> None:
    """The stage-1 correction ``p1_h − x_h`` on H written into ``correction`` (the patch stage skipped)."""
    for z0, z1 in slabs(x_h.shape[0]):
        planes = p1_h.planes(z0, z1)
        planes -= x_h.planes(z0, z1)
        store(correction, z0, z1, planes)


class PatchStage:
    """The patch network of one channel run as a Gaussian-stitched sliding window on H.

    ``load(device)`` returns the loaded patch stage for 'cuda' or 'cpu' (cached by its owner);
    the device one is loaded here, the CPU one only if the OOM ladder falls back to it, or the
    device faulted (:meth:`~fusemycells.runtime.budget.BudgetPolicy.device_fault`: at any patch, that batch
    and the rest run on the CPU; a later call starts there). The
    correction is float16 on big stacks (``policy.compact_output``): it halves the largest array
    (rounding ≤ 2.4e-4 of values < 1), while small stacks keep float32 so the two backends agree
    to the networks' own precision there.
    """

    def __init__(
        self,
        spec: StageSpec,
        load: Callable[[str], LoadedStage],
        policy: BudgetPolicy,
        now: Now = time.perf_counter,
        min_sub_patch: int = 16,
        progress: ProgressFactory = progress_for,
    ) -> None:
        assert spec.patch_size is not None
        self.spec, self.patch, self.overlap = spec, spec.patch_size, spec.overlap
        self.policy, self._load = policy, load
        self.device_stage = load(policy.active_device)
        cpu = None if policy.active_device == "cpu" else (lambda: load("cpu").runner)
        on_fault = partial(policy.device_fault, "patch stage")
        self.ladder = OomLadder(self.device_stage.runner, cpu, policy.events, min_sub_patch, on_fault)
        self.watcher = PatchRateWatcher(now, progress)

    @property
    def current(self) -> LoadedStage:
        """The stage that runs now: on the CPU once the OOM ladder moved there."""
        return self._load("cpu") if self.ladder.forced_cpu else self.device_stage

    @property
    def batch_size(self) -> int:
        return self.ladder.batch_size(self.spec.batch_size)

    @property
    def workers(self) -> int:
        return patch_workers(self.current.runner, self.policy.threads)

    def __call__(self, x_h: PlaneSource, p1_h: PlaneSource, countdown: Countdown) -> PatchResult:
        """Correction on H from the input ``x_h`` and the stage-1 prediction ``p1_h`` (both ZYX on H).

        Degrades when ``countdown`` runs out (:func:`~fusemycells.runtime.ladder.patch_attempts`): without
        overlap (level 1), then the stage-1 correction alone (level 2).
        """
        if self.policy.active_device == "cpu" and self.ladder.cpu_predict is not None:
            self.ladder.use_cpu()  # the device faulted since this stage was loaded
        dtype = np.float16 if self.policy.compact_output(x_h.shape) else np.float32
        result = PatchResult(correction=np.empty(x_h.shape, dtype=dtype))
        for attempt in patch_attempts(self.overlap):  # full, then no overlap
            why = self._run(x_h, p1_h, attempt.overlap, countdown, result)
            if why is None:
                return result
            result.degradations.append(Degradation(attempt.level + 1, why))
        result.degradations.append(PATCH_SKIPPED)
        stage1_correction(x_h, p1_h, result.correction)
        return result

    def _run(
        self, x_h: PlaneSource, p1_h: PlaneSource, overlap: float, countdown: Countdown, result: PatchResult
    ) -> str | None:
        """One sliding-window pass into ``result``; why it did not finish (None: it did)."""
        total = count_windows(x_h.shape, self.patch, overlap)
        too_slow = self.watcher.too_slow(total, countdown)
        if too_slow is not None:
            return too_slow
        workers, batch_size = self.workers, self.batch_size
        self.watcher.start(total, countdown, batch_size)
        emit = partial(store_difference, result.correction, read_only(x_h))
        with torch_threads(patch_torch_threads(self.current.runner, workers)):
            try:
                _, stats = sliding_window(
                    [x_h, p1_h], self.ladder, self.patch, overlap=overlap, batch_size=batch_size,
                    emit=emit, after_batch=self.watcher.after_batch, workers=workers,
                )  # fmt: skip
            finally:
                self.watcher.finish()  # closes a progress bar, also on an error or SIGTERM
        if stats.stopped is not None:
            return stats.stopped
        result.info = self._info(stats, overlap, workers)
        if self.ladder.sub_patch is not None:
            result.warnings.append(self._tiling_caveat())
        return None

    def _tiling_caveat(self) -> str:
        """Why sub-patch tiling is a quality downgrade, not a transparent fallback."""
        return (
            f"patches tiled into {tuple(self.ladder.sub_patch or ())} sub-patches after running out of device memory: "
            f"the patch network normalises each (instance norm) over less context than a {tuple(self.patch)} patch, "
            "so this output differs from a full-patch one"
        )

    def _info(self, stats: StitchStats, overlap: float, workers: int) -> dict[str, Any]:
        used = self.current  # the CPU one when the OOM ladder moved there meanwhile
        return {
            "file": used.file,
            "backend": used.runner.backend,
            "provider": used.runner.provider,
            "precision": used.runner.precision,
            "patches": stats.patches,
            "patch_grid": list(stats.grid),
            "overlap": overlap,
            "forward_s": round(stats.forward_s, 3),
            "batch_size": self.batch_size,
            "workers": workers,
            "sub_patch": None if self.ladder.sub_patch is None else list(self.ladder.sub_patch),
        }
