"""Plane sources: ZYX volumes read in z-ranges, and the grids they live on (numpy only, no torch).

A *plane source* is anything with a ``shape`` (Z, Y, X voxels) and ``planes(z0, z1)`` returning
float32 planes ``z0:z1`` (a new array the caller owns). The pipeline chains them (resize, blend,
filter, normalise) so that no full-size float32 copy of a large stack is ever made; :func:`slabs`
is the one z-slab loop, :func:`materialise` the one way to turn a source into an array.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Protocol, runtime_checkable

import numpy as np

Shape3 = tuple[int, int, int]
Spacing3 = tuple[float, float, float]
SLAB = 16
"""Default planes per slab of the z-slab loops (bounded memory, few calls)."""


@runtime_checkable
class PlaneSource(Protocol):
    """A ZYX volume that produces float32 z-ranges on demand (it need not exist in memory)."""

    shape: Shape3

    def planes(self, z0: int, z1: int) -> np.ndarray:
        """Planes ``z0:z1`` as a new ``(z1 − z0, Y, X)`` array the caller owns and may overwrite."""
        ...


def slabs(depth: int, size: int = SLAB) -> Iterator[tuple[int, int]]:
    """``(z0, z1)`` ranges of at most ``size`` planes covering ``0:depth`` in increasing z."""
    size = max(1, int(size))
    for z0 in range(0, depth, size):
        yield z0, min(depth, z0 + size)


def apply_affine(volume: np.ndarray, offset: float, scale: float) -> np.ndarray:
    """(v − offset)·scale as a new float32 array (same shape)."""
    out = volume.astype(np.float32, copy=True)
    out -= np.float32(offset)
    out *= np.float32(scale)
    return out


class ArraySource:
    """An in-memory ZYX array seen through an affine map: planes = (a − offset)·scale, float32."""

    def __init__(self, array: np.ndarray, offset: float = 0.0, scale: float = 1.0) -> None:
        self.array = array
        self.offset = offset
        self.scale = scale
        self.shape: Shape3 = tuple(int(n) for n in array.shape)  # type: ignore[assignment]

    def planes(self, z0: int, z1: int) -> np.ndarray:
        block = self.array[z0:z1]
        if self.offset == 0.0 and self.scale == 1.0:
            return np.array(block, dtype=np.float32, copy=True)
        return apply_affine(block, self.offset, self.scale)


def as_source(volume: PlaneSource | np.ndarray) -> PlaneSource:
    """A plane source for an array (an :class:`ArraySource`) or the source itself."""
    return ArraySource(volume) if isinstance(volume, np.ndarray) else volume


def read_only(source: PlaneSource) -> Callable[[int, int], np.ndarray]:
    """The source's ``planes_readonly`` (a view it may reuse, no copy) where it has one, else ``planes``."""
    return getattr(source, "planes_readonly", source.planes)


def iter_planes(source: PlaneSource, slab: int | None = None) -> Iterator[tuple[int, int, np.ndarray]]:
    """``(z0, z1, planes)`` slabs of a source in increasing z (``slab`` planes each; default the
    source's ``preferred_slab``, else 32)."""
    size = int(getattr(source, "preferred_slab", 32)) if slab is None else slab
    for z0, z1 in slabs(source.shape[0], size):
        yield z0, z1, source.planes(z0, z1)


def materialise(source: PlaneSource, dtype: np.dtype | type | None = None) -> np.ndarray:
    """The whole source as one ZYX array of ``dtype`` (default: the source's ``dtype``, else float32)."""
    out = np.empty(source.shape, dtype=dtype or getattr(source, "dtype", np.float32))
    for z0, z1, planes in iter_planes(source):
        out[z0:z1] = planes
    return out


def shape_for_spacing(shape: Sequence[int], spacing: Sequence[float], target_spacing: Sequence[float]) -> Shape3:
    """Voxel shape (ZYX) that covers the same physical extent at ``target_spacing`` (all spacings µm)."""
    out = tuple(max(1, int(round(n * s / t))) for n, s, t in zip(shape, spacing, target_spacing))
    return out  # type: ignore[return-value]
