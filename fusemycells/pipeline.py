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
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from . import postprocess
from .backends import LoadedStage, load_stage, warm_up
from .budget import DEGRADATION_LEVELS, BudgetPolicy, DeadlineExceeded, OomLadder
from .config import ChannelSpec, Manifest
from .devices import free_device_cache, is_out_of_memory, peak_rss_mib, peak_vram_mib, torch_threads
from .io import InputError, Volume, list_inputs, read_volume, write_volume
from .preprocess import ResizedSource, intensity_affine, sanitise_inplace
from .sources import ArraySource, PlaneSource, materialise, shape_for_spacing
from .stitching import count_windows, sliding_window

log = logging.getLogger(__name__)

FLOAT16_MAX = float(np.finfo(np.float16).max)
"""Largest finite float16 (65504): the compact in-place output is clipped to ±this."""
ANISOTROPY_WARNING = 10.0
"""Z spacing / XY spacing from which a file is reported as extremely anisotropic."""


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
    peak_vram_mib: float | None = None  # torch's reserved CUDA memory; None on a CPU run
    non_finite_replaced: int = 0
    degradation: int = 0  # see fusemycells.budget.DEGRADATION_LEVELS
    weight_map: dict[str, float] = field(default_factory=dict)
    adaptive: dict[str, float] = field(default_factory=dict)  # relative noise → output σ, network gate
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
                vram_budget_gib=self.policy.vram_budget_gib,
            )
            loaded = self._stages[key]
            log.info("loaded %s %s stage: %s (%s on %s)", channel.name, which, loaded.file, loaded.runner.backend, loaded.runner.provider)
            warm_up(loaded)
        return self._stages[key]

    def cpu_runner(self, channel: ChannelSpec, which: str) -> LoadedStage:
        """The stage loaded on the CPU (fallback when the device runs out of memory)."""
        key = (channel.name, which + "@cpu")
        if key not in self._stages:
            spec = channel.global_stage if which == "global" else channel.patch_stage
            self._stages[key] = load_stage(self.manifest, spec, self.backend, "cpu", threads=self.policy.threads, strict=self.backend != "auto")
            warm_up(self._stages[key])
        return self._stages[key]

    def _global_prediction(self, channel: ChannelSpec, coarse: np.ndarray) -> tuple[np.ndarray, LoadedStage]:
        """(Stage-1 prediction on the global grid (ZYX float32), the stage that ran it).

        On device OOM the stage reruns on the CPU, and that CPU stage is returned.
        """
        stage1 = self.stage(channel, "global")
        try:
            return stage1.runner(coarse[None, None])[0, 0], stage1
        except Exception as exc:
            if not is_out_of_memory(exc) or self.policy.device == "cpu":
                raise
        free_device_cache()
        self.policy.event("out of memory in the global stage: running it on the CPU")
        cpu_stage = self.cpu_runner(channel, "global")
        return cpu_stage.runner(coarse[None, None])[0, 0], cpu_stage

    def fuse(self, volume: Volume, report: CaseReport, deadline: float | None = None, output_dtype: str = "float32") -> PlaneSource:
        """Fused prediction for one volume, as a lazy ZYX source on the input grid (see ``output_dtype``).

        Memory: ``volume.data`` is consumed (its buffer is reused for the blended output when
        the pixel type is 2 or 4 bytes); the high-resolution input and the upsampled stage-1
        prediction are never materialised (computed per row of patches), and the correction
        (prediction − input on H) is kept in float16 on big stacks. ``deadline`` (a ``time.perf_counter()``
        value) makes the pipeline degrade in the steps of :data:`DEGRADATION_LEVELS`.
        """
        channel = self.manifest.channel(volume.channel)
        with timed(report, "preprocess"):
            data = volume.data
            if data.dtype.kind == "f" and not data.flags.writeable:
                data = data.copy()
            report.non_finite_replaced = sanitise_inplace(data)
            if report.non_finite_replaced:
                warn(report, f"{report.non_finite_replaced} non-finite voxels replaced by the median")
            offset, scale = intensity_affine(data, **channel.normalisation)
            x_in = ArraySource(data, offset, scale)
            noise = postprocess.relative_noise(data)
            out_sigma, gate = postprocess.adaptive_settings(noise, channel.postprocess)
            post = replace(channel.postprocess, output_gaussian_sigma=out_sigma)
            report.adaptive = {
                "relative_noise": round(noise, 5),
                "output_sigma": round(out_sigma, 3),
                "output_sigma_zyx": [round(v, 3) for v in postprocess.output_sigma_zyx(post, volume.spacing)],
                "network_gate": round(gate, 3),
            }
            target = (channel.target_spacing_um,) * 3
            grid_h = shape_for_spacing(data.shape, volume.spacing, target)
            report.high_res_grid = list(grid_h)
            for message in input_warnings(data, volume.spacing, grid_h, channel.patch_stage.patch_size, channel.target_spacing_um):
                warn(report, message)
        # time kept back for post-processing and writing: both scale with the input's voxel count
        reserve = self.policy.stage_costs["finish"].estimate(data.size)

        def left() -> float:
            return math.inf if deadline is None else deadline - reserve - time.perf_counter()

        def finish(source: PlaneSource) -> PlaneSource:
            return postprocess.final_source(source, post, output_dtype, spacing=volume.spacing)

        if gate <= 0.0:
            log.info("    relative noise %.4f: network correction gated off (manifest gate_knots); output σ %.2f", noise, out_sigma)
            return finish(x_in)
        global_voxels = data.size + math.prod(grid_h)
        global_s = self.policy.stage_costs["global"].estimate(global_voxels)
        if left() <= global_s:
            self._degrade(report, 3, f"{max(left(), 0):.1f} s left, the global stage needs ~{global_s:.1f} s")
            return finish(x_in)
        with timed(report, "global_stage"):
            x_h = ResizedSource(x_in, grid_h)
            assert channel.global_stage.grid is not None
            coarse = materialise(ResizedSource(x_h, channel.global_stage.grid, cache=False))
            p1, stage1 = self._global_prediction(channel, coarse)
            p1_h = ResizedSource(p1, grid_h)
            del coarse
            report.stages["global"] = {"file": stage1.file, "backend": stage1.runner.backend, "provider": stage1.runner.provider}
        self.policy.stage_costs["global"].learn(global_voxels, report.seconds["global_stage"])
        if left() <= 0.0:
            self._degrade(report, 3, f"deadline passed during the global stage ({report.seconds['global_stage']:.1f} s)")
            return finish(x_in)
        with timed(report, "patch_stage"):
            correction = self._patch_correction(channel, x_h, p1_h, report, left)
        del x_h, p1_h  # their row caches (two patch depths of H, float32) are not needed any more
        with timed(report, "postprocess"):
            weight = postprocess.correction_weight(correction, post)
            weight *= postprocess.background_mask(x_in, post)
            weight *= np.float32(gate)
            report.weight_map = postprocess.weight_stats(weight)
            blended = self._blend(data, x_in, correction, weight, compact=self.policy.compact_output(data.shape))
            del correction
            out = finish(blended)
        return out

    @staticmethod
    def _blend(data: np.ndarray, x_in: ArraySource, correction: np.ndarray, weight: np.ndarray, compact: bool) -> ArraySource:
        """x_in + w·correction on the input grid, slab by slab (float32, or float16 in place when ``compact``).

        The correction (on H) and the weight map (on the diff grid) are resized to the input grid
        per slab. In place, each slab of the input is read before the same slab of the output
        overwrites it (float16 over 2-byte pixels, float32 over 4-byte ones); float16 values are
        clipped to ±:data:`FLOAT16_MAX` so the output stays finite.
        """
        in_place = compact and data.flags.c_contiguous and data.flags.writeable
        if in_place and data.dtype.itemsize == 2:
            out = data.view(np.float16)
        elif in_place and data.dtype.itemsize == 4:
            out = data.view(np.float32)
        else:
            out = np.empty(data.shape, dtype=np.float32)
        corr = ResizedSource(correction, data.shape, cache=False)
        wmap = ResizedSource(weight, data.shape, antialias=False, cache=False)
        for z0 in range(0, data.shape[0], 16):
            z1 = min(data.shape[0], z0 + 16)
            planes = x_in.planes(z0, z1)
            w = wmap.planes(z0, z1)
            np.clip(w, 0.0, 1.0, out=w)
            w *= corr.planes_readonly(z0, z1)
            planes += w
            if out.dtype == np.float16:  # e.g. a 65535 voxel over a percentile span of ~1 would be inf
                np.clip(planes, -FLOAT16_MAX, FLOAT16_MAX, out=planes)
            out[z0:z1] = planes
        return ArraySource(out)

    def _degrade(self, report: CaseReport, level: int, why: str) -> None:
        report.degradation = max(report.degradation, level)
        message = f"time budget: level {level} ({DEGRADATION_LEVELS[level]}): {why}"
        report.warnings.append(message)
        self.policy.event(f"{report.file}: {message}")

    def _patch_stage(self, channel: ChannelSpec) -> LoadedStage:
        """The patch stage to run: on the CPU from the start once the OOM ladder moved it there."""
        return self.cpu_runner(channel, "patch") if self.policy.forced_cpu else self.stage(channel, "patch")

    def _patch_correction(self, channel: ChannelSpec, x_h: PlaneSource, p1_h: PlaneSource, report: CaseReport, left: Callable[[], float]) -> np.ndarray:
        """Stage-2 prediction − input on H, ZYX, float16 for big stacks else float32 (the stage-1 one when time runs out)."""
        spec2 = channel.patch_stage
        assert spec2.patch_size is not None
        stage2 = self._patch_stage(channel)
        cpu = None if self.policy.device == "cpu" else (lambda: self.cpu_runner(channel, "patch").runner)
        predict = OomLadder(stage2.runner, self.policy, cpu_predict=cpu)
        workers = self.policy.patch_workers(stage2.runner.backend, stage2.runner.device)
        # float16 halves the largest array of a big stack (rounding ≤ 2.4e-4 of values < 1); small
        # stacks keep float32, so the two backends agree to the networks' own precision there
        correction = np.empty(x_h.shape, dtype=np.float16 if self.policy.compact_output(x_h.shape) else np.float32)

        read_x = getattr(x_h, "planes_readonly", x_h.planes)

        def emit(z0: int, z1: int, planes: np.ndarray) -> None:
            planes -= read_x(z0, z1)  # in place: the stitched planes are ours to change
            correction[z0:z1] = planes

        level = 0
        for overlap in dict.fromkeys((spec2.overlap, 0.0)):  # full, then without overlap
            total = count_windows(x_h.shape, spec2.patch_size, overlap)
            rate = self.policy.seconds_per_patch
            if rate is not None and total * rate > left():
                level += 1
                self._degrade(report, level, f"{total} patches × {rate:.3f} s > {max(left(), 0):.1f} s left")
                continue
            started = time.perf_counter()
            first: list[tuple[int, float]] = []  # (patches, seconds) after the first batch

            def progress(done: int, total: int, started: float = started, first: list[tuple[int, float]] = first) -> None:
                elapsed = time.perf_counter() - started
                if done == total or done % max(1, total // 10) < self.policy.patch_batch_size(spec2.batch_size):
                    log.info("    patches %d/%d (%.1f s)", done, total, elapsed)
                if not first:
                    # the first batch pays one-time costs (the first row of patches is resampled
                    # from the input, session warm-up, allocations): on a 309×1920×1920 stack it
                    # took 14× a steady batch, which on a GPU would wrongly degrade the file, so
                    # the rate (and the policy's) is learned from the following batches only
                    first.append((done, elapsed))
                    return
                rate = (elapsed - first[0][1]) / max(done - first[0][0], 1)
                self.policy.seconds_per_patch = rate
                if done < total and (total - done) * rate > left():
                    raise DeadlineExceeded(f"{done}/{total} patches in {elapsed:.1f} s ({rate:.3f} s/patch), {max(left(), 0):.1f} s left")

            try:
                with torch_threads(1 if workers > 1 else None):  # one thread per concurrent forward
                    _, stats = sliding_window(
                        [x_h, p1_h],
                        predict,
                        spec2.patch_size,
                        overlap=overlap,
                        batch_size=self.policy.patch_batch_size(spec2.batch_size),
                        emit=emit,
                        progress=progress,
                        workers=workers,
                    )
            except DeadlineExceeded as exc:
                level += 1
                self._degrade(report, level, str(exc))
                continue
            used = self._patch_stage(channel)  # the CPU one when the OOM ladder moved there meanwhile
            report.stages["patch"] = {
                "file": used.file,
                "backend": used.runner.backend,
                "provider": used.runner.provider,
                "patches": stats.patches,
                "patch_grid": list(stats.grid),
                "overlap": overlap,
                "forward_s": round(stats.forward_s, 3),
                "batch_size": self.policy.patch_batch_size(spec2.batch_size),
                "workers": workers,
                "sub_patch": None if self.policy.sub_patch is None else list(self.policy.sub_patch),
            }
            return correction
        self._degrade(report, 2, "patch stage skipped")
        for z0 in range(0, x_h.shape[0], 16):
            z1 = min(x_h.shape[0], z0 + 16)
            correction[z0:z1] = p1_h.planes(z0, z1) - x_h.planes(z0, z1)
        return correction


def warn(report: CaseReport, message: str) -> None:
    """Add a warning to a file's report and log it."""
    report.warnings.append(message)
    log.warning("[%s] %s", report.file, message)


def constant_value(data: np.ndarray, slab: int = 16) -> float | None:
    """The value of every voxel when a ZYX stack is constant, else None (stops at the first differing slab)."""
    first = data.flat[0]
    for z0 in range(0, data.shape[0], slab):
        if not np.all(data[z0 : z0 + slab] == first):
            return None
    return float(first)


def input_warnings(
    data: np.ndarray, spacing: tuple[float, float, float], grid_h: tuple[int, ...], patch: tuple[int, int, int] | None, target_um: float
) -> list[str]:
    """Warnings for inputs unlike the training data that are processed anyway.

    Constant or all-zero image, a single slice, a volume smaller than one patch on the
    high-resolution grid, extreme anisotropy. ``data``: ZYX, finite; ``spacing``: (z, y, x) µm;
    ``grid_h`` and ``patch``: ZYX voxels at ``target_um`` µm.
    """
    warnings: list[str] = []
    value = constant_value(data)
    if value is not None:
        kind = "all-zero" if value == 0 else f"constant (every voxel {value:g})"
        warnings.append(f"{kind} image: no contrast to fuse; the output is finite but carries no information")
    if data.shape[0] == 1:
        warnings.append(f"single slice: its one plane is repeated over the {grid_h[0]} plane(s) of the high-resolution grid")
    if patch is not None and any(n < p for n, p in zip(grid_h, patch)):
        warnings.append(f"volume is {tuple(grid_h)} voxels at {target_um:g} µm, smaller than one {tuple(patch)} patch: reflect-padded for the patch network")
    ratio = spacing[0] / min(spacing[1], spacing[2])
    if ratio >= ANISOTROPY_WARNING:
        warnings.append(
            f"extreme anisotropy: Z spacing {spacing[0]:g} µm is {ratio:.1f}× the XY spacing; Z is interpolated "
            f"{spacing[0] / target_um:.1f}× onto the {target_um:g} µm grid, so axial detail finer than {spacing[0]:g} µm is not recovered"
        )
    return warnings


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
        for warning in volume.warnings:
            warn(report, warning)
        if volume.data.dtype != np.uint16:
            warn(report, f"input dtype {volume.data.dtype} converted; output {output_dtype}")
        log.info("[%s] shape %s, spacing %s µm, channel %s", path.name, volume.data.shape, volume.spacing, volume.channel)
        result = fuser.fuse(volume, report, deadline=deadline, output_dtype=output_dtype)
        with timed(report, "write"):
            write_volume(output_dir / path.name, result, like=volume)
        report.output_dtype = output_dtype
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
    vram = peak_vram_mib()
    report.peak_vram_mib = None if vram is None else round(vram, 1)
    vram_text = "" if report.peak_vram_mib is None else f", peak VRAM {report.peak_vram_mib:.0f} MiB"
    log.info("[%s] %s in %.1f s (peak RSS %.0f MiB%s)", path.name, report.status, report.seconds["total"], report.peak_rss_mib, vram_text)
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
        learn_finish_cost(fuser.policy, reports[-1])
    return reports


def learn_finish_cost(policy: BudgetPolicy, report: CaseReport) -> None:
    """Teach ``policy`` the post-processing + writing seconds per input voxel of a fully fused file.

    Files that skipped the blend (degradation level 3, gated network) finish faster and are not used.
    """
    if report.status != "ok" or report.shape is None or "postprocess" not in report.seconds:
        return
    seconds = report.seconds["postprocess"] + report.seconds.get("write", 0.0)
    policy.stage_costs["finish"].learn(math.prod(report.shape), seconds)
