"""Where a case's wall time goes: exclusive seconds per kind of work (the report's ``seconds['profile_s']``).

A :class:`Profile` partitions the wall time of the thread that created it (the pipeline's main
thread) into named sections: entering a section pauses the enclosing one, so nested sections are
never counted twice and the sections add up to at most the time they cover. Sections entered on
other threads (helper threads of the sliding window) are not counted: their work overlaps the main
thread's. The names (:data:`SECTIONS`) are the same in the report, the log and the README.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

SECTIONS = (
    "read_s",
    "input_statistics_s",
    "resampling_s",
    "forward_s",
    "stitching_s",
    "weight_map_s",
    "blend_s",
    "output_filter_s",
    "percentile_normalisation_s",
    "write_s",
)
"""Exclusive seconds of: reading the TIFF; sanitising, intensity percentiles, noise estimate and input checks;
every resize (to H, to the global grid, stage 1 to H, the weight map's downsampling, the correction and
weights onto the input grid); network forward passes; the sliding window around them (cutting patches,
Gaussian accumulation, the correction on H); the weight map on its coarse grid (max filter, Gaussian,
percentiles, background mask); the blend arithmetic; the output filters; the output's percentiles and
affine map (and uint16 range); encoding and writing the TIFF (and reading it back)."""


class Profile:
    """Exclusive wall seconds per section, accumulated in ``seconds`` (a dict the caller may keep in a report)."""

    def __init__(self, seconds: dict[str, float] | None = None) -> None:
        self.seconds: dict[str, float] = {} if seconds is None else seconds
        self._owner = threading.get_ident()
        self._stack: list[list] = []  # [name, start of its current uninterrupted stretch]
        self._raw: dict[str, float] = {}

    @contextmanager
    def section(self, name: str) -> Iterator[None]:
        """Count the block's time under ``name``, pausing the enclosing section (no-op on other threads)."""
        if threading.get_ident() != self._owner:
            yield
            return
        now = time.perf_counter()
        if self._stack:
            self._stop(self._stack[-1], now)
        self._stack.append([name, now])
        try:
            yield
        finally:
            now = time.perf_counter()
            self._stop(self._stack.pop(), now)
            if self._stack:
                self._stack[-1][1] = now

    def add(self, name: str, seconds: float) -> None:
        """Count ``seconds`` measured elsewhere under ``name`` (e.g. the read, timed before the profile existed)."""
        self._raw[name] = self._raw.get(name, 0.0) + max(0.0, seconds)
        self.seconds[name] = round(self._raw[name], 3)

    def move(self, source: str, target: str, seconds: float) -> None:
        """Re-attribute up to ``seconds`` of ``source``'s time to ``target`` (never below 0 in ``source``)."""
        moved = min(max(0.0, seconds), self._raw.get(source, 0.0))
        self._raw[source] = self._raw.get(source, 0.0) - moved
        self.seconds[source] = round(self._raw[source], 3)
        self.add(target, moved)

    def describe(self) -> str:
        """One log line: the sections in :data:`SECTIONS` order (then any others), seconds each."""
        names = [n for n in SECTIONS if n in self.seconds] + [n for n in self.seconds if n not in SECTIONS]
        return ", ".join(f"{n} {self.seconds[n]:.2f}" for n in names)

    def _stop(self, entry: list, now: float) -> None:
        name, start = entry
        self._raw[name] = self._raw.get(name, 0.0) + (now - start)
        self.seconds[name] = round(self._raw[name], 3)
