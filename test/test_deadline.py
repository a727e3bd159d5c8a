"""The patch-rate watcher stops a run mid-way when the rest of its patches would overrun the deadline
(a fake time source: seconds are whatever the test says)."""

from __future__ import annotations

import pytest

from fusemycells.runtime.deadline import Countdown
from fusemycells.runtime.ladder import PatchRateWatcher
from fusemycells.runtime.progress import log_lines_only


class FakeNow:
    """A time source the test sets (seconds)."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def watching(total: int, deadline: float, reserve_s: float = 0.0) -> tuple[PatchRateWatcher, FakeNow]:
    clock = FakeNow()
    watcher = PatchRateWatcher(clock, progress=log_lines_only)
    watcher.start(total, Countdown(deadline, reserve_s=reserve_s, now=clock), batch_size=2)
    return watcher, clock


def test_the_watcher_stops_a_run_once_the_rest_at_the_learned_rate_would_overrun_the_deadline() -> None:
    watcher, clock = watching(total=20, deadline=100.0, reserve_s=10.0)  # 90 s for the networks
    clock.now = 30.0
    assert watcher.after_batch(2, 20) is None  # the first batch (one-time costs) teaches no rate
    clock.now = 34.0  # 2 s per patch since: 16 more patches need 32 s, 56 s are left
    assert watcher.after_batch(4, 20) is None and watcher.seconds_per_patch == pytest.approx(2.0)
    clock.now = 50.0  # 16 s for 2 patches (the machine slowed down): 5 s per patch since the first batch,
    reason = watcher.after_batch(6, 20)  # 14 patches × 5 s > 40 s left
    assert reason is not None and "6/20 patches" in reason and "5.000 s/patch" in reason
    assert watcher.seconds_per_patch == pytest.approx(5.0)


def test_the_watcher_lets_a_run_finish_that_fits_and_never_stops_the_last_batch() -> None:
    watcher, clock = watching(total=6, deadline=10.0)
    clock.now = 1.0
    assert watcher.after_batch(2, 6) is None
    clock.now = 3.0  # 1 s per patch: 2 more patches need 2 s, 7 s are left
    assert watcher.after_batch(4, 6) is None
    clock.now = 50.0  # far past the deadline, but nothing is left to stop
    assert watcher.after_batch(6, 6) is None


def test_the_learned_rate_says_which_later_runs_cannot_fit() -> None:
    watcher, clock = watching(total=10, deadline=100.0)
    clock.now = 5.0
    watcher.after_batch(2, 10)
    clock.now = 11.0
    watcher.after_batch(4, 10)  # 3 s per patch
    later = Countdown(40.0, now=clock)  # 29 s left at 11 s
    assert watcher.too_slow(9, later) is None  # 27 s
    assert watcher.too_slow(10, later) == "10 patches × 3.000 s > 29.0 s left"
    assert watcher.too_slow(10, Countdown(None, now=clock)) is None  # no deadline: never too slow
