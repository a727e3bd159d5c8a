"""The SimpleITK formats (.mha, .mhd, .nrrd, .nii, .nii.gz) through the reader/writer registry: spacing and
ZYX orientation on an anisotropic volume, files SimpleITK wrote itself, 4D and vector refusals, and the one
file-to-file path (inference.py's CLI and batch) on them."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import blob_volume, write_case

from fusemycells import batch, cli
from fusemycells.batch import WorkerSettings
from fusemycells.config import INPUT_SUBDIR, OUTPUT_SUBDIR, load_manifest
from fusemycells.files import process_file
from fusemycells.io import formats
from fusemycells.io.scan import NOT_TIFF
from fusemycells.io.volume import InputError, ReadOptions, Volume, WriteOptions
from fusemycells.pipeline import Fuser
from fusemycells.runtime.budget import BudgetPolicy

sitk = pytest.importorskip("SimpleITK")

SPACING = (2.0, 0.3, 0.25)  # z, y, x µm: all different, so an axis swap is caught
SHAPE = (7, 9, 11)  # z, y, x: all different, so a transposed array is caught
NAMES = ("mha", "mhd", "nrrd", "nii", "nii.gz")


def ramp() -> np.ndarray:
    """A ZYX uint16 stack whose every voxel is distinct (value = 1000·z + 50·y + x)."""
    z, y, x = np.indices(SHAPE)
    return (1000 * z + 50 * y + x).astype(np.uint16)


def cpu_fuser(resources: Path) -> Fuser:
    policy = BudgetPolicy(device="cpu", half=False, vram_budget_gib=None, time_budget_s=None, threads=1)
    return Fuser(load_manifest(resources), policy)


@pytest.mark.parametrize("name", NAMES)
def test_each_format_round_trips_pixels_spacing_and_channel_in_zyx_order(name: str, tmp_path: Path) -> None:
    entry = formats.get(name)
    data = ramp()
    path = tmp_path / f"case{entry.suffixes[0]}"
    entry.write(path, data, Volume(data, SPACING, "membrane"), WriteOptions())
    volume = entry.read(path, ReadOptions())
    assert volume.data.shape == SHAPE and volume.data.dtype == np.uint16
    np.testing.assert_array_equal(volume.data, data)
    assert volume.spacing == SPACING and volume.channel == "membrane" and volume.warnings == []
    assert formats.recognise(path) is entry
    assert not list(tmp_path.glob(".fmc-*"))  # the temporary folder is gone


@pytest.mark.parametrize("name", NAMES)
def test_a_file_simpleitk_wrote_reads_with_its_xyz_header_as_zyx(name: str, tmp_path: Path) -> None:
    data = ramp()
    image = sitk.GetImageFromArray(data)  # SimpleITK: array ZYX, size and spacing XYZ
    nifti = name.startswith("nii")
    scale = 1e-3 if nifti else 1.0  # NIfTI headers are in mm (ITK converts their declared unit to mm)
    image.SetSpacing([SPACING[2] * scale, SPACING[1] * scale, SPACING[0] * scale])
    path = tmp_path / f"nucleus_stack.{name}"
    sitk.WriteImage(image, str(path))
    volume = formats.get(name).read(path, ReadOptions())
    assert volume.spacing == SPACING
    assert volume.data[3, 5, 7] == image.GetPixel(7, 5, 3) == 3257  # index (x, y, z) is array [z, y, x]
    assert volume.channel == "nucleus"  # from the file name: the header says none


@pytest.mark.parametrize("name", NAMES)
def test_outputs_read_in_simpleitk_with_spacing_and_size_in_its_xyz_order(name: str, tmp_path: Path) -> None:
    entry = formats.get(name)
    path = tmp_path / f"out{entry.suffixes[0]}"
    entry.write(path, ramp(), Volume(ramp(), SPACING, "nucleus"), WriteOptions())
    image = sitk.ReadImage(str(path))
    scale = 1e-3 if name.startswith("nii") else 1.0
    assert image.GetSize() == (11, 9, 7)
    np.testing.assert_allclose(image.GetSpacing(), [0.25 * scale, 0.3 * scale, 2.0 * scale], rtol=1e-6)
    assert image.GetPixel(7, 5, 3) == 3257


def test_a_4d_image_is_refused_with_a_message_that_says_so(tmp_path: Path) -> None:
    series = sitk.JoinSeries([sitk.GetImageFromArray(ramp()), sitk.GetImageFromArray(ramp())])
    path = tmp_path / "time.nii.gz"
    sitk.WriteImage(series, str(path))
    with pytest.raises(InputError, match=r"time\.nii\.gz: 4D image .*one 3D stack is needed"):
        formats.get("nii.gz").read(path, ReadOptions())


def test_a_vector_image_is_refused_with_a_message_that_says_so(tmp_path: Path) -> None:
    rgb = sitk.GetImageFromArray(np.zeros((*SHAPE, 3), np.uint8), isVector=True)
    path = tmp_path / "rgb.mha"
    sitk.WriteImage(rgb, str(path))
    with pytest.raises(InputError, match="vector image with 3 components per pixel"):
        formats.get("mha").read(path, ReadOptions())


def test_the_memory_check_sees_the_zyx_shape_and_spacing_before_the_pixels(tmp_path: Path) -> None:
    path = tmp_path / "case.nrrd"
    formats.get("nrrd").write(path, ramp(), Volume(ramp(), SPACING, "nucleus"), WriteOptions())
    seen = []

    def refuse(shape, dtype, spacing) -> None:
        seen.append((shape, dtype, spacing))
        raise MemoryError("over budget")

    with pytest.raises(MemoryError):
        formats.get("nrrd").read(path, ReadOptions(check=refuse))
    assert seen == [(SHAPE, np.dtype(np.uint16), SPACING)]


def test_an_mha_input_gives_the_same_fused_array_as_the_same_data_in_tiff(fixture_resources: Path, tmp_path: Path) -> None:
    data = blob_volume((10, 40, 36))
    tif = write_case(tmp_path / "in", "case.tif", data.copy(), spacing=SPACING)
    mha = tmp_path / "in" / "case.mha"
    formats.get("mha").write(mha, data.copy(), Volume(data.copy(), SPACING, "nucleus"), WriteOptions())
    from_tiff = process_file(tif, tmp_path / "out", cpu_fuser(fixture_resources), "float32")
    from_mha = process_file(mha, tmp_path / "out", cpu_fuser(fixture_resources), "float32")
    assert from_tiff.status == from_mha.status == "ok" and from_mha.spacing_um == list(SPACING)
    fused_tiff = formats.get("tiff").read(tmp_path / "out" / "case.tif", ReadOptions())
    fused_mha = formats.get("mha").read(tmp_path / "out" / "case.mha", ReadOptions())
    assert fused_mha.spacing == SPACING and fused_mha.channel == "nucleus"
    assert np.abs(fused_tiff.data - 0.5).max() > 0.1  # a real fused output, not a constant
    np.testing.assert_array_equal(fused_mha.data, fused_tiff.data)


def test_inference_reads_them_only_when_asked_and_writes_each_in_its_own_format(
    fixture_resources: Path, tmp_path: Path
) -> None:
    folder = tmp_path / INPUT_SUBDIR
    write_case(folder, "a.tif", blob_volume((6, 24, 20)), spacing=SPACING)
    formats.get("nii.gz").write(folder / "b.nii.gz", blob_volume((6, 24, 20)), Volume(ramp(), SPACING, "nucleus"), WriteOptions())
    common = ["--input", str(tmp_path), "--output", str(tmp_path), "--resources", str(fixture_resources)]
    common += ["--device", "cpu", "--threads", "1", "--report", str(tmp_path / "report.json")]
    assert cli.main(common) == 0
    report = json.loads((tmp_path / "report.json").read_text())
    assert [f["file"] for f in report["files"]] == ["a.tif"]
    assert {"file": "b.nii.gz", "reason": NOT_TIFF} in report["skipped"]  # Grand Challenge: TIFF only
    assert cli.main([*common, "--all-formats"]) == 0
    report = json.loads((tmp_path / "report.json").read_text())
    assert [f["file"] for f in report["files"]] == ["a.tif", "b.nii.gz"]
    fused = formats.get("nii.gz").read(tmp_path / OUTPUT_SUBDIR / "b.nii.gz", ReadOptions())
    assert fused.data.shape == (6, 24, 20) and fused.spacing == SPACING


def test_batch_takes_them_from_a_folder_and_converts_between_formats(fixture_resources: Path, tmp_path: Path) -> None:
    formats.get("nrrd").write(tmp_path / "in" / "c.nrrd", blob_volume((6, 24, 20)), Volume(ramp(), SPACING, "membrane"), WriteOptions())
    inputs = batch.collect_inputs([tmp_path / "in"])
    assert [(p.name, kind) for p, kind in inputs] == [("c.nrrd", "nrrd")]
    [job] = batch.plan_jobs(inputs, tmp_path / "out", "mha")
    assert Path(job.output).name == "c.mha"
    fuser = batch._make_fuser(WorkerSettings(str(fixture_resources), device="cpu", threads=1))
    entry = batch.run_job(job, fuser=fuser)
    assert entry["status"] == "ok" and entry["channel"] == "membrane"
    fused = formats.get("mha").read(Path(job.output), ReadOptions())
    assert fused.spacing == SPACING and fused.channel == "membrane" and fused.data.shape == (6, 24, 20)


def test_without_simpleitk_such_a_file_is_refused_with_the_install_named(
    fixture_resources: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "in" / "case.mha"
    formats.get("mha").write(path, ramp(), Volume(ramp(), SPACING, "nucleus"), WriteOptions())
    monkeypatch.setitem(sys.modules, "SimpleITK", None)  # import SimpleITK now raises ImportError
    report = process_file(path, tmp_path / "out", cpu_fuser(fixture_resources), "float32")
    assert report.status == "refused" and "needs SimpleITK: pip install -r requirements-scale.txt" in report.error
    assert not (tmp_path / "out" / "case.mha").exists()


def test_an_output_that_reads_back_wrong_raises_and_leaves_no_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write = sitk.WriteImage
    monkeypatch.setattr(sitk, "WriteImage", lambda image, name: write(image[:, :, :3], name))  # a truncated stack
    path = tmp_path / "case.nrrd"
    with pytest.raises(OSError, match=r"case\.nrrd reads back as size \(11, 9, 3\)"):
        formats.get("nrrd").write(path, ramp(), Volume(ramp(), SPACING, "nucleus"), WriteOptions())
    assert list(tmp_path.iterdir()) == []  # neither the output nor the temporary folder
