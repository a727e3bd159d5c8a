"""Where the run's time budget counts from (:class:`RunClock`), what it was spent on (:func:`time_account`),
and the seconds left for one file's networks (:class:`Countdown`).

Names, one meaning each across the package: a *clock* is a :class:`RunClock` (the instant the run's
budget counts from); *now* is a monotonic time source (:data:`Now`, ``time.perf_counter`` unless a test
passes another); a *deadline* is a :data:`Now` time (float) by which a file must be written, None for
none; a *countdown* is a :class:`Countdown`; ``time_budget_s`` is a whole run's budget (``--time-budget``
of ``inference.py``, the manifest's, the policy's), ``file_budget_s`` one file's (a batch job's: batch's
``--time-budget`` is per file). The decisions taken with them are :mod:`fusemycells.runtime.ladder`'s.
Nothing here raises.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

log = logging.getLogger(__name__)

Now = Callable[[], float]
"""A monotonic time source in seconds (``time.perf_counter``; tests pass fakes)."""


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
class Countdown:
    """The seconds left for one file's networks: until its ``deadline`` (a :data:`Now` time; None: no
    deadline) less ``reserve_s`` kept back for what must follow the networks (the level-2 fallback,
    post-processing, writing: :meth:`fusemycells.runtime.ladder.Ladder.reserve_s`)."""

    deadline: float | None = None
    reserve_s: float = 0.0
    now: Now = field(default=time.perf_counter, repr=False)

    def left(self) -> float:
        """Seconds left for the networks (inf without a deadline; negative once overrun)."""
        return math.inf if self.deadline is None else self.deadline - self.reserve_s - self.now()

    def shown(self) -> str:
        """:meth:`left` for a message ('12.3 s'; 0 once passed)."""
        return f"{max(self.left(), 0.0):.1f} s"
