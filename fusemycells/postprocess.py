"""Difference-weighted blending and output normalisation (Wodzinski & Müller, arXiv 2503.16075).

The network should change only what needs changing. A weight map w ∈ [0, 1] is derived from
|input − prediction| on a coarse grid (resize → max filter → Gaussian → percentile scaling,
clipped), and the output is ``input·(1 − w) + prediction·w``. All arrays are float32 ZYX.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage

from .config import PostprocessSpec
from .preprocess import percentile_normalise, percentiles, resize


def difference_weight(inp: np.ndarray, pred: np.ndarray, spec: PostprocessSpec) -> np.ndarray:
    """Weight map on ``spec.diff_grid`` (voxels) from |inp − pred| (same-shape ZYX arrays).

    Both arrays are resized to the coarse grid first, so the full-size difference is never held.
    """
    coarse = np.abs(resize(inp, spec.diff_grid) - resize(pred, spec.diff_grid))
    if spec.max_filter > 1:
        coarse = ndimage.maximum_filter(coarse, size=spec.max_filter, mode="nearest")
    if spec.sigma > 0:
        coarse = ndimage.gaussian_filter(coarse, sigma=spec.sigma, mode="nearest")
    low, high = spec.weight_percentiles
    lo, hi = percentiles(coarse, low, high)
    if hi - lo < 1e-8:
        # flat difference map: nothing stands out, so keep the input (the conservative choice)
        return np.zeros(spec.diff_grid, dtype=np.float32)
    return np.clip((coarse - lo) / (hi - lo), 0.0, 1.0).astype(np.float32)


def blend(inp: np.ndarray, pred: np.ndarray, weight: np.ndarray) -> np.ndarray:
    """``inp·(1 − w) + pred·w`` with ``w`` resized to the input grid (ZYX, float32)."""
    w = resize(weight, inp.shape, antialias=False) if weight.shape != inp.shape else weight
    np.clip(w, 0.0, 1.0, out=w)
    out = pred - inp
    out *= w
    out += inp
    return out


def finalise(volume: np.ndarray, spec: PostprocessSpec) -> np.ndarray:
    """Optional output filters (max filter, Gaussian σ in voxels; both off by default), then percentile normalisation.

    Filters are manifest parameters, switched on only where validation showed they help. ZYX float32.
    """
    if spec.output_max_filter > 1:
        volume = ndimage.maximum_filter(volume, size=spec.output_max_filter, mode="nearest")
    if spec.output_gaussian_sigma > 0:
        volume = ndimage.gaussian_filter(volume, sigma=spec.output_gaussian_sigma, mode="nearest", output=np.float32)
    low, high = spec.output_percentiles
    return percentile_normalise(volume, low, high)


def to_output_dtype(volume: np.ndarray, dtype: str) -> np.ndarray:
    """Cast the final float32 volume: 'float32' as is; 'uint16' by an affine map of [min, max] onto [0, 65535].

    The affine map keeps every value (no clipping), so percentile-normalised scores are unchanged
    up to quantisation (1/65535 of the range).
    """
    if dtype == "float32":
        return volume.astype(np.float32, copy=False)
    if dtype == "uint16":
        lo, hi = float(volume.min()), float(volume.max())
        scale = 65535.0 / (hi - lo) if hi > lo else 0.0
        return np.rint((volume - lo) * scale).astype(np.uint16)
    raise ValueError(f"unknown output dtype '{dtype}' (expected float32 or uint16)")


def weight_stats(weight: np.ndarray, bins: Sequence[float] = (0.1, 0.5, 0.9)) -> dict[str, float]:
    """Fractions of the weight map above each threshold (for the report)."""
    return {f"w>{b:g}": float((weight > b).mean()) for b in bins}
