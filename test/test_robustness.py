"""Robustness: strange inputs, faults and safety (issue 7), one test per case, plus a fuzz test.

"Processed" = an output with the input's shape is written and a warning is in the report;
"refused" = no output for that file, a one-line error naming it, other files still written,
exit code 1. Runs call ``cli.main`` in-process (fast) except the sandboxed safety test,
which runs the real entry point in a subprocess.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tifffile
from conftest import REPO, blob_volume, write_case
from reference import percentile_normalise
from sandbox import SANDBOX

from fusemycells import cli
from fusemycells.backends import LoadedStage, load_stage
from fusemycells.config import INPUT_SUBDIR, OUTPUT_SUBDIR, load_manifest, sha256_of
from fusemycells.io.tiff import DEFAULT_SPACING_ZYX_UM, Volume, write_volume
from fusemycells.ops import Ops
from fusemycells.pipeline import Fuser
from fusemycells.postprocess import FLOAT16_MAX, blend_slabs
from fusemycells.runtime.budget import BudgetPolicy
from fusemycells.sources import ArraySource


def run(root: Path, resources: Path, *extra: str) -> tuple[int, dict[str, Any]]:
    """inference.main on ROOT (input and output root); returns (exit code, report). The output is float32 unless
    ``extra`` says otherwise: these tests check the pipeline's values (finite, in range), which the default uint16
    would hide behind its rounding (the default itself: test_device_faults, test_inference_cli)."""
    report = root / "report.json"
    dtype = [] if "--output-dtype" in extra else ["--output-dtype", "float32"]
    code = cli.main(["--input", str(root), "--output", str(root), "--resources", str(resources), "--device", "cpu", "--threads", "1", "--report", str(report), *dtype, *extra])
    return code, json.loads(report.read_text())


def inputs(root: Path) -> Path:
    folder = root / INPUT_SUBDIR
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def case_report(report: dict[str, Any], name: str) -> dict[str, Any]:
    return next(f for f in report["files"] if f["file"] == name)


def output_of(root: Path, name: str) -> np.ndarray:
    return tifffile.imread(root / OUTPUT_SUBDIR / name)


def assert_processed(root: Path, report: dict[str, Any], name: str, shape: tuple[int, ...], warned: bool = True, log: str | None = None) -> dict[str, Any]:
    """The file was written as finite float32 in its input shape; with ``warned`` (the issue's
    "processed" cases) its report also holds a warning, and every one is in ``log`` when given.
    ``warned=False`` for control files."""
    entry = case_report(report, name)
    assert entry["status"] == "ok", entry["error"]
    if warned:
        assert entry["warnings"], f"{name}: processed without a warning in the report"
    if log is not None:
        assert [w for w in entry["warnings"] if w not in log] == [], f"{name}: warnings reported but not logged"
    out = output_of(root, name)
    assert out.shape == shape
    assert out.dtype == np.float32  # asked for by run()
    assert np.isfinite(out).all()
    return entry


def assert_refused(root: Path, report: dict[str, Any], name: str, reason: str) -> None:
    entry = case_report(report, name)
    assert entry["status"] == "refused"
    assert name in entry["error"] and reason in entry["error"]
    assert "\n" not in entry["error"]
    assert not (root / OUTPUT_SUBDIR / name).exists()


# 1 ----------------------------------------------------------------------------------------------
def test_tiff_without_metadata_uses_resolution_tags_then_defaults(fixture_resources: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    folder = inputs(tmp_path)
    data = blob_volume((6, 24, 24))
    tifffile.imwrite(folder / "tags.tif", data, metadata=None, resolution=(1 / 0.25, 1 / 0.25), resolutionunit="MICROMETER")
    tifffile.imwrite(folder / "bare.tif", data, metadata=None)
    code, report = run(tmp_path, fixture_resources)
    assert code == 0
    tags = assert_processed(tmp_path, report, "tags.tif", data.shape, log=caplog.text)
    assert tags["spacing_um"][1:] == pytest.approx([0.25, 0.25])
    assert any("resolution tag" in w for w in tags["warnings"])
    bare = assert_processed(tmp_path, report, "bare.tif", data.shape, log=caplog.text)
    assert bare["spacing_um"] == pytest.approx(list(DEFAULT_SPACING_ZYX_UM))
    assert any("default" in w for w in bare["warnings"])


# 2 ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("keys", [("physicalsizez", "physicalsizey", "physicalsizex"), ("physical_size_z", "physical_size_y", "physical_size_x")])
def test_lower_and_snake_case_metadata_keys_are_honoured(fixture_resources: Path, tmp_path: Path, keys: tuple[str, str, str]) -> None:
    data = blob_volume((6, 24, 24))
    meta = dict(zip(keys, (2.5, 0.3, 0.2))) | {"channel": "membrane"}
    tifffile.imwrite(inputs(tmp_path) / "keys.tif", data, metadata=meta)
    code, report = run(tmp_path, fixture_resources)
    assert code == 0
    entry = assert_processed(tmp_path, report, "keys.tif", data.shape, warned=False)  # honoured, not a fallback
    assert entry["spacing_um"] == pytest.approx([2.5, 0.3, 0.2])
    assert entry["channel"] == "membrane"


# 3 ----------------------------------------------------------------------------------------------
def test_2d_and_singleton_axes_are_squeezed_and_written_in_the_input_shape(fixture_resources: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    folder = inputs(tmp_path)
    image_2d = blob_volume((1, 30, 28))[0]
    stack_5d = blob_volume((5, 20, 22))[None, :, None]
    tifffile.imwrite(folder / "flat.tif", image_2d)
    tifffile.imwrite(folder / "five_d.tif", stack_5d)
    code, report = run(tmp_path, fixture_resources)
    assert code == 0
    for name, shape in (("flat.tif", image_2d.shape), ("five_d.tif", stack_5d.shape)):
        entry = assert_processed(tmp_path, report, name, shape, log=caplog.text)
        assert any("read as ZYX" in w for w in entry["warnings"])


def test_4d_stacks_with_singleton_channel_or_time_axes_are_processed_in_their_shape(fixture_resources: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    folder = inputs(tmp_path)
    stack = blob_volume((5, 20, 22))
    cases = {"zcyx_c1.tif": (stack[:, None], "ZCYX"), "tzyx_t1.tif": (stack[None], "TZYX")}
    for name, (data, axes) in cases.items():
        tifffile.imwrite(folder / name, data, photometric="minisblack", metadata={"axes": axes, "PhysicalSizeZ": 1.0, "PhysicalSizeY": 0.39, "PhysicalSizeX": 0.39, "channel": "nucleus"})
    code, report = run(tmp_path, fixture_resources)
    assert code == 0
    for name, (data, _) in cases.items():
        entry = assert_processed(tmp_path, report, name, data.shape, log=caplog.text)
        assert entry["shape"] == [5, 20, 22]
        assert any("read as ZYX" in w for w in entry["warnings"])


def test_real_extra_channels_samples_or_time_points_are_refused(fixture_resources: Path, tmp_path: Path) -> None:
    folder = inputs(tmp_path)
    stack = blob_volume((4, 16, 16))
    tifffile.imwrite(folder / "two_channels.tif", np.stack([stack] * 2, axis=1))
    refused = {  # name: (array, axes written, reason in the error)
        "cyx.tif": (stack[:2], "CYX", "(C=2)"),
        "zcyx_z1.tif": (np.stack([stack[0]] * 2)[None], "ZCYX", "(C=2)"),
        "tzyx_z1.tif": (stack[:3, None], "TZYX", "(T=3)"),
        "czyx.tif": (stack[:2, None], "CZYX", "(C=2)"),
    }
    for name, (data, axes, _) in refused.items():
        tifffile.imwrite(folder / name, data, photometric="minisblack", metadata={"axes": axes})
    rgb = np.stack([blob_volume((1, 30, 28))[0].astype(np.uint8)] * 3, axis=-1)  # (30, 28, 3): tifffile stores RGB
    tifffile.imwrite(folder / "rgb.tif", rgb)
    write_case(folder, "good.tif", stack)
    code, report = run(tmp_path, fixture_resources)
    assert code == 1
    assert_refused(tmp_path, report, "two_channels.tif", "extra channels or time points")
    for name, (_, axes, reason) in refused.items():
        assert_refused(tmp_path, report, name, reason)
        assert f"axes '{axes}'" in case_report(report, name)["error"]
    assert_refused(tmp_path, report, "rgb.tif", "(S=3)")
    assert "RGB samples" in case_report(report, "rgb.tif")["error"]
    assert_processed(tmp_path, report, "good.tif", (4, 16, 16), warned=False)


# 4 ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", ["uint8", "int16", "float32", "float64"])
def test_other_pixel_types_are_processed_to_float32(fixture_resources: Path, tmp_path: Path, dtype: str, caplog: pytest.LogCaptureFixture) -> None:
    base = blob_volume((5, 20, 20)).astype(np.float64)
    if dtype == "uint8":
        data = (base / base.max() * 255).astype(np.uint8)
    elif dtype == "int16":
        data = (base - 1000).astype(np.int16)  # negative values too
    else:
        data = (base / 1000.0).astype(dtype)
    write_case(inputs(tmp_path), "typed.tif", data)
    code, report = run(tmp_path, fixture_resources)
    assert code == 0
    entry = assert_processed(tmp_path, report, "typed.tif", data.shape, log=caplog.text)
    assert entry["input_dtype"] == dtype and entry["output_dtype"] == "float32"
    assert f"input dtype {dtype} converted; output float32" in entry["warnings"]


# 5 ----------------------------------------------------------------------------------------------
def test_non_finite_voxels_are_replaced_and_counted(fixture_resources: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    data = blob_volume((5, 20, 20)).astype(np.float32)
    data[0, 0, :3] = np.nan
    data[1, 1, :2] = np.inf
    data[2, 2, 0] = -np.inf
    write_case(inputs(tmp_path), "nan.tif", data)
    code, report = run(tmp_path, fixture_resources)
    assert code == 0
    entry = assert_processed(tmp_path, report, "nan.tif", data.shape, log=caplog.text)
    assert entry["non_finite_replaced"] == 6
    assert any("non-finite" in w for w in entry["warnings"])


# 6 ----------------------------------------------------------------------------------------------
def test_constant_and_all_zero_images_give_finite_outputs(fixture_resources: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    folder = inputs(tmp_path)
    write_case(folder, "constant.tif", np.full((5, 20, 20), 700, np.uint16))
    write_case(folder, "zeros.tif", np.zeros((5, 20, 20), np.uint16))
    code, report = run(tmp_path, fixture_resources)
    assert code == 0
    for name, kind in (("constant.tif", "constant (every voxel 700) image"), ("zeros.tif", "all-zero image")):
        entry = assert_processed(tmp_path, report, name, (5, 20, 20), log=caplog.text)  # asserts finite values
        assert any(w.startswith(kind) for w in entry["warnings"])


# 7 ----------------------------------------------------------------------------------------------
def test_volumes_smaller_than_a_patch_and_single_slices_are_processed(fixture_resources: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    folder = inputs(tmp_path)
    write_case(folder, "tiny.tif", blob_volume((2, 7, 5)), spacing=(0.5, 0.5, 0.5))  # patch is 16³ on H
    write_case(folder, "one_slice.tif", blob_volume((1, 40, 36)))
    code, report = run(tmp_path, fixture_resources)
    assert code == 0
    tiny = assert_processed(tmp_path, report, "tiny.tif", (2, 7, 5), log=caplog.text)
    assert any("smaller than one (16, 16, 16) patch" in w for w in tiny["warnings"])
    one = assert_processed(tmp_path, report, "one_slice.tif", (1, 40, 36), log=caplog.text)
    assert any(w.startswith("single slice") for w in one["warnings"])


# 8 ----------------------------------------------------------------------------------------------
def test_extreme_anisotropy_is_processed(fixture_resources: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    write_case(inputs(tmp_path), "aniso.tif", blob_volume((4, 32, 32)), spacing=(4.0, 0.4, 0.4))
    code, report = run(tmp_path, fixture_resources)
    assert code == 0
    entry = assert_processed(tmp_path, report, "aniso.tif", (4, 32, 32), log=caplog.text)
    assert entry["high_res_grid"] == [27, 21, 21]
    assert any(w.startswith("extreme anisotropy: Z spacing 4 µm is 10.0× the XY spacing") for w in entry["warnings"])


@pytest.mark.parametrize("declared", [0.0, -1.0, 1e-5, 500.0])
def test_implausible_declared_spacing_is_ignored_with_a_warning(fixture_resources: Path, tmp_path: Path, declared: float, caplog: pytest.LogCaptureFixture) -> None:
    tifffile.imwrite(inputs(tmp_path) / "odd.tif", blob_volume((5, 20, 20)), metadata={"PhysicalSizeX": 0.3, "PhysicalSizeY": 0.3, "PhysicalSizeZ": declared, "channel": "nucleus"})
    code, report = run(tmp_path, fixture_resources)
    assert code == 0
    entry = assert_processed(tmp_path, report, "odd.tif", (5, 20, 20), log=caplog.text)
    assert entry["spacing_um"] == pytest.approx([DEFAULT_SPACING_ZYX_UM[0], 0.3, 0.3])
    assert any("not a plausible spacing" in w for w in entry["warnings"])


# 9 ----------------------------------------------------------------------------------------------
def test_corrupt_non_tiff_and_empty_files_are_refused_and_the_good_one_written(fixture_resources: Path, tmp_path: Path) -> None:
    folder = inputs(tmp_path)
    good = write_case(folder, "good.tif", blob_volume((5, 20, 20)))
    (folder / "truncated.tif").write_bytes(good.read_bytes()[:600])
    (folder / "text.tif").write_text("this is not an image")
    (folder / "empty.tiff").write_bytes(b"")
    code, report = run(tmp_path, fixture_resources)
    assert code == 1
    for name in ("truncated.tif", "text.tif", "empty.tiff"):
        assert_refused(tmp_path, report, name, "not a readable TIFF")
    assert_processed(tmp_path, report, "good.tif", (5, 20, 20), warned=False)
    assert sorted(report["refused"]) == ["empty.tiff", "text.tif", "truncated.tif"]


# 10 ---------------------------------------------------------------------------------------------
def test_stack_over_the_memory_budget_is_refused_before_its_pixels_are_loaded(fixture_resources: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_case(inputs(tmp_path), "big.tif", blob_volume((8, 64, 64)))

    def no_loading(*args: object, **kwargs: object) -> None:
        raise AssertionError("pixels were loaded although the file is over budget")

    monkeypatch.setattr(tifffile.TiffPageSeries, "asarray", no_loading)
    code, report = run(tmp_path, fixture_resources, "--ram-budget", "0.0001")
    assert code == 1
    assert_refused(tmp_path, report, "big.tif", "over the RAM budget")


# 11 ---------------------------------------------------------------------------------------------
def test_missing_input_folder_is_a_clear_error_and_nothing_is_written(fixture_resources: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    code = cli.main(["--input", str(tmp_path / "nowhere"), "--output", str(out), "--resources", str(fixture_resources)])
    assert code == 2
    assert not out.exists()


# 12 ---------------------------------------------------------------------------------------------
def test_missing_output_folder_is_created(fixture_resources: Path, tmp_path: Path) -> None:
    write_case(inputs(tmp_path), "case.tif", blob_volume((5, 20, 20)))
    out_root = tmp_path / "new" / "deeper"
    code = cli.main(["--input", str(tmp_path), "--output", str(out_root), "--resources", str(fixture_resources), "--device", "cpu"])
    assert code == 0
    assert (out_root / OUTPUT_SUBDIR / "case.tif").is_file()


def test_unwritable_output_folder_is_a_clear_error(fixture_resources: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    write_case(inputs(tmp_path), "case.tif", blob_volume((5, 20, 20)))
    blocker = tmp_path / "a_file"
    blocker.write_text("an output root that is a file cannot hold folders")
    code = cli.main(["--input", str(tmp_path), "--output", str(blocker), "--resources", str(fixture_resources), "--device", "cpu"])
    assert code == 2
    assert "output folder not writable" in caplog.text


# 13 ---------------------------------------------------------------------------------------------
def test_one_bad_file_of_two_does_not_lose_the_good_one(fixture_resources: Path, tmp_path: Path) -> None:
    folder = inputs(tmp_path)
    write_case(folder, "a_good.tif", blob_volume((5, 20, 20)))
    tifffile.imwrite(folder / "b_bad.tif", np.zeros((2, 3, 4, 16, 16), np.uint16))  # time × channels
    code, report = run(tmp_path, fixture_resources)
    assert code == 1
    assert_processed(tmp_path, report, "a_good.tif", (5, 20, 20), warned=False)
    assert_refused(tmp_path, report, "b_bad.tif", "non-singleton axes")


# 14 ---------------------------------------------------------------------------------------------
def _copy_resources(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _rewrite_checksum(resources: Path, file_name: str) -> None:
    manifest_path = resources / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    for channel in manifest["channels"].values():
        for stage in ("global_stage", "patch_stage"):
            for entry in channel[stage]["files"].values():
                if entry["path"] == file_name:
                    entry["sha256"] = sha256_of(resources / file_name)
    manifest_path.write_text(json.dumps(manifest))


def _onnx_files(resources: Path) -> list[str]:
    manifest = json.loads((resources / "manifest.json").read_text())
    return sorted({e["files"]["onnx"]["path"] for ch in manifest["channels"].values() for e in (ch["global_stage"], ch["patch_stage"])})


def test_corrupt_onnx_with_a_valid_checksum_falls_back_to_torchscript(fixture_resources: Path, tmp_path: Path) -> None:
    resources = _copy_resources(fixture_resources, tmp_path / "res")
    for name in _onnx_files(resources):
        (resources / name).write_bytes(b"not an onnx model")
        _rewrite_checksum(resources, name)
    write_case(inputs(tmp_path), "case.tif", blob_volume((5, 20, 20)))
    code, report = run(tmp_path, resources)  # auto backend prefers ONNX on CPU
    assert code == 0
    stages = case_report(report, "case.tif")["stages"]
    assert stages["global"]["backend"] == stages["patch"]["backend"] == "torchscript"


@pytest.mark.parametrize("fault", ["missing", "checksum"])
def test_missing_or_tampered_onnx_falls_back_to_torchscript_and_the_file_is_written(fixture_resources: Path, tmp_path: Path, fault: str) -> None:
    resources = _copy_resources(fixture_resources, tmp_path / "res")
    for name in _onnx_files(resources):
        path = resources / name
        if fault == "missing":
            path.unlink()
        else:
            path.write_bytes(path.read_bytes() + b"tampered")  # checksum no longer matches
    write_case(inputs(tmp_path), "case.tif", blob_volume((5, 20, 20)))
    code, report = run(tmp_path, resources)  # auto backend prefers ONNX on CPU
    assert code == 0
    assert_processed(tmp_path, report, "case.tif", (5, 20, 20), warned=False)
    stages = case_report(report, "case.tif")["stages"]
    assert stages["global"]["backend"] == stages["patch"]["backend"] == "torchscript"
    assert stages["global"]["file"].endswith(".pt") and stages["patch"]["file"].endswith(".pt")


def test_compact_float16_blend_clips_to_the_float16_range_instead_of_inf() -> None:
    data = np.full((4, 8, 8), 100, np.uint16)
    data[1, 2, 3] = 65535
    x_in = ArraySource(data, offset=100.0, scale=2.0)  # a percentile span of 0.5: 65535 → 130870
    correction = np.zeros((6, 10, 10), np.float16)  # on a finer grid H
    weight = np.full((4, 4, 4), 0.5, np.float32)
    out = blend_slabs(data, x_in, correction, weight, compact=True, ops=Ops("cpu", threads=2)).array
    assert out.dtype == np.float16 and np.shares_memory(out, data)  # the compact in-place path
    assert np.isfinite(out).all()
    assert out[1, 2, 3] == FLOAT16_MAX and out[0, 0, 0] == 0.0


class _DeviceOomRunner:
    backend, provider, device, precision = "onnx", "CUDA", "cuda", "fp32"

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")


def test_global_stage_rerun_on_cpu_after_device_oom_is_reported_as_cpu(fixture_resources: Path) -> None:
    manifest = load_manifest(fixture_resources)

    def loader(manifest, spec, backend, device, **options) -> LoadedStage:  # the global stage runs out of device memory
        loaded = load_stage(manifest, spec, backend, "cpu", threads=1)
        if device == "cuda" and spec.grid is not None:
            return replace(loaded, runner=_DeviceOomRunner(), file="device_" + loaded.file)
        return loaded

    policy = BudgetPolicy(device="cuda", half=False, vram_budget_gib=None, time_budget_s=None, threads=1)
    fuser = Fuser(manifest, policy, loader=loader)
    report = fuser.fuse(blob_volume((6, 24, 24)), (1.0, 0.39, 0.39), "nucleus").report
    cpu_global = load_stage(manifest, manifest.channel("nucleus").global_stage, "auto", "cpu", threads=1)
    expected = {"file": cpu_global.file, "backend": cpu_global.runner.backend, "provider": "CPU", "precision": "fp32"}
    assert report.stages["global"] == expected
    assert any("out of memory in the global stage" in e for e in policy.events)


@pytest.mark.parametrize("fault", ["missing", "checksum"])
def test_broken_weights_in_both_formats_are_a_clear_error_never_random_weights_and_the_identity_is_written(fixture_resources: Path, tmp_path: Path, fault: str) -> None:
    resources = _copy_resources(fixture_resources, tmp_path / "res")
    manifest = json.loads((resources / "manifest.json").read_text())
    stage_files = manifest["channels"]["nucleus"]["global_stage"]["files"]
    for entry in stage_files.values():
        path = resources / entry["path"]
        if fault == "missing":
            path.unlink()
        else:
            path.write_bytes(path.read_bytes() + b"tampered")
    write_case(inputs(tmp_path), "case.tif", blob_volume((5, 20, 20)))
    code, report = run(tmp_path, resources)
    # never random weights: the error names both files, and the file gets the identity output (the
    # normalised input; issue #25: a readable input is never left without an output on GC)
    entry = case_report(report, "case.tif")
    assert code == 0 and entry["status"] == "fallback_identity"
    assert all(e["path"] in entry["error"] for e in stage_files.values())
    written = tifffile.imread(tmp_path / OUTPUT_SUBDIR / "case.tif")
    np.testing.assert_allclose(written, percentile_normalise(blob_volume((5, 20, 20)), 2.0, 99.8), atol=1e-5)


# 15 ---------------------------------------------------------------------------------------------
def _tree_hashes(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_no_network_no_writes_outside_output_and_tmp_and_inputs_unchanged(fixture_resources: Path, tmp_path: Path) -> None:
    in_root, out_root, tmp_dir, site, home = (tmp_path / n for n in ("in", "out", "tmp", "site", "home"))
    for folder in (tmp_dir, site, home):
        folder.mkdir()
    (site / "sitecustomize.py").write_text(SANDBOX)
    folder = inputs(in_root)
    write_case(folder, "a.tif", blob_volume((5, 20, 20)))
    write_case(folder, "b.tif", blob_volume((4, 24, 20), seed=3), channel="membrane")
    before = _tree_hashes(in_root)
    # native code (onnxruntime's telemetry) writes past the audit hooks: an empty HOME (and the XDG
    # folders under it) shows such writes. It stays writable: a read-only HOME would hide failed writes
    # from this check for a non-root user (and is not read-only for root anyway).
    env = {k: v for k, v in os.environ.items() if not k.startswith(("XDG_", "ORT_"))}
    env |= {"PYTHONPATH": str(site), "SANDBOX_WRITABLE": os.pathsep.join([str(out_root), str(tmp_dir)]), "TMPDIR": str(tmp_dir), "OMP_NUM_THREADS": "1", "HOME": str(home)}
    cmd = [sys.executable, str(REPO / "inference.py"), "--input", str(in_root), "--output", str(out_root), "--resources", str(fixture_resources), "--device", "cpu", "--threads", "1"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180, env=env, cwd=str(tmp_dir))
    assert "SANDBOX VIOLATIONS" not in proc.stderr, proc.stderr[-3000:]
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(p.name for p in (out_root / OUTPUT_SUBDIR).iterdir()) == ["a.tif", "b.tif"]
    assert _tree_hashes(in_root) == before
    assert sorted(str(p.relative_to(home)) for p in home.rglob("*")) == [], "written under HOME"


def test_sandbox_catches_a_write_outside_the_allowed_folders(tmp_path: Path) -> None:
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(SANDBOX)
    env = {**os.environ, "PYTHONPATH": str(site), "SANDBOX_WRITABLE": str(tmp_path / "allowed")}
    proc = subprocess.run([sys.executable, "-c", f"open({str(tmp_path / 'elsewhere.txt')!r}, 'w')"], capture_output=True, text=True, env=env, timeout=60)
    assert proc.returncode != 0 and "SANDBOX VIOLATIONS" in proc.stderr
    assert not (tmp_path / "elsewhere.txt").exists()


# issue 19: wrong output reported as ok -----------------------------------------------------------
@pytest.mark.parametrize("shape", [(10, 36, 1), (12, 2, 1)])
def test_stacks_whose_last_axis_is_1_are_written_as_computed(identity_resources: Path, tmp_path: Path, shape: tuple[int, int, int]) -> None:
    data = blob_volume((shape[0], shape[1], 8), seed=4)[:, :, :1].copy()
    write_case(inputs(tmp_path), "thin.tif", data, spacing=(2.0, 0.3, 0.3))
    code, report = run(tmp_path, identity_resources)
    assert code == 0
    assert_processed(tmp_path, report, "thin.tif", shape, warned=False)
    # the identity patch model leaves the normalised input: every row must survive the writer
    np.testing.assert_allclose(output_of(tmp_path, "thin.tif"), percentile_normalise(data, 2.0, 99.8), atol=1e-5)


# issue 19: inputs real users have ----------------------------------------------------------------
def test_compressed_and_ome_inputs_are_processed_with_their_metadata(fixture_resources: Path, tmp_path: Path) -> None:
    folder = inputs(tmp_path)
    data = blob_volume((5, 20, 20))
    meta = {"PhysicalSizeZ": 2.0, "PhysicalSizeY": 0.3, "PhysicalSizeX": 0.25, "channel": "membrane"}
    for compression in ("lzw", "zstd", "zlib"):
        tifffile.imwrite(folder / f"{compression}.tif", data, compression=compression, metadata=meta)
    ome = {"axes": "ZYX", "PhysicalSizeZ": 2000, "PhysicalSizeZUnit": "nm", "PhysicalSizeY": 0.3, "PhysicalSizeX": 0.25, "Channel": {"Name": "membrane"}}
    tifffile.imwrite(folder / "ome.ome.tif", data, ome=True, compression="zlib", metadata=ome)
    code, report = run(tmp_path, fixture_resources)
    assert code == 0, [f["error"] for f in report["files"]]
    for name in ("lzw.tif", "zstd.tif", "zlib.tif", "ome.ome.tif"):
        entry = assert_processed(tmp_path, report, name, data.shape, warned=False)
        assert entry["spacing_um"] == pytest.approx([2.0, 0.3, 0.25]) and entry["channel"] == "membrane"


def test_malformed_json_and_thumbnail_files_are_processed_with_a_warning(fixture_resources: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    folder = inputs(tmp_path)
    data = blob_volume((5, 20, 20))
    tifffile.imwrite(folder / "truncated_json.tif", data, description='{"shape": [5, 20, 20], "PhysicalSi', metadata=None)
    with tifffile.TiffWriter(folder / "thumbnail.tif") as tif:
        tif.write(np.zeros((16, 16), np.uint8))
        tif.write(data, metadata={"channel": "nucleus"})
    code, report = run(tmp_path, fixture_resources)
    assert code == 0
    entry = assert_processed(tmp_path, report, "truncated_json.tif", data.shape, log=caplog.text)
    assert any("malformed JSON" in w for w in entry["warnings"])
    entry = assert_processed(tmp_path, report, "thumbnail.tif", data.shape, log=caplog.text)
    assert any("ignored series 0 (16, 16)" in w for w in entry["warnings"])


# issue 19: CLI values ----------------------------------------------------------------------------
@pytest.mark.parametrize(
    "option, value", [("--ram-budget", "inf"), ("--ram-budget", "nan"), ("--ram-budget", "-1"), ("--vram-budget", "0"), ("--time-budget", "nan"), ("--time-budget", "-5"), ("--threads", "0")]
)
def test_invalid_budget_values_exit_2_before_any_work(fixture_resources: Path, tmp_path: Path, option: str, value: str, capsys: pytest.CaptureFixture[str]) -> None:
    write_case(inputs(tmp_path), "case.tif", blob_volume((5, 20, 20)))
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--input", str(tmp_path), "--output", str(out), "--resources", str(fixture_resources), "--device", "cpu", option, value])
    assert exit_info.value.code == 2
    assert f"argument {option}" in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.parametrize("where", ["under_a_file", "a_folder"])
def test_unwritable_report_path_exits_2_before_any_work(fixture_resources: Path, tmp_path: Path, where: str, caplog: pytest.LogCaptureFixture) -> None:
    write_case(inputs(tmp_path), "case.tif", blob_volume((5, 20, 20)))
    blocker = tmp_path / "blocker"
    blocker.write_text("a file cannot hold a report folder")
    report = blocker / "report.json" if where == "under_a_file" else tmp_path
    out = tmp_path / "out"
    code = cli.main(["--input", str(tmp_path), "--output", str(out), "--resources", str(fixture_resources), "--device", "cpu", "--report", str(report)])
    assert code == 2
    assert "--report" in caplog.text
    assert not out.exists()


# issue 19: files and the file system -------------------------------------------------------------
def test_skipped_entries_are_logged_and_in_the_report(fixture_resources: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    folder = inputs(tmp_path)
    write_case(folder, "good.tif", blob_volume((5, 20, 20)))
    (folder / "gone.tif").symlink_to(tmp_path / "nowhere.tif")
    os.mkfifo(folder / "pipe.tif")
    (folder / "y.tif").mkdir()
    (folder / ".tif").write_bytes(b"II*\x00")
    code, report = run(tmp_path, fixture_resources)
    assert code == 0
    assert_processed(tmp_path, report, "good.tif", (5, 20, 20), warned=False)
    assert [entry["file"] for entry in report["skipped"]] == [".tif", "gone.tif", "pipe.tif", "y.tif"]
    for entry in report["skipped"]:
        assert f"skipped {entry['file']!r}: {entry['reason']}" in caplog.text


def test_input_name_at_the_file_system_limit_is_written(fixture_resources: Path, tmp_path: Path) -> None:
    name = "n" * 251 + ".tif"  # 255 bytes, like its input; the old temporary name overflowed after all the compute
    write_case(inputs(tmp_path), name, blob_volume((5, 20, 20)))
    code, report = run(tmp_path, fixture_resources)
    assert code == 0
    assert_processed(tmp_path, report, name, (5, 20, 20), warned=False)
    assert [p.name for p in (tmp_path / OUTPUT_SUBDIR).iterdir()] == [name]


class _SigtermSource(ArraySource):
    """A plane source that sends SIGTERM to its own process after its first slab (as a job runner would)."""

    def planes(self, z0: int, z1: int) -> np.ndarray:
        if z0 > 0:
            os.kill(os.getpid(), signal.SIGTERM)
        return super().planes(z0, z1)


def test_sigterm_while_writing_removes_the_temporary_file(tmp_path: Path) -> None:
    data = blob_volume((24, 20, 20))
    with cli.sigterm_raises(), pytest.raises(cli.Terminated):
        write_volume(tmp_path / "out.tif", _SigtermSource(data), Volume(data=data, spacing=(1.0, 0.4, 0.4), channel="nucleus"))
    assert list(tmp_path.iterdir()) == []
    assert signal.getsignal(signal.SIGTERM) is not None  # the previous handler is back


# fuzz -------------------------------------------------------------------------------------------
def test_random_shapes_spacings_and_dtypes_always_give_finite_outputs_of_the_input_shape(fixture_resources: Path, tmp_path: Path) -> None:
    rng = np.random.default_rng(2025)
    folder = inputs(tmp_path)
    expected = {}
    for i in range(14):
        shape = (int(rng.integers(1, 10)), int(rng.integers(1, 48)), int(rng.integers(1, 48)))
        spacing = (float(rng.uniform(0.2, 5.0)), *(2 * [float(rng.uniform(0.1, 1.0))]))
        dtype = rng.choice(["uint8", "uint16", "int16", "float32", "float64"])
        kind = rng.choice(["noise", "constant", "sparse"])
        if kind == "noise":
            data = rng.gamma(2.0, 300.0, size=shape)
        elif kind == "constant":
            data = np.full(shape, float(rng.uniform(0, 200)))
        else:
            data = np.zeros(shape)
            data.flat[rng.integers(0, data.size, size=max(1, data.size // 50))] = 250
        if np.dtype(dtype).kind == "f" and rng.random() < 0.3:
            data.flat[0] = np.nan
        data = data.astype(dtype)
        name = f"fuzz_{i:02d}.tif"
        write_case(folder, name, data, spacing=spacing, channel=str(rng.choice(["nucleus", "membrane"])))
        expected[name] = shape
    code, report = run(tmp_path, fixture_resources)
    assert code == 0, [f["error"] for f in report["files"] if f["status"] != "ok"]
    for name, shape in expected.items():
        assert_processed(tmp_path, report, name, shape, warned=False)  # random cases: not all need a warning


# issue 27: interruptions, the file system, what is not an input --------------------------------
def test_files_that_are_not_tiffs_are_listed_as_skipped_with_one_info_line(fixture_resources: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    folder = inputs(tmp_path)
    write_case(folder, "good.tif", blob_volume((5, 20, 20)))
    (folder / "notes.txt").write_text("not an image")
    with caplog.at_level("INFO", logger="fusemycells"):
        code, report = run(tmp_path, fixture_resources)
    assert code == 0
    assert report["skipped"] == [{"file": "notes.txt", "reason": "not a .tif/.tiff file"}] and report["counts"]["skipped"] == 1
    lines = [r for r in caplog.records if "notes.txt" in r.getMessage()]
    assert [(r.levelname, r.getMessage()) for r in lines] == [("INFO", "skipped 'notes.txt': not a .tif/.tiff file")]


def test_an_existing_output_is_replaced_with_one_info_line(fixture_resources: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    write_case(inputs(tmp_path), "case.tif", blob_volume((5, 20, 20)))
    assert run(tmp_path, fixture_resources)[0] == 0
    first = output_of(tmp_path, "case.tif")
    with caplog.at_level("INFO", logger="fusemycells"):
        assert run(tmp_path, fixture_resources)[0] == 0  # Grand Challenge reruns overwrite: still allowed
    np.testing.assert_array_equal(output_of(tmp_path, "case.tif"), first)
    lines = [r for r in caplog.records if "replaced the existing output" in r.getMessage()]
    assert len(lines) == 1 and lines[0].levelname == "INFO" and "case.tif" in lines[0].getMessage()


def test_a_symlink_to_a_text_file_is_refused_without_quoting_its_contents(fixture_resources: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    secret = tmp_path / "secret.txt"
    secret.write_text("root:x:0:0:root:/root:/bin/bash\n")
    (inputs(tmp_path) / "x.tif").symlink_to(secret)
    code, report = run(tmp_path, fixture_resources)
    assert code == 1
    assert_refused(tmp_path, report, "x.tif", "not a TIFF: bad magic")
    assert "root" not in json.dumps(report["files"]) and "root" not in caplog.text


def _mount_tmpfs(folder: Path, size: str) -> bool:
    folder.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)], capture_output=True).returncode == 0


def test_a_full_disk_is_named_with_the_space_needed_and_free(fixture_resources: Path, tmp_path: Path) -> None:
    write_case(inputs(tmp_path), "big.tif", blob_volume((16, 96, 96)))  # 576 KiB of float32 output
    out_root = tmp_path / "out"
    if not _mount_tmpfs(out_root, "256k"):
        pytest.skip("cannot mount a tmpfs here (not root); test_io injects ENOSPC instead")
    try:
        report_path = tmp_path / "report.json"
        code = cli.main(["--input", str(tmp_path), "--output", str(out_root), "--resources", str(fixture_resources), "--device", "cpu", "--threads", "1", "--output-dtype", "float32", "--report", str(report_path)])
        report = json.loads(report_path.read_text())
        leftovers = [p.name for p in (out_root / OUTPUT_SUBDIR).iterdir()]
    finally:
        subprocess.run(["umount", str(out_root)], check=True)
    assert code == 1
    [entry] = report["files"]
    assert entry["status"] == "refused" and "no space left on device (needed ≈ 0.6 MB, free " in entry["error"], entry["error"]
    assert "requested and" not in entry["error"] and leftovers == []  # no raw OSError, no partial file
