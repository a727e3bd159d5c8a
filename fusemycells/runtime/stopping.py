"""Stopping a run on SIGTERM (a job runner) or SIGINT (Ctrl-C): the one mechanism of ``inference.py``
and ``fusemycells.batch``.

Within :func:`stop_signals_raise`, either signal raises a :class:`Stopped` exception in the main
thread: :class:`Terminated` for SIGTERM, :class:`Interrupted` for SIGINT. They are
``BaseException`` s, so per-file error handling (``except Exception``) does not swallow them and the
writers remove their temporary files on the way out (``except BaseException``). The program then
calls :func:`ignore_stop_signals`, writes its report with what was finished, logs one line and
exits with :attr:`Stopped.exit_code` (128 + the signal number: 143, 130), without a traceback.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Stopped(BaseException):
    """A stop signal arrived; ``signum`` says which."""

    def __init__(self, signum: int) -> None:
        self.signum = int(signum)
        verb = "terminated" if self.signum == signal.SIGTERM else "interrupted"
        super().__init__(f"{verb} by {signal.Signals(self.signum).name}")

    @property
    def exit_code(self) -> int:
        """The shell's convention: 128 + the signal number (143 for SIGTERM, 130 for SIGINT)."""
        return 128 + self.signum


class Terminated(Stopped):
    """SIGTERM arrived (a job runner, ``kill``)."""

    def __init__(self, signum: int = signal.SIGTERM) -> None:
        super().__init__(signum)


class Interrupted(Stopped):
    """SIGINT arrived (Ctrl-C)."""

    def __init__(self, signum: int = signal.SIGINT) -> None:
        super().__init__(signum)


TERMINATED_EXIT_CODE = 128 + signal.SIGTERM
INTERRUPTED_EXIT_CODE = 128 + signal.SIGINT


def _raise_stopped(signum: int, frame: object) -> None:
    raise (Terminated if signum == signal.SIGTERM else Interrupted)(signum)


@contextmanager
def stop_signals_raise(signals: tuple[int, ...] = STOP_SIGNALS) -> Iterator[None]:
    """Within the block, each of ``signals`` raises :class:`Terminated` / :class:`Interrupted` in the
    main thread (the previous handlers are restored after). Elsewhere than in the main thread this
    does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {signum: signal.signal(signum, _raise_stopped) for signum in signals}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)


def ignore_stop_signals() -> None:
    """Ignore further stop signals while the report of a stopped run is written (the enclosing
    :func:`stop_signals_raise` restores the handlers). Main thread only; elsewhere nothing."""
    if threading.current_thread() is threading.main_thread():
        for signum in STOP_SIGNALS:
            signal.signal(signum, signal.SIG_IGN)


def run_stoppable(work: Callable[[], int], on_stop: Callable[[Stopped], int]) -> int:
    """``work()``'s exit code; when a stop signal arrives meanwhile, further ones are ignored while
    ``on_stop(exc)`` reports what was finished, and its exit code is returned (the handlers are restored after)."""
    with stop_signals_raise():
        try:
            return work()
        except Stopped as exc:
            ignore_stop_signals()
            return on_stop(exc)


def stop_flags(exc: BaseException | None) -> dict[str, bool]:
    """The reports' ``terminated`` and ``interrupted`` for a run stopped by ``exc`` (None: not stopped)."""
    return {"terminated": isinstance(exc, Terminated), "interrupted": isinstance(exc, Interrupted)}
