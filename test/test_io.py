"""TIFF reading/writing with the challenge's metadata conventions (fusemycells.io.tiff)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import tifffile
from conftest import blob_volume, write_case

from fusemycells.io.scan import list_inputs, scan_inputs
from fusemycells.io.tiff import (
    DEFAULT_CHANNEL,
    DEFAULT_SPACING_ZYX_UM,
    TILE_PADDING_MAX,
    InputError,
    Volume,
    WriteCheckError,
    check_output_name,
    choose_series,
    read_volume,
    sampled_pages,
    squeeze_to_zyx,
    tile_for,
    verify_written,
    write_volume,
)
from fusemycells.sources import ArraySource

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
    data = blob_volume((5, 256, 370))
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
    assert [p.name for p in tmp_path.iterdir()] == ["out.tif"], "temporary file left behind"


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


# issue 19: written files read back as computed ----------------------------------------------------
@pytest.mark.parametrize("shape", [(5, 7, 1), (3, 2, 1), (2, 130, 1), (40, 17, 1), (3, 1, 1), (4, 1, 7), (1, 1, 1)])
@pytest.mark.parametrize("streamed", [True, False])
def test_stacks_with_singleton_last_axes_read_back_equal_to_what_was_written(tmp_path: Path, shape: tuple[int, int, int], streamed: bool) -> None:
    data = np.arange(1, np.prod(shape) + 1, dtype=np.float32).reshape(shape)  # no two voxels alike
    path = tmp_path / "thin.tif"
    write_volume(path, ArraySource(data) if streamed else data, Volume(data=data, spacing=SPACING, channel="nucleus"))
    back = tifffile.imread(path)
    assert back.shape == shape
    np.testing.assert_array_equal(back, data)


@pytest.mark.parametrize("shape", [(2000, 16, 16), (500, 20, 1), (300, 1, 24), (100, 40, 200)])
def test_narrow_stacks_are_not_inflated_by_tiles(tmp_path: Path, shape: tuple[int, int, int]) -> None:
    data = np.ones(shape, dtype=np.float32)
    path = tmp_path / "narrow.tif"
    write_volume(path, ArraySource(data), Volume(data=data, spacing=SPACING, channel="nucleus"))
    # 16×16 planes in 128×128 tiles were 64× the data; what remains is tile padding and one IFD per page
    assert path.stat().st_size < 1.5 * data.nbytes + 400 * shape[0]
    np.testing.assert_array_equal(tifffile.imread(path), data)


@pytest.mark.parametrize("size", [1, 5, 15, 16, 20, 40, 100, 140, 300, 1000, 1030, 1920, 2048, 5000])
def test_tiles_pad_each_axis_by_at_most_the_limit_or_strips_are_used(size: int) -> None:
    tile = tile_for(size, size)
    if tile is None:
        assert all(np.ceil(size / t) * t > size * (1 + TILE_PADDING_MAX) for t in range(16, 129, 16))
    else:
        assert tile[0] % 16 == 0 and 16 <= tile[0] <= 128
        assert np.ceil(size / tile[0]) * tile[0] <= size * (1 + TILE_PADDING_MAX)
    if size >= 1024:
        assert tile == (128, 128)  # the reference layout for challenge-sized planes


def test_read_back_check_detects_a_changed_page(tmp_path: Path) -> None:
    data = blob_volume((6, 40, 36))
    path = tmp_path / "out.tif"
    digest = write_volume(path, data, Volume(data=data, spacing=SPACING, channel="nucleus"))
    verify_written(path, digest)  # as written: passes
    with tifffile.TiffFile(path) as tif:
        offset = tif.pages[3].dataoffsets[0]
    with open(path, "r+b") as handle:
        handle.seek(offset + 10)
        handle.write(b"\xff\xff")
    with pytest.raises(WriteCheckError, match="page 3"):
        verify_written(path, digest)


# issue 19: temporary files --------------------------------------------------------------------------
def test_names_up_to_the_file_system_limit_are_written(tmp_path: Path) -> None:
    data = blob_volume((3, 16, 16))
    name = "n" * 251 + ".tif"  # 255 bytes: the old '.NAME.partial' temporary name was 264
    write_volume(tmp_path / name, data, Volume(data=data, spacing=SPACING, channel="nucleus"))
    assert [p.name for p in tmp_path.iterdir()] == [name]


def test_output_names_over_the_file_system_limit_are_refused_before_writing(tmp_path: Path) -> None:
    name = "n" * 300 + ".tif"
    with pytest.raises(InputError, match="304 bytes, over the 255-byte limit"):
        check_output_name(tmp_path / "not_yet_created", name)
    data = blob_volume((3, 16, 16))
    with pytest.raises(InputError, match="304 bytes"):
        write_volume(tmp_path / name, data, Volume(data=data, spacing=SPACING, channel="nucleus"))
    assert list(tmp_path.iterdir()) == []
    check_output_name(tmp_path, "n" * 251 + ".tif")  # at the limit: accepted


def test_symlinks_planted_in_the_output_folder_are_not_followed(tmp_path: Path) -> None:
    out, victim = tmp_path / "out", tmp_path / "victim.txt"
    out.mkdir()
    victim.write_text("")
    (out / ".a.tif.partial").symlink_to(victim)  # the old predictable temporary name
    (out / "b.tif").symlink_to(victim)  # the final name
    data = blob_volume((3, 16, 16))
    for name in ("a.tif", "b.tif"):
        write_volume(out / name, data, Volume(data=data, spacing=SPACING, channel="nucleus"))
        assert not (out / name).is_symlink()
        np.testing.assert_array_equal(tifffile.imread(out / name), data)
    assert victim.read_text() == ""
    assert sorted(p.name for p in out.iterdir()) == [".a.tif.partial", "a.tif", "b.tif"]


def test_temporary_file_is_removed_when_the_rename_fails(tmp_path: Path) -> None:
    (tmp_path / "out.tif").mkdir()
    (tmp_path / "out.tif" / "keep").write_text("a folder in the way of the output")
    data = blob_volume((3, 16, 16))
    with pytest.raises(OSError):
        write_volume(tmp_path / "out.tif", data, Volume(data=data, spacing=SPACING, channel="nucleus"))
    assert [p.name for p in tmp_path.iterdir()] == ["out.tif"]


class _InterruptedSource(ArraySource):
    """A plane source interrupted (KeyboardInterrupt, a BaseException) after its first slab."""

    def planes(self, z0: int, z1: int) -> np.ndarray:
        if z0 > 0:
            raise KeyboardInterrupt
        return super().planes(z0, z1)


def test_temporary_file_is_removed_when_writing_is_interrupted(tmp_path: Path) -> None:
    data = blob_volume((20, 16, 16))
    with pytest.raises(KeyboardInterrupt):
        write_volume(tmp_path / "out.tif", _InterruptedSource(data), Volume(data=data, spacing=SPACING, channel="nucleus"))
    assert list(tmp_path.iterdir()) == []


def test_output_file_mode_follows_the_umask_not_the_private_temporary_mode(tmp_path: Path) -> None:
    data = blob_volume((3, 16, 16))
    old = os.umask(0o022)
    try:
        write_volume(tmp_path / "out.tif", data, Volume(data=data, spacing=SPACING, channel="nucleus"))
    finally:
        os.umask(old)
    assert (tmp_path / "out.tif").stat().st_mode & 0o777 == 0o644


# issue 19: inputs real users have -------------------------------------------------------------------
def test_ome_tiff_spacing_with_per_axis_units_and_channel_name_are_read(tmp_path: Path) -> None:
    data = blob_volume((5, 16, 16))
    path = tmp_path / "case.ome.tif"
    ome = {"axes": "ZYX", "PhysicalSizeZ": 50, "PhysicalSizeZUnit": "nm", "PhysicalSizeY": 300, "PhysicalSizeYUnit": "nm", "PhysicalSizeX": 0.25, "Channel": {"Name": "membrane"}}
    tifffile.imwrite(path, data, ome=True, metadata=ome)
    volume = read_volume(path)
    assert volume.spacing == pytest.approx((0.05, 0.3, 0.25))  # X without a unit: OME's default µm
    assert volume.channel == "membrane"
    assert volume.warnings == []
    np.testing.assert_array_equal(volume.data, data)
    out = tmp_path / "out.tif"
    write_volume(out, volume.data, volume)
    again = read_volume(out)
    assert again.spacing == pytest.approx((0.05, 0.3, 0.25))  # written in µm, without the nm units
    assert not [k for k in again.metadata if k.lower().endswith("unit") and k != "unit"]


def test_per_axis_units_in_shaped_metadata_override_the_common_unit(tmp_path: Path) -> None:
    path = tmp_path / "units.tif"
    meta = {"PhysicalSizeZ": 2000, "PhysicalSizeZUnit": "nm", "PhysicalSizeY": 0.3, "PhysicalSizeX": 0.25, "unit": "um", "channel": "nucleus"}
    tifffile.imwrite(path, blob_volume((5, 8, 8)), metadata=meta)
    volume = read_volume(path)
    assert volume.spacing == pytest.approx(SPACING)
    assert volume.warnings == []


@pytest.mark.parametrize("compression", ["lzw", "zlib", "adobe_deflate", "zstd"])
def test_compressed_tiffs_are_read(tmp_path: Path, compression: str) -> None:
    data = blob_volume((5, 40, 36))
    path = tmp_path / f"{compression}.tif"
    tifffile.imwrite(path, data, compression=compression, metadata={**_spelled("PhysicalSize", SPACING), "channel": "membrane"})
    volume = read_volume(path)
    np.testing.assert_array_equal(volume.data, data)
    assert volume.spacing == pytest.approx(SPACING) and volume.channel == "membrane"


def test_malformed_json_description_falls_back_to_the_pages_with_a_warning(tmp_path: Path) -> None:
    data = blob_volume((5, 16, 16))
    path = tmp_path / "truncated_json.tif"
    tifffile.imwrite(path, data, description='{"shape": [5, 16, 16], "PhysicalSizeX": 0.3', metadata=None)
    volume = read_volume(path)
    np.testing.assert_array_equal(volume.data, data)
    assert any("malformed JSON image description" in w for w in volume.warnings)
    assert volume.spacing == pytest.approx(DEFAULT_SPACING_ZYX_UM)  # its values are not trusted


@pytest.mark.parametrize("declared", [3, 9])
@pytest.mark.parametrize("tiled", [False, True])
def test_json_shape_disagreeing_with_the_pages_reads_every_page_with_a_warning(tmp_path: Path, declared: int, tiled: bool) -> None:
    data = blob_volume((5, 32, 32))
    path = tmp_path / "wrong_shape.tif"
    description = json.dumps({"shape": [declared, 32, 32], **_spelled("PhysicalSize", SPACING), "channel": "membrane"})
    tifffile.imwrite(path, data, description=description, metadata=None, **({"tile": (16, 16)} if tiled else {}))
    volume = read_volume(path)
    np.testing.assert_array_equal(volume.data, data)  # no page dropped, none invented
    assert any(f"JSON shape [{declared}, 32, 32]" in w and "5 page(s)" in w for w in volume.warnings)
    assert volume.spacing == pytest.approx(SPACING) and volume.channel == "membrane"  # the other keys are kept


def test_thumbnail_before_the_stack_reads_the_largest_series_with_a_warning(tmp_path: Path) -> None:
    data = blob_volume((5, 32, 30))
    path = tmp_path / "with_thumbnail.tif"
    with tifffile.TiffWriter(path) as tif:
        tif.write(np.zeros((16, 16), np.uint8), metadata={"kind": "thumbnail"})
        tif.write(data, metadata={**_spelled("PhysicalSize", SPACING), "channel": "membrane"})
    volume = read_volume(path)
    np.testing.assert_array_equal(volume.data, data)
    assert volume.spacing == pytest.approx(SPACING) and volume.channel == "membrane"  # the stack's own metadata
    assert any("2 image series: read series 1 (5, 32, 30)" in w and "ignored series 0 (16, 16)" in w for w in volume.warnings)


def test_series_choice_prefers_the_largest_readable_3d_stack() -> None:
    assert choose_series([((5, 20, 20), "ZYX")]) == (0, [])
    assert choose_series([((16, 16), "YX"), ((5, 20, 20), "ZYX")])[0] == 1
    assert choose_series([((3000, 3000), "YX"), ((5, 20, 20), "ZYX")])[0] == 1  # a 3D stack before a big 2D image
    assert choose_series([((5, 20, 20), "ZYX"), ((2, 9, 50, 50), "CZYX")])[0] == 0  # unreadable channels skipped
    assert choose_series([((2, 5, 20, 20), "CZYX"), ((3, 9, 50, 50), "CZYX")])[0] == 1  # none readable: the largest, to refuse


@pytest.mark.parametrize("value", ["dapi", "actin", 3])
def test_unknown_channel_values_are_named_in_the_warning(tmp_path: Path, value: object) -> None:
    path = tmp_path / "stain.tif"
    tifffile.imwrite(path, blob_volume((5, 8, 8)), metadata={**_spelled("PhysicalSize", SPACING), "channel": value})
    volume = read_volume(path)
    assert volume.channel == DEFAULT_CHANNEL
    assert volume.warnings == [f"unknown channel {value!r} in metadata: using default 'nucleus'"]


def test_boolean_physical_size_is_not_a_spacing(tmp_path: Path) -> None:
    path = tmp_path / "bool.tif"
    tifffile.imwrite(path, blob_volume((5, 8, 8)), metadata={"PhysicalSizeZ": True, "PhysicalSizeY": 0.3, "PhysicalSizeX": 0.25, "channel": "nucleus"})
    volume = read_volume(path)
    assert volume.spacing == pytest.approx((DEFAULT_SPACING_ZYX_UM[0], 0.3, 0.25))
    assert any(w.startswith("PhysicalSizeZ=True is not a plausible spacing") for w in volume.warnings)


# issue 19: skipped entries ------------------------------------------------------------------------
def test_skipped_tiff_named_entries_are_listed_with_their_reason(tmp_path: Path) -> None:
    write_case(tmp_path, "good.tif", blob_volume((3, 8, 8)))
    (tmp_path / "gone.tif").symlink_to(tmp_path / "nowhere.tif")
    os.mkfifo(tmp_path / "pipe.tif")
    (tmp_path / "y.tif").mkdir()
    (tmp_path / ".tif").write_bytes(b"II*\x00")
    (tmp_path / "notes.txt").write_text("not an input")
    scan = scan_inputs(tmp_path)
    assert [p.name for p in scan.files] == ["good.tif"]
    assert dict(scan.skipped) == {
        ".tif": "no file name before the extension",
        "gone.tif": "dangling symbolic link",
        "pipe.tif": "not a regular file (FIFO)",
        "y.tif": "a folder, not a file",
    }
    assert scan.ignored == [("notes.txt", "not a .tif/.tiff file")]  # not an input: listed apart (issue 27)


def test_read_back_sample_is_bounded_in_pages_and_bytes_and_keeps_both_ends() -> None:
    assert sampled_pages(5, 1024) == [0, 1, 2, 3, 4]
    many = sampled_pages(100_000, 1024)
    assert len(many) == 64 and many[0] == 0 and many[-1] == 99_999
    big = sampled_pages(309, 1920 * 1920 * 4)  # 14 MiB pages: 4 fit 64 MiB
    assert big == [0, 103, 205, 308]
    assert sampled_pages(3, 2**30) == [0, 2]  # at least the ends, even over the byte budget


def test_a_full_disk_during_a_write_is_named_with_the_space_needed_and_free(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import shutil

    from fusemycells.io import tiff as io

    def short_write(*args: object, **kwargs: object) -> None:
        raise OSError("16384 requested and 16252 written")  # what tifffile raises on a full disk

    monkeypatch.setattr(io.tifffile, "imwrite", short_write)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10 << 20, 10 << 20, 200_000))
    data = blob_volume((16, 64, 64)).astype(np.float32)  # 256 KiB
    with pytest.raises(io.DiskFullError, match=r"out.tif: no space left on device \(needed ≈ 0.3 MB, free 0.2 MB"):
        write_volume(tmp_path / "out.tif", data, Volume(data=data, spacing=(1.0, 0.4, 0.4), channel="nucleus"))
    assert list(tmp_path.iterdir()) == []


def test_a_text_file_is_refused_as_bad_magic_without_quoting_it(tmp_path: Path) -> None:
    path = tmp_path / "x.tif"
    path.write_text("root:x:0:0:root")
    with pytest.raises(InputError) as refused:
        read_volume(path)
    assert "not a TIFF: bad magic" in str(refused.value) and "root" not in str(refused.value)
