"""End-to-end runs of ``inference.py`` as the container runs it (subprocess, fixture networks)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tifffile
from conftest import REPO, blob_volume, write_case

import inference
from fusemycells.config import INPUT_SUBDIR, OUTPUT_SUBDIR
from fusemycells.io import read_volume
from fusemycells.reference import percentile_normalise

STAGE_SECONDS = ("preprocess", "global_stage", "patch_stage", "postprocess", "write", "total")


def run_cli(
    root: Path, resources: Path, *extra: str, output: Path | None = None
) -> tuple[subprocess.CompletedProcess[str], dict[str, Any]]:
    """Run inference.py with --input ROOT --output ROOT (or ``output``); returns (process, report)."""
    report = root / "report.json"
    cmd = [
        sys.executable,
        str(REPO / "inference.py"),
        "--input",
        str(root),
        "--output",
        str(output or root),
        "--resources",
        str(resources),
        "--device",
        "cpu",
        "--threads",
        "1",
        "--report",
        str(report),
        *extra,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env, cwd=str(REPO))
    data = json.loads(report.read_text()) if report.is_file() else {}
    return proc, data


def _inputs(root: Path) -> Path:
    folder = root / INPUT_SUBDIR
    folder.mkdir(parents=True)
    return folder


def test_outputs_keep_name_shape_and_grid_for_tif_and_tiff_with_full_report(
    fixture_resources: Path, tmp_path: Path
) -> None:
    folder = _inputs(tmp_path)
    write_case(folder, "a_nucleus.tif", blob_volume((12, 40, 36), seed=1), spacing=(1.0, 0.39, 0.39), channel="nucleus")
    b = blob_volume((6, 30, 26), seed=2)
    # no channel in the metadata: default with a warning, which must reach the report
    tifffile.imwrite(folder / "b.tiff", b, metadata={"PhysicalSizeX": 0.3, "PhysicalSizeY": 0.3, "PhysicalSizeZ": 2.0})

    proc, report = run_cli(tmp_path, fixture_resources)
    assert proc.returncode == 0, proc.stderr[-3000:]

    out_dir = tmp_path / OUTPUT_SUBDIR
    assert sorted(p.name for p in out_dir.iterdir()) == ["a_nucleus.tif", "b.tiff"]
    expected = {
        "a_nucleus.tif": ((12, 40, 36), (1.0, 0.39, 0.39), "nucleus"),
        "b.tiff": ((6, 30, 26), (2.0, 0.3, 0.3), "nucleus"),
    }
    for name, (shape, spacing, channel) in expected.items():
        out = read_volume(out_dir / name)
        assert out.data.shape == shape
        assert out.data.dtype == np.float32
        assert out.spacing == pytest.approx(spacing)
        assert out.channel == channel
        assert out.warnings == []
        assert np.isfinite(out.data).all()
        lo, hi = np.percentile(out.data, [2.0, 99.8])
        assert lo == pytest.approx(0.0, abs=1e-3) and hi == pytest.approx(1.0, abs=1e-3)

    assert report["refused"] == []
    files = {entry["file"]: entry for entry in report["files"]}
    assert set(files) == set(expected)
    for name, (shape, spacing, channel) in expected.items():
        entry = files[name]
        assert entry["status"] == "ok"
        assert entry["shape"] == list(shape)
        assert entry["spacing_um"] == pytest.approx(list(spacing))
        assert entry["channel"] == channel
        for stage in ("global", "patch"):
            assert entry["stages"][stage]["backend"] == "onnx"  # auto on CPU
            assert entry["stages"][stage]["provider"] == "CPU"
        assert set(STAGE_SECONDS) <= set(entry["seconds"])
        assert all(v >= 0 for v in entry["seconds"].values())
        assert entry["peak_rss_mib"] > 0
        assert isinstance(entry["warnings"], list)
    assert files["a_nucleus.tif"]["warnings"] == []
    assert any("channel missing" in w for w in files["b.tiff"]["warnings"])
    assert report["policy"]["device"] == "cpu"


def test_explicit_backends_both_run_and_are_named_in_the_report(fixture_resources: Path, tmp_path: Path) -> None:
    results: dict[str, np.ndarray] = {}
    for backend in ("torchscript", "onnx"):
        root = tmp_path / backend
        write_case(_inputs(root), "case.tif", blob_volume((8, 32, 30), seed=3), spacing=(1.5, 0.4, 0.4))
        proc, report = run_cli(root, fixture_resources, "--backend", backend)
        assert proc.returncode == 0, proc.stderr[-3000:]
        stages = report["files"][0]["stages"]
        assert stages["global"]["backend"] == stages["patch"]["backend"] == backend
        results[backend] = read_volume(root / OUTPUT_SUBDIR / "case.tif").data
    # same networks in two formats: the fused outputs agree
    np.testing.assert_allclose(results["torchscript"], results["onnx"], atol=1e-4)


def test_identity_patch_model_output_equals_normalised_input(identity_resources: Path, tmp_path: Path) -> None:
    data = blob_volume((10, 36, 34), seed=4)
    write_case(_inputs(tmp_path), "case.tif", data, spacing=(2.0, 0.3, 0.3))
    proc, _ = run_cli(tmp_path, identity_resources)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = read_volume(tmp_path / OUTPUT_SUBDIR / "case.tif").data
    # where the prediction equals the input the blend keeps the input, whatever the weight map
    np.testing.assert_allclose(out, percentile_normalise(data, 2.0, 99.8), atol=1e-5)


def test_uint16_output_dtype_is_written(fixture_resources: Path, tmp_path: Path) -> None:
    write_case(_inputs(tmp_path), "case.tif", blob_volume((6, 24, 24), seed=5), spacing=(1.0, 0.5, 0.5))
    proc, report = run_cli(tmp_path, fixture_resources, "--output-dtype", "uint16")
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = read_volume(tmp_path / OUTPUT_SUBDIR / "case.tif")
    assert out.data.dtype == np.uint16 and out.data.max() == 65535
    assert out.spacing == pytest.approx((1.0, 0.5, 0.5))
    assert report["files"][0]["output_dtype"] == "uint16"


def test_unreadable_file_is_refused_with_exit_1_and_others_written(fixture_resources: Path, tmp_path: Path) -> None:
    folder = _inputs(tmp_path)
    write_case(folder, "good.tif", blob_volume((6, 24, 24), seed=6))
    (folder / "bad.tif").write_bytes(b"II*\x00garbage")
    proc, report = run_cli(tmp_path, fixture_resources)
    assert proc.returncode == 1
    out_dir = tmp_path / OUTPUT_SUBDIR
    assert [p.name for p in out_dir.iterdir()] == ["good.tif"]
    assert report["refused"] == ["bad.tif"]
    bad = next(f for f in report["files"] if f["file"] == "bad.tif")
    assert bad["status"] == "refused" and "bad.tif" in bad["error"]


def test_missing_input_folder_exits_2_and_writes_nothing(fixture_resources: Path, tmp_path: Path) -> None:
    proc, report = run_cli(tmp_path, fixture_resources, output=tmp_path / "out")
    assert proc.returncode == 2
    assert not (tmp_path / "out").exists()
    assert "input folder not found" in report["error"]


def test_empty_input_folder_exits_2_and_writes_nothing(fixture_resources: Path, tmp_path: Path) -> None:
    folder = _inputs(tmp_path)
    (folder / "readme.txt").write_text("no images here")
    proc, report = run_cli(tmp_path, fixture_resources, output=tmp_path / "out")
    assert proc.returncode == 2
    assert not (tmp_path / "out").exists()
    assert "no .tif/.tiff files" in report["error"]


def test_missing_manifest_exits_2_and_writes_nothing(tmp_path: Path) -> None:
    write_case(_inputs(tmp_path), "case.tif", blob_volume((6, 16, 16)))
    empty = tmp_path / "no_weights"
    empty.mkdir()
    proc, report = run_cli(tmp_path, empty, output=tmp_path / "out")
    assert proc.returncode == 2
    assert not (tmp_path / "out").exists()
    assert "manifest not found" in report["error"]


def test_no_arguments_follow_the_grand_challenge_input_and_output_folders() -> None:
    config = inference.build_config(inference.parse_args([]))
    assert config.input_dir == Path("/input/images/fluorescence-lightsheet-3D-microscopy")
    assert config.output_dir == Path("/output/images/fused-fluorescence-lightsheet-3D-microscopy")
    assert (config.resources_dir, config.device, config.backend, config.output_dtype) == (None, "auto", "auto", "float32")


def test_help_exits_0_and_describes_the_contract() -> None:
    proc = subprocess.run([sys.executable, str(REPO / "inference.py"), "--help"], capture_output=True, text=True, timeout=60, cwd=str(REPO))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "/input/images/fluorescence-lightsheet-3D-microscopy" in proc.stdout and "--backend" in proc.stdout


def test_sigterm_stops_the_run_with_a_log_line_a_report_and_exit_143(fixture_resources: Path, tmp_path: Path) -> None:
    folder = _inputs(tmp_path)
    write_case(folder, "a.tif", blob_volume((6, 24, 24), seed=1))
    write_case(folder, "b.tif", blob_volume((24, 96, 96), seed=2))  # seconds of work: the signal comes during it
    report_path = tmp_path / "report.json"
    cmd = [sys.executable, str(REPO / "inference.py"), "--input", str(tmp_path), "--output", str(tmp_path), "--resources", str(fixture_resources), "--device", "cpu", "--threads", "1", "--report", str(report_path)]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, cwd=str(REPO))
    assert proc.stderr is not None
    log = []
    for line in proc.stderr:  # the second file has started once the first is written
        log.append(line)
        if "file 2/2" in line:
            proc.send_signal(signal.SIGTERM)
            break
    log += proc.stderr.readlines()
    assert proc.wait(timeout=60) == inference.TERMINATED_EXIT_CODE == 143, "".join(log)[-3000:]
    assert any("terminated by SIGTERM: stopping; 1 output(s) written" in line for line in log), "".join(log)[-3000:]
    report = json.loads(report_path.read_text())
    assert report["terminated"] is True and report["written"] == ["a.tif"]
    assert [p.name for p in (tmp_path / OUTPUT_SUBDIR).iterdir()] == ["a.tif"]  # no b.tif, no temporary file
