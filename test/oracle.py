"""An independent, whole-volume, slow reference of the composed method (the test oracle).

Written from the method (Wodzinski & Müller, arXiv 2503.16075, as the README and the manifest's
fields describe it), with plain numpy/scipy on whole arrays and a brute-force stitching loop; it
imports nothing from ``fusemycells``, so a bug in a package step cannot hide in a twin that shares it
(``test/reference.py`` is such a twin for single steps; this is the oracle of their
composition). It reads the channel's manifest entry as JSON, with no defaults: every parameter the
method uses is named where it is used.

The method, for one ZYX stack of ``spacing`` (z, y, x) µm (all arrays ZYX, float64 here):

1. ``x`` = the input normalised by its ``normalisation`` percentiles (p_low → 0, p_high → 1).
2. The high-resolution grid H: the same extent at ``target_spacing_um`` on every axis.
3. Global stage: ``x`` resized to H, then to the global ``grid``; stage 1 predicts ``p1`` there;
   ``p1`` and ``x`` are resized to H.
4. Patch stage: windows of ``patch_size`` over H (nnU-Net's starts, ``overlap``), each predicted from
   the two channels (x_H, p1_H); predictions stitched with a Gaussian importance (σ = patch / 8 per
   axis, max 1, floored at 1e-3 per axis) as Σ w·pred / Σ w. The correction is stitched − x_H.
5. Weight map on ``diff_grid``: |correction| resized there, a max filter (``weight_max_filter`` voxels), a
   Gaussian (``weight_sigma`` voxels), scaled by its ``weight_percentiles`` and clipped to [0, 1]; × the
   background mask clip(G₁(x on the diff grid) / ``background_threshold``, 0, 1) when the threshold
   is > 0; × the gate (the constant of ``gate_knots``, or a trust factor the caller passes).
6. Blend on the input grid: x + w·correction (both resized there; w without antialiasing).
7. Output: optional max filter (``output_max_filter``) and Gaussian (the one knot of ``output_sigma_knots``; in µm
   the same on every axis when ``output_sigma_isotropic_um``), then normalised by its
   ``output_percentiles``.

Resizes are trilinear at aligned voxel centres (``align_corners=False``, clamped at the borders), with
a Gaussian prefilter of σ = √(f² − 1)/2 input voxels (truncated at 3σ) on each axis shrunk by f > 1;
every filter uses scipy's 'nearest' borders. These are the package's documented conventions.

Degradation levels (what a time budget makes the pipeline do): 0 the above; 1 the patch stage
without overlap; 2 no patch stage (the correction is p1_H − x_H); 3 no networks (output = step 7 of x).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import ndimage

Network = Callable[[np.ndarray], np.ndarray]
"""(1, C, Z, Y, X) float32 → (1, 1, Z, Y, X): one forward of a stage."""

RESIZE_TRUNCATE = 3.0  # the antialiasing Gaussian's radius in σ
IMPORTANCE_SIGMA = 1.0 / 8.0  # the stitching Gaussian's σ as a fraction of the patch (nnU-Net)
IMPORTANCE_FLOOR = 1e-3  # per-axis floor of the stitching Gaussian (every voxel keeps a weight)
MASK_SMOOTH = 1.0  # σ (diff-grid voxels) of the background mask's smoothing


def normalise(volume: np.ndarray, low: float, high: float) -> np.ndarray:
    """(v − p_low) / (p_high − p_low), float64 (refuses a flat volume: not what the oracle is for)."""
    lo, hi = np.percentile(np.asarray(volume, dtype=np.float64), [low, high])
    if hi - lo < 1e-6:
        raise ValueError("flat volume: the oracle covers volumes with contrast only")
    return (np.asarray(volume, dtype=np.float64) - lo) / (hi - lo)


def resize(volume: np.ndarray, shape: Sequence[int], antialias: bool = True) -> np.ndarray:
    """Trilinear resize of a ZYX array to ``shape`` voxels (float64), antialiased along shrunk axes."""
    out = np.asarray(volume, dtype=np.float64)
    if antialias:
        sigma = [math.sqrt((n / m) ** 2 - 1.0) / 2.0 if n > m else 0.0 for n, m in zip(out.shape, shape)]
        if max(sigma) > 0:
            out = ndimage.gaussian_filter(out, sigma, mode="nearest", truncate=RESIZE_TRUNCATE)
    for axis, m in enumerate(shape):
        n = out.shape[axis]
        coords = np.clip((np.arange(m) + 0.5) * (n / m) - 0.5, 0.0, n - 1.0)
        lo = np.floor(coords).astype(int)
        hi = np.minimum(lo + 1, n - 1)
        frac = (coords - lo).reshape([-1 if a == axis else 1 for a in range(3)])
        out = np.take(out, lo, axis=axis) * (1.0 - frac) + np.take(out, hi, axis=axis) * frac
    return out


def window_starts(length: int, patch: int, overlap: float) -> list[int]:
    """nnU-Net's window starts along one axis: evenly spread, step ≤ patch·(1 − overlap), the last
    window ending at the border (one window at 0 when the axis is no longer than a patch)."""
    if length <= patch:
        return [0]
    count = math.ceil((length - patch) / (patch * (1.0 - overlap))) + 1
    return [round(i * (length - patch) / (count - 1)) for i in range(count)]


def importance(patch: Sequence[int]) -> np.ndarray:
    """The stitching weight of a patch (ZYX): a separable Gaussian, max 1 at the centre."""
    weight = np.ones(tuple(patch))
    for axis, n in enumerate(patch):
        coords = np.arange(n) - (n - 1) / 2.0
        profile = np.exp(-0.5 * (coords / (n * IMPORTANCE_SIGMA)) ** 2)
        profile = np.maximum(profile / profile.max(), IMPORTANCE_FLOOR)
        weight = weight * profile.reshape([-1 if a == axis else 1 for a in range(3)])
    return weight


def stitch(channels: Sequence[np.ndarray], network: Network, patch: Sequence[int], overlap: float) -> np.ndarray:
    """Sliding-window prediction of a ZYX volume from same-shape channels, Gaussian-weighted, as a
    brute-force loop over windows with a full-size weight sum. Axes shorter than a patch are
    reflect-padded at the high end and cropped back."""
    shape = channels[0].shape
    pads = [(0, max(0, p - n)) for n, p in zip(shape, patch)]
    padded = [np.pad(c, pads, mode="reflect") for c in channels]
    full = padded[0].shape
    g = importance(patch)
    total, weights = np.zeros(full), np.zeros(full)
    for z in window_starts(full[0], patch[0], overlap):
        for y in window_starts(full[1], patch[1], overlap):
            for x in window_starts(full[2], patch[2], overlap):
                window = (slice(z, z + patch[0]), slice(y, y + patch[1]), slice(x, x + patch[2]))
                batch = np.stack([c[window] for c in padded])[None].astype(np.float32)
                total[window] += g * np.asarray(network(batch), dtype=np.float64)[0, 0]
                weights[window] += g
    return (total / weights)[: shape[0], : shape[1], : shape[2]]


def constant_gate(post: Mapping[str, Any]) -> float:
    """The gate of ``gate_knots`` when it does not depend on the noise (1 without knots)."""
    values = {float(v) for _, v in post["gate_knots"]}
    if len(values) > 1:
        raise ValueError("noise-dependent gate knots: pass the gate explicitly")
    return min(max(values.pop(), 0.0), 1.0) if values else 1.0


def weight_map(correction: np.ndarray, x: np.ndarray, post: Mapping[str, Any], gate: float) -> np.ndarray:
    """Step 5: the blending weight on the diff grid (the correction on H, the normalised input on its grid)."""
    if post["weight_filter_unit"] != "voxel":
        raise ValueError("filters in µm are not covered by the oracle")
    grid = post["diff_grid"]
    coarse = np.abs(resize(correction, grid))
    if post["weight_max_filter"] > 1:
        coarse = ndimage.maximum_filter(coarse, size=post["weight_max_filter"], mode="nearest")
    if post["weight_sigma"] > 0:
        coarse = ndimage.gaussian_filter(coarse, post["weight_sigma"], mode="nearest")
    lo, hi = np.percentile(coarse, post["weight_percentiles"])
    weight = np.clip((coarse - lo) / (hi - lo), 0.0, 1.0) if hi - lo >= 1e-8 else np.zeros(grid)
    if post["background_threshold"] > 0:
        level = ndimage.gaussian_filter(resize(x, grid), MASK_SMOOTH, mode="nearest")
        weight = weight * np.clip(level / post["background_threshold"], 0.0, 1.0)
    return weight * gate


def constant_sigma(post: Mapping[str, Any]) -> float:
    """The output Gaussian's X σ (input voxels) when it does not depend on the noise: the one knot of
    ``output_sigma_knots`` (0 without knots)."""
    knots = post["output_sigma_knots"]
    if len(knots) > 1:
        raise ValueError("noise-dependent output σ knots are not covered by the oracle")
    return float(knots[0][1]) if knots else 0.0


def output_sigma(post: Mapping[str, Any], spacing: Sequence[float]) -> tuple[float, float, float]:
    """The output Gaussian's σ per axis (ZYX input voxels): :func:`constant_sigma` along X, and the
    same width in µm along Z and Y when ``output_sigma_isotropic_um``."""
    sigma = constant_sigma(post)
    if not post["output_sigma_isotropic_um"]:
        return (sigma, sigma, sigma)
    return (sigma * spacing[2] / spacing[0], sigma * spacing[2] / spacing[1], sigma)


def finish(blended: np.ndarray, post: Mapping[str, Any], spacing: Sequence[float]) -> np.ndarray:
    """Step 7: output filters, then the output's percentile normalisation (float64)."""
    out = blended
    if post["output_max_filter"] > 1:
        out = ndimage.maximum_filter(out, size=post["output_max_filter"], mode="nearest")
    if constant_sigma(post) > 0:
        out = ndimage.gaussian_filter(out, output_sigma(post, spacing), mode="nearest")
    return normalise(out, *post["output_percentiles"])


@dataclass
class Composed:
    """The oracle's output and the intermediates a test may want to look at (ZYX, float64)."""

    output: np.ndarray  # the final volume on the input grid
    x: np.ndarray  # the normalised input
    correction: np.ndarray | None = None  # prediction − input on H (None at level 3)
    added: np.ndarray | None = None  # w·correction on the input grid, before the gate (None at level 3)


def fuse(
    data: np.ndarray,
    spacing: Sequence[float],
    channel: Mapping[str, Any],
    global_net: Network,
    patch_net: Network,
    level: int = 0,
    gate: float | None = None,
) -> Composed:
    """The method on one ZYX stack (``spacing`` (z, y, x) µm) with a channel's manifest entry (JSON
    form) and its two networks, at degradation ``level`` 0–3; ``gate`` overrides the manifest's
    constant gate (e.g. a trust factor)."""
    norm, post = channel["normalisation"], channel["postprocess"]
    if norm["kind"] != "percentile":
        raise ValueError("the oracle covers percentile normalisation only")
    gate = constant_gate(post) if gate is None else gate
    x = normalise(data, norm["low"], norm["high"])
    if level >= 3 or gate <= 0:
        return Composed(finish(x, post, spacing), x)
    target = channel["target_spacing_um"]
    grid_h = [max(1, round(n * s / target)) for n, s in zip(data.shape, spacing)]
    x_h = resize(x, grid_h)
    p1 = global_net(resize(x_h, channel["global_stage"]["grid"])[None, None].astype(np.float32))[0, 0]
    p1_h = resize(p1, grid_h)
    if level == 2:
        correction = p1_h - x_h
    else:
        stage = channel["patch_stage"]
        overlap = stage["overlap"] if level == 0 else 0.0
        correction = stitch([x_h, p1_h], patch_net, stage["patch_size"], overlap) - x_h
    weight = weight_map(correction, x, post, 1.0)
    added = np.clip(resize(weight, data.shape, antialias=False), 0.0, 1.0) * resize(correction, data.shape)
    return Composed(finish(x + gate * added, post, spacing), x, correction, added)
