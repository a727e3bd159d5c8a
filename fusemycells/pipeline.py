"""The two-stage fusion pipeline for one ZYX volume (the file-to-file path is :mod:`fusemycells.files`).

Grids: the *input grid* is the file's own (spacing (z, y, x) µm); the *high-resolution grid H* is
the same physical extent at the manifest's isotropic target spacing; the *global grid* is the
stage-1 network's fixed shape. Stage 2 predicts on H; its correction (prediction − input on H) is
resampled to the input grid and blended into the original-resolution input with the difference
weight map, so wherever the weight is 0 the output equals the (normalised) input exactly.

:meth:`Fuser.fuse` reads top to bottom: prepare → global stage → patch stage → blend → finish.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Protocol, TypeVar

import numpy as np

from fusemycells import postprocess, trust
from fusemycells.backends import LoadedStage, load_stage, warm_up
from fusemycells.config import (
    DEFAULT_RESOURCES,
    ChannelSpec,
    Manifest,
    PostprocessSpec,
    StageSpec,
    load_manifest,
    resolve_resources_dir,
    with_output_sigma,
)
from fusemycells.io.volume import InputError
from fusemycells.ops import Ops, choose_ops
from fusemycells.patch_stage import PatchStage
from fusemycells.preprocess import ResizedSource, intensity_affine, resize_through, sanitise_inplace
from fusemycells.report import CaseReport
from fusemycells.runtime.allocator import reuse_freed_memory
from fusemycells.runtime.budget import BudgetPolicy, LinearCost
from fusemycells.runtime.deadline import Countdown, Now
from fusemycells.runtime.devices import DeviceFault, free_device_cache, is_out_of_memory
from fusemycells.runtime.ladder import DEGRADATION_LEVELS, Degradation, Ladder
from fusemycells.runtime.progress import ProgressFactory, progress_for
from fusemycells.runtime.timing import Profile
from fusemycells.sources import ArraySource, PlaneSource, Shape3, Spacing3, materialise, shape_for_spacing, slabs

log = logging.getLogger(__name__)
T = TypeVar("T")

ANISOTROPY_WARNING = 10.0
"""Z spacing / XY spacing from which a file is reported as extremely anisotropic."""


@contextmanager
def timed(seconds: dict[str, float], name: str) -> Iterator[None]:
    """Record the wall time of a block in ``seconds[name]`` (a report's profile) and log it."""
    start = time.perf_counter()
    yield
    seconds[name] = round(time.perf_counter() - start, 3)
    log.info("  %-12s %7.2f s", name, seconds[name])


def warn(report: CaseReport, message: str) -> None:
    """Add a warning to a file's report and log it."""
    report.warnings.append(message)
    log.warning("[%s] %s", report.file, message)


@dataclass
class Prepared:
    """One volume ready for the networks (see :meth:`Fuser.fuse`)."""

    data: np.ndarray  # the input pixels, ZYX, finite; the output may reuse their buffer
    spacing: Spacing3  # (z, y, x) µm
    channel: ChannelSpec
    x_in: ArraySource  # the normalised input on the input grid
    grid_h: Shape3  # the high-resolution grid H (voxels at the channel's target spacing)
    post: PostprocessSpec  # the channel's post-processing with the noise-adaptive output σ
    gate: float  # confidence in the networks' correction, 0..1 (0: the networks are skipped)
    noise: float  # the input's relative noise (see postprocess.relative_noise)
    ops: Ops  # where the non-network steps run, and the case's profile (see ops.choose_ops)
    ops_on: str  # the device ``ops`` were chosen for ('cpu' after a device fault)
    weight: np.ndarray | None = None  # the blending weight on the diff grid (ZYX, 0..1) once blended


@dataclass
class HighRes:
    """The input and the stage-1 prediction, lazily resized to H (each keeps a row cache)."""

    x_h: PlaneSource
    p1_h: PlaneSource
    coarse: np.ndarray | None = None  # the normalised input on the global grid (ZYX)
    p1: np.ndarray | None = None  # the stage-1 prediction on the global grid (ZYX)


@dataclass
class Fused:
    """The fused volume as a lazy ZYX source on the input grid, and what happened."""

    output: PlaneSource
    report: CaseReport
    profile: Profile = field(default_factory=Profile)  # exclusive seconds per kind of work, also while writing
    on_cpu: Callable[[], PlaneSource] | None = None  # the same output computed on the CPU (after a device fault)
    weight: np.ndarray | None = None  # where the networks acted: the blending weight (diff grid, ZYX); None: not at all

    def to_array(self) -> np.ndarray:
        """The output as one ZYX array on the input grid, computed now: uint16 (0..65535, the container's
        output), or float32 (normalised, about 0..1) for ``output_dtype='float32'``."""
        return materialise(self.output)


class StageLoader(Protocol):
    """Loads one network stage (see :func:`fusemycells.backends.load_stage`, the default)."""

    def __call__(
        self,
        manifest: Manifest,
        spec: StageSpec,
        backend: str,
        device: str,
        *,
        half: bool,
        threads: int | None,
        strict: bool,
        vram_budget_gib: float | None,
        vram_sessions: int,
        precision: str,
    ) -> LoadedStage: ...


class OpsFactory(Protocol):
    """Where a case's non-network steps run (see :func:`fusemycells.ops.choose_ops`, the default)."""

    def __call__(
        self, device: str, vram_budget_gib: float | None, profile: Profile, threads: int | None
    ) -> Ops: ...


class Fuser:
    """Runs the two networks of each channel; stages are loaded once and reused across files.

    ``loader`` loads a stage (tests pass fakes); ``costs`` are the learned stage-time estimates
    (:func:`fusemycells.runtime.budget.default_stage_costs` at first), kept across files by the
    degradation ladder (``ladder``, :class:`fusemycells.runtime.ladder.Ladder`: it takes every time-budget
    decision); ``progress`` shows the patch stage's progress (:func:`fusemycells.runtime.progress.progress_for`:
    a bar on a terminal); ``ops`` says where a case's non-network steps run (default
    :func:`fusemycells.ops.choose_ops`; tests pass the GPU's code path on the CPU);
    ``now`` is the time source deadlines are read on (tests pass a fake).
    """

    def __init__(
        self,
        manifest: Manifest,
        policy: BudgetPolicy,
        loader: StageLoader = load_stage,
        backend: str = "auto",
        costs: dict[str, LinearCost] | None = None,
        progress: ProgressFactory = progress_for,
        ops: OpsFactory = choose_ops,
        now: Now = time.perf_counter,
    ) -> None:
        self.manifest, self.policy, self.loader, self.backend = manifest, policy, loader, backend
        self.progress, self.ops, self.now = progress, ops, now
        self.ladder = Ladder(costs)
        self.time_budget_s: float | None = None  # per :meth:`fuse` call when no deadline is given (from_resources)
        self.keep_input = False  # True: :meth:`fuse` works on a copy, the caller's array stays as it was
        self._stages: dict[tuple[str, str, str], LoadedStage] = {}
        self._patch_stages: dict[str, PatchStage] = {}

    @classmethod
    def from_resources(
        cls,
        resources: str | Path | None = None,
        *,
        device: str = "auto",
        time_budget_s: float | None | str = "manifest",
        backend: str = "auto",
        precision: str = "auto",
        keep_input: bool = True,
        **kwargs: Any,
    ) -> Fuser:
        """A Fuser with the container's defaults, no policy objects to build: the weights folder ``resources``
        (None: as the command line, the Grand Challenge model folder when valid, else the bundled weights),
        ``device`` ('auto', 'cpu', 'cuda'), a time budget (s) for each :meth:`fuse` call ('manifest': the
        manifest's ``time_budget_s``; None: none), ``backend`` and CPU ``precision`` as the command line's
        options; ``keep_input``: :meth:`fuse` leaves the caller's array as it was (it works on a copy: one more
        input's worth of memory); ``kwargs`` go to the constructor (``loader``, ``progress``, ...). Networks load on
        first use."""
        folder, _ = resolve_resources_dir(None if resources is None else Path(resources), default=DEFAULT_RESOURCES)
        manifest = load_manifest(folder)
        budget = manifest.time_budget_s if time_budget_s == "manifest" else time_budget_s
        policy = BudgetPolicy.create(device, None, None, None, precision=precision)
        fuser = cls(manifest, policy, backend=backend, **kwargs)
        fuser.time_budget_s = None if budget is None else float(budget)
        fuser.keep_input = keep_input
        return fuser

    def fuse(
        self,
        data: np.ndarray,
        spacing: Sequence[float],
        channel: str,
        *,
        deadline: float | None = None,
        output_dtype: str = "uint16",
        report: CaseReport | None = None,
    ) -> Fused:
        """Fused prediction for one ZYX stack of ``spacing`` (z, y, x) µm and ``channel`` ('nucleus', 'membrane').

        ``data`` is consumed: its buffer is reused for the blended output when the pixel type is
        2 or 4 bytes (pass a copy to keep it), unless the Fuser keeps its input (:meth:`from_resources`'
        default). The high-resolution input and the upsampled stage-1 prediction are never materialised
        (computed per row of patches). ``deadline`` (a ``now()`` time,
        ``time.perf_counter()`` unless the Fuser was given another; None: none) makes the pipeline degrade in
        the steps of :data:`~fusemycells.runtime.ladder.DEGRADATION_LEVELS` by :attr:`ladder`'s decisions.
        ``report`` collects what happened (a new one when None). Without a ``deadline``, a Fuser made by
        :meth:`from_resources` gives each call its :attr:`time_budget_s` from now.
        """
        if deadline is None and self.time_budget_s is not None:
            deadline = self.now() + self.time_budget_s
        if self.keep_input:
            data = np.array(data, copy=True)
        report = CaseReport(file="<array>") if report is None else report
        profile = Profile(report.seconds.setdefault("profile_s", {}))
        if "read" in report.seconds:
            profile.add("read_s", report.seconds["read"])
        before = self.policy.health.fault
        try:
            return self._fuse(data, spacing, channel, deadline, output_dtype, report, profile)
        finally:
            note_device_fault(report, self.policy.health.fault, before)

    def _fuse(
        self,
        data: np.ndarray,
        spacing: Sequence[float],
        channel: str,
        deadline: float | None,
        output_dtype: str,
        report: CaseReport,
        profile: Profile,
    ) -> Fused:
        """:meth:`fuse`'s steps; each device step is rerun on the CPU after a device fault (:meth:`_step`)."""
        case = self._prepare(data, spacing, channel, report, profile)
        countdown = self.ladder.countdown(deadline, case.data.size, math.prod(case.grid_h), self.now)
        correction = None
        decision = trust.TrustDecision("off", case.gate)
        if self._networks_wanted(case):
            high = self._step(case, "global stage", lambda: self._global_stage(case, countdown, report))
            if high is not None:
                correction = self._step(case, "patch stage", partial(self._patch_stage, case, high, countdown, report))
                decision = self._step(case, "trust decision", partial(self._trust, case, high, correction, report))
                del high  # the row caches of x_h and p1_h (two patch depths of H, float32)
        if correction is None or decision.factor <= 0.0:
            del correction  # unused (networks off for this file): not held while the output is computed
            return self._fused(case, case.x_in, output_dtype, report, profile)
        with timed(report.seconds, "postprocess"), reuse_freed_memory():
            blended = self._blend(case, correction, report, decision)
            del correction  # the largest array of a big stack
            return self._fused(case, blended, output_dtype, report, profile)

    def _step(self, case: Prepared, step: str, run: Callable[[], T]) -> T:
        """``run()``, a step of ``case`` that may use the device; after a device fault in it (any exception while
        the device is trusted, :meth:`BudgetPolicy.device_fault`) it is rerun once with the case on the CPU,
        with the time left (the steps degrade by the deadline themselves). ``run`` reads ``case.ops`` when
        called."""
        self._follow_device(case)
        try:
            return run()
        except Exception as exc:
            if isinstance(exc, InputError) or not self.policy.device_fault(step, exc):
                raise
        free_device_cache()
        self._follow_device(case)
        return run()

    def _follow_device(self, case: Prepared) -> None:
        """Move the case's non-network steps to the CPU once the run's device faulted (in any step)."""
        if self.policy.active_device == "cpu" and case.ops_on != "cpu":
            case.ops = self.ops("cpu", None, case.ops.profile, self.policy.threads)
            case.ops_on = "cpu"

    @staticmethod
    def _high_on(case: Prepared, high: HighRes) -> HighRes:
        """``high`` with its lazy resizes on the case's current ops (rebuilt after a move to the CPU)."""
        if getattr(high.x_h, "ops", case.ops) is case.ops or high.p1 is None:
            return high
        return HighRes(
            ResizedSource(case.x_in, case.grid_h, ops=case.ops),
            ResizedSource(high.p1, case.grid_h, ops=case.ops),
            high.coarse,
            high.p1,
        )

    def _fused(
        self, case: Prepared, source: PlaneSource, output_dtype: str, report: CaseReport, profile: Profile
    ) -> Fused:
        """The lazy output of ``source`` (blended, or the normalised input), and how to compute it on the CPU
        should the device fault while it is written."""

        def on_cpu() -> PlaneSource:
            self._follow_device(case)
            return self._finish(case, source, output_dtype)

        output = self._step(case, "output filter", lambda: self._finish(case, source, output_dtype))
        return Fused(output, report, profile, on_cpu=on_cpu, weight=case.weight)

    @property
    def costs(self) -> dict[str, LinearCost]:
        """The stage costs the ladder learnt (see :func:`fusemycells.runtime.ladder.learn_finish_cost`)."""
        return self.ladder.costs

    def load_stages(self, channel_name: str) -> None:
        """Load a channel's networks now (the global stage on the policy's device and the patch stage),
        so that their loading is timed apart from the stages; nothing to do once they are loaded, or when the
        channel's trust keeps its networks off whatever the case (:func:`trust.never`: they would never run)."""
        channel = self.manifest.channel(channel_name)
        if trust.never(channel.trust):
            return
        try:
            self._load(channel, "global", self.policy.active_device)
            self.patch_stage(channel)
            return
        except Exception as exc:
            if not self.policy.device_fault("network loading", exc):
                raise
        free_device_cache()
        self._load(channel, "global", "cpu")
        self.patch_stage(channel)

    def _prepare(
        self, data: np.ndarray, spacing: Sequence[float], channel_name: str, report: CaseReport, profile: Profile
    ) -> Prepared:
        """Sanitise, normalise (lazily), estimate the noise policy, choose H; fills the report's facts."""
        channel = self.manifest.channel(channel_name)
        zyx: Spacing3 = (float(spacing[0]), float(spacing[1]), float(spacing[2]))
        describe(report, data, zyx, channel_name)
        device = self.policy.active_device
        ops = self.ops(device, self.policy.vram_budget_gib, profile, self.policy.threads)
        if self.policy.health.fault is not None and self.policy.device != "cpu":
            report.warnings.append(f"on the CPU: the {self.policy.device} device faulted earlier in this run")
        with timed(report.seconds, "preprocess"), profile.section("input_statistics_s"):
            if data.dtype.kind == "f" and not data.flags.writeable:
                data = data.copy()
            sanitised = sanitise_inplace(data)  # before any float32 cast (ArraySource)
            report.non_finite_replaced, report.out_of_range_clipped = sanitised.non_finite, sanitised.clipped
            if sanitised.clipped and sanitised.limits is not None:
                low, high = sanitised.limits
                clipped = f"{sanitised.clipped} voxels outside [{low:.4g}, {high:.4g}] clipped to it"
                warn(report, f"{clipped} (corrupt or absurd values: far beyond the image's range or float32's)")
            if sanitised.non_finite:
                warn(report, f"{sanitised.non_finite} non-finite voxels replaced by the median")
            x_in = ArraySource(data, *intensity_affine(data, channel.normalisation))
            noise = postprocess.relative_noise(data)
            sigma, gate = postprocess.adaptive_settings(noise, channel.postprocess)
            post = with_output_sigma(channel.postprocess, sigma)
            report.adaptive = adaptive_report(noise, post, gate, zyx)
            grid_h = shape_for_spacing(data.shape, zyx, (channel.target_spacing_um,) * 3)
            report.high_res_grid = list(grid_h)
            for message in input_warnings(data, zyx, grid_h, channel.patch_stage.patch_size, channel.target_spacing_um):
                warn(report, message)
        return Prepared(data, zyx, channel, x_in, grid_h, post, gate, noise, ops, device)

    @staticmethod
    def _networks_wanted(case: Prepared) -> bool:
        if case.gate > 0.0 and not trust.never(case.channel.trust):
            return True
        sigma = case.post.output_sigma
        log.info(
            "    relative noise %.4f: network correction gated off (manifest gate_knots or trust); output σ %.2f",
            case.noise,
            sigma,
        )
        return False

    def _global_stage(self, case: Prepared, countdown: Countdown, report: CaseReport) -> HighRes | None:
        """Stage 1 on the global grid, its prediction resized to H lazily; None when time is short (level 3)."""
        voxels, h_voxels = case.data.size, math.prod(case.grid_h)
        skip = self.ladder.skip_global(countdown, voxels, h_voxels)
        if skip is not None:
            self._degrade(report, skip)
            return None
        with timed(report.seconds, "global_stage"):
            x_h = ResizedSource(case.x_in, case.grid_h, ops=case.ops)
            assert case.channel.global_stage.grid is not None
            # input → H → global grid, composed into one resize with torch ops (H itself is not computed here)
            coarse = resize_through(case.x_in, [case.grid_h, case.channel.global_stage.grid], case.ops)
            with case.ops.section("forward_s"):
                p1, stage = self._run_global(case.channel, coarse)
            report.stages["global"] = {
                "file": stage.file,
                "backend": stage.runner.backend,
                "provider": stage.runner.provider,
                "precision": stage.runner.precision,
            }
        seconds = report.seconds["global_stage"]
        raised = self.ladder.learn_global(countdown, seconds, voxels, h_voxels)
        if raised is not None:
            self.policy.events.add(f"{report.file}: {raised}")
        overran = self.ladder.global_overran(countdown, seconds)
        if overran is not None:
            self._degrade(report, overran)
            return None
        return HighRes(x_h, ResizedSource(p1, case.grid_h, ops=case.ops), coarse, p1)

    def _run_global(self, channel: ChannelSpec, coarse: np.ndarray) -> tuple[np.ndarray, LoadedStage]:
        """(Stage-1 prediction on the global grid (ZYX float32), the stage that ran it); on device OOM,
        or any other fault of the device (:meth:`BudgetPolicy.device_fault`), the forward reruns on the
        CPU, and that CPU stage is returned (also for trust's extra forwards; a fault in the stage's
        resampling is :meth:`_step`'s)."""
        device = self.policy.active_device
        try:
            stage = self._load(channel, "global", device)
            return stage.runner(coarse[None, None])[0, 0], stage
        except Exception as exc:
            if device == "cpu":
                raise
            if is_out_of_memory(exc):
                self.policy.events.add("out of memory in the global stage: running it on the CPU")
            elif not self.policy.device_fault("global stage", exc):
                raise
        free_device_cache()
        stage = self._load(channel, "global", "cpu")
        return stage.runner(coarse[None, None])[0, 0], stage

    def _patch_stage(self, case: Prepared, high: HighRes, countdown: Countdown, report: CaseReport) -> np.ndarray:
        """Stage-2 correction on H (the stage-1 one when time runs out), ZYX."""
        high = self._high_on(case, high)
        with timed(report.seconds, "patch_stage"), case.ops.section("stitching_s"):
            result = self.patch_stage(case.channel)(high.x_h, high.p1_h, countdown)
        if result.info is not None:  # the forward passes ran inside the sliding window
            case.ops.profile.move("stitching_s", "forward_s", result.info["forward_s"])
        for step in result.degradations:
            self._degrade(report, step)
        for message in result.warnings:
            warn(report, message)
        if result.info is not None:
            report.stages["patch"] = result.info
        return result.correction

    def _trust(self, case: Prepared, high: HighRes, correction: np.ndarray, report: CaseReport) -> trust.TrustDecision:
        """The factor on the correction: the constant gate (trust 'off'), or decided from the case's
        own data (:func:`fusemycells.trust.decide`); the spec's ``fallback_factor`` (0: networks off) when
        the time budget already cut the patch stage (:meth:`~fusemycells.runtime.ladder.Ladder.trust_fallback`)."""
        spec = case.channel.trust
        if spec.mode == "off":
            return trust.TrustDecision("off", case.gate)
        high = self._high_on(case, high)
        if self.ladder.trust_fallback(report.degradation) or high.coarse is None:
            why = f"degradation level {report.degradation}: no signals; the manifest's fallback_factor"
            decision = trust.TrustDecision("fallback", spec.fallback_factor, why=why)
        else:
            assert high.p1 is not None
            with timed(report.seconds, "trust"):
                decision = trust.decide(
                    spec, case.noise, high.coarse, high.p1, correction, case.post.diff_grid, ops=case.ops
                )
        report.trust = decision.as_report()
        log.info("    trust %s", decision.summary())
        return decision

    def _blend(
        self, case: Prepared, correction: np.ndarray, report: CaseReport, decision: trust.TrustDecision
    ) -> PlaneSource:
        """The input plus the weighted correction, on the input grid (see :func:`postprocess.blend_slabs`);
        ``decision`` gives the factor on the correction (and per region, where it has a map)."""
        extent_um = [n * s for n, s in zip(case.data.shape, case.spacing)]
        gate = decision.factor if decision.region is None else decision.factor * decision.region
        # trust already resized the correction to the diff grid: the same weight map, one pass over H less
        source = correction if decision.coarse_correction is None else decision.coarse_correction
        weight = self._step(
            case,
            "weight map",
            lambda: postprocess.blend_weight(source, case.x_in, case.post, gate, extent_um, ops=case.ops),
        )
        report.weight_map = postprocess.weight_stats(weight)
        case.weight = weight
        compact = self.policy.compact_output(case.data.shape)
        done = [0]  # planes blended so far: a rerun on the CPU resumes there (in place, the rest is still the input)
        return self._step(
            case,
            "blend",
            lambda: postprocess.blend_slabs(
                case.data, case.x_in, correction, weight, compact=compact, ops=case.ops, start=done[0], done=done
            ),
        )

    @staticmethod
    def _finish(case: Prepared, source: PlaneSource, output_dtype: str) -> PlaneSource:
        """Output filters, percentile normalisation and the output dtype, lazily (the percentiles' pass now)."""
        with reuse_freed_memory():
            return postprocess.final_source(source, case.post, output_dtype, spacing=case.spacing, ops=case.ops)

    def patch_stage(self, channel: ChannelSpec) -> PatchStage:
        """The channel's patch stage (created, and its network loaded, on first use)."""
        if channel.name not in self._patch_stages:
            load = partial(self._load, channel, "patch")
            self._patch_stages[channel.name] = PatchStage(
                channel.patch_stage, load, self.policy, now=self.now, progress=self.progress
            )
        return self._patch_stages[channel.name]

    def _load(self, channel: ChannelSpec, stage: str, device: str) -> LoadedStage:
        """The 'global' or 'patch' stage of a channel on ``device`` (loaded, verified and warmed up once)."""
        key = (channel.name, stage, device)
        if key not in self._stages:
            spec = channel.global_stage if stage == "global" else channel.patch_stage
            on_device = device != "cpu"
            loaded = self.loader(
                self.manifest,
                spec,
                self.backend,
                device,
                half=self.policy.half and on_device,
                threads=self.policy.threads,
                strict=self.backend != "auto",
                vram_budget_gib=self.policy.vram_budget_gib if on_device else None,
                vram_sessions=2 * len(self.manifest.channels),  # a global and a patch stage per channel
                precision=self.policy.cpu_precision,
            )
            runner = loaded.runner
            log.info(
                "loaded %s %s stage: %s (%s on %s, %s)",
                channel.name, stage, loaded.file, runner.backend, runner.provider, runner.precision,
            )  # fmt: skip
            warm_up(loaded)
            self._stages[key] = loaded
        return self._stages[key]

    def _degrade(self, report: CaseReport, step: Degradation) -> None:
        """Record a step down the ladder in the file's report (its level, a warning) and the run's events."""
        level, why = step
        report.degradation = max(report.degradation, level)
        message = f"time budget: level {level} ({DEGRADATION_LEVELS[level]}): {why}"
        report.warnings.append(message)
        self.policy.events.add(f"{report.file}: {message}")

    def check_memory(self, shape: Shape3, dtype: np.dtype, spacing: Spacing3) -> None:
        """Refuse a stack (MemoryError) before its pixels are read when it would exceed the RAM budget."""
        channels = self.manifest.channels.values()
        target = min(c.target_spacing_um for c in channels)
        patch = [max(p) for p in zip(*(c.patch_stage.patch_size or (1, 1, 1) for c in channels))]
        self.policy.check_memory(shape, dtype.itemsize, spacing, target, patch)


def describe(report: CaseReport, data: np.ndarray, spacing: Spacing3, channel: str) -> None:
    """Fill a report's facts about the input: shape, spacing (µm), channel, pixel type."""
    report.shape = list(data.shape)
    report.spacing_um = [round(s, 6) for s in spacing]
    report.channel = channel
    report.input_dtype = str(data.dtype)


def adaptive_report(noise: float, post: PostprocessSpec, gate: float, spacing: Spacing3) -> dict[str, Any]:
    """The report's ``adaptive`` entry: relative noise, the output σ it chose (voxels; per axis) and the gate."""
    return {
        "relative_noise": round(noise, 5),
        "output_sigma": round(post.output_sigma, 3),
        "output_sigma_zyx": [round(v, 3) for v in postprocess.output_sigma_zyx(post, spacing)],
        "network_gate": round(gate, 3),
    }


def constant_value(data: np.ndarray) -> float | None:
    """The value of every voxel when a ZYX stack is constant, else None (stops at the first differing slab)."""
    first = data.flat[0]
    for z0, z1 in slabs(data.shape[0]):
        if not np.all(data[z0:z1] == first):
            return None
    return float(first)


def input_warnings(
    data: np.ndarray, spacing: Spacing3, grid_h: Shape3, patch: Shape3 | None, target_um: float
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
        warnings.append(
            f"single slice: its one plane is repeated over the {grid_h[0]} plane(s) of the high-resolution grid"
        )
    if patch is not None and any(n < p for n, p in zip(grid_h, patch)):
        warnings.append(
            f"volume is {tuple(grid_h)} voxels at {target_um:g} µm, smaller than one {tuple(patch)} patch: "
            "reflect-padded for the patch network"
        )
    ratio = spacing[0] / min(spacing[1], spacing[2])
    if ratio >= ANISOTROPY_WARNING:
        warnings.append(
            f"extreme anisotropy: Z spacing {spacing[0]:g} µm is {ratio:.1f}× the XY spacing; Z is interpolated "
            f"{spacing[0] / target_um:.1f}× onto the {target_um:g} µm grid, so axial detail finer than "
            f"{spacing[0]:g} µm is not recovered"
        )
    return warnings


def note_device_fault(report: CaseReport, fault: DeviceFault | None, before: DeviceFault | None) -> None:
    """Name the device fault in the file's report when it happened while this file was processed."""
    if fault is not None and before is None and report.device_fault is None:
        report.device_fault = fault.as_report()
        report.warnings.append(f"device fault in the {fault.step} ({fault.error}): rerun on the CPU")


