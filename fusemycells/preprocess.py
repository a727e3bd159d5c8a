"""Intensity normalisation and spacing-aware resampling of ZYX volumes.

Pure functions shared by inference and by the training code (``training/`` imports them, so the
networks see exactly the same preprocessing in both). Arrays are float32 ZYX unless stated; resizes run
through :class:`fusemycells.ops.Ops` (the one implementation, on the CPU or the GPU); the whole-volume
numpy oracle they are tested against is ``test/reference.py``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from fusemycells.config import NormalisationSpec
from fusemycells.ops import Ops, ResizePlan, compose, parallel_safe, resize_plan
from fusemycells.sources import SLAB, PlaneSource, Shape3, as_source, materialise, slabs

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


class ResizedSource:
    """Trilinear resize of a source to ``out_shape`` voxels (ZYX), computed per output z-range with ``ops``.

    Voxel centres aligned (``align_corners=False``, clamped at the borders), after a Gaussian prefilter of
    the downsampled axes (``antialias``, σ of :func:`fusemycells.ops.antialias_sigma`, scipy's 'nearest'
    borders): the band matrices of :func:`fusemycells.ops.resize_plan`, or of ``plan`` when given
    (e.g. two resizes composed into one), applied on ``ops``' device; the time goes to ``ops.profile``
    ('resampling_s'). Equal to resizing the whole volume at once (``test/reference.py`` is the whole-volume
    numpy oracle). The last computed planes are kept, so overlapping requests in increasing z
    (sliding-window rows) reuse them; with ``cache=False`` nothing is kept (for one pass of disjoint
    requests, where a cache would only hold a second copy of each request).
    """

    def __init__(
        self,
        source: PlaneSource | np.ndarray,
        out_shape: Sequence[int],
        antialias: bool = True,
        cache: bool = True,
        *,
        ops: Ops,
        plan: ResizePlan | None = None,
    ) -> None:
        self.source: PlaneSource = as_source(source)
        self.shape: Shape3 = tuple(int(n) for n in out_shape)  # type: ignore[assignment]
        self.cache = cache
        self.ops = ops
        self.plan = plan if plan is not None else resize_plan(self.source.shape, self.shape, antialias)
        if self.plan.in_shape != self.source.shape or self.plan.out_shape != self.shape:
            fits = f"{self.plan.in_shape} → {self.plan.out_shape}"
            raise ValueError(f"plan {fits} does not fit {self.source.shape} → {self.shape}")
        self._cache_z0 = 0
        self._cache = np.empty((0, *self.shape[1:]), dtype=np.float32)
        # Output planes per request that keep the source block read for it (and the output slab) within
        # ops.slab_bytes: downsampling a 1920² × 309 stack must not read 1 GB at a time.
        in_plane = 4 * self.source.shape[1] * self.source.shape[2]
        per_out = in_plane * max(1.0, self.source.shape[0] / max(self.shape[0], 1))
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
        """``_compute`` in requests of ``preferred_slab`` planes, so the source block read stays within
        ``ops.slab_bytes`` however many planes are asked for (on the CPU at least one range per worker
        thread when the source may be read from several threads); into ``out`` if given."""
        step = self.preferred_slab
        parallel = self.ops.device == "cpu" and parallel_safe(self.source)
        if parallel:
            step = max(1, min(step, -(-(z1 - z0) // max(1, self.ops.threads))))
        if out is None:
            if z1 - z0 <= step and not parallel:
                return self._compute(z0, z1)
            out = np.empty((z1 - z0, *self.shape[1:]), dtype=np.float32)
        ranges = [(a, min(z1, a + step)) for a in range(z0, z1, step)]
        if parallel:
            with self.ops.section("resampling_s"):
                self.ops.parallel(lambda a, b: self._compute(a, b, out=out[a - z0 : b - z0]), *zip(*ranges))
            return out
        for a, b in ranges:
            self._compute(a, b, out=out[a - z0 : b - z0])
        return out

    def _compute(self, z0: int, z1: int, out: np.ndarray | None = None) -> np.ndarray:
        """Output planes z0:z1 (float32), written into ``out`` when given (no second copy of the range)."""
        planes = self.ops.resample(self.plan, self.source, z0, z1)
        if out is None:
            return self.ops.to_host(planes)
        torch.from_numpy(out).copy_(planes)
        return out


def resize(volume: np.ndarray, out_shape: Sequence[int], ops: Ops, antialias: bool = True) -> np.ndarray:
    """Trilinear resize of a whole ZYX volume to ``out_shape`` voxels (float32, a new array) with ``ops``:
    a materialised :class:`ResizedSource` (the training code uses it, so the networks see the resizes of
    inference)."""
    out_shape = tuple(int(n) for n in out_shape)
    if tuple(volume.shape) == out_shape:
        return np.array(volume, dtype=np.float32, copy=True)
    return materialise(ResizedSource(np.asarray(volume), out_shape, antialias, cache=False, ops=ops))


def resize_through(source: PlaneSource | np.ndarray, shapes: Sequence[Sequence[int]], ops: Ops) -> np.ndarray:
    """A ZYX source resized through each grid of ``shapes`` (voxels) in turn (antialiased), the last one
    materialised (float32): the chain is composed into one map per axis and applied once with ``ops``, so
    the intermediate grids are never computed (equal to resizing step by step, to float32 rounding)."""
    source = as_source(source)
    grids = [tuple(int(n) for n in shape) for shape in shapes]
    plan = resize_plan(source.shape, grids[0])
    for previous, grid in zip(grids[:-1], grids[1:]):
        plan = compose(plan, resize_plan(previous, grid))
    return ops.to_host(ops.resample_all(plan, source))


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
