"""Budget policy: OOM ladder (batch → sub-patch → CPU), deadline degradation, memory estimate."""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import numpy as np
import pytest
import tifffile
from conftest import blob_volume, write_case

import inference
from fusemycells.backends import LoadedStage, load_stage
from fusemycells.budget import (
    MAX_CPU_WORKERS,
    BudgetPolicy,
    LinearCost,
    default_stage_costs,
    estimate_peak_bytes,
)
from fusemycells.config import INPUT_SUBDIR, OUTPUT_SUBDIR, load_manifest
from fusemycells.devices import (
    is_out_of_memory,
    nvidia_driver_version,
    parse_driver_version,
    peak_vram_mib,
    torch_threads,
)
from fusemycells.patch_stage import OomLadder
from fusemycells.pipeline import CaseReport, Fuser, learn_finish_cost, process_file, run_directory
from fusemycells.stitching import sliding_window


class FakeCudaOom(RuntimeError):
    """Looks like torch's CUDA OOM message."""

    def __init__(self) -> None:
        super().__init__("CUDA out of memory. Tried to allocate 2.00 GiB")


def pointwise(batch: np.ndarray) -> np.ndarray:
    """A model whose output at a voxel depends only on that voxel: stitching must be exact."""
    return (2.0 * batch[:, :1] + np.sin(batch[:, 1:2])).astype(np.float32)


def oom_when(condition):
    calls: list[tuple[int, ...]] = []

    def predict(batch: np.ndarray) -> np.ndarray:
        calls.append(batch.shape)
        if condition(batch):
            raise FakeCudaOom()
        return pointwise(batch)

    predict.calls = calls  # type: ignore[attr-defined]
    return predict


def policy() -> BudgetPolicy:
    return BudgetPolicy(device="cuda", half=False, vram_budget_gib=None, time_budget_s=None, threads=1)


def volume_channels(shape=(20, 37, 29)) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.random(shape, dtype=np.float32), rng.random(shape, dtype=np.float32)]


def reference(channels: list[np.ndarray], patch=(16, 16, 16)) -> np.ndarray:
    return sliding_window(channels, pointwise, patch, overlap=0.5, batch_size=4)[0]


def test_oom_messages_of_torch_onnxruntime_and_numpy_are_recognised() -> None:
    assert is_out_of_memory(FakeCudaOom())
    assert is_out_of_memory(RuntimeError("[ONNXRuntimeError] : 6 : RUNTIME_EXCEPTION : Failed to allocate memory for requested buffer"))
    assert is_out_of_memory(MemoryError())
    assert not is_out_of_memory(ValueError("shape mismatch"))


def test_oom_on_large_batches_halves_the_batch_and_keeps_the_output() -> None:
    channels = volume_channels()
    predict = oom_when(lambda b: len(b) > 1)
    ladder = OomLadder(predict)
    out, _ = sliding_window(channels, ladder, (16, 16, 16), overlap=0.5, batch_size=4)
    np.testing.assert_allclose(out, reference(channels), atol=1e-6)
    assert ladder.max_batch == 1 and ladder.batch_size(4) == 1
    assert any("batch size 2" in e for e in ladder.events) and any("batch size 1" in e for e in ladder.events)
    # the setting is kept: later batches go straight to one patch per call
    assert all(shape[0] == 1 for shape in predict.calls[-5:])


def test_oom_on_a_single_patch_tiles_it_into_sub_patches_with_correct_weighting() -> None:
    channels = volume_channels()
    predict = oom_when(lambda b: b.shape[2] * b.shape[3] * b.shape[4] > 8**3)
    ladder = OomLadder(predict, min_sub_patch=4)
    out, _ = sliding_window(channels, ladder, (16, 16, 16), overlap=0.5, batch_size=2)
    np.testing.assert_allclose(out, reference(channels), atol=1e-5)
    assert ladder.sub_patch == (8, 8, 8)
    assert any("sub-patches" in e for e in ladder.events)


def test_oom_at_the_smallest_sub_patch_finishes_on_the_cpu() -> None:
    channels = volume_channels()
    device_predict = oom_when(lambda b: True)
    cpu_calls = []

    def cpu_factory():
        cpu_calls.append(1)
        return pointwise

    ladder = OomLadder(device_predict, cpu_predict=cpu_factory, min_sub_patch=8)
    out, _ = sliding_window(channels, ladder, (16, 16, 16), overlap=0.5, batch_size=2)
    np.testing.assert_allclose(out, reference(channels), atol=1e-5)
    assert ladder.forced_cpu and cpu_calls == [1]
    assert any("CPU" in e for e in ladder.events)


def test_non_oom_errors_are_not_swallowed() -> None:
    def broken(batch: np.ndarray) -> np.ndarray:
        raise ValueError("bad input")

    with pytest.raises(ValueError, match="bad input"):
        OomLadder(broken)(np.zeros((2, 2, 4, 4, 4), np.float32))


class Wrapped:
    """A runner whose forward is ``wrapper(runner, batch)``."""

    def __init__(self, runner, wrapper) -> None:
        self.runner, self.wrapper = runner, wrapper
        self.backend, self.provider, self.device = runner.backend, runner.provider, runner.device

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        return self.wrapper(self.runner, batch)


def wrapping_loader(wrapper, which_stage: str = "patch"):
    """A stage loader (see Fuser) whose patch (or ``which_stage``) runner calls ``wrapper(runner, batch)``."""

    def loader(manifest, spec, backend, device, **options) -> LoadedStage:
        loaded = load_stage(manifest, spec, backend, device, **options)
        if (spec.patch_size is not None) == (which_stage == "patch"):
            return dataclasses.replace(loaded, runner=Wrapped(loaded.runner, wrapper))
        return loaded

    return loader


def _run(root: Path, resources: Path, *extra: str) -> tuple[int, dict, float]:
    report_path = root / "report.json"
    started = time.perf_counter()
    code = inference.main(["--input", str(root), "--output", str(root), "--resources", str(resources), "--device", "cpu", "--threads", "1", "--report", str(report_path), *extra])
    return code, json.loads(report_path.read_text()), time.perf_counter() - started


def _fuse_folder(root: Path, resources: Path, loader=load_stage, time_budget: float | None = None) -> tuple[list[CaseReport], BudgetPolicy, float]:
    """run_directory on ``root``'s challenge folders with an injected stage loader (CPU, 1 thread)."""
    started = time.perf_counter()
    pol = BudgetPolicy.create("cpu", None, time_budget, 1, started=started)
    fuser = Fuser(load_manifest(resources), pol, loader=loader)
    reports = run_directory(root / INPUT_SUBDIR, root / OUTPUT_SUBDIR, fuser, "float32")
    return reports, pol, time.perf_counter() - started


def test_pipeline_with_injected_oom_writes_the_same_output_as_without(fixture_resources: Path, tmp_path: Path) -> None:
    clean_root, oom_root = tmp_path / "clean", tmp_path / "oom"
    for root in (clean_root, oom_root):
        write_case((root / INPUT_SUBDIR).mkdir(parents=True) or root / INPUT_SUBDIR, "case.tif", blob_volume((10, 48, 40)), spacing=(0.8, 0.4, 0.4))
    _fuse_folder(clean_root, fixture_resources)

    def oom_for_batches(runner, batch):
        if len(batch) > 1:
            raise FakeCudaOom()
        return runner(batch)

    reports, pol, _ = _fuse_folder(oom_root, fixture_resources, wrapping_loader(oom_for_batches))
    assert reports[0].status == "ok"
    clean = tifffile.imread(clean_root / OUTPUT_SUBDIR / "case.tif")
    oom = tifffile.imread(oom_root / OUTPUT_SUBDIR / "case.tif")
    np.testing.assert_allclose(oom, clean, atol=1e-5)
    assert any("out of memory" in e for e in pol.events)
    assert reports[0].stages["patch"]["batch_size"] == 1


@pytest.mark.parametrize("budget", [3.0, 0.6])
def test_slow_model_still_writes_every_output_within_the_time_budget(fixture_resources: Path, tmp_path: Path, budget: float) -> None:
    folder = tmp_path / INPUT_SUBDIR
    folder.mkdir(parents=True)
    for i in range(2):
        write_case(folder, f"case_{i}.tif", blob_volume((24, 64, 64), seed=i), spacing=(0.6, 0.6, 0.6))

    def slow(runner, batch):
        time.sleep(0.1)  # ~ 0.05 s per patch: the full run would need > 100 patches per file
        return runner(batch)

    reports, pol, seconds = _fuse_folder(tmp_path, fixture_resources, wrapping_loader(slow), time_budget=budget)
    assert all(r.status == "ok" for r in reports)
    assert seconds <= budget * 1.05
    assert sorted(p.name for p in (tmp_path / OUTPUT_SUBDIR).iterdir()) == ["case_0.tif", "case_1.tif"]
    assert all(r.degradation >= 1 for r in reports)
    assert any("time budget: level" in e for e in pol.events)
    for name in ("case_0.tif", "case_1.tif"):
        out = tifffile.imread(tmp_path / OUTPUT_SUBDIR / name)
        assert out.shape == (24, 64, 64) and np.isfinite(out).all()


def test_without_a_deadline_the_full_prediction_runs(fixture_resources: Path, tmp_path: Path) -> None:
    write_case((tmp_path / INPUT_SUBDIR).mkdir(parents=True) or tmp_path / INPUT_SUBDIR, "case.tif", blob_volume((8, 32, 32)))
    code, report, _ = _run(tmp_path, fixture_resources, "--time-budget", "600")
    assert code == 0 and report["files"][0]["degradation"] == 0


def test_memory_estimate_grows_with_the_high_resolution_grid() -> None:
    coarse = estimate_peak_bytes((100, 500, 500), 2, (1.0, 0.6, 0.6), 0.6)
    fine = estimate_peak_bytes((100, 500, 500), 2, (3.0, 0.6, 0.6), 0.6)
    assert fine > coarse > 100 * 500 * 500 * 2


def test_a_slow_first_batch_alone_does_not_degrade_the_file(fixture_resources: Path, tmp_path: Path) -> None:
    folder = tmp_path / INPUT_SUBDIR
    folder.mkdir(parents=True)
    write_case(folder, "case.tif", blob_volume((24, 64, 64)), spacing=(0.6, 0.6, 0.6))
    calls = []

    def warm_up_once(runner, batch):
        calls.append(len(batch))
        if len(calls) == 1:
            time.sleep(3.5)  # one-time cost: at this rate the file would need > 4× the budget
        return runner(batch)

    reports, _, seconds = _fuse_folder(tmp_path, fixture_resources, wrapping_loader(warm_up_once), time_budget=12)
    case = reports[0]
    assert case.status == "ok"
    total = case.stages["patch"]["patches"]
    assert total * 3.5 / calls[0] > 4 * 12  # a projection from the first batch alone: hopeless by far
    assert case.degradation == 0 and seconds < 12


class AlwaysOomRunner:
    """A 'GPU' patch runner that runs out of memory for any batch, however small."""

    backend, provider, device = "torchscript", "CUDA", "cuda"

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        self.calls += 1
        raise FakeCudaOom()


def _case(folder: Path, name: str = "case.tif", seed: int = 0) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    return write_case(folder, name, blob_volume((24, 64, 64), seed=seed), spacing=(0.6, 0.6, 0.6))


def _cpu_fuser(resources: Path, loader=load_stage, **costs: LinearCost) -> Fuser:
    pol = BudgetPolicy(device="cpu", half=False, vram_budget_gib=None, time_budget_s=None, threads=1)
    return Fuser(load_manifest(resources), pol, loader=loader, costs={**default_stage_costs(), **costs})


def test_after_a_cpu_fallback_the_next_file_starts_on_the_cpu(fixture_resources: Path, tmp_path: Path) -> None:
    gpu = AlwaysOomRunner()

    def loader(manifest, spec, backend, device, **options) -> LoadedStage:  # a 'CUDA' patch stage that always runs out of memory
        if device == "cuda" and spec.patch_size is not None:
            return LoadedStage(spec=spec, runner=gpu, file="gpu_stage2.pt")
        return load_stage(manifest, spec, backend, "cpu", **{**options, "half": False, "vram_budget_gib": None})

    pol = BudgetPolicy(device="cuda", half=False, vram_budget_gib=None, time_budget_s=None, threads=1)
    fuser = Fuser(load_manifest(fixture_resources), pol, loader=loader)
    first = process_file(_case(tmp_path / "in", "a.tif", seed=0), tmp_path / "out", fuser, "float32")
    calls_after_first = gpu.calls
    second = process_file(_case(tmp_path / "in", "b.tif", seed=1), tmp_path / "out", fuser, "float32")
    assert first.status == second.status == "ok", (first.error, second.error)
    assert fuser.patch_stage(fuser.manifest.channel("nucleus")).ladder.forced_cpu and calls_after_first > 0
    assert gpu.calls == calls_after_first  # the second file never touched the device runner
    for case in (first, second):
        assert case.stages["patch"]["provider"] == "CPU" and case.stages["patch"]["file"] != "gpu_stage2.pt"


def test_first_file_reserve_covers_the_measured_large_cpu_run() -> None:
    voxels = 309 * 1920 * 1920
    assert default_stage_costs()["finish"].estimate(voxels) >= 165 + 40  # postprocess + write, 2 CPU cores
    assert default_stage_costs()["global"].estimate(voxels + 520 * 1242 * 1242) >= 59.7


def test_stage_costs_learn_from_large_files_only() -> None:
    cost = LinearCost(fixed_s=2.0, per_voxel_s=2.5e-7)
    cost.learn(1e6, 0.5)  # a small file: mostly fixed overhead, teaches nothing
    assert cost.per_voxel_s == 2.5e-7
    cost.learn(1e9, 102.0)  # 100 s of per-voxel work
    assert cost.per_voxel_s == pytest.approx(1.25e-7)
    assert cost.estimate(2e9) == pytest.approx(2.0 + 250.0)


def test_finish_cost_is_learned_from_a_fully_fused_file_only() -> None:
    costs = default_stage_costs()
    report = CaseReport(file="big.tif", status="ok", shape=[309, 1920, 1920], seconds={"postprocess": 80.0, "write": 20.0})
    skipped = CaseReport(file="fast.tif", status="ok", shape=[309, 1920, 1920], seconds={"write": 3.0}, degradation=3)
    learn_finish_cost(costs, skipped)
    assert costs["finish"].per_voxel_s == default_stage_costs()["finish"].per_voxel_s
    learn_finish_cost(costs, report)
    assert costs["finish"].per_voxel_s == pytest.approx(1.25 * 98.0 / (309 * 1920 * 1920))


@pytest.mark.parametrize("finish_rate, level", [(2.5e-7, 0), (1e-3, 3)])
def test_reserve_for_postprocessing_grows_with_the_voxel_count(fixture_resources: Path, tmp_path: Path, finish_rate: float, level: int) -> None:
    fuser = _cpu_fuser(fixture_resources, finish=LinearCost(2.0, finish_rate))  # 1e-3 s/voxel: ~100 s for this stack
    report = process_file(_case(tmp_path / "in"), tmp_path / "out", fuser, "float32", deadline=time.perf_counter() + 30.0)
    assert report.status == "ok" and report.degradation == level
    assert ("global_stage" in report.seconds) == (level == 0)


def test_global_stage_estimated_too_slow_is_skipped_on_the_first_file(fixture_resources: Path, tmp_path: Path) -> None:
    calls = []
    counting = wrapping_loader(lambda runner, batch: calls.append(1) or runner(batch), which_stage="global")
    fuser = _cpu_fuser(fixture_resources, counting, **{"global": LinearCost(2.0, 1e-3)})  # ~200 s for this stack
    report = process_file(_case(tmp_path / "in"), tmp_path / "out", fuser, "float32", deadline=time.perf_counter() + 30.0)
    assert report.status == "ok" and report.degradation == 3
    assert not calls and "global_stage" not in report.seconds
    assert any("global stage needs" in w for w in report.warnings)


def test_deadline_passed_in_a_slow_global_stage_goes_to_the_normalised_input(fixture_resources: Path, tmp_path: Path) -> None:
    _case(tmp_path / INPUT_SUBDIR)

    def slow(runner, batch):
        time.sleep(4.0)  # the estimate (~2 s) fits in the budget, the real stage does not
        return runner(batch)

    budget = 6.0
    reports, _, seconds = _fuse_folder(tmp_path, fixture_resources, wrapping_loader(slow, which_stage="global"), time_budget=budget)
    case = reports[0]
    assert case.status == "ok" and seconds <= budget * 1.05
    assert case.degradation == 3 and "global_stage" in case.seconds and "patch_stage" not in case.seconds
    assert any("during the global stage" in w for w in case.warnings)


NVRM_PROPRIETARY = "NVRM version: NVIDIA UNIX x86_64 Kernel Module  535.104.05  Sat Aug 19 01:15:15 UTC 2023\nGCC version:  gcc version 12.2.0\n"
NVRM_OPEN = "NVRM version: NVIDIA UNIX Open Kernel Module for x86_64  570.86.15  Release Build  (dvs-builder@U16)  Thu Jan 23 2025\n"


def test_nvidia_driver_version_is_read_from_the_kernel_module_text(tmp_path: Path) -> None:
    assert parse_driver_version(NVRM_PROPRIETARY) == "535.104.05"
    assert parse_driver_version(NVRM_OPEN) == "570.86.15"
    assert parse_driver_version("no driver here") is None
    (tmp_path / "version").write_text(NVRM_OPEN)
    assert nvidia_driver_version(str(tmp_path / "version")) == "570.86.15"
    assert nvidia_driver_version(str(tmp_path / "missing")) is None


def test_policy_report_and_log_name_the_nvidia_driver(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr("fusemycells.budget.nvidia_driver_version", lambda: "535.104.05")
    with caplog.at_level("INFO", logger="fusemycells"):
        pol = BudgetPolicy.create("cpu", None, None, 1)
    assert pol.as_report()["nvidia_driver"] == "535.104.05"
    assert any("NVIDIA driver 535.104.05" in r.getMessage() for r in caplog.records)


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux /proc")
def test_peak_rss_of_a_child_process_is_its_own_not_its_parents() -> None:
    import subprocess
    import sys

    held = np.ones(400 * 2**20 // 8)  # 400 MiB touched here: ru_maxrss would hand it to the child
    code = "import sys; sys.path.insert(0, '.'); from fusemycells.devices import peak_rss_mib; print(peak_rss_mib())"
    child = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=Path(__file__).resolve().parent.parent)
    assert float(child.stdout) < 300  # numpy + the module: tens of MiB
    assert held.sum() > 0


def test_patch_workers_run_torchscript_side_by_side_on_a_cpu_only() -> None:
    cpu = BudgetPolicy(device="cpu", half=False, vram_budget_gib=None, time_budget_s=None, threads=4)
    assert cpu.patch_workers("torchscript", "cpu") == 4
    assert cpu.patch_workers("onnx", "cpu") == 1
    assert cpu.patch_workers("torchscript", "cuda") == 1
    assert dataclasses.replace(cpu, threads=1).patch_workers("torchscript", "cpu") == 1
    assert dataclasses.replace(cpu, threads=64).patch_workers("torchscript", "cpu") == MAX_CPU_WORKERS


def test_torchscript_on_cpu_workers_write_the_same_file_and_restore_torch_threads(fixture_resources: Path, tmp_path: Path) -> None:
    import torch

    outputs = {}
    for threads in ("1", "3"):
        root = tmp_path / threads
        write_case((root / INPUT_SUBDIR).mkdir(parents=True) or root / INPUT_SUBDIR, "case.tif", blob_volume((12, 48, 40)), spacing=(0.8, 0.4, 0.4))
        with torch_threads(torch.get_num_threads()):  # the run sets torch's threads: restore them for later tests
            code, report, _ = _run(root, fixture_resources, "--backend", "torchscript", "--threads", threads)
            assert torch.get_num_threads() == int(threads)  # what the run set, not the workers' 1
        assert code == 0
        assert report["files"][0]["stages"]["patch"]["workers"] == int(threads)
        outputs[threads] = tifffile.imread(root / OUTPUT_SUBDIR / "case.tif")
    np.testing.assert_array_equal(outputs["3"], outputs["1"])


def test_torch_threads_is_restored_after_an_error() -> None:
    import torch

    before = torch.get_num_threads()
    with pytest.raises(RuntimeError), torch_threads(1):
        assert torch.get_num_threads() == 1
        raise RuntimeError("boom")
    assert torch.get_num_threads() == before


def test_peak_vram_is_none_on_a_cpu_run_and_torchs_reserved_peak_on_cuda(fixture_resources: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import sys
    import types

    write_case((tmp_path / INPUT_SUBDIR).mkdir(parents=True) or tmp_path / INPUT_SUBDIR, "case.tif", blob_volume((8, 32, 32)))
    code, report, _ = _run(tmp_path, fixture_resources)
    assert code == 0 and report["files"][0]["peak_vram_mib"] is None

    cuda = types.SimpleNamespace(is_available=lambda: True, is_initialized=lambda: True, max_memory_reserved=lambda: 3 * 2**30)
    monkeypatch.setitem(sys.modules, "torch", types.SimpleNamespace(cuda=cuda))
    assert peak_vram_mib() == 3072.0
    cuda.is_initialized = lambda: False  # CUDA present but never used (e.g. a CPU run on a GPU machine)
    assert peak_vram_mib() is None
