"""A device fault is not a refusal, and the last resort is an output (issue #25).

The "device" here is the CPU presented as CUDA: a stage loader whose 'cuda' stages are the real CPU networks
and an ops factory whose 'cuda' ops run the GPU's code path on the CPU (``cpu_hybrid=False``), both passed to
the Fuser as its dependencies; :func:`fusemycells.runtime.faults.inject` makes them raise the error texts CUDA, cuDNN
and ONNX Runtime's CUDA provider raise, at the global stage, at the N-th patch batch or in a torch step.
Every case must still be written, on the CPU, equal to a CPU run's output, with the fault in the report.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import reference
import tifffile
import torch
from conftest import blob_volume, write_case
from onnxruntime.capi.onnxruntime_pybind11_state import Fail

from fusemycells import cli
from fusemycells.backends import LoadedStage, load_stage
from fusemycells.config import INPUT_SUBDIR, OUTPUT_SUBDIR, load_manifest
from fusemycells.files import process_file, run_directory
from fusemycells.ops import Ops, choose_ops
from fusemycells.pipeline import Fuser
from fusemycells.report import case_entry
from fusemycells.runtime import faults
from fusemycells.runtime.budget import BudgetPolicy

SPACING = (1.0, 0.39, 0.39)
ROOT = Path(__file__).resolve().parent.parent

CUDA_ERRORS = {
    "illegal memory access": lambda: torch.AcceleratorError(
        "CUDA error: an illegal memory access was encountered\n"
        "CUDA kernel errors might be asynchronously reported at some other API call, so the stacktrace below might "
        "be incorrect.\nFor debugging consider passing CUDA_LAUNCH_BLOCKING=1"
    ),
    "cudnn": lambda: RuntimeError("cuDNN error: CUDNN_STATUS_EXECUTION_FAILED"),
    "no kernel image": lambda: torch.AcceleratorError(
        "CUDA error: no kernel image is available for execution on the device"
    ),
    "onnxruntime cuda provider": lambda: Fail(
        "[ONNXRuntimeError] : 1 : FAIL : CUDA failure 700: an illegal memory access was encountered ; GPU=0 ; "
        "hostname=gc ; file=/onnxruntime_src/onnxruntime/core/providers/cuda/cuda_call.cc ; line=121 ; "
        "expr=cudaStreamSynchronize(stream);"
    ),
}


def raising(name: str):
    """A ``fault()`` for :func:`faults.inject` that raises the named error."""

    def fault() -> None:
        raise CUDA_ERRORS[name]()

    return fault


class OnDevice:
    """A CPU runner presented as a CUDA one."""

    backend, provider, device, precision = "torchscript", "CUDA", "cuda", "fp32"

    def __init__(self, runner) -> None:
        self.runner = runner

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        return self.runner(batch)


def device_loader(manifest, spec, backend, device, **options) -> LoadedStage:
    """'cuda' stages are the real CPU networks presented as CUDA ones."""
    loaded = load_stage(manifest, spec, backend, "cpu", **{**options, "half": False, "vram_budget_gib": None})
    return dataclasses.replace(loaded, runner=OnDevice(loaded.runner)) if device == "cuda" else loaded


def device_ops(device: str, vram_budget_gib, profile, threads) -> Ops:
    """'cuda' ops run the GPU's code path on the CPU, in slabs of a few planes; 'cpu' ops are the CPU's own."""
    if device == "cuda":
        return Ops(device="cpu", slab_bytes=2**16, profile=profile, threads=1, cpu_hybrid=False)
    return choose_ops("cpu", None, profile, 1)


def device_policy(**fields) -> BudgetPolicy:
    return BudgetPolicy(device="cuda", half=False, vram_budget_gib=None, time_budget_s=None, threads=1, **fields)


def cpu_policy(**fields) -> BudgetPolicy:
    return BudgetPolicy(device="cpu", half=False, vram_budget_gib=None, time_budget_s=None, threads=1, **fields)


def folder(root: Path, count: int = 1) -> Path:
    """``root`` with ``count`` challenge inputs (case0.tif, …)."""
    inputs = root / INPUT_SUBDIR
    inputs.mkdir(parents=True)
    for i in range(count):
        write_case(inputs, f"case{i}.tif", blob_volume((10, 44, 40), seed=i), spacing=SPACING)
    return root


@pytest.fixture(scope="module")
def cpu_outputs(fixture_resources: Path, tmp_path_factory: pytest.TempPathFactory) -> list[np.ndarray]:
    """The two cases as a CPU run writes them (float32)."""
    root = folder(tmp_path_factory.mktemp("cpu_run"), 2)
    reports = run_directory(root / INPUT_SUBDIR, root / OUTPUT_SUBDIR, Fuser(load_manifest(fixture_resources), cpu_policy()), "float32")
    assert [r.status for r in reports] == ["ok", "ok"]
    return [tifffile.imread(root / OUTPUT_SUBDIR / f"case{i}.tif") for i in range(2)]


def run_with_fault(resources: Path, root: Path, plan: str, error: str, dtype: str = "float32"):
    """run_directory on ``root``'s inputs on the fake device, the fault of ``plan`` raising ``error``."""
    policy = device_policy()
    loader, ops = faults.inject(device_loader, device_ops, faults.parse_fault_plan(plan), raising(error))
    fuser = Fuser(load_manifest(resources), policy, loader=loader, ops=ops)
    reports = run_directory(root / INPUT_SUBDIR, root / OUTPUT_SUBDIR, fuser, dtype)
    return reports, policy


@pytest.mark.parametrize(
    ("plan", "error", "step"),
    [
        ("global", "illegal memory access", "global stage"),
        ("patch:3", "cudnn", "patch stage"),
        ("load", "no kernel image", "network loading"),
        ("ops:output_filter_s", "onnxruntime cuda provider", "output filter"),
        ("ops:resampling_s", "illegal memory access", "global stage"),
        ("ops:blend_s", "cudnn", "blend"),
        ("ops:percentile_normalisation_s", "no kernel image", "output filter"),
    ],
)
def test_a_device_fault_reruns_the_step_on_the_cpu_and_writes_the_cpu_runs_output(
    fixture_resources: Path, tmp_path: Path, cpu_outputs: list[np.ndarray], plan: str, error: str, step: str
) -> None:
    reports, policy = run_with_fault(fixture_resources, folder(tmp_path, 2), plan, error)
    assert [r.status for r in reports] == ["ok", "ok"]  # written (inference.py exits 0)
    first, second = reports
    assert first.device_fault is not None and first.device_fault["step"] == step and first.device_fault["rerun_on"] == "cpu"
    assert first.device_fault["error"].endswith(str(CUDA_ERRORS[error]()))
    assert second.device_fault is None and any("faulted earlier" in w for w in second.warnings)
    assert [e for e in policy.events if "device fault" in e] == [
        f"device fault in the {step} ({first.device_fault['error']}): rerun on the CPU; device not used again"
    ]
    after_patch_stage = step in ("blend", "output filter")  # the networks had run on the device before it
    assert first.stages["patch"]["provider"] == ("CUDA" if after_patch_stage else "CPU")
    assert second.stages["patch"]["provider"] == second.stages["global"]["provider"] == "CPU"
    for i, expected in enumerate(cpu_outputs):
        out = tifffile.imread(tmp_path / OUTPUT_SUBDIR / f"case{i}.tif")
        np.testing.assert_allclose(out, expected, atol=2e-4, rtol=0)
    json.dumps([case_entry(r) for r in reports])  # the entries serialise (schema-checked in test_report.py)


def test_a_fault_at_the_nth_patch_batch_continues_there_on_the_cpu_without_redoing_the_others() -> None:
    from fusemycells.patch_stage import OomLadder

    calls: list[str] = []

    def device(batch: np.ndarray) -> np.ndarray:
        calls.append("device")
        if len(calls) == 3:
            raise CUDA_ERRORS["cudnn"]()
        return batch[:, :1] * 2.0

    def cpu(batch: np.ndarray) -> np.ndarray:
        calls.append("cpu")
        return batch[:, :1] * 2.0

    policy = device_policy()
    ladder = OomLadder(device, lambda: cpu, policy.events, on_fault=lambda exc: policy.device_fault("patch stage", exc))
    batches = [np.full((2, 2, 4, 4, 4), i, np.float32) for i in range(5)]
    outputs = [ladder(b) for b in batches]
    assert calls == ["device", "device", "device", "cpu", "cpu", "cpu"]  # the failed batch once more, on the CPU
    assert all(np.array_equal(o, 2.0 * b[:, :1]) for o, b in zip(outputs, batches))
    assert ladder.forced_cpu and policy.active_device == "cpu" and policy.health.fault.step == "patch stage"


class FailingSource:
    """A plane source whose planes from ``z_fail`` on raise (a device fault while the output is written)."""

    def __init__(self, good: np.ndarray, z_fail: int) -> None:
        self.good, self.z_fail, self.shape, self.dtype = good, z_fail, good.shape, good.dtype

    def planes(self, z0: int, z1: int) -> np.ndarray:
        if z1 > self.z_fail:
            raise CUDA_ERRORS["illegal memory access"]()
        return self.good[z0:z1].copy()


def test_a_device_fault_while_the_output_is_written_writes_it_again_from_the_cpu(fixture_resources: Path, tmp_path: Path) -> None:
    from fusemycells.files import Conversion, route, write_fused
    from fusemycells.io.tiff import Volume
    from fusemycells.pipeline import Fused
    from fusemycells.report import CaseReport
    from fusemycells.sources import ArraySource

    good = blob_volume((40, 24, 24)).astype(np.float32)
    fused = Fused(FailingSource(good, z_fail=30), CaseReport("case.tif"), on_cpu=lambda: ArraySource(good))
    policy = device_policy()
    target = route(tmp_path / "case.tif", tmp_path, Conversion())
    write_fused(Fuser(load_manifest(fixture_resources), policy), fused, target, Volume(good, SPACING, "nucleus"))
    np.testing.assert_array_equal(tifffile.imread(tmp_path / "case.tif"), good)
    assert policy.health.fault is not None and policy.health.fault.step == "output filter"
    assert not list(tmp_path.glob(".fmc-*"))  # the failed write left no temporary file


def test_a_fault_midway_through_an_in_place_blend_resumes_on_the_cpu_at_the_first_slab_not_blended(
    fixture_resources: Path, tmp_path: Path
) -> None:
    # compact_voxels=0: the blend overwrites the input's own buffer (float16), as on a big stack; the fault
    # comes at the third slab, after two were blended in place
    cpu_root, device_root = folder(tmp_path / "cpu"), folder(tmp_path / "device")
    manifest = load_manifest(fixture_resources)
    run_directory(cpu_root / INPUT_SUBDIR, cpu_root / OUTPUT_SUBDIR, Fuser(manifest, cpu_policy(compact_voxels=0)), "float32")
    policy = device_policy(compact_voxels=0)
    loader, ops = faults.inject(device_loader, device_ops, faults.parse_fault_plan("ops:blend_s:3"), raising("cudnn"))
    [report] = run_directory(device_root / INPUT_SUBDIR, device_root / OUTPUT_SUBDIR, Fuser(manifest, policy, loader=loader, ops=ops), "float32")
    assert report.status == "ok" and report.device_fault["step"] == "blend"
    expected = tifffile.imread(cpu_root / OUTPUT_SUBDIR / "case0.tif")
    np.testing.assert_allclose(tifffile.imread(device_root / OUTPUT_SUBDIR / "case0.tif"), expected, atol=2e-3, rtol=0)


def test_the_device_fault_is_logged_at_error_once_with_the_original_error(fixture_resources: Path, tmp_path: Path, caplog) -> None:
    with caplog.at_level("INFO", logger="fusemycells"):
        run_with_fault(fixture_resources, folder(tmp_path, 2), "patch:2", "onnxruntime cuda provider")
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and "CUDA failure 700: an illegal memory access" in errors[0] and "patch stage" in errors[0]


def test_after_a_fault_the_device_is_not_used_again_in_the_run(fixture_resources: Path, tmp_path: Path) -> None:
    calls: list[tuple[str, str]] = []

    def recording_loader(manifest, spec, backend, device, **options):
        calls.append(("load", device))
        return device_loader(manifest, spec, backend, device, **options)

    def recording_ops(device, *args):
        calls.append(("ops", device))
        return device_ops(device, *args)

    root = folder(tmp_path, 2)
    loader, ops = faults.inject(recording_loader, recording_ops, faults.FaultPlan("global"), raising("cudnn"))
    fuser = Fuser(load_manifest(fixture_resources), device_policy(), loader=loader, ops=ops)
    process_file(root / INPUT_SUBDIR / "case0.tif", root / OUTPUT_SUBDIR, fuser, "float32")
    calls.clear()
    report = process_file(root / INPUT_SUBDIR / "case1.tif", root / OUTPUT_SUBDIR, fuser, "float32")
    assert report.status == "ok" and calls == [("ops", "cpu")]  # every network on the CPU was loaded already


def test_a_fault_on_the_cpu_is_not_a_device_fault_but_gets_the_identity_output(fixture_resources: Path, tmp_path: Path) -> None:
    root = folder(tmp_path)
    policy = cpu_policy()
    loader, _ = faults.inject(device_loader, device_ops, faults.FaultPlan("global"), raising("cudnn"))

    def cpu_faulty_loader(manifest, spec, backend, device, **options):  # the CPU's own global stage fails
        loaded = device_loader(manifest, spec, backend, device, **options)
        if spec.patch_size is None:
            return dataclasses.replace(loaded, runner=faults.FaultyRunner(loaded.runner, raising("cudnn")))
        return loaded

    del loader
    fuser = Fuser(load_manifest(fixture_resources), policy, loader=cpu_faulty_loader)
    report = process_file(root / INPUT_SUBDIR / "case0.tif", root / OUTPUT_SUBDIR, fuser, "float32")
    assert report.status == "fallback_identity" and report.device_fault is None and not list(policy.events)


# ---- the last resort -------------------------------------------------------------------------------------------


class Broken:
    """A runner that raises ``error`` on every call (a bug, or the host out of memory)."""

    backend, provider, device, precision = "onnx", "CPU", "cpu", "fp32"

    def __init__(self, error: BaseException) -> None:
        self.error = error

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        raise self.error


def broken_fuser(resources: Path, error: BaseException) -> Fuser:
    def loader(manifest, spec, backend, device, **options) -> LoadedStage:
        if spec.patch_size is None:  # the patch stage loads (and warms up) fine; the global stage fails
            return LoadedStage(spec=spec, runner=Broken(error), file="broken.onnx")
        return load_stage(manifest, spec, backend, device, **options)

    return Fuser(load_manifest(resources), cpu_policy(), loader=loader)


def expected_identity(data: np.ndarray, dtype: str) -> np.ndarray:
    """The input percentile-normalised (2, 99.8) in ``dtype``: the numpy reference, independent of the pipeline."""
    return reference.to_output_dtype(reference.percentile_normalise(data.astype(np.float32), 2.0, 99.8), dtype)


@pytest.mark.parametrize("dtype", ["uint16", "float32"])
@pytest.mark.parametrize(
    ("error", "logged"),
    [(ValueError("a bug"), "case.tif: ValueError: a bug"), (MemoryError("cannot allocate 2 GiB"), "ran out of memory while processing")],
)
def test_a_readable_input_that_fails_otherwise_gets_the_identity_output(
    fixture_resources: Path, tmp_path: Path, caplog, dtype: str, error: BaseException, logged: str
) -> None:
    data = blob_volume((6, 24, 24))
    path = write_case(tmp_path / "in", "case.tif", data.copy(), spacing=SPACING)
    with caplog.at_level("INFO", logger="fusemycells"):
        report = process_file(path, tmp_path / "out", broken_fuser(fixture_resources, error), dtype)
    assert report.status == "fallback_identity" and logged in report.error and report.output_dtype == dtype
    out = tifffile.imread(tmp_path / "out" / "case.tif")
    expected = expected_identity(data, dtype)
    assert out.dtype == expected.dtype and out.shape == data.shape
    np.testing.assert_allclose(out.astype(np.float64), expected.astype(np.float64), atol=1 if dtype == "uint16" else 1e-5)
    errors = [r for r in caplog.records if r.levelname == "ERROR"]
    assert errors and errors[0].exc_info is not None and errors[0].exc_info[0] is type(error)  # the traceback is logged


def test_identity_output_equals_the_pipelines_own_output_with_the_networks_off(fixture_resources: Path) -> None:
    from fusemycells.files import identity_output

    manifest = load_manifest(fixture_resources)
    channel = manifest.channel("nucleus")
    plain = dataclasses.replace(channel.postprocess, gate_knots=((0.0, 0.0),), output_sigma_knots=())
    off = dataclasses.replace(manifest, channels={"nucleus": dataclasses.replace(channel, postprocess=plain)})
    data = blob_volume((8, 30, 28))
    pipeline = Fuser(off, cpu_policy()).fuse(data.copy(), SPACING, "nucleus", output_dtype="uint16").to_array()
    identity = np.asarray(identity_output(data.copy(), plain, "uint16").planes(0, data.shape[0]))
    assert np.abs(identity.astype(int) - pipeline.astype(int)).max() <= 1


def test_unreadable_input_is_still_refused_with_no_output_and_exit_1(fixture_resources: Path, tmp_path: Path) -> None:
    inputs = tmp_path / INPUT_SUBDIR
    inputs.mkdir(parents=True)
    (inputs / "broken.tif").write_bytes(b"II*\x00 not a tiff")
    write_case(inputs, "good.tif", blob_volume((6, 24, 24)), spacing=SPACING)
    report_path = tmp_path / "report.json"
    code = cli.main(["--input", str(tmp_path), "--output", str(tmp_path), "--resources", str(fixture_resources), "--device", "cpu", "--threads", "1", "--report", str(report_path)])
    report = json.loads(report_path.read_text())
    assert code == 1 and report["refused"] == ["broken.tif"] and report["written"] == ["good.tif"]
    assert not (tmp_path / OUTPUT_SUBDIR / "broken.tif").exists()
    assert tifffile.imread(tmp_path / OUTPUT_SUBDIR / "good.tif").dtype == np.uint16  # the default output dtype


def test_exit_code_counts_a_fallback_identity_as_written() -> None:
    assert cli.exit_code_of(["ok", "fallback_identity"]) == 0
    assert cli.exit_code_of(["ok", "refused"]) == 1 and cli.exit_code_of([]) == 0


# ---- the environment switch ------------------------------------------------------------------------------------


def test_fault_switch_values_are_parsed_or_refused() -> None:
    assert faults.parse_fault_plan("patch:4") == faults.FaultPlan("patch", at=4)
    assert faults.parse_fault_plan("ops") == faults.FaultPlan("ops", section="output_filter_s")
    assert faults.parse_fault_plan("ops:blend_s").section == "blend_s" and faults.parse_fault_plan("global").step == "global"
    assert faults.parse_fault_plan("ops:blend_s:3") == faults.FaultPlan("ops", at=3, section="blend_s")
    for bad in ("patch", "patch:0", "gpu", "global:2", "ops:blend_s:0"):
        with pytest.raises(ValueError, match=faults.FAULT_ENV):
            faults.parse_fault_plan(bad)


def test_fault_switch_is_a_logged_no_op_on_a_cpu_run_and_a_bad_value_is_a_setup_error(fixture_resources: Path, tmp_path: Path) -> None:
    root = folder(tmp_path)
    command = [sys.executable, str(ROOT / "inference.py"), "--input", str(root), "--output", str(root), "--resources", str(fixture_resources), "--device", "cpu", "--threads", "1"]
    env = {**os.environ, faults.FAULT_ENV: "patch:2"}
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and f"{faults.FAULT_ENV}=patch:2 ignored: the run is on the cpu" in proc.stderr
    proc = subprocess.run(command, env={**env, faults.FAULT_ENV: "everywhere"}, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "expected load, global, patch:N or ops" in proc.stderr


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_the_injected_cuda_fault_is_a_real_cuda_error() -> None:
    # in a process of its own: the device-side assert leaves the CUDA context unusable
    code = "from fusemycells import faults; faults.cuda_fault()"
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "CUDA error" in proc.stderr and "did not fail" not in proc.stderr
