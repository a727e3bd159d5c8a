"""The plugin's reader: a light-sheet stack of any format of the reader/writer registry
(:mod:`fusemycells.io.formats`: TIFF, .mha/.mhd/.nrrd/.nii/.nii.gz through SimpleITK, OME-Zarr when zarr is
installed) as an image layer whose ``scale`` is its spacing (z, y, x) µm and whose metadata name its channel,
read as the command line reads it (the format's own reader), so the widget finds spacing and channel filled in."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from fusemycells.io import formats
from fusemycells.io.volume import Format, InputError, ReadOptions

LayerData = tuple[Any, dict[str, Any], str]


def format_of(path: str | Path) -> Format | None:
    """The registered format ``path`` is read with: recognised from the path (an OME-Zarr folder, a TIFF),
    else named by its suffix; None when no format claims it or the format's packages are not installed
    (another napari reader may open it then)."""
    path = Path(path)
    entry = (formats.recognise(path) if path.exists() else None) or formats.named_like(path.name)
    if entry is None:
        return None
    try:
        if entry.require is not None:
            entry.require()
    except ImportError:
        return None
    return entry


def get_reader(path: str | list[str]) -> Callable[[str | list[str]], list[LayerData]] | None:
    """npe2 reader hook: :func:`read_stacks` when every path is of a registered format (:func:`format_of`),
    None for anything else."""
    paths = [path] if isinstance(path, str) else list(path)
    if not paths or any(format_of(p) is None for p in paths):
        return None
    return read_stacks


def read_stacks(path: str | list[str]) -> list[LayerData]:
    """One image layer per file: ZYX pixels, ``scale`` = spacing (µm), ``metadata['channel']`` (and the spacing,
    the reader's warnings and the format's name); a file that is not a 3D stack raises
    :class:`fusemycells.io.volume.InputError` with the reason (napari shows it)."""
    paths = [path] if isinstance(path, str) else list(path)
    layers = []
    for name in paths:
        entry = format_of(name)
        if entry is None:
            raise InputError(f"{Path(name).name}: not a format the fusion reads ({', '.join(formats.names())})")
        volume = entry.read(Path(name), ReadOptions())
        if volume.data.ndim != 3:
            raise InputError(f"{Path(name).name}: not a 3D stack (shape {volume.data.shape})")
        meta = {
            "channel": volume.channel,
            "spacing_um": list(volume.spacing),
            "warnings": list(volume.warnings),
            "format": entry.name,
        }
        kwargs = {"name": formats.stem(Path(name).name), "scale": volume.spacing, "metadata": meta}
        layers.append((volume.data, kwargs, "image"))
    return layers
