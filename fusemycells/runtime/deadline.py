"""Where the run's time budget counts from, the time left for one file, and the watcher that says
when the patch stage must degrade.

Times are seconds of a monotonic ``clock`` (``time.perf_counter`` unless a test passes another).
Nothing here raises: the pipeline asks, explicitly, and decides what to do with the answer.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from fusemycells.runtime.progress import Progress, ProgressFactory, progress_for

log = logging.getLogger(__name__)

Clock = Callable[[], float]


@dataclass(frozen=True)
class RunClock:
    """The instant the run's time budget counts from, as a ``time.perf_counter()`` value (``started``)
    and as wall-clock time (``wall``, ``time.time()``), and what that instant is (``origin``)."""

    started: float
    wall: float
    origin: str = "run start"

    @classmethod
    def now(cls, origin: str = "run start") -> RunClock:
        return cls(time.perf_counter(), time.time(), origin)

    @classmethod
    def since(cls, age_s: float | None, fallback: RunClock) -> RunClock:
        """The instant ``age_s`` seconds ago (the process's start: ``devices.process_age_s()``), or
        ``fallback`` when the age is unknown."""
        if age_s is None:
            return fallback
        return cls(time.perf_counter() - age_s, time.time() - age_s, "process start")

    def elapsed(self) -> float:
        """Seconds since the clock started."""
        return time.perf_counter() - self.started

    def iso(self, offset_s: float = 0.0) -> str:
        """The start (plus ``offset_s``) as local ISO 8601 time with milliseconds and UTC offset."""
        return datetime.fromtimestamp(self.wall + offset_s).astimezone().isoformat(timespec="milliseconds")


NOT_PHASES = ("total", "profile_s")
"""Keys of a file's ``seconds`` that are not phases of the time account (a sum, and a breakdown by kind of work)."""


def time_account(
    clock: RunClock,
    budget_s: float | None,
    startup_s: float,
    files: Sequence[tuple[str, Mapping[str, Any]]],
    elapsed_s: float,
) -> dict[str, object]:
    """The report's ``clock`` entry: when the budget started counting and what each phase took of it.

    ``startup_s``: seconds from the clock's start to the first file (interpreter, imports, setup);
    ``files``: (name, seconds per phase) of each file in order; its ``total`` less its phases is the
    file's ``untimed`` phase (e.g. the output normalisation of a level-3 file; the nested ``profile_s``,
    a breakdown of the same seconds by kind of work, is not a phase); ``elapsed_s``:
    seconds from the start to now. ``unaccounted_s`` is what no phase covers (between files, the report).
    """
    phases: list[tuple[str, float]] = [("start-up", round(startup_s, 3))]
    for name, seconds in files:
        timed = [(f"{name}: {phase}", float(value)) for phase, value in seconds.items() if phase not in NOT_PHASES]
        untimed = float(seconds.get("total", 0.0)) - sum(value for _, value in timed)
        phases += timed + ([(f"{name}: untimed", round(untimed, 3))] if untimed >= 0.05 else [])
    return {
        "started": clock.iso(),
        "origin": clock.origin,
        "time_budget_s": budget_s,
        "deadline": None if budget_s is None else clock.iso(budget_s),
        "elapsed_s": round(elapsed_s, 3),
        "left_s": None if budget_s is None else round(budget_s - elapsed_s, 3),
        "phases_s": dict(phases),
        "unaccounted_s": round(elapsed_s - sum(value for _, value in phases), 3),
    }


def describe_account(account: Mapping[str, object]) -> str:
    """One log line of a :func:`time_account`: elapsed of the budget, from when, each phase."""
    phases = account["phases_s"]
    assert isinstance(phases, Mapping)
    budget = account["time_budget_s"]
    of = "" if budget is None else f" of the {budget:g} s budget"
    parts = ", ".join(f"{name} {value:.1f} s" for name, value in phases.items())
    return f"time: {account['elapsed_s']:.1f} s{of} since {account['origin']} at {account['started']}: {parts}"


@dataclass
class Deadline:
    """When one file must be written (``at``, a clock time; None: no deadline), less ``reserve_s``
    kept back for what must follow the networks (the level-2 fallback, post-processing, writing:
    they scale with the input's and the high-resolution grid's voxel counts)."""

    at: float | None = None
    reserve_s: float = 0.0
    clock: Clock = field(default=time.perf_counter, repr=False)

    def left(self) -> float:
        """Seconds left for the networks (inf without a deadline; negative once overrun)."""
        return math.inf if self.at is None else self.at - self.reserve_s - self.clock()

    def shown(self) -> str:
        """:meth:`left` for a message ('12.3 s'; 0 once passed)."""
        return f"{max(self.left(), 0.0):.1f} s"


class PatchRateWatcher:
    """Learns the patch stage's seconds per patch and says when a run will miss its deadline.

    The first batch of a run pays one-time costs (the first row of patches is resampled from the
    input, session warm-up, allocations): on a 309×1920×1920 stack it took 14× a steady batch,
    which on a GPU would wrongly degrade the file, so the rate is learned from the batches after
    it. The learned rate is kept across runs (files), so a later file can skip a hopeless
    configuration before starting it (:meth:`too_slow`).

    It also shows the run's progress (``progress``: a bar on a terminal, else a log line about every
    tenth of the patches; see :func:`fusemycells.runtime.progress.progress_for`) from :meth:`start` to
    :meth:`finish`.
    """

    def __init__(self, clock: Clock = time.perf_counter, progress: ProgressFactory = progress_for) -> None:
        self.clock = clock
        self.progress = progress
        self.seconds_per_patch: float | None = None
        self._deadline = Deadline()
        self._started = 0.0
        self._first: tuple[int, float] | None = None  # (patches, seconds) at the end of the first batch
        self._shown: Progress | None = None

    def too_slow(self, patches: int, deadline: Deadline) -> str | None:
        """Why ``patches`` patches at the learned rate would overrun ``deadline`` (None: they fit)."""
        rate = self.seconds_per_patch
        if rate is not None and patches * rate > deadline.left():
            return f"{patches} patches × {rate:.3f} s > {deadline.shown()} left"
        return None

    def start(self, total: int, deadline: Deadline, batch_size: int) -> None:
        """Begin watching a run of ``total`` patches in batches of ``batch_size`` (call :meth:`finish` after it)."""
        self.finish()
        self._deadline = deadline
        self._started = self.clock()
        self._first = None
        self._shown = self.progress(total, "patches", step=max(1, batch_size))

    def finish(self) -> None:
        """The run ended (done, stopped or failed): close its progress display; nothing to do when none is open."""
        if self._shown is not None:
            shown, self._shown = self._shown, None
            shown.close()

    def after_batch(self, done: int, total: int) -> str | None:
        """Record that ``done`` of ``total`` patches are finished; a reason to stop when the rest
        would overrun the deadline at the rate learned since the first batch, else None."""
        elapsed = self.clock() - self._started
        if self._shown is not None:
            self._shown.update(done, elapsed)
        if self._first is None:
            self._first = (done, elapsed)
            return None
        rate = (elapsed - self._first[1]) / max(done - self._first[0], 1)
        self.seconds_per_patch = rate
        if done < total and (total - done) * rate > self._deadline.left():
            return f"{done}/{total} patches in {elapsed:.1f} s ({rate:.3f} s/patch), {self._deadline.shown()} left"
        return None
