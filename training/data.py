"""Training pairs: discovery in the challenge layout, loading onto the model grid, sampling.

Loading uses the container's own functions (``fusemycells.io.tiff`` / ``fusemycells.preprocess``), so
the networks are trained on exactly what inference feeds them. Arrays are float32 ZYX.

Real stacks are large on the 0.6 µm grid (hundreds of MB per array), so :func:`cached_pair`
writes each case once as ``.npy`` and training reads crops from read-only memory maps: only the
crops (and, transiently, the case being prepared) are held in RAM.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fusemycells.config import NormalisationSpec
from fusemycells.io.tiff import read_volume
from fusemycells.ops import choose_ops
from fusemycells.preprocess import intensity_affine, resize, sanitise_inplace
from fusemycells.sources import apply_affine, shape_for_spacing

RESIZE_OPS = choose_ops("cpu")
"""Where the training code's resizes run: the inference pipeline's own :class:`~fusemycells.ops.Ops`
(torch on the CPU's cores), so the networks see the resizes inference computes."""

PAIR_RE = re.compile(r"^image_(?P<index>\d+)_(?P<channel>nucleus|membrane)_angle\.tiff?$", re.IGNORECASE)


class ShapeMismatchError(ValueError):
    """The input and fused volumes of a pair have different shapes."""


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
        raise ShapeMismatchError(f"{pair.angle.name}: input {angle.data.shape} and target {fused.data.shape} differ in shape")
    grid = shape_for_spacing(angle.data.shape, angle.spacing, (target_spacing,) * 3)
    x = resize(normalised(angle.data, normalisation), grid, RESIZE_OPS)
    y = resize(normalised(fused.data, normalisation), grid, RESIZE_OPS)
    return x, y


def normalised(data: np.ndarray, normalisation: dict) -> np.ndarray:
    """A copy of a ZYX stack sanitised and normalised as inference does (``sanitise_inplace`` in the stack's own
    dtype, then the manifest's ``normalisation`` affine map; float32)."""
    data = np.array(data, copy=True)
    sanitise_inplace(data)
    return apply_affine(data, *intensity_affine(data, NormalisationSpec(**normalisation)))


def save_npy(path: Path, array: np.ndarray) -> None:
    """Write ``array`` to ``path`` atomically (a temporary file renamed into place)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.npy")
    np.save(tmp, array)
    os.replace(tmp, path)


def cached_pair(pair: Pair, normalisation: dict, target_spacing: float, cache_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    """:func:`load_pair` through an ``.npy`` cache: (input, target) as read-only memory maps.

    The cache key covers both files (path, size, mtime), the normalisation and the spacing (µm),
    so a changed file or setting is loaded again.
    """
    stats = [(str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns) for f in (pair.angle, pair.fused)]
    key = hashlib.sha256(json.dumps([stats, normalisation, target_spacing], sort_keys=True).encode()).hexdigest()[:16]
    folder = Path(cache_dir) / f"{pair.angle.stem}-{key}"
    x_path, y_path = folder / "input.npy", folder / "target.npy"
    if not (x_path.is_file() and y_path.is_file()):
        x, y = load_pair(pair, normalisation, target_spacing)
        save_npy(x_path, x)
        save_npy(y_path, y)
        del x, y
    return np.load(x_path, mmap_mode="r"), np.load(y_path, mmap_mode="r")


def bright_centres(volume: np.ndarray, rng: np.random.Generator, percentile: float = 90.0, max_count: int = 50_000, slab: int = 16) -> np.ndarray:
    """Flat indices (into ``volume.shape``) of up to ``max_count`` random voxels above ``percentile``.

    The threshold comes from a strided subsample and the scan runs in Z slabs of ``slab`` voxels,
    so a memory-mapped volume is never read into RAM whole.
    """
    step = max(1, round((volume.size / 4e6) ** (1 / 3)))
    threshold = float(np.percentile(volume[::step, ::step, ::step], percentile))
    plane = int(np.prod(volume.shape[1:]))
    found = [np.flatnonzero(np.asarray(volume[z : z + slab]) > threshold) + z * plane for z in range(0, volume.shape[0], slab)]
    idx = np.concatenate(found) if found else np.zeros(0, dtype=np.int64)
    if len(idx) > max_count:
        idx = np.sort(rng.choice(idx, max_count, replace=False))
    return idx


def random_flip(arrays: list[np.ndarray], rng: np.random.Generator) -> list[np.ndarray]:
    """The same random flip of every axis applied to all arrays (ZYX)."""
    axes = tuple(a for a in range(3) if rng.random() < 0.5)
    return [np.flip(a, axes) if axes else a for a in arrays]


def random_crop(
    arrays: list[np.ndarray],
    patch: tuple[int, int, int],
    rng: np.random.Generator,
    centres: np.ndarray | None = None,
) -> list[np.ndarray]:
    """Same-position ZYX crops of ``patch`` voxels (reflect-padded when an array is smaller).

    With ``centres`` (flat indices into the arrays' shape, e.g. from :func:`bright_centres`), the
    crop is centred on one of those voxels. Memory-mapped arrays are only read where cropped.
    """
    shape = arrays[0].shape
    chosen = np.unravel_index(int(centres[rng.integers(len(centres))]), shape) if centres is not None and len(centres) else None
    pads = [(0, max(0, p - n)) for n, p in zip(shape, patch)]
    if any(after for _, after in pads):
        mode = "reflect" if min(shape) > 1 else "edge"
        arrays = [np.pad(a, pads, mode=mode) for a in arrays]
        shape = arrays[0].shape
    if chosen is not None:  # padding only appends after the data: coordinates are unchanged
        start = [int(np.clip(c - p // 2, 0, n - p)) for c, p, n in zip(chosen, patch, shape)]
    else:
        start = [int(rng.integers(0, n - p + 1)) for n, p in zip(shape, patch)]
    sl = tuple(slice(s, s + p) for s, p in zip(start, patch))
    return [np.ascontiguousarray(a[sl]) for a in arrays]


def cached_resize(source: np.ndarray, shape: tuple[int, int, int], path: Path) -> np.ndarray:
    """``resize(source, shape)`` (the inference path) cached at ``path``: a read-only memory map."""
    if not Path(path).is_file():
        save_npy(Path(path), resize(np.asarray(source), shape, RESIZE_OPS))
    return np.load(path, mmap_mode="r")


class CropDataset:
    """Training samples of one stage: sample ``k`` is a pure function of (seed, stage, rank, k).

    Each case is a list of array files (``.npy``, ZYX, the last one the target) opened as memory
    maps in whichever process reads them (DataLoader workers included), so only crops reach RAM.
    Sample ``k`` picks a case and a crop of ``crop`` voxels (every second sample centred on one of
    the case's ``bright`` voxels when given), a random flip, and (``augment``) the augmentations of
    :mod:`training.augment`. Returns (inputs (C, Z, Y, X), target (1, Z, Y, X)) float32 tensors.
    Different ranks draw different samples for the same ``k`` (DistributedSampler-like sharding).
    """

    def __init__(
        self,
        cases: list[list[Path]],
        crop: tuple[int, int, int],
        seed: int,
        stage: int,
        rank: int = 0,
        bright: list[np.ndarray] | None = None,
        augment: bool = False,
    ) -> None:
        self.cases, self.crop, self.seed, self.stage, self.rank = cases, tuple(crop), seed, stage, rank
        self.bright, self.augment = bright, augment
        self._open: dict[Path, np.ndarray] = {}

    def __len__(self) -> int:
        return 2**62  # an endless stream, indexed by sample number

    def _array(self, path: Path) -> np.ndarray:
        if path not in self._open:
            self._open[path] = np.load(path, mmap_mode="r")
        return self._open[path]

    def sample(self, k: int) -> tuple[list[np.ndarray], np.ndarray]:
        """(input channels, target) of sample ``k`` as numpy arrays."""
        from .augment import augment

        rng = np.random.default_rng([self.seed, self.stage, self.rank, k])
        index = int(rng.integers(len(self.cases)))
        arrays = [self._array(p) for p in self.cases[index]]
        centres = self.bright[index] if self.bright is not None and k % 2 == 0 else None
        crops = random_flip(random_crop(arrays, self.crop, rng, centres=centres), rng)
        inputs, target = [np.ascontiguousarray(c, dtype=np.float32) for c in crops[:-1]], np.ascontiguousarray(crops[-1], dtype=np.float32)
        if self.augment:
            inputs, target = augment(inputs, target, rng)
        return inputs, target

    def __getitem__(self, k: int):  # noqa: ANN204 - torch tensors
        import torch

        inputs, target = self.sample(int(k))
        return torch.from_numpy(np.stack(inputs)), torch.from_numpy(target[None].copy())
