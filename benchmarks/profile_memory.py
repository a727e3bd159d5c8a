"""Where the memory goes: run ``inference.py`` with a resident-set sampler and report the peaks.

    python benchmarks/profile_memory.py [--interval 0.2] -- <inference.py arguments>

A daemon thread reads ``VmRSS`` from ``/proc/self/status`` every ``--interval`` seconds. Printed at
the end: the peak RSS with the call stack of the main thread (fusemycells frames only) when it
was first reached, and the largest RSS seen inside each pipeline function (the three innermost
fusemycells frames of the main thread at sampling time). Linux only. For measurement, not for CI.
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def rss_mib() -> float:
    """Current resident set size of this process (MiB), from /proc/self/status (NaN elsewhere)."""
    from fusemycells.runtime.devices import proc_status_mib

    current = proc_status_mib("VmRSS")
    return float("nan") if current is None else current


def pipeline_frames(frame) -> list[str]:
    """'function (file:line)' of the fusemycells frames of a stack, outermost first."""
    return [f"{f.name} ({Path(f.filename).name}:{f.lineno})" for f in traceback.extract_stack(frame) if "fusemycells" in f.filename]


class Sampler(threading.Thread):
    """Samples the main thread's RSS and stack; keeps the peak and the maximum per innermost pipeline frame."""

    def __init__(self, interval: float) -> None:
        super().__init__(daemon=True)
        self.interval = interval
        self.main_id = threading.main_thread().ident
        self.peak = 0.0
        self.peak_stack: list[str] = []
        self.by_function: dict[str, float] = {}
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.wait(self.interval):
            rss = rss_mib()
            frame = sys._current_frames().get(self.main_id)
            stack = pipeline_frames(frame) if frame is not None else []
            where = " > ".join(f.split(" (")[0] for f in stack[-3:]) if stack else "(outside the pipeline)"
            self.by_function[where] = max(self.by_function.get(where, 0.0), rss)
            if rss > self.peak:
                self.peak, self.peak_stack = rss, stack


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--interval", type=float, default=0.2, help="seconds between samples")
    parser.add_argument("inference_args", nargs=argparse.REMAINDER, help="arguments for inference.py (after --)")
    args = parser.parse_args(argv)
    forwarded = [a for a in args.inference_args if a != "--"]
    from fusemycells import cli

    sampler = Sampler(args.interval)
    sampler.start()
    started = time.perf_counter()
    code = cli.main(forwarded)
    sampler.stop.set()
    sampler.join()
    print(f"\nran {time.perf_counter() - started:.1f} s, exit {code}; peak RSS {sampler.peak:.0f} MiB (sampled every {args.interval} s), reached in:")
    for line in sampler.peak_stack:
        print(f"  {line}")
    print("largest RSS per place in the pipeline (three innermost frames, MiB):")
    for name, rss in sorted(sampler.by_function.items(), key=lambda item: -item[1]):
        print(f"  {rss:8.0f}  {name}")
    return code


if __name__ == "__main__":
    raise SystemExit(main())
