"""The non-network steps' one implementation (resampling, Gaussian and max filters, weight map, blend), with torch
on the CPU's cores or on the networks' GPU.

Every resize and every Gaussian of the pipeline is a separable linear map: along each axis an optional
Gaussian prefilter with scipy's 'nearest' borders, then linear interpolation at voxel centres
(``align_corners=False``, clamped at the borders). :func:`axis_map` writes that map down as a band
matrix (float64) and :class:`Ops` applies it with torch on z-slabs: band-blocked matrix products along
shrinking or filtered axes (only the output voxels are computed, however wide the Gaussian: a 1920 → 128
shrink with σ 7.5 costs ~300 multiply-adds per output instead of 45 per input voxel), torch's bilinear
interpolation along growing ones. Chained resizes compose into one map per axis (:func:`compose`). Results
equal the whole-volume numpy oracle (``test/reference.py``: ``scipy.ndimage.gaussian_filter``, then linear
interpolation along each axis) to float32 rounding (tested in ``test/test_ops.py``).

:func:`choose_ops` is the one place that decides where these steps run (the GPU when the networks run on
CUDA and torch sees it, else torch on all CPU cores). Arrays are ZYX; shapes are voxels.
"""

from __future__ import annotations

import math
import os
import threading
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import cached_property
from typing import TypeVar

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from fusemycells.runtime.devices import torch_threads
from fusemycells.runtime.timing import Profile
from fusemycells.sources import ArraySource, Shape3, slabs

T = TypeVar("T")

RESIZE_TRUNCATE = 3.0
"""Gaussian prefilter radius in σ of the antialiased resize (scipy's ``truncate``)."""
FILTER_TRUNCATE = 4.0
"""Gaussian radius in σ of the weight-map and output filters (scipy's default ``truncate``)."""
BAND_WINDOW = 96
"""Input voxels per output group of a band-blocked product (beyond the Gaussian's own width): larger groups
make bigger, faster matrix products but more multiply-adds per output."""
CPU_SLAB_BYTES = 256 * 2**20
"""float32 working set per slab on the CPU (bytes)."""
GPU_SLAB_FRACTION = 0.125
"""Share of the VRAM budget one slab may take on the GPU (several slab-sized temporaries coexist)."""
GPU_SLAB_BYTES_MAX = 2 * 2**30
POOL_PREFIX = "fmc-ops"
"""Name prefix of the CPU worker threads (:meth:`Ops.parallel` inside one of them runs in that thread)."""


def antialias_sigma(in_shape: Sequence[int], out_shape: Sequence[int]) -> tuple[float, ...]:
    """Per-axis Gaussian σ (input voxels) that suppresses aliasing before a downsampling (ZYX shapes in voxels).

    σ = sqrt(f² − 1) / 2 for a shrink factor f > 1 (the usual rule, as in scikit-image), 0 otherwise.
    """
    sigmas = []
    for n_in, n_out in zip(in_shape, out_shape):
        factor = n_in / n_out
        sigmas.append(math.sqrt(factor**2 - 1.0) / 2.0 if factor > 1.0 else 0.0)
    return tuple(sigmas)


def gaussian_kernel(sigma: float, truncate: float) -> np.ndarray:
    """scipy.ndimage's 1D Gaussian taps (float64, sum 1), radius ``int(truncate·σ + 0.5)`` voxels."""
    radius = int(truncate * sigma + 0.5)
    x = np.arange(-radius, radius + 1, dtype=np.float64)
    phi = np.exp(-0.5 / (sigma * sigma) * x**2)
    return phi / phi.sum()


@dataclass(frozen=True)
class AxisMap:
    """A linear map along one axis as a band: ``out[i] = Σ_k weights[i, k] · in[starts[i] + k]`` (voxels)."""

    n_in: int
    n_out: int
    starts: np.ndarray  # (n_out,) int64
    weights: np.ndarray  # (n_out, width) float64
    interpolation_only: bool  # linear interpolation without a prefilter (≤ 2 taps per output)

    @property
    def width(self) -> int:
        return int(self.weights.shape[1])

    @property
    def identity(self) -> bool:
        return self.n_in == self.n_out and self.width == 1 and bool(np.all(self.weights == 1.0))

    def dense(self) -> np.ndarray:
        """The (n_out, n_in) float64 matrix."""
        out = np.zeros((self.n_out, self.n_in), dtype=np.float64)
        rows = np.arange(self.n_out)[:, None]
        np.add.at(out, (rows, self.starts[:, None] + np.arange(self.width)), self.weights)
        return out

    def span(self, i0: int, i1: int) -> tuple[int, int]:
        """The input range ``[a, b)`` that outputs ``i0:i1`` read."""
        return int(self.starts[i0:i1].min()), int(self.starts[i0:i1].max()) + self.width

    def block(self, i0: int, i1: int, a: int, b: int) -> np.ndarray:
        """Rows ``i0:i1`` restricted to input columns ``a:b`` (which must cover their span), float64."""
        out = np.zeros((i1 - i0, b - a), dtype=np.float64)
        rows = np.arange(i1 - i0)[:, None]
        np.add.at(out, (rows, self.starts[i0:i1, None] - a + np.arange(self.width)), self.weights[i0:i1])
        return out

    @cached_property
    def groups(self) -> list[tuple[int, int, int, int]]:
        """Consecutive outputs ``(i0, i1)`` with their input span ``(a, b)``: each group's inputs stay within
        :data:`BAND_WINDOW` + the band width, so a group is one small dense product."""
        limit = BAND_WINDOW + self.width
        if self.n_in <= limit:
            return [(0, self.n_out, 0, self.n_in)]
        out, i0 = [], 0
        ends = self.starts + self.width
        while i0 < self.n_out:
            i1 = i0 + 1
            while i1 < self.n_out and ends[i1] - self.starts[i0] <= limit:
                i1 += 1
            a, b = self.span(i0, i1)
            out.append((i0, i1, a, b))
            i0 = i1
        return out


def band(dense: np.ndarray, interpolation_only: bool = False) -> AxisMap:
    """The :class:`AxisMap` of a dense (n_out, n_in) matrix (each row's nonzeros within one band)."""
    n_out, n_in = dense.shape
    nonzero = dense != 0
    first = np.argmax(nonzero, axis=1)
    last = n_in - 1 - np.argmax(nonzero[:, ::-1], axis=1)
    width = int(max(1, (last - first + 1).max()))
    starts = np.minimum(first, n_in - width).astype(np.int64)
    weights = dense[np.arange(n_out)[:, None], starts[:, None] + np.arange(width)]
    return AxisMap(n_in, n_out, starts, weights, interpolation_only)


def axis_map(n_in: int, n_out: int, sigma: float = 0.0, truncate: float = RESIZE_TRUNCATE) -> AxisMap:
    """Gaussian σ (input voxels; 0: none; 'nearest' borders, radius ``int(truncate·σ + 0.5)``), then linear
    interpolation from ``n_in`` to ``n_out`` voxels at aligned voxel centres (``align_corners=False``)."""
    coords = np.clip((np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5, 0, n_in - 1)
    lo = np.floor(coords).astype(np.int64)
    hi = np.minimum(lo + 1, n_in - 1)
    frac = coords - lo
    kernel = gaussian_kernel(sigma, truncate) if sigma > 0 else np.ones(1)
    radius = len(kernel) // 2
    dense = np.zeros((n_out, n_in), dtype=np.float64)
    rows = np.arange(n_out)
    for offset, tap in zip(range(-radius, radius + 1), kernel):
        np.add.at(dense, (rows, np.clip(lo + offset, 0, n_in - 1)), (1.0 - frac) * tap)
        np.add.at(dense, (rows, np.clip(hi + offset, 0, n_in - 1)), frac * tap)
    return band(dense, interpolation_only=sigma <= 0)


@dataclass(frozen=True)
class ResizePlan:
    """One :class:`AxisMap` per axis (Z, Y, X): a separable map from ``in_shape`` to ``out_shape`` voxels."""

    maps: tuple[AxisMap, AxisMap, AxisMap]
    sigma: tuple[float, float, float] | None = None  # the Gaussian's σ per axis (voxels) when the plan is a filter

    @property
    def in_shape(self) -> Shape3:
        return tuple(m.n_in for m in self.maps)  # type: ignore[return-value]

    @property
    def out_shape(self) -> Shape3:
        return tuple(m.n_out for m in self.maps)  # type: ignore[return-value]


def resize_plan(in_shape: Sequence[int], out_shape: Sequence[int], antialias: bool = True) -> ResizePlan:
    """The plan of ``preprocess.ResizedSource(…, out_shape, antialias)`` (ZYX shapes, voxels): σ =
    :func:`antialias_sigma` on shrinking axes."""
    sigma = antialias_sigma(in_shape, out_shape) if antialias else (0.0, 0.0, 0.0)
    maps = tuple(axis_map(int(n), int(m), s, RESIZE_TRUNCATE) for n, m, s in zip(in_shape, out_shape, sigma))
    return ResizePlan(maps)  # type: ignore[arg-type]


def filter_plan(shape: Sequence[int], sigma: Sequence[float], truncate: float = FILTER_TRUNCATE) -> ResizePlan:
    """A Gaussian filter (σ per axis, voxels; ``scipy.ndimage.gaussian_filter`` with mode 'nearest') as a plan."""
    maps = tuple(axis_map(int(n), int(n), float(s), truncate) for n, s in zip(shape, sigma))
    return ResizePlan(maps, tuple(float(s) for s in sigma))  # type: ignore[arg-type]


def compose(first: ResizePlan, second: ResizePlan) -> ResizePlan:
    """``second ∘ first`` (``first`` applied first) as one plan: the product of the two maps per axis."""
    if first.out_shape != second.in_shape:
        raise ValueError(f"cannot compose {first.out_shape} with a plan from {second.in_shape}")
    maps = tuple(band(b.dense() @ a.dense()) for a, b in zip(first.maps, second.maps))
    return ResizePlan(maps)  # type: ignore[arg-type]


class TensorSource:
    """A ZYX tensor (on any device) as a plane source; ``planes`` returns a host float32 copy."""

    def __init__(self, tensor: torch.Tensor) -> None:
        self.tensor = tensor
        self.shape: Shape3 = tuple(int(n) for n in tensor.shape)  # type: ignore[assignment]

    def planes(self, z0: int, z1: int) -> np.ndarray:
        return self.tensor[z0:z1].float().cpu().numpy().copy()


@dataclass
class Ops:
    """Where one case's non-network steps run and where their time goes.

    ``device`` is a torch device ('cpu', 'cuda'); ``slab_bytes``
    the float32 working set of one slab there; ``profile`` receives the exclusive seconds; ``threads``
    the worker threads on the CPU. ``cpu_hybrid`` (CPU only): use the filters measured fastest on the CPU
    (:attr:`scipy_filters`) instead of the GPU's code path; tests turn it off to run the GPU's code on the
    CPU.
    """

    device: str = "cpu"
    slab_bytes: int = CPU_SLAB_BYTES
    profile: Profile = field(default_factory=Profile)
    threads: int = field(default_factory=lambda: os.cpu_count() or 1)
    cpu_hybrid: bool = True

    @property
    def scipy_filters(self) -> bool:
        """Short Gaussian filters along X and max filters with scipy instead of torch: on the CPU scipy's line
        filters did more voxels per CPU second than torch's shifted sums, convolutions or band products for
        kernels of a few taps (README, *Performance*)."""
        return self.device == "cpu" and self.cpu_hybrid

    @cached_property
    def pool(self) -> ThreadPoolExecutor:
        return ThreadPoolExecutor(max_workers=max(1, self.threads), thread_name_prefix=POOL_PREFIX)

    def parallel(self, fn: Callable[..., T], *iterables: Iterable) -> list[T]:
        """``[fn(*args) for args in zip(*iterables)]``: on the CPU on :attr:`threads` worker threads with torch
        set to one thread meanwhile, on a GPU in this thread (one stream: each op is parallel there).

        On the CPU the work is split over independent workers instead of torch's OpenMP threads: on a busy
        machine (this project's 2-core development host at a load of 6–7) every OpenMP barrier waits for a
        core, and 2-thread torch ops took 1.3–20× the CPU seconds of 1-thread ones (the larger factors on the
        smaller ops), while single-threaded workers never wait for each other. torch's thread count is
        process-wide: no other torch work runs while the pipeline is in these steps (the patch stage's
        concurrent forwards run on one thread each already).
        """
        if self.device != "cpu" or threading.current_thread().name.startswith(POOL_PREFIX):  # no nesting: run here
            return [fn(*args) for args in zip(*iterables)]
        with torch_threads(1):
            return list(self.pool.map(fn, *iterables))

    def split(self, z0: int, z1: int, parts: int | None = None) -> list[tuple[int, int]]:
        """``z0:z1`` cut into up to ``parts`` (default: the worker threads on the CPU, 1 on a GPU) ranges."""
        count = (max(1, self.threads) if self.device == "cpu" else 1) if parts is None else parts
        edges = np.linspace(z0, z1, min(count, z1 - z0) + 1).round().astype(int)
        return [(int(a), int(b)) for a, b in zip(edges[:-1], edges[1:]) if b > a]

    def section(self, name: str):
        return self.profile.section(name)

    def slab_planes(self, plane_voxels: int, factor: float = 1.0) -> int:
        """Planes per slab whose float32 working set (``factor`` × the planes) fits :attr:`slab_bytes`."""
        return int(max(1, min(512, self.slab_bytes // max(1, int(4 * plane_voxels * factor)))))

    # ---- moving data ----

    def read(self, source, z0: int, z1: int, affine: bool = True) -> torch.Tensor:
        """Planes ``z0:z1`` of a source (plane source, array or tensor) as a new float32 tensor on the device;
        an :class:`ArraySource`'s raw pixels are moved and converted there, its affine map applied unless
        ``affine`` is False (see :func:`raw_affine`)."""
        if isinstance(source, torch.Tensor):
            return source[z0:z1].to(self.device, dtype=torch.float32, copy=True)
        if isinstance(source, TensorSource):
            return source.tensor[z0:z1].to(self.device, dtype=torch.float32, copy=True)
        if isinstance(source, np.ndarray):
            return _to_device(source[z0:z1], self.device)
        if isinstance(source, ArraySource):
            block = _to_device(source.array[z0:z1], self.device)
            if affine and (source.offset != 0.0 or source.scale != 1.0):
                block.sub_(float(np.float32(source.offset))).mul_(float(np.float32(source.scale)))
            return block
        return _to_device(source.planes(z0, z1), self.device)

    def to_host(self, tensor: torch.Tensor) -> np.ndarray:
        """A host float32 numpy array (a view of the tensor on the CPU)."""
        return tensor.float().cpu().numpy()

    # ---- resampling ----

    def resample(self, plan: ResizePlan, source, z0: int, z1: int, section: str = "resampling_s") -> torch.Tensor:
        """Output planes ``z0:z1`` of ``plan`` applied to ``source`` (float32 tensor on the device).

        An :class:`ArraySource`'s affine map is applied to the (smaller) output instead of its input: the
        rows of a resize sum to 1, so both orders give the same values (to float32 rounding)."""
        a, b = plan.maps[0].span(z0, z1)
        with self.section(section):
            offset, scale = raw_affine(source)
            block = self.read(source, a, b, affine=False)
            out = self.resample_block(plan, block, z0, z1, a, section)
            if offset != 0.0 or scale != 1.0:
                out = out.sub_(float(np.float32(offset))).mul_(float(np.float32(scale)))
            return out

    def resample_block(
        self, plan: ResizePlan, block: torch.Tensor, z0: int, z1: int, a: int, section: str = "resampling_s"
    ) -> torch.Tensor:
        """Output planes ``z0:z1`` of ``plan`` from a block of its input planes ``a : a + len(block)`` (which
        must cover ``plan.maps[0].span(z0, z1)``); a new tensor (never a view of ``block``); the time goes to
        ``section``."""
        mz, my, mx = plan.maps
        with self.section(section):
            n_in_yx, n_out_yx = my.n_in * mx.n_in, my.n_out * mx.n_out
            if (z1 - z0) * n_in_yx < len(block) * n_out_yx:  # z first: fewer voxels to carry through y/x
                out = self.apply_yx(self.apply_z(block, mz, z0, z1, a), my, mx)
            else:
                out = self.apply_z(self.apply_yx(block, my, mx), mz, z0, z1, a)
            return out.clone() if out.data_ptr() == block.data_ptr() else out

    def resample_all(self, plan: ResizePlan, source) -> torch.Tensor:
        """The whole output of ``plan`` on ``source`` (a tensor on the device; for small output grids)."""
        out = torch.empty(plan.out_shape, dtype=torch.float32, device=self.device)
        mz, my, mx = plan.maps
        budget = self.slab_planes(max(my.n_in * mx.n_in, my.n_out * mx.n_out))  # input planes per block
        step = max(1, int((budget - mz.width) * mz.n_out / max(1, mz.n_in)))
        ranges = list(slabs(mz.n_out, step)) if parallel_safe(source) else [(0, mz.n_out)]

        def one(z0: int, z1: int) -> None:
            for a, b in slabs(z1 - z0, step):
                out[z0 + a : z0 + b] = self.resample(plan, source, z0 + a, z0 + b)

        with self.section("resampling_s"):
            self.parallel(one, *zip(*ranges))
        return out

    def apply_z(self, block: torch.Tensor, m: AxisMap, z0: int, z1: int, a: int) -> torch.Tensor:
        """Outputs ``z0:z1`` along Z of a block holding input planes ``a : a + len(block)``."""
        if m.identity:
            return block[z0 - a : z1 - a]
        weights = torch.from_numpy(m.block(z0, z1, a, a + len(block))).to(self.device, torch.float32)
        flat = block.reshape(len(block), -1)
        return (weights @ flat).reshape(z1 - z0, *block.shape[1:])

    def apply_yx(self, block: torch.Tensor, my: AxisMap, mx: AxisMap) -> torch.Tensor:
        """Y and X maps on a (Z, Y, X) block: torch's bilinear resize when both only interpolate, else
        band-blocked products, the more shrinking axis first."""
        if my.identity and mx.identity:
            return block
        if my.interpolation_only and mx.interpolation_only:
            return F.interpolate(block[:, None], size=(my.n_out, mx.n_out), mode="bilinear", align_corners=False)[:, 0]
        if my.n_out / my.n_in <= mx.n_out / mx.n_in:
            return self.apply_axis(self.apply_axis(block, my, 1), mx, 2)
        return self.apply_axis(self.apply_axis(block, mx, 2), my, 1)

    def apply_axis(self, block: torch.Tensor, m: AxisMap, dim: int) -> torch.Tensor:
        """``m`` along ``dim`` (1: Y, 2: X) of a (Z, Y, X) tensor, one dense product per output group."""
        if m.identity:
            return block
        block = block.contiguous()
        shape = list(block.shape)
        shape[dim] = m.n_out
        out = torch.empty(shape, dtype=torch.float32, device=block.device)
        rows, rows_out = block.view(-1, block.shape[2]), out.view(-1, out.shape[2])
        for i0, i1, a, b in m.groups:
            weights = self._group_weights(m, i0, i1, a, b)
            if dim == 2:  # a column range of a row-major matrix is a strided BLAS operand: no copies
                torch.mm(rows[:, a:b], weights.T, out=rows_out[:, i0:i1])
            else:
                out[:, i0:i1, :] = weights @ block[:, a:b, :]
        return out

    def _group_weights(self, m: AxisMap, i0: int, i1: int, a: int, b: int) -> torch.Tensor:
        cache = self.__dict__.setdefault("_weights", {})
        key = (id(m), i0, i1)
        if key not in cache:
            cache[key] = (m, torch.from_numpy(m.block(i0, i1, a, b)).to(self.device, torch.float32))
        return cache[key][1]

    # ---- filters ----

    def gaussian_x_host(self, block: np.ndarray, sigma: float, truncate: float) -> np.ndarray:
        """``scipy.ndimage.gaussian_filter1d`` along X (mode 'nearest') of a ZYX float32 array, split over
        :attr:`threads` worker threads by rows (scipy releases the GIL)."""
        out = np.empty_like(block)
        rows, rows_out = block.reshape(-1, block.shape[2]), out.reshape(-1, block.shape[2])
        edges = np.linspace(0, len(rows), min(self.threads, len(rows)) + 1).astype(int)

        def run(a: int, b: int) -> None:
            ndimage.gaussian_filter1d(rows[a:b], sigma, axis=1, output=rows_out[a:b], mode="nearest", truncate=truncate)

        self.parallel(run, edges[:-1], edges[1:])
        return out

    def maximum_filter(self, volume: torch.Tensor, size: int | Sequence[int]) -> torch.Tensor:
        """``scipy.ndimage.maximum_filter(volume, size, mode='nearest')`` of a ZYX tensor: scipy on the CPU,
        else one max pooling per axis over edge-padded borders (the maximum is separable)."""
        sizes = [int(size)] * 3 if np.isscalar(size) else [int(s) for s in size]  # type: ignore[arg-type]
        if self.scipy_filters:
            return torch.from_numpy(ndimage.maximum_filter(self.to_host(volume), size=sizes, mode="nearest"))
        out = volume[None, None]
        for axis, s in enumerate(sizes):
            if s <= 1:
                continue
            pads = [0] * 6
            pads[2 * (2 - axis)], pads[2 * (2 - axis) + 1] = s // 2, s - 1 - s // 2  # F.pad lists the last axis first
            kernel = [1, 1, 1]
            kernel[axis] = s
            out = F.max_pool3d(F.pad(out, pads, mode="replicate"), kernel_size=kernel, stride=1)
        return out[0, 0]

    def gaussian(
        self, volume: torch.Tensor, sigma: float | Sequence[float], truncate: float = FILTER_TRUNCATE
    ) -> torch.Tensor:
        """``scipy.ndimage.gaussian_filter(volume, sigma, mode='nearest', truncate)`` of a small ZYX tensor
        (scipy on the CPU, band matrices elsewhere)."""
        sigmas = [float(sigma)] * 3 if np.isscalar(sigma) else [float(s) for s in sigma]  # type: ignore[arg-type]
        if self.scipy_filters:
            host = ndimage.gaussian_filter(self.to_host(volume), sigmas, mode="nearest", truncate=truncate)
            return torch.from_numpy(np.asarray(host, dtype=np.float32))
        return self.resample_all(filter_plan(volume.shape, sigmas, truncate), volume)

    def gaussian_planes(
        self, plan: ResizePlan, block: torch.Tensor, z0: int, z1: int, a: int, truncate: float
    ) -> torch.Tensor:
        """Planes z0:z1 of a Gaussian filter (``plan`` = :func:`filter_plan`) from a block of planes
        ``a : a + len(block)`` covering their z-span. Z and Y as band products; X as well, or with scipy on
        the CPU (:attr:`scipy_filters`), in that order, as ``scipy.ndimage.gaussian_filter`` does."""
        if not self.scipy_filters:
            return self.resample_block(plan, block, z0, z1, a, section="output_filter_s")
        mz, my, mx = plan.maps
        out = self.apply_axis(self.apply_z(block, mz, z0, z1, a), my, 1)
        sigma_x = float(plan.sigma[2]) if plan.sigma is not None else 0.0
        if sigma_x <= 1e-15:
            return out.clone() if out.data_ptr() == block.data_ptr() else out
        return torch.from_numpy(self.gaussian_x_host(self.to_host(out), sigma_x, truncate))


def parallel_safe(source) -> bool:
    """Whether z-ranges of ``source`` may be read from several threads at once (arrays, tensors, array
    sources; not a source that caches what it computed)."""
    return isinstance(source, (np.ndarray, torch.Tensor, TensorSource, ArraySource))


def raw_affine(source) -> tuple[float, float]:
    """(offset, scale) of an :class:`ArraySource` (its planes are (raw − offset)·scale), else (0, 1)."""
    if isinstance(source, ArraySource):
        return float(source.offset), float(source.scale)
    return 0.0, 1.0


def _to_device(array: np.ndarray, device: str) -> torch.Tensor:
    """A float32 copy of a host array on ``device``: the raw pixels (e.g. uint16, float16) are moved
    there and converted there (half the bytes over the bus for 2-byte pixels)."""
    array = np.ascontiguousarray(array)
    if not array.flags.writeable:  # e.g. a read-only memory map: torch.from_numpy wants a writable array
        array = array.copy()
    if array.dtype == np.uint16 and device != "cpu":
        array = array.view(np.int16)  # moved as 2-byte words, widened below without the sign
        return torch.from_numpy(array).to(device).to(torch.int32).bitwise_and_(0xFFFF).to(torch.float32)
    return torch.from_numpy(array).to(device).to(torch.float32, copy=True)


def choose_ops(
    device: str, vram_budget_gib: float | None = None, profile: Profile | None = None, threads: int | None = None
) -> Ops:
    """Where a case's non-network steps run, decided in one place from the run's network device.

    'cuda' (the networks run on the GPU) and torch sees CUDA: every step as torch ops on the GPU, with slabs
    of :data:`GPU_SLAB_FRACTION` of the VRAM budget (at most :data:`GPU_SLAB_BYTES_MAX`), the host holding
    only the input, the correction and the output. Else on the CPU, each step by what measured fastest
    there (``cpu_hybrid``: band products for every resize, torch for blending and bilinear upsampling,
    scipy for the X pass of short filters and for the weight map's small filters; README, *Performance*),
    on ``threads`` single-threaded workers.
    """
    profile = Profile() if profile is None else profile
    cuda = device == "cuda" and torch.cuda.is_available()
    if cuda:
        budget = (vram_budget_gib or 8.0) * 2**30
        slab = int(min(GPU_SLAB_BYTES_MAX, max(64 * 2**20, budget * GPU_SLAB_FRACTION)))
        return Ops(device="cuda", slab_bytes=slab, profile=profile, threads=threads or os.cpu_count() or 1)
    return Ops(device="cpu", slab_bytes=CPU_SLAB_BYTES, profile=profile, threads=threads or os.cpu_count() or 1)
