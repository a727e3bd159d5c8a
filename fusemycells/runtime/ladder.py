"""The degradation ladder: the levels a file steps down when its time budget cannot be met, the decision
taken at each point, the time kept back for finishing (the reserve) and the stage costs learnt across files.

The pipeline (:class:`fusemycells.pipeline.Fuser`, :class:`fusemycells.patch_stage.PatchStage` and its
:class:`PatchRateWatcher`, the run loop's :func:`learn_finish_cost`) and :func:`plan_first_file` (which
replays the same decisions on estimated phase times, ``benchmarks/budget_plan.py``) take every decision
here. The decision points, in the order a file meets them:

1. before the global stage: :meth:`Ladder.skip_global` (level 3 when the time left is not more than its
   estimate);
2. after it: :meth:`Ladder.learn_global` (its cost is learnt; a slower machine raises the reserve), then
   :meth:`Ladder.global_overran` (level 3 once no time is left);
3. the patch stage's attempts (:func:`patch_attempts`: the manifest's overlap, then none): an attempt is
   skipped before it starts when the learnt patch rate says it cannot fit (:meth:`PatchRateWatcher.too_slow`)
   and stopped mid-run when the rest cannot (:meth:`PatchRateWatcher.after_batch`), both by
   :func:`patches_fit`; when none finishes, the stage-1 correction is used (:data:`PATCH_SKIPPED`, level 2);
4. the trust decision: :meth:`Ladder.trust_fallback` (no signals once the patch stage was cut);
5. after a file: :func:`learn_finish_cost` (post-processing and writing).

Times are seconds; voxel counts are of the input grid (``voxels``) and of the high-resolution grid H
(``h_voxels``); a *deadline* is a :data:`~fusemycells.runtime.deadline.Now` time, a *countdown* the
:class:`~fusemycells.runtime.deadline.Countdown` to it (see :mod:`fusemycells.runtime.deadline`).
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import NamedTuple, Protocol

import numpy as np

from fusemycells.runtime.budget import CPU_2CORE, LinearCost, PhaseRates, default_stage_costs
from fusemycells.runtime.deadline import Countdown, Now
from fusemycells.runtime.progress import Progress, ProgressFactory, progress_for
from fusemycells.sources import Shape3, Spacing3, shape_for_spacing
from fusemycells.stitching import count_windows

DEGRADATION_LEVELS = {
    0: "full two-stage prediction",
    1: "patch stage without overlap (fewer patches)",
    2: "global stage only, blended as in post-processing",
    3: "percentile-normalised input (no network)",
}
"""Steps taken, in order, when the time budget cannot be met (reported as ``degradation``)."""


class Degradation(NamedTuple):
    """A step down the ladder: the level reached and why."""

    level: int
    why: str


class PatchAttempt(NamedTuple):
    """One sliding-window pass of the patch stage: its ``overlap`` and the level a file is at when it finishes
    (one level more when it does not)."""

    overlap: float
    level: int


PATCH_SKIPPED = Degradation(2, "patch stage skipped")
"""What is recorded when no patch attempt finished: the stage-1 correction is used."""


def patch_attempts(overlap: float) -> list[PatchAttempt]:
    """The patch stage's passes, in order: with the manifest's ``overlap`` (level 0), then without (level 1);
    one pass when the overlap is 0 already."""
    return [PatchAttempt(value, level) for level, value in enumerate(dict.fromkeys((overlap, 0.0)))]


def patches_fit(patches: int, seconds_per_patch: float, countdown: Countdown) -> bool:
    """Whether ``patches`` more patches at ``seconds_per_patch`` fit in the time ``countdown`` leaves."""
    return patches * seconds_per_patch <= countdown.left()


class FinishedFile(Protocol):
    """What :func:`learn_finish_cost` reads of a file's report (:class:`fusemycells.report.CaseReport`)."""

    status: str
    shape: list[int] | None
    high_res_grid: list[int] | None
    seconds: dict[str, float]


def learn_finish_cost(costs: Mapping[str, LinearCost], report: FinishedFile) -> None:
    """Teach ``costs['finish']`` the post-processing + writing seconds of a fully fused file (per input
    voxel and per voxel of its high-resolution grid H).

    Files that skipped the blend (degradation level 3, gated network) finish faster and are not used.
    """
    if report.status != "ok" or report.shape is None or "postprocess" not in report.seconds:
        return
    seconds = report.seconds["postprocess"] + report.seconds.get("write", 0.0)
    h_voxels = math.prod(report.high_res_grid) if report.high_res_grid else 0
    costs["finish"].learn(math.prod(report.shape), seconds, h_voxels)


class Ladder:
    """The decisions before, during and after a file's networks, with the stage costs they are taken on.

    ``costs`` ('global', 'fallback', 'finish': :class:`~fusemycells.runtime.budget.LinearCost`; default
    :func:`~fusemycells.runtime.budget.default_stage_costs`) are learnt as files finish and kept across files.
    """

    def __init__(self, costs: dict[str, LinearCost] | None = None) -> None:
        self.costs = default_stage_costs() if costs is None else costs

    def reserve_s(self, voxels: float, h_voxels: float) -> float:
        """Seconds kept back from the networks: the level-2 fallback (should the patch stage stop) plus
        post-processing and writing."""
        return self.costs["fallback"].estimate(voxels, h_voxels) + self.costs["finish"].estimate(voxels, h_voxels)

    def countdown(
        self, deadline: float | None, voxels: float, h_voxels: float, now: Now = time.perf_counter
    ) -> Countdown:
        """The countdown of a file to ``deadline`` (a ``now()`` time; None: none) with its reserve."""
        return Countdown(deadline, self.reserve_s(voxels, h_voxels), now)

    def skip_global(self, countdown: Countdown, voxels: float, h_voxels: float) -> Degradation | None:
        """Level 3 before the global stage when the time left is not more than its estimate (None: run it)."""
        need = self.costs["global"].estimate(voxels, h_voxels)
        if countdown.left() <= need:
            return Degradation(3, f"{countdown.shown()} left, the global stage needs ~{need:.1f} s")
        return None

    def learn_global(self, countdown: Countdown, seconds: float, voxels: float, h_voxels: float) -> str | None:
        """Learn the global stage's cost from its ``seconds``; when it overran its estimate on a stack whose
        per-voxel part dominates (a slower machine, not a small stack's fixed overhead), scale the fallback's
        and the finish's costs by the same factor (kept for later files until a fully fused file teaches
        them) and raise ``countdown``'s reserve. Returns the event to record then (else None)."""
        cost = self.costs["global"]
        need = cost.estimate(voxels, h_voxels)
        cost.learn(voxels, seconds, h_voxels)
        slower = seconds / need
        if not (slower > 1.0 and need - cost.fixed_s > cost.fixed_s):
            return None
        for name in ("fallback", "finish"):
            self.costs[name] = self.costs[name].scaled(slower, fixed=True)
        countdown.reserve_s = self.reserve_s(voxels, h_voxels)
        return (
            f"the global stage took {slower:.2f}× its estimate; "
            f"time kept back for finishing raised to {countdown.reserve_s:.0f} s"
        )

    @staticmethod
    def global_overran(countdown: Countdown, seconds: float) -> Degradation | None:
        """Level 3 after a global stage of ``seconds`` that used up the time left (None: go on)."""
        if countdown.left() <= 0.0:
            return Degradation(3, f"deadline passed during the global stage ({seconds:.1f} s)")
        return None

    @staticmethod
    def trust_fallback(level: int) -> bool:
        """Whether the trust decision takes the manifest's ``fallback_factor`` instead of signals: at level 2
        or more (no patch prediction to read the signals from)."""
        return level >= 2

    def learn_finish(self, report: FinishedFile) -> None:
        """:func:`learn_finish_cost` on this ladder's costs."""
        learn_finish_cost(self.costs, report)


class PatchRateWatcher:
    """Learns the patch stage's seconds per patch and says when a pass will miss its deadline.

    The first batch of a run pays one-time costs (the first row of patches is resampled from the
    input, session warm-up, allocations): on a 309×1920×1920 stack it took 14× a steady batch,
    which on a GPU would wrongly degrade the file, so the rate is learned from the batches after
    it. The learned rate is kept across passes and files, so a later one can skip a hopeless
    configuration before starting it (:meth:`too_slow`).

    It also shows the pass's progress (``progress``: a bar on a terminal, else a log line about every
    tenth of the patches; see :func:`fusemycells.runtime.progress.progress_for`) from :meth:`start` to
    :meth:`finish`.
    """

    def __init__(self, now: Now = time.perf_counter, progress: ProgressFactory = progress_for) -> None:
        self.now = now
        self.progress = progress
        self.seconds_per_patch: float | None = None
        self._countdown = Countdown()
        self._started = 0.0
        self._first: tuple[int, float] | None = None  # (patches, seconds) at the end of the first batch
        self._shown: Progress | None = None

    def too_slow(self, patches: int, countdown: Countdown) -> str | None:
        """Why ``patches`` patches at the learned rate would overrun ``countdown`` (None: they fit)."""
        rate = self.seconds_per_patch
        if rate is not None and not patches_fit(patches, rate, countdown):
            return f"{patches} patches × {rate:.3f} s > {countdown.shown()} left"
        return None

    def start(self, total: int, countdown: Countdown, batch_size: int) -> None:
        """Begin watching a pass of ``total`` patches in batches of ``batch_size`` (call :meth:`finish` after)."""
        self.finish()
        self._countdown = countdown
        self._started = self.now()
        self._first = None
        self._shown = self.progress(total, "patches", step=max(1, batch_size))

    def finish(self) -> None:
        """The pass ended (done, stopped or failed): close its progress display; nothing to do when none is open."""
        if self._shown is not None:
            shown, self._shown = self._shown, None
            shown.close()

    def after_batch(self, done: int, total: int) -> str | None:
        """Record that ``done`` of ``total`` patches are finished; a reason to stop when the rest
        would overrun the countdown at the rate learned since the first batch, else None."""
        elapsed = self.now() - self._started
        if self._shown is not None:
            self._shown.update(done, elapsed)
        if self._first is None:
            self._first = (done, elapsed)
            return None
        rate = (elapsed - self._first[1]) / max(done - self._first[0], 1)
        self.seconds_per_patch = rate
        if done < total and not patches_fit(total - done, rate, self._countdown):
            return f"{done}/{total} patches in {elapsed:.1f} s ({rate:.3f} s/patch), {self._countdown.shown()} left"
        return None


@dataclass(frozen=True)
class FilePlan:
    """What :func:`plan_first_file` expects: the degradation level and the seconds of each phase."""

    level: int
    high_res_grid: Shape3
    seconds: dict[str, float]

    @property
    def total_s(self) -> float:
        """Seconds from the process's start to the output written."""
        return sum(self.seconds.values())


def plan_first_file(
    shape: Shape3,
    spacing: Spacing3,
    budget_s: float,
    target_um: float = 0.6,
    patch: Shape3 = (64, 64, 64),
    overlap: float = 0.5,
    rates: PhaseRates = CPU_2CORE,
    speed: float = 1.0,
    costs: Mapping[str, LinearCost] | None = None,
) -> FilePlan:
    """The level the ladder chooses for a run's first (only) file, and when its output is written.

    The file meets the decision points of :class:`Ladder` as in :class:`fusemycells.pipeline.Fuser`, on a
    copy of ``costs`` (default :func:`~fusemycells.runtime.budget.default_stage_costs`) and with the time
    each phase really takes: ``rates`` on a machine ``speed``× as fast (ZYX ``shape`` voxels, ``spacing``
    µm, ``budget_s`` from the process's start); the patch stage as :func:`plan_patch_stage` says.
    """
    ladder = Ladder({name: replace(cost) for name, cost in (costs or default_stage_costs()).items()})
    n_in = float(np.prod(shape, dtype=np.float64))
    grid_h = shape_for_spacing(shape, spacing, (target_um,) * 3)
    n_h = float(np.prod(grid_h, dtype=np.float64))
    seconds = {
        "start-up": rates.startup_s / speed,
        "read": rates.read.estimate(n_in) / speed,
        "load_weights": rates.load_s / speed,
        "preprocess": rates.preprocess.estimate(n_in) / speed,
    }
    countdown = ladder.countdown(budget_s, n_in, n_h, now=lambda: sum(seconds.values()))

    def written(level: int) -> FilePlan:
        finish = rates.finish.estimate(n_in, n_h) if level < 3 else rates.level3_finish.estimate(n_in)  # no blend
        return FilePlan(level, grid_h, {**seconds, "finish": finish / speed})

    if ladder.skip_global(countdown, n_in, n_h) is not None:
        return written(3)
    seconds["global_stage"] = rates.global_stage.estimate(n_in, n_h) / speed
    ladder.learn_global(countdown, seconds["global_stage"], n_in, n_h)
    if ladder.global_overran(countdown, seconds["global_stage"]) is not None:
        return written(3)
    rate, first_batch = rates.patch_s / speed, rates.first_batch_s / speed
    level = plan_patch_stage(grid_h, patch, overlap, rate, first_batch, countdown, seconds)
    if level == PATCH_SKIPPED.level:
        seconds["fallback"] = rates.fallback.estimate(n_in, n_h) / speed
    return written(level)


def plan_patch_stage(
    grid_h: Sequence[int],
    patch: Shape3,
    overlap: float,
    seconds_per_patch: float,
    first_batch_s: float,
    countdown: Countdown,
    seconds: dict[str, float],
) -> int:
    """The level after a first file's patch stage on H (``grid_h``, ZYX voxels), its time added to
    ``seconds['patch_stage']`` (``countdown`` counts ``seconds``).

    The run's first batch takes ``first_batch_s`` and teaches the watcher no rate; the first pass then
    finishes when its patches fit (:func:`patches_fit`), else the watcher stops it two patches later; a
    later pass, the rate known, runs only when it fits (:meth:`PatchRateWatcher.too_slow`).
    """
    seconds["patch_stage"] = first_batch_s
    rate_known = False
    for attempt in patch_attempts(overlap):
        patches = count_windows(grid_h, patch, attempt.overlap)
        if patches_fit(patches, seconds_per_patch, countdown):
            seconds["patch_stage"] += patches * seconds_per_patch
            return attempt.level
        if not rate_known:  # the first pass ran until the watcher had a rate
            seconds["patch_stage"] += 2 * seconds_per_patch
            rate_known = True
    return PATCH_SKIPPED.level
