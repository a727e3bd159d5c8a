"""Quality-control pictures: max-intensity projections written as 8-bit greyscale PNG.

No imaging library needed: the PNG is written with ``zlib`` and ``struct``.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np

GAP = 4  # pixels between panels


def to_uint8(image: np.ndarray, low: float = 2.0, high: float = 99.8) -> np.ndarray:
    """Percentile-stretch a 2D image to 0..255 (clipped, for display only)."""
    data = np.asarray(image, dtype=np.float32)
    lo, hi = np.percentile(data, [low, high]) if data.size else (0.0, 1.0)
    if hi <= lo and data.size:  # sparse image: stretch to the maximum instead
        hi = float(data.max())
    scale = 255.0 / (hi - lo) if hi > lo else 0.0
    return np.clip((data - lo) * scale, 0, 255).astype(np.uint8)


def projections(volume: np.ndarray, spacing: Sequence[float] = (1.0, 1.0, 1.0), max_size: int = 384) -> tuple[np.ndarray, np.ndarray]:
    """(XY, XZ) max-intensity projections of a ZYX volume, 8-bit.

    The XZ view repeats Z rows by round(spacing_z / spacing_x) (µm-correct aspect, at most 16×);
    both are shrunk by an integer stride so that no side exceeds ``max_size`` pixels.
    """
    xy = volume.max(axis=0)
    xz = volume.max(axis=1)
    stretch = int(min(16, max(1, round(spacing[0] / spacing[2])))) if spacing[2] > 0 else 1
    xz = np.repeat(xz, stretch, axis=0)
    stride = max(1, -(-max(xy.shape + xz.shape) // max_size))
    return to_uint8(xy[::stride, ::stride]), to_uint8(xz[::stride, ::stride])


def mosaic(rows: Sequence[Sequence[np.ndarray]]) -> np.ndarray:
    """Tile 2D uint8 panels into one image: rows top to bottom, panels left to right, black gaps."""
    heights = [max(p.shape[0] for p in row) for row in rows]
    widths = [sum(p.shape[1] for p in row) + GAP * (len(row) - 1) for row in rows]
    canvas = np.zeros((sum(heights) + GAP * (len(rows) - 1), max(widths)), dtype=np.uint8)
    y = 0
    for row, h in zip(rows, heights):
        x = 0
        for panel in row:
            canvas[y : y + panel.shape[0], x : x + panel.shape[1]] = panel
            x += panel.shape[1] + GAP
        y += h + GAP
    return canvas


def write_png(path: Path, image: np.ndarray) -> None:
    """Write a 2D uint8 array as a greyscale PNG."""
    if image.ndim != 2 or image.dtype != np.uint8:
        raise ValueError(f"expected a 2D uint8 image, got {image.dtype} {image.shape}")
    height, width = image.shape

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    raw = b"".join(b"\x00" + image[r].tobytes() for r in range(height))  # filter type 0 per row
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw, 6)) + chunk(b"IEND", b""))


def read_png(path: Path) -> np.ndarray:
    """Read back a PNG written by :func:`write_png` (8-bit greyscale, filter 0) — for tests."""
    blob = path.read_bytes()
    if blob[:8] != b"\x89PNG\r\n\x1a\n":
        raise ValueError(f"{path} is not a PNG")
    pos, data, width, height = 8, b"", 0, 0
    while pos < len(blob):
        (length,) = struct.unpack(">I", blob[pos : pos + 4])
        kind, body = blob[pos + 4 : pos + 8], blob[pos + 8 : pos + 8 + length]
        if kind == b"IHDR":
            width, height = struct.unpack(">II", body[:8])
        elif kind == b"IDAT":
            data += body
        pos += 12 + length
    rows = np.frombuffer(zlib.decompress(data), dtype=np.uint8).reshape(height, width + 1)
    return rows[:, 1:].copy()
