#!/usr/bin/env python3
"""How the input's path crosses modules (issue #26's count): run the CLI on the bundled sample under a profiler
and list the distinct cross-module calls between the package's modules, in the order they first happen.

A *cross-module call* is a call from a function of one package module (``fusemycells.*``, ``inference``) into a
function of another; each distinct (caller function, callee function) pair counts once. A call *returns into a
module it already left* when its callee's module is still on the call stack below the caller's module: the path
left that module to go deeper and calls back up into it (a callback or a layering loop, e.g. a reader calling the
pipeline's memory check, the per-file loop calling the CLI's report hook). Printed: modules, calls, those calls
back, per module. ``--entered`` counts instead every call into a module entered at any time before (leaf
helpers called from several places count each time).

    python benchmarks/call_path.py [--out DIR] [--list] [--data-path]

``--data-path`` keeps only the modules the input's pixels pass through: it leaves out the run-time policy
(``runtime/``: clocks, budget, devices, timing, precision, stopping; before the move the same modules at the
top level), the manifest and report modules and the folder checks (``io/paths``).

Run in any checkout (the CLI is ``fusemycells.cli.main`` or, before it moved, ``inference.main``).
"""

from __future__ import annotations

import argparse
import collections
import sys
import tempfile
from pathlib import Path

ROOT = Path.cwd()
sys.path.insert(0, str(ROOT))


def package_module(frame) -> str | None:
    name = frame.f_globals.get("__name__", "")
    return name if name == "inference" or name.startswith("fusemycells") else None


POLICY = ("fusemycells.runtime", "fusemycells.config", "fusemycells.report", "fusemycells.io.paths", "fusemycells.paths",
          *(f"fusemycells.{m}" for m in ("deadline", "budget", "devices", "timing", "precision", "stopping", "progress",
                                         "allocator", "faults", "cuda_support")))


def on_data_path(module: str) -> bool:
    """Whether ``module`` is one the input's pixels pass through (not run-time policy, manifest or report)."""
    return not any(module == p or module.startswith(p + ".") for p in POLICY)


def stack_modules(frame) -> set[str]:
    """The package modules of ``frame``'s ancestors (the frames below it on the call stack)."""
    modules = set()
    while frame is not None:
        if (module := package_module(frame)) is not None:
            modules.add(module)
        frame = frame.f_back
    return modules


def trace(argv: list[str]) -> tuple[list[tuple[str, str, str, str]], set[tuple[str, str, str, str]]]:
    """(caller module, caller function, callee module, callee function) of every distinct cross-module call, and
    those whose callee's module is on the stack below the caller's (calls back up)."""
    try:
        from fusemycells.cli import main
    except ImportError:  # before the CLI moved into the package
        from inference import main
    seen: dict[tuple[str, str, str, str], None] = {}
    upward: set[tuple[str, str, str, str]] = set()

    def profiler(frame, event, arg):
        if event != "call":
            return
        callee = package_module(frame)
        caller_frame = frame.f_back
        if callee is None or caller_frame is None:
            return
        caller = package_module(caller_frame)
        if caller is None or caller == callee:
            return
        key = (caller, caller_frame.f_code.co_name, callee, frame.f_code.co_name)
        if key not in seen:
            seen[key] = None
            if callee in stack_modules(caller_frame.f_back):
                upward.add(key)

    sys.setprofile(profiler)
    try:
        main(argv)
    finally:
        sys.setprofile(None)
    return list(seen), upward


def count_returns(calls: list[tuple[str, str, str, str]]) -> tuple[int, collections.Counter]:
    """Calls whose callee module was entered before and left (it is not the caller's module)."""
    entered: set[str] = set()
    returns: collections.Counter = collections.Counter()
    for caller, _, callee, _ in calls:
        entered.add(caller)
        if callee in entered:
            returns[callee] += 1
        entered.add(callee)
    return sum(returns.values()), returns


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=None, help="output root (default: a temporary folder)")
    parser.add_argument("--list", action="store_true", help="print every cross-module call")
    parser.add_argument("--data-path", action="store_true", help="only the modules the input's pixels pass through")
    parser.add_argument("--entered", action="store_true", help="count calls into any module entered before")
    args = parser.parse_args()
    out = args.out or Path(tempfile.mkdtemp(prefix="call_path_"))
    calls, upward = trace(["--input", "test/input", "--output", str(out), "--device", "cpu", "--threads", "1"])
    if args.data_path:
        calls = [c for c in calls if on_data_path(c[0]) and on_data_path(c[2])]
    modules = {m for c in calls for m in (c[0], c[2])}
    if args.entered:
        total, per_module = count_returns(calls)
    else:
        back = [c for c in calls if c in upward]
        total, per_module = len(back), collections.Counter(c[2] for c in back)
    if args.list:
        for call in calls:
            caller, f, callee, g = call
            print(f"  {caller}.{f} -> {callee}.{g}{'   (back up)' if call in upward else ''}")
    print(f"{len(modules)} modules, {len(calls)} distinct cross-module calls, {total} back into a module already left")
    print("  returns per module: " + ", ".join(f"{m} {n}" for m, n in per_module.most_common()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
