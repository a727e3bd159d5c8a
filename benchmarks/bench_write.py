"""Time the streamed output writer and its read-back check on a synthetic float32 or uint16 stack.

    OMP_NUM_THREADS=1 python benchmarks/bench_write.py --shape 280 1920 1000 --out work_dirs/bench_write.tif
    OMP_NUM_THREADS=1 python benchmarks/bench_write.py --shape 309 1920 1920 --dtype uint16

Prints the write time without the check, the read-back check time (:func:`fusemycells.io.tiff.verify_written`),
the pages it read and the file size over the data size. The file is removed afterwards.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fusemycells.io.tiff import Volume, verify_written, write_volume  # noqa: E402


class TypedPlanes:
    """A ZYX array as a plane source of its own dtype, streamed as the pipeline's output sources are."""

    def __init__(self, data: np.ndarray) -> None:
        self.data, self.shape, self.dtype = data, data.shape, data.dtype

    def planes(self, z0: int, z1: int) -> np.ndarray:
        return self.data[z0:z1].copy()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", type=int, nargs=3, default=[64, 1024, 1024], metavar=("Z", "Y", "X"), help="stack shape (voxels, ZYX)")
    parser.add_argument("--out", type=Path, default=Path("work_dirs/bench_write.tif"))
    parser.add_argument("--dtype", choices=["float32", "uint16"], default="float32", help="output voxel type")
    args = parser.parse_args(argv)
    shape = tuple(args.shape)
    data = np.empty(shape, np.dtype(args.dtype))
    for z in range(shape[0]):  # distinct planes, cheap to make
        data[z] = z * 97
    like = Volume(data, (1.0, 0.39, 0.39), "nucleus")
    start = time.perf_counter()
    digest = write_volume(args.out, TypedPlanes(data), like=like, verify=False)
    written = time.perf_counter() - start
    start = time.perf_counter()
    verify_written(args.out, digest)
    checked = time.perf_counter() - start
    size = args.out.stat().st_size
    args.out.unlink()
    print(f"{shape} {args.dtype} {data.nbytes / 2**30:.2f} GiB: write {written:.2f} s, read-back check {checked:.3f} s "
          f"({len(digest.crc32)} of {digest.pages} pages), file {size / 1e9:.2f} GB, file/data size {size / data.nbytes:.3f}")


if __name__ == "__main__":
    main()
