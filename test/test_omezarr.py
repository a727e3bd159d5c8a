"""OME-Zarr input and output (fusemycells.io.omezarr): spacing, units, levels, streaming, atomic writes."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
from conftest import blob_volume

from fusemycells.io import omezarr
from fusemycells.io.omezarr import OmeZarrError, downsample_yx, level_info, level_shapes, multiscale_datasets
from fusemycells.sources import ArraySource

needs_zarr = pytest.mark.skipif(
    importlib.util.find_spec("zarr") is None or importlib.util.find_spec("ome_zarr") is None,
    reason="optional OME-Zarr packages missing: pip install -r requirements-scale.txt",
)


class CountingSource:
    """A ZYX float32 plane source that records every ``planes`` request (to check streaming)."""

    def __init__(self, data: np.ndarray) -> None:
        self.data, self.shape, self.dtype = data, data.shape, np.dtype(np.float32)
        self.calls: list[tuple[int, int]] = []

    def planes(self, z0: int, z1: int) -> np.ndarray:
        self.calls.append((z0, z1))
        return self.data[z0:z1].astype(np.float32)


class FailingSource(CountingSource):
    def planes(self, z0: int, z1: int) -> np.ndarray:
        if z0 > 0:
            raise RuntimeError("disk full")
        return super().planes(z0, z1)


def _ngff(
    scale: list[float], units: dict[str, str] | None = None, names: str = "zyx", overall: list[float] | None = None
) -> dict:
    axes = [{"name": n, "type": "space", **({"unit": units[n]} if units and n in units else {})} for n in names]
    ms = {"axes": axes, "datasets": [{"path": "0", "coordinateTransformations": [{"type": "scale", "scale": scale}]}]}
    if overall is not None:
        ms["coordinateTransformations"] = [{"type": "scale", "scale": overall}]
    return ms


def test_spacing_is_the_level_scale_times_the_image_scale_in_micrometres() -> None:
    ms = _ngff([2.0, 390.0, 390.0], {"z": "nanometer", "y": "nanometer", "x": "nanometer"}, overall=[500.0, 1.0, 1.0])
    info = level_info(ms, 0, (10, 20, 30), np.uint16, Path("a.ome.zarr"))
    assert info.spacing == pytest.approx((1.0, 0.39, 0.39))
    assert info.shape == (10, 20, 30) and info.warnings == []


def test_missing_or_unknown_units_are_read_as_micrometres_with_a_warning() -> None:
    info = level_info(_ngff([1.0, 0.4, 0.4], {"z": "parsec"}), 0, (4, 8, 8), np.uint16, Path("a.zarr"))
    assert info.spacing == pytest.approx((1.0, 0.4, 0.4))
    assert any("parsec" in w for w in info.warnings) and any("unit missing" in w for w in info.warnings)


def test_singleton_time_and_channel_axes_are_dropped_but_real_ones_refused() -> None:
    ms = _ngff([1.0, 1.0, 2.0, 0.5, 0.5], {"z": "micrometer", "y": "micrometer", "x": "micrometer"}, names="tczyx")
    ms["axes"][0]["type"], ms["axes"][1]["type"] = "time", "channel"
    info = level_info(ms, 0, (1, 1, 6, 8, 9), np.float32, Path("a.zarr"))
    assert info.shape == (6, 8, 9) and info.spacing == pytest.approx((2.0, 0.5, 0.5))
    with pytest.raises(OmeZarrError, match="c=2"):
        level_info(ms, 0, (1, 2, 6, 8, 9), np.float32, Path("a.zarr"))


def test_unknown_level_and_non_positive_scale_are_refused() -> None:
    with pytest.raises(OmeZarrError, match="level 3 not found"):
        level_info(_ngff([1.0, 1.0, 1.0]), 3, (2, 2, 2), np.uint16, Path("a.zarr"))
    with pytest.raises(OmeZarrError, match="not a positive spacing"):
        level_info(_ngff([0.0, 1.0, 1.0]), 0, (2, 2, 2), np.uint16, Path("a.zarr"))


def test_channel_comes_from_the_omero_label_then_the_names() -> None:
    assert omezarr.channel_of({"channels": [{"label": "Nuclei (H2B)"}]}, "x.zarr") == "nucleus"
    assert omezarr.channel_of(None, None, "embryo_membrane.ome.zarr") == "membrane"
    assert omezarr.channel_of({"channels": [{"label": "GFP"}]}, "image", "t0.zarr") is None


def test_downsampling_averages_two_by_two_and_keeps_odd_edges() -> None:
    block = np.arange(2 * 3 * 5, dtype=np.float32).reshape(2, 3, 5)
    out = downsample_yx(block)
    assert out.shape == (2, 2, 3)
    assert out[0, 0, 0] == pytest.approx(block[0, :2, :2].mean())
    assert out[1, 1, 2] == pytest.approx(block[1, 2, 4])  # the odd corner averaged with itself
    assert level_shapes((7, 50, 41), 3) == [(7, 50, 41), (7, 25, 21), (7, 13, 11)]


def test_pyramid_levels_scale_yx_spacing_and_keep_pixel_centres() -> None:
    datasets = multiscale_datasets((1.0, 0.4, 0.3), 3)
    assert datasets[2]["coordinateTransformations"][0]["scale"] == pytest.approx([1.0, 1.6, 1.2])
    # level-2 pixel 0 covers level-0 pixels 0..3, whose centres average to 1.5 pixels
    assert datasets[2]["coordinateTransformations"][1]["translation"] == pytest.approx([0.0, 0.6, 0.45])
    assert (
        omezarr.auto_levels((10, 1920, 1920)) == 4
        and omezarr.auto_levels((10, 1920, 960)) == 3
        and omezarr.auto_levels((10, 100, 100)) == 1
    )


@needs_zarr
@pytest.mark.parametrize("version", ["0.4", "0.5"])
def test_reads_a_level_written_by_the_reference_library(tmp_path: Path, version: str) -> None:
    import zarr
    from ome_zarr.format import FormatV04, FormatV05
    from ome_zarr.writer import write_image

    fmt = FormatV04() if version == "0.4" else FormatV05()
    data = blob_volume((6, 40, 36), seed=3)
    store = tmp_path / f"embryo_nucleus_{version}.ome.zarr"
    group = zarr.open_group(str(store), mode="w", zarr_format=fmt.zarr_format)
    units = dict.fromkeys("zyx", "nanometer")
    write_image(
        data,
        group,
        scale_factors=[2],
        fmt=fmt,
        axes="zyx",
        scale={"z": 2000.0, "y": 390.0, "x": 390.0},
        axes_units=units,
    )
    assert omezarr.is_ome_zarr(store) and not omezarr.is_ome_zarr(tmp_path)
    info = omezarr.open_level(store, 1)
    assert info.levels == 2 and info.shape == (6, 20, 18)
    assert info.spacing == pytest.approx((2.0, 0.78, 0.78))
    assert info.channel == "nucleus"  # from the store name (no omero label written)
    full = omezarr.open_level(store, 0)
    np.testing.assert_array_equal(omezarr.read_level(full), data)


@needs_zarr
def test_round_trip_keeps_values_shape_spacing_and_channel_in_every_level(tmp_path: Path) -> None:
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Reader

    data = np.random.default_rng(0).random((20, 50, 41)).astype(np.float32)
    out = tmp_path / "fused.ome.zarr"
    written = omezarr.write_ome_zarr(
        out, ArraySource(data), (1.5, 0.4, 0.3), channel="membrane", levels=3, extra={"source": "x.tif"}
    )
    assert written["shapes"] == [[20, 50, 41], [20, 25, 21], [20, 13, 11]]
    info = omezarr.open_level(out, 0)
    assert info.spacing == pytest.approx((1.5, 0.4, 0.3)) and info.channel == "membrane" and info.dtype == np.float32
    np.testing.assert_array_equal(omezarr.read_level(info), data)
    level1 = omezarr.read_level(omezarr.open_level(out, 1))
    np.testing.assert_allclose(level1, downsample_yx(data), rtol=1e-6)
    assert omezarr.open_level(out, 2).spacing == pytest.approx((1.5, 1.6, 1.2))
    # the reference reader sees the same pyramid and transformations
    node = next(iter(Reader(parse_url(str(out)))()))
    assert [tuple(d.shape) for d in node.data] == [tuple(s) for s in written["shapes"]]
    assert node.metadata["coordinateTransformations"][1][0]["scale"] == pytest.approx([1.5, 0.8, 0.6])
    assert [a["unit"] for a in node.metadata["axes"]] == ["micrometer"] * 3
    assert not list(tmp_path.glob(".*.partial"))


@needs_zarr
def test_uint16_output_is_rounded_per_level_and_chunked_by_slab(tmp_path: Path) -> None:
    import zarr

    data = np.arange(40 * 6 * 7, dtype=np.uint16).reshape(40, 6, 7)
    out = tmp_path / "u.ome.zarr"

    class Uint16Source(CountingSource):
        def planes(self, z0: int, z1: int) -> np.ndarray:
            return self.data[z0:z1].copy()

    source = Uint16Source(data)
    source.dtype = np.dtype(np.uint16)
    omezarr.write_ome_zarr(out, source, (1.0, 1.0, 1.0), levels=2)
    group = zarr.open_group(str(out), mode="r")
    assert group["0"].dtype == np.uint16 and group["0"].chunks == (omezarr.SLAB, 6, 7)
    np.testing.assert_array_equal(group["1"][...], np.rint(downsample_yx(data)).astype(np.uint16))


@needs_zarr
def test_writer_streams_each_plane_once_in_slabs(tmp_path: Path) -> None:
    data = np.random.default_rng(1).random((37, 30, 20)).astype(np.float32)
    source = CountingSource(data)
    omezarr.write_ome_zarr(tmp_path / "s.ome.zarr", source, (1.0, 0.5, 0.5), levels=2)
    assert source.calls == [(0, 16), (16, 32), (32, 37)]  # one pass, never more than a slab at a time


@needs_zarr
def test_a_failed_write_leaves_no_store_and_keeps_an_older_one(tmp_path: Path) -> None:
    out = tmp_path / "f.ome.zarr"
    old = np.ones((20, 8, 8), np.float32)
    omezarr.write_ome_zarr(out, ArraySource(old), (1.0, 1.0, 1.0), levels=1)
    with pytest.raises(RuntimeError, match="disk full"):
        omezarr.write_ome_zarr(out, FailingSource(np.zeros((40, 8, 8), np.float32)), (1.0, 1.0, 1.0), levels=1)
    assert not list(tmp_path.glob(".*.partial"))
    np.testing.assert_array_equal(omezarr.read_level(omezarr.open_level(out, 0)), old)


class FullDiskSource(CountingSource):
    def planes(self, z0: int, z1: int) -> np.ndarray:
        if z0 > 0:
            import errno
            import os

            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return super().planes(z0, z1)


@needs_zarr
def test_a_full_disk_while_writing_a_store_is_named_and_leaves_nothing(tmp_path: Path) -> None:
    from fusemycells.io.tiff import DiskFullError

    source = FullDiskSource(blob_volume((40, 32, 32)))
    with pytest.raises(DiskFullError, match=r"out.ome.zarr: no space left on device \(needed ≈ 0.2 MB, free "):
        omezarr.write_ome_zarr(tmp_path / "out.ome.zarr", source, (1.0, 0.4, 0.4), levels=1)
    assert list(tmp_path.iterdir()) == []
