#!/usr/bin/env python3
"""FuseMyCells Grand Challenge entry point: fuse every input light-sheet stack.

With no arguments it follows the Grand Challenge contract:
reads  /input/images/fluorescence-lightsheet-3D-microscopy/*.tif|*.tiff
writes /output/images/fused-fluorescence-lightsheet-3D-microscopy/<same file name>
Exit code: 0 when every file was written, 1 when any file was refused, 2 for a setup error.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

from fusemycells.config import (
    GC_INPUT_ROOT,
    GC_OUTPUT_ROOT,
    INPUT_SUBDIR,
    OUTPUT_SUBDIR,
    ManifestError,
    RunConfig,
    load_manifest,
    resolve_resources_dir,
)

log = logging.getLogger("fusemycells")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", type=Path, default=GC_INPUT_ROOT, help=f"input root containing {INPUT_SUBDIR}/ (default /input)")
    parser.add_argument("--output", type=Path, default=GC_OUTPUT_ROOT, help=f"output root; files go to {OUTPUT_SUBDIR}/ (default /output)")
    parser.add_argument("--resources", type=Path, default=None, help="weights folder with manifest.json (default: /opt/ml/model if valid, else bundled resources/)")
    parser.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto", help="compute device (default auto)")
    parser.add_argument("--backend", choices=["auto", "torchscript", "onnx"], default="auto", help="network format (default auto: TorchScript on CUDA, ONNX on CPU, the other as fallback)")
    parser.add_argument("--report", type=Path, default=None, help="write a JSON run report here")
    parser.add_argument("--output-dtype", choices=["float32", "uint16"], default="float32", help="output voxel type (default float32, percentile-normalised values)")
    parser.add_argument("--vram-budget", type=float, default=None, metavar="GiB", help="GPU memory budget (default: 80%% of free)")
    parser.add_argument("--ram-budget", type=float, default=None, metavar="GiB", help="host memory one file may need; larger files are refused before loading (default: 85%% of available)")
    parser.add_argument("--time-budget", type=float, default=None, metavar="SECONDS", help="wall-clock budget for the whole run; outputs are degraded in steps to meet it (default: the manifest's time_budget_s)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for the networks (default: all cores); TorchScript on a CPU runs that many single-threaded patch batches side by side")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return parser.parse_args(argv)


def build_config(args: argparse.Namespace) -> RunConfig:
    return RunConfig(
        input_dir=args.input / INPUT_SUBDIR,
        output_dir=args.output / OUTPUT_SUBDIR,
        resources_dir=args.resources,
        device=args.device,
        backend=args.backend,
        report=args.report,
        output_dtype=args.output_dtype,
        vram_budget_gib=args.vram_budget,
        ram_budget_gib=args.ram_budget,
        time_budget_s=args.time_budget,
        threads=args.threads,
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)-7s %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
    )
    config = build_config(args)
    started = time.perf_counter()
    report: dict[str, object] = {"input_dir": str(config.input_dir), "output_dir": str(config.output_dir)}
    try:
        if not config.input_dir.is_dir():
            raise FileNotFoundError(f"input folder not found: {config.input_dir}")
        from fusemycells.io import list_inputs

        if not list_inputs(config.input_dir):
            raise FileNotFoundError(f"no .tif/.tiff files in {config.input_dir}")
        resources, why = resolve_resources_dir(config.resources_dir)
        log.info("weights from %s (%s)", resources, why)
        manifest = load_manifest(resources)
        # heavy imports only after the cheap checks, so setup errors are fast
        from fusemycells.budget import BudgetPolicy
        from fusemycells.pipeline import Fuser, run_directory

        ensure_writable(config.output_dir)
        time_budget = config.time_budget_s if config.time_budget_s is not None else manifest.time_budget_s
        policy = BudgetPolicy.create(config.device, config.vram_budget_gib, time_budget, config.threads, config.ram_budget_gib, started=started)
        report["resources"] = str(resources)
        report["policy"] = policy.as_report()
        fuser = Fuser(manifest, policy, backend=config.backend)
        cases = run_directory(config.input_dir, config.output_dir, fuser, config.output_dtype)
    except Exception as exc:  # every setup failure exits 2: exit 1 means "a file was refused"
        expected = isinstance(exc, (FileNotFoundError, PermissionError, ManifestError, ValueError, RuntimeError))
        log.error("%s", exc if expected else f"setup failed: {type(exc).__name__}: {exc}", exc_info=None if expected else exc)
        report["error"] = str(exc) if expected else f"{type(exc).__name__}: {exc}"
        _write_report(config, report)
        return 2
    report["policy"] = policy.as_report()
    report["files"] = [asdict(case) for case in cases]
    report["seconds"] = round(time.perf_counter() - started, 3)
    refused = [c.file for c in cases if c.status != "ok"]
    report["refused"] = refused
    _write_report(config, report)
    log.info("done: %d written, %d refused, %.1f s", len(cases) - len(refused), len(refused), report["seconds"])
    return 1 if refused else 0


def ensure_writable(directory: Path) -> None:
    """Create the output folder if needed; raise PermissionError when files cannot be written there."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=directory, prefix=".write-test-"):
            pass
    except OSError as exc:
        raise PermissionError(f"output folder not writable: {directory} ({exc.strerror or exc})") from exc


def _write_report(config: RunConfig, report: dict[str, object]) -> None:
    if config.report is None:
        return
    config.report.parent.mkdir(parents=True, exist_ok=True)
    config.report.write_text(json.dumps(report, indent=2, default=str))


if __name__ == "__main__":
    sys.exit(main())
