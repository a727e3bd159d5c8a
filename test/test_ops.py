"""The non-network steps (fusemycells.ops, streamed): equal to the whole-volume numpy oracle (test/reference.py).

Both of the one implementation's code paths are checked: the CPU's per-step choice (``choose_ops('cpu')``: scipy
for short filters) and the GPU's (``Ops(device, cpu_hybrid=False)``: band products, max pooling, torch filters),
which runs here on the CPU, so these tests check on any machine the code that runs on CUDA; ``-m cuda`` repeats
the comparison on a GPU where there is one.
"""

from __future__ import annotations

import threading
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import reference
import torch
from conftest import blob_volume
from scipy import ndimage

from fusemycells.config import PostprocessSpec, load_manifest, with_output_sigma
from fusemycells.ops import Ops, axis_map, band, choose_ops, compose, filter_plan, resize_plan
from fusemycells.pipeline import Fuser
from fusemycells.postprocess import (
    blend_slabs,
    blend_weight,
    final_source,
    gathered_sample,
)
from fusemycells.preprocess import ResizedSource, resize_through, sample_stride
from fusemycells.runtime.budget import BudgetPolicy
from fusemycells.runtime.timing import SECTIONS, Profile
from fusemycells.sources import ArraySource, apply_affine, materialise

SPACING = (1.01, 0.388, 0.388)


def gpu_path(device: str = "cpu", **fields) -> Ops:
    """The GPU's code path (no scipy shortcuts), on ``device``; small slabs so that every loop runs several times."""
    return Ops(device=device, cpu_hybrid=False, slab_bytes=1 << 16, threads=2, **fields)


def cpu_path(**fields) -> Ops:
    """The CPU's per-step choice (what ``choose_ops('cpu')`` runs), with small slabs."""
    return Ops(device="cpu", slab_bytes=1 << 16, threads=2, **fields)


OPS = {"gpu code path": gpu_path, "cpu choice": cpu_path}


def smooth_stack(shape: tuple[int, int, int], seed: int = 0) -> np.ndarray:
    return (ndimage.gaussian_filter(np.random.default_rng(seed).random(shape), 1.5) * 60000).astype(np.uint16)


def test_an_axis_map_is_the_gaussian_prefilter_then_linear_interpolation_of_scipy_and_torch() -> None:
    values = np.random.default_rng(0).random(97)
    for n_out, sigma in ((31, 1.3), (250, 0.0), (97, 0.9), (40, 0.0)):
        filtered = ndimage.gaussian_filter1d(values, sigma, mode="nearest", truncate=3.0) if sigma else values
        expected = torch.nn.functional.interpolate(
            torch.from_numpy(filtered)[None, None], size=n_out, mode="linear", align_corners=False
        )[0, 0].numpy()
        got = axis_map(97, n_out, sigma).dense() @ values
        np.testing.assert_allclose(got, expected, atol=1e-12)
    m = axis_map(500, 40, 3.0)
    assert m.width < 500 and band(m.dense()).dense().tolist() == m.dense().tolist()  # the band holds every weight
    assert np.allclose(m.dense().sum(1), 1.0)  # rows sum to 1: affine maps commute with resizes


def test_composed_resizes_equal_the_chain_of_resizes() -> None:
    first, second = resize_plan((30, 50, 40), (45, 33, 20)), resize_plan((45, 33, 20), (8, 9, 10))
    both = compose(first, second)
    assert both.in_shape == (30, 50, 40) and both.out_shape == (8, 9, 10)
    for a, b, ab in zip(first.maps, second.maps, both.maps):
        np.testing.assert_allclose(ab.dense(), b.dense() @ a.dense(), atol=1e-15)
    with pytest.raises(ValueError, match="cannot compose"):
        compose(second, first)


@pytest.mark.parametrize("path", list(OPS))
@pytest.mark.parametrize("out_shape", [(50, 130, 117), (12, 16, 16), (60, 300, 250), (30, 100, 300)])
def test_streamed_resize_equals_the_oracle_resize(path: str, out_shape: tuple[int, int, int]) -> None:
    data = smooth_stack((30, 200, 180))
    source = ArraySource(data, 100.0, 1 / 3000)
    expected = reference.resize(apply_affine(data, 100.0, 1 / 3000), out_shape)
    got = materialise(ResizedSource(source, out_shape, ops=OPS[path]()))
    np.testing.assert_allclose(got, expected, atol=2e-5)
    rows = ResizedSource(source, out_shape, ops=OPS[path]())  # sliding-window requests reuse the row cache
    np.testing.assert_allclose(rows.planes_readonly(2, 9), expected[2:9], atol=2e-5)
    np.testing.assert_allclose(rows.planes_readonly(5, 12), expected[5:12], atol=2e-5)


@pytest.mark.parametrize("path", list(OPS))
def test_resizing_through_a_grid_in_one_composed_map_equals_two_oracle_resizes(path: str) -> None:
    data = smooth_stack((30, 200, 180))
    grids = [(50, 130, 117), (16, 16, 16)]
    expected = reference.resize(reference.resize(apply_affine(data, 50.0, 1 / 2000), grids[0]), grids[1])
    np.testing.assert_allclose(resize_through(ArraySource(data, 50.0, 1 / 2000), grids, OPS[path]()), expected, atol=2e-5)


@pytest.mark.parametrize("path", list(OPS))
def test_streamed_weight_map_and_blend_equal_the_oracle_ones(path: str) -> None:
    data = smooth_stack((30, 200, 180))
    x_in, x = ArraySource(data, 100.0, 1 / 3000), apply_affine(data, 100.0, 1 / 3000)
    correction = np.random.default_rng(1).normal(0, 0.1, (50, 130, 117)).astype(np.float32)
    spec = PostprocessSpec(diff_grid=(16, 32, 32), weight_max_filter=3, weight_sigma=1.5, background_threshold=0.1)
    extent = (30.3, 77.6, 69.8)
    weight = reference.weight_from_coarse(np.abs(reference.resize(correction, spec.diff_grid)), spec, extent)
    weight *= reference.background_mask(x, spec) * np.float32(0.8)
    np.testing.assert_allclose(blend_weight(correction, x_in, spec, 0.8, extent, ops=OPS[path]()), weight, atol=1e-5)
    for compact, corr in ((False, correction), (True, correction.astype(np.float16))):
        corr_in = reference.resize(corr.astype(np.float32), data.shape)
        expected = x + np.clip(reference.resize(weight, data.shape, antialias=False), 0.0, 1.0) * corr_in
        got_data = data.copy()  # in place over the input's own pixels when compact
        got = blend_slabs(got_data, ArraySource(got_data, 100.0, 1 / 3000), corr, weight, compact=compact, ops=OPS[path]())
        assert got.array.dtype == (np.float16 if compact else np.float32)
        assert (got.array.ctypes.data == got_data.ctypes.data) == compact
        np.testing.assert_allclose(got.array.astype(np.float32), expected, atol=2e-2 if compact else 1e-5)


@pytest.mark.parametrize("path", list(OPS))
@pytest.mark.parametrize("dtype", ["float32", "uint16"])
@pytest.mark.parametrize("spec", [with_output_sigma(PostprocessSpec(), 0.9), with_output_sigma(PostprocessSpec(output_max_filter=3), 1.2), PostprocessSpec()])
def test_streamed_output_filters_and_normalisation_equal_the_oracle_ones(path: str, dtype: str, spec: PostprocessSpec) -> None:
    volume = np.random.default_rng(2).random((20, 90, 70)).astype(np.float16)
    blended = ArraySource(volume)
    expected = reference.to_output_dtype(reference.finalise(volume.astype(np.float32), spec, SPACING), dtype)
    got = materialise(final_source(blended, spec, dtype, spacing=SPACING, ops=OPS[path]()))
    assert got.dtype == expected.dtype == np.dtype(dtype)
    np.testing.assert_allclose(got.astype(np.float32), expected.astype(np.float32), atol=1 if dtype == "uint16" else 1e-5)


def test_the_percentile_sample_gathered_at_the_sampled_voxels_equals_filtering_everything() -> None:
    volume = np.random.default_rng(3).random((20, 90, 70)).astype(np.float16)
    source = ArraySource(volume, 0.1, 2.0)
    sigma = (0.35, 0.9, 1.3)
    filtered = ndimage.gaussian_filter((volume.astype(np.float32) - np.float32(0.1)) * np.float32(2.0), sigma, mode="nearest", output=np.float32)
    for stride in (1, 7, 101):  # the x-window moves inside the row at both borders
        np.testing.assert_allclose(gathered_sample(source, sigma, stride, ops=cpu_path()), filtered.reshape(-1)[::stride], atol=1e-6)
    assert sample_stride(309 * 1920 * 1920) == 285 and sample_stride(10 * 10 * 10) == 1


def test_small_filters_on_the_gpu_code_path_equal_scipy() -> None:
    volume = torch.from_numpy(np.random.default_rng(4).random((17, 23, 19)).astype(np.float32))
    ops = gpu_path()
    for size in (3, (5, 1, 3), 4):
        np.testing.assert_array_equal(ops.maximum_filter(volume, size).numpy(), ndimage.maximum_filter(volume.numpy(), size=size, mode="nearest"))
    expected = ndimage.gaussian_filter(volume.numpy(), (0.7, 2.0, 1.1), mode="nearest", truncate=4.0)
    np.testing.assert_allclose(ops.gaussian(volume, (0.7, 2.0, 1.1)).numpy(), expected, atol=1e-6)
    plan = filter_plan(volume.shape, (0.7, 2.0, 1.1))
    np.testing.assert_allclose(ops.resample_all(plan, volume).numpy(), expected, atol=1e-6)


def test_the_device_policy_runs_the_steps_on_the_gpu_only_when_the_networks_run_on_cuda() -> None:
    cpu = choose_ops("cpu", None, threads=3)
    assert cpu.device == "cpu" and cpu.cpu_hybrid and cpu.threads == 3 and cpu.scipy_filters
    cuda = choose_ops("cuda", 4.0)
    assert cuda.device == ("cuda" if torch.cuda.is_available() else "cpu")
    assert not gpu_path().scipy_filters and Ops().device == "cpu"
    assert ResizedSource(smooth_stack((30, 200, 180)), (50, 130, 117), ops=cpu).ops is cpu


def test_parallel_work_runs_on_single_threaded_workers_and_never_nests() -> None:
    ops = cpu_path()
    outer = torch.get_num_threads()
    seen = ops.parallel(lambda _: (torch.get_num_threads(), threading.current_thread().name), range(4))
    assert {n for n, _ in seen} == {1} and all(name.startswith("fmc-ops") for _, name in seen)
    assert torch.get_num_threads() == outer  # restored
    nested = ops.parallel(lambda _: ops.parallel(lambda i: i * 2, range(3)), range(2))  # runs inline, no deadlock
    assert nested == [[0, 2, 4], [0, 2, 4]]
    assert ops.split(3, 10) == [(3, 6), (6, 10)] and ops.split(3, 4) == [(3, 4)]


class SteppedClock:
    """A ``time`` stand-in whose ``perf_counter`` moves only when the test says (seconds)."""

    def __init__(self) -> None:
        self.now = 100.0

    def perf_counter(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


def test_a_profile_counts_each_stretch_once_in_its_innermost_section(monkeypatch: pytest.MonkeyPatch) -> None:
    import fusemycells.runtime.timing

    clock = SteppedClock()
    monkeypatch.setattr(fusemycells.runtime.timing, "time", clock)  # exact seconds: no sleeps to overshoot on a busy machine
    seconds: dict[str, float] = {}
    profile = Profile(seconds)
    with profile.section("blend_s"):
        clock.sleep(0.02)
        with profile.section("resampling_s"):
            clock.sleep(0.03)
        worker = threading.Thread(target=lambda: profile.section("write_s").__enter__())  # other threads: not counted
        worker.start()
        worker.join()
        clock.sleep(0.01)
    assert set(seconds) == {"blend_s", "resampling_s"}
    assert seconds["blend_s"] == pytest.approx(0.03) and seconds["resampling_s"] == pytest.approx(0.03)
    profile.move("blend_s", "forward_s", 1.0)  # never below zero
    assert seconds["blend_s"] == 0.0 and seconds["forward_s"] == pytest.approx(0.03)
    assert profile.describe().startswith("resampling_s") and set(SECTIONS) >= set(seconds)


def fuse_with(resources: Path, ops_factory, data: np.ndarray, channel: str = "nucleus"):
    policy = BudgetPolicy(device="cpu", half=False, vram_budget_gib=None, time_budget_s=None, threads=2, compact_voxels=0)
    return Fuser(load_manifest(resources), policy, ops=ops_factory).fuse(data, SPACING, channel, output_dtype="float32")


@pytest.mark.parametrize("channel", ["nucleus", "membrane"])
def test_the_pipeline_gives_the_same_output_on_both_code_paths_and_profiles_the_case(fixture_resources: Path, channel: str) -> None:
    data = blob_volume((14, 90, 80))
    out_ref = fuse_with(fixture_resources, choose_ops, data.copy(), channel).to_array()
    fused = fuse_with(fixture_resources, lambda device, vram, profile, threads: gpu_path(profile=profile), data.copy(), channel)
    out = fused.to_array()
    assert np.abs(reference.percentile_normalise(out) - reference.percentile_normalise(out_ref)).max() <= 1e-3
    assert np.abs(out - out_ref).max() <= 1e-3
    profile = fused.report.seconds["profile_s"]
    assert set(profile) <= set(SECTIONS) and {"input_statistics_s", "resampling_s", "forward_s", "stitching_s", "blend_s"} <= set(profile)
    stages = sum(v for k, v in fused.report.seconds.items() if k != "profile_s")
    assert sum(profile.values()) <= stages + 0.05


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_the_gpu_path_on_cuda_equals_the_cpu_path_and_the_oracle(fixture_resources: Path) -> None:
    data = blob_volume((14, 90, 80))
    out_ref = fuse_with(fixture_resources, choose_ops, data.copy()).to_array()
    out = fuse_with(fixture_resources, lambda device, vram, profile, threads: gpu_path("cuda", profile=profile), data.copy()).to_array()
    assert np.abs(reference.percentile_normalise(out) - reference.percentile_normalise(out_ref)).max() <= 1e-3
    stack = smooth_stack((30, 200, 180))
    expected = reference.resize(apply_affine(stack, 100.0, 1 / 3000), (50, 130, 117))
    got = materialise(ResizedSource(ArraySource(stack, 100.0, 1 / 3000), (50, 130, 117), ops=gpu_path("cuda")))
    np.testing.assert_allclose(got, expected, atol=1e-4)


def test_spec_with_no_output_filter_on_the_gated_path_streams_the_input(fixture_resources: Path) -> None:
    manifest = load_manifest(fixture_resources)
    spec = replace(manifest.channel("nucleus").postprocess, output_sigma_knots=())
    data = blob_volume((6, 40, 30))
    expected = reference.percentile_normalise(apply_affine(data, 100.0, 1 / 2000), *spec.output_percentiles)
    got = materialise(final_source(ArraySource(data, 100.0, 1 / 2000), spec, ops=cpu_path()))
    np.testing.assert_allclose(got, expected, atol=1e-6)

