#!/usr/bin/env python3
"""FuseMyCells Grand Challenge entry point (the image runs this file): fuse every input light-sheet stack.

The command line lives in :mod:`fusemycells.cli` (``python inference.py --help``); with no arguments it follows
the Grand Challenge contract (/input/images/fluorescence-lightsheet-3D-microscopy → /output/images/
fused-fluorescence-lightsheet-3D-microscopy, exit 0 when every file was written).
"""

import sys

from fusemycells.cli import run

if __name__ == "__main__":
    sys.exit(run())
