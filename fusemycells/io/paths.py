"""What is wrong with the paths a run is given, said with the fix (setup errors of ``inference.py``
and ``fusemycells.batch``), and the temporary files a killed run leaves behind.

Grand Challenge mounts the input root at ``/input`` and the stacks lie in
``/input/images/fluorescence-lightsheet-3D-microscopy/``; ``--input`` takes the root, not the
image folder. Only names and folder listings are read here, never pixels.
"""

from __future__ import annotations

import difflib
import logging
import os
import shutil
import stat
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from fusemycells.config import INPUT_SUBDIR
from fusemycells.io.scan import list_inputs
from fusemycells.io.tiff import PARTIAL_PATTERN
from fusemycells.io.volume import Format

log = logging.getLogger(__name__)

STALE_PARTIAL_S = 600.0
"""A temporary output untouched this long (s) is no other run's write in progress (:func:`remove_stale_partials`)."""


def _root_above(folder: Path, subdir: Path) -> Path | None:
    """The root R above ``folder`` with ``R / subdir`` a folder, when ``folder`` is ``R / subdir`` or a
    leading part of it (``R/images``); else None. R is given relative when ``folder`` was."""
    tail = subdir.parts
    for candidate in (Path(os.path.normpath(folder)), folder.resolve()):
        parts = candidate.parts
        for n in range(len(tail), 0, -1):
            if len(parts) >= n and parts[-n:] == tail[:n]:
                above = Path(*parts[:-n]) if len(parts) > n else Path(".")
                if (above / subdir).is_dir():
                    return above
    return None


def input_root_problem(
    root: Path, subdir: Path = INPUT_SUBDIR, formats: Sequence[Format] | None = None
) -> str | None:
    """Why ``root`` cannot serve as the input root, with the fix; None when ``root/subdir`` holds inputs
    (of ``formats``, default TIFF: :func:`fusemycells.io.scan.list_inputs`).

    Tells apart: a path that does not exist (typo), a file, the image folder itself (or its
    ``images`` parent) given instead of the root, a folder with the TIFFs directly inside, a root
    without ``subdir``, and a ``subdir`` without ``.tif``/``.tiff`` files.
    """
    root = Path(root)
    layout = f"the root that contains {subdir.as_posix()}/"
    if not root.exists():
        parent = next((p for p in root.parents if p.is_dir()), None)
        hint = ""
        if parent is not None:
            missing = root.parts[0 if parent == Path(".") else len(parent.parts)]  # the first part that is not there
            close = difflib.get_close_matches(missing, [c.name for c in parent.iterdir() if c.is_dir()], n=1)
            if close:
                hint = f" (did you mean {parent / close[0]}?)"
            elif parent not in (Path("."), Path(parent.anchor)):
                hint = f" ({parent} exists)"
        return f"--input {root} does not exist{hint}: check the spelling; --input takes {layout}"
    if not root.is_dir():
        return f"--input {root} is a file, not a folder: --input takes {layout}"
    folder = root / subdir
    kind = ".tif/.tiff" if formats is None else "/".join(s for f in formats for s in f.suffixes)
    if folder.is_dir():
        if not list_inputs(folder, formats):
            return f"no {kind} files in {folder} (the folder exists; the stacks must lie directly inside it)"
        return None
    above = _root_above(root, subdir)
    if above is not None:
        what = (
            "the image folder itself"
            if (above / subdir).resolve() == root.resolve()
            else "a folder inside the input layout"
        )
        return f"--input {root} is {what}, not the input root: pass {layout}, e.g. --input {above}"
    if list_inputs(root, formats):
        return (
            f"--input {root} holds {kind} files directly: move them to {folder}/ "
            f"(the Grand Challenge layout) and pass --input {root}"
        )
    return (
        f"input folder not found: --input {root} exists but has no {subdir.as_posix()}/ inside; --input takes {layout}"
    )


def ensure_writable(directory: Path) -> None:
    """Create the output folder ``directory`` if needed; raise PermissionError when files cannot be written there."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=directory, prefix=".write-test-"):
            pass
    except OSError as exc:
        raise PermissionError(f"output folder not writable: {directory} ({exc.strerror or exc})") from exc


def report_path_problem(path: Path | None) -> str | None:
    """Why the JSON report cannot be written at ``path`` (None when it can, or when there is none).

    Checked before any work, so a bad ``--report`` is a setup error (exit 2), not an error after
    the outputs were written; its folder is created like the output folder.
    """
    if path is None:
        return None
    if path.is_dir():
        return f"--report {path} is a folder"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path.parent, prefix=".report-test-"):
            pass
    except OSError as exc:
        return f"--report {path}: folder not writable ({exc.strerror or exc})"
    if path.exists() and not os.access(path, os.W_OK):
        return f"--report {path}: file not writable"
    return None


def _newest_mtime(info: os.stat_result, path: Path) -> float:
    """Modification time of a file, or the newest of a folder and everything under it (no symlinks followed)."""
    newest = info.st_mtime
    if stat.S_ISDIR(info.st_mode):
        for root, dirs, files in os.walk(path):
            for name in dirs + files:
                try:
                    newest = max(newest, os.lstat(os.path.join(root, name)).st_mtime)
                except OSError:
                    continue
    return newest


def remove_partials(
    folder: Path,
    *,
    before: float | None = None,
    since: float | None = None,
    min_age_s: float = 0.0,
    patterns: Sequence[str] = (PARTIAL_PATTERN,),
    now: float | None = None,
) -> list[str]:
    """Remove the temporary outputs (names matching ``patterns``) in ``folder`` last modified before
    ``before`` and/or at or after ``since`` (``time.time()`` values), and at least ``min_age_s``
    before ``now``; their names.

    Regular files and folders (an OME-Zarr store being built; its newest entry counts) are removed,
    never a symlink or its target.
    """
    now = time.time() if now is None else now
    removed = []
    for pattern in patterns:
        for path in sorted(Path(folder).glob(pattern)):
            try:
                info = path.lstat()
                if not (stat.S_ISREG(info.st_mode) or stat.S_ISDIR(info.st_mode)):
                    continue
                mtime = _newest_mtime(info, path)
                if (before is not None and mtime >= before) or (since is not None and mtime < since):
                    continue
                if now - mtime < min_age_s:
                    continue
                if stat.S_ISDIR(info.st_mode):
                    shutil.rmtree(path)
                else:
                    path.unlink()
            except OSError:
                continue
            if path.name not in removed:
                removed.append(path.name)
    return removed


def remove_stale_partials(
    folder: Path,
    before: float,
    min_age_s: float = STALE_PARTIAL_S,
    now: float | None = None,
    patterns: Sequence[str] = (PARTIAL_PATTERN,),
) -> list[str]:
    """Remove the temporary output files (:data:`~fusemycells.io.tiff.PARTIAL_PATTERN`) a killed earlier
    run left in ``folder``; their names.

    Removed: regular files and folders (never a symlink's target) last modified before ``before``
    (``time.time()`` of this process's start) and at least ``min_age_s`` before ``now``. The writer
    names its file with a random suffix (no process id to check) and writes it continuously, plane
    slab after plane slab, renaming it within a second of the last write, so a file untouched for
    10 minutes belongs to no write in progress. Should a writer have been suspended that long, its
    read-back check or rename fails and that run refuses the file with an error: no wrong output
    is ever produced.
    """
    return remove_partials(folder, before=before, min_age_s=min_age_s, patterns=patterns, now=now)


def note_stale_partials(folder: Path, started: float, patterns: Sequence[str] = (PARTIAL_PATTERN,)) -> list[str]:
    """Remove the temporary outputs a killed earlier run left in ``folder`` (see
    :func:`remove_stale_partials`; ``started``: ``time.time()`` of this run's start), with a warning
    naming them; their names (the reports' ``stale_partials_removed``)."""
    removed = remove_stale_partials(folder, before=started, patterns=patterns)
    if removed:
        log.warning(
            "removed %d temporary output file(s) left by an earlier, killed run: %s", len(removed), ", ".join(removed)
        )
    return removed
