"""Choose the output Gaussian σ (manifest ``postprocess.output_sigma_knots``, one knot) per channel.

    python -m training.tune --input DIR --pred DIR --gt DIR [--sigmas 0 0.3 0.5 0.7 1.0] [--json FILE]

``--pred`` holds container outputs made with the output filter off (σ 0). The final percentile
normalisation is affine and the metric normalises again, so filtering those outputs here scores
exactly what the container would write with that σ (up to the percentiles of the filtered
volume, which the metric recomputes anyway). Prints mean N-SSIM per channel and σ, and the best
σ per channel (ties and gains below ``--min-gain`` keep the filter off), and, per case, the
input's relative noise (:func:`fusemycells.postprocess.relative_noise`): the table from which the
noise-adaptive knots (``output_sigma_knots``, ``gate_knots`` in ``training/policy/postprocess.json``)
are read off. Use tuning sets, never the validation set (seeds 800 000+ by convention).
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import numpy as np
from scipy import ndimage

from fusemycells.config import PostprocessSpec, with_output_sigma
from fusemycells.evaluate import ground_truth_name, tiff_files
from fusemycells.evaluation.metrics import metric_normalise, n_ssim, ssim
from fusemycells.io.tiff import read_volume
from fusemycells.postprocess import output_sigma_zyx, relative_noise

log = logging.getLogger("training.tune")


def score_sigmas(
    input_dir: Path, pred_dir: Path, gt_dir: Path, sigmas: list[float], cases: list[dict] | None = None, isotropic_um: bool = True
) -> dict[str, dict[float, list[float]]]:
    """channel → σ → N-SSIM per case; per-case rows (with the input's relative noise) go to ``cases``.

    σ is the Y/X σ in input-grid voxels; with ``isotropic_um`` Z gets σ·spacing_x/spacing_z (the
    manifest's ``output_sigma_isotropic_um``), else the same σ in voxels on every axis.
    """
    preds, gts = tiff_files(pred_dir), tiff_files(gt_dir)
    table: dict[str, dict[float, list[float]]] = {}
    for name, path in sorted(tiff_files(input_dir).items()):
        gt_path = next((gts[n] for n in ground_truth_name(name) if n in gts), None)
        if name not in preds or gt_path is None or ("_fused" in name and "_angle" not in name):
            continue
        inp, pred, gt = read_volume(path), read_volume(preds[name]), read_volume(gt_path)
        g = metric_normalise(gt.data)
        s_in = ssim(metric_normalise(inp.data), g)
        row = table.setdefault(inp.channel, {s: [] for s in sigmas})
        spec = PostprocessSpec(output_sigma_isotropic_um=isotropic_um)
        for sigma in sigmas:
            zyx = output_sigma_zyx(with_output_sigma(spec, sigma), inp.spacing)
            out = ndimage.gaussian_filter(pred.data.astype(np.float32), zyx) if sigma > 0 else pred.data
            row[sigma].append(n_ssim(ssim(metric_normalise(out), g), s_in))
        noise = relative_noise(inp.data)
        if cases is not None:
            cases.append({"name": name, "channel": inp.channel, "relative_noise": noise, "n_ssim": {s: v[-1] for s, v in row.items()}})
        log.info("%s %s noise %.4f: %s", name, inp.channel, noise, {s: round(v[-1], 4) for s, v in row.items()})
    return table


def best_sigma(scores: dict[float, list[float]], min_gain: float) -> float:
    """The σ with the best mean N-SSIM, unless it beats σ = 0 by less than ``min_gain``."""
    means = {s: float(np.mean(v)) for s, v in scores.items()}
    best = max(means, key=lambda s: means[s])
    return best if best == 0 or 0 not in means or means[best] - means[0] >= min_gain else 0.0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", type=Path, required=True)
    parser.add_argument("--pred", type=Path, required=True)
    parser.add_argument("--gt", type=Path, required=True)
    parser.add_argument("--sigmas", type=float, nargs="+", default=[0.0, 0.3, 0.5, 0.7, 1.0], help="σ in input-grid voxels")
    parser.add_argument("--voxel-sigma", action="store_true", help="σ in voxels on every axis (default: Y/X σ, Z scaled to the same µm)")
    parser.add_argument("--min-gain", type=float, default=0.002, help="smallest mean N-SSIM gain that turns the filter on")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    cases: list[dict] = []
    table = score_sigmas(args.input, args.pred, args.gt, sorted(set([0.0, *args.sigmas])), cases, isotropic_um=not args.voxel_sigma)
    result: dict = {"cases": cases}
    for channel, scores in table.items():
        means = {s: float(np.mean(v)) for s, v in scores.items()}
        result[channel] = {"means": means, "min": {s: float(np.min(v)) for s, v in scores.items()}, "best_sigma": best_sigma(scores, args.min_gain)}
        print(f"{channel}: " + "  ".join(f"σ {s:g}: {m:+.4f}" for s, m in means.items()) + f"  → output σ {result[channel]['best_sigma']:g}")
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
