"""FuseMyCells fusion container: two-stage residual U-Net inference for light-sheet stacks."""

__version__ = "0.1.0"
"""The project's version, in one place: pyproject.toml reads it from here (``[tool.setuptools.dynamic]``),
and the JSON reports carry it as ``fusemycells_version``."""
