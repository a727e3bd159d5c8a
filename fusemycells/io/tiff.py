"""TIFF input/output with the FuseMyCells metadata conventions.

Volumes are numpy arrays in ZYX order; spacings are (z, y, x) in micrometres.
Metadata is read like the organisers' reference: the series' shaped (JSON) metadata first, then
``imagej_metadata``, then OME-XML; physical sizes may be spelled ``PhysicalSizeX``,
``physicalsizex`` or ``physical_size_x``, each with an optional per-axis unit
(``PhysicalSizeXUnit``). Missing values fall back to the TIFF resolution tags, then to documented
defaults, and every fallback is recorded in :attr:`Volume.warnings`.
"""

from __future__ import annotations

import bisect
import json
import logging
import math
import os
import tempfile
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import tifffile

from fusemycells.io.volume import (  # noqa: F401  (DiskFullError, disk_full_error: re-exported, older import paths)
    DiskFullError,
    Format,
    InputError,
    ReadCheck,
    ReadOptions,
    Volume,
    WriteOptions,
    disk_full_error,
)

log = logging.getLogger(__name__)

DEFAULT_SPACING_ZYX_UM: tuple[float, float, float] = (1.0, 0.39, 0.39)
"""Spacing used when a file declares none (µm, ZYX): the most common real study grid."""
DEFAULT_CHANNEL = "nucleus"
"""Channel used when a file declares none: nuclei are the majority of the challenge data."""
CHANNELS = ("nucleus", "membrane")
PLAUSIBLE_SPACING_UM = (0.01, 100.0)
"""Declared spacings outside this range (µm) are ignored as implausible (then: fallbacks)."""
TIFF_SUFFIXES = (".tif", ".tiff")
TIFF_MAGICS = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")
"""The first 4 bytes of a TIFF (little / big endian) or BigTIFF file."""
PARTIAL_PREFIX, PARTIAL_SUFFIX = ".fmc-", ".partial"
PARTIAL_PATTERN = f"{PARTIAL_PREFIX}*{PARTIAL_SUFFIX}"
"""Names of the temporary files :func:`write_volume` writes an output to before renaming it."""

_AXIS_KEYS = {
    "x": ("PhysicalSizeX", "physicalsizex", "physical_size_x"),
    "y": ("PhysicalSizeY", "physicalsizey", "physical_size_y"),
    "z": ("PhysicalSizeZ", "physicalsizez", "physical_size_z"),
}
_AXIS_UNIT_KEYS = {
    axis: (f"PhysicalSize{axis.upper()}Unit", f"physicalsize{axis}unit", f"physical_size_{axis}_unit", f"{axis}unit")
    for axis in "xyz"
}
"""Per-axis unit keys (OME spelling, its lower and snake case, ImageJ's ``yunit``/``zunit``): they override ``unit``."""
_STACK_AXES = frozenset("ZYXQI")
"""Axis letters that may be larger than 1: Z, Y, X and tifffile's unlabelled Q (other) and I (pages)."""
_EXTRA_AXES = {"C": "extra channels", "S": "RGB samples", "T": "time points"}
"""What a non-singleton axis letter means, for the refusal message."""


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
    if isinstance(value, bool):  # JSON/XML 'true' is not a size (float(True) would be 1.0)
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if np.isfinite(number) and number > 0 else None


def read_metadata(tif: tifffile.TiffFile, series_index: int = 0) -> tuple[dict[str, Any], list[str]]:
    """(metadata dict, warnings) of one series: its shaped (JSON) metadata, else ``imagej_metadata``,
    else the OME-XML of its image (:func:`ome_metadata`), else ``{}``."""
    series = tif.series
    if tif.is_shaped and tif.shaped_metadata and series[series_index].kind == "shaped":
        # shaped_metadata holds one dict per shaped series, in series order
        position = sum(1 for s in series[:series_index] if s.kind == "shaped")
        shaped = tif.shaped_metadata
        if position < len(shaped) and isinstance(shaped[position], dict) and shaped[position]:
            return dict(shaped[position]), []
    imagej = tif.imagej_metadata
    if imagej:
        return dict(imagej), []
    if tif.is_ome and tif.ome_metadata:
        try:
            return ome_metadata(tif.ome_metadata, series_index), []
        except Exception as exc:  # malformed XML: the pixels are still readable
            return {}, [f"OME-XML metadata not readable ({type(exc).__name__}): ignored"]
    return {}, []


def ome_metadata(xml: str, image_index: int = 0) -> dict[str, Any]:
    """Spacing and channel of one OME ``Image`` as a metadata dict.

    Keys: ``PhysicalSize{X,Y,Z}`` and ``PhysicalSize{X,Y,Z}Unit`` (OME's default unit is µm) from
    its ``Pixels`` element, and ``channel`` from the ``Name`` of its single ``Channel``.
    """
    tree = tifffile.xml2dict(xml)
    ome = tree.get("OME") if isinstance(tree, dict) else None
    images = ome.get("Image") if isinstance(ome, dict) else None
    images = images if isinstance(images, list) else [images] if isinstance(images, dict) else []
    if not images:
        return {}
    image = images[image_index] if image_index < len(images) else images[0]
    pixels = image.get("Pixels") if isinstance(image.get("Pixels"), dict) else {}
    meta = {
        key: pixels[key]
        for axis in "XYZ"
        for key in (f"PhysicalSize{axis}", f"PhysicalSize{axis}Unit")
        if key in pixels
    }
    channels = pixels.get("Channel")
    channels = channels if isinstance(channels, list) else [channels] if isinstance(channels, dict) else []
    if len(channels) == 1 and channels[0].get("Name") is not None:
        meta["channel"] = channels[0]["Name"]
    return meta


def _resolution_spacing(
    page: tifffile.TiffPage, um_per_unit_yx: tuple[float, float] = (1.0, 1.0)
) -> tuple[tuple[float | None, float | None], str]:
    """((y, x) pixel size in µm, note) from a page's resolution tags, if declared.

    ``um_per_unit_yx``: µm per metadata unit of Y and X, for tags without a unit (ImageJ: pixels
    per unit). ``note`` says why declared tags were ignored ('' when none were).
    """
    tags = page.tags
    unit_tag = tags.get("ResolutionUnit")
    unit = int(unit_tag.value) if unit_tag is not None else 1
    out: list[float | None] = []
    ignored: list[str] = []
    for name, um_per_unit in zip(("YResolution", "XResolution"), um_per_unit_yx):
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
    **dict.fromkeys(("\u00e5", "\u212b", "angstrom"), 1e-4),  # OME's "Å" (either code point)
    **dict.fromkeys(("cm", "centimeter", "centimetre"), 1e4),
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


def axis_units(meta: dict[str, Any]) -> tuple[dict[str, tuple[float, Any]], list[str]]:
    """({axis: (µm per unit, unit as written)} for 'z', 'y', 'x'; warnings) from a metadata dict.

    A per-axis unit (``PhysicalSizeZUnit``, ..., see :data:`_AXIS_UNIT_KEYS`) overrides the
    global ``unit``; absent units are µm, unknown ones are read as µm with a warning.
    """
    common = _lookup(meta, ("unit",))
    warnings: list[str] = []
    units: dict[str, tuple[float, Any]] = {}
    for axis in "zyx":
        own = _lookup(meta, _AXIS_UNIT_KEYS[axis])
        unit = own if own is not None and str(own).strip() else common
        factor, warning = unit_to_um(unit)
        if warning and warning not in warnings:
            warnings.append(warning)
        units[axis] = (factor, unit)
    return units, warnings


def spacing_from_metadata(
    meta: dict[str, Any], fallback_yx: tuple[float | None, float | None] = (None, None), tag_note: str = ""
) -> tuple[tuple[float, float, float], list[str]]:
    """(z, y, x) spacing in µm from metadata, with fallbacks; returns (spacing, warnings).

    Sizes are in their axis' unit (:func:`axis_units`: µm when absent; nm, mm, ... are converted). ``tag_note``
    (why the resolution tags were ignored) is added to the warning of a Y/X default.
    """
    units, warnings = axis_units(meta)
    raw = {axis: _lookup(meta, keys) for axis, keys in _AXIS_KEYS.items()}
    if raw["z"] is None:
        raw["z"] = meta.get("spacing")  # ImageJ's z step (in its 'unit')
    found: dict[str, float | None] = {}
    for axis, value in raw.items():
        um_per_unit, unit = units[axis]
        number = _as_positive_float(value)
        number = None if number is None else number * um_per_unit
        if value is not None and (number is None or not PLAUSIBLE_SPACING_UM[0] <= number <= PLAUSIBLE_SPACING_UM[1]):
            lo, hi = PLAUSIBLE_SPACING_UM
            shown = f"{value!r}" if number is None or um_per_unit == 1.0 else f"{value!r} {unit} ({number:g} µm)"
            warnings.append(
                f"PhysicalSize{axis.upper()}={shown} is not a plausible spacing ({lo:g}–{hi:g} µm): ignored"
            )
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
    """'nucleus' or 'membrane' from metadata, then the file name, then the default.

    The warning names an unknown value (``unknown channel 'dapi'``) rather than calling it missing.
    """
    value = _lookup(meta, ("channel", "Channel"))
    if isinstance(value, str) and not value.strip():
        value = None
    if isinstance(value, str):
        text = value.strip().lower()
        for name in CHANNELS:
            if text.startswith(name[:5]):  # "nuclei", "nucleus", "membranes", ...
                return name, []
    why = "channel missing in metadata" if value is None else f"unknown channel {value!r} in metadata"
    if path is not None:
        stem = path.name.lower()
        for name in CHANNELS:
            if name in stem:
                return name, [f"{why}: using '{name}' from the file name"]
    return DEFAULT_CHANNEL, [f"{why}: using default '{DEFAULT_CHANNEL}'"]


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
    if (
        not has_z
        and len(extra) == 1
        and upper[extra[0]] in "CT"
        and shape[extra[0]] >= MIN_PLANES_AS_Z
        and len(big) == 3
    ):
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
            raise InputError(
                f"non-singleton axes beyond Z, Y, X ({found}) in shape {tuple(shape)} (axes '{axes}'): "
                f"{what} are not supported"
            )
    dims = list(shape)
    names = list(axes) if len(axes) == len(shape) else ["?"] * len(shape)
    while len(dims) > 3 and 1 in dims:
        index = dims.index(1)
        del dims[index], names[index]
    if len(dims) > 3:
        raise InputError(
            f"stack has {len(dims)} non-singleton axes {tuple(shape)} (axes '{axes}'): "
            "extra channels or time points are not supported"
        )
    if len(dims) == 2:
        dims.insert(0, 1)
    if len(dims) != 3 or min(dims) < 1:
        raise InputError(f"expected a 2D or 3D image, got shape {tuple(shape)}")
    return (dims[0], dims[1], dims[2])


def choose_series(shapes: list[tuple[tuple[int, ...], str]]) -> tuple[int, list[str]]:
    """(index of the series to read, warnings) among a file's series, given as (shape, axes).

    One series: index 0. Several (a thumbnail or an overview before the stack, a multi-image
    OME-TIFF): the largest one readable as a stack, 3D (more than one Z plane) before 2D, with a
    warning naming the ignored ones. When none is readable, the largest one is returned so that
    :func:`squeeze_to_zyx` refuses it with its reason.
    """
    if len(shapes) <= 1:
        return 0, []
    ranked: list[tuple[bool, bool, int, int]] = []  # (readable, 3D, voxels, -index)
    for index, (shape, axes) in enumerate(shapes):
        try:
            zyx = squeeze_to_zyx(shape, axes)
        except InputError:
            ranked.append((False, False, math.prod(shape), -index))
            continue
        ranked.append((True, zyx[0] > 1, math.prod(zyx), -index))
    best = -max(ranked)[3]
    ignored = [f"series {i} {tuple(shape)}" for i, (shape, _) in enumerate(shapes) if i != best]
    shown = ", ".join(ignored[:5]) + (f" and {len(ignored) - 5} more" if len(ignored) > 5 else "")
    return best, [
        f"file holds {len(shapes)} image series: read series {best} {tuple(shapes[best][0])} (the largest stack), "
        f"ignored {shown}"
    ]


def _description_json(tif: tifffile.TiffFile) -> dict[str, Any] | None:
    """The first page's JSON image description as a dict, or None when it is not valid JSON."""
    try:
        value = json.loads(tif.pages.first.description)
    except (ValueError, TypeError):
        return None
    return value if isinstance(value, dict) else None


def _shaped_problem(tif: tifffile.TiffFile) -> str | None:
    """Why a file's shaped (JSON) description cannot be trusted for its layout, or None.

    Malformed JSON (tifffile refuses the whole file), or a declared ``shape`` that does not match
    the pages: tifffile then reads fewer pages than the file has (dropping the rest silently) or
    reads past the data.
    """
    if not tif.is_shaped:
        return None
    try:
        series = tif.series
        tif.shaped_metadata  # noqa: B018  (parsed lazily: raises for malformed JSON)
    except Exception as exc:
        if _description_json(tif) is None:
            return "malformed JSON image description: pages read without its metadata"
        return f"shaped series not readable ({type(exc).__name__}: {exc}): pages read as they are"
    declared = (_description_json(tif) or {}).get("shape")
    pages = len(tif.pages)
    consistent = (
        all(s.kind == "shaped" for s in series)
        and sum(len(s.pages) for s in series) == pages
        and all(sum(page.size for page in s.pages if page is not None) == math.prod(s.shape) for s in series)
    )
    if consistent:
        return None
    return (
        f"JSON shape {declared} in the image description does not match the file's {pages} page(s): "
        "pages read without it"
    )


@contextmanager
def _open_tiff(path: Path) -> Iterator[tuple[tifffile.TiffFile, dict[str, Any] | None, list[str]]]:
    """(open TiffFile, metadata from an untrusted JSON description or None, warnings).

    A file whose shaped description cannot be trusted (:func:`_shaped_problem`) is reopened
    without it (tifffile's generic series: its pages as they are); the description's other keys
    are still used when it is valid JSON.
    """
    tif = tifffile.TiffFile(path)
    try:
        problem = _shaped_problem(tif)
        if problem is None:
            yield tif, None, []
            return
        described = _description_json(tif) or {}
        described.pop("shape", None)
        tif.close()
        tif = tifffile.TiffFile(path, is_shaped=False)
        yield tif, described, [problem]
    finally:
        tif.close()


def _magic_problem(path: Path) -> str | None:
    """Why ``path`` is not a TIFF by its first 4 bytes ('empty file', 'not a TIFF: bad magic'), or None.

    Checked before tifffile opens it, whose refusal quotes the bytes it found: of a text file
    (a symlink to ``/etc/passwd``) they would end up in the log and the report.
    """
    try:
        with open(path, "rb") as handle:
            head = handle.read(4)
    except OSError as exc:
        return f"cannot be opened: {exc.strerror or type(exc).__name__}"
    if not head:
        return "empty file"
    if head not in TIFF_MAGICS:
        return "not a TIFF: bad magic"
    return None


def _metadata_and_spacing(
    tif: tifffile.TiffFile, index: int, described: dict[str, Any] | None, warnings: list[str]
) -> tuple[dict[str, Any], tuple[float, float, float]]:
    """Series ``index``'s metadata (``described``: the untrusted description's, when the file was reopened
    without it) and its (z, y, x) spacing in µm, with the resolution tags as Y/X fallback; warnings appended."""
    if described is not None:
        meta = described
    else:
        meta, meta_warnings = read_metadata(tif, index)
        warnings += meta_warnings
    units, _ = axis_units(meta)
    fallback, tag_note = _resolution_spacing(tif.series[index].keyframe, (units["y"][0], units["x"][0]))
    spacing, spacing_warnings = spacing_from_metadata(meta, fallback, tag_note)
    warnings += spacing_warnings
    return meta, spacing


def read_volume(path: Path, check: ReadCheck | None = None, channel: str | None = None) -> Volume:
    """Read a TIFF as a ZYX stack with its spacing (µm), channel and metadata.

    ``check(shape_zyx, dtype, spacing)`` runs after the header is read and before the pixels are
    loaded (memory budget); it raises to refuse the file. ``channel`` forces the channel (else from the
    metadata, then the file name). Raises :class:`InputError` for files that are not readable TIFF
    stacks or have unsupported axes. Compressed files (LZW, zstd, ...) are decoded by ``imagecodecs``.
    """
    path = Path(path)
    problem = _magic_problem(path)
    if problem is not None:
        raise InputError(f"{path.name}: not a readable TIFF ({problem})")
    try:
        with _open_tiff(path) as (tif, described, warnings):
            all_series = tif.series
            index, series_warnings = choose_series([(tuple(s.shape), str(getattr(s, "axes", ""))) for s in all_series])
            warnings += series_warnings
            series = all_series[index]
            series_axes = str(getattr(series, "axes", ""))
            shape = squeeze_to_zyx(tuple(series.shape), series_axes)
            read_as = stack_axes(tuple(series.shape), series_axes)
            meta, spacing = _metadata_and_spacing(tif, index, described, warnings)
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
        source_axes = series_axes or None
        warnings.append(f"shape {source_shape} read as ZYX {shape}; the output keeps the input's shape")
    if read_as != series_axes:
        warnings.append(
            f"axes '{series_axes}' have no Z axis: read as '{read_as}' "
            "(a 3D stack saved as ImageJ channels or time points)"
        )
    channel, channel_warnings = channel_from_metadata(meta, path) if channel is None else (channel, [])
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
    replaced = {
        "channel",
        *(f"physicalsize{a}" for a in "xyz"),
        *(f"physicalsize{a}unit" for a in "xyz"),
        *(f"{a}unit" for a in "xyz"),
    }
    for key in [k for k in meta if k.lower().replace("_", "") in replaced]:
        del meta[key]  # sizes and their units are rewritten in µm; per-axis units would contradict them
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
"""Largest TIFF tile shape (Y, X) in pixels, as the organisers' reference writes."""
TILE_PADDING_MAX = 0.125
"""Largest fraction a tile grid may pad a page axis by; narrower pages are written in strips."""
VERIFY_BYTES = 64 * 2**20
"""Bytes of pages read back after writing (see :func:`sampled_pages`)."""
VERIFY_PAGES = 64
"""Pages read back after writing, at most: each page read costs tifffile ~0.2 ms besides its bytes."""
_SLAB_BYTES = 64 * 2**20
"""Size of the slabs (along the first axis) an array is streamed to the writer in."""


class WriteCheckError(OSError):
    """A written file does not read back as what was computed (it is removed, never renamed)."""


def page_layout(shape: tuple[int, ...]) -> tuple[int, int, int]:
    """(pages, length, width): how tifffile stores a grey stack of ``shape`` with shaped metadata.

    Trailing singleton axes are dropped while more than two axes remain (tifffile's rule: a
    Z×Y×1 stack is ONE Z×Y page), then the last two axes are a page and the others count pages.
    """
    dims = [int(n) for n in shape]
    while len(dims) > 2 and dims[-1] == 1:
        dims.pop()
    if len(dims) < 2:
        dims.insert(0, 1)
    return math.prod(dims[:-2]), dims[-2], dims[-1]


def tile_for(length: int, width: int) -> tuple[int, int] | None:
    """Tile (rows, columns) for a ``length``×``width`` page, or None to write strips.

    Per axis the largest multiple of 16 up to :data:`TILE` whose grid pads the axis by at most
    :data:`TILE_PADDING_MAX` (128 for any axis ≥ 1024 px); None when an axis has no such tile
    (under 16 px, or e.g. 20 px), so a narrow stack is not inflated (a 16×16 page in a 128×128
    tile is 64× its size).
    """
    chosen: list[int] = []
    for size, largest in zip((length, width), TILE):
        fits = [t for t in range(largest, 15, -16) if math.ceil(size / t) * t <= size * (1 + TILE_PADDING_MAX)]
        if not fits:
            return None
        chosen.append(fits[0])
    return chosen[0], chosen[1]


@dataclass(frozen=True)
class WrittenDigest:
    """What a written file must read back as: its series shape and dtype, its pages (count and
    length × width) and the CRC-32 of the bytes of some pages (index → checksum)."""

    shape: tuple[int, ...]
    dtype: np.dtype
    pages: int
    page_shape: tuple[int, int]
    crc32: dict[int, int]


def sampled_pages(pages: int, page_bytes: int, budget: int = VERIFY_BYTES, most: int = VERIFY_PAGES) -> list[int]:
    """Indices of the pages read back: all when they fit ``budget`` bytes and ``most`` pages, else
    evenly spaced ones within both (always the first and the last)."""
    count = min(pages, most, max(2, budget // max(page_bytes, 1)))
    if count >= pages:
        return list(range(pages))
    return sorted({round(i * (pages - 1) / (count - 1)) for i in range(count)})


class _PageChecksums:
    """CRC-32 of the chosen pages of a flat (C-order) element stream, computed as it passes."""

    def __init__(self, page_size: int, pages: list[int]) -> None:
        self.page_size = page_size
        self.pages = sorted(pages)
        self.crc = dict.fromkeys(self.pages, 0)
        self.offset = 0

    def tap(self, chunks: Iterator[np.ndarray]) -> Iterator[np.ndarray]:
        for chunk in chunks:
            start, end = self.offset, self.offset + chunk.size
            first = bisect.bisect_left(self.pages, start // self.page_size)
            for page in self.pages[first:]:
                lo, hi = max(start, page * self.page_size), min(end, (page + 1) * self.page_size)
                if lo >= hi:
                    break
                self.crc[page] = zlib.crc32(chunk[lo - start : hi - start], self.crc[page])
            self.offset = end
            yield chunk


def _flat_chunks(data: Any, dtype: np.dtype) -> Iterator[np.ndarray]:
    """The elements of an array or a plane source in C order, as contiguous 1D chunks of ``dtype``."""
    if isinstance(data, np.ndarray):
        rows = max(1, _SLAB_BYTES // max(data[:1].nbytes, 1))
        for i in range(0, data.shape[0], rows):
            yield np.ascontiguousarray(data[i : i + rows], dtype=dtype).reshape(-1)
        return
    nz = data.shape[0]
    for z0 in range(0, nz, 8):
        yield np.ascontiguousarray(data.planes(z0, min(nz, z0 + 8)), dtype=dtype).reshape(-1)


def _tiles(
    chunks: Iterator[np.ndarray], pages: int, length: int, width: int, tile: tuple[int, int]
) -> Iterator[np.ndarray]:
    """Tiles in TIFF order (page by page, tile rows, tile columns) cut from a flat element stream.

    A tile row of a page is the next ``rows × width`` elements of the stream, whatever the
    array's own axes, so any page layout (:func:`page_layout`) is cut correctly.
    """
    ty, tx = tile
    pending: list[np.ndarray] = []
    held = 0
    source = iter(chunks)

    def take(count: int) -> np.ndarray:
        nonlocal held
        while held < count:
            chunk = next(source)
            pending.append(chunk)
            held += chunk.size
        joined = pending[0] if len(pending) == 1 else np.concatenate(pending)
        pending[:] = [joined[count:]] if joined.size > count else []
        held -= count
        return joined[:count]

    for _ in range(pages):
        for y0 in range(0, length, ty):
            rows = min(ty, length - y0)
            block = take(rows * width).reshape(rows, width)
            for x0 in range(0, width, tx):
                yield np.ascontiguousarray(block[:, x0 : x0 + tx])


def check_output_name(folder: Path, name: str) -> None:
    """Raise :class:`InputError` when ``name`` cannot be created in ``folder``: longer than its
    file system's name limit (bytes, usually 255) or making a path longer than the path limit.

    Cheap (no file is created): call it before computing a file's output.
    """
    existing = Path(folder).absolute()
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    name_max = _pathconf(existing, "PC_NAME_MAX", 255)
    path_max = _pathconf(existing, "PC_PATH_MAX", 4096)
    size = len(os.fsencode(name))
    if size > name_max:
        raise InputError(
            f"{name}: output file name is {size} bytes, over the {name_max}-byte limit "
            "of the output folder's file system"
        )
    full = len(os.fsencode(str(Path(folder).absolute() / name)))
    if full >= path_max:
        raise InputError(f"{name}: output path is {full} bytes, over the {path_max}-byte path limit")


def _pathconf(path: Path, name: str, default: int) -> int:
    try:
        value = os.pathconf(path, name)
    except (OSError, ValueError):
        return default
    return value if value > 0 else default


def _umask() -> int:
    """The process umask, read without changing it (Linux /proc; 0o022 elsewhere)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    return 0o022


def write_volume(path: Path, data: Any, like: Volume, verify: bool = True) -> WrittenDigest:
    """Write a ZYX stack like the organisers' reference (BigTIFF, tiles, resolution 1/µm); returns its digest.

    ``data`` is an array, or a plane source (``.shape``, ``.dtype``, ``.planes(z0, z1)``) that is written
    z-slab by z-slab without materialising the volume. The file is written in the input's own shape
    (``like.source_shape``) when it had one. Tiles are 128×128 where the page allows (:func:`tile_for`),
    else strips. It is written to a new, exclusively created temporary file in the output folder
    (unpredictable name, ``O_EXCL|O_NOFOLLOW``), read back (:func:`verify_written`, with ``verify``) and
    renamed to its final name; on any failure or interruption the temporary file is removed. Raises
    :class:`InputError` when the name is too long (before writing), :class:`WriteCheckError` when it reads back wrong.
    """
    path = Path(path)
    check_output_name(path.parent, path.name)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = output_metadata(like)
    shape = tuple(like.source_shape) if like.source_shape is not None else tuple(data.shape)
    if math.prod(shape) != math.prod(data.shape):
        raise ValueError(f"cannot write {tuple(data.shape)} voxels as the input's shape {shape}")
    dtype = np.dtype(getattr(data, "dtype", np.float32))
    pages, length, width = page_layout(shape)
    checked = _PageChecksums(length * width, sampled_pages(pages, length * width * dtype.itemsize))
    stream = checked.tap(_flat_chunks(data, dtype))
    tile = tile_for(length, width)
    kwargs: dict[str, Any] = {
        "bigtiff": True,
        "resolution": (1.0 / meta["PhysicalSizeX"], 1.0 / meta["PhysicalSizeY"]),
        "metadata": meta,
        "photometric": "minisblack",  # else tifffile writes a 3- or 4-slice stack as one RGB(A) page
    }
    if tile is not None:
        kwargs["tile"] = tile
        stream = _tiles(stream, pages, length, width, tile)
    fd, name = tempfile.mkstemp(
        prefix=PARTIAL_PREFIX, suffix=PARTIAL_SUFFIX, dir=path.parent
    )  # O_EXCL | O_NOFOLLOW, mode 0600
    tmp = Path(name)
    try:
        with os.fdopen(fd, "wb") as handle:
            target = tifffile.FileHandle(handle, mode="wb", name=tmp.name)  # tifffile wants a name; the fd is ours
            tifffile.imwrite(target, stream, shape=shape, dtype=dtype, **kwargs)
            os.fchmod(handle.fileno(), 0o666 & ~_umask())  # an ordinary output file, not mkstemp's 0600
        digest = WrittenDigest(shape, dtype, pages, (length, width), dict(checked.crc))
        if verify:
            verify_written(tmp, digest)
        replacing = os.path.lexists(path)
        os.replace(
            tmp, path
        )  # never a half-written file under the final name; a symlink there is replaced, not followed
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        full = disk_full_error(path.name, path.parent, math.prod(shape) * dtype.itemsize, exc)
        if full is not None:
            raise full from exc
        raise
    except BaseException:  # including KeyboardInterrupt and the CLI's SIGTERM / SIGINT exceptions
        tmp.unlink(missing_ok=True)
        raise
    if replacing:
        log.info("[%s] replaced the existing output %s", path.name, path)
    return digest


def verify_written(path: Path, digest: WrittenDigest) -> None:
    """Raise :class:`WriteCheckError` unless ``path`` reads back as ``digest`` says.

    Checks the series shape and dtype, the page count and page shape, and the CRC-32 of the
    digest's pages (all pages up to :data:`VERIFY_BYTES` and :data:`VERIFY_PAGES`, else a strided
    sample: on a 2 GiB 280×1920×1000 float32 output, 8 pages of 7.3 MiB, 0.25 s).
    """
    with tifffile.TiffFile(path) as tif:
        series = tif.series[0]
        if tuple(series.shape) != digest.shape or np.dtype(series.dtype) != digest.dtype:
            raise WriteCheckError(
                f"{path.name} reads back as {tuple(series.shape)} {series.dtype}, written {digest.shape} {digest.dtype}"
            )
        if len(tif.pages) != digest.pages:
            raise WriteCheckError(f"{path.name} has {len(tif.pages)} pages, expected {digest.pages}")
        for index, crc in digest.crc32.items():
            page = tif.pages[index].asarray()
            if page.shape != digest.page_shape or zlib.crc32(np.ascontiguousarray(page, dtype=digest.dtype)) != crc:
                raise WriteCheckError(f"{path.name}: page {index} ({page.shape}) does not read back as written")


def is_tiff_file(path: Path) -> bool:
    """Whether ``path`` is a file named ``*.tif``/``*.tiff`` (any case): a TIFF input."""
    return path.is_file() and path.suffix.lower() in TIFF_SUFFIXES


def _read(path: Path, options: ReadOptions) -> Volume:
    return read_volume(path, check=options.check, channel=options.channel)


def _write(path: Path, source: Any, like: Volume, options: WriteOptions) -> None:
    write_volume(path, source, like=like)


FORMATS = (Format("tiff", TIFF_SUFFIXES, is_tiff_file, _read, _write),)
"""TIFF in the registry (:mod:`fusemycells.io.formats`): the Grand Challenge's format and the default."""
