"""Network runners, checksum verification, format fallback and manifest parsing."""

from __future__ import annotations

import copy
import json
import logging
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from reference import normalise_intensity

from fusemycells.backends import (
    LoadedStage,
    OnnxRunner,
    TorchScriptRunner,
    backend_order,
    cuda_provider_options,
    load_stage,
    memory_fraction,
    warm_up,
)
from fusemycells.config import ManifestError, load_manifest, parse_manifest, resolve_resources_dir, verify_files
from fusemycells.runtime.budget import BudgetPolicy
from fusemycells.runtime.devices import cuda_available


def _copy(resources: Path, tmp_path: Path) -> Path:
    target = tmp_path / "resources"
    shutil.copytree(resources, target)
    return target


def _flip_bytes(path: Path) -> None:
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    for i in range(middle, middle + 16):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def _raw(resources: Path) -> dict[str, Any]:
    return json.loads((resources / "manifest.json").read_text())


@pytest.mark.parametrize("stage, channels", [("global_stage", 1), ("patch_stage", 2)])
def test_torchscript_and_onnx_runners_agree_on_a_random_batch(
    fixture_resources: Path, stage: str, channels: int
) -> None:
    manifest = load_manifest(fixture_resources)
    spec = getattr(manifest.channel("nucleus"), stage)
    ts = TorchScriptRunner(fixture_resources / spec.files["torchscript"].path, "cpu", threads=1)
    ox = OnnxRunner(fixture_resources / spec.files["onnx"].path, "cpu", threads=1)
    batch = np.random.default_rng(0).normal(size=(3, channels, 12, 14, 10)).astype(np.float32)
    out_ts, out_ox = ts(batch), ox(batch)
    assert out_ts.shape == out_ox.shape == (3, 1, 12, 14, 10)
    assert out_ts.dtype == out_ox.dtype == np.float32
    np.testing.assert_allclose(out_ts, out_ox, atol=1e-4, rtol=0)
    assert not np.allclose(out_ts, batch[:, :1], atol=1e-4), "fixture network must not be an identity"
    assert (ts.backend, ts.provider, ox.backend, ox.provider) == ("torchscript", "CPU", "onnx", "CPU")


@pytest.mark.parametrize("fmt", ["torchscript", "onnx"])
def test_load_stage_strict_with_explicit_backend_uses_it(fixture_resources: Path, fmt: str) -> None:
    manifest = load_manifest(fixture_resources)
    spec = manifest.channel("membrane").patch_stage
    loaded = load_stage(manifest, spec, fmt, "cpu", threads=1, strict=True)
    assert loaded.runner.backend == fmt
    assert loaded.file == spec.files[fmt].path


def test_backend_order_prefers_openvino_on_a_cpu_torchscript_for_bf16_and_on_cuda() -> None:
    assert backend_order("auto", "cpu") == ["openvino", "onnx", "torchscript"]
    assert backend_order("auto", "cpu", "bf16") == ["torchscript", "openvino", "onnx"]
    assert backend_order("auto", "cuda") == ["torchscript", "onnx"]
    assert backend_order("torchscript", "cpu") == ["torchscript", "onnx", "openvino"]
    with pytest.raises(ValueError):
        backend_order("tensorrt", "cpu")


def test_tampered_file_strict_raises_manifest_error_naming_it(fixture_resources: Path, tmp_path: Path) -> None:
    resources = _copy(fixture_resources, tmp_path)
    manifest = load_manifest(resources)
    spec = manifest.channel("nucleus").global_stage
    name = spec.files["onnx"].path
    _flip_bytes(resources / name)
    with pytest.raises(ManifestError, match="checksum mismatch") as info:
        load_stage(manifest, spec, "onnx", "cpu", threads=1, strict=True)
    assert name in str(info.value)


def test_tampered_file_auto_falls_back_to_other_format_and_logs(
    fixture_resources: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    resources = _copy(fixture_resources, tmp_path)
    manifest = load_manifest(resources)
    spec = manifest.channel("nucleus").global_stage
    bad = spec.files["onnx"].path  # auto on CPU tries ONNX first
    _flip_bytes(resources / bad)
    with caplog.at_level(logging.WARNING, logger="fusemycells"):
        loaded = load_stage(manifest, spec, "auto", "cpu", threads=1, strict=False)
    assert loaded.runner.backend == "torchscript"
    assert any(bad in r.getMessage() for r in caplog.records)
    assert any("using torchscript" in r.getMessage() for r in caplog.records)


def test_both_formats_tampered_raises_naming_both(fixture_resources: Path, tmp_path: Path) -> None:
    resources = _copy(fixture_resources, tmp_path)
    manifest = load_manifest(resources)
    spec = manifest.channel("nucleus").patch_stage
    for weights in spec.files.values():
        _flip_bytes(resources / weights.path)
    with pytest.raises(ManifestError, match="no usable weights") as info:
        load_stage(manifest, spec, "auto", "cpu", threads=1)
    for weights in spec.files.values():
        assert weights.path in str(info.value)


def test_missing_weights_file_raises_clear_error(fixture_resources: Path, tmp_path: Path) -> None:
    resources = _copy(fixture_resources, tmp_path)
    manifest = load_manifest(resources)
    spec = manifest.channel("nucleus").patch_stage
    name = spec.files["torchscript"].path
    (resources / name).unlink()
    with pytest.raises(ManifestError, match="weights file missing") as info:
        load_stage(manifest, spec, "torchscript", "cpu", threads=1, strict=True)
    assert name in str(info.value)


def test_valid_file_that_does_not_load_is_a_manifest_error(fixture_resources: Path, tmp_path: Path) -> None:
    # checksum matches but the content is not a network: must still be refused, never a crash
    resources = _copy(fixture_resources, tmp_path)
    (resources / "junk.onnx").write_bytes(b"junk")
    raw = _raw(resources)
    from fusemycells.config import sha256_of

    raw["channels"]["nucleus"]["global_stage"]["files"]["onnx"] = {
        "path": "junk.onnx",
        "sha256": sha256_of(resources / "junk.onnx"),
    }
    manifest = parse_manifest(raw, resources)
    with pytest.raises(ManifestError, match="cannot load ONNX file"):
        load_stage(manifest, manifest.channel("nucleus").global_stage, "onnx", "cpu", threads=1, strict=True)


@pytest.mark.parametrize("stage, wrong", [("global_stage", 2), ("patch_stage", 1), ("patch_stage", 3)])
def test_in_channels_not_fed_by_the_pipeline_raise_manifest_error_naming_the_files(fixture_resources: Path, stage: str, wrong: int) -> None:
    raw = _raw(fixture_resources)
    raw["channels"]["nucleus"][stage]["in_channels"] = wrong
    manifest = parse_manifest(raw, fixture_resources)
    spec = getattr(manifest.channel("nucleus"), stage)
    with pytest.raises(ManifestError, match=f"in_channels={wrong}") as info:
        load_stage(manifest, spec, "auto", "cpu", threads=1)
    message = str(info.value)
    assert "manifest.json" in message
    assert all(weights.path in message for weights in spec.files.values())
    good = getattr(load_manifest(fixture_resources).channel("nucleus"), stage)
    assert load_stage(manifest, good, "auto", "cpu", threads=1).spec.in_channels == {"global_stage": 1, "patch_stage": 2}[stage]


def _broken(raw: dict[str, Any], edit: str) -> dict[str, Any]:
    raw = copy.deepcopy(raw)
    nucleus = raw["channels"]["nucleus"]
    if edit == "no_patch_stage":
        del nucleus["patch_stage"]
    elif edit == "no_in_channels":
        del nucleus["global_stage"]["in_channels"]
    elif edit == "no_files":
        del nucleus["patch_stage"]["files"]
    elif edit == "no_sha":
        del nucleus["patch_stage"]["files"]["onnx"]["sha256"]
    elif edit == "no_grid":
        del nucleus["global_stage"]["grid"]
    elif edit == "no_patch_size":
        del nucleus["patch_stage"]["patch_size"]
    elif edit == "grid_two_values":
        nucleus["global_stage"]["grid"] = [24, 24]
    elif edit == "grid_negative":
        nucleus["global_stage"]["grid"] = [24, -24, 24]
    elif edit == "grid_float":
        nucleus["global_stage"]["grid"] = [24.5, 24, 24]
    elif edit == "unknown_format":
        nucleus["patch_stage"]["files"]["tensorrt"] = {"path": "x.plan", "sha256": "0"}
    elif edit == "bad_version":
        raw["format_version"] = 3
    elif edit == "no_channels":
        raw["channels"] = {}
    return raw


@pytest.mark.parametrize(
    "edit",
    [
        "no_patch_stage",
        "no_in_channels",
        "no_files",
        "no_sha",
        "no_grid",
        "no_patch_size",
        "grid_two_values",
        "grid_negative",
        "grid_float",
        "unknown_format",
        "bad_version",
        "no_channels",
    ],
)
def test_malformed_manifest_raises_manifest_error(fixture_resources: Path, edit: str) -> None:
    raw = _raw(fixture_resources)
    parse_manifest(raw, fixture_resources)  # the unedited manifest parses
    with pytest.raises(ManifestError):
        parse_manifest(_broken(raw, edit), fixture_resources)


def test_manifest_parses_fixture_values(fixture_resources: Path) -> None:
    manifest = load_manifest(fixture_resources)
    assert sorted(manifest.channels) == ["membrane", "nucleus"]
    nucleus = manifest.channel("nucleus")
    assert nucleus.global_stage.grid == (24, 24, 24)
    assert nucleus.patch_stage.patch_size == (16, 16, 16)
    assert nucleus.postprocess.diff_grid == (16, 16, 16)
    assert nucleus.postprocess.output_percentiles == (2.0, 99.8)
    with pytest.raises(ManifestError, match="no weights for channel"):
        manifest.channel("actin")


def test_missing_or_invalid_manifest_json_raises(tmp_path: Path) -> None:
    with pytest.raises(ManifestError, match="not found"):
        load_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(ManifestError, match="not valid JSON"):
        load_manifest(tmp_path)


def test_resources_dir_resolution_order(fixture_resources: Path, tmp_path: Path) -> None:
    default = tmp_path / "bundled"
    explicit, why = resolve_resources_dir(tmp_path / "mine", model_dir=fixture_resources, default=default)
    assert explicit == tmp_path / "mine" and why == "--resources"
    assert resolve_resources_dir(None, model_dir=fixture_resources, default=default)[0] == fixture_resources
    broken = tmp_path / "broken_model"
    broken.mkdir()
    (broken / "manifest.json").write_text("{}")
    chosen, why = resolve_resources_dir(None, model_dir=broken, default=default)
    assert chosen == default and "ignored" in why
    assert resolve_resources_dir(None, model_dir=tmp_path / "absent", default=default)[0] == default


def test_model_archive_with_an_unusable_stage_is_ignored_but_one_bad_format_is_tolerated(fixture_resources: Path, tmp_path: Path) -> None:
    default = tmp_path / "bundled"
    model = tmp_path / "model"
    shutil.copytree(fixture_resources, model)
    manifest = json.loads((model / "manifest.json").read_text())
    files = manifest["channels"]["nucleus"]["patch_stage"]["files"]
    (model / files["onnx"]["path"]).write_bytes(b"tampered")
    assert resolve_resources_dir(None, model_dir=model, default=default)[0] == model  # TorchScript still verifies
    assert verify_files(load_manifest(model)) == []
    strict = verify_files(load_manifest(model), require_all=True)  # the fixture's channels share files
    assert {m.split(":")[0] for m in strict} == {"nucleus.patch_stage", "membrane.patch_stage"}
    assert all("checksum mismatch" in m for m in strict)
    (model / files["torchscript"]["path"]).unlink()
    chosen, why = resolve_resources_dir(None, model_dir=model, default=default)
    assert chosen == default and "patch_stage" in why and "missing" in why


def test_manifest_knots_must_be_pairs_with_increasing_noise(fixture_resources: Path) -> None:
    raw = json.loads((fixture_resources / "manifest.json").read_text())
    good = copy.deepcopy(raw)
    good["channels"]["nucleus"]["postprocess"].update(output_sigma_knots=[[0.01, 0.3], [0.05, 1.0]], gate_knots=[[0.06, 1], [0.09, 0]], background_threshold=0.1)
    post = parse_manifest(good, fixture_resources).channel("nucleus").postprocess
    assert post.output_sigma_knots == ((0.01, 0.3), (0.05, 1.0)) and post.background_threshold == 0.1
    for bad in ([[0.05, 1.0], [0.01, 0.3]], [[0.01]], "x"):
        broken = copy.deepcopy(raw)
        broken["channels"]["nucleus"]["postprocess"]["output_sigma_knots"] = bad
        with pytest.raises(ManifestError, match="output_sigma_knots"):
            parse_manifest(broken, fixture_resources)


def test_cuda_provider_options_cap_memory_at_the_vram_budget_with_heuristic_search() -> None:
    options = cuda_provider_options(2.5)
    assert options["gpu_mem_limit"] == str(int(2.5 * 2**30))
    assert options["cudnn_conv_algo_search"] == "HEURISTIC" and options["device_id"] == "0"
    assert "gpu_mem_limit" not in cuda_provider_options(None)


def test_memory_fraction_is_the_budget_over_the_device_total_capped_at_one() -> None:
    assert memory_fraction(8.0, 16 * 2**30) == pytest.approx(0.5)
    assert memory_fraction(80.0, 16 * 2**30) == 1.0
    assert memory_fraction(None, 16 * 2**30) is None


def test_onnx_runner_asks_for_cuda_with_the_budgeted_provider_options(fixture_resources: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import onnxruntime as ort

    seen: list[object] = []
    real_session = ort.InferenceSession

    def session(path, sess_options=None, providers=None):
        seen.extend(providers)
        return real_session(path, sess_options=sess_options, providers=["CPUExecutionProvider"])  # no GPU here

    monkeypatch.setattr(ort, "InferenceSession", session)
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    monkeypatch.setattr("fusemycells.backends.preload_cuda_libraries", lambda _ort: None)
    spec = load_manifest(fixture_resources).channel("nucleus").patch_stage
    runner = OnnxRunner(fixture_resources / spec.files["onnx"].path, "cuda", threads=1, vram_budget_gib=1.5)
    assert seen == [("CUDAExecutionProvider", cuda_provider_options(1.5)), "CPUExecutionProvider"]
    assert runner.provider == "CPU"  # reported truthfully: the session fell back to the CPU


@pytest.mark.cuda
@pytest.mark.skipif(not cuda_available(), reason="needs a CUDA device")
def test_onnx_cuda_io_binding_matches_the_cpu_after_percentile_normalisation(fixture_resources: Path) -> None:
    spec = load_manifest(fixture_resources).channel("nucleus").patch_stage
    path = fixture_resources / spec.files["onnx"].path
    cpu, gpu = OnnxRunner(path, "cpu", threads=1), OnnxRunner(path, "cuda", vram_budget_gib=1.0)
    assert gpu.provider == "CUDA"
    batch = np.random.default_rng(0).normal(size=(2, 2, 32, 32, 32)).astype(np.float32)
    out_cpu, out_gpu = cpu(batch), gpu(batch)
    assert out_gpu.shape == out_cpu.shape and out_gpu.dtype == np.float32
    for a, b in zip(out_cpu, out_gpu):
        assert np.abs(normalise_intensity(a[0]) - normalise_intensity(b[0])).max() <= 1e-2


class CountingRunner:
    """Records the batch shapes it is called with; raises ``error`` when one is given."""

    backend, provider, device, precision = "onnx", "CPU", "cpu", "fp32"

    def __init__(self, error: Exception | None = None) -> None:
        self.shapes: list[tuple[int, ...]] = []
        self.error = error

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        self.shapes.append(batch.shape)
        if self.error is not None:
            raise self.error
        return batch[:, :1]


def test_warm_up_runs_one_patch_of_the_patch_stage_only(fixture_resources: Path) -> None:
    channel = load_manifest(fixture_resources).channel("nucleus")
    patch, glob = CountingRunner(), CountingRunner()
    seconds = warm_up(LoadedStage(spec=channel.patch_stage, runner=patch, file="p.onnx"))
    assert seconds is not None and seconds >= 0.0
    assert patch.shapes == [(1, channel.patch_stage.in_channels, *channel.patch_stage.patch_size)]
    assert warm_up(LoadedStage(spec=channel.global_stage, runner=glob, file="g.onnx")) is None and not glob.shapes


def test_warm_up_out_of_memory_is_left_to_the_oom_ladder_but_other_errors_raise(fixture_resources: Path) -> None:
    spec = load_manifest(fixture_resources).channel("nucleus").patch_stage
    assert warm_up(LoadedStage(spec=spec, runner=CountingRunner(RuntimeError("CUDA out of memory")), file="p")) is None
    with pytest.raises(ValueError, match="broken"):
        warm_up(LoadedStage(spec=spec, runner=CountingRunner(ValueError("broken")), file="p"))


def test_fuser_warms_up_a_patch_stage_once_when_it_loads(fixture_resources: Path) -> None:
    from fusemycells.pipeline import Fuser

    runners: dict[str, CountingRunner] = {}

    def loader(manifest, spec, backend, device, **options) -> LoadedStage:
        runners[device] = CountingRunner()
        return LoadedStage(spec=spec, runner=runners[device], file=f"{device}.onnx")

    manifest = load_manifest(fixture_resources)
    fuser = Fuser(manifest, BudgetPolicy(device="cuda", half=False, vram_budget_gib=None, time_budget_s=None, threads=1), loader=loader)
    channel = manifest.channel("nucleus")
    stage = fuser.patch_stage(channel)
    assert fuser.patch_stage(channel) is stage and list(runners) == ["cuda"]
    assert stage.ladder.cpu_predict is not None
    stage.ladder.cpu_predict()  # what the OOM ladder loads when it falls back to the CPU
    warm = (1, 2, *channel.patch_stage.patch_size)
    assert runners["cuda"].shapes == [warm] and runners["cpu"].shapes == [warm]  # each loaded stage warmed up once


def test_onnx_sessions_of_all_stages_share_the_vram_budget(fixture_resources: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import onnxruntime as ort

    from fusemycells.pipeline import Fuser

    limits: list[int] = []
    real_session = ort.InferenceSession

    def session(path, sess_options=None, providers=None):
        limits.extend(int(p[1]["gpu_mem_limit"]) for p in providers if isinstance(p, tuple))
        return real_session(path, sess_options=sess_options, providers=["CPUExecutionProvider"])  # no GPU here

    monkeypatch.setattr(ort, "InferenceSession", session)
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    monkeypatch.setattr("fusemycells.backends.preload_cuda_libraries", lambda _ort: None)
    manifest = load_manifest(fixture_resources)
    policy = BudgetPolicy(device="cuda", half=False, vram_budget_gib=8.0, time_budget_s=None, threads=1)
    fuser = Fuser(manifest, policy, backend="onnx")
    for channel in ("nucleus", "membrane"):
        fuser.fuse(np.random.default_rng(0).random((6, 24, 24), dtype=np.float32), (1.0, 0.4, 0.4), channel)
    assert len(limits) == 4  # a global and a patch session per channel, all open at once
    assert sum(limits) <= 8 * 2**30
