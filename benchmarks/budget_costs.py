"""Seconds of the pipeline's phases for one stack, to calibrate the time budget's first-file estimates.

    python benchmarks/budget_costs.py --shape 150 960 960 --spacing 1.01 0.388 0.388 [--json out.json]

Writes a synthetic stack (``make_large_case.planes``) to a temporary folder, then runs the pipeline as
``inference.py`` does (``files.process_file``, shipped weights, CPU, no deadline) except that the
patch network is replaced by a fast stand-in that returns its stage-1 channel: the correction is then
the stage-1 one (as at degradation level 2) and every phase but the patch network runs the real code.
It times, per phase: read, weight loading, preprocess, global stage, post-processing, write; and
separately the level-2 fallback (``patch_stage.stage1_correction``: the stage-1 correction on the
high-resolution grid H). Printed with the input and H voxel counts, so that rates per input voxel
and per H voxel can be fitted from stacks of different Z spacing (``fusemycells.runtime.budget``'s
``default_stage_costs`` cite the runs). For measurement, not for CI.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from make_large_case import planes  # noqa: E402

from fusemycells.backends import LoadedStage, load_stage  # noqa: E402
from fusemycells.config import DEFAULT_RESOURCES, load_manifest, without_trust  # noqa: E402
from fusemycells.files import process_file  # noqa: E402
from fusemycells.io.tiff import Volume, read_volume, write_volume  # noqa: E402
from fusemycells.ops import choose_ops  # noqa: E402
from fusemycells.patch_stage import stage1_correction  # noqa: E402
from fusemycells.pipeline import Fuser  # noqa: E402
from fusemycells.preprocess import ResizedSource, intensity_affine  # noqa: E402
from fusemycells.runtime import allocator  # noqa: E402
from fusemycells.runtime.budget import BudgetPolicy  # noqa: E402
from fusemycells.sources import ArraySource, shape_for_spacing  # noqa: E402


class Stage1Channel:
    """Stand-in patch runner: returns channel 1 (the stage-1 prediction) of each batch."""

    backend, provider, device, precision = "stand-in", "CPU", "cpu", "fp32"

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(batch[:, 1:2])


def loader(manifest, spec, backend, device, **options) -> LoadedStage:
    loaded = load_stage(manifest, spec, backend, device, **options)
    if spec.patch_size is not None:
        return dataclasses.replace(loaded, runner=Stage1Channel())
    return loaded


def fallback_seconds(path: Path, manifest_dir: Path, channel: str) -> float:
    """Seconds of the level-2 fallback (stage-1 correction on H) for the stack at ``path``."""
    volume = read_volume(path)
    spec = load_manifest(manifest_dir).channel(channel)
    grid_h = shape_for_spacing(volume.data.shape, volume.spacing, (spec.target_spacing_um,) * 3)
    ops = choose_ops("cpu")  # the pipeline's CPU steps (its x_h and p1_h are resized with the case's ops)
    x_h = ResizedSource(ArraySource(volume.data, *intensity_affine(volume.data, spec.normalisation)), grid_h, ops=ops)
    assert spec.global_stage.grid is not None
    p1 = np.random.default_rng(0).random(spec.global_stage.grid, dtype=np.float32)
    dtype = np.float16 if math.prod(grid_h) > 1 << 27 else np.float32
    correction = np.empty(grid_h, dtype=dtype)
    started = time.perf_counter()
    stage1_correction(x_h, ResizedSource(p1, grid_h, ops=ops), correction)
    return round(time.perf_counter() - started, 3)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", type=int, nargs=3, required=True, metavar=("Z", "Y", "X"))
    parser.add_argument("--spacing", type=float, nargs=3, required=True, metavar=("Z", "Y", "X"), help="µm")
    parser.add_argument("--resources", type=Path, default=DEFAULT_RESOURCES)
    parser.add_argument("--channel", default="nucleus")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    shape = tuple(args.shape)
    with tempfile.TemporaryDirectory(dir=REPO / "work_dirs" if (REPO / "work_dirs").is_dir() else None) as tmp:
        folder = Path(tmp)
        data = np.stack(list(planes(shape, 0)))
        path = folder / "case.tif"
        write_volume(path, data, Volume(data=data, spacing=tuple(args.spacing), channel=args.channel))
        del data
        allocator.configure()  # as inference.py at start-up
        policy = BudgetPolicy.create("cpu", None, None, args.threads)
        # without trust: the blend and its weight map always run (the reserve must cover them)
        fuser = Fuser(without_trust(load_manifest(args.resources)), policy, loader=loader)
        report = process_file(path, folder / "out", fuser, "float32")
        assert report.status == "ok", report.error
        fallback = fallback_seconds(path, args.resources, args.channel)
    result = {
        "shape": list(shape),
        "spacing_um": args.spacing,
        "input_voxels": math.prod(shape),
        "high_res_grid": report.high_res_grid,
        "h_voxels": math.prod(report.high_res_grid or (0,)),
        "threads": policy.threads,
        "seconds": {**report.seconds, "fallback_stage1_correction": fallback},
        "peak_rss_mib": report.peak_rss_mib,
    }
    print(json.dumps(result, indent=1))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
