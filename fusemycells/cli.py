"""The fusion command line (``inference.py`` in the image, ``fusemycells`` when installed): fuse every input stack.

With no arguments it follows the Grand Challenge contract:
reads  /input/images/fluorescence-lightsheet-3D-microscopy/*.tif|*.tiff
writes /output/images/fused-fluorescence-lightsheet-3D-microscopy/<same file name>
Exit code: 0 when every file was written (a file the pipeline failed on for a reason not its own gets
the normalised input as its output, status fallback_identity: written too), 1 when any file was
refused (unreadable or invalid input, no output), 2 for a setup error (including an invalid option
value), 143 when stopped by SIGTERM, 130 by SIGINT (Ctrl-C).
The --report JSON is documented key by key in fusemycells/report.schema.json.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fusemycells.config import (
    BACKENDS,
    GC_INPUT_ROOT,
    GC_OUTPUT_ROOT,
    INPUT_SUBDIR,
    OUTPUT_SUBDIR,
    Manifest,
    ManifestError,
    RunConfig,
    load_manifest,
    resolve_resources_dir,
)
from fusemycells.io import formats
from fusemycells.io.paths import (  # noqa: F401
    STALE_PARTIAL_S,
    ensure_writable,
    input_root_problem,
    remove_stale_partials,
    report_path_problem,
)
from fusemycells.io.scan import log_not_read, scan_inputs
from fusemycells.io.tiff import (
    PARTIAL_PATTERN,  # noqa: F401  (the writer's temporary files; tests use this name)
    check_output_name,
)
from fusemycells.io.volume import Format, InputError
from fusemycells.report import WRITTEN_STATUSES, RunFacts, case_entry, manifest_sha256, run_report, write_report
from fusemycells.runtime.deadline import RunClock, describe_account, time_account
from fusemycells.runtime.devices import process_age_s
from fusemycells.runtime.precision import PRECISIONS
from fusemycells.runtime.progress import configure_logging
from fusemycells.runtime.stopping import (  # noqa: F401
    TERMINATED_EXIT_CODE,
    Stopped,
    Terminated,
    run_stoppable,
    stop_flags,
    stop_signals_raise,
)

if TYPE_CHECKING:
    from fusemycells.report import CaseReport

sigterm_raises = stop_signals_raise
"""The older name of :func:`fusemycells.runtime.stopping.stop_signals_raise` (SIGTERM and SIGINT raise)."""

log = logging.getLogger("fusemycells")

IMPORTED = RunClock.now("inference.py import")
"""Where the time budget counts from when the process's start cannot be read (no Linux ``/proc``); the
imports above it are the standard library's and the light modules of the package (milliseconds)."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add("--input", type=Path, default=GC_INPUT_ROOT, help=f"input root containing {INPUT_SUBDIR}/ (default /input)")
    add("--output", type=Path, default=GC_OUTPUT_ROOT,
        help=f"output root; files go to {OUTPUT_SUBDIR}/ (default /output)")
    add("--resources", type=Path, default=None,
        help="weights folder with manifest.json (default: /opt/ml/model if valid, else bundled resources/)")
    add("--device", choices=["auto", "cuda", "cpu"], default="auto", help="compute device (default auto)")
    add("--backend", choices=["auto", *BACKENDS], default="auto",
        help="network runtime (default auto: TorchScript on CUDA; on a CPU OpenVINO, then ONNX Runtime; "
        "TorchScript when bf16; the others as fallback)")
    add("--precision", choices=PRECISIONS, default="auto",
        help="CPU forward precision (default auto: bf16 on a CPU with native bf16, AMX or AVX512-BF16; fp32 elsewhere)")
    add("--report", type=Path, default=None,
        help="write a JSON run report here (keys: fusemycells/report.schema.json)")
    add("--output-dtype", choices=["uint16", "float32"], default="uint16",
        help="output voxel type (default uint16 as the organisers' template: the percentile-normalised output's "
        "[min, max] scaled to 0..65535; float32: the normalised values)")
    add("--vram-budget", type=positive_number, default=None, metavar="GiB",
        help="GPU memory budget (default: 80%% of free)")
    add("--ram-budget", type=positive_number, default=None, metavar="GiB",
        help="host memory one file may need; larger files are refused before loading (default: 85%% of available)")
    add("--time-budget", type=positive_number, default=None, metavar="SECONDS",
        help="wall-clock budget for the whole run; outputs are degraded in steps to meet it "
        "(default: the manifest's time_budget_s)")
    add("--threads", type=positive_int, default=None,
        help="CPU threads for the networks (default: all cores); TorchScript on a CPU runs that many "
        "single-threaded patch batches side by side")
    add("--all-formats", action="store_true",
        help="also fuse the input folder's .mha/.mhd/.nrrd/.nii/.nii.gz files (SimpleITK) and OME-Zarr images, each "
        "written in its own format under its own name (default: TIFF only, as Grand Challenge)")
    add("-v", "--verbose", action="store_true", help="debug logging")
    return parser.parse_args(argv)


def build_config(args: argparse.Namespace) -> RunConfig:
    return RunConfig(
        input_dir=args.input / INPUT_SUBDIR,
        output_dir=args.output / OUTPUT_SUBDIR,
        resources_dir=args.resources,
        device=args.device,
        backend=args.backend,
        precision=args.precision,
        report=args.report,
        output_dtype=args.output_dtype,
        vram_budget_gib=args.vram_budget,
        ram_budget_gib=args.ram_budget,
        time_budget_s=args.time_budget,
        threads=args.threads,
    )


def positive_number(text: str) -> float:
    """argparse type of the budgets: a finite number > 0 (``inf``, ``nan``, 0 and negatives are refused)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text!r}")
    return value


def positive_int(text: str) -> int:
    """argparse type of ``--threads``: an integer ≥ 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {text!r}")
    return value


def disable_native_telemetry() -> None:
    """Stop onnxruntime's telemetry before it is imported: it writes a device id and an SQLite
    database under ``$HOME/.cache/Microsoft/DeveloperTools`` on import (measured with onnxruntime
    1.31.1); only ``ORT_DISABLE_TELEMETRY`` prevents it. An explicit setting is kept."""
    os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")


@dataclass
class RunState:
    """What the run has done so far, kept by :func:`main` so that a stopped run (SIGTERM, SIGINT) can report it."""

    clock: RunClock  # where the time budget counts from
    argv: list[str] | None = None
    config: RunConfig | None = None
    facts: RunFacts | None = None  # what the report says about the run besides its files
    cases: list[dict[str, Any]] = field(default_factory=list)  # per-file entries of the files done
    startup_s: float | None = None  # seconds from the clock's start to the first file
    budget_s: float | None = None
    policy: Any = None  # the run's BudgetPolicy once created (its events grow while files run)

    def add_case(self, case: Any) -> None:
        """``run_directory``'s ``on_case``: keep a finished file's report entry."""
        self.cases.append(case_entry(case))

    def account(self) -> dict[str, object]:
        """The report's ``clock`` entry (see :func:`fusemycells.runtime.deadline.time_account`)."""
        files = [(str(c["file"]), c.get("seconds") or {}) for c in self.cases]
        startup = self.startup_s if self.startup_s is not None else self.clock.elapsed()
        return time_account(self.clock, self.budget_s, startup, files, self.clock.elapsed())

    def report(
        self, config: RunConfig, exit_code: int, error: str | None = None, stopped: Stopped | None = None
    ) -> dict[str, Any]:
        """The JSON report of the run so far (see :func:`fusemycells.report.run_report`); ``stopped``: the
        signal's exception."""
        facts = self.facts or RunFacts(str(config.input_dir), str(config.output_dir))
        policy = None if self.policy is None else self.policy.as_report()  # with its events so far
        clock = self.account()
        flags = stop_flags(stopped)
        cases = self.cases
        return run_report(facts, exit_code=exit_code, cases=cases, clock=clock, policy=policy, error=error, **flags)


def process_clock() -> RunClock:
    """The time budget's clock for a run started as a program: the process's start (kept across an
    ``exec()``, as by the image's entry point), else this module's import."""
    return RunClock.since(process_age_s(), fallback=IMPORTED)


def main(argv: list[str] | None = None, clock: RunClock | None = None) -> int:
    """Run the CLI; SIGTERM (SIGINT) stops it with a log line, a report of the outputs written and exit code 143 (130).

    ``clock``: where the time budget counts from (the program passes the process's start; default:
    this call).
    """
    disable_native_telemetry()
    state = RunState(clock or RunClock.now("main() call"), argv)
    return run_stoppable(lambda: _main(argv, state), lambda stopped: report_stop(state, stopped))


def report_stop(state: RunState, stopped: Stopped) -> int:
    """Log the stop in one line, write the report (the files done, their per-file entries, the time
    account), return the signal's exit code (143 SIGTERM, 130 SIGINT). The file being written when
    the signal came was removed by the writer."""
    config = state.config or build_config(parse_args(state.argv))
    written = [str(c["file"]) for c in state.cases if c.get("status") in WRITTEN_STATUSES]
    log.error(
        "%s: stopping; %d output(s) written before it, the file in progress was not written", stopped, len(written)
    )
    _write_report(config, state.report(config, stopped.exit_code, error=str(stopped), stopped=stopped))
    return stopped.exit_code


def note_skipped_inputs(config: RunConfig, facts: RunFacts, formats_read: Sequence[Format] | None = None) -> None:
    """Log the entries of the input folder that are not processed (WARNING for entries named like an input:
    dangling symlinks, FIFOs, folders, ...; INFO for other names) and note them for the report
    (``skipped``) with the count of inputs; log an early error for every input whose output name
    cannot be created in the output folder. ``formats_read``: default TIFF only."""
    scan = scan_inputs(config.input_dir, formats_read)
    for name, reason in scan.not_read():
        log_not_read(name, reason, formats=formats_read)
    facts.skipped = [{"file": name, "reason": reason} for name, reason in scan.not_read()]
    facts.inputs = len(scan.files)
    for path in scan.files:
        try:
            check_output_name(config.output_dir, path.name)
        except InputError as exc:
            log.error("will be refused: %s", exc)


def _main(argv: list[str] | None, state: RunState) -> int:
    args = parse_args(argv)
    configure_logging(args.verbose)
    config = state.config = build_config(args)
    if (problem := report_path_problem(config.report)) is not None:
        log.error("%s", problem)
        return 2
    state.facts = RunFacts(str(config.input_dir), str(config.output_dir))
    formats_read = formats.chosen() if args.all_formats else None  # None: TIFF only (Grand Challenge)
    try:
        manifest = check_setup(args.input, config, state, formats_read)
        cases = fuse_all(config, manifest, state, formats_read)
    except Exception as exc:  # every setup failure exits 2: exit 1 means "a file was refused"
        expected = isinstance(exc, (FileNotFoundError, PermissionError, ManifestError, ValueError, RuntimeError))
        error = str(exc) if expected else f"{type(exc).__name__}: {exc}"
        log.error("%s", error if expected else f"setup failed: {error}", exc_info=None if expected else exc)
        _write_report(config, state.report(config, 2, error=error))
        return 2
    refused = [c.file for c in cases if c.status not in WRITTEN_STATUSES]
    exit_code = exit_code_of([c.status for c in cases])
    report = state.report(config, exit_code)  # the policy with every event, and the time account
    log.info("%s", describe_account(report["clock"]))
    if not _write_report(config, report):
        return 2
    elapsed, origin = state.clock.elapsed(), state.clock.origin
    log.info("done: %d written, %d refused, %.1f s since %s", len(cases) - len(refused), len(refused), elapsed, origin)
    return exit_code


def check_setup(
    input_root: Path, config: RunConfig, state: RunState, formats_read: Sequence[Format] | None
) -> Manifest:
    """The cheap checks before any heavy import: the input layout, the weights' manifest, a writable output
    folder (stale temporary files of a killed run removed); fills the report's facts. Raises to exit 2."""
    facts = state.facts or RunFacts(str(config.input_dir), str(config.output_dir))
    problem = input_root_problem(input_root, formats=formats_read)
    if problem is not None:
        raise FileNotFoundError(problem)
    note_skipped_inputs(config, facts, formats_read)
    resources, why = resolve_resources_dir(config.resources_dir)
    log.info("weights from %s (%s)", resources, why)
    facts.resources = str(resources)
    manifest = load_manifest(resources)
    facts.manifest_sha256 = manifest_sha256(resources)
    ensure_writable(config.output_dir)
    facts.stale_partials_removed = note_stale_partials(config.output_dir, state.clock)
    return manifest


def fuse_all(
    config: RunConfig, manifest: Manifest, state: RunState, formats_read: Sequence[Format] | None
) -> list[CaseReport]:
    """Build the run's policy and :class:`~fusemycells.pipeline.Fuser` (torch and the networks are imported
    only now, after the cheap checks, so setup errors are fast) and fuse every input file."""
    from fusemycells.backends import load_stage
    from fusemycells.files import run_directory
    from fusemycells.ops import choose_ops
    from fusemycells.pipeline import Fuser
    from fusemycells.runtime import allocator, faults
    from fusemycells.runtime.budget import BudgetPolicy

    allocator.configure()  # malloc and numpy settings for the streamed steps (fusemycells/runtime/allocator.py)
    state.budget_s = config.time_budget_s if config.time_budget_s is not None else manifest.time_budget_s
    policy = state.policy = BudgetPolicy.create(
        config.device,
        config.vram_budget_gib,
        state.budget_s,
        config.threads,
        config.ram_budget_gib,
        clock=state.clock,
        precision=config.precision,
    )
    loader, ops = faults.from_environment(policy.device, load_stage, choose_ops)  # tests and gpu_check only
    fuser = Fuser(manifest, policy, loader=loader, backend=config.backend, ops=ops)
    state.startup_s = state.clock.elapsed()
    on_case = state.add_case
    return run_directory(config.input_dir, config.output_dir, fuser, config.output_dtype, on_case, formats_read)


def exit_code_of(statuses: list[str]) -> int:
    """The exit code of a run whose files ended with ``statuses``: 1 when any was refused (no output), else 0
    (``ok`` and ``fallback_identity`` outputs were written, and Grand Challenge uploads them only on 0)."""
    return 1 if any(s not in WRITTEN_STATUSES for s in statuses) else 0


def note_stale_partials(folder: Path, clock: RunClock) -> list[str]:
    """Remove the temporary output files a killed earlier run left (see
    :func:`fusemycells.io.paths.note_stale_partials`), with a warning naming them; their names (the report's
    ``stale_partials_removed``)."""
    from fusemycells.io import paths

    return paths.note_stale_partials(folder, clock.wall)


def _write_report(config: RunConfig, report: dict[str, Any]) -> bool:
    """Write the JSON report if one was asked for; False (logged) when it could not be written."""
    if config.report is None:
        return True
    problem = write_report(config.report, report)
    if problem is not None:
        log.error("%s", problem)
    return problem is None


def run() -> int:
    """The console script's entry: :func:`main` with the clock started at the process's start."""
    return main(clock=process_clock())


if __name__ == "__main__":
    sys.exit(run())
