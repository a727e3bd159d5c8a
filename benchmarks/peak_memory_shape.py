"""Peak memory of one stack of any shape against the RAM estimate, in a fresh process.

    python benchmarks/peak_memory_shape.py 100000x16x16 [--spacing 1.0 0.39 0.39] [--work DIR]

Writes a random uint16 stack, then runs ``files.process_file`` on it with fixture networks of a 64³
patch (``test/conftest.py``; the stitching's padding depends on the patch size, not on the weights)
and a stand-in patch network that returns its stage-1 channel, and prints the peak RSS (``VmHWM``)
with ``budget.estimate_peak_bytes`` for the shape, with and without the patch (the latter is the
estimate before issue #19 item 8). For measurement, not for CI (100000×16×16 takes ≈ 25 min and 7 GiB).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO / "test"), str(REPO)]

from conftest import fixture_manifest, write_case  # noqa: E402

from fusemycells.backends import load_stage  # noqa: E402
from fusemycells.config import load_manifest  # noqa: E402
from fusemycells.files import process_file  # noqa: E402
from fusemycells.pipeline import Fuser  # noqa: E402
from fusemycells.runtime.budget import BudgetPolicy, estimate_peak_bytes  # noqa: E402
from fusemycells.runtime.devices import peak_rss_mib  # noqa: E402


class Stage1Channel:
    """Stand-in patch runner: returns channel 1 (the stage-1 prediction) of each batch."""

    backend, provider, device, precision = "stand-in", "CPU", "cpu", "fp32"

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(batch[:, 1:2])


def loader(manifest, spec, backend, device, **options):
    loaded = load_stage(manifest, spec, backend, device, **options)
    return dataclasses.replace(loaded, runner=Stage1Channel()) if spec.patch_size is not None else loaded


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("shape", help="ZxYxX voxels, e.g. 100000x16x16")
    parser.add_argument("--spacing", type=float, nargs=3, default=[1.0, 0.39, 0.39], metavar=("Z", "Y", "X"))
    parser.add_argument("--work", type=Path, default=None, help="scratch folder (default: a temporary one)")
    args = parser.parse_args(argv)
    shape = tuple(int(n) for n in args.shape.split("x"))
    spacing = tuple(args.spacing)
    with tempfile.TemporaryDirectory() as scratch:
        folder = args.work or Path(scratch)
        fixture_manifest(folder / "resources", patch=64)
        data = (np.random.default_rng(0).random(shape) * 1000).astype(np.uint16)
        path = write_case(folder / "in", "case.tif", data, spacing=spacing)
        del data
        policy = BudgetPolicy(device="cpu", half=False, vram_budget_gib=None, time_budget_s=None, threads=1)
        report = process_file(path, folder / "out", Fuser(load_manifest(folder / "resources"), policy, loader=loader), "float32")
    result = {
        "shape": shape,
        "status": report.status,
        "peak_mib": round(peak_rss_mib(), 1),
        "estimate_mib": round(estimate_peak_bytes(shape, 2, spacing, 0.6, (64, 64, 64)) / 2**20, 1),
        "estimate_without_padding_mib": round(estimate_peak_bytes(shape, 2, spacing, 0.6) / 2**20, 1),
        "seconds": report.seconds,
    }
    print(json.dumps(result))
    return 0 if report.status == "ok" else 1


if __name__ == "__main__":
    raise SystemExit(main())
