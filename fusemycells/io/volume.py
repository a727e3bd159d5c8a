"""What every format's reader returns and its writer copies from: :class:`Volume`, and the errors of one file.

Volumes are ZYX in the file's own pixel type; spacings are (z, y, x) in µm.
"""

from __future__ import annotations

import errno
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

ReadCheck = Callable[[tuple[int, int, int], np.dtype, tuple[float, float, float]], None]
"""``check(shape_zyx, dtype, spacing_zyx_um)``: runs after a file's header is read and before its pixels
are loaded (the memory budget); it raises to refuse the file."""


class InputError(ValueError):
    """A single input file cannot be processed (the reason is in the message)."""


class MissingDependency(ImportError):
    """An optional package a format or command needs is not installed (the message names the install)."""


class DiskFullError(InputError):
    """An output did not fit on its file system (the message says how much was needed and free)."""


def disk_full_error(name: str, folder: Path, needed_bytes: int, exc: OSError) -> DiskFullError | None:
    """A :class:`DiskFullError` for ``exc`` when it is a full disk (ENOSPC, or a short write with less
    free space in ``folder`` than ``needed_bytes``); None for any other error. Call it after the
    partial output was removed, so that "free" is what the file system has without it."""
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        return None
    if exc.errno != errno.ENOSPC and free >= needed_bytes:
        return None
    return DiskFullError(
        f"{name}: no space left on device (needed ≈ {needed_bytes / 1e6:.1f} MB, free {free / 1e6:.1f} MB in {folder})"
    )


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


@dataclass(frozen=True)
class ReadOptions:
    """How a file is read (each reader uses the options of its format and ignores the others)."""

    check: ReadCheck | None = None  # the memory budget's check, before the pixels are read
    channel: str | None = None  # forces the channel ('nucleus' / 'membrane'); None: from the metadata
    level: int = 0  # OME-Zarr: the resolution level read
    channel_index: int | None = None  # OME-Zarr: the channel of a non-singleton c axis


@dataclass(frozen=True)
class WriteOptions:
    """How an output is written, besides what it copies from the input's :class:`Volume` (``like``)."""

    levels: int | None = None  # OME-Zarr: pyramid levels (None: automatic)
    source: str | None = None  # the input's name, stored with outputs whose format has room for it
    fingerprint: dict[str, Any] = field(default_factory=dict)  # batch: the settings the output was made with


Reader = Callable[[Path, ReadOptions], Volume]
"""``read(path, options)``: the file as a :class:`Volume`; raises :class:`InputError` (or a ``ValueError``,
an ``ImportError`` naming a missing package) when it cannot be read as one ZYX stack."""
Writer = Callable[[Path, Any, Volume, WriteOptions], None]
"""``write(path, source, like, options)``: the ZYX ``source`` (array or plane source: ``.shape``, ``.dtype``,
``.planes(z0, z1)``) written atomically at ``path`` with the spacing, channel and metadata of ``like``."""


@dataclass(frozen=True)
class Format:
    """One file format of the reader/writer registry (:mod:`fusemycells.io.formats`).

    ``suffixes``: lower-case name endings (the first one names outputs); ``recognise(path)``: whether an
    existing path is an input of this format; ``folder``: stored as a folder (OME-Zarr), else one file;
    ``not_input(path)``: why a path named like this format is none (None: no reason known); ``require()``:
    raises ``ImportError`` naming the install when the format's packages are missing.
    """

    name: str
    suffixes: tuple[str, ...]
    recognise: Callable[[Path], bool]
    read: Reader
    write: Writer
    folder: bool = False
    not_input: Callable[[Path], str | None] | None = None
    require: Callable[[], Any] | None = None
