"""TIFF input/output with the FuseMyCells metadata conventions.

Volumes are numpy arrays in ZYX order; spacings are (z, y, x) in micrometres.
Metadata is read like the organisers' reference: ``shaped_metadata[0]`` first, then
``imagej_metadata``; physical sizes may be spelled ``PhysicalSizeX``, ``physicalsizex`` or
``physical_size_x``. Missing values fall back to the TIFF resolution tags, then to documented
defaults, and every fallback is recorded in :attr:`Volume.warnings`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import tifffile

from .sources import materialise

log = logging.getLogger(__name__)

DEFAULT_SPACING_ZYX_UM: tuple[float, float, float] = (1.0, 0.39, 0.39)
"""Spacing used when a file declares none (µm, ZYX): the most common real study grid."""
DEFAULT_CHANNEL = "nucleus"
"""Channel used when a file declares none: nuclei are the majority of the challenge data."""
CHANNELS = ("nucleus", "membrane")
PLAUSIBLE_SPACING_UM = (0.01, 100.0)
"""Declared spacings outside this range (µm) are ignored as implausible (then: fallbacks)."""
TIFF_SUFFIXES = (".tif", ".tiff")

_AXIS_KEYS = {
    "x": ("PhysicalSizeX", "physicalsizex", "physical_size_x"),
    "y": ("PhysicalSizeY", "physicalsizey", "physical_size_y"),
    "z": ("PhysicalSizeZ", "physicalsizez", "physical_size_z"),
}
_STACK_AXES = frozenset("ZYXQI")
"""Axis letters that may be larger than 1: Z, Y, X and tifffile's unlabelled Q (other) and I (pages)."""
_EXTRA_AXES = {"C": "extra channels", "S": "RGB samples", "T": "time points"}
"""What a non-singleton axis letter means, for the refusal message."""


class InputError(ValueError):
    """A single input file cannot be processed (the reason is in the message)."""


@dataclass
class Volume:
    """One 3D stack and what we know about it.

    ``data`` is ZYX in the file's dtype; ``spacing`` is (z, y, x) in µm.
    """

    data: np.ndarray
    spacing: tuple[float, float, float]
    channel: str
    metadata: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    source_shape: tuple[int, ...] | None = None  # the file's shape when it was not ZYX (2D, singleton axes)
    source_axes: str | None = None  # the file's axes letters for ``source_shape``, when known


def _lookup(meta: dict[str, Any], keys: tuple[str, ...]) -> Any:
    """Value of the first key present in ``meta`` (case-sensitive list, then case-insensitive)."""
    for key in keys:
        if key in meta:
            return meta[key]
    lowered = {str(k).lower(): v for k, v in meta.items()}
    for key in keys:
        if key.lower() in lowered:
            return lowered[key.lower()]
    return None


def _as_positive_float(value: Any) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if np.isfinite(number) and number > 0 else None


def read_metadata(tif: tifffile.TiffFile) -> dict[str, Any]:
    """Metadata dict from ``shaped_metadata[0]``, else ``imagej_metadata``, else ``{}``."""
    shaped = tif.shaped_metadata
    if shaped and isinstance(shaped[0], dict) and shaped[0]:
        return dict(shaped[0])
    imagej = tif.imagej_metadata
    if imagej:
        return dict(imagej)
    return {}


def _resolution_spacing(tif: tifffile.TiffFile, um_per_unit: float = 1.0) -> tuple[tuple[float | None, float | None], str]:
    """((y, x) pixel size in µm, note) from the first page's resolution tags, if declared.

    ``um_per_unit``: µm per metadata unit, for tags without a unit (ImageJ: pixels per unit).
    ``note`` says why declared tags were ignored ('' when none were).
    """
    tags = tif.pages.first.tags
    unit_tag = tags.get("ResolutionUnit")
    unit = int(unit_tag.value) if unit_tag is not None else 1
    out: list[float | None] = []
    ignored: list[str] = []
    for name in ("YResolution", "XResolution"):
        tag = tags.get(name)
        value = None
        if tag is not None:
            num, den = tag.value
            if num > 0 and den > 0:
                value = pixel_size_from_resolution(num / den, unit, um_per_unit)
                if value is None and abs(num / den - 1.0) > 1e-12:
                    ignored.append(f"{name} {num / den:g} pixels/{_RESOLUTION_UNIT_NAMES.get(unit, 'unit')}")
        out.append(value)
    note = f"TIFF {', '.join(ignored)} ignored (not a plausible pixel size)" if ignored else ""
    return (out[0], out[1]), note


_UM_PER_RESOLUTION_UNIT = {3: 1e4, 4: 1e3}
"""µm per TIFF ResolutionUnit that is converted: CENTIMETER (3), MILLIMETER (4); 5 is MICROMETER."""
_RESOLUTION_UNIT_NAMES = {1: "unit", 2: "inch", 3: "cm", 4: "mm", 5: "µm"}
INCH_AS_UM_RANGE = (0.05, 100.0)
"""Pixel sizes (µm) accepted from resolution tags in unit INCH, read as pixels per µm (see below)."""


def pixel_size_from_resolution(pixels_per_unit: float, unit: int, um_per_unit: float = 1.0) -> float | None:
    """Pixel size (µm) from one TIFF resolution value and its ResolutionUnit, or None if not usable.

    Unit 1 (none) is pixels per metadata unit (ImageJ), scaled by ``um_per_unit``; centimetres
    and millimetres are converted, falling back to a direct pixels-per-µm reading when the
    converted size is implausible. INCH (2) is never converted: the reference writer stores pixels
    per µm under tifffile's default unit INCH, while a real dots-per-inch value is a print setting
    (300 dpi would be 84.7 µm), so only a direct reading within :data:`INCH_AS_UM_RANGE` is kept.
    1 pixel per unit is tifffile's "not set" default (None).
    """
    if not np.isfinite(pixels_per_unit) or pixels_per_unit <= 0 or abs(pixels_per_unit - 1.0) < 1e-12:
        return None
    raw = 1.0 / pixels_per_unit  # µm when the value is pixels per µm
    if unit == 2:
        lo, hi = INCH_AS_UM_RANGE
        return raw if lo <= raw <= hi else None
    lo, hi = PLAUSIBLE_SPACING_UM
    converted = raw * (um_per_unit if unit == 1 else _UM_PER_RESOLUTION_UNIT.get(unit, 1.0))
    for value in (converted, raw):
        if lo <= value <= hi:
            return value
    return None


_UM_PER_UNIT = {
    **dict.fromkeys(("um", "\u00b5m", "micron", "micrometer", "micrometre", "\\u00b5m"), 1.0),  # ImageJ escapes µ
    **dict.fromkeys(("nm", "nanometer", "nanometre"), 1e-3),
    **dict.fromkeys(("mm", "millimeter", "millimetre"), 1e3),
}


def unit_to_um(unit: Any) -> tuple[float, str]:
    """(µm per ``unit``, warning) for a metadata 'unit' value; absent or unknown units read as µm.

    The warning is '' unless the unit is not recognised.
    """
    if unit is None or not str(unit).strip():
        return 1.0, ""
    text = str(unit).strip().lower().replace("\u03bc", "\u00b5")  # Greek mu → micro sign
    for key in (text, text.removesuffix("s")):  # "microns", "nanometers"
        if key in _UM_PER_UNIT:
            return _UM_PER_UNIT[key], ""
    return 1.0, f"unit {unit!r} not recognised: physical sizes read as µm"


def spacing_from_metadata(
    meta: dict[str, Any], fallback_yx: tuple[float | None, float | None] = (None, None), tag_note: str = ""
) -> tuple[tuple[float, float, float], list[str]]:
    """(z, y, x) spacing in µm from metadata, with fallbacks; returns (spacing, warnings).

    Sizes are in the metadata's ``unit`` (µm when absent; nm and mm are converted). ``tag_note``
    (why the resolution tags were ignored) is added to the warning of a Y/X default.
    """
    unit = _lookup(meta, ("unit",))
    um_per_unit, unit_warning = unit_to_um(unit)
    warnings: list[str] = [unit_warning] if unit_warning else []
    raw = {axis: _lookup(meta, keys) for axis, keys in _AXIS_KEYS.items()}
    if raw["z"] is None:
        raw["z"] = meta.get("spacing")  # ImageJ's z step (in its 'unit')
    found: dict[str, float | None] = {}
    for axis, value in raw.items():
        number = _as_positive_float(value)
        number = None if number is None else number * um_per_unit
        if value is not None and (number is None or not PLAUSIBLE_SPACING_UM[0] <= number <= PLAUSIBLE_SPACING_UM[1]):
            lo, hi = PLAUSIBLE_SPACING_UM
            shown = f"{value!r}" if number is None or um_per_unit == 1.0 else f"{value!r} {unit} ({number:g} µm)"
            warnings.append(f"PhysicalSize{axis.upper()}={shown} is not a plausible spacing ({lo:g}–{hi:g} µm): ignored")
            number = None
        found[axis] = number
    resolved: list[float] = []
    for index, axis in enumerate("zyx"):
        value = found[axis]
        if value is None and axis in "yx":
            value = fallback_yx[index - 1]
            if value is not None:
                warnings.append(f"PhysicalSize{axis.upper()} missing: using TIFF resolution tag ({value:g} µm)")
        if value is None:
            value = DEFAULT_SPACING_ZYX_UM[index]
            why = f" ({tag_note})" if tag_note and axis in "yx" else ""
            warnings.append(f"PhysicalSize{axis.upper()} missing: using default {value:g} µm{why}")
        resolved.append(value)
    return (resolved[0], resolved[1], resolved[2]), warnings


def channel_from_metadata(meta: dict[str, Any], path: Path | None = None) -> tuple[str, list[str]]:
    """'nucleus' or 'membrane' from metadata, then the file name, then the default."""
    value = _lookup(meta, ("channel", "Channel"))
    if isinstance(value, str):
        text = value.strip().lower()
        for name in CHANNELS:
            if text.startswith(name[:5]):  # "nuclei", "nucleus", "membranes", ...
                return name, []
    if path is not None:
        stem = path.name.lower()
        for name in CHANNELS:
            if name in stem:
                return name, [f"channel missing in metadata: '{name}' taken from the file name"]
    return DEFAULT_CHANNEL, [f"channel missing in metadata: using default '{DEFAULT_CHANNEL}'"]


MIN_PLANES_AS_Z = 4
"""A lone C or T axis of at least this many entries in a stack without Z is read as Z (see :func:`stack_axes`)."""


def stack_axes(shape: tuple[int, ...], axes: str) -> str:
    """``axes`` with a lone channel/time axis renamed Z when the stack has no Z axis of its own.

    ``tifffile.imwrite(..., imagej=True)`` without explicit axes stores a 3D stack as ImageJ
    *channels* (read back as 'CYX'); a challenge input is one 3D channel, so a C (or T) axis of
    ≥ :data:`MIN_PLANES_AS_Z` entries next to Y and X, with no non-singleton Z, is its Z axis.
    Anything else is returned unchanged (and refused by :func:`squeeze_to_zyx` if it has extras).
    """
    if len(axes) != len(shape):
        return axes
    upper = axes.upper()
    big = [i for i, n in enumerate(shape) if n > 1]
    extra = [i for i in big if upper[i] not in _STACK_AXES]
    has_z = any(upper[i] == "Z" for i in big)
    if not has_z and len(extra) == 1 and upper[extra[0]] in "CT" and shape[extra[0]] >= MIN_PLANES_AS_Z and len(big) == 3:
        i = extra[0]
        return axes[:i] + "Z" + axes[i + 1 :]
    return axes


def squeeze_to_zyx(shape: tuple[int, ...], axes: str = "") -> tuple[int, int, int]:
    """The ZYX shape a stack is read as: singleton axes dropped, a 2D image becomes one slice.

    ``axes`` are tifffile's letters for ``shape`` ('' when unknown). Raises :class:`InputError`,
    naming the axes, when a known axis other than Z, Y, X (or tifffile's unlabelled Q/I) is
    larger than 1 (channels C, RGB samples S, time points T, ...), or when more than three
    non-singleton axes remain.
    """
    axes = stack_axes(shape, axes)
    if len(axes) == len(shape):
        extra = [(letter, size) for letter, size in zip(axes.upper(), shape) if size > 1 and letter not in _STACK_AXES]
        if extra:
            found = ", ".join(f"{letter}={size}" for letter, size in extra)
            what = " and ".join(dict.fromkeys(_EXTRA_AXES.get(letter, f"'{letter}' entries") for letter, _ in extra))
            raise InputError(f"non-singleton axes beyond Z, Y, X ({found}) in shape {tuple(shape)} (axes '{axes}'): {what} are not supported")
    dims = list(shape)
    names = list(axes) if len(axes) == len(shape) else ["?"] * len(shape)
    while len(dims) > 3 and 1 in dims:
        index = dims.index(1)
        del dims[index], names[index]
    if len(dims) > 3:
        raise InputError(f"stack has {len(dims)} non-singleton axes {tuple(shape)} (axes '{axes}'): extra channels or time points are not supported")
    if len(dims) == 2:
        dims.insert(0, 1)
    if len(dims) != 3 or min(dims) < 1:
        raise InputError(f"expected a 2D or 3D image, got shape {tuple(shape)}")
    return (dims[0], dims[1], dims[2])


ReadCheck = Callable[[tuple[int, int, int], np.dtype, tuple[float, float, float]], None]


def read_volume(path: Path, check: ReadCheck | None = None) -> Volume:
    """Read a TIFF as a ZYX stack with its spacing (µm), channel and metadata.

    ``check(shape_zyx, dtype, spacing)`` runs after the header is read and before the pixels are
    loaded (memory budget); it raises to refuse the file. Raises :class:`InputError` for files
    that are not readable TIFF stacks or have unsupported axes.
    """
    path = Path(path)
    try:
        with tifffile.TiffFile(path) as tif:
            series = tif.series[0]
            series_axes = str(getattr(series, "axes", ""))
            shape = squeeze_to_zyx(tuple(series.shape), series_axes)
            read_as = stack_axes(tuple(series.shape), series_axes)
            meta = read_metadata(tif)
            fallback, tag_note = _resolution_spacing(tif, unit_to_um(_lookup(meta, ("unit",)))[0])
            spacing, warnings = spacing_from_metadata(meta, fallback, tag_note)
            if check is not None:
                check(shape, np.dtype(series.dtype), spacing)
            data = series.asarray().reshape(shape)
    except InputError as exc:
        raise InputError(f"{path.name}: {exc}") from exc
    except MemoryError:
        raise
    except Exception as exc:  # tifffile raises many types for corrupt files
        raise InputError(f"{path.name}: not a readable TIFF ({type(exc).__name__}: {exc})") from exc
    if data.dtype.kind not in "uif" or data.dtype.itemsize > 8:
        raise InputError(f"{path.name}: unsupported pixel type {data.dtype}")
    source_shape, source_axes = None, None
    if tuple(series.shape) != shape:
        source_shape = tuple(int(n) for n in series.shape)
        source_axes = str(getattr(series, "axes", "")) or None
        warnings.append(f"shape {source_shape} read as ZYX {shape}; the output keeps the input's shape")
    if read_as != series_axes:
        warnings.append(f"axes '{series_axes}' have no Z axis: read as '{read_as}' (a 3D stack saved as ImageJ channels or time points)")
    channel, channel_warnings = channel_from_metadata(meta, path)
    return Volume(
        data=data,
        spacing=spacing,
        channel=channel,
        metadata=meta,
        warnings=warnings + channel_warnings,
        source_shape=source_shape,
        source_axes=source_axes,
    )


def output_metadata(volume: Volume) -> dict[str, Any]:
    """Metadata written with an output: the input's, with spacing/channel/axes/unit made explicit."""
    meta: dict[str, Any] = {}
    for key, value in volume.metadata.items():
        if isinstance(value, (str, int, float, bool)):
            meta[str(key)] = value
    z, y, x = volume.spacing
    for key in [k for k in meta if k.lower().replace("_", "") in {"physicalsizex", "physicalsizey", "physicalsizez"}]:
        del meta[key]
    meta.update(
        {
            "PhysicalSizeX": float(x),
            "PhysicalSizeY": float(y),
            "PhysicalSizeZ": float(z),
            "unit": "um",  # the sizes are µm whatever the input's unit (nm, mm are converted on reading)
            **({"spacing": float(z)} if "spacing" in meta else {}),  # ImageJ's z step, in 'unit'
            "axes": "ZYX",
            "channel": volume.channel,
        }
    )
    if volume.source_shape is not None:  # written in the input's own shape
        if volume.source_axes and len(volume.source_axes) == len(volume.source_shape) and "S" not in volume.source_axes:
            meta["axes"] = volume.source_axes
        else:
            del meta["axes"]
    meta.pop("shape", None)
    return meta


TILE = (128, 128)
"""TIFF tile shape (Y, X) in pixels, as the organisers' reference writes."""


def _tiles(source: Any, slab: int = 8) -> Iterator[np.ndarray]:
    """Tiles of a plane source in TIFF order: plane by plane, tile rows, tile columns."""
    nz, ny, nx = source.shape
    ty, tx = TILE
    for z0 in range(0, nz, slab):
        block = source.planes(z0, min(nz, z0 + slab))
        for plane in block:
            for y in range(0, ny, ty):
                for x in range(0, nx, tx):
                    yield np.ascontiguousarray(plane[y : y + ty, x : x + tx])


def write_volume(path: Path, data: Any, like: Volume) -> None:
    """Write a ZYX stack like the organisers' reference (BigTIFF, 128×128 tiles, resolution 1/µm).

    ``data`` is an array, or a plane source (``.shape``, ``.dtype``, ``.planes(z0, z1)``) that is
    written z-slab by z-slab without materialising the volume. The file appears under its final
    name only when complete.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = output_metadata(like)
    streamed = not isinstance(data, np.ndarray)
    shape = tuple(data.shape)
    if like.source_shape is not None and shape != like.source_shape:
        if streamed:
            data = materialise(data)
            streamed = False
        data = data.reshape(like.source_shape)
        shape = like.source_shape
    tmp = path.with_name(f".{path.name}.partial")
    kwargs: dict[str, Any] = {
        "bigtiff": True,
        "resolution": (1.0 / meta["PhysicalSizeX"], 1.0 / meta["PhysicalSizeY"]),
        "metadata": meta,
        "photometric": "minisblack",  # else tifffile writes a 3- or 4-slice stack as one RGB(A) page
        "tile": TILE,
    }
    try:
        if streamed:
            tifffile.imwrite(tmp, _tiles(data), shape=shape, dtype=np.dtype(getattr(data, "dtype", np.float32)), **kwargs)
        else:
            tifffile.imwrite(tmp, data, **kwargs)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    tmp.replace(path)  # never leave a half-written file under the final name


def list_inputs(directory: Path) -> list[Path]:
    """Sorted ``*.tif``/``*.tiff`` files (any case) directly inside ``directory``."""
    return sorted(p for p in Path(directory).iterdir() if p.is_file() and p.suffix.lower() in TIFF_SUFFIXES)
