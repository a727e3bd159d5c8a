"""The FuseMyCells challenge metric: SSIM and normalised SSIM (N-SSIM) of ZYX volumes.

All three volumes are percentile-normalised (2, 99.8) without clipping, then

    N-SSIM = (SSIM(pred, GT) − SSIM(input, GT)) / (1 − SSIM(input, GT)),

so the input itself scores 0 and a perfect prediction 1. SSIM is the 3D form of
``skimage.metrics.structural_similarity`` (uniform 7³ window, K1 0.01, K2 0.03, sample
covariance, border of 3 voxels excluded from the mean) with ``data_range`` 1. It is computed in
Z-slabs with a 3-plane halo, in float64, so a 1e9-voxel stack needs no full-size float64 copy.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from scipy import ndimage

GAUSSIAN_BASELINE_SIGMA = {"nucleus": 0.442, "membrane": 0.5}
"""σ (input-grid voxels) of the challenge's Gaussian-filter baseline per channel."""
METRIC_PERCENTILES = (2.0, 99.8)


def metric_normalise(
    volume: np.ndarray, low: float = METRIC_PERCENTILES[0], high: float = METRIC_PERCENTILES[1]
) -> np.ndarray:
    """(v − p_low) / (p_high − p_low) as float32 over exact percentiles, no clipping.

    A flat histogram (p_high == p_low) only shifts the volume, like the organisers' code.
    """
    data = np.asarray(volume, dtype=np.float32)
    lo, hi = np.percentile(data, [low, high])
    out = data - np.float32(lo)
    if hi > lo:
        out *= np.float32(1.0 / (hi - lo))
    return out


def _window(shape: tuple[int, ...], win: int) -> int:
    """The largest odd window ≤ ``win`` that fits every axis (skimage refuses smaller volumes)."""
    smallest = min(shape)
    w = min(win, smallest if smallest % 2 else smallest - 1)
    if w < 1:
        raise ValueError(f"volume of shape {shape} is too small for SSIM")
    return w


def ssim(a: np.ndarray, b: np.ndarray, data_range: float = 1.0, win: int = 7, slab: int = 32) -> float:
    """Mean 3D SSIM of two ZYX volumes of equal shape (skimage's definition, see module doc).

    Volumes thinner than ``win`` voxels on an axis use the largest odd window that fits.
    """
    if a.shape != b.shape:
        raise ValueError(f"shapes differ: {a.shape} vs {b.shape}")
    if a.ndim != 3:
        raise ValueError(f"expected a ZYX volume, got shape {a.shape}")
    w = _window(a.shape, win)
    pad = (w - 1) // 2
    n = w**3
    cov_norm = n / (n - 1) if n > 1 else 1.0
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    depth = a.shape[0]
    total, count = 0.0, 0
    for z0 in range(pad, depth - pad, slab):
        z1 = min(z0 + slab, depth - pad)
        lo, hi = z0 - pad, z1 + pad
        x = np.asarray(a[lo:hi], dtype=np.float64)
        y = np.asarray(b[lo:hi], dtype=np.float64)
        ux, uy = ndimage.uniform_filter(x, w), ndimage.uniform_filter(y, w)
        uxx, uyy, uxy = (
            ndimage.uniform_filter(x * x, w),
            ndimage.uniform_filter(y * y, w),
            ndimage.uniform_filter(x * y, w),
        )
        vx, vy, vxy = cov_norm * (uxx - ux * ux), cov_norm * (uyy - uy * uy), cov_norm * (uxy - ux * uy)
        s = ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux * ux + uy * uy + c1) * (vx + vy + c2))
        inner = s[pad : pad + (z1 - z0), pad : s.shape[1] - pad, pad : s.shape[2] - pad]
        total += float(inner.sum())
        count += inner.size
    return total / count


def n_ssim(pred_ssim: float, input_ssim: float) -> float:
    """Normalised SSIM from SSIM(pred, GT) and SSIM(input, GT); 0 when the input is already perfect."""
    if input_ssim >= 1.0:
        return 0.0
    return (pred_ssim - input_ssim) / (1.0 - input_ssim)


def gaussian_baseline(volume: np.ndarray, channel: str) -> np.ndarray:
    """The challenge's baseline: the input smoothed with the per-channel σ (voxels), float32."""
    sigma = GAUSSIAN_BASELINE_SIGMA.get(channel, GAUSSIAN_BASELINE_SIGMA["nucleus"])
    return ndimage.gaussian_filter(np.asarray(volume, dtype=np.float32), sigma)


@dataclass(frozen=True)
class CaseScore:
    """Scores of one case: SSIMs against the ground truth and the N-SSIMs derived from them."""

    name: str
    channel: str
    shape: tuple[int, int, int]
    ssim_input: float
    ssim_pred: float
    ssim_gaussian: float
    n_ssim: float
    n_ssim_gaussian: float

    def as_dict(self) -> dict:
        d = asdict(self)
        d["shape"] = list(self.shape)
        return d


def score_case(name: str, channel: str, inp: np.ndarray, pred: np.ndarray, gt: np.ndarray) -> CaseScore:
    """Challenge scores of one ZYX case (raw intensities in, normalisation done here)."""
    if not (inp.shape == pred.shape == gt.shape):
        raise ValueError(f"{name}: shapes differ: input {inp.shape}, prediction {pred.shape}, ground truth {gt.shape}")
    g = metric_normalise(gt)
    s_in = ssim(metric_normalise(inp), g)
    s_pred = ssim(metric_normalise(pred), g)
    s_gauss = ssim(metric_normalise(gaussian_baseline(inp, channel)), g)
    return CaseScore(
        name=name,
        channel=channel,
        shape=tuple(int(v) for v in inp.shape),  # type: ignore[arg-type]
        ssim_input=s_in,
        ssim_pred=s_pred,
        ssim_gaussian=s_gauss,
        n_ssim=n_ssim(s_pred, s_in),
        n_ssim_gaussian=n_ssim(s_gauss, s_in),
    )
