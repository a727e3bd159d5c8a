"""Training pairs: discovery in the challenge layout, loading onto the model grid, sampling.

Loading uses the container's own functions (``fusemycells.io`` / ``fusemycells.preprocess``), so
the networks are trained on exactly what inference feeds them. Arrays are float32 ZYX.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fusemycells.io import read_volume
from fusemycells.preprocess import normalise_intensity, resize, sanitise, shape_for_spacing

PAIR_RE = re.compile(r"^image_(?P<index>\d+)_(?P<channel>nucleus|membrane)_angle\.tiff?$", re.IGNORECASE)


@dataclass(frozen=True)
class Pair:
    """One training case: the single view (input) and the multi-view fusion (target)."""

    angle: Path
    fused: Path
    channel: str
    study: str


def find_pairs(root: Path, channel: str | None = None) -> list[Pair]:
    """All ``image_<N>_<channel>_angle.tif`` with a ``..._fused.tif`` beside them, under ``root`` (recursive, sorted)."""
    pairs = []
    for angle in sorted(Path(root).rglob("*")):
        match = PAIR_RE.match(angle.name)
        if not match or not angle.is_file():
            continue
        fused = angle.with_name(re.sub(r"_angle(\.tiff?)$", r"_fused\1", angle.name, flags=re.IGNORECASE))
        if not fused.is_file():
            continue
        found = match.group("channel").lower()
        if channel is None or found == channel:
            pairs.append(Pair(angle=angle, fused=fused, channel=found, study=angle.parent.name))
    return pairs


def load_pair(pair: Pair, normalisation: dict, target_spacing: float = 0.6) -> tuple[np.ndarray, np.ndarray]:
    """(input, target) on the high-resolution grid H (isotropic ``target_spacing`` µm), normalised as at inference."""
    angle = read_volume(pair.angle)
    fused = read_volume(pair.fused)
    if angle.data.shape != fused.data.shape:
        raise ValueError(f"{pair.angle.name}: input {angle.data.shape} and target {fused.data.shape} differ in shape")
    grid = shape_for_spacing(angle.data.shape, angle.spacing, (target_spacing,) * 3)
    x = resize(normalise_intensity(sanitise(angle.data)[0], **normalisation), grid)
    y = resize(normalise_intensity(sanitise(fused.data)[0], **normalisation), grid)
    return x, y


def random_flip(arrays: list[np.ndarray], rng: np.random.Generator) -> list[np.ndarray]:
    """The same random flip of every axis applied to all arrays (ZYX)."""
    axes = tuple(a for a in range(3) if rng.random() < 0.5)
    return [np.flip(a, axes) if axes else a for a in arrays]


def random_crop(arrays: list[np.ndarray], patch: tuple[int, int, int], rng: np.random.Generator, centre_from: np.ndarray | None = None) -> list[np.ndarray]:
    """Same-position ZYX crops of ``patch`` voxels (reflect-padded when an array is smaller).

    With ``centre_from`` (a boolean mask), the crop is centred on one of its true voxels.
    """
    shape = arrays[0].shape
    pads = [(0, max(0, p - n)) for n, p in zip(shape, patch)]
    if any(after for _, after in pads):
        mode = "reflect" if min(shape) > 1 else "edge"
        arrays = [np.pad(a, pads, mode=mode) for a in arrays]
        if centre_from is not None:
            centre_from = np.pad(centre_from, pads, mode="constant")
        shape = arrays[0].shape
    if centre_from is not None and centre_from.any():
        idx = np.flatnonzero(centre_from)
        centre = np.unravel_index(idx[rng.integers(len(idx))], shape)
        start = [int(np.clip(c - p // 2, 0, n - p)) for c, p, n in zip(centre, patch, shape)]
    else:
        start = [int(rng.integers(0, n - p + 1)) for n, p in zip(shape, patch)]
    sl = tuple(slice(s, s + p) for s, p in zip(start, patch))
    return [np.ascontiguousarray(a[sl]) for a in arrays]
