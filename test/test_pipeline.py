"""The Fuser: in-memory entry point, injected stage loaders, the steps of fuse() and their reports."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import tifffile
from conftest import blob_volume, write_case

from fusemycells.backends import LoadedStage, load_stage
from fusemycells.config import load_manifest
from fusemycells.files import process_file
from fusemycells.patch_stage import PatchStage, stage1_correction
from fusemycells.pipeline import Fuser
from fusemycells.postprocess import FLOAT16_MAX
from fusemycells.runtime.budget import BudgetPolicy
from fusemycells.runtime.deadline import Countdown
from fusemycells.sources import ArraySource

SPACING = (1.0, 0.39, 0.39)


def cpu_policy(**fields) -> BudgetPolicy:
    return BudgetPolicy(device="cpu", half=False, vram_budget_gib=None, time_budget_s=None, threads=1, **fields)


class ScaledRunner:
    """Wraps a runner: its output times ``factor`` (plus ``offset``), e.g. to produce huge corrections."""

    def __init__(self, runner, factor: float = 1.0, offset: float = 0.0) -> None:
        self.runner, self.factor, self.offset = runner, factor, offset
        self.backend, self.provider, self.device = runner.backend, runner.provider, runner.device
        self.precision = runner.precision

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        return (self.runner(batch) * self.factor + self.offset).astype(np.float32)


def patch_loader(make_runner):
    """A stage loader whose patch-stage runner is ``make_runner(real_runner)`` (the global stage is real)."""

    def loader(manifest, spec, backend, device, **options) -> LoadedStage:
        loaded = load_stage(manifest, spec, backend, device, **options)
        return dataclasses.replace(loaded, runner=make_runner(loaded.runner)) if spec.patch_size is not None else loaded

    return loader


def test_fuse_on_an_array_gives_the_file_pipelines_output_and_its_own_report(fixture_resources: Path, tmp_path: Path) -> None:
    data = blob_volume((10, 40, 36))
    path = write_case(tmp_path / "in", "case.tif", data.copy(), spacing=SPACING)
    written = process_file(path, tmp_path / "out", Fuser(load_manifest(fixture_resources), cpu_policy()), "uint16")
    fused = Fuser(load_manifest(fixture_resources), cpu_policy()).fuse(data, SPACING, "nucleus")  # uint16 by default
    out = fused.to_array()
    assert out.dtype == np.uint16 and out.shape == data.shape
    np.testing.assert_array_equal(out, tifffile.imread(tmp_path / "out" / "case.tif"))
    report = fused.report
    assert report.file == "<array>" and report.shape == [10, 40, 36] and report.channel == "nucleus"
    assert report.stages == written.stages | {"patch": {**written.stages["patch"], "forward_s": report.stages["patch"]["forward_s"]}}
    assert report.degradation == 0 and set(report.seconds) >= {"preprocess", "global_stage", "patch_stage", "postprocess"}


def test_fuse_writes_uint16_when_asked_and_refuses_an_unknown_channel(fixture_resources: Path) -> None:
    fuser = Fuser(load_manifest(fixture_resources), cpu_policy())
    out = fuser.fuse(blob_volume((6, 24, 24)), SPACING, "membrane", output_dtype="uint16").to_array()
    assert out.dtype == np.uint16 and out.min() == 0 and out.max() == 65535
    with pytest.raises(Exception, match="no weights for channel 'cytoplasm'"):
        fuser.fuse(blob_volume((6, 24, 24)), SPACING, "cytoplasm")


def test_network_gate_zero_skips_both_stages_and_reports_the_noise_policy(fixture_resources: Path) -> None:
    manifest = load_manifest(fixture_resources)
    loads: list[str] = []

    def loader(manifest, spec, backend, device, **options) -> LoadedStage:
        loads.append(device)
        return load_stage(manifest, spec, backend, device, **options)

    channel = manifest.channel("nucleus")
    gated = dataclasses.replace(channel, postprocess=dataclasses.replace(channel.postprocess, gate_knots=((0.0, 0.0),), output_sigma_knots=((0.0, 0.5),)))
    manifest = dataclasses.replace(manifest, channels={"nucleus": gated})
    report = Fuser(manifest, cpu_policy(), loader=loader).fuse(blob_volume((6, 24, 20)), SPACING, "nucleus").report
    assert report.adaptive["network_gate"] == 0.0 and report.adaptive["output_sigma"] == 0.5
    assert report.adaptive["relative_noise"] > 0
    assert report.stages == {} and not loads  # neither network ran, nor was one loaded



def test_a_noise_adaptive_output_sigma_is_applied_as_the_sigma_the_cases_noise_picks(fixture_resources: Path) -> None:
    manifest = load_manifest(fixture_resources)
    channel = manifest.channel("nucleus")

    def fused(knots: tuple[tuple[float, float], ...]) -> tuple[np.ndarray, dict]:
        post = dataclasses.replace(channel.postprocess, gate_knots=((0.0, 0.0),), output_sigma_knots=knots)
        one = dataclasses.replace(manifest, channels={"nucleus": dataclasses.replace(channel, postprocess=post)})
        result = Fuser(one, cpu_policy()).fuse(blob_volume((6, 24, 20)), SPACING, "nucleus", output_dtype="float32")
        return result.to_array(), result.report.adaptive

    adaptive, report = fused(((0.0, 0.3), (1.0, 3.0)))  # σ rises with the relative noise: a case's noise picks one
    sigma = report["output_sigma"]
    assert 0.3 < sigma < 3.0
    constant, _ = fused(((0.0, sigma),))
    np.testing.assert_allclose(adaptive, constant, atol=1e-4)  # as that constant σ would be (the report rounds σ)
    assert np.abs(adaptive - fused(())[0]).max() > 1e-3  # and it does filter

def test_a_huge_float16_correction_is_clipped_so_the_output_stays_finite(fixture_resources: Path) -> None:
    # compact_voxels=0: the correction on H is float16 (as on a big stack); a patch network output of
    # 1e6 (a narrow percentile span on the level-2 fallback of a big stack does the same) is beyond
    # float16's ±65504: cast unclipped it is ±inf, and inf·0 is NaN in the interpolation and weight map
    loader = patch_loader(lambda runner: ScaledRunner(runner, factor=1e6))
    fuser = Fuser(load_manifest(fixture_resources), cpu_policy(compact_voxels=0), loader=loader)
    fused = fuser.fuse(blob_volume((6, 32, 32)), SPACING, "nucleus", output_dtype="float32")  # the values themselves
    out = fused.to_array()
    assert np.isfinite(out).all() and out.max() > out.min()
    assert fused.report.degradation == 0 and np.isfinite(list(fused.report.weight_map.values())).all()


def test_the_stage1_fallback_correction_is_clipped_to_float16_too() -> None:
    out = np.empty((3, 4, 4), np.float16)
    stage1_correction(ArraySource(np.zeros((3, 4, 4), np.float32)), ArraySource(np.full((3, 4, 4), -1e6, np.float32)), out)
    assert np.isfinite(out).all() and out.min() == -FLOAT16_MAX


class FailingRunner:
    backend, provider, device, precision = "onnx", "CPU", "cpu", "fp32"

    def __init__(self, error: BaseException) -> None:
        self.error = error

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        raise self.error


def _failing_fuser(resources: Path, error: BaseException) -> Fuser:
    def loader(manifest, spec, backend, device, **options) -> LoadedStage:
        return LoadedStage(spec=spec, runner=FailingRunner(error), file="failing.onnx")

    return Fuser(load_manifest(resources), cpu_policy(), loader=loader)


def test_an_unexpected_error_writes_the_identity_output_with_its_traceback_logged_at_error(fixture_resources: Path, tmp_path: Path, caplog) -> None:
    # the identity's values: test_device_faults.py
    path = write_case(tmp_path / "in", "case.tif", blob_volume((6, 24, 24)), spacing=SPACING)
    with caplog.at_level("INFO", logger="fusemycells"):
        report = process_file(path, tmp_path / "out", _failing_fuser(fixture_resources, ValueError("a bug")), "float32")
    assert report.status == "fallback_identity" and report.error == "case.tif: ValueError: a bug"
    assert (tmp_path / "out" / "case.tif").exists()
    logged = [r for r in caplog.records if r.levelname == "ERROR" and r.exc_info is not None]
    assert logged and logged[0].exc_info[0] is ValueError  # the traceback is in the container's log


def test_running_out_of_host_memory_while_computing_is_not_called_a_budget_refusal(fixture_resources: Path, tmp_path: Path, caplog) -> None:
    path = write_case(tmp_path / "in", "case.tif", blob_volume((6, 24, 24)), spacing=SPACING)
    with caplog.at_level("INFO", logger="fusemycells"):
        report = process_file(path, tmp_path / "out", _failing_fuser(fixture_resources, MemoryError("cannot allocate 2 GiB")), "float32")
    assert report.status == "fallback_identity"  # the read input gets the identity output (docs/output_and_device_faults.md)
    assert "budget" not in report.error and "ran out of memory while processing" in report.error and "cannot allocate 2 GiB" in report.error
    assert any(r.levelname == "ERROR" and r.exc_info is not None for r in caplog.records)


def test_a_stack_over_the_ram_budget_is_refused_as_such_before_computing(fixture_resources: Path, tmp_path: Path) -> None:
    path = write_case(tmp_path / "in", "case.tif", blob_volume((6, 24, 24)), spacing=SPACING)
    fuser = Fuser(load_manifest(fixture_resources), cpu_policy(ram_budget_bytes=1 << 20))
    report = process_file(path, tmp_path / "out", fuser, "float32")
    assert report.status == "refused" and "over the RAM budget" in report.error and "global_stage" not in report.seconds


class SubPatchOnlyRunner:
    """A 'GPU' runner that runs out of memory for patches above ``max_voxels`` and runs smaller ones."""

    backend, provider, device, precision = "torchscript", "CUDA", "cuda", "fp16"

    def __init__(self, runner, max_voxels: int) -> None:
        self.runner, self.max_voxels = runner, max_voxels

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        if len(batch) * np.prod(batch.shape[2:]) > self.max_voxels:
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return self.runner(batch)


def test_sub_patch_tiling_after_oom_is_reported_as_a_quality_caveat(fixture_resources: Path) -> None:
    manifest = load_manifest(fixture_resources)
    spec = manifest.channel("nucleus").patch_stage  # 16³ patches

    def load(device: str) -> LoadedStage:
        cpu = load_stage(manifest, spec, "onnx", "cpu", threads=1)
        return dataclasses.replace(cpu, runner=SubPatchOnlyRunner(cpu.runner, 8**3)) if device == "cuda" else cpu

    policy = BudgetPolicy(device="cuda", half=False, vram_budget_gib=None, time_budget_s=None, threads=1)
    stage = PatchStage(spec, load, policy, min_sub_patch=8)
    rng = np.random.default_rng(0)
    x_h, p1_h = (ArraySource(rng.random((16, 24, 24), dtype=np.float32)) for _ in range(2))
    result = stage(x_h, p1_h, Countdown())
    assert result.info is not None and result.info["sub_patch"] == [8, 8, 8] and not result.degradations
    assert any("sub-patches" in w and "differs" in w for w in result.warnings)
    assert np.isfinite(result.correction).all()


@pytest.mark.parametrize("dtype, value", [("float64", 1e39), ("float32", 3e38)])
def test_a_value_beyond_float32s_range_is_clipped_counted_and_the_output_stays_usable(fixture_resources: Path, tmp_path: Path, dtype: str, value: float) -> None:
    data = blob_volume((12, 48, 48)).astype(dtype)
    clean = data.astype(np.float32)
    data[6, 24, 24] = value  # one corrupt voxel: as float32 it is inf (or overflows the arithmetic)
    path = write_case(tmp_path / "in", "case.tif", data, spacing=SPACING)
    fuser = Fuser(load_manifest(fixture_resources), cpu_policy())
    for output_dtype in ("float32", "uint16"):
        report = process_file(path, tmp_path / output_dtype, fuser, output_dtype)
        out = tifffile.imread(tmp_path / output_dtype / "case.tif")
        assert report.status == "ok" and report.out_of_range_clipped == 1 and report.non_finite_replaced == 0
        assert any("1 voxels outside" in w and "clipped" in w for w in report.warnings)
        assert np.isfinite(out).all() and np.count_nonzero(out) > 0  # not NaN, not all zeros
    far = np.ones(data.shape, dtype=bool)
    far[2:11, 12:37, 12:37] = False  # away from the clipped voxel's neighbourhood
    reference = Fuser(load_manifest(fixture_resources), cpu_policy()).fuse(clean, SPACING, "nucleus", output_dtype="float32").to_array()
    out = tifffile.imread(tmp_path / "float32" / "case.tif")
    assert np.corrcoef(out[far], reference[far])[0, 1] > 0.5  # the rest of the image is still there


def test_an_output_name_the_output_folder_cannot_hold_is_refused_before_any_pixel_is_read(fixture_resources: Path, tmp_path: Path) -> None:
    path = tmp_path / "in" / "case.tif"
    path.parent.mkdir()
    path.write_bytes(b"not a TIFF at all")  # reading it would refuse it for another reason
    too_deep = tmp_path.joinpath(*["d" * 200] * 25)  # an output path over the 4096-byte limit (not created)
    fuser = Fuser(load_manifest(fixture_resources), cpu_policy())
    report = process_file(path, too_deep, fuser, "float32")
    assert report.status == "refused" and "readable" not in report.error
    assert "path limit" in report.error or "File name too long" in report.error  # io.check_output_name's words or the OS's
    assert "read" not in report.seconds


class ThreadCountingRunner:
    """A runner that records torch's intra-op thread count at each call (stands in for ``backend`` on ``device``)."""

    def __init__(self, runner, backend: str, device: str) -> None:
        self.runner, self.backend, self.device, self.provider = runner, backend, device, runner.provider
        self.precision = runner.precision
        self.torch_cpu_forward = backend == "torchscript" and device == "cpu"  # as backends.TorchScriptRunner says
        self.threads: list[int] = []

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        import torch

        self.threads.append(torch.get_num_threads())
        return self.runner(batch)


@pytest.mark.parametrize(
    "backend, device, policy_threads, expected",
    [
        ("onnx", "cpu", 2, 1),  # ONNX Runtime's own threads: torch's OpenMP pool kept out of their way
        ("torchscript", "cuda", 2, 1),  # the forward is on the device: the host's addcmul_ on one thread
        ("torchscript", "cpu", 2, 1),  # two single-threaded forwards side by side
        ("torchscript", "cpu", 1, None),  # one TorchScript forward on the CPU keeps torch's threads
    ],
)
def test_the_patch_stage_runs_torch_on_one_thread_unless_one_torchscript_cpu_forward_needs_them(
    fixture_resources: Path, backend: str, device: str, policy_threads: int, expected: int | None
) -> None:
    import torch

    manifest = load_manifest(fixture_resources)
    spec = manifest.channel("nucleus").patch_stage
    runner: list[ThreadCountingRunner] = []

    def load(dev: str) -> LoadedStage:
        cpu = load_stage(manifest, spec, "onnx", "cpu", threads=1)
        runner.append(ThreadCountingRunner(cpu.runner, backend, device))
        return dataclasses.replace(cpu, runner=runner[-1])

    policy = BudgetPolicy(device=device, half=False, vram_budget_gib=None, time_budget_s=None, threads=policy_threads)
    outside = torch.get_num_threads()
    rng = np.random.default_rng(0)
    x_h, p1_h = (ArraySource(rng.random((16, 24, 24), dtype=np.float32)) for _ in range(2))
    PatchStage(spec, load, policy)(x_h, p1_h, Countdown())
    assert runner[0].threads and set(runner[0].threads) == {outside if expected is None else expected}
    assert torch.get_num_threads() == outside  # restored


def test_a_channel_whose_trust_keeps_the_networks_off_never_loads_them(fixture_resources: Path, tmp_path: Path) -> None:
    """Calibrated to networks off (every rule's factor 0: :func:`fusemycells.trust.never`), a channel's networks
    would never run: loading them (an OpenVINO compile per stage) is skipped, and the file is still written."""
    from fusemycells.config import TrustSpec

    manifest = load_manifest(fixture_resources)
    off = TrustSpec(mode="case", rules=(("noise", ((0.0, 0.0), (1.0, 0.0))),))
    channels = {name: dataclasses.replace(spec, trust=off) for name, spec in manifest.channels.items()}
    loads: list[str] = []

    def loader(manifest, spec, backend, device, **options) -> LoadedStage:
        loads.append(spec.files["onnx"].path)
        return load_stage(manifest, spec, backend, device, **options)

    fuser = Fuser(dataclasses.replace(manifest, channels=channels), cpu_policy(), loader=loader)
    path = write_case(tmp_path / "in", "case.tif", blob_volume((6, 24, 24)), spacing=SPACING)
    report = process_file(path, tmp_path / "out", fuser, "float32")
    assert report.status == "ok" and report.stages == {}
    assert loads == []
    assert (tmp_path / "out" / "case.tif").exists()
