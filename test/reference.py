"""Reference implementations: whole-volume (eager) numpy twins of the streamed pipeline steps (a test oracle).

**The streamed code must equal these.** The pipeline works on plane sources, z-range by z-range, in place
where it can, with torch (:class:`fusemycells.ops.Ops`, the one implementation of every non-network step,
on the CPU or the GPU), so that a 1e9-voxel stack needs no float32 copy. Each function here does the same step
on whole arrays in plain numpy/scipy (resizes by :func:`oracle.resize`, float64), and ``test/test_reference.py``
and ``test/test_ops.py`` check each streamed step against its twin. From the package it takes only the
scalar definitions the steps share (the percentile and safe-range affine maps, the output σ per axis), never
a streamed step. ``oracle.py`` beside it is the oracle of the steps' composition.

All arrays are ZYX; spacings are (z, y, x) µm.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import oracle
from scipy import ndimage

from fusemycells.config import NormalisationSpec, PostprocessSpec
from fusemycells.postprocess import output_sigma_zyx, weight_filters
from fusemycells.preprocess import intensity_affine, percentile_affine, percentiles, safe_range
from fusemycells.sources import Spacing3, apply_affine, shape_for_spacing


def percentile_normalise(volume: np.ndarray, low: float = 2.0, high: float = 99.8, eps: float = 1e-6) -> np.ndarray:
    """(v − p_low) / (p_high − p_low) as float32, without clipping (the challenge's definition).

    A constant volume maps to zeros instead of dividing by zero.
    """
    return apply_affine(volume, *percentile_affine(volume, low, high, eps))


def normalise_intensity(
    volume: np.ndarray, kind: str = "percentile", low: float = 1.0, high: float = 99.8
) -> np.ndarray:
    """Network input normalisation named by the manifest (``kind`` 'percentile' or 'zscore'), float32 ZYX.

    Twin of ``ArraySource(volume, *intensity_affine(volume, spec))``. Non-finite voxels must be
    removed before calling.
    """
    return apply_affine(volume, *intensity_affine(volume, NormalisationSpec(kind, low, high)))


def sanitise(volume: np.ndarray) -> tuple[np.ndarray, int]:
    """float32 copy with NaN/±inf replaced by the finite median and values outside
    :func:`~fusemycells.preprocess.safe_range` clipped (in the input's dtype, before the cast);
    returns (volume, count replaced).

    Twin of :func:`fusemycells.preprocess.sanitise_inplace`.
    """
    data = np.array(volume, copy=True)
    kind = data.dtype.kind
    bad = 0
    if kind == "f":
        finite = np.isfinite(data)
        bad = int(data.size - np.count_nonzero(finite))
        if bad:
            data[~finite] = float(np.median(data[finite])) if bad < data.size else 0.0
    if (kind == "f" and data.dtype != np.float16) or (kind in "iu" and data.dtype.itemsize > 4):
        low, high = safe_range(data)
        data[data > high] = high
        data[data < low] = low
    return data.astype(np.float32), bad


def resize(volume: np.ndarray, out_shape: Sequence[int], antialias: bool = True) -> np.ndarray:
    """Trilinear resize of a whole ZYX volume to ``out_shape`` voxels (float32): :func:`oracle.resize`
    (float64, antialiased along shrunk axes) rounded; a copy when the shape is already ``out_shape``."""
    if tuple(volume.shape) == tuple(int(n) for n in out_shape):
        return np.array(volume, dtype=np.float32, copy=True)
    return oracle.resize(volume, [int(n) for n in out_shape], antialias).astype(np.float32)


def resample_to_spacing(volume: np.ndarray, spacing: Spacing3, target_spacing: Spacing3) -> np.ndarray:
    """Resample a ZYX volume from ``spacing`` to ``target_spacing`` (both µm), same physical extent."""
    return resize(volume, shape_for_spacing(volume.shape, spacing, target_spacing))


def weight_from_coarse(
    coarse: np.ndarray, spec: PostprocessSpec, extent_um: Sequence[float] | None = None
) -> np.ndarray:
    """Weight map in [0, 1] from |prediction − input| already on ``spec.diff_grid`` (ZYX float32):
    max filter, Gaussian (sizes of ``weight_filters``) and percentile scaling, with scipy.
    Twin of :func:`fusemycells.postprocess.weight_from_coarse`."""
    size, sigma = weight_filters(spec, extent_um)
    if np.max(size) > 1:
        coarse = ndimage.maximum_filter(coarse, size=size, mode="nearest")
    if np.max(sigma) > 0:
        coarse = ndimage.gaussian_filter(coarse, sigma=sigma, mode="nearest")
    low, high = spec.weight_percentiles
    lo, hi = percentiles(coarse, low, high)
    if hi - lo < 1e-8:
        return np.zeros(spec.diff_grid, dtype=np.float32)
    return np.clip((coarse - lo) / (hi - lo), 0.0, 1.0).astype(np.float32)


def background_mask(normalised_input: np.ndarray, spec: PostprocessSpec, smooth: float = 1.0) -> np.ndarray:
    """clip(G_smooth(input on the diff grid) / ``background_threshold``, 0, 1) (ZYX float32; ones when the
    threshold is 0). Twin of :func:`fusemycells.postprocess.background_mask`."""
    if spec.background_threshold <= 0:
        return np.ones(spec.diff_grid, dtype=np.float32)
    coarse = ndimage.gaussian_filter(resize(normalised_input, spec.diff_grid), smooth, mode="nearest")
    return np.clip(coarse / spec.background_threshold, 0.0, 1.0).astype(np.float32)


def difference_weight(
    inp: np.ndarray, pred: np.ndarray, spec: PostprocessSpec, extent_um: Sequence[float] | None = None
) -> np.ndarray:
    """Weight map on ``spec.diff_grid`` (voxels) from |inp − pred| (same-shape ZYX arrays; ``extent_um``
    their ZYX size in µm). Twin of :func:`fusemycells.postprocess.correction_weight` (which reads pred − inp lazily).
    """
    return weight_from_coarse(np.abs(resize(inp, spec.diff_grid) - resize(pred, spec.diff_grid)), spec, extent_um)


def blend(inp: np.ndarray, pred: np.ndarray, weight: np.ndarray) -> np.ndarray:
    """``inp·(1 − w) + pred·w`` with ``w`` resized to the input grid (ZYX, float32).

    Twin of :func:`fusemycells.postprocess.blend_slabs` (which adds w·correction slab by slab).
    """
    w = resize(weight, inp.shape, antialias=False) if weight.shape != inp.shape else weight
    np.clip(w, 0.0, 1.0, out=w)
    out = pred - inp
    out *= w
    out += inp
    return out


def finalise(volume: np.ndarray, spec: PostprocessSpec, spacing: Sequence[float] | None = None) -> np.ndarray:
    """Optional output filters (max filter, Gaussian σ of :func:`output_sigma_zyx`), then percentile
    normalisation; ZYX float32. Twin of :func:`fusemycells.postprocess.final_source` (float32)."""
    if spec.output_max_filter > 1:
        volume = ndimage.maximum_filter(volume, size=spec.output_max_filter, mode="nearest")
    if spec.output_sigma > 0:
        sigma = output_sigma_zyx(spec, spacing)
        volume = ndimage.gaussian_filter(volume, sigma=sigma, mode="nearest", output=np.float32)
    low, high = spec.output_percentiles
    return percentile_normalise(volume, low, high)


def to_output_dtype(volume: np.ndarray, dtype: str) -> np.ndarray:
    """Cast the final float32 volume: 'float32' as is; 'uint16' by an affine map of [min, max] onto [0, 65535].

    The affine map keeps every value (no clipping), so percentile-normalised scores are unchanged
    up to quantisation (1/65535 of the range). Twin of ``final_source(..., dtype)``.
    """
    if dtype == "float32":
        return volume.astype(np.float32, copy=False)
    if dtype == "uint16":  # [min, max] onto 0..65535 with 0 (the 2nd percentile's level) on an integer level
        lo, hi = float(volume.min()), float(volume.max())
        if not hi > lo:
            return np.zeros(volume.shape, np.uint16)
        scale = 65535.0 / (hi - lo)
        if lo < 0.0 < hi:
            level = math.ceil(-lo * scale)
            scale = (65535.0 - level) / hi
            return np.rint(volume * np.float32(scale) + np.float32(level)).astype(np.uint16)
        return np.rint((volume - lo) * scale).astype(np.uint16)
    raise ValueError(f"unknown output dtype '{dtype}' (expected float32 or uint16)")
