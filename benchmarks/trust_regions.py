#!/usr/bin/env python3
"""Region-wise trust: fall back to networks off where the stack has little foreground (issue #24, item 1).

    python benchmarks/trust_regions.py --rows ROWS.json --set NAME=ROOT[:N] [--set ...] --cache DIR
        --scores OUT.json

``ROWS.json``, ``--set``, ``--cache``: as for ``benchmarks/trust_signals.py`` (a ``trust_study.py
--json`` run and its cache). Per case it scores, from the cached network outputs and with the
container's own blend and output filter (``trust_study.Scorer``, both SSIM conventions), the weight map
times a region factor on the diff grid: ``fg`` (:func:`foreground_map`: 0 where little of the
neighbourhood is foreground, as XUShengyan's submission fell back to the input on tiles with little
foreground), ``fgagree`` (that times the stage agreement map, ``trust.agreement_map``) and the agreement
map alone, at factors ¼, ½ and 1; scores are kept in ``OUT.json`` (a rerun scores only new cases). Then it
prints, per channel, each constant region policy's held-out-free figures per family (mean / worst
benefit over networks off), the ceiling of a perfect case-level choice with and without the region
keys (``training.trust_calibration.ceiling``) and the leave-one-family-out calibration with the region keys
offered (:mod:`training.calibrate_trust`'s search and priors).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

sys.path.insert(0, str(Path(__file__).resolve().parent))
import trust_study as ts  # noqa: E402  (a sibling script; it puts the repository on sys.path)

from fusemycells import trust  # noqa: E402
from fusemycells.config import DEFAULT_RESOURCES, TrustSpec  # noqa: E402
from training import calibrate_trust as ct  # noqa: E402
from training import trust_calibration as cal  # noqa: E402

REGION_KEYS = ("fg@0.25", "fgagree@0.25", "fg@0.5", "fgagree@0.5", "fg@1", "fgagree@1", "agreement@0.5", "agreement@1")


def foreground_map(
    coarse: np.ndarray, level: float = 0.1, sigma: float = 2.0, low: float = 0.15, high: float = 0.45
) -> np.ndarray:
    """Region factor in [0, 1] on the diff grid (ZYX float32): the fraction of the neighbourhood (Gaussian
    of σ ``sigma`` grid voxels) whose normalised input is above ``level``, mapped linearly from ``low``
    (factor 0: little foreground, networks off there) to ``high`` (factor 1)."""
    local = ndimage.gaussian_filter((np.asarray(coarse) > level).astype(np.float32), sigma, mode="nearest")
    return np.clip((local - low) / (high - low), 0.0, 1.0).astype(np.float32)


def score_regions(fuser: Any, case: ts.Case, artefacts: dict[str, np.ndarray]) -> dict[str, list[float]]:
    """N-SSIM (uniform window, Gaussian window) of the output per key of :data:`REGION_KEYS`."""
    scorer = ts.Scorer(fuser, case, artefacts["correction"])
    weight = artefacts["weight"]
    grid = weight.shape
    coarse, p1 = trust.on_grid(artefacts["coarse"], grid, ts.OPS), trust.on_grid(artefacts["p1"], grid, ts.OPS)
    agree = trust.agreement_map(p1 - coarse, trust.coarse_correction(artefacts["correction"], grid, ts.OPS), TrustSpec().region_sigma)
    fg = foreground_map(coarse)
    maps = {"fg": fg, "fgagree": fg * agree, "agreement": agree}
    out = {}
    for key in REGION_KEYS:
        region, gate = key.split("@")
        out[key] = list(scorer.score(np.float32(float(gate)) * weight * maps[region]))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=Path, required=True)
    parser.add_argument("--set", action="append", required=True, metavar="NAME=ROOT[:N]")
    parser.add_argument("--cache", type=Path, required=True)
    parser.add_argument("--resources", type=Path, default=DEFAULT_RESOURCES)
    parser.add_argument("--scores", type=Path, required=True, help="read/write the region scores here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    rows = json.loads(args.rows.read_text())
    scores: dict[str, dict[str, list[float]]] = json.loads(args.scores.read_text()) if args.scores.is_file() else {}
    missing = [r for r in rows if f"{r['set']}/{r['case']}" not in scores]
    keys = ("correction", "weight", "coarse", "p1")
    for r, case, artefacts in ts.cached_artefacts(missing, args.set, args.cache, args.resources, keys, threads=1):
        scores[f"{r['set']}/{r['case']}"] = score_regions(ts._WORKER["fuser"], case, artefacts)
        args.scores.write_text(json.dumps(scores))
    for r in rows:
        for key, (uniform, gaussian) in scores[f"{r['set']}/{r['case']}"].items():
            r["n_ssim"][key], r["n_ssim_gaussian_window"][key] = uniform, gaussian
    offered = ct.TRUST_KEYS + REGION_KEYS[:4]
    for channel in ("nucleus", "membrane"):
        mine = [r for r in rows if r["channel"] == channel]
        print(f"\n{channel}: constant policies, benefit over networks off per family: mean / worst case")
        for key in (*ct.TRUST_KEYS, *REGION_KEYS):
            fams: dict[str, list[float]] = {}
            for r in mine:
                fams.setdefault(cal.family_of(r["set"]), []).append(r["n_ssim"][key] - r["n_ssim"]["none@0"])
            means = [np.mean(v) for v in fams.values()]
            cells = "  ".join(f"{f} {np.mean(v):+.3f}/{min(v):+.3f}" for f, v in sorted(fams.items()))
            print(f"  {key:<15} {cells}  | families' mean {np.mean(means):+.3f}")
        for keys, name in ((ct.TRUST_KEYS, "shipped keys"), (offered, "with the region keys")):
            print(f"  ceiling ({name}): " + " ".join(f"{k} {v:+.3f}" for k, v in cal.ceiling(mine, keys).items()))
        search = cal.Search(
            keys=offered, signals=ct.SEARCH_SIGNALS, directions=ct.DIRECTIONS,
            required=(cal.Condition("noise", True, ct.CLEAN_NOISE),),
        )  # fmt: skip
        plain = cal.leave_one_family_out(mine, search, guard=False, margin=0.03, buffer=0.25)
        mean, worst_family, worst_case = plain.loso()
        holds = mean >= 0.002 and worst_family >= 0.0 and worst_case >= -0.03
        print(
            f"  calibrated with the region keys: fit {plain.fitted.describe()}; held out: mean {mean:+.3f}, worst "
            f"family {worst_family:+.3f}, worst case {worst_case:+.3f}: ships {(plain.fitted if holds else cal.OFF).describe()}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
