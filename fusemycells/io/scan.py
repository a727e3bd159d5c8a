"""Which entries of an input folder are read: the files (and folder images) of the chosen formats, and
why each other entry is not (the run's log and report name every entry not read).

``inference.py`` scans for TIFF only (the Grand Challenge's format) unless told to read every registered
format (:mod:`fusemycells.io.formats`); ``fusemycells.batch`` reads every registered format.
"""

from __future__ import annotations

import logging
import stat
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from fusemycells.io import formats as registry
from fusemycells.io.volume import Format

log = logging.getLogger(__name__)

NOT_TIFF = "not a .tif/.tiff file"


@dataclass(frozen=True)
class InputScan:
    """The input folder's entries: the files to process, the skipped entries named like an input and the
    other entries, each with the reason it is not read."""

    files: list[Path]
    skipped: list[tuple[str, str]]  # (entry name, reason)
    ignored: list[tuple[str, str]] = field(default_factory=list)  # (entry name, unknown_reason)

    def not_read(self) -> list[tuple[str, str]]:
        """Every entry that is not processed, with its reason, sorted by name."""
        return sorted(self.skipped + self.ignored)


def _tiff_only() -> tuple[Format, ...]:
    return registry.chosen([registry.DEFAULT])


def unknown_reason(formats: Sequence[Format]) -> str:
    """What a folder entry of no format read is: :data:`NOT_TIFF` when only TIFF is read, else
    'not a tiff/mha/.../ome-zarr input' (the names of ``formats``)."""
    names = [f.name for f in formats]
    return NOT_TIFF if names == [registry.DEFAULT] else f"not a {'/'.join(names)} input"


def file_problem(path: Path, entry: Format) -> str | None:
    """Why an entry named like a file of ``entry``'s format is not read (None: a regular file to read)."""
    try:
        mode = path.stat().st_mode  # follows symbolic links
    except FileNotFoundError:
        return "dangling symbolic link" if path.is_symlink() else "vanished while listing"
    except OSError as exc:
        return f"cannot be inspected ({exc.strerror or exc})"
    if stat.S_ISDIR(mode):
        return "a folder, not a file"
    if not stat.S_ISREG(mode):
        kinds = {
            stat.S_ISFIFO: "FIFO",
            stat.S_ISSOCK: "socket",
            stat.S_ISCHR: "character device",
            stat.S_ISBLK: "block device",
        }
        kind = next((text for test, text in kinds.items() if test(mode)), "special file")
        return f"not a regular file ({kind})"
    if path.name.lower() in entry.suffixes:
        return "no file name before the extension"
    return None


def skip_reason(path: Path, formats: Sequence[Format] | None = None) -> str | None:
    """Why a folder entry named like an input of ``formats`` (default TIFF) is not read; None: read it."""
    entry = registry.named_like(path.name, formats or _tiff_only())
    if entry is None or (entry.folder and entry.recognise(path)):
        return None
    if entry.folder:
        why = entry.not_input(path) if entry.not_input is not None else None
        return why or f"not a {entry.name} image"
    return file_problem(path, entry)


def not_input_reason(path: Path, formats: Sequence[Format]) -> str:
    """Why any entry is not an input of ``formats``: its format's own reason (a Zarr store without OME
    metadata), why an entry named like an input is skipped, else :func:`unknown_reason`."""
    for entry in formats:
        why = entry.not_input(path) if entry.not_input is not None else None
        if why:
            return why
    if registry.named_like(path.name, formats) is not None:
        return skip_reason(path, formats) or unknown_reason(formats)
    return unknown_reason(formats)


def scan_inputs(directory: Path, formats: Sequence[Format] | None = None) -> InputScan:
    """The inputs of ``formats`` (default: TIFF, ``*.tif``/``*.tiff`` in any case) directly inside
    ``directory``, sorted by name; the entries named like one that are skipped with their reason
    (dangling symlinks, FIFOs, folders, a file named just ``.tif``) and the other entries."""
    chosen = tuple(formats or _tiff_only())
    files: list[Path] = []
    skipped: list[tuple[str, str]] = []
    ignored: list[tuple[str, str]] = []
    for path in sorted(Path(directory).iterdir()):
        if registry.recognise(path, chosen) is not None and skip_reason(path, chosen) is None:
            files.append(path)
        elif registry.named_like(path.name, chosen) is None:
            ignored.append((path.name, not_input_reason(path, chosen)))
        else:
            skipped.append((path.name, skip_reason(path, chosen) or unknown_reason(chosen)))
    return InputScan(files, skipped, ignored)


def log_not_read(name: str, reason: str, level: int = logging.WARNING, formats: Sequence[Format] | None = None) -> None:
    """The one log line of a folder entry that is not read (``inference.py`` and ``fusemycells.batch``):
    WARNING for an entry named like an input of ``formats`` (default TIFF), INFO for other names."""
    named = registry.named_like(Path(name).name, formats or _tiff_only()) is not None
    log.log(level if named else logging.INFO, "skipped %r: %s", name, reason)


def list_inputs(directory: Path, formats: Sequence[Format] | None = None) -> list[Path]:
    """The inputs of ``formats`` (default TIFF) directly inside ``directory``, sorted (:func:`scan_inputs`)."""
    return scan_inputs(directory, formats).files
