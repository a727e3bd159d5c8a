"""Difference-weighted blending and output normalisation (Wodzinski & Müller, arXiv 2503.16075).

The network should change only what needs changing. A weight map w ∈ [0, 1] is derived from
|input − prediction| on a coarse grid (resize → max filter → Gaussian → percentile scaling,
clipped), and the output is ``input·(1 − w) + prediction·w``. All arrays are float32 ZYX. Every step runs
through :class:`fusemycells.ops.Ops` (the one implementation, on the CPU or the GPU); the whole-volume
numpy oracle the streamed steps are tested against is ``test/reference.py``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from scipy import ndimage

from fusemycells.config import PostprocessSpec
from fusemycells.ops import FILTER_TRUNCATE, Ops, filter_plan, gaussian_kernel, resize_plan
from fusemycells.preprocess import percentile_affine, percentiles, sample_stride
from fusemycells.sources import ArraySource, PlaneSource, Shape3, slabs


def correction_weight(
    correction: PlaneSource | np.ndarray,
    spec: PostprocessSpec,
    extent_um: Sequence[float] | None = None,
    *,
    ops: Ops,
) -> np.ndarray:
    """Weight map on ``spec.diff_grid`` from a correction = prediction − input (ZYX, any grid).

    Equal to ``difference_weight`` of the whole-volume oracle (``test/reference.py``; resizing is linear, so
    |resize(p) − resize(x)| = |resize(p − x)|), but reads the correction in z-ranges: it need not be in memory
    as float32. ``extent_um`` (the stack's ZYX size in µm) is needed for filters given in µm
    (:func:`weight_filters`). The resize and the filters run on ``ops`` (:func:`weight_from_coarse`).
    """
    plan = resize_plan(correction.shape, spec.diff_grid)
    coarse = ops.resample_all(plan, correction).abs_()
    with ops.section("weight_map_s"):
        return weight_from_coarse(coarse, spec, extent_um, ops)


def weight_filters(spec: PostprocessSpec, extent_um: Sequence[float] | None = None) -> tuple[Any, Any]:
    """(max filter size, Gaussian σ) of the weight map, in voxels of ``spec.diff_grid``.

    ``weight_filter_unit`` 'voxel': ``spec.weight_max_filter`` and ``spec.weight_sigma`` on every axis: their
    physical size then follows the stack's extent (the diff grid spans the whole stack, whatever its size).
    'um': per-axis sizes of that width in µm from the stack's ZYX ``extent_um`` (required then; the max
    filter rounded to an odd voxel count ≥ 1).
    """
    size: Any = spec.weight_max_filter
    sigma: Any = spec.weight_sigma
    if spec.weight_filter_unit == "voxel":
        return size, sigma
    if extent_um is None:
        raise ValueError("weight-map filters in µm need the stack's extent_um")
    voxel_um = [e / n for e, n in zip(extent_um, spec.diff_grid)]
    size = tuple(max(1, 2 * round((spec.weight_max_filter / v - 1) / 2) + 1) for v in voxel_um)
    sigma = tuple(spec.weight_sigma / v for v in voxel_um)
    return size, sigma


def weight_from_coarse(
    coarse: torch.Tensor, spec: PostprocessSpec, extent_um: Sequence[float] | None, ops: Ops
) -> np.ndarray:
    """Weight map in [0, 1] (host float32, ZYX) from |prediction − input| already on ``spec.diff_grid``, a tensor
    on ``ops``' device: max filter, Gaussian (sizes of :func:`weight_filters`, voxels; :meth:`Ops.maximum_filter`,
    :meth:`Ops.gaussian`) and percentile scaling (the percentiles taken on the host)."""
    size, sigma = weight_filters(spec, extent_um)
    if np.max(size) > 1:
        coarse = ops.maximum_filter(coarse, size)
    if np.max(sigma) > 0:
        coarse = ops.gaussian(coarse, sigma)
    host = ops.to_host(coarse)
    low, high = spec.weight_percentiles
    lo, hi = percentiles(host, low, high)
    if hi - lo < 1e-8:
        # flat difference map: nothing stands out, so keep the input (the conservative choice)
        return np.zeros(spec.diff_grid, dtype=np.float32)
    return np.clip((host - lo) / (hi - lo), 0.0, 1.0).astype(np.float32)


NOISE_KERNEL = np.array([[1, -2, 1], [-2, 4, -2], [1, -2, 1]], dtype=np.float32)
"""Immerkær's (1996) noise kernel: the difference of two Laplacians, blind to linear ramps; for white
noise of σ it responds with σ·6 (the root of the sum of its squared taps)."""


def relative_noise(volume: np.ndarray, max_planes: int = 24, foreground: float = 0.25) -> float:
    """Noise σ of a ZYX volume relative to its 2–99.8 percentile range (dimensionless).

    Estimated per XY plane (up to ``max_planes`` evenly spaced planes) with :data:`NOISE_KERNEL`,
    robustly (1.4826 · median |response| / 6) over foreground voxels (normalised level above
    ``foreground``), where the light-sheet's photon noise matters. 0 when nothing is foreground.
    """
    lo, hi = percentiles(volume, 2.0, 99.8)
    span = max(hi - lo, 1e-6)
    depth = volume.shape[0]
    responses = []
    for z in np.unique(np.linspace(0, depth - 1, min(depth, max_planes)).round().astype(int)):
        plane = (np.asarray(volume[z], dtype=np.float32) - np.float32(lo)) / np.float32(span)
        if min(plane.shape) < 3:
            continue
        response = ndimage.convolve(plane, NOISE_KERNEL, mode="reflect")[1:-1, 1:-1]
        mask = plane[1:-1, 1:-1] > foreground
        if mask.sum() > 50:
            responses.append(np.abs(response[mask]))
    if not responses:
        return 0.0
    return float(1.4826 * np.median(np.concatenate(responses)) / 6.0)


def adaptive_settings(noise: float, spec: PostprocessSpec) -> tuple[float, float]:
    """(output Gaussian σ in voxels, gate on the network correction) for an input's relative noise.

    ``output_sigma_knots`` and ``gate_knots`` are interpolated linearly in the noise level and held
    constant outside their range (one σ knot: a constant σ); without knots σ 0 and gate 1.
    """
    sigma = 0.0
    gate = 1.0
    knots = spec.output_sigma_knots
    if len(knots) == 1:
        sigma = knots[0][1]
    elif knots:
        sigma = float(np.interp(noise, [k[0] for k in knots], [k[1] for k in knots]))
    if spec.gate_knots:
        gate = float(
            np.clip(np.interp(noise, [k[0] for k in spec.gate_knots], [k[1] for k in spec.gate_knots]), 0.0, 1.0)
        )
    return max(sigma, 0.0), gate


def background_mask(
    normalised_input: PlaneSource | np.ndarray, spec: PostprocessSpec, smooth: float = 1.0, *, ops: Ops
) -> np.ndarray:
    """Factor in [0, 1] on ``spec.diff_grid``: 0 in empty background, 1 on the specimen.

    The normalised input (ZYX, any grid) is resized to the diff grid, smoothed (σ ``smooth``
    coarse voxels) and divided by ``spec.background_threshold``. It keeps the networks from
    adding a faint offset to empty space, which the challenge's SSIM punishes hard (its luminance
    term is unstable near zero). All ones when the threshold is 0. The steps run on ``ops``.
    """
    if spec.background_threshold <= 0:
        return np.ones(spec.diff_grid, dtype=np.float32)
    coarse_t = ops.resample_all(resize_plan(normalised_input.shape, spec.diff_grid), normalised_input)
    with ops.section("weight_map_s"):
        coarse = ops.to_host(ops.gaussian(coarse_t, smooth))
        return np.clip(coarse / spec.background_threshold, 0.0, 1.0).astype(np.float32)


FLOAT16_MAX = float(np.finfo(np.float16).max)
"""Largest finite float16 (65504): compact (float16) arrays are clipped to ±this."""


def blend_weight(
    correction: PlaneSource | np.ndarray,
    normalised_input: PlaneSource | np.ndarray,
    spec: PostprocessSpec,
    gate: float | np.ndarray,
    extent_um: Sequence[float] | None = None,
    *,
    ops: Ops,
) -> np.ndarray:
    """The blending weight on ``spec.diff_grid``: :func:`correction_weight` × :func:`background_mask` × ``gate``.

    ``gate`` (0..1) is the per-case confidence in the networks (the noise-adaptive gate of
    :func:`adaptive_settings`, or the factor of :mod:`fusemycells.trust`), a number or a factor per
    region (an array on ``spec.diff_grid``); ``correction`` is prediction − input on any grid (ZYX);
    ``extent_um`` the stack's ZYX size in µm; ``ops`` where the steps run.
    """
    weight = correction_weight(correction, spec, extent_um, ops=ops)
    weight *= background_mask(normalised_input, spec, ops=ops)
    weight *= np.asarray(gate, dtype=np.float32)
    return weight


def blend_slabs(
    data: np.ndarray,
    x_in: ArraySource,
    correction: np.ndarray,
    weight: np.ndarray,
    compact: bool,
    ops: Ops,
    start: int = 0,
    done: list[int] | None = None,
) -> ArraySource:
    """x_in + w·correction on the input grid, slab by slab (float32, or float16 in place when ``compact``).

    ``done[0]`` (when given) is set to the planes blended so far after each slab; ``start`` resumes there
    (a rerun after a device fault: in place, the planes from ``start`` on still hold the input; with a new
    output array ``start`` is ignored).

    ``data`` is the input array ``x_in`` normalises (ZYX, input grid); the correction (on H) and
    the weight map (on the diff grid) are resized to the input grid per slab. In place, each slab
    of the input is read before the same slab of the output overwrites it (float16 over 2-byte
    pixels, float32 over 4-byte ones); float16 values are clipped to ±:data:`FLOAT16_MAX` so the
    output stays finite. Each slab is resized and blended on ``ops``' device (only the input, the correction
    and the output stay on the host). Equal to ``blend`` of the whole-volume oracle (``test/reference.py``).
    """
    in_place = compact and data.flags.c_contiguous and data.flags.writeable
    if in_place and data.dtype.itemsize == 2:
        out = data.view(np.float16)
    elif in_place and data.dtype.itemsize == 4:
        out = data.view(np.float32)
    else:
        out, start = np.empty(data.shape, dtype=np.float32), 0
    _blend_into(out, x_in, correction, weight, ops, start, done)
    return ArraySource(out)


def slabs_from(start: int, n: int, size: int | None = None) -> list[tuple[int, int]]:
    """:func:`~fusemycells.sources.slabs` of planes ``start:n`` (z-ranges)."""
    parts = slabs(n - start) if size is None else slabs(n - start, size)
    return [(start + a, start + b) for a, b in parts]


def _blend_into(
    out: np.ndarray,
    x_in: ArraySource,
    correction: np.ndarray,
    weight: np.ndarray,
    ops: Ops,
    start: int = 0,
    done: list[int] | None = None,
) -> None:
    """:func:`blend_slabs`' loop on ``ops``' device, into the host array ``out`` (float16 or float32): per slab,
    the weights and the correction resized (in parallel z-ranges on the CPU), then blended and stored (from
    plane ``start``; ``done[0]``: the planes stored so far)."""
    shape: Shape3 = tuple(int(n) for n in out.shape)  # type: ignore[assignment]
    corr_plan = resize_plan(correction.shape, shape)
    weight_plan = resize_plan(weight.shape, shape, antialias=False)
    weight_t = torch.from_numpy(np.ascontiguousarray(weight, dtype=np.float32)).to(ops.device)
    target = torch.from_numpy(out)
    size = ops.slab_planes(shape[1] * shape[2], factor=4.0)  # input, correction, weights and temporaries, float32
    parts = max(1, ops.threads) if ops.device == "cpu" else 1

    def resized(z0: int, z1: int) -> tuple[torch.Tensor, torch.Tensor]:
        return ops.resample(weight_plan, weight_t, z0, z1), ops.resample(corr_plan, correction, z0, z1)

    def blend(z0: int, z1: int, w: torch.Tensor, c: torch.Tensor) -> None:
        planes = ops.read(x_in, z0, z1)  # before out[z0:z1] overwrites these input planes (in place)
        planes.addcmul_(w.clamp_(0.0, 1.0), c)
        if out.dtype == np.float16:  # e.g. a 65535 voxel over a percentile span of ~1 would be inf
            planes.clamp_(-FLOAT16_MAX, FLOAT16_MAX)
        target[z0:z1].copy_(planes)

    for z0, z1 in slabs_from(start, shape[0], size * parts):
        ranges = ops.split(z0, z1, parts)
        with ops.section("resampling_s"):
            maps = ops.parallel(resized, *zip(*ranges))
        with ops.section("blend_s"):
            ops.parallel(blend, *zip(*ranges), *zip(*maps))
        del maps
        if done is not None:
            done[0] = z1


def output_sigma_zyx(spec: PostprocessSpec, spacing: Sequence[float] | None = None) -> tuple[float, float, float]:
    """Per-axis σ (ZYX, input-grid voxels) of the output Gaussian for a stack of ``spacing`` (ZYX µm).

    ``spec.output_sigma`` is the X σ; with ``output_sigma_isotropic_um`` (and a spacing) Z and Y
    get σ·spacing_x/spacing_z and σ·spacing_x/spacing_y, i.e. the same width in µm (Y equals X on
    the usual square pixels), else the same σ in voxels on every axis.
    """
    sigma = max(float(spec.output_sigma), 0.0)
    if spec.output_sigma_isotropic_um and spacing is not None and min(spacing) > 0:
        width_um = sigma * float(spacing[2])
        return (width_um / float(spacing[0]), width_um / float(spacing[1]), sigma)
    return (sigma, sigma, sigma)


def weight_stats(weight: np.ndarray, bins: Sequence[float] = (0.1, 0.5, 0.9)) -> dict[str, float]:
    """Fractions of the weight map above each threshold (for the report)."""
    return {f"w>{b:g}": float((weight > b).mean()) for b in bins}


def final_source(
    blended: PlaneSource,
    spec: PostprocessSpec,
    dtype: str = "float32",
    spacing: Sequence[float] | None = None,
    *,
    ops: Ops,
) -> PlaneSource:
    """The output as a lazy source (ZYX): optional filters, percentile normalisation, then ``dtype``.

    Same values as ``finalise`` then ``to_output_dtype`` of the whole-volume oracle (``test/reference.py``), to
    float32 rounding; ``spacing`` is the stack's ZYX spacing in µm. The filters and the affine maps run on
    ``ops``' device (:class:`OutputSource`), the output computed again while it is written: one streamed pass
    for the percentile sample (on big stacks only at the sampled voxels, :func:`gathered_sample`), one more for
    the uint16 range when that pass did not see it all. No float32 copy of the volume is made.
    """
    if dtype not in ("float32", "uint16"):
        raise ValueError(f"unknown output dtype '{dtype}' (expected float32 or uint16)")
    filtered = OutputSource(blended, spec, spacing, ops)
    sample, extremes_seen = _percentile_sample(blended, filtered, ops)
    with ops.section("percentile_normalisation_s"):
        low, high = spec.output_percentiles
        offset, scale = percentile_affine(sample, low, high)
    normalised = filtered.with_affine(offset, scale)
    if dtype == "float32":
        return normalised
    if extremes_seen is not None:  # the uint16 range from the sampling pass: no pass more
        lo, hi = (_affine_value(v, offset, scale) for v in extremes_seen)
        return normalised.with_affine(*uint16_affine(lo, hi), np.uint16)

    def extremes(z0: int, z1: int) -> tuple[float, float]:
        block = normalised.normalised(z0, z1)
        return float(block.min()), float(block.max())

    with ops.section("output_filter_s"):  # the uint16 range: one more pass (the affine maps in it are cheap)
        ranges = ops.parallel(extremes, *zip(*_ranges(normalised)))
    lo, hi = min(r[0] for r in ranges), max(r[1] for r in ranges)
    return normalised.with_affine(*uint16_affine(lo, hi), np.uint16)


def _percentile_sample(
    blended: PlaneSource, filtered: OutputSource, ops: Ops
) -> tuple[np.ndarray, tuple[float, float] | None]:
    """The voxels :func:`~fusemycells.preprocess.percentiles` samples (every ``sample_stride``-th in C order) of
    the filtered output, and its [min, max] when the pass saw every voxel (else None): at the sampled voxels
    only (:func:`gathered_sample`) on big stacks on the CPU, else one streamed pass (in the worker threads)."""
    stride = sample_stride(math.prod(filtered.shape))
    gather = ops.scipy_filters and isinstance(blended, ArraySource) and not filtered.max_size
    if gather and stride >= GATHER_MIN_STRIDE:
        with ops.section("percentile_normalisation_s"):  # the filter at the sampled voxels only
            sigma = filtered.sigma if filtered.plan is not None else (0.0, 0.0, 0.0)
            return gathered_sample(blended, sigma, stride, ops=ops), None
    with ops.section("output_filter_s"):  # and the sampling (in the worker threads on the CPU)
        parts = ops.parallel(lambda z0, z1: _sampled(filtered, z0, z1, stride), *zip(*_ranges(filtered)))
    sample = np.concatenate([p[0] for p in parts])
    return sample, (min(p[1] for p in parts), max(p[2] for p in parts))


OUTPUT_WORKING_FACTOR = 4.0
"""Float32 copies of its output planes one worker of the output pass holds at once: the planes read with their
z-halo, the z and y passes of the Gaussian, its x pass (measured on 160×900×900: 4.5–5.5 with the old uint16
conversion's two more copies)."""
OUTPUT_PASS_SHARE = 0.125
"""The CPU output pass's working set (all workers together) as a share of the stack's float32 bytes, at most
(¼ of a uint16 input's bytes): at 256 MiB per worker the pass held ≈ 4× a 160×900×900 stack's uint16 bytes
on top of the input, so a run peaked at 5.2× the input (docs/performance-cpu.md, *Mid-size memory*)."""


def output_slab_planes(shape: Shape3, ops: Ops) -> int:
    """Planes of the output pass one worker computes at once (ZYX ``shape`` in voxels): what :attr:`Ops.slab_bytes`
    allows for :data:`OUTPUT_WORKING_FACTOR` float32 copies, and on the CPU at most :data:`OUTPUT_PASS_SHARE` of
    the stack's float32 bytes over all workers (at least one plane)."""
    planes = ops.slab_planes(shape[1] * shape[2], factor=OUTPUT_WORKING_FACTOR)
    if ops.device == "cpu":
        share = OUTPUT_PASS_SHARE * shape[0] / (max(1, ops.threads) * OUTPUT_WORKING_FACTOR)
        planes = min(planes, max(1, int(share)))
    return planes


class OutputSource:
    """The manifest's optional output filters (max filter ``output_max_filter`` voxels, Gaussian σ of
    :func:`output_sigma_zyx`), then affine maps, computed with torch per z-range (ZYX).

    ``planes`` returns host arrays of ``dtype`` (float32, or uint16 rounded to nearest after the last
    map); :meth:`tensor` the float32 planes on the device before the affine maps. Max filter: max
    pooling over edge-padded borders; Gaussian: band matrices (:func:`fusemycells.ops.filter_plan`),
    both exact twins of scipy's 'nearest' mode, the z-halo read from the source.
    """

    def __init__(
        self,
        source: PlaneSource,
        spec: PostprocessSpec,
        spacing: Sequence[float] | None,
        ops: Ops,
        affines: Sequence[tuple[float, float]] = (),
        dtype: type = np.float32,
    ) -> None:
        self.source, self.ops, self.affines = source, ops, list(affines)
        self.shape: Shape3 = source.shape
        self.dtype = np.dtype(dtype)
        self.max_size = int(spec.output_max_filter) if spec.output_max_filter > 1 else 0
        self.sigma = output_sigma_zyx(spec, spacing)
        self.plan = filter_plan(self.shape, self.sigma, FILTER_TRUNCATE) if spec.output_sigma > 0 else None
        self.preferred_slab = output_slab_planes(self.shape, ops)

    def with_affine(self, offset: float, scale: float, dtype: type = np.float32) -> OutputSource:
        """This source followed by ``(v − offset)·scale`` (then rounded when ``dtype`` is an integer type)."""
        out = OutputSource.__new__(OutputSource)
        out.__dict__.update(self.__dict__)
        out.affines, out.dtype = [*self.affines, (offset, scale)], np.dtype(dtype)
        return out

    def _maximum(self, z0: int, z1: int) -> torch.Tensor:
        """Planes z0:z1 after the max filter (or as read, without one)."""
        if not self.max_size:
            return self.ops.read(self.source, z0, z1)
        before, after = self.max_size // 2, self.max_size - 1 - self.max_size // 2
        lo, hi = max(0, z0 - before), min(self.shape[0], z1 + after)
        block = self.ops.read(self.source, lo, hi)
        with self.ops.section("output_filter_s"):
            pad_lo, pad_hi = before - (z0 - lo), after - (hi - z1)
            if pad_lo or pad_hi:
                block = torch.cat([block[:1].expand(pad_lo, -1, -1), block, block[-1:].expand(pad_hi, -1, -1)])
            return _max_valid(block, self.max_size)

    def tensor(self, z0: int, z1: int) -> torch.Tensor:
        """Planes z0:z1 after the filters (float32, on the device), before the affine maps."""
        if self.plan is None:
            return self._maximum(z0, z1)
        a, b = self.plan.maps[0].span(z0, z1)
        block = self._maximum(a, b)
        with self.ops.section("output_filter_s"):
            return self.ops.gaussian_planes(self.plan, block, z0, z1, a, FILTER_TRUNCATE)

    def normalised(self, z0: int, z1: int) -> torch.Tensor:
        """Planes z0:z1 after the filters and the affine maps (float32, rounded for an integer dtype)."""
        return self._affine(self.tensor(z0, z1))

    def _affine(self, planes: torch.Tensor) -> torch.Tensor:
        """The affine maps (in place) and the rounding of an integer dtype."""
        for offset, scale in self.affines:
            planes = planes.sub_(float(np.float32(offset))).mul_(float(np.float32(scale)))
        return planes.round_() if self.dtype.kind in "ui" else planes

    def _ranges(self, z0: int, z1: int) -> list[tuple[int, int]]:
        """``z0:z1`` split over the workers, on the CPU in pieces of at most :attr:`preferred_slab` planes."""
        ranges = self.ops.split(z0, z1)
        if self.ops.device != "cpu":
            return ranges
        return [(a + p, a + q) for a, b in ranges for p, q in slabs(b - a, self.preferred_slab)]

    def planes(self, z0: int, z1: int) -> np.ndarray:
        out = np.empty((z1 - z0, *self.shape[1:]), dtype=self.dtype)

        def one(a: int, b: int) -> None:  # filtered and stored by the same worker: one piece in flight per worker
            with self.ops.section("output_filter_s"):
                planes = self.tensor(a, b)
            with self.ops.section("percentile_normalisation_s"):
                planes = self._affine(planes)
                if self.dtype.kind in "ui":  # already rounded: numpy's cast on assignment, no converted copy
                    out[a - z0 : b - z0] = planes.cpu().numpy()
                else:
                    torch.from_numpy(out[a - z0 : b - z0]).copy_(planes)

        with self.ops.section("output_filter_s"):  # on the CPU, the workers' time (their sections are no-ops)
            self.ops.parallel(one, *zip(*self._ranges(z0, z1)))
        return out


def _max_valid(block: torch.Tensor, size: int) -> torch.Tensor:
    """The max filter (``size`` voxels per axis) of a block that carries its z-halo (``size`` − 1 planes):
    the ``len(block) − size + 1`` planes it determines, y and x edge-padded (scipy's 'nearest')."""
    before = size // 2
    pads = [before, size - 1 - before, before, size - 1 - before, 0, 0]
    padded = torch.nn.functional.pad(block[None, None], pads, mode="replicate")
    return torch.nn.functional.max_pool3d(padded, kernel_size=size, stride=1)[0, 0]


def uint16_affine(lo: float, hi: float) -> tuple[float, float]:
    """(offset, scale) of the uint16 output: ``rint((v − offset)·scale)`` maps the normalised output's [lo, hi]
    onto 0..65535, affinely, with v = 0 exactly on an integer level when lo < 0 < hi.

    0 is the output's 2nd percentile (percentile normalisation), often a plateau of many background voxels:
    rounded off a level, the plateau moves against its neighbours by a fraction of a level, and the metric,
    which takes the plateau as its own 2nd percentile again, saw N-SSIM move by up to 9·10⁻⁴ on simulated
    validation cases; anchored, by ≤ 10⁻⁵ (docs/output_and_device_faults.md). The lowest value maps to 0 or 1.
    """
    if not hi > lo:
        return lo, 0.0
    scale = 65535.0 / (hi - lo)
    if not lo < 0.0 < hi:
        return lo, scale
    level = math.ceil(-lo * scale)  # where 0 goes: hi·scale' + level = 65535 with scale' ≤ scale, so lo stays ≥ 0
    scale = (65535.0 - level) / hi
    return -level / scale, scale


GATHER_MIN_STRIDE = 100
"""From this sampling stride on (stacks of ≥ 4·10⁸ voxels) the percentile sample of a filtered output is computed
at the sampled voxels only (:func:`gathered_sample`) instead of filtering the whole volume once more."""


def _in_slab(flat: Any, z0: int, plane_voxels: int, stride: int) -> Any:
    """The sampled voxels (every ``stride``-th of the volume in C order) among a flattened slab that starts
    at plane ``z0`` (a strided view of the numpy array or tensor ``flat``)."""
    first = (-(z0 * plane_voxels)) % stride  # index of the first sampled voxel inside this slab
    return flat[first::stride]


def gathered_sample(
    source: ArraySource,
    sigma: Sequence[float],
    stride: int,
    truncate: float = FILTER_TRUNCATE,
    chunk: int = 1 << 15,
    *,
    ops: Ops,
) -> np.ndarray:
    """The voxels ``0, stride, 2·stride, …`` (C order) of ``gaussian_filter(source, sigma, mode='nearest',
    truncate)`` computed from their neighbourhoods only: the strided sample of :func:`_percentile_sample` on the
    filtered output without filtering the whole volume (float32; equal to float32 rounding).

    Each sample gathers its (2r_z + 1) × (2r_y + 1) rows of 2r_x + 1 contiguous voxels (a sliding-window view,
    the x-window moved inside the row at the borders, its weights folded accordingly) and reduces Z, then Y,
    then X, the order of scipy's separable filter. ``source`` is an :class:`ArraySource` (its affine map applied
    to the gathered voxels).
    """
    array = source.array
    nz, ny, nx = array.shape
    kernels = [gaussian_kernel(s, truncate) if s > 1e-15 else np.ones(1) for s in sigma]
    rz, ry, rx = (len(k) // 2 for k in kernels)
    width = min(2 * rx + 1, nx)
    kz, ky, kx = (torch.from_numpy(k.astype(np.float32)) for k in kernels)
    windows = np.lib.stride_tricks.sliding_window_view(array.reshape(-1), width)  # a view, no copy
    positions = np.arange(0, array.size, stride, dtype=np.int64)
    out = np.empty(len(positions), dtype=np.float32)
    offset, scale = float(np.float32(source.offset)), float(np.float32(source.scale))

    def one(c0: int) -> None:
        pos = positions[c0 : c0 + chunk]
        z, rem = np.divmod(pos, ny * nx)
        y, x = np.divmod(rem, nx)
        zz = np.clip(z[:, None] + np.arange(-rz, rz + 1), 0, nz - 1)
        yy = np.clip(y[:, None] + np.arange(-ry, ry + 1), 0, ny - 1)
        xs = np.clip(x - rx, 0, nx - width)
        starts = (zz[:, :, None] * ny + yy[:, None, :]) * nx + xs[:, None, None]
        block = torch.from_numpy(windows[starts]).to(torch.float32)  # (n, 2r_z + 1, 2r_y + 1, width)
        if offset != 0.0 or scale != 1.0:
            block.sub_(offset).mul_(scale)
        lines = torch.einsum("nyk,y->nk", torch.einsum("nzyk,z->nyk", block, kz), ky)
        # X taps on the window: the kernel where it is centred, folded (edge voxels repeat) near the borders
        wx = kx[None].repeat(len(pos), 1) if width == 2 * rx + 1 else torch.zeros(len(pos), width)
        edge = np.flatnonzero((x < rx) | (x >= nx - rx) | (width != 2 * rx + 1))
        if len(edge):
            wx[edge] = 0.0
            for tap in range(2 * rx + 1):
                cols = np.clip(x[edge] + tap - rx, 0, nx - 1) - xs[edge]
                wx[edge, cols] += kx[tap]
        out[c0 : c0 + len(pos)] = (lines * wx).sum(1).numpy()

    starts = range(0, len(positions), chunk)
    if ops.device == "cpu":
        ops.parallel(one, starts)
    else:
        for c0 in starts:
            one(c0)
    return out


def _ranges(source: OutputSource) -> list[tuple[int, int]]:
    """The z-ranges of ``source.preferred_slab`` planes covering it."""
    return list(slabs(source.shape[0], source.preferred_slab))


def _sampled(source: OutputSource, z0: int, z1: int, stride: int) -> tuple[np.ndarray, float, float]:
    """The voxels of :func:`_percentile_sample` (every ``stride``-th in C order) among planes z0:z1 of the
    filtered source, taken on its device (a host copy), and the planes' min and max."""
    ny, nx = source.shape[1:]
    planes = source.tensor(z0, z1)
    sample = _in_slab(planes.reshape(-1), z0, ny * nx, stride).cpu().numpy().copy()
    return sample, float(planes.min()), float(planes.max())


def _affine_value(value: float, offset: float, scale: float) -> float:
    """``(value − offset)·scale`` rounded as :meth:`OutputSource._affine` computes it per voxel (float32):
    the map is monotone, so the normalised output's extremes are the images of the filtered output's."""
    return float((np.float32(value) - np.float32(offset)) * np.float32(scale))
