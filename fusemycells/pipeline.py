"""The two-stage fusion pipeline for one ZYX volume, and the per-file run loop.

Grids: the *input grid* is the file's own (spacing (z, y, x) µm); the *high-resolution grid H* is
the same physical extent at the manifest's isotropic target spacing; the *global grid* is the
stage-1 network's fixed shape. Stage 2 predicts on H; its correction (prediction − input on H) is
resampled to the input grid and blended into the original-resolution input with the difference
weight map, so wherever the weight is 0 the output equals the (normalised) input exactly.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from . import postprocess
from .backends import LoadedStage, load_stage
from .budget import (
    DEGRADATION_LEVELS,
    BudgetPolicy,
    DeadlineExceeded,
    OomLadder,
    free_device_cache,
    is_out_of_memory,
    peak_rss_mib,
)
from .config import ChannelSpec, Manifest
from .io import InputError, Volume, list_inputs, read_volume, write_volume
from .preprocess import iter_resized, normalise_intensity, resize, sanitise, shape_for_spacing
from .stitching import count_windows, sliding_window

log = logging.getLogger(__name__)


@dataclass
class CaseReport:
    """What happened to one input file (one entry of the JSON report)."""

    file: str
    status: str = "pending"  # ok | refused
    shape: list[int] | None = None
    spacing_um: list[float] | None = None
    channel: str | None = None
    input_dtype: str | None = None
    output_dtype: str | None = None
    high_res_grid: list[int] | None = None
    stages: dict[str, dict[str, Any]] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    peak_rss_mib: float | None = None
    non_finite_replaced: int = 0
    degradation: int = 0  # see fusemycells.budget.DEGRADATION_LEVELS
    weight_map: dict[str, float] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    error: str | None = None


@contextmanager
def timed(report: CaseReport, name: str) -> Iterator[None]:
    """Record the wall time of a block in ``report.seconds[name]`` and log it."""
    start = time.perf_counter()
    yield
    report.seconds[name] = round(time.perf_counter() - start, 3)
    log.info("  %-12s %7.2f s", name, report.seconds[name])


class Fuser:
    """Runs the two networks of each channel; stages are loaded once and reused across files."""

    def __init__(self, manifest: Manifest, policy: BudgetPolicy, backend: str = "auto") -> None:
        self.manifest = manifest
        self.policy = policy
        self.backend = backend
        self._stages: dict[tuple[str, str], LoadedStage] = {}

    def stage(self, channel: ChannelSpec, which: str) -> LoadedStage:
        """The loaded 'global' or 'patch' stage of a channel (checksums verified on first use)."""
        key = (channel.name, which)
        if key not in self._stages:
            spec = channel.global_stage if which == "global" else channel.patch_stage
            self._stages[key] = load_stage(
                self.manifest,
                spec,
                self.backend,
                self.policy.device,
                half=self.policy.half,
                threads=self.policy.threads,
                strict=self.backend != "auto",
            )
            loaded = self._stages[key]
            log.info("loaded %s %s stage: %s (%s on %s)", channel.name, which, loaded.file, loaded.runner.backend, loaded.runner.provider)
        return self._stages[key]

    def cpu_runner(self, channel: ChannelSpec, which: str) -> LoadedStage:
        """The stage loaded on the CPU (fallback when the device runs out of memory)."""
        key = (channel.name, which + "@cpu")
        if key not in self._stages:
            spec = channel.global_stage if which == "global" else channel.patch_stage
            self._stages[key] = load_stage(self.manifest, spec, self.backend, "cpu", threads=self.policy.threads, strict=self.backend != "auto")
        return self._stages[key]

    def _global_prediction(self, channel: ChannelSpec, coarse: np.ndarray) -> np.ndarray:
        """Stage-1 prediction on the global grid (ZYX float32); moves to the CPU on device OOM."""
        stage1 = self.stage(channel, "global")
        try:
            return stage1.runner(coarse[None, None])[0, 0]
        except Exception as exc:
            if not is_out_of_memory(exc) or self.policy.device == "cpu":
                raise
        free_device_cache()
        self.policy.event("out of memory in the global stage: running it on the CPU")
        return self.cpu_runner(channel, "global").runner(coarse[None, None])[0, 0]

    def fuse(self, volume: Volume, report: CaseReport, deadline: float | None = None) -> np.ndarray:
        """Fused prediction for one volume: float32 ZYX on the input grid, percentile-normalised.

        ``deadline`` (a ``time.perf_counter()`` value) makes the pipeline degrade in the steps of
        :data:`~fusemycells.budget.DEGRADATION_LEVELS` so that it returns before then.
        """
        channel = self.manifest.channel(volume.channel)
        post = channel.postprocess
        with timed(report, "preprocess"):
            data, report.non_finite_replaced = sanitise(volume.data)
            if report.non_finite_replaced:
                report.warnings.append(f"{report.non_finite_replaced} non-finite voxels replaced by the median")
            x_in = normalise_intensity(data, **channel.normalisation)
            del data
            target = (channel.target_spacing_um,) * 3
            grid_h = shape_for_spacing(x_in.shape, volume.spacing, target)
            report.high_res_grid = list(grid_h)
        # time kept back for post-processing and writing: both scale like the preprocessing
        reserve = 1.0 + 4.0 * report.seconds["preprocess"]

        def left() -> float:
            return math.inf if deadline is None else deadline - reserve - time.perf_counter()

        estimate_global = self.policy.stage_seconds.get("global", 0.0)
        if left() <= estimate_global:
            self._degrade(report, 3, f"{max(left(), 0):.1f} s left before the global stage")
            with timed(report, "postprocess"):
                out = postprocess.finalise(x_in, post)
            return out
        with timed(report, "global_stage"):
            x_h = resize(x_in, grid_h)
            assert channel.global_stage.grid is not None
            coarse = resize(x_h, channel.global_stage.grid)
            p1 = self._global_prediction(channel, coarse)
            p1_h = resize(p1, grid_h)
            del coarse, p1
            stage1 = self.stage(channel, "global")
            report.stages["global"] = {"file": stage1.file, "backend": stage1.runner.backend, "provider": stage1.runner.provider}
        self.policy.stage_seconds["global"] = report.seconds["global_stage"]
        with timed(report, "patch_stage"):
            p2 = self._patch_prediction(channel, x_h, p1_h, report, left)
            del p1_h
        with timed(report, "postprocess"):
            weight = postprocess.difference_weight(x_h, p2, post)
            report.weight_map = postprocess.weight_stats(weight)
            p2 -= x_h  # correction on H
            del x_h
            out = x_in
            for (z0, z1, corr), (_, _, w) in zip(iter_resized(p2, out.shape), iter_resized(weight, out.shape, antialias=False)):
                np.clip(w, 0.0, 1.0, out=w)
                out[z0:z1] += w * corr
            del p2
            out = postprocess.finalise(out, post)
        return out

    def _degrade(self, report: CaseReport, level: int, why: str) -> None:
        report.degradation = max(report.degradation, level)
        message = f"time budget: level {level} ({DEGRADATION_LEVELS[level]}): {why}"
        report.warnings.append(message)
        self.policy.event(f"{report.file}: {message}")

    def _patch_prediction(self, channel: ChannelSpec, x_h: np.ndarray, p1_h: np.ndarray, report: CaseReport, left: Callable[[], float]) -> np.ndarray:
        """Stage-2 prediction on H (ZYX float32), or the stage-1 one when time runs out."""
        spec2 = channel.patch_stage
        assert spec2.patch_size is not None
        stage2 = self.stage(channel, "patch")
        cpu = None if self.policy.device == "cpu" else (lambda: self.cpu_runner(channel, "patch").runner)
        predict = OomLadder(stage2.runner, self.policy, cpu_predict=cpu)
        level = 0
        for overlap in dict.fromkeys((spec2.overlap, 0.0)):  # full, then without overlap
            total = count_windows(x_h.shape, spec2.patch_size, overlap)
            rate = self.policy.seconds_per_patch
            if rate is not None and total * rate > left():
                level += 1
                self._degrade(report, level, f"{total} patches × {rate:.3f} s > {max(left(), 0):.1f} s left")
                continue
            started = time.perf_counter()

            def progress(done: int, total: int, started: float = started) -> None:
                elapsed = time.perf_counter() - started
                self.policy.seconds_per_patch = elapsed / done
                if done == total or done % max(1, total // 10) < self.policy.patch_batch_size(spec2.batch_size):
                    log.info("    patches %d/%d (%.1f s)", done, total, elapsed)
                if done < total and (total - done) * elapsed / done > left():
                    raise DeadlineExceeded(f"{done}/{total} patches in {elapsed:.1f} s, {max(left(), 0):.1f} s left")

            try:
                p2, stats = sliding_window(
                    [x_h, p1_h],
                    predict,
                    spec2.patch_size,
                    overlap=overlap,
                    batch_size=self.policy.patch_batch_size(spec2.batch_size),
                    progress=progress,
                )
            except DeadlineExceeded as exc:
                level += 1
                self._degrade(report, level, str(exc))
                continue
            report.stages["patch"] = {
                "file": stage2.file,
                "backend": ("cpu " if self.policy.forced_cpu else "") + stage2.runner.backend,
                "provider": "CPU" if self.policy.forced_cpu else stage2.runner.provider,
                "patches": stats.patches,
                "patch_grid": list(stats.grid),
                "overlap": overlap,
                "forward_s": round(stats.forward_s, 3),
                "batch_size": self.policy.patch_batch_size(spec2.batch_size),
                "sub_patch": None if self.policy.sub_patch is None else list(self.policy.sub_patch),
            }
            return p2
        self._degrade(report, 2, "patch stage skipped")
        return p1_h.copy()


def process_file(path: Path, output_dir: Path, fuser: Fuser, output_dtype: str, deadline: float | None = None) -> CaseReport:
    """Read, fuse and write one file; never raises for a problem with this file (see ``status``)."""
    report = CaseReport(file=path.name)
    started = time.perf_counter()
    log.info("[%s] reading", path.name)
    try:
        target = min(c.target_spacing_um for c in fuser.manifest.channels.values())

        def check(shape: tuple[int, int, int], dtype: np.dtype, spacing: tuple[float, float, float]) -> None:
            fuser.policy.check_memory(shape, dtype.itemsize, spacing, target)

        volume = read_volume(path, check=check)
        if volume.data.ndim != 3:
            raise InputError(f"{path.name}: expected a 3D ZYX stack, got shape {volume.data.shape}")
        report.shape = list(volume.data.shape)
        report.spacing_um = [round(s, 6) for s in volume.spacing]
        report.channel = volume.channel
        report.input_dtype = str(volume.data.dtype)
        report.warnings.extend(volume.warnings)
        for warning in volume.warnings:
            log.warning("[%s] %s", path.name, warning)
        log.info("[%s] shape %s, spacing %s µm, channel %s", path.name, volume.data.shape, volume.spacing, volume.channel)
        fused = fuser.fuse(volume, report, deadline=deadline)
        result = postprocess.to_output_dtype(fused, output_dtype)
        del fused
        with timed(report, "write"):
            write_volume(output_dir / path.name, result, like=volume)
        report.output_dtype = str(result.dtype)
        report.status = "ok"
    except Exception as exc:  # one bad file must not lose the others
        report.status = "refused"
        if isinstance(exc, InputError):
            report.error = str(exc)
        elif isinstance(exc, MemoryError):
            report.error = f"{path.name}: out of memory budget: {exc}"
        else:
            report.error = f"{path.name}: {type(exc).__name__}: {exc}"
        log.error("[%s] refused: %s", path.name, report.error)
        if not isinstance(exc, (InputError, MemoryError)):
            log.debug("traceback", exc_info=True)
    report.seconds["total"] = round(time.perf_counter() - started, 3)
    report.peak_rss_mib = round(peak_rss_mib(), 1)
    log.info("[%s] %s in %.1f s (peak RSS %.0f MiB)", path.name, report.status, report.seconds["total"], report.peak_rss_mib)
    return report


def run_directory(input_dir: Path, output_dir: Path, fuser: Fuser, output_dtype: str) -> list[CaseReport]:
    """Process every TIFF in ``input_dir`` into ``output_dir`` (same file names)."""
    files = list_inputs(input_dir)
    log.info("%d input file(s) in %s", len(files), input_dir)
    reports = []
    for index, path in enumerate(files, start=1):
        log.info("file %d/%d: %s", index, len(files), path.name)
        deadline = fuser.policy.file_deadline(files_left=len(files) - index + 1)
        reports.append(process_file(path, output_dir, fuser, output_dtype, deadline=deadline))
    return reports
