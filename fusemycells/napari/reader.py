"""The plugin's reader: a light-sheet TIFF stack as an image layer whose ``scale`` is its spacing (z, y, x) µm
and whose metadata name its channel, read as the command line reads it (:func:`fusemycells.io.tiff.read_volume`),
so the widget finds spacing and channel filled in."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from fusemycells.io.tiff import InputError, read_volume

LayerData = tuple[Any, dict[str, Any], str]


def get_reader(path: str | list[str]) -> Callable[[str | list[str]], list[LayerData]] | None:
    """npe2 reader hook: :func:`read_stacks` for one or more ``.tif``/``.tiff`` paths, None for anything else."""
    paths = [path] if isinstance(path, str) else list(path)
    if not paths or any(Path(p).suffix.lower() not in (".tif", ".tiff") for p in paths):
        return None
    return read_stacks


def read_stacks(path: str | list[str]) -> list[LayerData]:
    """One image layer per file: ZYX pixels, ``scale`` = spacing (µm), ``metadata['channel']``; a file that is not
    a 3D stack raises :class:`fusemycells.io.tiff.InputError` with the reason (napari shows it)."""
    paths = [path] if isinstance(path, str) else list(path)
    layers = []
    for name in paths:
        volume = read_volume(Path(name))
        if volume.data.ndim != 3:
            raise InputError(f"{Path(name).name}: not a 3D stack (shape {volume.data.shape})")
        meta = {"channel": volume.channel, "spacing_um": list(volume.spacing), "warnings": list(volume.warnings)}
        layers.append((volume.data, {"name": Path(name).stem, "scale": volume.spacing, "metadata": meta}, "image"))
    return layers
