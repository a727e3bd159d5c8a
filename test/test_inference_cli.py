"""End-to-end runs of ``inference.py`` as the container runs it (subprocess, fixture networks)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tifffile
from conftest import REPO, blob_volume, write_case
from reference import percentile_normalise
from report_check import assert_valid_report

from fusemycells import cli
from fusemycells.config import INPUT_SUBDIR, OUTPUT_SUBDIR
from fusemycells.io.tiff import read_volume
from fusemycells.runtime.timing import SECTIONS

STAGE_SECONDS = ("read", "load_weights", "preprocess", "global_stage", "patch_stage", "postprocess", "write", "total")


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

    proc, report = run_cli(tmp_path, fixture_resources, "--output-dtype", "float32")  # the values: percentiles 0 and 1
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
            assert entry["stages"][stage]["backend"] == "openvino"  # auto on CPU: the ONNX file
            assert entry["stages"][stage]["provider"] == "CPU"
        assert set(STAGE_SECONDS) <= set(entry["seconds"])
        phases = {k: v for k, v in entry["seconds"].items() if k != "profile_s"}
        assert all(v >= 0 for v in phases.values())
        profile = entry["seconds"]["profile_s"]  # seconds per kind of work
        assert "forward_s" in profile and set(profile) <= set(SECTIONS) and all(v >= 0 for v in profile.values())
        assert entry["peak_rss_mib"] > 0
        assert isinstance(entry["warnings"], list)
    assert files["a_nucleus.tif"]["warnings"] == []
    assert any("channel missing" in w for w in files["b.tiff"]["warnings"])
    assert report["policy"]["device"] == "cpu" and report["policy"]["cuda_error"] is None
    assert files["b.tiff"]["seconds"]["load_weights"] < files["a_nucleus.tif"]["seconds"]["load_weights"]  # loaded once
    assert_time_account(report, proc.stderr, "process start", ["a_nucleus.tif", "b.tiff"])


def assert_time_account(report: dict[str, Any], log: str, origin: str, files: list[str]) -> None:
    """The report's ``clock`` and the log say when the budget started and what each phase took of it."""
    clock = report["clock"]
    assert clock["origin"] == origin and clock["time_budget_s"] == 480.0  # the manifest's default
    started = datetime.fromisoformat(clock["started"])
    assert datetime.fromisoformat(clock["deadline"]).timestamp() == pytest.approx(started.timestamp() + 480.0, abs=1e-3)
    phases = clock["phases_s"]
    assert list(phases)[0] == "start-up" and phases["start-up"] > 0
    for name in files:
        assert [p.split(": ")[1] for p in phases if p.startswith(name + ": ")] == list(STAGE_SECONDS[:-1])
    assert sum(phases.values()) + clock["unaccounted_s"] == pytest.approx(clock["elapsed_s"], abs=2e-3)
    assert 0 <= clock["unaccounted_s"] < 0.2 * clock["elapsed_s"] + 1.0
    assert clock["left_s"] == pytest.approx(480.0 - clock["elapsed_s"], abs=2e-3)
    assert f"time budget 480 s counted from {origin} at {clock['started']}" in log
    assert f"s of the 480 s budget since {origin} at {clock['started']}: start-up" in log


def test_explicit_backends_both_run_and_are_named_in_the_report(fixture_resources: Path, tmp_path: Path) -> None:
    results: dict[str, np.ndarray] = {}
    for backend in ("torchscript", "onnx"):
        root = tmp_path / backend
        write_case(_inputs(root), "case.tif", blob_volume((8, 32, 30), seed=3), spacing=(1.5, 0.4, 0.4))
        proc, report = run_cli(root, fixture_resources, "--backend", backend, "--output-dtype", "float32")
        assert proc.returncode == 0, proc.stderr[-3000:]
        stages = report["files"][0]["stages"]
        assert stages["global"]["backend"] == stages["patch"]["backend"] == backend
        results[backend] = read_volume(root / OUTPUT_SUBDIR / "case.tif").data
    # same networks in two formats: the fused outputs agree
    np.testing.assert_allclose(results["torchscript"], results["onnx"], atol=1e-4)


def test_identity_patch_model_output_equals_normalised_input(identity_resources: Path, tmp_path: Path) -> None:
    data = blob_volume((10, 36, 34), seed=4)
    write_case(_inputs(tmp_path), "case.tif", data, spacing=(2.0, 0.3, 0.3))
    proc, _ = run_cli(tmp_path, identity_resources, "--output-dtype", "float32")  # the values, not their uint16 rounding
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = read_volume(tmp_path / OUTPUT_SUBDIR / "case.tif").data
    # where the prediction equals the input the blend keeps the input, whatever the weight map
    np.testing.assert_allclose(out, percentile_normalise(data, 2.0, 99.8), atol=1e-5)


def test_uint16_is_the_default_output_dtype_spanning_the_whole_range(fixture_resources: Path, tmp_path: Path) -> None:
    write_case(_inputs(tmp_path), "case.tif", blob_volume((6, 24, 24), seed=5), spacing=(1.0, 0.5, 0.5))
    proc, report = run_cli(tmp_path, fixture_resources)  # no --output-dtype
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = read_volume(tmp_path / OUTPUT_SUBDIR / "case.tif")
    assert out.data.dtype == np.uint16 and out.data.min() == 0 and out.data.max() == 65535
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
    config = cli.build_config(cli.parse_args([]))
    assert config.input_dir == Path("/input/images/fluorescence-lightsheet-3D-microscopy")
    assert config.output_dir == Path("/output/images/fused-fluorescence-lightsheet-3D-microscopy")
    assert (config.resources_dir, config.device, config.backend, config.output_dtype) == (None, "auto", "auto", "uint16")


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
    assert proc.wait(timeout=60) == cli.TERMINATED_EXIT_CODE == 143, "".join(log)[-3000:]
    assert any("terminated by SIGTERM: stopping; 1 output(s) written" in line for line in log), "".join(log)[-3000:]
    report = json.loads(report_path.read_text())
    assert_valid_report(report)
    assert report["terminated"] is True and report["written"] == ["a.tif"] and report["exit_code"] == 143
    assert report["counts"] == {"inputs": 2, "written": 1, "refused": 0, "unfinished": 1, "skipped": 0}
    assert [p.name for p in (tmp_path / OUTPUT_SUBDIR).iterdir()] == ["a.tif"]  # no b.tif, no temporary file
    [entry] = report["files"]  # the per-file entry of the file done, as in a normal report
    assert entry["file"] == "a.tif" and entry["status"] == "ok" and entry["shape"] == [6, 24, 24] and entry["seconds"]["write"] >= 0
    assert report["policy"]["device"] == "cpu" and report["clock"]["origin"] == "process start"
    assert "a.tif: write" in report["clock"]["phases_s"]


def test_the_budget_counts_from_the_process_start_through_the_image_entry_point_and_exec(fixture_resources: Path, tmp_path: Path) -> None:
    write_case(_inputs(tmp_path), "case.tif", blob_volume((8, 32, 32)))
    report_path = tmp_path / "report.json"
    args = ["--input", str(tmp_path), "--output", str(tmp_path), "--resources", str(fixture_resources), "--device", "cpu", "--threads", "1", "--report", str(report_path), "--time-budget", "4"]
    entry = [sys.executable, "-m", "fusemycells.runtime.cuda_support", "--exec", "inference.py", *args]  # the image's ENTRYPOINT
    # 3 s spent before the exec (as an image's start-up would): the budget of 4 s has 1 s left when inference.py starts
    starter = f"import os, sys, time; time.sleep(3.0); os.execv(sys.executable, {entry!r})"
    begun = time.time()
    proc = subprocess.run([sys.executable, "-c", starter], capture_output=True, text=True, timeout=120, cwd=str(REPO), env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(report_path.read_text())
    clock = report["clock"]
    assert clock["origin"] == "process start" and clock["time_budget_s"] == 4.0  # --time-budget overrides the manifest
    assert abs(datetime.fromisoformat(clock["started"]).timestamp() - begun) < 1.0 and clock["phases_s"]["start-up"] >= 3.0
    [case] = report["files"]
    assert case["status"] == "ok" and case["degradation"] == 3  # no time left for the networks: still an output
    assert (tmp_path / OUTPUT_SUBDIR / "case.tif").is_file()


def test_temporary_files_of_a_killed_earlier_run_are_removed_and_reported(fixture_resources: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    write_case(_inputs(tmp_path), "case.tif", blob_volume((6, 24, 24)))
    out = tmp_path / OUTPUT_SUBDIR
    out.mkdir(parents=True)
    hour_ago = time.time() - 3600
    for name in (".fmc-dead1.partial", ".fmc-recent.partial", "keep.partial"):
        (out / name).write_bytes(b"half a TIFF")
    os.utime(out / ".fmc-dead1.partial", (hour_ago, hour_ago))
    os.utime(out / "keep.partial", (hour_ago, hour_ago))  # not our name: never touched
    (out / ".fmc-link.partial").symlink_to(tmp_path / "elsewhere")
    os.utime(out / ".fmc-link.partial", (hour_ago, hour_ago), follow_symlinks=False)
    report_path = tmp_path / "report.json"
    with caplog.at_level("INFO", logger="fusemycells"):
        code = cli.main(["--input", str(tmp_path), "--output", str(tmp_path), "--resources", str(fixture_resources), "--device", "cpu", "--threads", "1", "--report", str(report_path)])
    assert code == 0
    assert sorted(p.name for p in out.iterdir()) == [".fmc-link.partial", ".fmc-recent.partial", "case.tif", "keep.partial"]
    report = json.loads(report_path.read_text())
    assert report["stale_partials_removed"] == [".fmc-dead1.partial"]
    assert "removed 1 temporary output file(s) left by an earlier, killed run: .fmc-dead1.partial" in caplog.text
    assert report["clock"]["origin"] == "main() call"  # called in-process: the budget counts from the call


def test_the_writers_temporary_files_match_the_pattern_cleaned_up(tmp_path: Path) -> None:
    from fnmatch import fnmatch

    from fusemycells.io.tiff import Volume, write_volume

    seen: list[str] = []

    class Watching:
        shape, dtype = (3, 8, 8), np.dtype(np.float32)

        def planes(self, z0: int, z1: int) -> np.ndarray:
            seen.extend(p.name for p in tmp_path.iterdir())
            return np.zeros((z1 - z0, 8, 8), np.float32)

    write_volume(tmp_path / "out.tif", Watching(), Volume(data=np.zeros((3, 8, 8), np.float32), spacing=(1.0, 0.4, 0.4), channel="nucleus"))
    assert seen and all(fnmatch(name, cli.PARTIAL_PATTERN) for name in seen)
    assert cli.remove_stale_partials(tmp_path, before=time.time() + 10, now=time.time() + 4000) == []  # a finished output is never a partial


def test_ctrl_c_stops_the_run_with_one_line_a_report_and_exit_130(fixture_resources: Path, tmp_path: Path) -> None:
    folder = _inputs(tmp_path)
    write_case(folder, "a.tif", blob_volume((6, 24, 24), seed=1))
    write_case(folder, "b.tif", blob_volume((24, 96, 96), seed=2))  # seconds of work: the signal comes during it
    report_path = tmp_path / "report.json"
    cmd = [sys.executable, str(REPO / "inference.py"), "--input", str(tmp_path), "--output", str(tmp_path), "--resources", str(fixture_resources), "--device", "cpu", "--threads", "1", "--report", str(report_path)]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, cwd=str(REPO), start_new_session=True)
    assert proc.stderr is not None
    log = []
    for line in proc.stderr:
        log.append(line)
        if "file 2/2" in line:
            os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C in a terminal signals the whole process group
            break
    log += proc.stderr.readlines()
    assert proc.wait(timeout=60) == 130, "".join(log)[-3000:]
    text = "".join(log)
    assert "Traceback" not in text and "KeyboardInterrupt" not in text, text[-3000:]
    assert [line for line in log if "stopping" in line] == [next(line for line in log if "interrupted by SIGINT: stopping; 1 output(s) written" in line)]
    report = json.loads(report_path.read_text())
    assert_valid_report(report)
    assert report["interrupted"] is True and report["terminated"] is False and report["exit_code"] == 130
    assert report["written"] == ["a.tif"] and report["counts"]["unfinished"] == 1
    assert [p.name for p in (tmp_path / OUTPUT_SUBDIR).iterdir()] == ["a.tif"]  # no b.tif, no temporary file
