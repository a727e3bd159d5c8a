"""The two-stage fusion pipeline for one ZYX volume, and the per-file run loop.

Grids: the *input grid* is the file's own (spacing (z, y, x) µm); the *high-resolution grid H* is
the same physical extent at the manifest's isotropic target spacing; the *global grid* is the
stage-1 network's fixed shape. Stage 2 predicts on H; its correction (prediction − input on H) is
resampled to the input grid and blended into the original-resolution input with the difference
weight map, so wherever the weight is 0 the output equals the (normalised) input exactly.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from . import postprocess
from .backends import LoadedStage, load_stage
from .budget import BudgetPolicy, peak_rss_mib
from .config import ChannelSpec, Manifest
from .io import InputError, Volume, list_inputs, read_volume, write_volume
from .preprocess import iter_resized, normalise_intensity, resize, sanitise, shape_for_spacing
from .stitching import sliding_window

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

    def fuse(self, volume: Volume, report: CaseReport) -> np.ndarray:
        """Fused prediction for one volume: float32 ZYX on the input grid, percentile-normalised."""
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
            x_h = resize(x_in, grid_h)
        with timed(report, "global_stage"):
            stage1 = self.stage(channel, "global")
            assert channel.global_stage.grid is not None
            coarse = resize(x_h, channel.global_stage.grid)
            p1 = stage1.runner(coarse[None, None])[0, 0]
            p1_h = resize(p1, grid_h)
            del coarse, p1
            report.stages["global"] = {"file": stage1.file, "backend": stage1.runner.backend, "provider": stage1.runner.provider}
        with timed(report, "patch_stage"):
            stage2 = self.stage(channel, "patch")
            spec2 = channel.patch_stage
            assert spec2.patch_size is not None
            total_patches = 0

            def progress(done: int, total: int) -> None:
                nonlocal total_patches
                total_patches = total
                if done == total or done % max(1, total // 10) < self.policy.patch_batch_size(spec2.batch_size):
                    log.info("    patches %d/%d", done, total)

            p2, stats = sliding_window(
                [x_h, p1_h],
                stage2.runner,
                spec2.patch_size,
                overlap=spec2.overlap,
                batch_size=self.policy.patch_batch_size(spec2.batch_size),
                progress=progress,
            )
            del p1_h
            report.stages["patch"] = {
                "file": stage2.file,
                "backend": stage2.runner.backend,
                "provider": stage2.runner.provider,
                "patches": stats.patches,
                "patch_grid": list(stats.grid),
                "forward_s": round(stats.forward_s, 3),
            }
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


def process_file(path: Path, output_dir: Path, fuser: Fuser, output_dtype: str) -> CaseReport:
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
        fused = fuser.fuse(volume, report)
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
        reports.append(process_file(path, output_dir, fuser, output_dtype))
    return reports
