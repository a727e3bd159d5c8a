"""FuseMyCells fusion container: two-stage residual U-Net inference for light-sheet stacks."""

__version__ = "0.1.0"
