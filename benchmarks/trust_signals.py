#!/usr/bin/env python3
"""Does "how degraded is this stack" (from the input alone) help the trust decide? (issue #24, item 1)

    python benchmarks/trust_signals.py --rows ROWS.json --set NAME=ROOT[:N] [--set ...] --cache DIR
        [--signals OUT.json] [--channel nucleus|membrane]

``ROWS.json``: the per-case rows of ``benchmarks/trust_study.py --json`` (their N-SSIM per policy);
``--set`` / ``--cache``: the same sets and cache as that run (the cached ``coarse`` and ``p1`` arrays).
Per case it measures candidate degradation signals (:func:`candidates`) on the high-resolution grid H
(isotropic: the input resampled to the channel's target spacing, as the patch network sees it) and on
the weight map's coarse grid, then runs the leave-one-family-out calibration of
:mod:`training.calibrate_trust` with
the shipped signals alone and with each candidate group added, with and without the two priors (no
trust because the noise is small; never correct a clean stack), and prints what each fit ships and
its held-out figures. Nothing is written to the manifest: a candidate earns a place in
:mod:`fusemycells.trust` only if it changes the held-out figures (docs/quality.md).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

sys.path.insert(0, str(Path(__file__).resolve().parent))
import trust_study as ts  # noqa: E402  (a sibling script; it puts the repository on sys.path)

from fusemycells.config import DEFAULT_RESOURCES  # noqa: E402
from fusemycells.preprocess import ResizedSource  # noqa: E402
from fusemycells.sources import materialise  # noqa: E402
from training import calibrate_trust as ct  # noqa: E402
from training import trust_calibration as cal  # noqa: E402

GROUPS = {
    "shipped signals": (),
    "+ high-frequency share on H": ("H_hf", "H_band"),
    "+ axial vs lateral sharpness on H": ("H_axlat", "H_minmax"),
    "+ fall of sharpness along the worst axis (H)": ("H_fall", "H_fallz"),
    "+ stage-1 change vs noise": ("s1_to_noise", "s1_rel"),
}
"""Candidate groups added to :data:`training.calibrate_trust.SEARCH_SIGNALS`, one at a time."""


def candidates(x: np.ndarray, level: float = 0.1) -> dict[str, float]:
    """Degradation estimates of a normalised ZYX volume on an isotropic grid (dimensionless), over its
    foreground (``x`` > ``level``): ``hf`` Σ(x − G₁x)²/Σx² (G σ in voxels), ``band`` the same for
    G₀.₇x − G₂x (less noise); ``axlat`` the gradient energy along Z over the mean of Y and X (of G₀.₇x:
    below 1 when Z is blurred), ``minmax`` the least over the largest axis' energy; ``fall`` the largest
    over the three axes of |log| (lateral gradient energy / signal energy) between the first and last
    third of the foreground along that axis (a light sheet's far side is blurrier), ``fallz`` along Z."""
    x = np.asarray(x, dtype=np.float32)
    fg = (x > level).astype(np.float32)
    smooth = ndimage.gaussian_filter(x, 0.7, mode="nearest")
    total = float((x * x * fg).sum(dtype=np.float64)) + 1e-9
    out = {
        "hf": float((np.square(x - ndimage.gaussian_filter(x, 1.0, mode="nearest")) * fg).sum(dtype=np.float64)) / total,
        "band": float((np.square(smooth - ndimage.gaussian_filter(x, 2.0, mode="nearest")) * fg).sum(dtype=np.float64))
        / total,
    }
    grads = [np.square(np.gradient(smooth, axis=a)) for a in range(3)]
    energy = [float((g * fg).sum(dtype=np.float64)) / total for g in grads]
    out["axlat"] = energy[0] / max((energy[1] + energy[2]) / 2.0, 1e-12)
    out["minmax"] = min(energy) / max(max(energy), 1e-12)
    falls = []
    for axis in range(3):
        others = tuple(b for b in range(3) if b != axis)
        lateral = sum(grads[b] for b in others) * fg
        e, t = lateral.sum(axis=others, dtype=np.float64), (x * x * fg).sum(axis=others, dtype=np.float64)
        count = fg.sum(axis=others, dtype=np.float64)
        cumulative = np.cumsum(count) / max(float(count.sum()), 1.0)
        first, last = cumulative <= 1.0 / 3.0, cumulative > 2.0 / 3.0
        a = float(e[first].sum()) / max(float(t[first].sum()), 1e-9)
        b = float(e[last].sum()) / max(float(t[last].sum()), 1e-9)
        falls.append(abs(math.log(max(a, 1e-12) / max(b, 1e-12))))
    out["fall"], out["fallz"] = max(falls), falls[0]
    return out


def case_candidates(fuser: Any, case: ts.Case, artefacts: dict[str, np.ndarray], noise: float) -> dict[str, float]:
    """:func:`candidates` on H (prefixed 'H_') plus the stage-1 change over the noise ('s1_to_noise') and
    over the input ('s1_rel'), rms over the coarse grid's foreground."""
    prepared, _ = ts.prepare(fuser, case)
    x_h = materialise(ResizedSource(prepared.x_in, prepared.grid_h, ops=prepared.ops))
    out = {f"H_{k}": v for k, v in candidates(x_h).items()}
    coarse, p1 = artefacts["coarse"], artefacts["p1"]
    fg = coarse > 0.1
    change = float(np.sqrt(np.mean(np.square(p1 - coarse, dtype=np.float64)[fg]))) if fg.any() else 0.0
    out["s1_to_noise"] = change / max(noise, 1e-4)
    out["s1_rel"] = change / max(float(np.sqrt(np.mean(np.square(coarse, dtype=np.float64)[fg]))), 1e-9) if fg.any() else 0.0
    return out


def compare(rows: list[dict[str, Any]], channel: str) -> list[str]:
    """One line per (candidate group, priors): the fit on all families, what the guard ships, and the
    unguarded leave-one-family-out figures (mean, worst family, worst case) of the channel's rows."""
    mine = [r for r in rows if r["channel"] == channel]
    lines = []
    for name, extra in GROUPS.items():
        for priors in (True, False):
            required = (cal.Condition("noise", True, ct.CLEAN_NOISE),) if priors else ()
            search = cal.Search(
                keys=ct.TRUST_KEYS,
                signals=ct.SEARCH_SIGNALS + extra,
                directions=ct.DIRECTIONS if priors else {},
                required=required,
            )
            plain = cal.leave_one_family_out(mine, search, guard=False, margin=0.03, buffer=0.25)
            mean, worst_family, worst_case = plain.loso()
            holds = mean >= 0.002 and worst_family >= 0.0 and worst_case >= -0.03  # the guard of leave_one_family_out
            lines.append(
                f"{channel}\t{name}\t{'priors' if priors else 'no priors'}\tfit: {plain.fitted.describe()}\t"
                f"ships: {(plain.fitted if holds else cal.OFF).describe()}\theld out: mean {mean:+.3f}, "
                f"worst family {worst_family:+.3f}, worst case {worst_case:+.3f}"
            )
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=Path, required=True, help="trust_study.py --json output")
    parser.add_argument("--set", action="append", required=True, metavar="NAME=ROOT[:N]")
    parser.add_argument("--cache", type=Path, required=True, help="trust_study.py's cache folder")
    parser.add_argument("--resources", type=Path, default=DEFAULT_RESOURCES)
    parser.add_argument("--signals", type=Path, default=None, help="read/write the measured candidates here")
    parser.add_argument("--channel", choices=["nucleus", "membrane"], action="append", default=None)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    rows = json.loads(args.rows.read_text())
    measured: dict[str, dict[str, float]] = {}
    if args.signals is not None and args.signals.is_file():
        measured = json.loads(args.signals.read_text())
    missing = [r for r in rows if f"{r['set']}/{r['case']}" not in measured]
    for r, case, artefacts in ts.cached_artefacts(missing, args.set, args.cache, args.resources, ("coarse", "p1"), threads=2):
        measured[f"{r['set']}/{r['case']}"] = case_candidates(ts._WORKER["fuser"], case, artefacts, r["noise"])
    if missing and args.signals is not None:
        args.signals.write_text(json.dumps(measured, indent=1))
    for r in rows:
        r["signals"] = {**r["signals"], **measured[f"{r['set']}/{r['case']}"]}
    names = [n for extra in GROUPS.values() for n in extra]
    print("signal\tSpearman rho with the benefit of ½ (nucleus) / ¼ (membrane) over networks off")
    for channel, key in (("nucleus", "none@0.5"), ("membrane", "none@0.25")):
        corr = ts.correlations([r for r in rows if r["channel"] == channel], names, key)
        print(channel + "\t" + "  ".join(f"{n} {corr[n][1]:+.2f}" for n in names))
    for channel in args.channel or ["nucleus", "membrane"]:
        print("\n".join(compare(rows, channel)), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
