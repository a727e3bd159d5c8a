"""Progress of long loops: a bar (``tqdm``) on an interactive terminal, periodic log lines otherwise.

The one decision is :func:`interactive`: a bar only when the stream it would be drawn on is a
terminal (a TTY). Grand Challenge, CI and any redirected ``stderr`` get the plain log lines of the
run (a bar's carriage returns would fill a log file with partial lines). While a bar is shown,
the root logger's console handlers write through ``tqdm.write`` (``tqdm.contrib.logging``), so
log lines appear above the bar instead of breaking it; closing the bar restores them.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any, Protocol, TextIO

log = logging.getLogger(__name__)


class Progress(Protocol):
    """The display of one loop of ``total`` items: told how many are done, closed at the end."""

    def update(self, done: int, elapsed_s: float, note: str | None = None) -> None:
        """``done`` items of the total are finished, ``elapsed_s`` seconds after the loop's start;
        ``note``: a short text shown with it (counts of outcomes, ...)."""

    def close(self) -> None:
        """The loop ended (finished, stopped early or failed); calling it again does nothing."""


ProgressFactory = Callable[..., Progress]
"""``factory(total, unit, step=1)``: the :class:`Progress` of a loop of ``total`` items named
``unit`` (plural, e.g. 'patches') that advances ``step`` items at a time (see :func:`progress_for`)."""


LOG_FORMAT = "%(asctime)s %(levelname)-7s %(message)s"


def configure_logging(verbose: bool = False) -> None:
    """The command-line programs' log lines on stderr (time, level, message): INFO, or DEBUG when
    ``verbose``. One format for ``inference.py``, ``fusemycells.batch`` and ``fusemycells.evaluate``."""
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO, format=LOG_FORMAT, datefmt="%H:%M:%S", stream=sys.stderr
    )


def interactive(stream: Any) -> bool:
    """True when ``stream`` is an interactive terminal (a TTY): the one place that decides between a
    progress bar and log lines. A closed stream, or an object without ``isatty``, is not."""
    isatty = getattr(stream, "isatty", None)
    if isatty is None:
        return False
    try:
        return bool(isatty())
    except (ValueError, OSError):  # closed or detached
        return False


def terminal_size(stream: Any, default: tuple[int, int] = (80, 24)) -> tuple[int, int]:
    """(columns, lines) of the terminal ``stream`` writes to; ``$COLUMNS`` / ``$LINES`` or ``default``
    where it does not say (a pseudo-terminal nobody sized reports 0 × 0, on which tqdm draws nothing)."""
    try:
        size = os.get_terminal_size(stream.fileno())
        reported = (size.columns, size.lines)
    except (AttributeError, ValueError, OSError):  # no file descriptor (io.UnsupportedOperation is an OSError)
        reported = (0, 0)
    chosen = []
    for value, name, fallback in zip(reported, ("COLUMNS", "LINES"), default):
        if value <= 0:
            text = os.environ.get(name, "")
            value = int(text) if text.isdigit() else 0
        chosen.append(value if value > 0 else fallback)
    return chosen[0], chosen[1]


class LogLines:
    """Progress as log lines: ``'    patches 6/8 (5.4 s)'`` about every tenth of the loop and at its end.

    ``step``: items per update (a batch of patches), so that a line is written whenever an update
    crosses a tenth even when the tenth is not a multiple of the step.
    """

    def __init__(self, total: int, unit: str, step: int = 1, logger: logging.Logger = log) -> None:
        self.total, self.unit, self.logger = total, unit, logger
        self.every, self.step = max(1, total // 10), max(1, step)

    def update(self, done: int, elapsed_s: float, note: str | None = None) -> None:
        if done == self.total or done % self.every < self.step:
            extra = "" if note is None else f" {note}"
            self.logger.info("    %s %d/%d (%.1f s)%s", self.unit, done, self.total, elapsed_s, extra)

    def close(self) -> None:
        pass


BAR_FORMAT = "{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} [{elapsed} elapsed, {remaining} left{postfix}]"
"""What a :class:`Bar` shows: the unit, done / total, time elapsed and the estimated time left (ETA)."""


class Bar:
    """Progress as a ``tqdm`` bar on ``stream``: done / total, elapsed and the estimated time left.

    tqdm's estimate follows the recent rate (exponential moving average), so a slow first batch
    (the first row of patches is resampled from the input, warm-up) weighs less as the loop runs.
    While the bar is open, console log lines go through ``tqdm.write`` (see the module's notes).
    """

    def __init__(self, total: int, unit: str, stream: TextIO) -> None:
        from tqdm import tqdm
        from tqdm.contrib.logging import logging_redirect_tqdm

        columns, lines = terminal_size(stream)
        self.bar = tqdm(total=total, desc=unit, file=stream, bar_format=BAR_FORMAT, ncols=columns, nrows=lines)
        self._redirect: AbstractContextManager[None] | None = logging_redirect_tqdm()
        self._redirect.__enter__()

    def update(self, done: int, elapsed_s: float, note: str | None = None) -> None:
        if note is not None:
            self.bar.set_postfix_str(note, refresh=False)
        self.bar.update(done - self.bar.n)

    def close(self) -> None:
        if self._redirect is not None:
            redirect, self._redirect = self._redirect, None
            redirect.__exit__(None, None, None)
            self.bar.close()


def progress_for(total: int, unit: str, step: int = 1, stream: TextIO | None = None) -> Progress:
    """A :class:`Bar` when ``stream`` (default: ``sys.stderr`` at the time of the call) is an
    interactive terminal, else :class:`LogLines` (written to the log, wherever it goes)."""
    stream = sys.stderr if stream is None else stream
    if interactive(stream):
        return Bar(total, unit, stream)
    return LogLines(total, unit, step)


def log_lines_only(total: int, unit: str, step: int = 1, **_: Any) -> Progress:
    """A :data:`ProgressFactory` that never draws a bar (processes sharing one terminal, e.g. dask workers)."""
    return LogLines(total, unit, step)
