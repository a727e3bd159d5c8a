"""TIFF reading/writing with the challenge's metadata conventions (fusemycells.io)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tifffile
from conftest import blob_volume, write_case

from fusemycells.io import (
    DEFAULT_CHANNEL,
    DEFAULT_SPACING_ZYX_UM,
    InputError,
    Volume,
    list_inputs,
    read_volume,
    squeeze_to_zyx,
    write_volume,
)

SPACING = (2.0, 0.3, 0.25)  # z, y, x (µm): all different so an axis swap is caught


def _spelled(style: str, spacing: tuple[float, float, float]) -> dict[str, float]:
    z, y, x = spacing
    if style == "PhysicalSize":
        return {"PhysicalSizeX": x, "PhysicalSizeY": y, "PhysicalSizeZ": z}
    if style == "physicalsize":
        return {"physicalsizex": x, "physicalsizey": y, "physicalsizez": z}
    return {"physical_size_x": x, "physical_size_y": y, "physical_size_z": z}


@pytest.mark.parametrize("style", ["PhysicalSize", "physicalsize", "physical_size"])
def test_shaped_metadata_spacing_and_channel_read_for_every_key_spelling(tmp_path: Path, style: str) -> None:
    data = blob_volume((6, 20, 18))
    path = tmp_path / "case.tif"
    tifffile.imwrite(path, data, metadata={**_spelled(style, SPACING), "channel": "membrane"})
    volume = read_volume(path)
    assert volume.spacing == pytest.approx(SPACING)
    assert volume.channel == "membrane"
    assert volume.warnings == []
    np.testing.assert_array_equal(volume.data, data)


@pytest.mark.parametrize(
    "channel_value, expected", [("nucleus", "nucleus"), ("Nuclei", "nucleus"), ("membranes", "membrane")]
)
def test_channel_spellings_in_metadata_map_to_canonical_names(
    tmp_path: Path, channel_value: str, expected: str
) -> None:
    path = tmp_path / "x.tif"
    tifffile.imwrite(
        path, blob_volume((5, 8, 8)), metadata={**_spelled("PhysicalSize", SPACING), "channel": channel_value}
    )
    assert read_volume(path).channel == expected


def test_imagej_file_spacing_from_z_step_and_resolution(tmp_path: Path) -> None:
    data = blob_volume((6, 20, 18))
    path = tmp_path / "imagej.tif"
    tifffile.imwrite(
        path,
        data,
        imagej=True,
        resolution=(1 / SPACING[2], 1 / SPACING[1]),
        metadata={"axes": "ZYX", "spacing": SPACING[0], "unit": "um", "channel": "membrane"},
    )
    volume = read_volume(path)
    assert volume.spacing == pytest.approx(SPACING, rel=1e-6)
    assert volume.channel == "membrane"
    np.testing.assert_array_equal(volume.data, data)


def test_imagej_file_with_physical_size_keys_uses_them(tmp_path: Path) -> None:
    # ImageJ descriptions come back lower-cased ('physicalsizex'), one of the three spellings
    path = tmp_path / "imagej_keys.tif"
    tifffile.imwrite(
        path, blob_volume((5, 8, 8)), imagej=True, metadata={"axes": "ZYX", **_spelled("PhysicalSize", SPACING)}
    )
    volume = read_volume(path)
    assert volume.spacing == pytest.approx(SPACING)
    assert volume.channel == DEFAULT_CHANNEL


@pytest.mark.parametrize("style", ["PhysicalSize", "physicalsize", "physical_size"])
def test_written_metadata_round_trips_spacing_channel_axes_unit(tmp_path: Path, style: str) -> None:
    data = blob_volume((6, 20, 18)).astype(np.float32)
    stale = _spelled(style, (9.0, 8.0, 7.0))  # the input's own spelling, with values the Volume overrides
    like = Volume(data=data, spacing=SPACING, channel="membrane", metadata={**stale, "note": "kept"})
    path = tmp_path / "out.tif"
    write_volume(path, data, like)
    volume = read_volume(path)
    assert volume.spacing == pytest.approx(SPACING)
    assert volume.channel == "membrane"
    assert volume.warnings == []
    assert volume.metadata["axes"] == "ZYX"
    assert volume.metadata["unit"] == "um"
    assert volume.metadata["note"] == "kept"
    # the stale input spelling is replaced, not left to contradict the canonical one
    sizes = sorted(k for k in volume.metadata if k.lower().replace("_", "").startswith("physicalsize"))
    assert sizes == ["PhysicalSizeX", "PhysicalSizeY", "PhysicalSizeZ"]
    assert volume.data.dtype == np.float32
    np.testing.assert_array_equal(volume.data, data)


def test_written_file_is_bigtiff_tiled_128_with_resolution_inverse_of_spacing(tmp_path: Path) -> None:
    data = blob_volume((5, 140, 130))
    path = tmp_path / "out.tif"
    write_volume(path, data, Volume(data=data, spacing=SPACING, channel="nucleus"))
    with tifffile.TiffFile(path) as tif:
        assert tif.is_bigtiff
        assert len(tif.pages) == data.shape[0]
        page = tif.pages.first
        assert page.is_tiled
        assert (page.tilelength, page.tilewidth) == (128, 128)
        x_num, x_den = page.tags["XResolution"].value
        y_num, y_den = page.tags["YResolution"].value
    assert x_num / x_den == pytest.approx(1 / SPACING[2], rel=1e-6)
    assert y_num / y_den == pytest.approx(1 / SPACING[1], rel=1e-6)
    assert not list(tmp_path.glob(".*partial")), "temporary file left behind"


@pytest.mark.parametrize("depth", [1, 3, 4])
def test_few_slice_stack_is_written_as_grey_pages_not_rgb(tmp_path: Path, depth: int) -> None:
    data = blob_volume((depth, 16, 16))
    path = tmp_path / "thin.tif"
    write_volume(path, data, Volume(data=data, spacing=SPACING, channel="nucleus"))
    with tifffile.TiffFile(path) as tif:
        assert len(tif.pages) == depth
        assert tif.pages.first.samplesperpixel == 1
    np.testing.assert_array_equal(read_volume(path).data, data)


def test_missing_spacing_falls_back_to_resolution_tags_with_warning(tmp_path: Path) -> None:
    path = tmp_path / "res_only.tif"
    # same convention as the reference writer: 1/µm under tifffile's default unit
    tifffile.imwrite(path, blob_volume((5, 8, 8)), resolution=(1 / 0.25, 1 / 0.3), metadata={"channel": "nucleus"})
    volume = read_volume(path)
    assert volume.spacing == pytest.approx((DEFAULT_SPACING_ZYX_UM[0], 0.3, 0.25))
    joined = " ".join(volume.warnings)
    assert "PhysicalSizeZ missing: using default" in joined
    assert "PhysicalSizeY missing: using TIFF resolution tag" in joined
    assert "PhysicalSizeX missing: using TIFF resolution tag" in joined


def test_resolution_tags_in_centimetres_are_converted(tmp_path: Path) -> None:
    path = tmp_path / "cm.tif"
    # 0.5 µm pixels = 20000 pixels per cm
    tifffile.imwrite(path, blob_volume((5, 8, 8)), resolution=(20000.0, 20000.0), resolutionunit="CENTIMETER")
    assert read_volume(path).spacing[1:] == pytest.approx((0.5, 0.5))


@pytest.mark.parametrize("dpi", [72.0, 96.0, 300.0])
def test_resolution_in_dots_per_inch_is_ignored_for_the_default_with_a_warning(tmp_path: Path, dpi: float) -> None:
    path = tmp_path / "print.tif"
    tifffile.imwrite(path, blob_volume((5, 8, 8)), resolution=(dpi, dpi), resolutionunit="INCH", metadata={"channel": "nucleus"})
    volume = read_volume(path)
    assert volume.spacing[1:] == pytest.approx(DEFAULT_SPACING_ZYX_UM[1:])  # not 25400/dpi µm (84.7 µm at 300 dpi)
    joined = " ".join(volume.warnings)
    assert "PhysicalSizeX missing: using default" in joined and "pixels/inch ignored" in joined


@pytest.mark.parametrize("unit, um_per_unit", [("nm", 1e-3), ("nanometer", 1e-3), ("nanometers", 1e-3), ("mm", 1e3), ("micron", 1.0), ("\\u00B5m", 1.0), ("µm", 1.0)])
def test_metadata_sizes_in_other_units_are_converted_to_um_and_written_back_in_um(tmp_path: Path, unit: str, um_per_unit: float) -> None:
    path = tmp_path / "units.tif"
    declared = {key: value / um_per_unit for key, value in _spelled("PhysicalSize", SPACING).items()}
    tifffile.imwrite(path, blob_volume((5, 8, 8)), metadata={**declared, "unit": unit, "channel": "nucleus"})
    volume = read_volume(path)
    assert volume.spacing == pytest.approx(SPACING)
    assert volume.warnings == []
    out = tmp_path / "out.tif"
    write_volume(out, volume.data, volume)
    again = read_volume(out)
    assert again.metadata["unit"] == "um" and again.spacing == pytest.approx(SPACING)


def test_imagej_file_in_nanometres_converts_z_step_and_resolution_tags(tmp_path: Path) -> None:
    path = tmp_path / "imagej_nm.tif"
    z, y, x = (s * 1000 for s in SPACING)
    tifffile.imwrite(path, blob_volume((5, 8, 8)), imagej=True, resolution=(1 / x, 1 / y), metadata={"axes": "ZYX", "spacing": z, "unit": "nm"})
    assert read_volume(path).spacing == pytest.approx(SPACING, rel=1e-6)


def test_unknown_metadata_unit_is_read_as_um_with_a_warning(tmp_path: Path) -> None:
    path = tmp_path / "furlong.tif"
    tifffile.imwrite(path, blob_volume((5, 8, 8)), metadata={**_spelled("PhysicalSize", SPACING), "unit": "furlong", "channel": "nucleus"})
    volume = read_volume(path)
    assert volume.spacing == pytest.approx(SPACING)
    assert volume.warnings == ["unit 'furlong' not recognised: physical sizes read as µm"]


@pytest.mark.parametrize(
    "shape, axes, expected",
    [
        ((30, 28), "YX", (1, 30, 28)),
        ((5, 20, 22), "QYX", (5, 20, 22)),
        ((5, 20, 22), "IYX", (5, 20, 22)),
        ((1, 5, 1, 20, 22), "QQQYX", (5, 20, 22)),
        ((5, 1, 20, 22), "ZCYX", (5, 20, 22)),
        ((1, 5, 20, 22), "TZYX", (5, 20, 22)),
        ((5, 20, 22, 1), "ZYXS", (5, 20, 22)),
        ((2, 20, 22), "", (2, 20, 22)),  # axes unknown: read as Z
        ((40, 20, 22), "CYX", (40, 20, 22)),  # ImageJ 'channels' of a stack without Z: its Z axis
        ((1, 12, 20, 22), "ZTYX", (12, 20, 22)),
    ],
)
def test_singleton_axes_are_squeezed_to_zyx(shape: tuple[int, ...], axes: str, expected: tuple[int, int, int]) -> None:
    assert squeeze_to_zyx(shape, axes) == expected


@pytest.mark.parametrize(
    "shape, axes, found",
    [
        ((2, 20, 22), "CYX", "C=2"),
        ((30, 28, 3), "YXS", "S=3"),
        ((1, 2, 20, 22), "ZCYX", "C=2"),
        ((3, 1, 20, 22), "TZYX", "T=3"),
        ((2, 1, 20, 22), "CZYX", "C=2"),
        ((4, 2, 20, 22), "QQYX", "non-singleton axes"),  # four unlabelled axes
    ],
)
def test_non_singleton_axes_other_than_zyx_are_refused_naming_them(shape: tuple[int, ...], axes: str, found: str) -> None:
    with pytest.raises(InputError, match="non-singleton axes") as info:
        squeeze_to_zyx(shape, axes)
    assert found in str(info.value) and f"'{axes}'" in str(info.value)


def test_imagej_stack_written_without_axes_is_read_as_z_with_a_warning(tmp_path: Path) -> None:
    path = tmp_path / "ij.tif"
    stack = blob_volume((9, 16, 18))
    tifffile.imwrite(path, stack, imagej=True, resolution=(1 / 0.3, 1 / 0.3), metadata={"spacing": 2.0, "unit": "um"})
    with tifffile.TiffFile(path) as tif:
        assert tif.series[0].axes == "CYX"  # what tifffile makes of it
    volume = read_volume(path)
    assert volume.data.shape == (9, 16, 18)
    np.testing.assert_array_equal(volume.data, stack)
    assert volume.spacing == pytest.approx((2.0, 0.3, 0.3))
    assert any("read as 'ZYX'" in w for w in volume.warnings)


def test_missing_spacing_and_resolution_use_defaults_with_warnings(tmp_path: Path) -> None:
    path = tmp_path / "bare.tif"
    tifffile.imwrite(path, blob_volume((5, 8, 8)))
    volume = read_volume(path)
    assert volume.spacing == pytest.approx(DEFAULT_SPACING_ZYX_UM)
    assert sum("using default" in w and "PhysicalSize" in w for w in volume.warnings) == 3


def test_missing_channel_defaults_to_nucleus_with_warning(tmp_path: Path) -> None:
    path = tmp_path / "image_42.tif"
    tifffile.imwrite(path, blob_volume((5, 8, 8)), metadata=_spelled("PhysicalSize", SPACING))
    volume = read_volume(path)
    assert volume.channel == "nucleus"
    assert any("channel missing" in w and "default" in w for w in volume.warnings)


def test_missing_channel_taken_from_membrane_file_name(tmp_path: Path) -> None:
    path = tmp_path / "image_42_membrane.tif"
    tifffile.imwrite(path, blob_volume((5, 8, 8)), metadata=_spelled("PhysicalSize", SPACING))
    volume = read_volume(path)
    assert volume.channel == "membrane"
    assert any("file name" in w for w in volume.warnings)


def test_unreadable_file_raises_input_error_naming_it(tmp_path: Path) -> None:
    path = tmp_path / "broken.tif"
    path.write_bytes(b"not a tiff at all")
    with pytest.raises(InputError, match="broken.tif"):
        read_volume(path)


def test_list_inputs_takes_tif_and_tiff_in_any_case_sorted(tmp_path: Path) -> None:
    data = blob_volume((5, 8, 8))
    for name in ("b.tiff", "a.TIF", "c.tif"):
        write_case(tmp_path, name, data)
    (tmp_path / "notes.txt").write_text("x")
    (tmp_path / "sub.tif").mkdir()
    assert [p.name for p in list_inputs(tmp_path)] == ["a.TIF", "b.tiff", "c.tif"]
