"""The formats SimpleITK reads and writes, in the reader/writer registry: MetaImage (``.mha``, ``.mhd`` with
its ``.raw``), NRRD (``.nrrd``) and NIfTI (``.nii``, ``.nii.gz``); ``.mha`` is Grand Challenge's own format.

Axis order: SimpleITK's sizes, spacings and origins are (x, y, z) while ``GetArrayFromImage`` gives the
pixels as a (z, y, x) array; here every array is ZYX and every spacing (z, y, x) µm, reversed at the one
place each crosses (:func:`zyx`). Units: MetaImage and NRRD headers carry no unit that ITK reads, so their
spacing numbers are µm (as microscopy tools write them, and as this module writes them, with a ``unit``
key saying so); NIfTI declares its unit in the header and ITK converts it to mm, so NIfTI spacings are
converted mm → µm on reading and written in mm. Only scalar 2D or 3D images are read: 4D images (time
series) and vector images (RGB, several channels per pixel) are refused with a message that says so.

SimpleITK is optional (``pip install -r requirements-scale.txt``): this module imports without it and
says what to install when such a file is read or written. Outputs are written whole (the fused stack is
held in memory once, as SimpleITK needs), atomically: into a temporary folder in the output folder,
then renamed (a ``.mhd`` header after its ``.raw``).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fusemycells.io.tiff import (
    PARTIAL_PREFIX,
    PARTIAL_SUFFIX,
    WriteCheckError,
    channel_from_metadata,
    spacing_from_metadata,
)
from fusemycells.io.volume import (
    Format,
    InputError,
    MissingDependency,
    ReadOptions,
    Volume,
    WriteOptions,
    disk_full_error,
)

INSTALL_HINT = "pip install -r requirements-scale.txt"
SUFFIXES = {"mha": ".mha", "mhd": ".mhd", "nrrd": ".nrrd", "nii": ".nii", "nii.gz": ".nii.gz"}
"""Format name → file suffix (lower case)."""
NIFTI = (".nii", ".nii.gz")
UM_PER_MM = 1e3
_PIXEL_TYPES = {
    "sitkUInt8": "uint8",
    "sitkInt8": "int8",
    "sitkUInt16": "uint16",
    "sitkInt16": "int16",
    "sitkUInt32": "uint32",
    "sitkInt32": "int32",
    "sitkUInt64": "uint64",
    "sitkInt64": "int64",
    "sitkFloat32": "float32",
    "sitkFloat64": "float64",
}
"""SimpleITK's scalar pixel types and their numpy dtypes."""


def require_sitk() -> Any:
    """The ``SimpleITK`` module, or :class:`MissingDependency` naming the install command."""
    try:
        import SimpleITK
    except ImportError as exc:
        raise MissingDependency(f"reading and writing .mha/.mhd/.nrrd/.nii needs SimpleITK: {INSTALL_HINT}") from exc
    return SimpleITK


def zyx(xyz: Sequence[float]) -> tuple[float, ...]:
    """SimpleITK's (x, y, z) order of sizes, spacings and origins as (z, y, x), and back (its own inverse)."""
    return tuple(float(v) for v in reversed(tuple(xyz)))


def is_nifti(path: Path) -> bool:
    return path.name.lower().endswith(NIFTI)


def pixel_dtype(sitk: Any, pixel_id: int) -> np.dtype:
    """The numpy dtype of a scalar SimpleITK pixel type; :class:`InputError` for other types (complex, labels)."""
    for constant, name in _PIXEL_TYPES.items():
        if pixel_id == getattr(sitk, constant):
            return np.dtype(name)
    raise InputError(f"unsupported pixel type {sitk.GetPixelIDValueAsString(pixel_id)}")


def shape_problem(dimension: int, components: int, size_xyz: Sequence[int]) -> str | None:
    """Why an image of ``dimension`` axes and ``components`` values per pixel is not one ZYX stack, or None."""
    if components > 1:
        return (
            f"vector image with {components} components per pixel (RGB or several channels): "
            "one scalar channel per file is needed"
        )
    if dimension > 3:
        size = tuple(int(n) for n in size_xyz)
        return f"{dimension}D image (size {size} x, y, z, ...: a time series or channels): one 3D stack is needed"
    if dimension < 2:
        return f"{dimension}D image: a 2D or 3D image is needed"
    return None


def header_metadata(reader: Any) -> dict[str, Any]:
    """The header's key/value pairs (without ITK's own bookkeeping keys); NIfTI's 80-character ``descrip``
    field is read as ``key=value`` pairs separated by ``;`` as well (where this module writes the channel)."""
    meta = {k: reader.GetMetaData(k) for k in reader.GetMetaDataKeys() if not k.startswith("ITK_")}
    for pair in str(meta.get("descrip", "")).split(";"):
        key, sep, value = pair.partition("=")
        if sep and key.strip() and key.strip() not in meta:
            meta[key.strip()] = value.strip()
    return meta


def spacing_um(
    path: Path, spacing_xyz: Sequence[float], meta: dict[str, Any]
) -> tuple[tuple[float, float, float], list[str]]:
    """(z, y, x) µm from a header's (x, y, z) spacing: NIfTI's in mm (to 7 significant digits, its float32
    precision), the others in the header's ``unit`` (µm when it names none); implausible values fall back with
    a warning as for TIFF (:func:`fusemycells.io.tiff.spacing_from_metadata`)."""
    z, y, x = zyx(spacing_xyz)
    unit = "mm" if is_nifti(path) else meta.get("unit", "um")
    if is_nifti(path):
        z, y, x = (float(f"{v:.7g}") for v in (z, y, x))
    sizes = {"PhysicalSizeZ": z, "PhysicalSizeY": y, "PhysicalSizeX": x, "unit": unit}
    spacing, warnings = spacing_from_metadata(sizes)
    if is_nifti(path):
        spacing = tuple(float(f"{v:.7g}") for v in spacing)  # type: ignore[assignment]
    return spacing, warnings


def read_image(path: Path, options: ReadOptions) -> Volume:
    """A scalar 2D or 3D image as a ZYX :class:`Volume`: spacing (z, y, x) µm from the header, channel from
    its ``channel`` key or the file name; the memory check runs after the header and before the pixels."""
    sitk = require_sitk()
    path = Path(path)
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError as exc:
        raise InputError(f"{path.name}: not a readable image ({str(exc).strip().splitlines()[-1]})") from exc
    size = reader.GetSize()
    problem = shape_problem(reader.GetDimension(), reader.GetNumberOfComponents(), size)
    if problem is not None:
        raise InputError(f"{path.name}: {problem}")
    try:
        dtype = pixel_dtype(sitk, reader.GetPixelID())
    except InputError as exc:
        raise InputError(f"{path.name}: {exc}") from exc
    meta = header_metadata(reader)
    spacing, warnings = spacing_um(path, reader.GetSpacing(), meta)
    shape = (1, *zyx(size)) if len(size) == 2 else zyx(size)
    shape = tuple(int(n) for n in shape)
    if options.check is not None:
        options.check(shape, dtype, spacing)  # type: ignore[arg-type]
    data = sitk.GetArrayFromImage(reader.Execute()).reshape(shape)
    warnings += _geometry(reader, meta, path)
    if len(size) == 2:
        warnings.append(f"2D image {tuple(zyx(size))} read as one slice")
    channel, channel_warnings = (options.channel, []) if options.channel else channel_from_metadata(meta, path)
    return Volume(data, spacing, channel, metadata=meta, warnings=warnings + channel_warnings)  # type: ignore[arg-type]


def _geometry(reader: Any, meta: dict[str, Any], path: Path) -> list[str]:
    """Keep the image's origin (µm, z y x) and direction in ``meta`` for the output; a warning when the
    direction is not the identity (the stack is fused in its stored index order)."""
    dimension = reader.GetDimension()
    factor = UM_PER_MM if is_nifti(path) else 1.0
    meta["origin_um_zyx"] = [v * factor for v in zyx(reader.GetOrigin())]
    direction = [float(v) for v in reader.GetDirection()]
    meta["direction"] = direction
    if np.allclose(np.asarray(direction).reshape(dimension, dimension), np.eye(dimension)):
        return []
    return ["direction cosines are not the identity: the stack is fused in its stored (index) order"]


def write_image(path: Path, source: Any, like: Volume, options: WriteOptions) -> None:
    """Write a ZYX array or plane source with the spacing (µm), channel, origin and direction of ``like``;
    the format follows the name. Atomic (:func:`_replace_from`); :class:`DiskFullError` when the disk is full."""
    sitk = require_sitk()
    path = Path(path)
    data = source if isinstance(source, np.ndarray) else _materialise(source)
    image = sitk.GetImageFromArray(np.ascontiguousarray(data))
    nifti = is_nifti(path)
    factor = 1.0 / UM_PER_MM if nifti else 1.0
    image.SetSpacing([v * factor for v in zyx(like.spacing)])
    _copy_geometry(image, like, factor)
    if nifti:
        image.SetMetaData("ITK_FileNotes", f"channel={like.channel}")  # NIfTI's descrip: no other keys are kept
    else:
        image.SetMetaData("unit", "um")
        image.SetMetaData("channel", like.channel)
        if options.source:
            image.SetMetaData("source", options.source)
    path.parent.mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(prefix=PARTIAL_PREFIX, suffix=PARTIAL_SUFFIX, dir=path.parent))
    try:
        sitk.WriteImage(image, str(folder / path.name))
        verify_header(sitk, folder / path.name, image)
        _replace_from(folder, path)
    except (OSError, RuntimeError) as exc:
        full = disk_full_error(path.name, path.parent, data.nbytes, _as_os_error(exc))
        if full is not None:
            raise full from exc
        raise
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def verify_header(sitk: Any, path: Path, image: Any) -> None:
    """Raise :class:`WriteCheckError` unless the file at ``path`` reads back with ``image``'s size, pixel type and
    spacing (its header; the pixels are SimpleITK's to write)."""
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    reader.ReadImageInformation()
    written = (reader.GetSize(), reader.GetPixelID())
    if written != (image.GetSize(), image.GetPixelID()) or not np.allclose(reader.GetSpacing(), image.GetSpacing()):
        kind = sitk.GetPixelIDValueAsString(reader.GetPixelID())
        raise WriteCheckError(f"{path.name} reads back as size {reader.GetSize()} {kind}, written {image.GetSize()}")


def _materialise(source: Any) -> np.ndarray:
    from fusemycells.sources import materialise

    return materialise(source)


def _copy_geometry(image: Any, like: Volume, factor: float) -> None:
    """The input's origin (µm → the output's unit) and direction, when the input had them (same dimension)."""
    origin = like.metadata.get("origin_um_zyx")
    if isinstance(origin, list) and len(origin) == 3:
        image.SetOrigin([v * factor for v in zyx(origin)])
    direction = like.metadata.get("direction")
    if isinstance(direction, list) and len(direction) == 9:
        image.SetDirection(direction)


def _replace_from(folder: Path, path: Path) -> None:
    """Move what SimpleITK wrote in ``folder`` into place: a MetaImage's data file first, its header last."""
    for written in sorted(folder.iterdir(), key=lambda p: p.name == path.name):
        os.replace(written, path.parent / written.name)


def _as_os_error(exc: BaseException) -> OSError:
    """SimpleITK reports a failed write as a RuntimeError; the disk check wants an ``OSError``."""
    if isinstance(exc, OSError):
        return exc
    return OSError(0, str(exc))


def _recognise(suffix: str) -> Any:
    def recognise(path: Path) -> bool:
        return path.is_file() and path.name.lower().endswith(suffix)

    return recognise


FORMATS = tuple(
    Format(name, (suffix,), _recognise(suffix), read_image, write_image, require=require_sitk)
    for name, suffix in SUFFIXES.items()
)
"""The SimpleITK formats in the registry (:mod:`fusemycells.io.formats`), one entry per suffix."""
