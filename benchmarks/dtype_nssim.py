"""N-SSIM of float32 outputs and of the same outputs as uint16 (the pipeline's mapping), case by case.

    python benchmarks/dtype_nssim.py --input IN --pred PRED_FLOAT32 --gt GT

``PRED_FLOAT32`` holds ``inference.py --output-dtype float32`` outputs; each is converted by
:func:`as_output_dtype` (the pipeline's uint16 map, :func:`fusemycells.postprocess.uint16_affine`) and both are scored
against the ground truth with :mod:`fusemycells.evaluation.metrics` (files matched as in ``fusemycells.evaluate``:
the input's name, the ground truth's with ``_angle`` → ``_fused``). Prints one JSON line per case.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import tifffile

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fusemycells.evaluation import metrics  # noqa: E402
from fusemycells.postprocess import uint16_affine  # noqa: E402


def as_output_dtype(volume: np.ndarray, dtype: str) -> np.ndarray:
    """A float32 output (ZYX) as the pipeline writes it in ``dtype``: as is, or its [min, max] mapped onto
    0..65535 by :func:`~fusemycells.postprocess.uint16_affine` in float32, rounded to nearest."""
    volume = np.asarray(volume, dtype=np.float32)
    if dtype == "float32":
        return volume
    offset, scale = uint16_affine(float(volume.min()), float(volume.max()))
    return np.rint((volume - np.float32(offset)) * np.float32(scale)).astype(np.uint16)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", type=Path, required=True)
    parser.add_argument("--pred", type=Path, required=True, help="float32 outputs")
    parser.add_argument("--gt", type=Path, required=True)
    args = parser.parse_args(argv)
    preds = {p.name: p for p in args.pred.rglob("*.tif")}
    truths = {p.name: p for p in args.gt.rglob("*.tif")}
    for path in sorted(args.input.rglob("*.tif")):
        truth = truths.get(path.name) or truths.get(path.name.replace("_angle", "_fused"))
        if path.name not in preds or truth is None:
            continue
        pred = tifffile.imread(preds[path.name])
        gt = metrics.metric_normalise(tifffile.imread(truth))
        base = metrics.ssim(metrics.metric_normalise(tifffile.imread(path)), gt)
        scores = {}
        for dtype in ("float32", "uint16"):
            out = metrics.metric_normalise(as_output_dtype(pred, dtype))
            scores[dtype] = (metrics.ssim(out, gt) - base) / (1.0 - base)
        print(json.dumps({"case": path.name, **scores, "uint16_minus_float32": scores["uint16"] - scores["float32"]}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
