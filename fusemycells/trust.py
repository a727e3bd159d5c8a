"""Per-case (and per-region) trust in the network correction, decided from each case's own data.

The networks' correction (prediction − input) enters the output as ``w · factor · correction``, where
``w`` is the difference weight map (:func:`fusemycells.postprocess.blend_weight`). With trust off the
factor is the manifest's constant gate (``postprocess.gate_knots`` over the input's noise). With
trust on (``TrustSpec.mode == 'case'``) it is computed per case from *signals* measured on the
case's own data, and optionally multiplied per region by the local agreement of the two stages.

Signals (dimensionless), measured on the weight map's coarse grid (``postprocess.diff_grid``, which
spans the whole stack like the global grid; ``fg`` = its voxels where the normalised input >
``foreground``):

* ``noise`` — the input's relative noise (:func:`fusemycells.postprocess.relative_noise`).
* ``corr_to_noise`` — rms of the stage-2 correction over fg / noise.
* ``s12_corr`` — Pearson correlation over fg of the stage-1 correction (p1 − input, from the global
  grid) and the stage-2 correction (from H): do the two networks agree on what to change?
* ``s12_ratio`` — rms(stage-2 correction) / rms(stage-1 correction) over fg.
* ``corr_rel`` — rms of the stage-2 correction over fg / rms of the normalised input there.
* ``hf``, ``asym`` — the case's own degradation, from the input alone (:func:`degradation_signals`):
  the high-frequency share of the foreground's signal, and how much it differs between the two ends
  of the stack along its worst axis (light-sheet depth blur and attenuation).

The case factor is the minimum over the spec's rules of ``interp(signal, knots)`` (knots as in
``gate_knots``: (signal value, factor) pairs, held at the ends), clipped to [0, 1]. The region
factor (``region == 'agreement'``) is ``clip(G(c1·c2) / G(c2²), 0, 1)`` on the coarse grid (G a
Gaussian of σ ``region_sigma`` voxels): the part of the stage-2 correction c2 that the stage-1
correction c1 backs up, locally. The stage-2 correction resized to the coarse grid is the input
of the weight map too: it is computed once (:attr:`TrustDecision.coarse_correction`), so what trust
adds is a few filters on that grid (no network forward). The rules are
measured on simulated tuning families by ``benchmarks/trust_study.py`` and calibrated by
``python -m training.calibrate_trust``, leave one family out (docs/quality.md).

All arrays are float32 ZYX; H is the patch network's high-resolution grid, the global grid that of
stage 1 (see :mod:`fusemycells.pipeline`).
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy import ndimage

from fusemycells.config import TRUST_SIGNALS, TrustSpec
from fusemycells.ops import Ops
from fusemycells.preprocess import resize, resize_through
from fusemycells.sources import PlaneSource

SIGNALS = TRUST_SIGNALS
"""The signals a rule may name (see the module doc)."""
MIN_FOREGROUND = 64
"""Fewer foreground voxels than this on the global grid: the signals use every voxel instead."""


def coarse_correction(correction: PlaneSource | np.ndarray, grid: Sequence[int], ops: Ops) -> np.ndarray:
    """The stage-2 correction (ZYX, on H) resized to ``grid`` (the diff grid, voxels), read in z-ranges, the
    resize run on ``ops`` (see :func:`fusemycells.preprocess.resize_through`).

    The same resize as :func:`fusemycells.postprocess.correction_weight`, so the weight map computed
    from this array equals the one computed from the correction itself (a same-shape resize is exact).
    """
    return resize_through(correction, [grid], ops)


def on_grid(volume: np.ndarray, grid: Sequence[int], ops: Ops) -> np.ndarray:
    """A ZYX array resized to ``grid`` (voxels) on ``ops`` (itself when it is already that shape)."""
    shape = tuple(int(n) for n in grid)
    return volume if volume.shape == shape else resize(volume, shape, ops)


def foreground_mask(coarse: np.ndarray, level: float) -> np.ndarray:
    """Voxels of the normalised input (ZYX, global grid) above ``level``; all voxels when too few are."""
    mask = coarse > level
    return mask if int(mask.sum()) >= MIN_FOREGROUND else np.ones(coarse.shape, dtype=bool)


def _rms(values: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.square(values, dtype=np.float64)))) if values.size else 0.0


def _ratio(a: float, b: float) -> float:
    return a / b if b > 1e-9 else 0.0


def degradation_signals(coarse: np.ndarray, mask: np.ndarray) -> dict[str, float]:
    """How far the case looks from clean, from the normalised input alone (ZYX, diff grid, ``mask``
    its foreground): ``hf`` the high-frequency share of the foreground's signal, Σ(x − G₁x)² / Σx²
    (G₁ a Gaussian of σ 1 grid voxel; blur lowers it); ``asym`` the largest |log| ratio over the three
    axes of that share between the first and the last third of the foreground along the axis (a light
    sheet's depth-dependent blur and attenuation make one side worse; a clean stack has ~0)."""
    x = np.asarray(coarse, dtype=np.float32)
    weight = mask.astype(np.float32)
    high = np.square(x - ndimage.gaussian_filter(x, 1.0, mode="nearest")) * weight
    total = np.square(x) * weight
    hf = _ratio(float(high.sum(dtype=np.float64)), float(total.sum(dtype=np.float64)))
    asym = 0.0
    for axis in range(3):
        others = tuple(a for a in range(3) if a != axis)
        count = weight.sum(axis=others, dtype=np.float64)
        if count.sum() <= 0:
            continue
        cumulative = np.cumsum(count) / count.sum()
        first, last = cumulative <= 1.0 / 3.0, cumulative > 2.0 / 3.0
        e, t = high.sum(axis=others, dtype=np.float64), total.sum(axis=others, dtype=np.float64)
        a, b = _ratio(float(e[first].sum()), float(t[first].sum())), _ratio(float(e[last].sum()), float(t[last].sum()))
        if a > 0 and b > 0:
            asym = max(asym, abs(math.log(a / b)))
    return {"hf": hf, "asym": asym}


def case_signals(
    noise: float,
    coarse: np.ndarray,
    p1: np.ndarray,
    c2: np.ndarray,
    mask: np.ndarray,
) -> dict[str, float]:
    """The case's trust signals (see the module doc) from arrays on one coarse grid (ZYX).

    ``coarse``: the normalised input, ``p1``: the stage-1 prediction, ``c2``: the stage-2 correction
    (:func:`coarse_correction`), ``mask``: :func:`foreground_mask`.
    """
    c1 = (p1 - coarse)[mask].astype(np.float64)
    c2m = c2[mask].astype(np.float64)
    n = max(c1.size, 1)
    m1, m2 = c1.sum() / n, c2m.sum() / n
    s11, s22, s12 = float(c1 @ c1) / n, float(c2m @ c2m) / n, float(c1 @ c2m) / n  # raw second moments
    rms1, rms2 = math.sqrt(s11), math.sqrt(s22)
    var1, var2 = s11 - m1 * m1, s22 - m2 * m2
    return {
        "noise": float(noise),
        "corr_to_noise": _ratio(rms2, max(noise, 1e-4)),
        "s12_corr": float(np.clip((s12 - m1 * m2) / math.sqrt(var1 * var2), -1.0, 1.0))
        if min(var1, var2) > 1e-18
        else 0.0,
        "s12_ratio": _ratio(rms2, rms1),
        "corr_rel": _ratio(rms2, _rms(coarse[mask])),
        **degradation_signals(coarse, mask),
    }


def rule_factor(value: float, knots: Sequence[tuple[float, float]]) -> float:
    """``knots`` (increasing signal values, factor) interpolated at ``value``, held at the ends, in [0, 1]."""
    xs, ys = [k[0] for k in knots], [k[1] for k in knots]
    return float(np.clip(np.interp(value, xs, ys), 0.0, 1.0))


def case_factor(
    signals: Mapping[str, float], rules: Mapping[str, Sequence[tuple[float, float]]]
) -> tuple[float, dict[str, float]]:
    """(The minimum over ``rules`` of :func:`rule_factor`, each rule's factor); 1 without rules.

    A rule naming a signal that was not measured raises KeyError (the spec asks for what it needs).
    """
    each = {name: rule_factor(signals[name], knots) for name, knots in rules.items()}
    return (min(each.values()) if each else 1.0), each


def agreement_map(c1: np.ndarray, c2: np.ndarray, sigma: float) -> np.ndarray:
    """Local factor in [0, 1]: ``clip(G(c1·c2) / G(c2²), 0, 1)``, G a Gaussian of σ ``sigma`` voxels.

    ``c1``, ``c2``: the stage-1 and stage-2 corrections on the same grid (ZYX). 1 where stage 1
    proposes the same change (or more), 0 where it proposes none or the opposite.
    """
    num = ndimage.gaussian_filter(c1 * c2, sigma, mode="nearest")
    den = ndimage.gaussian_filter(c2 * c2, sigma, mode="nearest")
    out = np.zeros(c2.shape, dtype=np.float32)
    np.divide(num, den, out=out, where=den > 1e-12)
    return np.clip(out, 0.0, 1.0, out=out)


def never(spec: TrustSpec) -> bool:
    """Whether ``spec`` gives factor 0 whatever the signals (a rule whose knots are all 0): the networks
    need not run."""
    return spec.mode == "case" and any(all(k[1] <= 0.0 for k in knots) for _, knots in spec.rules)


@dataclass
class TrustDecision:
    """What trust decided for one case (the report's ``trust`` entry) and the region factor."""

    mode: str
    factor: float  # the case factor on the correction, 0..1
    region: np.ndarray | None = None  # the region factor on the diff grid (ZYX), None: uniform
    coarse_correction: np.ndarray | None = None  # the stage-2 correction on the diff grid (for the weight map)
    signals: dict[str, float] = field(default_factory=dict)
    rules: dict[str, float] = field(default_factory=dict)  # each rule's factor
    seconds: dict[str, float] = field(default_factory=dict)  # cost per part
    why: str = ""  # mode 'fallback': why the constant gate was used

    def summary(self) -> str:
        """One log line: the factor, each rule's signal and factor, the region factor's mean."""
        if self.mode != "case":
            return f"{self.mode}: constant factor {self.factor:.3f}{f' ({self.why})' if self.why else ''}"
        rules = ", ".join(f"{k} {self.signals[k]:.3g} → {v:.2f}" for k, v in self.rules.items())
        region = "" if self.region is None else f", region factor mean {float(self.region.mean()):.2f}"
        return f"factor {self.factor:.3f} ({rules}){region}"

    def as_report(self) -> dict[str, Any]:
        """The JSON report entry (no arrays: the region factor as statistics over its grid)."""
        if self.mode != "case":
            return {"mode": self.mode, "factor": round(self.factor, 4), "why": self.why}
        entry: dict[str, Any] = {
            "mode": self.mode,
            "factor": round(self.factor, 4),
            "signals": {k: round(v, 5) for k, v in self.signals.items()},
            "rules": {k: round(v, 4) for k, v in self.rules.items()},
            "seconds": {k: round(v, 3) for k, v in self.seconds.items()},
        }
        if self.region is not None:
            entry["region_mean"] = round(float(self.region.mean()), 4)
            entry["region_below_half"] = round(float((self.region < 0.5).mean()), 4)
        return entry


def decide(
    spec: TrustSpec,
    noise: float,
    coarse: np.ndarray,
    p1: np.ndarray,
    correction: np.ndarray,
    grid: Sequence[int],
    *,
    ops: Ops,
) -> TrustDecision:
    """The trust decision of one case (``spec.mode`` must be 'case'): no network forward.

    ``coarse``, ``p1``: the normalised input and the stage-1 prediction on the global grid;
    ``correction``: the stage-2 correction on H (ZYX); ``grid``: the weight map's diff grid, where
    the signals are measured; ``ops``: where the correction's resize to ``grid`` runs (the
    pipeline's, as for the weight map).
    """
    seconds: dict[str, float] = {}
    started = time.perf_counter()
    c2 = coarse_correction(correction, grid, ops)  # reused by the weight map: not a cost of trust
    seconds["coarse_correction"] = time.perf_counter() - started
    started = time.perf_counter()
    x_d, p1_d = on_grid(coarse, grid, ops), on_grid(p1, grid, ops)
    signals = case_signals(noise, x_d, p1_d, c2, foreground_mask(x_d, spec.foreground))
    factor, rules = case_factor(signals, dict(spec.rules))
    region = agreement_map(p1_d - x_d, c2, spec.region_sigma) if spec.region == "agreement" and factor > 0 else None
    seconds["signals"] = time.perf_counter() - started
    return TrustDecision(spec.mode, factor, region, c2, signals, rules, seconds)
