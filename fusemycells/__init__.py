"""FuseMyCells fusion container: two-stage residual U-Net inference for light-sheet stacks.

The Python API, in three lines (see README.md)::

    from fusemycells import Fuser
    f = Fuser.from_resources()
    out = f.fuse(array, spacing_zyx, "nucleus")

``Fuser`` is :class:`fusemycells.pipeline.Fuser`, imported on first use (PEP 562): ``import fusemycells`` stays
light (no torch), so the command line reports setup errors before the networks' libraries load.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
"""The project's version, in one place: pyproject.toml reads it from here (``[tool.setuptools.dynamic]``),
and the JSON reports carry it as ``fusemycells_version``."""

__all__ = ["Fuser", "__version__"]


def __getattr__(name: str) -> Any:
    """``fusemycells.Fuser``, imported (with torch) only when asked for."""
    if name == "Fuser":
        from fusemycells.pipeline import Fuser

        return Fuser
    raise AttributeError(f"module 'fusemycells' has no attribute {name!r}")
