"""OME-Zarr (NGFF 0.4 and 0.5) input and output of ZYX stacks, for :mod:`fusemycells.batch`.

Reading takes one resolution level of a multiscale image: its spacing is the ``scale`` of the
level's ``coordinateTransformations`` (times the multiscale-wide one, when present), converted
to µm with the ``unit`` of each axis. Writing streams a plane source (``.shape``, ``.dtype``,
``.planes(z0, z1)``, ZYX) slab by slab into a multiscale image (NGFF 0.5, Zarr v3): level 0 on
the input grid, each further level halves Y and X (2×2 mean), so no more than one slab per level
is held besides what the source holds. The metadata are written by ``ome_zarr`` (the OME-NGFF
reference library); the arrays by ``zarr``.

``zarr`` and ``ome-zarr`` are optional (``pip install -r requirements-scale.txt``): this module
imports without them and raises :class:`MissingDependency` naming what to install when used.
Volumes are ZYX; spacings are (z, y, x) in µm.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fusemycells.io.volume import (  # noqa: F401  (MissingDependency: re-exported, its older import path)
    Format,
    MissingDependency,
    ReadOptions,
    Volume,
    WriteOptions,
    disk_full_error,
)

log = logging.getLogger(__name__)

INSTALL_HINT = "pip install -r requirements-scale.txt"
ZARR_SUFFIXES = (".zarr",)
SLAB = 16
"""Planes written per step; also the Z chunk size, so every chunk is written exactly once."""
CHUNK_YX = 256
"""Y and X chunk size (pixels) of every level."""
MIN_LEVEL_YX = 128
"""Automatic pyramids stop before a level whose smaller Y/X side would fall below this (pixels)."""
MAX_LEVELS = 5

_UM_PER_UNIT = {
    **dict.fromkeys(("micrometer", "micrometre", "micron", "um", "\u00b5m", "\u03bcm"), 1.0),
    **dict.fromkeys(("nanometer", "nanometre", "nm"), 1e-3),
    **dict.fromkeys(("angstrom",), 1e-4),
    **dict.fromkeys(("picometer", "pm"), 1e-6),
    **dict.fromkeys(("millimeter", "millimetre", "mm"), 1e3),
    **dict.fromkeys(("centimeter", "cm"), 1e4),
    **dict.fromkeys(("meter", "metre", "m"), 1e6),
}
"""µm per NGFF space unit (the UDUNITS names the specification lists, and common abbreviations)."""
CHANNEL_NAMES = ("nucleus", "membrane")


class OmeZarrError(ValueError):
    """A store is not a readable single OME-Zarr image, or the requested level does not exist."""


def require_zarr() -> tuple[Any, Any]:
    """(zarr, ome_zarr.writer) modules, or :class:`MissingDependency` with the install command."""
    try:
        import ome_zarr.writer
        import zarr
    except ImportError as exc:
        raise MissingDependency(
            f"OME-Zarr needs the optional packages zarr and ome-zarr ({exc.name} is missing): {INSTALL_HINT}"
        ) from exc
    return zarr, ome_zarr.writer


def ome_attributes(path: Path) -> dict[str, Any] | None:
    """The OME attributes of a Zarr group (NGFF 0.5: ``attributes.ome``; 0.4: ``.zattrs``), or None.

    Reads only the group's JSON metadata file, so it is cheap and needs no zarr installed.
    """
    path = Path(path)
    try:
        if (path / "zarr.json").is_file():
            meta = json.loads((path / "zarr.json").read_text())
            attrs = meta.get("attributes", {})
            return dict(attrs.get("ome", attrs)) if isinstance(attrs, dict) else None
        if (path / ".zattrs").is_file():
            attrs = json.loads((path / ".zattrs").read_text())
            return attrs if isinstance(attrs, dict) else None
    except (OSError, json.JSONDecodeError):
        return None
    return None


def is_zarr_store(path: Path) -> bool:
    """True when ``path`` is a folder with Zarr metadata (v3 ``zarr.json``, v2 ``.zgroup`` / ``.zattrs`` /
    ``.zarray``), OME or not."""
    path = Path(path)
    return path.is_dir() and any((path / name).is_file() for name in ("zarr.json", ".zgroup", ".zattrs", ".zarray"))


NOT_OME = "a Zarr store without OME multiscales metadata"
"""Why a Zarr store is not an input (no ``multiscales`` in its group attributes)."""


def is_ome_zarr(path: Path) -> bool:
    """True when ``path`` is a folder holding an OME-Zarr multiscale image."""
    attrs = ome_attributes(path) if Path(path).is_dir() else None
    return bool(attrs) and isinstance(attrs.get("multiscales"), list) and bool(attrs["multiscales"])


def um_per_unit(unit: Any) -> tuple[float, str]:
    """(µm per ``unit``, warning) for an NGFF axis unit; a missing or unknown unit is read as µm (with a warning)."""
    if unit is None or not str(unit).strip():
        return 1.0, "axis unit missing: scale read as µm"
    key = str(unit).strip().lower()
    if key in _UM_PER_UNIT:
        return _UM_PER_UNIT[key], ""
    return 1.0, f"axis unit {unit!r} not recognised: scale read as µm"


def _scale_of(transformations: Any, ndim: int) -> list[float] | None:
    """The 'scale' vector of a coordinateTransformations list (None when there is none)."""
    for item in transformations or []:
        if isinstance(item, dict) and item.get("type") == "scale":
            scale = item.get("scale")
            if isinstance(scale, list) and len(scale) == ndim:
                return [float(v) for v in scale]
    return None


def _axis_names(axes: Any, ndim: int) -> list[dict[str, Any]]:
    """Axes as dicts with 'name' (NGFF 0.3 wrote plain strings; 0.1/0.2 had none: TCZYX)."""
    if axes is None:
        axes = ["t", "c", "z", "y", "x"][-ndim:]
    out = [dict(a) if isinstance(a, dict) else {"name": str(a)} for a in axes]
    if len(out) != ndim:
        raise OmeZarrError(f"{len(out)} axes for a {ndim}-dimensional array")
    return out


@dataclass(frozen=True)
class LevelInfo:
    """One level of an OME-Zarr image as the pipeline reads it: ZYX shape, spacing in µm."""

    path: Path
    level: int
    array_path: str  # the level's array inside the store ('0', 's1', ...)
    array_shape: tuple[int, ...]  # as stored (with its singleton t/c axes)
    axes: tuple[str, ...]  # names, as stored
    shape: tuple[int, int, int]  # ZYX after dropping singleton non-spatial axes
    dtype: np.dtype
    spacing: tuple[float, float, float]  # (z, y, x) µm
    channel: str | None  # 'nucleus' / 'membrane' when the metadata say so
    levels: int  # how many levels the image has
    name: str | None = None
    warnings: list[str] = field(default_factory=list)
    channel_index: int | None = None  # the channel read from a non-singleton c axis


def _spacing_um(
    axes: list[dict[str, Any]], names: list[str], scale: Sequence[float], path: Path, warnings: list[str]
) -> dict[str, float]:
    """Spacing in µm of the z, y, x axes present (``scale`` per stored axis, in each axis's ``unit``);
    a unit's warning goes into ``warnings``; :class:`OmeZarrError` for a scale that is not a positive number."""
    spacing: dict[str, float] = {}
    for axis in ("z", "y", "x"):
        if axis not in names:
            continue
        i = names.index(axis)
        factor, warning = um_per_unit(axes[i].get("unit"))
        if warning and warning not in warnings:
            warnings.append(warning)
        value = scale[i] * factor
        if not (math.isfinite(value) and value > 0):
            raise OmeZarrError(f"{path.name}: scale of axis {axis} is {scale[i]!r}, not a positive spacing")
        spacing[axis] = value
    return spacing


def _check_axes(names: list[str], array_shape: Sequence[int], channel_index: int | None, path: Path) -> None:
    """:class:`OmeZarrError` unless the stored axes ``names`` make one ZYX stack: y and x present, no other
    non-singleton axis but a c axis whose ``channel_index`` exists."""
    if channel_index is not None:
        channels = array_shape[names.index("c")] if "c" in names else 1
        if not 0 <= channel_index < channels:
            raise OmeZarrError(
                f"{path.name}: --channel-index {channel_index} not found (the image has {channels} channel(s))"
            )
    picked = ("c",) if channel_index is not None else ()
    extra = [(n, s) for n, s in zip(names, array_shape) if n not in ("z", "y", "x", *picked) and s > 1]
    if extra:
        found = ", ".join(f"{n}={s}" for n, s in extra)
        hint = "; pick one channel with --channel-index N" if any(n == "c" for n, _ in extra) else ""
        raise OmeZarrError(f"{path.name}: non-singleton axes beyond z, y, x ({found}) are not supported{hint}")
    if "y" not in names or "x" not in names:
        raise OmeZarrError(f"{path.name}: axes {names} lack y or x")


def level_info(
    multiscale: dict[str, Any],
    level: int,
    array_shape: Sequence[int],
    dtype: Any,
    path: Path,
    omero: Any = None,
    channel_index: int | None = None,
) -> LevelInfo:
    """Parse one multiscale entry for ``level`` (pure: the array's shape and dtype are passed in).

    Spacing: the level's ``scale`` times the multiscale-wide ``scale`` (NGFF), per axis, in µm
    after the axis ``unit``. Singleton axes other than z, y, x are dropped; ``channel_index`` picks
    one channel of a ``c`` axis; a missing z axis makes a single slice (spacing 1 µm, with a
    warning). Raises :class:`OmeZarrError` for an unknown level, a non-singleton channel axis
    without ``channel_index`` (or an index out of range), a non-singleton time axis, or a
    non-positive scale.
    """
    datasets = multiscale.get("datasets") or []
    if not 0 <= level < len(datasets):
        raise OmeZarrError(f"{path.name}: level {level} not found (the image has {len(datasets)} level(s))")
    dataset = datasets[level]
    ndim = len(array_shape)
    axes = _axis_names(multiscale.get("axes"), ndim)
    names = [str(a.get("name", "")).lower() for a in axes]
    scale = _scale_of(dataset.get("coordinateTransformations"), ndim) or [1.0] * ndim
    overall = _scale_of(multiscale.get("coordinateTransformations"), ndim) or [1.0] * ndim
    warnings: list[str] = []
    if _scale_of(dataset.get("coordinateTransformations"), ndim) is None:
        warnings.append(f"level {level} has no scale transformation: spacing 1 per axis")
    _check_axes(names, array_shape, channel_index, path)
    spacing = _spacing_um(axes, names, [a * b for a, b in zip(scale, overall)], path, warnings)
    nz = array_shape[names.index("z")] if "z" in names else 1
    if "z" not in names:
        spacing["z"] = 1.0
        warnings.append("no z axis: read as a single slice; Z spacing 1 µm used (also the output's Z scale)")
    shape = (int(nz), int(array_shape[names.index("y")]), int(array_shape[names.index("x")]))
    return LevelInfo(
        path=path,
        level=level,
        array_path=str(dataset.get("path")),
        array_shape=tuple(int(n) for n in array_shape),
        axes=tuple(names),
        shape=shape,
        dtype=np.dtype(dtype),
        spacing=(spacing["z"], spacing["y"], spacing["x"]),
        channel=channel_of(omero, multiscale.get("name"), path.name, index=channel_index),
        levels=len(datasets),
        name=multiscale.get("name"),
        warnings=warnings,
        channel_index=channel_index,
    )


def channel_of(omero: Any, *names: Any, index: int | None = None) -> str | None:
    """'nucleus' or 'membrane' from the omero channel label (of channel ``index`` when given), else the
    image or store name; None if none says."""
    labels: list[Any] = []
    if isinstance(omero, dict):
        channels = [c for c in omero.get("channels", []) if isinstance(c, dict)]
        if index is not None:
            channels = channels[index : index + 1]
        labels += [c.get("label") for c in channels]
    for text in [*labels, *names]:
        if not isinstance(text, str):
            continue
        lowered = text.lower()
        for channel in CHANNEL_NAMES:
            if channel[:5] in lowered:  # nuclei, nucleus, membranes, ...
                return channel
    return None


def open_level(path: Path, level: int = 0, channel_index: int | None = None) -> LevelInfo:
    """Metadata of one level (and channel, see :func:`level_info`) of the OME-Zarr image at ``path``
    (the pixels are not read)."""
    zarr, _ = require_zarr()
    path = Path(path)
    attrs = ome_attributes(path)
    if not attrs or not attrs.get("multiscales"):
        raise OmeZarrError(f"{path.name} is {NOT_OME}")
    multiscale = attrs["multiscales"][0]
    datasets = multiscale.get("datasets") or []
    if not 0 <= level < len(datasets):
        raise OmeZarrError(f"{path.name}: level {level} not found (the image has {len(datasets)} level(s))")
    array = zarr.open_array(str(path / str(datasets[level]["path"])), mode="r")
    return level_info(multiscale, level, array.shape, array.dtype, path, attrs.get("omero"), channel_index)


def read_level(info: LevelInfo) -> np.ndarray:
    """The pixels of a level as a ZYX array in the stored dtype (singleton t/c axes dropped, the
    channel ``info.channel_index`` of a c axis taken)."""
    zarr, _ = require_zarr()
    array = zarr.open_array(str(info.path / info.array_path), mode="r")
    index = tuple(
        slice(None) if name in ("z", "y", "x") else (info.channel_index or 0) if name == "c" else 0
        for name in info.axes
    )
    return np.asarray(array[index]).reshape(info.shape)


def auto_levels(shape: Sequence[int]) -> int:
    """Pyramid levels for a ZYX shape: halve Y/X while the smaller side stays ≥ :data:`MIN_LEVEL_YX` (≤
    :data:`MAX_LEVELS`).
    """
    levels, side = 1, min(shape[1], shape[2])
    while levels < MAX_LEVELS and side // 2 >= MIN_LEVEL_YX:
        levels, side = levels + 1, side // 2
    return levels


def level_shapes(shape: Sequence[int], levels: int) -> list[tuple[int, int, int]]:
    """ZYX shape of each pyramid level: Z kept, Y and X halved (rounded up) per level."""
    out = [(int(shape[0]), int(shape[1]), int(shape[2]))]
    for _ in range(1, levels):
        z, y, x = out[-1]
        out.append((z, -(-y // 2), -(-x // 2)))
    return out


def downsample_yx(block: np.ndarray) -> np.ndarray:
    """2×2 mean over Y and X of a ZYX block (float32; an odd last row/column is averaged with itself)."""
    data = np.asarray(block, dtype=np.float32)
    pad = ((0, 0), (0, data.shape[1] % 2), (0, data.shape[2] % 2))
    if any(p[1] for p in pad):
        data = np.pad(data, pad, mode="edge")
    nz, ny, nx = data.shape
    return data.reshape(nz, ny // 2, 2, nx // 2, 2).mean(axis=(2, 4), dtype=np.float32)


def _cast(block: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """``block`` in ``dtype`` (rounded and clipped to the range of an integer type)."""
    if dtype.kind in "ui":
        info = np.iinfo(dtype)
        return np.clip(np.rint(block), info.min, info.max).astype(dtype)
    return block.astype(dtype, copy=False)


def pyramid_slabs(source: Any, levels: int, slab: int = SLAB) -> Iterator[tuple[int, int, list[np.ndarray]]]:
    """(z0, z1, [block of each level]) for consecutive Z slabs of a plane source (ZYX, source dtype)."""
    dtype = np.dtype(getattr(source, "dtype", np.float32))
    for z0 in range(0, source.shape[0], slab):
        z1 = min(source.shape[0], z0 + slab)
        block = np.asarray(source.planes(z0, z1))
        blocks = [_cast(block, dtype)]
        current = block
        for _ in range(1, levels):
            current = downsample_yx(current)
            blocks.append(_cast(current, dtype))
        yield z0, z1, blocks


def multiscale_datasets(spacing: Sequence[float], levels: int) -> list[dict[str, Any]]:
    """NGFF ``datasets`` entries: level k scales Y/X spacing (µm) by 2^k, translated by half the extra pixel size."""
    z, y, x = (float(s) for s in spacing)
    out = []
    for k in range(levels):
        f = 2**k
        transforms: list[dict[str, Any]] = [{"type": "scale", "scale": [z, y * f, x * f]}]
        if k:
            transforms.append({"type": "translation", "translation": [0.0, y * (f - 1) / 2, x * (f - 1) / 2]})
        out.append({"path": str(k), "coordinateTransformations": transforms})
    return out


def write_ome_zarr(
    path: Path,
    source: Any,
    spacing: Sequence[float],
    channel: str | None = None,
    name: str | None = None,
    levels: int | None = None,
    extra: dict[str, Any] | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    """Write a ZYX plane source as a multiscale OME-Zarr image (NGFF 0.5) at ``path``; returns what was written.

    ``spacing`` is (z, y, x) µm of level 0; ``levels`` defaults to :func:`auto_levels`. The store
    is built under ``.<name>.partial`` next to ``path`` and renamed into place when complete (an
    existing store at ``path`` is replaced then). Chunks: (:data:`SLAB`, ≤ :data:`CHUNK_YX`,
    ≤ :data:`CHUNK_YX`). ``extra`` is stored under the image's ``fusemycells`` attribute.
    """
    zarr, _ = require_zarr()
    path = Path(path)
    shape = tuple(int(n) for n in source.shape)
    if len(shape) != 3:
        raise ValueError(f"expected a ZYX source, got shape {shape}")
    dtype = np.dtype(getattr(source, "dtype", np.float32))
    levels = auto_levels(shape) if levels is None else max(1, int(levels))
    shapes = level_shapes(shape, levels)
    tmp = path.with_name(f".{path.name}.partial")
    if tmp.exists():
        shutil.rmtree(tmp)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        group = zarr.open_group(str(tmp), mode="w", zarr_format=3)
        _write_levels(group, source, shapes, dtype, progress)
        _write_attributes(group, spacing, levels, name or path.name, channel, extra)
        replacing = path.exists()
        if replacing:
            shutil.rmtree(path)
        tmp.rename(path)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        full = disk_full_error(path.name, path.parent, sum(math.prod(s) for s in shapes) * dtype.itemsize, exc)
        if full is not None:
            raise full from exc
        raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if replacing:
        log.info("[%s] replaced the existing output %s", path.name, path)
    written = {"path": str(path), "levels": levels, "shapes": [list(s) for s in shapes], "dtype": str(dtype)}
    return {**written, "spacing_um": [float(s) for s in spacing]}


def _write_levels(
    group: Any,
    source: Any,
    shapes: Sequence[tuple[int, int, int]],
    dtype: np.dtype,
    progress: Callable[[int, int], None] | None,
) -> None:
    """One array per pyramid level (ZYX ``shapes``) in ``group``, filled slab by slab from ``source``."""
    arrays = [
        group.create_array(
            str(k),
            shape=s,
            chunks=(min(SLAB, s[0]), min(CHUNK_YX, s[1]), min(CHUNK_YX, s[2])),
            dtype=dtype,
            dimension_names=("z", "y", "x"),
        )
        for k, s in enumerate(shapes)
    ]
    for z0, z1, blocks in pyramid_slabs(source, len(shapes)):
        for array, block in zip(arrays, blocks):
            array[z0:z1] = block
        if progress is not None:
            progress(z1, shapes[0][0])


def _write_attributes(
    group: Any, spacing: Sequence[float], levels: int, name: str, channel: str | None, extra: dict[str, Any] | None
) -> None:
    """The NGFF multiscales metadata (written by ``ome_zarr``; spacing (z, y, x) µm) and ``extra``."""
    _, writer = require_zarr()
    from ome_zarr.format import FormatV05

    axes = [{"name": a, "type": "space", "unit": "micrometer"} for a in ("z", "y", "x")]
    writer.write_multiscales_metadata(
        group,
        multiscale_datasets(spacing, levels),
        fmt=FormatV05(),
        axes=axes,
        name=name,
        metadata={"omero": {"channels": [{"label": channel or "fused"}]}} if channel else {},
    )
    if extra:
        group.attrs["fusemycells"] = extra


def read_image(path: Path, options: ReadOptions) -> Volume:
    """One level (``options.level``) and channel (``options.channel_index``) of an OME-Zarr image as a
    :class:`Volume` (ZYX, spacing (z, y, x) µm); the memory check runs before the pixels are read."""
    info = open_level(Path(path), options.level, options.channel_index)
    if options.check is not None:
        options.check(info.shape, info.dtype, info.spacing)
    channel = options.channel or info.channel
    warnings = list(info.warnings)
    if channel is None:
        channel = "nucleus"
        warnings.append("channel missing in metadata: using default 'nucleus'")
    z, y, x = info.spacing
    meta = {"PhysicalSizeZ": z, "PhysicalSizeY": y, "PhysicalSizeX": x, "unit": "um", "channel": channel}
    meta["source_level"] = options.level
    return Volume(data=read_level(info), spacing=info.spacing, channel=channel, metadata=meta, warnings=warnings)


def write_image(path: Path, source: Any, like: Volume, options: WriteOptions) -> None:
    """:func:`write_ome_zarr` with the spacing and channel of the input ``like``; the image's name and the
    ``fusemycells`` attribute name the input (``options.source``) and carry ``options.fingerprint``."""
    name = options.source or Path(path).name
    extra = {"source": name, "channel": like.channel, "fingerprint": options.fingerprint}
    levels = options.levels
    write_ome_zarr(Path(path), source, like.spacing, channel=like.channel, name=name, levels=levels, extra=extra)


def not_ome_reason(path: Path) -> str | None:
    """:data:`NOT_OME` for a Zarr store without OME multiscales metadata, else None."""
    return NOT_OME if is_zarr_store(path) and not is_ome_zarr(path) else None


FORMATS = (
    Format(
        "ome-zarr",
        (".ome.zarr", ".zarr"),
        is_ome_zarr,
        read_image,
        write_image,
        folder=True,
        not_input=not_ome_reason,
        require=require_zarr,
    ),
)
"""OME-Zarr in the registry (:mod:`fusemycells.io.formats`): any folder holding a multiscale image, named so or not."""
