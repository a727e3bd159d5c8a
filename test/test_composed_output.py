"""The composed output of the shipped pipeline (Fuser.fuse) equals an independent whole-volume oracle.

``test/oracle.py`` implements the method from its description with whole-array numpy/scipy and a
brute-force stitching loop, and nothing from ``fusemycells``; the stage-2 fixture network's output
depends on the position inside the patch (:class:`conftest.PositionNet`), so the stitching weights show
in the output. Twin tests (each streamed step vs its whole-volume twin in ``test/reference.py``) cannot see
a bug in how the steps compose; these can.

Tolerance: :data:`TOLERANCE` on the final output (percentile-normalised: its 2–99.8 % range is 0–1).
The pipeline computes in float32 (the oracle in float64), runs the networks through ONNX Runtime (the
oracle: the torch modules), composes the two resizes of the global stage into one map and applies
resizes as band matrices with torch: differences of float32 rounding, ≤ 4e-7 measured on every path and level. The
planted bugs this file is there for change the output by 0.01–0.1.

Where the pipeline differs from the oracle by design (and these tests stay clear of it): percentiles
are taken on a strided sample above 4·10⁶ voxels, the correction on H is kept in float16 above 2²⁷
voxels (``BudgetPolicy.compact_output``), and the stages stream z-slabs (halo reads, edge padding:
equal to whole-volume filtering, tested in test_reference.py) — the volumes here are small, so every
path computes exactly what the oracle does. The degradation levels are forced through the patch
rate the stage learned (an earlier, slower file) and the deadline, as a real run would reach them.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import oracle
import pytest
import torch
from conftest import PositionNet, SmoothingNet, blob_volume, export_fixture_stage
from scipy import ndimage

from fusemycells.backends import LoadedStage, load_stage
from fusemycells.config import load_manifest
from fusemycells.ops import Ops, choose_ops
from fusemycells.pipeline import Fuser
from fusemycells.runtime.budget import BudgetPolicy

TOLERANCE = 1e-4
"""Largest |pipeline − oracle| accepted on the normalised output (float32 vs float64 arithmetic; see the module doc)."""
SPACING = (1.4, 0.39, 0.39)  # Z is upsampled onto H (0.6 µm), Y and X downsampled: both directions of every resize
SHAPE = (12, 60, 56)  # H: 28 × 39 × 36, 48 patches of 16³ with overlap 0.5, 18 without

POSTPROCESS: dict[str, Any] = {
    "diff_grid": [16, 24, 24],
    "weight_max_filter": 3,
    "weight_sigma": 1.0,
    "weight_filter_unit": "voxel",
    "weight_percentiles": [5.0, 95.0],
    "output_max_filter": 0,
    "output_sigma_knots": [[0.0, 0.7]],  # a constant output σ of 0.7
    "output_sigma_isotropic_um": True,
    "output_percentiles": [2.0, 99.8],
    "gate_knots": [[0.0, 0.7]],  # a constant gate of 0.7
    "background_threshold": 0.1,
}
"""Every post-processing field, explicit (the oracle has no defaults), none at a value that hides a step."""


def torch_network(module: torch.nn.Module) -> oracle.Network:
    """A fixture module as the oracle's network (eager torch, float32)."""
    module.eval()

    def run(batch: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return module(torch.from_numpy(batch)).numpy()

    return run


def write_manifest(
    resources: Path, postprocess: dict[str, Any], trust: dict[str, Any] | None = None, low_percentile: float = 1.0
) -> dict[str, Any]:
    """Fixture networks (stage 1: SmoothingNet, stage 2: PositionNet) and a one-channel manifest in ``resources``
    (input normalisation: percentiles ``low_percentile`` and 99.8 to 0 and 1)."""
    resources.mkdir(parents=True, exist_ok=True)
    channel: dict[str, Any] = {
        "target_spacing_um": 0.6,
        "normalisation": {"kind": "percentile", "low": low_percentile, "high": 99.8},
        "global_stage": {"in_channels": 1, "grid": [24, 24, 24], "files": export_fixture_stage(SmoothingNet(1), 1, resources, "s1")},
        "patch_stage": {
            "in_channels": 2, "patch_size": [16, 16, 16], "overlap": 0.5, "batch_size": 2,
            "files": export_fixture_stage(PositionNet(), 2, resources, "s2"),
        },
        "postprocess": postprocess,
    }  # fmt: skip
    if trust is not None:
        channel["trust"] = trust
    manifest = {"format_version": 2, "provenance": {"note": "test fixture"}, "channels": {"nucleus": channel}}
    (resources / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return manifest


@pytest.fixture(scope="module")
def composed_resources(tmp_path_factory: pytest.TempPathFactory) -> Path:
    resources = tmp_path_factory.mktemp("composed")
    write_manifest(resources, POSTPROCESS)
    return resources


def channel_json(resources: Path) -> dict[str, Any]:
    return json.loads((resources / "manifest.json").read_text())["channels"]["nucleus"]


def empty_space_volume(shape: tuple[int, int, int] = SHAPE) -> np.ndarray:
    """uint16 ZYX stack: blobs on a noisy background, and an empty (all-zero) band over the lowest 3/8 of X,
    wide enough for the background mask to be 0 inside it."""
    data = blob_volume(shape, seed=3)
    data[:, :, : shape[2] * 3 // 8] = 0
    return data


def oracle_fuse(resources: Path, data: np.ndarray, level: int, gate: float | None = None) -> oracle.Composed:
    nets = torch_network(SmoothingNet(1)), torch_network(PositionNet())
    return oracle.fuse(data, SPACING, channel_json(resources), *nets, level=level, gate=gate)


def cpu_policy() -> BudgetPolicy:
    return BudgetPolicy(device="cpu", half=False, vram_budget_gib=None, time_budget_s=None, threads=1)


def learned_rate_deadline(fuser: Fuser, data: np.ndarray, level: int) -> float | None:
    """A deadline (perf_counter time) that makes the pipeline take degradation ``level``, given a learned
    patch rate of 1 s per patch (set here, as an earlier slow file would have taught it): level 1 leaves
    time for the patches without overlap only, level 2 for none of them, level 3 not for the global stage."""
    if level == 0:
        return None
    spec = fuser.manifest.channel("nucleus")
    fuser.load_stages("nucleus")  # loading is not part of the time the deadline plans for
    fuser.patch_stage(spec).watcher.seconds_per_patch = 1.0
    grid_h = [round(n * s / spec.target_spacing_um) for n, s in zip(data.shape, SPACING)]
    patch = spec.patch_stage.patch_size
    assert patch is not None

    def patches(overlap: float) -> int:
        return int(np.prod([len(oracle.window_starts(n, p, overlap)) for n, p in zip(grid_h, patch)]))

    left = {1: (patches(0.0) + patches(spec.patch_stage.overlap)) / 2, 2: patches(0.0) / 2, 3: 0.0}[level]
    return time.perf_counter() + fuser.ladder.reserve_s(data.size, int(np.prod(grid_h))) + left


OpsFactory = Callable[..., Ops]
PATHS: dict[str, OpsFactory] = {
    "shipped (choose_ops)": choose_ops,
    "GPU code on the CPU": lambda device, vram, profile, threads: Ops("cpu", cpu_hybrid=False, profile=profile, threads=2),
}


@pytest.mark.parametrize("level", [0, 1, 2, 3])
def test_the_pipelines_output_equals_the_independent_oracle_at_each_degradation_level(composed_resources: Path, level: int) -> None:
    data = empty_space_volume()
    expected = oracle_fuse(composed_resources, data, level)
    for name, ops in PATHS.items():
        fuser = Fuser(load_manifest(composed_resources), cpu_policy(), ops=ops)
        deadline = learned_rate_deadline(fuser, data, level)
        fused = fuser.fuse(data.copy(), SPACING, "nucleus", deadline=deadline, output_dtype="float32")
        assert fused.report.degradation == level, (name, fused.report.warnings)
        diff = np.abs(fused.to_array() - expected.output).max()
        assert diff <= TOLERANCE, f"{name}: level {level} differs from the oracle by {diff:.3g}"


def test_the_oracle_sees_what_the_tolerance_must_catch(composed_resources: Path) -> None:
    """The fixture makes each composed step visible: the levels differ from each other, the
    correction from nothing, by far more than :data:`TOLERANCE` (else the comparison proves little)."""
    data = empty_space_volume()
    outputs = [oracle_fuse(composed_resources, data, level).output for level in range(4)]
    for a in range(4):
        for b in range(a + 1, 4):
            assert np.abs(outputs[a] - outputs[b]).max() > 10 * TOLERANCE, (a, b)
    uniform = oracle.importance
    try:  # uniform stitching weights: the planted bug the issue found surviving
        oracle.importance = lambda patch: np.ones(tuple(patch))
        flat = oracle_fuse(composed_resources, data, 0).output
    finally:
        oracle.importance = uniform
    assert np.abs(flat - outputs[0]).max() > 10 * TOLERANCE


class SlowRunner:
    """A patch-stage runner that sleeps ``seconds`` per batch before the real forward."""

    def __init__(self, runner, seconds: float) -> None:
        self.runner, self.seconds = runner, seconds

    def __getattr__(self, name: str):  # backend, provider, device, ...: the real runner's
        return getattr(self.runner, name)

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        time.sleep(self.seconds)
        return self.runner(batch)


def test_a_slow_patch_network_is_stopped_mid_run_and_the_file_finishes_in_time_at_level_1(composed_resources: Path) -> None:
    """0.2 s per batch of 2: the 48 patches with overlap would need ~4.8 s, the 18 without ~1.8 s, and the
    deadline leaves the networks 3.5 s. No rate is known beforehand, so the full run starts; the watcher
    stops it after its second batch (from the rate it learns), the run without overlap fits, and the
    output is the oracle's at level 1."""
    def loader(manifest, spec, backend, device, **options) -> LoadedStage:
        loaded = load_stage(manifest, spec, backend, device, **options)
        return dataclasses.replace(loaded, runner=SlowRunner(loaded.runner, 0.2)) if spec.patch_size is not None else loaded

    data = empty_space_volume()
    fuser = Fuser(load_manifest(composed_resources), cpu_policy(), loader=loader)
    fuser.load_stages("nucleus")
    grid_h = [round(n * s / 0.6) for n, s in zip(data.shape, SPACING)]
    networks_s = 3.5
    deadline = time.perf_counter() + fuser.ladder.reserve_s(data.size, int(np.prod(grid_h))) + networks_s
    fused = fuser.fuse(data.copy(), SPACING, "nucleus", deadline=deadline, output_dtype="float32")
    out = fused.to_array()
    assert time.perf_counter() < deadline
    report = fused.report
    assert report.degradation == 1 and report.stages["patch"]["overlap"] == 0.0
    assert any("level 1" in w and "patches in" in w for w in report.warnings), report.warnings  # stopped mid-run
    assert report.seconds["global_stage"] + report.seconds["patch_stage"] < networks_s
    assert np.abs(out - oracle_fuse(composed_resources, data, 1).output).max() <= TOLERANCE


@pytest.mark.parametrize("gate", [0.5, 1.0])
def test_a_gate_adds_that_fraction_of_the_weighted_correction(tmp_path: Path, gate: float) -> None:
    """Output = normalise(x + gate·w·correction): gate 0.5 adds half of what gate 1 adds (the same w·correction)."""
    post = copy.deepcopy(POSTPROCESS) | {"gate_knots": [[0.0, gate]]}
    write_manifest(tmp_path, post)
    data = empty_space_volume()
    full = oracle_fuse(tmp_path, data, 0, gate=1.0)
    assert full.added is not None
    expected = oracle.finish(full.x + gate * full.added, post, SPACING)
    assert np.abs(fused_output(tmp_path, data) - expected).max() <= TOLERANCE
    other = oracle.finish(full.x + (1.5 - gate) * full.added, post, SPACING)  # the other gate's output
    assert np.abs(other - expected).max() > 10 * TOLERANCE


@pytest.mark.parametrize("factor", [0.25, 0.6])
def test_a_trust_factor_f_adds_f_times_the_weighted_correction(tmp_path: Path, factor: float) -> None:
    """Per-case trust with a rule whose factor is ``factor`` whatever the signal: the gate knots only
    decide that the networks run; the correction enters × ``factor``."""
    trust = {"mode": "case", "rules": {"noise": [[0.0, factor]]}}
    write_manifest(tmp_path, POSTPROCESS, trust)
    data = empty_space_volume()
    fused = Fuser(load_manifest(tmp_path), cpu_policy()).fuse(data.copy(), SPACING, "nucleus", output_dtype="float32")
    assert fused.report.trust["factor"] == factor
    expected = oracle_fuse(tmp_path, data, 0, gate=factor).output
    assert np.abs(fused.to_array() - expected).max() <= TOLERANCE


def test_with_a_background_threshold_empty_space_gets_the_normalised_filtered_input_only(tmp_path: Path) -> None:
    """Where the smoothed normalised input is below 0 (here: a dark textured band, half the volume, below
    the input's low percentile, put at 60 %) the background mask is 0: the output there is the input,
    filtered and normalised (by the output's own percentile map, fitted here), with nothing of the
    correction, although the correction is large there."""
    write_manifest(tmp_path, copy.deepcopy(POSTPROCESS) | {"gate_knots": []}, low_percentile=60.0)
    data = blob_volume(SHAPE, seed=4)
    x_idx = np.arange(SHAPE[2])
    dark = x_idx < SHAPE[2] // 2
    texture = (20 + 15 * np.sin(x_idx / 3.0))[None, None, :] * (1 + 0.3 * np.cos(np.arange(SHAPE[1]) / 4.0))[None, :, None]
    data[:, :, dark] = np.broadcast_to(texture, SHAPE)[:, :, dark].astype(np.uint16)  # 5–46
    assert data[:, :, dark].max() < np.percentile(data, 60.0)
    composed = oracle_fuse(tmp_path, data, 0)
    assert composed.added is not None
    radius = int(4 * 0.7 + 0.5)  # the output Gaussian's reach (σ 0.7 along X; less along Z and Y)
    empty = ndimage.maximum_filter(np.abs(composed.added) > 0, size=2 * radius + 1, mode="nearest") == 0
    assert empty.mean() > 0.2  # a fair share of the volume
    out = fused_output(tmp_path, data)
    normalised_input = oracle.finish(composed.x, POSTPROCESS, SPACING)
    slope, offset = np.polyfit(normalised_input[empty], out[empty], 1)
    assert slope > 0 and np.abs(out[empty] - (slope * normalised_input[empty] + offset)).max() <= TOLERANCE
    correction_there = oracle.resize(composed.correction, SHAPE)[empty]  # what the mask keeps out
    assert np.ptp(correction_there) > 100 * TOLERANCE


def fused_output(resources: Path, data: np.ndarray) -> np.ndarray:
    """The shipped pipeline's float32 output for ``data`` with the manifest in ``resources``."""
    return Fuser(load_manifest(resources), cpu_policy()).fuse(data.copy(), SPACING, "nucleus", output_dtype="float32").to_array()
