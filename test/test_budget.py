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
from fusemycells.budget import BudgetPolicy, OomLadder, estimate_peak_bytes, is_out_of_memory
from fusemycells.config import INPUT_SUBDIR, OUTPUT_SUBDIR
from fusemycells.pipeline import Fuser
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
    channels, pol = volume_channels(), policy()
    predict = oom_when(lambda b: len(b) > 1)
    out, _ = sliding_window(channels, OomLadder(predict, pol), (16, 16, 16), overlap=0.5, batch_size=4)
    np.testing.assert_allclose(out, reference(channels), atol=1e-6)
    assert pol.max_batch == 1 and pol.patch_batch_size(4) == 1
    assert any("batch size 2" in e for e in pol.events) and any("batch size 1" in e for e in pol.events)
    # the setting is kept: later batches go straight to one patch per call
    assert all(shape[0] == 1 for shape in predict.calls[-5:])


def test_oom_on_a_single_patch_tiles_it_into_sub_patches_with_correct_weighting() -> None:
    channels, pol = volume_channels(), policy()
    predict = oom_when(lambda b: b.shape[2] * b.shape[3] * b.shape[4] > 8**3)
    out, _ = sliding_window(channels, OomLadder(predict, pol, min_sub_patch=4), (16, 16, 16), overlap=0.5, batch_size=2)
    np.testing.assert_allclose(out, reference(channels), atol=1e-5)
    assert pol.sub_patch == (8, 8, 8)
    assert any("sub-patches" in e for e in pol.events)


def test_oom_at_the_smallest_sub_patch_finishes_on_the_cpu() -> None:
    channels, pol = volume_channels(), policy()
    device_predict = oom_when(lambda b: True)
    cpu_calls = []

    def cpu_factory():
        cpu_calls.append(1)
        return pointwise

    out, _ = sliding_window(channels, OomLadder(device_predict, pol, cpu_predict=cpu_factory, min_sub_patch=8), (16, 16, 16), overlap=0.5, batch_size=2)
    np.testing.assert_allclose(out, reference(channels), atol=1e-5)
    assert pol.forced_cpu and cpu_calls == [1]
    assert any("CPU" in e for e in pol.events)


def test_non_oom_errors_are_not_swallowed() -> None:
    def broken(batch: np.ndarray) -> np.ndarray:
        raise ValueError("bad input")

    with pytest.raises(ValueError, match="bad input"):
        OomLadder(broken, policy())(np.zeros((2, 2, 4, 4, 4), np.float32))


def _wrap_patch_runner(monkeypatch: pytest.MonkeyPatch, wrapper) -> None:
    """Make Fuser's patch stage call ``wrapper(runner, batch)`` instead of ``runner(batch)``."""
    original = Fuser.stage

    def stage(self: Fuser, channel, which):
        loaded = original(self, channel, which)
        if which == "patch" and not getattr(loaded.runner, "_wrapped", False):
            runner = loaded.runner

            class Wrapped:
                backend, provider, device, _wrapped = runner.backend, runner.provider, runner.device, True

                def __call__(self, batch):
                    return wrapper(runner, batch)

            loaded = dataclasses.replace(loaded, runner=Wrapped())
            self._stages[(channel.name, which)] = loaded
        return loaded

    monkeypatch.setattr(Fuser, "stage", stage)


def _run(root: Path, resources: Path, *extra: str) -> tuple[int, dict, float]:
    report_path = root / "report.json"
    started = time.perf_counter()
    code = inference.main(["--input", str(root), "--output", str(root), "--resources", str(resources), "--device", "cpu", "--threads", "1", "--report", str(report_path), *extra])
    return code, json.loads(report_path.read_text()), time.perf_counter() - started


def test_pipeline_with_injected_oom_writes_the_same_output_as_without(fixture_resources: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    clean_root, oom_root = tmp_path / "clean", tmp_path / "oom"
    for root in (clean_root, oom_root):
        write_case((root / INPUT_SUBDIR).mkdir(parents=True) or root / INPUT_SUBDIR, "case.tif", blob_volume((10, 48, 40)), spacing=(0.8, 0.4, 0.4))
    assert _run(clean_root, fixture_resources)[0] == 0

    def oom_for_batches(runner, batch):
        if len(batch) > 1:
            raise FakeCudaOom()
        return runner(batch)

    _wrap_patch_runner(monkeypatch, oom_for_batches)
    code, report, _ = _run(oom_root, fixture_resources)
    assert code == 0
    clean = tifffile.imread(clean_root / OUTPUT_SUBDIR / "case.tif")
    oom = tifffile.imread(oom_root / OUTPUT_SUBDIR / "case.tif")
    np.testing.assert_allclose(oom, clean, atol=1e-5)
    assert any("out of memory" in e for e in report["policy"]["events"])
    assert report["files"][0]["stages"]["patch"]["batch_size"] == 1


@pytest.mark.parametrize("budget", [3.0, 0.6])
def test_slow_model_still_writes_every_output_within_the_time_budget(fixture_resources: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, budget: float) -> None:
    folder = tmp_path / INPUT_SUBDIR
    folder.mkdir(parents=True)
    for i in range(2):
        write_case(folder, f"case_{i}.tif", blob_volume((24, 64, 64), seed=i), spacing=(0.6, 0.6, 0.6))

    def slow(runner, batch):
        time.sleep(0.1)  # ~ 0.05 s per patch: the full run would need > 100 patches per file
        return runner(batch)

    _wrap_patch_runner(monkeypatch, slow)
    code, report, seconds = _run(tmp_path, fixture_resources, "--time-budget", str(budget))
    assert code == 0
    assert seconds <= budget * 1.05
    assert sorted(p.name for p in (tmp_path / OUTPUT_SUBDIR).iterdir()) == ["case_0.tif", "case_1.tif"]
    levels = [f["degradation"] for f in report["files"]]
    assert all(level >= 1 for level in levels)
    assert any("time budget: level" in e for e in report["policy"]["events"])
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


def test_a_slow_first_batch_alone_does_not_degrade_the_file(fixture_resources: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / INPUT_SUBDIR
    folder.mkdir(parents=True)
    write_case(folder, "case.tif", blob_volume((24, 64, 64)), spacing=(0.6, 0.6, 0.6))
    calls = []

    def warm_up_once(runner, batch):
        calls.append(len(batch))
        if len(calls) == 1:
            time.sleep(0.4)  # one-time warm-up: at this rate the file would need more than the budget
        return runner(batch)

    _wrap_patch_runner(monkeypatch, warm_up_once)
    code, report, seconds = _run(tmp_path, fixture_resources, "--time-budget", "12")
    assert code == 0
    case = report["files"][0]
    total = case["stages"]["patch"]["patches"]
    assert total * 0.4 / calls[0] > 12  # a projection from the first batch alone would exceed the budget
    assert case["degradation"] == 0 and seconds < 12
