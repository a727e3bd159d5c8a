"""Write a large challenge-style input stack for memory and time measurements, plane by plane.

    python benchmarks/make_large_case.py --out work_dirs/large/input [--shape 309 1920 1920] [--spacing 1.01 0.388 0.388]

The content is cheap synthetic texture (smoothed noise blobs under a depth-dependent attenuation,
uint16), not a simulation: it exists to exercise the full pipeline at the largest real study's
size (309×1920×1920 @ 1.01/0.388 µm, 2.3 GB) without holding the volume in memory while writing.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import tifffile
from scipy import ndimage

INPUT_SUBDIR = Path("images/fluorescence-lightsheet-3D-microscopy")


def planes(shape: tuple[int, int, int], seed: int):
    rng = np.random.default_rng(seed)
    base = ndimage.gaussian_filter(rng.random((64, 64), dtype=np.float32), 2.0)
    zoom = (shape[1] / 64, shape[2] / 64)
    field = ndimage.zoom(base, zoom, order=1)[: shape[1], : shape[2]]
    field = (field - field.min()) / (np.ptp(field) + 1e-6)
    for z in range(shape[0]):
        attenuation = np.exp(-2.0 * z / shape[0])
        noise = rng.normal(0, 20, (shape[1], shape[2])).astype(np.float32)
        stripes = 0.5 + 0.5 * np.sin(z / 7.0 + field * 20.0)
        yield np.clip(100 + 3000 * attenuation * field * stripes + noise, 0, 65535).astype(np.uint16)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="input root (the file goes to OUT/images/fluorescence-lightsheet-3D-microscopy/)")
    parser.add_argument("--shape", type=int, nargs=3, default=[309, 1920, 1920], metavar=("Z", "Y", "X"))
    parser.add_argument("--spacing", type=float, nargs=3, default=[1.01, 0.388, 0.388], metavar=("Z", "Y", "X"), help="µm")
    parser.add_argument("--channel", default="nucleus", choices=["nucleus", "membrane"])
    args = parser.parse_args(argv)
    folder = args.out / INPUT_SUBDIR
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"large_{args.channel}.tif"
    z, y, x = args.spacing
    meta = {"axes": "ZYX", "unit": "um", "PhysicalSizeZ": z, "PhysicalSizeY": y, "PhysicalSizeX": x, "channel": args.channel, "study": "large"}
    tifffile.imwrite(path, planes(tuple(args.shape), 0), shape=tuple(args.shape), dtype=np.uint16, bigtiff=True,
                     resolution=(1 / x, 1 / y), metadata=meta)
    print(f"wrote {path} ({path.stat().st_size / 2**30:.2f} GiB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
