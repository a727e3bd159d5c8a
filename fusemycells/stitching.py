"""Sliding-window patch inference with Gaussian importance weighting, streamed in z-rows.

Patches are visited row by row along Z. Voxels above the next row's start can no longer receive
contributions, so they are normalised and written out at once; the float32 accumulator only spans
one patch depth (``patch_z × Y × X``), never the whole volume. The Gaussian importance is separable
and the windows form a Cartesian grid, so the sum of weights is an outer product of three 1D sums
and needs no accumulator of its own. All shapes are ZYX voxels.
"""

from __future__ import annotations

import logging
import math
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from .sources import ArraySource, PlaneSource, materialise

log = logging.getLogger(__name__)

Shape3 = tuple[int, int, int]
Predict = Callable[[np.ndarray], np.ndarray]
"""(N, C, pz, py, px) float32 → (N, 1, pz, py, px) float32."""


def window_starts(length: int, patch: int, overlap: float) -> list[int]:
    """Start indices along one axis so that every voxel is covered (voxels).

    The step is ``patch·(1 − overlap)`` at most; starts are spread evenly between 0 and
    ``length − patch`` (nnU-Net's rule), so the last window ends exactly at the border.
    ``length ≤ patch`` gives a single window at 0 (the caller pads).
    """
    if not 0.0 <= overlap < 1.0:
        raise ValueError(f"overlap must be in [0, 1), got {overlap}")
    if length <= patch:
        return [0]
    step = max(1, int(patch * (1.0 - overlap)))
    count = math.ceil((length - patch) / step) + 1
    return [int(round(i * (length - patch) / (count - 1))) for i in range(count)]


def count_windows(shape: Sequence[int], patch: Sequence[int], overlap: float) -> int:
    """Number of patches :func:`sliding_window` visits for a ZYX ``shape`` (voxels)."""
    return math.prod(len(window_starts(max(n, p), p, overlap)) for n, p in zip(shape, patch))


def gaussian_profiles(patch: Sequence[int], sigma_scale: float = 1.0 / 8.0, floor: float = 1e-3) -> list[np.ndarray]:
    """Per-axis 1D Gaussian weights (ZYX order, float64), σ = patch·sigma_scale, max 1.

    Each profile is floored at ``floor``, so their product (the 3D importance) is ≥ ``floor³`` > 0
    everywhere (only patch corners get that little; wherever windows overlap some window weighs far
    more) and stays separable: the sum of the importance over a Cartesian grid of windows is then
    the outer product of three 1D sums (see :func:`axis_weight_sums`).
    """
    profiles = []
    for n in patch:
        sigma = max(n * sigma_scale, 1e-6)
        coords = np.arange(n, dtype=np.float64) - (n - 1) / 2.0
        g = np.exp(-0.5 * (coords / sigma) ** 2)
        profiles.append(np.maximum(g / g.max(), floor))
    return profiles


def gaussian_importance(patch: Sequence[int], sigma_scale: float = 1.0 / 8.0, floor: float = 1e-3) -> np.ndarray:
    """Separable Gaussian weight map (ZYX float32): the outer product of :func:`gaussian_profiles`.

    Max 1 in the centre, ≥ ``floor³`` everywhere (border voxels of a patch keep a positive weight).
    """
    return _outer3(*gaussian_profiles(patch, sigma_scale, floor))


def _outer3(gz: np.ndarray, gy: np.ndarray, gx: np.ndarray) -> np.ndarray:
    """The ZYX float32 outer product of three 1D profiles."""
    return (gz[:, None, None] * gy[None, :, None] * gx[None, None, :]).astype(np.float32)


def axis_weight_sums(length: int, starts: Sequence[int], profile: np.ndarray) -> np.ndarray:
    """Σ over windows of a 1D profile placed at ``starts`` along an axis of ``length`` voxels (float64)."""
    total = np.zeros(length, dtype=np.float64)
    n = len(profile)
    for s in starts:
        total[s : s + n] += profile
    return total


def pad_to_patch(volume: np.ndarray, patch: Sequence[int]) -> np.ndarray:
    """Reflect-pad a ZYX array at the high end so each axis is ≥ the patch (no copy if it is)."""
    pads = [(0, max(0, p - n)) for n, p in zip(volume.shape, patch)]
    if not any(after for _, after in pads):
        return volume
    mode = "reflect" if min(volume.shape) > 1 else "edge"
    return np.pad(volume, pads, mode=mode)


@dataclass
class StitchStats:
    """What the sliding window did (for logs, the report and the budget policy)."""

    patches: int = 0
    batches: int = 0
    forward_s: float = 0.0
    total_s: float = 0.0
    grid: Shape3 = (0, 0, 0)
    events: list[str] = field(default_factory=list)


def _batches(items: list[tuple[int, int]], size: int) -> Iterator[list[tuple[int, int]]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


def _as_rows(channels: Sequence[np.ndarray | PlaneSource], patch: Shape3) -> tuple[list[PlaneSource], Shape3]:
    """Plane sources of the (padded) channels and the padded shape.

    Volumes smaller than a patch along some axis are materialised and reflect-padded (they are
    small); others are read lazily, one row of patches at a time.
    """
    shape: Shape3 = tuple(int(n) for n in channels[0].shape)  # type: ignore[assignment]
    if any(tuple(c.shape) != shape for c in channels):
        raise ValueError(f"channel shapes differ: {[tuple(c.shape) for c in channels]}")
    if all(n >= p for n, p in zip(shape, patch)):
        return [ArraySource(c) if isinstance(c, np.ndarray) else c for c in channels], shape
    arrays = [c if isinstance(c, np.ndarray) else materialise(c) for c in channels]
    padded = [pad_to_patch(a, patch) for a in arrays]
    return [ArraySource(a) for a in padded], tuple(int(n) for n in padded[0].shape)  # type: ignore[return-value]


def sliding_window(
    channels: Sequence[np.ndarray | PlaneSource],
    predict: Predict,
    patch: Sequence[int],
    overlap: float = 0.5,
    batch_size: int = 2,
    sigma_scale: float = 1.0 / 8.0,
    emit: Callable[[int, int, np.ndarray], None] | None = None,
    progress: Callable[[int, int], None] | None = None,
    workers: int = 1,
) -> tuple[np.ndarray | None, StitchStats]:
    """Predict a volume given as C same-shape ZYX channels (arrays or plane sources).

    Returns ``(prediction, stats)`` with the stitched float32 ZYX prediction, or ``(None, stats)``
    when ``emit(z0, z1, planes)`` is given: finished planes (a float32 view of the
    accumulator: the callee may modify it, but must copy what it keeps, since the buffer is reused
    once ``emit`` returns) are handed over in increasing z as soon as no later patch can touch
    them, and no volume-size array is allocated here.
    Channels are read one row of patches (patch depth) at a time and stacked per patch only.
    ``predict`` gets batches of at most ``batch_size`` patches; ``progress(done, total)`` is
    called after each batch. ``workers`` > 1 runs that many batches at once on helper threads
    (``predict`` must be thread-safe: on a CPU, single-threaded forwards side by side use the
    cores better than one multi-threaded forward); results are added in the same order, so the
    output does not depend on ``workers``. ``stats.forward_s`` is then the sum over the overlapping calls.
    """
    patch3: Shape3 = tuple(int(p) for p in patch)  # type: ignore[assignment]
    original: Shape3 = tuple(int(n) for n in channels[0].shape)  # type: ignore[assignment]
    sources, (nz, ny, nx) = _as_rows(channels, patch3)
    pz, py, px = patch3
    zs, ys, xs = (window_starts(n, p, overlap) for n, p in zip((nz, ny, nx), patch3))
    # The importance is separable and the windows form a Cartesian grid, so the weight sum is an
    # outer product of three 1D sums: only the prediction needs an accumulator (one patch depth).
    gz, gy, gx = gaussian_profiles(patch3, sigma_scale)
    importance = _outer3(gz, gy, gx)
    inv_z = (1.0 / axis_weight_sums(nz, zs, gz)).astype(np.float32)
    inv_yx = np.outer(1.0 / axis_weight_sums(ny, ys, gy)[: original[1]], 1.0 / axis_weight_sums(nx, xs, gx)[: original[2]]).astype(np.float32)
    result = None if emit is not None else np.empty(original, dtype=np.float32)
    acc = np.zeros((pz, ny, nx), dtype=np.float32)
    weighted = np.empty(patch3, dtype=np.float32)
    total = len(zs) * len(ys) * len(xs)
    stats = StitchStats(grid=(len(zs), len(ys), len(xs)))
    started = time.perf_counter()
    row_items = [(y, x) for y in ys for x in xs]
    chunks = list(_batches(row_items, max(1, batch_size)))

    def assemble(rows: list[np.ndarray], chunk: list[tuple[int, int]]) -> np.ndarray:
        batch = np.empty((len(chunk), len(rows), pz, py, px), dtype=np.float32)
        for i, (y, x) in enumerate(chunk):
            for c, planes in enumerate(rows):
                batch[i, c] = planes[:, y : y + py, x : x + px]
        return batch

    def timed_predict(batch: np.ndarray) -> tuple[np.ndarray, float]:
        t0 = time.perf_counter()
        pred = predict(batch)
        return pred, time.perf_counter() - t0

    def add(chunk: list[tuple[int, int]], result: Future[tuple[np.ndarray, float]]) -> None:
        pred, seconds = result.result()
        stats.forward_s += seconds
        for (y, x), p in zip(chunk, pred):
            np.multiply(p[0], importance, out=weighted)
            acc[:, y : y + py, x : x + px] += weighted
        stats.patches += len(chunk)
        stats.batches += 1
        if progress is not None:
            progress(stats.patches, total)

    # The next batch is cut out on a helper thread while the network runs on the current one
    # (torch and onnxruntime release the GIL), so the device never waits for numpy copies.
    prefetch = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fmc-batch")
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="fmc-predict") if workers > 1 else None

    def start(batch: np.ndarray) -> Future[tuple[np.ndarray, float]]:
        if pool is not None:
            return pool.submit(timed_predict, batch)
        done: Future[tuple[np.ndarray, float]] = Future()
        done.set_result(timed_predict(batch))  # in this thread: one forward at a time
        return done

    try:
        for row, z0 in enumerate(zs):
            # read-only views where the source offers them (no second copy of a cached row)
            rows = [getattr(src, "planes_readonly", src.planes)(z0, z0 + pz) for src in sources]
            pending: Future[np.ndarray] = prefetch.submit(assemble, rows, chunks[0])
            in_flight: deque[tuple[list[tuple[int, int]], Future[tuple[np.ndarray, float]]]] = deque()
            for index, chunk in enumerate(chunks):
                batch = pending.result()
                if index + 1 < len(chunks):
                    pending = prefetch.submit(assemble, rows, chunks[index + 1])
                in_flight.append((chunk, start(batch)))
                if len(in_flight) >= max(1, workers):
                    add(*in_flight.popleft())  # oldest first: the same order as one worker
            while in_flight:
                add(*in_flight.popleft())
            del rows
            # planes before the next row's start are final: hand them over and shift the buffers
            next_z = zs[row + 1] if row + 1 < len(zs) else z0 + pz
            done = next_z - z0
            z1 = min(next_z, original[0])
            if z1 > z0:
                final = acc[: z1 - z0, : original[1], : original[2]]  # a view: normalised in place
                final *= inv_z[z0:z1, None, None]
                final *= inv_yx[None]
                if emit is not None:
                    emit(z0, z1, final)
                else:
                    assert result is not None
                    result[z0:z1] = final
            for i in range(pz - done):  # shift plane by plane: no temporary copy of the slab
                acc[i] = acc[i + done]
            acc[pz - done :] = 0.0
    finally:
        prefetch.shutdown(wait=True)
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
    stats.total_s = time.perf_counter() - started
    return result, stats
