"""What is wrong with an ``--input`` root, said with the fix (setup errors of ``inference.py``).

Grand Challenge mounts the input root at ``/input`` and the stacks lie in
``/input/images/fluorescence-lightsheet-3D-microscopy/``; ``--input`` takes the root, not the
image folder. Only names and folder listings are read here, never pixels.
"""

from __future__ import annotations

import difflib
import os
import tempfile
from pathlib import Path

from .config import INPUT_SUBDIR
from .io import list_inputs


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


def input_root_problem(root: Path, subdir: Path = INPUT_SUBDIR) -> str | None:
    """Why ``root`` cannot serve as the input root, with the fix; None when ``root/subdir`` holds TIFFs.

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
    if folder.is_dir():
        if not list_inputs(folder):
            return f"no .tif/.tiff files in {folder} (the folder exists; the stacks must lie directly inside it)"
        return None
    above = _root_above(root, subdir)
    if above is not None:
        what = (
            "the image folder itself"
            if (above / subdir).resolve() == root.resolve()
            else "a folder inside the input layout"
        )
        return f"--input {root} is {what}, not the input root: pass {layout}, e.g. --input {above}"
    if list_inputs(root):
        return (
            f"--input {root} holds .tif/.tiff files directly: move them to {folder}/ "
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
