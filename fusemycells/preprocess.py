"""Intensity normalisation and spacing-aware resampling of ZYX volumes.

Pure functions shared by inference and by the training code (``training/`` imports them, so the
networks see exactly the same preprocessing in both). Arrays are float32 ZYX unless stated; the
whole-volume twins of the streamed functions are in :mod:`fusemycells.reference`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from fusemycells.config import NormalisationSpec
from fusemycells.ops_torch import Ops, ResizePlan, compose, parallel_safe, resize_plan
from fusemycells.sources import SLAB, PlaneSource, Shape3, as_source, materialise, slabs

ANTIALIAS_TRUNCATE = 3.0
"""Gaussian prefilter radius in σ (scipy's ``truncate``)."""


MAX_SAMPLES = 4_000_000
"""Voxels a percentile estimate samples at most (every k-th voxel in C order, see :func:`sample_stride`)."""


def sample_stride(size: int, max_samples: int = MAX_SAMPLES) -> int:
    """The stride k of the percentile sample of ``size`` voxels: every voxel up to ``max_samples``, else
    every ⌈size / max_samples⌉-th (C order, starting at voxel 0)."""
    return -(-int(size) // max_samples) if size > max_samples else 1


def percentiles(volume: np.ndarray, low: float, high: float, max_samples: int = MAX_SAMPLES) -> tuple[float, float]:
    """(low, high) percentiles of the finite voxels; a strided subsample above ``max_samples``.

    Subsampling keeps the cost bounded on 1e9-voxel stacks; with a few million samples the
    percentile error is far below one grey level of the normalised output.
    """
    flat = volume.reshape(-1)
    flat = flat[:: sample_stride(flat.size, max_samples)]
    flat = flat[np.isfinite(flat)] if flat.dtype.kind == "f" else flat
    if flat.size == 0:
        return 0.0, 1.0
    lo, hi = np.percentile(flat, [low, high])
    return float(lo), float(hi)


def percentile_affine(
    volume: np.ndarray, low: float = 2.0, high: float = 99.8, eps: float = 1e-6
) -> tuple[float, float]:
    """(offset, scale) with (v − offset)·scale mapping p_low → 0 and p_high → 1.

    A degenerate histogram falls back to the full range, then to a pure shift (scale 1), so a
    constant volume maps to zeros instead of dividing by zero.
    """
    lo, hi = percentiles(volume, low, high)
    span = hi - lo
    if span < eps:
        lo, hi = float(np.nanmin(volume)), float(np.nanmax(volume))
        span = hi - lo if hi - lo >= eps else 1.0
    return lo, 1.0 / span


def intensity_affine(volume: np.ndarray, spec: NormalisationSpec) -> tuple[float, float]:
    """(offset, scale) of the manifest's normalisation: the network input is ``(v − offset)·scale``."""
    if spec.kind == "percentile":
        return percentile_affine(volume, spec.low, spec.high)
    if spec.kind == "zscore":
        mean = float(np.mean(volume, dtype=np.float64))
        std = float(np.std(volume, dtype=np.float64))
        return mean, 1.0 / (std if std > 1e-6 else 1.0)
    raise ValueError(f"unknown normalisation kind '{spec.kind}' (expected 'percentile' or 'zscore')")


def antialias_sigma(in_shape: Sequence[int], out_shape: Sequence[int]) -> tuple[float, ...]:
    """Per-axis Gaussian σ (input voxels) that suppresses aliasing before a downsampling.

    σ = sqrt(f² − 1) / 2 for a shrink factor f > 1 (the usual rule, as in scikit-image), 0 otherwise.
    """
    sigmas = []
    for n_in, n_out in zip(in_shape, out_shape):
        factor = n_in / n_out
        sigmas.append(math.sqrt(factor**2 - 1.0) / 2.0 if factor > 1.0 else 0.0)
    return tuple(sigmas)


SLAB_BYTES = 256 * 2**20
"""Target size of the source block one :class:`ResizedSource` request reads (bytes)."""


class ResizedSource:
    """Trilinear resize of a source to ``out_shape`` voxels, computed per output z-range.

    Same result (to float32 rounding) as ``torch.nn.functional.interpolate(mode='trilinear', align_corners=False)``
    (voxel centres aligned) after a Gaussian prefilter of the downsampled axes (``antialias``),
    bit-identical to filtering the whole volume: each range is read with a z-halo of the filter
    radius and edge-padded at the volume borders (scipy's 'nearest' mode). The last computed
    planes are kept, so overlapping requests in increasing z (sliding-window rows) reuse them;
    with ``cache=False`` nothing is kept (for one pass of disjoint requests, where a cache would
    only hold a second copy of each request).

    With ``ops`` on a torch device (see :func:`fusemycells.ops_torch.choose_ops`) the planes are
    computed there instead, as the band matrices of :func:`fusemycells.ops_torch.resize_plan` (the same
    map, to float32 rounding), or of ``plan`` when given (e.g. two resizes composed into one); the
    time goes to ``ops.profile`` ('resampling_s'). Without (or with ``Ops(device=None)``): numpy/scipy,
    the reference.
    """

    def __init__(
        self,
        source: PlaneSource | np.ndarray,
        out_shape: Sequence[int],
        antialias: bool = True,
        cache: bool = True,
        ops: Ops | None = None,
        plan: ResizePlan | None = None,
    ) -> None:
        self.source: PlaneSource = as_source(source)
        self.shape: Shape3 = tuple(int(n) for n in out_shape)  # type: ignore[assignment]
        sigma = antialias_sigma(self.source.shape, self.shape) if antialias else (0.0, 0.0, 0.0)
        self.sigma = tuple(float(v) for v in sigma)
        self.halo = int(ANTIALIAS_TRUNCATE * self.sigma[0] + 0.5) if self.sigma[0] > 0 else 0
        self.cache = cache
        self.profile_ops = ops  # its profile gets the time, on either path
        self.ops: Ops | None = None
        self.plan: ResizePlan | None = None
        if ops is not None and ops.torch:
            self.plan = plan if plan is not None else resize_plan(self.source.shape, self.shape, antialias)
            if self.plan.in_shape != self.source.shape or self.plan.out_shape != self.shape:
                fits = f"{self.plan.in_shape} → {self.plan.out_shape}"
                raise ValueError(f"plan {fits} does not fit {self.source.shape} → {self.shape}")
            self.ops = ops
        elif plan is not None:
            raise ValueError("a resize plan needs torch ops (ops.device set)")
        self._cache_z0 = 0
        self._cache = np.empty((0, *self.shape[1:]), dtype=np.float32)
        # Output planes per request that keep the source block read for it (plus its filtered
        # copy) near SLAB_BYTES: downsampling a 1920² × 309 stack must not read 1 GB at a time.
        in_plane = 4 * self.source.shape[1] * self.source.shape[2]
        per_out = in_plane * max(1.0, self.source.shape[0] / max(self.shape[0], 1))
        self.preferred_slab = int(min(32, max(1, SLAB_BYTES // max(per_out, 1))))
        if self.ops is not None:  # torch: the larger of the source block and the output slab within ops.slab_bytes
            per_out = max(per_out, 4 * self.shape[1] * self.shape[2])
            self.preferred_slab = int(min(64, max(1, self.ops.slab_bytes // max(per_out, 1))))

    def planes(self, z0: int, z1: int) -> np.ndarray:
        if not self.cache:
            return self._compute_chunked(z0, z1)
        return self.planes_readonly(z0, z1).copy()

    def planes_readonly(self, z0: int, z1: int) -> np.ndarray:
        """Like :meth:`planes` but a read-only view of the internal cache (no copy): for callers
        that only read, such as the sliding window, so a row is not held twice.

        The view is valid until the next request to this source: a request of the same length
        reuses the cache buffer in place (planes shared with the previous range are moved forward,
        the rest computed into it), so moving along z by rows never holds two rows at once.
        Without the cache, the planes are computed for this request and handed over read-only.
        """
        if not self.cache:
            view = self._compute_chunked(z0, z1)
            view.flags.writeable = False
            return view
        c0, c1 = self._cache_z0, self._cache_z0 + len(self._cache)
        if c0 <= z0 and z1 <= c1:
            view = self._cache[z0 - c0 : z1 - c0]
            view.flags.writeable = False
            return view
        reuse = z1 - z0 == len(self._cache)
        keep = c1 - z0 if c0 <= z0 < c1 else 0  # planes of the cache that the new range starts with
        if reuse:
            block = self._cache  # writeable: only views of it are handed out read-only
            for i in range(keep):  # forward, plane by plane: no temporary copy
                block[i] = block[z0 - c0 + i]
            self._compute_chunked(z0 + keep, z1, out=block[keep:])
        elif keep:
            block = np.concatenate([self._cache[z0 - c0 :], self._compute_chunked(c1, z1)])
        else:
            self._cache = np.empty((0, *self.shape[1:]), dtype=np.float32)  # release before computing
            block = self._compute_chunked(z0, z1)
        self._cache_z0, self._cache = z0, block
        view = block[:]
        view.flags.writeable = False
        return view

    def _compute_chunked(self, z0: int, z1: int, out: np.ndarray | None = None) -> np.ndarray:
        """``_compute`` in requests of ``preferred_slab`` planes, so the source block read (and its
        filtered copy) stays near SLAB_BYTES however many planes are asked for; into ``out`` if given."""
        step = self.preferred_slab
        ops = self.profile_ops
        parallel = ops is not None and ops.device == "cpu" and parallel_safe(self.source)
        if parallel:  # at least one range per worker thread of the CPU ops
            assert ops is not None
            step = max(1, min(step, -(-(z1 - z0) // max(1, ops.threads))))
        if out is None:
            if z1 - z0 <= step and not parallel:
                return self._compute(z0, z1)
            out = np.empty((z1 - z0, *self.shape[1:]), dtype=np.float32)
        ranges = [(a, min(z1, a + step)) for a in range(z0, z1, step)]
        if parallel:
            assert ops is not None
            with ops.section("resampling_s"):
                ops.parallel(lambda a, b: self._compute(a, b, out=out[a - z0 : b - z0]), *zip(*ranges))
            return out
        for a, b in ranges:
            self._compute(a, b, out=out[a - z0 : b - z0])
        return out

    def _compute(self, z0: int, z1: int, out: np.ndarray | None = None) -> np.ndarray:
        """Output planes z0:z1 (float32), written into ``out`` when given (no second copy of the range)."""
        if self.ops is not None:
            assert self.plan is not None
            planes = self.ops.resample(self.plan, self.source, z0, z1)
            if out is None:
                return self.ops.to_host(planes)
            torch.from_numpy(out).copy_(planes)
            return out
        if self.profile_ops is not None:
            with self.profile_ops.section("resampling_s"):
                return self._compute_numpy(z0, z1, out)
        return self._compute_numpy(z0, z1, out)

    def _compute_numpy(self, z0: int, z1: int, out: np.ndarray | None = None) -> np.ndarray:
        """:meth:`_compute` with scipy and numpy (the reference path)."""
        nz_in, nz_out = self.source.shape[0], self.shape[0]
        coords = np.clip((np.arange(z0, z1) + 0.5) * (nz_in / nz_out) - 0.5, 0, nz_in - 1)
        src0 = int(np.floor(coords[0]))
        src1 = min(nz_in, int(np.floor(coords[-1])) + 2)
        data = self._filtered(src0, src1)
        local = coords - src0
        lo = np.floor(local).astype(np.int64)
        hi = np.minimum(lo + 1, data.shape[0] - 1)
        frac = (local - lo).astype(np.float32)
        # Linear interpolation along z and bilinear in y/x commute: do first whichever leaves fewer
        # voxels to hold. Upsampling in y/x (the correction onto a 1920² input grid), z goes first,
        # so only the output planes are ever enlarged, not every source plane read for them.
        if (z1 - z0) * data.shape[1] * data.shape[2] < data.shape[0] * self.shape[1] * self.shape[2]:
            planes = self._resize_yx(_lerp_planes(data, lo, hi, frac))
            if out is None:
                return planes
            out[...] = planes
            return out
        return _lerp_planes(self._resize_yx(data), lo, hi, frac, out=out)

    def _resize_yx(self, planes: np.ndarray) -> np.ndarray:
        """Bilinear resize of float32 ZYX planes to this source's Y × X (torch, z as the batch axis)."""
        if planes.shape[1:] == self.shape[1:]:
            return planes
        chunk = F.interpolate(
            torch.from_numpy(planes)[:, None], size=self.shape[1:], mode="bilinear", align_corners=False
        )
        return chunk[:, 0].numpy()

    def _filtered(self, src0: int, src1: int) -> np.ndarray:
        """Source planes src0:src1 after the antialiasing prefilter (float32, contiguous)."""
        if not any(s > 0 for s in self.sigma):
            return np.ascontiguousarray(self.source.planes(src0, src1), dtype=np.float32)
        nz_in, r = self.source.shape[0], self.halo
        lo, hi = max(0, src0 - r), min(nz_in, src1 + r)
        block = np.asarray(self.source.planes(lo, hi), dtype=np.float32)  # a fresh array: ours to overwrite
        before, after = r - (src0 - lo), r - (hi - src1)
        if before or after:
            block = np.pad(block, ((before, after), (0, 0), (0, 0)), mode="edge")
        # in place (scipy filters line by line through a buffer): no second block of this size
        ndimage.gaussian_filter(block, sigma=self.sigma, mode="nearest", truncate=ANTIALIAS_TRUNCATE, output=block)
        return block[r : r + (src1 - src0)]  # a z-range of a C-contiguous block is contiguous


def _lerp_planes(
    planes: np.ndarray, lo: np.ndarray, hi: np.ndarray, frac: np.ndarray, out: np.ndarray | None = None
) -> np.ndarray:
    """Planes ``planes[lo]·(1 − frac) + planes[hi]·frac`` (float32 ZYX; one output plane per index),
    computed plane by plane into ``out`` (allocated if None): no temporaries of the block's size."""
    if out is None:
        out = np.empty((len(lo), *planes.shape[1:]), dtype=np.float32)
    for i, (a, b, f) in enumerate(zip(lo, hi, frac)):
        np.multiply(planes[a], np.float32(1.0) - f, out=out[i])
        out[i] += planes[b] * f
    return out


def resize(volume: np.ndarray, out_shape: Sequence[int], antialias: bool = True) -> np.ndarray:
    """Trilinear resize of a whole ZYX volume to ``out_shape`` voxels (float32): a materialised
    :class:`ResizedSource` (the training code and the reference twins use it)."""
    out_shape = tuple(int(n) for n in out_shape)
    if tuple(volume.shape) == out_shape:
        return np.array(volume, dtype=np.float32, copy=True)
    return materialise(ResizedSource(np.asarray(volume), out_shape, antialias, cache=False))


def resize_through(
    source: PlaneSource | np.ndarray, shapes: Sequence[Sequence[int]], ops: Ops | None = None
) -> np.ndarray:
    """A ZYX source resized through each grid of ``shapes`` in turn (antialiased), the last one materialised
    (float32). With torch ``ops`` the chain is composed into one map per axis and applied once, so the
    intermediate grids are never computed (same values to float32 rounding); else chained
    :class:`ResizedSource` s, the reference."""
    source = as_source(source)
    grids = [tuple(int(n) for n in shape) for shape in shapes]
    if ops is not None and ops.torch:
        plan = resize_plan(source.shape, grids[0])
        previous = grids[0]
        for grid in grids[1:]:
            plan = compose(plan, resize_plan(previous, grid))
            previous = grid
        return ops.to_host(ops.resample_all(plan, source))
    for grid in grids[:-1]:
        source = ResizedSource(source, grid, ops=ops)
    return materialise(ResizedSource(source, grids[-1], cache=False, ops=ops))


INPUT_SAFE_ABS = 1e15
"""Largest magnitude an input voxel keeps (raw units), whatever the data: the pipeline computes in
float32 (max 3.4e38), a float64 1e39 becomes inf when cast, and the patch network's instance norms
sum squares of normalised values over a 64³ patch (2.6e5 voxels)."""
RELATIVE_SAFE_SPREAD = 1e4
"""Values further than this many times the spread of the 0.1–99.9 percentiles beyond those
percentiles are clipped too (see :func:`safe_range`): a normalised voxel then stays below ≈ 1e4,
within any float32 arithmetic, and no real intensity is that far out."""


@dataclass(frozen=True)
class Sanitised:
    """What :func:`sanitise_inplace` changed: voxels counted, not positions."""

    non_finite: int  # NaN/±inf replaced by the finite median
    clipped: int  # finite values outside safe_range(), clipped to it
    limits: tuple[float, float] | None = None  # the range clipped to (None: none applied)


def safe_range(volume: np.ndarray) -> tuple[float, float]:
    """The range of values a ZYX array keeps (raw units): ±:data:`INPUT_SAFE_ABS`, narrowed to
    :data:`RELATIVE_SAFE_SPREAD` × (p99.9 − p0.1) beyond the 0.1 and 99.9 percentiles of its finite
    voxels when that spread is > 0."""
    low, high = -INPUT_SAFE_ABS, INPUT_SAFE_ABS
    p_low, p_high = percentiles(volume, 0.1, 99.9)
    spread = p_high - p_low
    if spread > 0:
        low, high = max(low, p_low - RELATIVE_SAFE_SPREAD * spread), min(high, p_high + RELATIVE_SAFE_SPREAD * spread)
    return low, high


def sanitise_inplace(volume: np.ndarray, slab: int = SLAB) -> Sanitised:
    """Make a ZYX array safe for the float32 pipeline, in place, z-slab by z-slab.

    Finite values outside :func:`safe_range` are clipped to it, in the array's own dtype (before any
    cast to float32, which would turn a float64 1e39 into inf); NaN/±inf are replaced by the median
    of the finite voxels (0 when none is finite). 8–32-bit integers and float16 cannot overflow the
    pipeline and are left untouched.
    """
    kind = volume.dtype.kind
    if kind not in "fiu" or (kind != "f" and volume.dtype.itemsize <= 4):
        return Sanitised(0, 0)
    bad = 0
    if kind == "f":
        counts = (int(np.count_nonzero(np.isfinite(volume[z0:z1]))) for z0, z1 in slabs(len(volume), slab))
        bad = volume.size - sum(counts)
    if bad:
        lo, _ = percentiles(volume, 50.0, 50.0)  # median of the finite voxels (subsampled on huge stacks)
        fill = lo if bad < volume.size else 0.0
        for z0, z1 in slabs(len(volume), slab):
            block = volume[z0:z1]
            block[~np.isfinite(block)] = fill
    if volume.dtype == np.float16:
        return Sanitised(bad, 0)
    low, high = safe_range(volume)
    clipped = 0
    for z0, z1 in slabs(len(volume), slab):
        block = volume[z0:z1]
        for bound, over in ((high, block > high), (low, block < low)):  # comparisons only: no float copy
            count = int(np.count_nonzero(over))
            if count:
                block[over] = bound
                clipped += count
    return Sanitised(bad, clipped, (low, high))
