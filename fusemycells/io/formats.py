"""The reader/writer registry: every module of :mod:`fusemycells.io` with a ``FORMATS`` tuple of
:class:`~fusemycells.io.volume.Format` entries (TIFF, OME-Zarr, the SimpleITK formats) takes part.

Adding a format is one module: ``FORMATS = (Format(name, suffixes, recognise, read, write), ...)``;
:func:`fusemycells.files.process_file` (``inference.py``, ``fusemycells.batch``) then reads and writes it.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Sequence
from functools import cache
from pathlib import Path

import fusemycells.io as io_package
from fusemycells.io.volume import Format

DEFAULT = "tiff"
"""The Grand Challenge's format: what ``inference.py`` reads from its input folder unless told otherwise."""


@cache
def registry() -> dict[str, Format]:
    """Every registered format by name (the modules of :mod:`fusemycells.io` in name order, then each
    module's ``FORMATS`` in order)."""
    found: dict[str, Format] = {}
    for info in sorted(pkgutil.iter_modules(io_package.__path__), key=lambda m: m.name):
        module = importlib.import_module(f"{io_package.__name__}.{info.name}")
        for entry in getattr(module, "FORMATS", ()):
            if entry.name in found:
                raise RuntimeError(f"format {entry.name!r} registered twice (fusemycells.io.{info.name})")
            found[entry.name] = entry
    return found


def names() -> list[str]:
    """The registered format names ('tiff' first)."""
    return sorted(registry(), key=lambda name: (name != DEFAULT, name))


def get(name: str) -> Format:
    """The format called ``name``; ``ValueError`` naming the known ones otherwise."""
    try:
        return registry()[name]
    except KeyError:
        raise ValueError(f"unknown format {name!r} (known: {', '.join(names())})") from None


def chosen(wanted: Sequence[str] | None = None) -> tuple[Format, ...]:
    """The formats called ``wanted`` (None: every registered one)."""
    return tuple(get(name) for name in (names() if wanted is None else wanted))


def named_like(name: str, formats: Sequence[Format] | None = None) -> Format | None:
    """The format whose suffix ``name`` ends with (any case; the longest suffix wins), or None."""
    lowered = name.lower()
    matches = [(len(s), f) for f in (formats or chosen()) for s in f.suffixes if lowered.endswith(s)]
    return max(matches, key=lambda m: m[0])[1] if matches else None


def recognise(path: Path, formats: Sequence[Format] | None = None) -> Format | None:
    """The format ``path`` is an input of (its name and, for folders, its content), or None."""
    for entry in formats or chosen():
        if entry.recognise(path):
            return entry
    return None


def stem(name: str) -> str:
    """``name`` without the suffix of a registered format (and an ``.ome`` before it): 'a.ome.tif' → 'a'."""
    entry = named_like(name)
    if entry is None:
        return name
    lowered = name.lower()
    cut = name[: -max(len(s) for s in entry.suffixes if lowered.endswith(s))]
    return cut[:-4] if cut.lower().endswith(".ome") and len(cut) > 4 else cut


def output_name(source: str, output: Format) -> str:
    """An output's file name: the input's own when it is of the output's format, else its stem with the
    output format's first suffix ('a.ome.zarr' as TIFF: 'a.tif')."""
    if named_like(source) is output and any(source.lower().endswith(s) for s in output.suffixes):
        return source
    return stem(source) + output.suffixes[0]
