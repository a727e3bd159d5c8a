#!/usr/bin/env python3
"""Why the networks at full weight collapse on the independent simulator's nuclei (issue #24, item 1).

    python benchmarks/collapse_study.py --set NAME=ROOT [--set NAME=ROOT ...] --cache DIR
        [--resources DIR] [--json FILE] [--reference NAME]

Each ROOT is a set written by ``benchmarks/crosscheck_sim.py`` (optionally with ``--force``: the
ablation sets; same seed and case count as the reference set, so case i of every set is the same
specimen with one factor changed). Per case, with ``benchmarks/trust_study.py``'s cached network
outputs (the container's own steps, ungated) and its scorer: N-SSIM of the output the container
writes at gate 0 (networks off) and gate 1 (full weight), the drawn parameters (``params.json``) and
figures of what the correction does, on the input grid after the metric's 2/99.8 normalisation
(d = full − off, e = GT − off): ``toward`` cos(d, e) (< 0: away from the truth), ``bg_shift`` /
``fg_shift`` mean d where the GT is background (< 0.05) / bright (> 0.3), ``sharp_<axis>`` the mean
absolute gradient along Z, Y, X of full / off / GT, ``near_far`` mean |d| in the half of the light
axis where the light enters over the far half.

Prints per set the mean N-SSIM off / full / full − off (and, with ``--reference``, the paired change
of full − off against the reference set's same case), then the Spearman ρ of full − off with every
numeric parameter over all cases. Never use these sets for training or tuning.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

import numpy as np
from scipy import stats

REPO = Path(__file__).resolve().parent.parent
for path in (REPO, REPO / "benchmarks"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

import trust_study as ts  # noqa: E402

from fusemycells import postprocess  # noqa: E402
from fusemycells.config import DEFAULT_RESOURCES  # noqa: E402
from fusemycells.evaluation.metrics import metric_normalise, n_ssim, ssim  # noqa: E402
from fusemycells.io.tiff import read_volume  # noqa: E402
from fusemycells.sources import materialise  # noqa: E402

log = logging.getLogger("collapse_study")
AXES = "ZYX"


def container_output(scorer: ts.Scorer, weight: np.ndarray | None) -> np.ndarray:
    """The float32 ZYX output ``inference.py`` writes for the blend ``weight`` (None: networks off)."""
    case = scorer.case
    blended = case.x_in if weight is None else postprocess.blend_slabs(case.data, case.x_in, scorer.correction, weight, compact=False, ops=case.ops)
    return materialise(postprocess.final_source(blended, case.post, "float32", spacing=case.spacing, ops=case.ops))


def mean_abs_gradient(a: np.ndarray, axis: int) -> float:
    """Mean |difference of neighbours| along ``axis`` of a ZYX array (per voxel step)."""
    return float(np.abs(np.diff(a, axis=axis)).mean())


def flatten(params: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """Numeric scalars of a nested params.json record, keys ``section.name`` (booleans as 0/1, vectors as their norm)."""
    out: dict[str, float] = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, name + "."))
        elif isinstance(value, bool):
            out[name] = float(value)
        elif isinstance(value, (int, float)):
            out[name] = float(value)
        elif isinstance(value, list) and value and all(isinstance(v, (int, float)) for v in value) and len(value) <= 3:
            out[name] = float(np.linalg.norm(value)) if key == "shift_um" else float(value[0])
    return out


def mechanism(off: np.ndarray, full: np.ndarray, gt: np.ndarray, axis: int, from_low: bool) -> dict[str, float]:
    """Figures of the correction (metric-normalised ZYX arrays off, full, gt; light along ``axis`` from the low side if ``from_low``)."""
    d, e = full - off, gt - off
    out = {"toward": float((d * e).sum() / (np.linalg.norm(d) * np.linalg.norm(e) + 1e-12))}
    bg, fg = gt < 0.05, gt > 0.3
    out["bg_shift"] = float(d[bg].mean()) if bg.any() else float("nan")
    out["fg_shift"] = float(d[fg].mean()) if fg.any() else float("nan")
    for a, name in enumerate(AXES):
        g = mean_abs_gradient(gt, a)
        out[f"sharp_{name}_full"] = mean_abs_gradient(full, a) / (g + 1e-12)
        out[f"sharp_{name}_off"] = mean_abs_gradient(off, a) / (g + 1e-12)
    half = d.shape[axis] // 2
    near, far = np.split(np.abs(d), [half], axis=axis)
    if not from_low:
        near, far = far, near
    out["near_far"] = float(near.mean() / (far.mean() + 1e-12))
    return out


def case_figures(fuser, case: ts.Case, cache: Path, params: dict[str, Any]) -> dict[str, Any]:
    """One case: scores at gates 0 and 1, flattened parameters and :func:`mechanism` figures (cached as JSON)."""
    path = ts.artefact_path(cache, case).with_suffix(".collapse.json")
    if path.is_file():
        return json.loads(path.read_text())
    artefacts = ts.load_or_compute(fuser, case, cache)
    scorer = ts.Scorer(fuser, case, artefacts["correction"])
    gt = scorer.gt
    outputs = {"off": container_output(scorer, None), "full": container_output(scorer, artefacts["weight"])}
    scores = {k: n_ssim(ssim(metric_normalise(v), gt), scorer.ssim_input[0]) for k, v in outputs.items()}  # uniform 7³
    x = metric_normalise(read_volume(case.input_path).data)
    optics = params.get("optics", {})
    row = {
        "set": case.set_name,
        "case": case.name,
        "off": scores["off"],
        "full": scores["full"],
        "ssim_input": scorer.ssim_input,
        "mech": mechanism(metric_normalise(outputs["off"]), metric_normalise(outputs["full"]), gt, int(optics.get("axis", 0)), bool(optics.get("from_low", True))),
        "input_vs_gt_bg": float(x[gt < 0.05].mean()) if (gt < 0.05).any() else float("nan"),
        "params": flatten(params),
        "kind": params.get("kind"),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(row))
    log.info("[%s/%s] off %.3f full %.3f", case.set_name, case.name, row["off"], row["full"])
    return row


def summary(rows: list[dict[str, Any]], reference: str | None) -> str:
    """Per-set means and paired differences; Spearman ρ of (full − off) with each parameter and mechanism figure."""
    lines = ["| set | n | off | full | full − off (mean) | worst | paired Δ(full − off) vs reference |", "|---|---|---|---|---|---|---|"]
    by_set: dict[str, dict[str, dict[str, Any]]] = {}
    for r in rows:
        by_set.setdefault(r["set"], {})[r["case"]] = r
    ref = by_set.get(reference or "", {})
    for name, cases in by_set.items():
        diff = [c["full"] - c["off"] for c in cases.values()]
        paired = [(c["full"] - c["off"]) - (ref[k]["full"] - ref[k]["off"]) for k, c in cases.items() if k in ref]
        cell = f"{np.mean(paired):+.3f} (n {len(paired)})" if paired and name != reference else ""
        lines.append(
            f"| {name} | {len(cases)} | {np.mean([c['off'] for c in cases.values()]):.3f} | {np.mean([c['full'] for c in cases.values()]):.3f} | "
            f"{np.mean(diff):+.3f} | {min(diff):+.3f} | {cell} |"
        )
    benefit = np.array([r["full"] - r["off"] for r in rows])
    keys = sorted({k for r in rows for k in r["params"]} | {f"mech.{k}" for r in rows for k in r["mech"]})
    rhos = []
    for key in keys:
        vals = np.array([r["mech"].get(key[5:], np.nan) if key.startswith("mech.") else r["params"].get(key, np.nan) for r in rows], dtype=float)
        ok = np.isfinite(vals)
        if ok.sum() >= 6 and np.ptp(vals[ok]) > 0:
            rho = stats.spearmanr(vals[ok], benefit[ok])[0]
            rhos.append((abs(rho), key, rho, int(ok.sum())))
    lines += ["", "| parameter | Spearman ρ with full − off | n |", "|---|---|---|"]
    lines += [f"| {key} | {rho:+.2f} | {n} |" for _, key, rho, n in sorted(rhos, reverse=True)[:25]]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--set", action="append", required=True, metavar="NAME=ROOT")
    parser.add_argument("--cache", type=Path, required=True, help="network outputs (shared with trust_study.py)")
    parser.add_argument("--resources", type=Path, default=DEFAULT_RESOURCES)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--reference", default=None, help="set whose same-index cases the others are paired with")
    parser.add_argument("--channel", default="nucleus", choices=["nucleus", "membrane"])
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)-7s %(message)s", datefmt="%H:%M:%S")
    ts._init_worker(args.resources, args.threads, "auto")
    fuser = ts._WORKER["fuser"]
    rows = []
    for name, (root, count) in ts.parse_sets(args.set).items():
        listed = root / "params.json"  # crosscheck_sim.py's drawn parameters (other sets: none)
        params = {c["file"]: c for c in json.loads(listed.read_text())} if listed.is_file() else {}
        for case in ts.find_cases(name, root, count):
            if case.channel == args.channel:
                rows.append(case_figures(fuser, case, args.cache, params.get(case.name, {})))
    text = summary(rows, args.reference)
    print(text)
    if args.json is not None:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
