"""The Fuser: in-memory entry point, injected stage loaders, the steps of fuse() and their reports."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import tifffile
from conftest import blob_volume, write_case

from fusemycells.backends import LoadedStage, load_stage
from fusemycells.budget import BudgetPolicy
from fusemycells.config import load_manifest
from fusemycells.pipeline import Fuser, process_file

SPACING = (1.0, 0.39, 0.39)


def cpu_policy(**fields) -> BudgetPolicy:
    return BudgetPolicy(device="cpu", half=False, vram_budget_gib=None, time_budget_s=None, threads=1, **fields)


class ScaledRunner:
    """Wraps a runner: its output times ``factor`` (plus ``offset``), e.g. to produce huge corrections."""

    def __init__(self, runner, factor: float = 1.0, offset: float = 0.0) -> None:
        self.runner, self.factor, self.offset = runner, factor, offset
        self.backend, self.provider, self.device = runner.backend, runner.provider, runner.device

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
    written = process_file(path, tmp_path / "out", Fuser(load_manifest(fixture_resources), cpu_policy()), "float32")
    fused = Fuser(load_manifest(fixture_resources), cpu_policy()).fuse(data, SPACING, "nucleus")
    out = fused.to_array()
    assert out.dtype == np.float32 and out.shape == data.shape
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
    gated = dataclasses.replace(channel, postprocess=dataclasses.replace(channel.postprocess, gate_knots=((0.0, 0.0),), sigma_knots=((0.0, 0.5),)))
    manifest = dataclasses.replace(manifest, channels={"nucleus": gated})
    report = Fuser(manifest, cpu_policy(), loader=loader).fuse(blob_volume((6, 24, 20)), SPACING, "nucleus").report
    assert report.adaptive["network_gate"] == 0.0 and report.adaptive["output_sigma"] == 0.5
    assert report.adaptive["relative_noise"] > 0
    assert report.stages == {} and not loads  # neither network ran, nor was one loaded
