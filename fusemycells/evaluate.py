"""Score predictions with the challenge metric, next to the identity and Gaussian baselines.

    python -m fusemycells.evaluate --input DIR --pred DIR --gt DIR [--json FILE] [--png FILE [--diff] [--report R]]

DIRs are searched recursively for *.tif/*.tiff (a Grand Challenge root or a flat folder both
work). A prediction matches its input by file name; the ground truth by the same name or with
_angle replaced by _fused (the challenge's training-set naming). Per case it logs N-SSIM of the
prediction and of the Gaussian baseline (sigma 0.442 voxels for nuclei, 0.5 for membranes; the
input itself scores 0 by definition) and the two SSIMs they come from, SSIM(input, GT) and
SSIM(prediction, GT); then it prints the mean per channel.

--png writes a QC figure (needs matplotlib: pip install -r requirements-eval.txt): per case a title
with its scores and what they mean, whether the networks acted (from --report, the inference run's
JSON report), rows XY (max over Z) and XZ (max over Y, z running down), columns input | prediction |
ground truth (| prediction - ground truth with --diff), one intensity scale per case (each volume's
2nd-99.8th percentile -> 0-1, as the metric maps it), scale bars in um.
Exit code 0 when every input was scored, 1 when a prediction or ground truth is missing, 2 when
nothing could be scored or a folder is missing or matplotlib is needed but not installed.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np

from fusemycells import program_name
from fusemycells.evaluation.metrics import CaseScore, score_case
from fusemycells.evaluation.qc import (
    NO_REPORT,
    NOT_IN_REPORT,
    CaseViews,
    Projections,
    networks_note,
    projections,
    require_matplotlib,
    write_figure,
)
from fusemycells.io.tiff import InputError, read_volume
from fusemycells.runtime.progress import configure_logging

log = logging.getLogger("fusemycells.evaluate")


def tiff_files(root: Path) -> dict[str, Path]:
    """File name → path for every TIFF below ``root`` (the first one wins on duplicate names)."""
    found: dict[str, Path] = {}
    for path in sorted(root.rglob("*")):
        if path.is_file() and path.suffix.lower() in (".tif", ".tiff"):
            found.setdefault(path.name, path)
    return found


def ground_truth_name(name: str) -> list[str]:
    """Candidate ground-truth file names for an input file name."""
    names = [name]
    if "_angle" in name:
        names.insert(0, name.replace("_angle", "_fused"))
    return names


def summarise(scores: list[CaseScore]) -> dict[str, dict[str, float]]:
    """Per channel: case count, mean/min N-SSIM of the prediction, mean of the Gaussian baseline."""
    out: dict[str, dict[str, float]] = {}
    for channel in sorted({s.channel for s in scores}):
        mine = [s for s in scores if s.channel == channel]
        out[channel] = {
            "cases": len(mine),
            "n_ssim_mean": float(np.mean([s.n_ssim for s in mine])),
            "n_ssim_min": float(np.min([s.n_ssim for s in mine])),
            "n_ssim_gaussian_mean": float(np.mean([s.n_ssim_gaussian for s in mine])),
            "n_ssim_identity": 0.0,
        }
    return out


def run_report_entries(path: Path | None, pred_dir: Path) -> dict[str, dict[str, Any]] | None:
    """File name → entry of the inference run's JSON report (``inference.py --report``, key ``files``), read
    from ``path``, else from ``report.json`` in the predictions' folder when there is one; None without a
    report (the QC figure then says that whether the networks acted is not known)."""
    if path is None:
        path = pred_dir / "report.json"
        if not path.is_file():
            return None
    entries = json.loads(Path(path).read_text()).get("files") or []
    return {Path(str(e.get("file", ""))).name: e for e in entries if isinstance(e, dict)}


def case_note(entries: dict[str, dict[str, Any]] | None, name: str) -> str:
    """The QC figure's note on whether the networks acted on the input file ``name`` (see :func:`networks_note`):
    from its entry of the run report, or that there is no report, or that the report does not list it."""
    if entries is None:
        return NO_REPORT
    return networks_note(entries[name]) if name in entries else NOT_IN_REPORT


def evaluate(
    input_dir: Path,
    pred_dir: Path,
    gt_dir: Path,
    png: Path | None = None,
    diff: bool = False,
    report: Path | None = None,
) -> tuple[list[CaseScore], list[str]]:
    """Score every input that has a prediction and a ground truth; returns (scores, problems).

    With ``png``, also writes the QC figure there (``diff``: with a prediction − ground truth column; ``report``:
    the inference run's JSON report, for the figure's note on whether the networks acted, see
    :func:`run_report_entries`).
    """
    inputs = sorted(tiff_files(input_dir).values())
    preds, gts = tiff_files(pred_dir), tiff_files(gt_dir)
    entries = run_report_entries(report, pred_dir) if png is not None else None
    scores: list[CaseScore] = []
    problems: list[str] = []
    figure: list[CaseViews] = []
    for path in inputs:
        if "_fused" in path.name and "_angle" not in path.name:
            continue  # a ground-truth file that shares the input folder
        pred_path = preds.get(path.name)
        gt_path = next((gts[n] for n in ground_truth_name(path.name) if n in gts and gts[n] != path), None)
        if pred_path is None or gt_path is None:
            problems.append(f"{path.name}: no {'prediction' if pred_path is None else 'ground truth'} found")
            log.error("%s", problems[-1])
            continue
        try:
            score, views = score_one(path, pred_path, gt_path, png is not None)
        except (InputError, ValueError, OSError) as exc:
            problems.append(f"{path.name}: {exc}")
            log.error("%s", problems[-1])
            continue
        scores.append(score)
        if views is not None:
            figure.append(CaseViews(score=score, views=views, networks=case_note(entries, path.name)))
    if png is not None and figure:
        width, height = write_figure(png, figure, diff=diff)
        log.info(
            "QC figure (%d×%d px; per case rows XY, XZ; input | prediction | ground truth%s): %s",
            width,
            height,
            " | difference" if diff else "",
            png,
        )
    return scores, problems


def score_one(
    path: Path, pred_path: Path, gt_path: Path, views: bool
) -> tuple[CaseScore, tuple[Projections, Projections, Projections] | None]:
    """One case's scores (logged) and, with ``views``, the projections of input, prediction and ground truth."""
    started = time.perf_counter()
    inp, pred, gt = read_volume(path), read_volume(pred_path), read_volume(gt_path)
    score = score_case(path.name, inp.channel, inp.data, pred.data, gt.data)
    log.info(
        "%-40s %-8s N-SSIM %+.4f (Gaussian baseline %+.4f, input 0)  "
        "SSIM(input,GT) %.4f  SSIM(pred,GT) %.4f  [%.1f s]",
        path.name,
        score.channel,
        score.n_ssim,
        score.n_ssim_gaussian,
        score.ssim_input,
        score.ssim_pred,
        time.perf_counter() - started,
    )
    if not views:
        return score, None
    inp_v, pred_v, gt_v = (projections(v.data, inp.spacing) for v in (inp, pred, gt))
    return score, (inp_v, pred_v, gt_v)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog=program_name("fusemycells.evaluate"),
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--input", type=Path, required=True, help="folder with the single-view inputs")
    parser.add_argument("--pred", type=Path, required=True, help="folder with the predictions (same file names)")
    parser.add_argument("--gt", type=Path, required=True, help="folder with the fused ground truth")
    parser.add_argument("--json", type=Path, default=None, help="write per-case scores and the summary here")
    parser.add_argument("--png", type=Path, default=None, help="write the QC figure (PNG) here; needs matplotlib")
    parser.add_argument("--diff", action="store_true", help="add a prediction - ground truth column to the QC figure")
    parser.add_argument(
        "--report",
        type=Path,
        default=None,
        help="the inference run's JSON report (inference.py --report), for the QC figure's note on whether the "
        "networks acted on each case (default: report.json in --pred when there is one)",
    )
    args = parser.parse_args(argv)
    configure_logging()
    for name in ("input", "pred", "gt"):
        if not getattr(args, name).is_dir():
            log.error("--%s %s is not a folder", name, getattr(args, name))
            return 2
    if args.diff and args.png is None:
        log.error("--diff draws a column of the QC figure: give --png FILE too")
        return 2
    if args.png is not None:
        try:
            require_matplotlib()
        except ImportError as exc:
            log.error("%s", exc)
            return 2
    scores, problems = evaluate(args.input, args.pred, args.gt, args.png, args.diff, args.report)
    summary = summarise(scores)
    for channel, s in summary.items():
        print(
            f"{channel:9s} cases {s['cases']:3d}  N-SSIM mean {s['n_ssim_mean']:+.4f} "
            f"(min {s['n_ssim_min']:+.4f})  Gaussian {s['n_ssim_gaussian_mean']:+.4f}  identity +0.0000"
        )
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(
            json.dumps({"cases": [s.as_dict() for s in scores], "summary": summary, "problems": problems}, indent=1)
        )
    if not scores:
        log.error("nothing scored")
        return 2
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main())
