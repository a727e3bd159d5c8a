"""FuseMyCells fusion container: two-stage residual U-Net inference for light-sheet stacks.

The Python API, in three lines (see README.md)::

    from fusemycells import Fuser
    f = Fuser.from_resources()
    out = f.fuse(array, spacing_zyx, "nucleus")

``Fuser`` is :class:`fusemycells.pipeline.Fuser`, imported on first use (PEP 562): ``import fusemycells`` stays
light (no torch), so the command line reports setup errors before the networks' libraries load.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

__version__ = "0.1.0"
"""The project's version, in one place: pyproject.toml reads it from here (``[tool.setuptools.dynamic]``),
and the JSON reports carry it as ``fusemycells_version``."""

__all__ = ["Fuser", "__version__", "program_name"]


def program_name(module: str, argv0: str | None = None) -> str:
    """The program's name for a ``--help`` usage line, as it was started: ``python -m <module>`` when run with
    ``-m`` (``argv0``, default ``sys.argv[0]``, is then the module's own file) or from ``-c``, else the name it was
    called by (the console script ``fusemycells-evaluate``, a path's last part)."""
    first = sys.argv[0] if argv0 is None and sys.argv else (argv0 or "")
    name = Path(first).name
    if not name or name in ("-c", "-m") or name == f"{module.rsplit('.', 1)[-1]}.py" or name == "__main__.py":
        return f"python -m {module}"
    return name


def __getattr__(name: str) -> Any:
    """``fusemycells.Fuser``, imported (with torch) only when asked for."""
    if name == "Fuser":
        from fusemycells.pipeline import Fuser

        return Fuser
    raise AttributeError(f"module 'fusemycells' has no attribute {name!r}")
