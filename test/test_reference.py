"""The streamed pipeline steps equal their whole-volume numpy twins in test/reference.py (the oracle)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import blob_volume
from reference import difference_weight, finalise, normalise_intensity, resize, sanitise, to_output_dtype
from scipy import ndimage

from fusemycells.config import NormalisationSpec, PostprocessSpec, load_manifest, with_output_sigma
from fusemycells.ops import Ops
from fusemycells.pipeline import Fuser
from fusemycells.postprocess import OutputSource, correction_weight, final_source
from fusemycells.preprocess import ResizedSource, intensity_affine, sanitise_inplace
from fusemycells.runtime.budget import BudgetPolicy
from fusemycells.sources import ArraySource, materialise

OPS = Ops("cpu", threads=2)


def volume(shape=(23, 31, 27), seed=0) -> np.ndarray:
    return np.random.default_rng(seed).random(shape, dtype=np.float32)


@pytest.mark.parametrize("out_shape", [(9, 14, 40), (57, 20, 13), (23, 31, 27)])
def test_resized_source_in_overlapping_out_of_order_ranges_equals_resize(out_shape) -> None:
    vol = volume()
    expected = resize(vol, out_shape)
    source = ResizedSource(vol, out_shape, ops=OPS)
    rng = np.random.default_rng(1)
    for _ in range(12):
        z0 = int(rng.integers(0, out_shape[0]))
        z1 = int(rng.integers(z0 + 1, out_shape[0] + 1))
        np.testing.assert_allclose(source.planes(z0, z1), expected[z0:z1], atol=1e-6)


@pytest.mark.parametrize("step", [4, 8, 3])
def test_resized_source_rows_of_one_length_reuse_one_buffer_and_stay_exact(step: int) -> None:
    out_shape = (40, 14, 12)
    expected = resize(volume(), out_shape)
    source = ResizedSource(volume(), out_shape, ops=OPS)
    buffers = set()
    for z0 in range(0, out_shape[0] - 8 + 1, step):  # rows of 8 planes, overlapping when step < 8
        rows = source.planes_readonly(z0, z0 + 8)
        np.testing.assert_allclose(rows, expected[z0 : z0 + 8], atol=1e-6)
        assert not rows.flags.writeable
        buffers.add(id(source._cache))
    assert len(buffers) == 1  # moving along z never allocates a second row

@pytest.mark.parametrize("out_shape", [(9, 14, 40), (57, 20, 13)])
def test_uncached_resized_source_keeps_no_planes_and_equals_the_cached_one(out_shape) -> None:
    cached, uncached = ResizedSource(volume(), out_shape, ops=OPS), ResizedSource(volume(), out_shape, cache=False, ops=OPS)
    for z0, z1 in [(0, 5), (3, 9), (2, 4)]:
        np.testing.assert_allclose(uncached.planes(z0, z1), cached.planes(z0, z1), atol=1e-6)  # ranges cut differently
        view = uncached.planes_readonly(z0, z1)
        np.testing.assert_allclose(view, cached.planes_readonly(z0, z1), atol=1e-6)
        assert not view.flags.writeable
        assert len(uncached._cache) == 0


def test_antialiased_resize_equals_filtering_the_whole_volume_then_interpolating() -> None:
    import torch
    import torch.nn.functional as F

    from fusemycells.ops import RESIZE_TRUNCATE, antialias_sigma

    vol, out_shape = volume((40, 36, 30)), (13, 50, 11)  # z and x shrunk, y enlarged
    sigma = antialias_sigma(vol.shape, out_shape)
    filtered = ndimage.gaussian_filter(vol, sigma=sigma, mode="nearest", truncate=RESIZE_TRUNCATE)
    expected = F.interpolate(torch.from_numpy(filtered)[None, None], size=out_shape, mode="trilinear", align_corners=False)[0, 0].numpy()
    source = ResizedSource(vol, out_shape, ops=OPS)
    source.preferred_slab = 3  # many requests, each with its own z-halo
    np.testing.assert_allclose(materialise(source), expected, atol=1e-5)


def test_chained_sources_equal_materialised_steps() -> None:
    vol = volume((30, 40, 36))
    offset, scale = 0.2, 3.0
    lazy = ResizedSource(ResizedSource(ArraySource(vol, offset, scale), (50, 24, 22), ops=OPS), (12, 10, 9), ops=OPS)
    steps = resize(resize((vol - np.float32(offset)) * np.float32(scale), (50, 24, 22)), (12, 10, 9))
    np.testing.assert_allclose(materialise(lazy), steps, atol=1e-6)


@pytest.mark.parametrize("kind", ["percentile", "zscore"])
def test_intensity_affine_reproduces_normalise_intensity(kind: str) -> None:
    vol = (volume() * 1000).astype(np.uint16)
    offset, scale = intensity_affine(vol, NormalisationSpec(kind, 1.0, 99.8))
    expected = normalise_intensity(vol, kind, 1.0, 99.8)
    np.testing.assert_allclose(ArraySource(vol, offset, scale).planes(0, vol.shape[0]), expected, atol=1e-5)


def test_in_place_sanitise_matches_the_copying_one() -> None:
    vol = volume()
    vol[0, :3, 0] = np.nan
    vol[5, 5, 5] = np.inf
    expected, count = sanitise(vol)
    assert sanitise_inplace(vol).non_finite == count == 4
    np.testing.assert_array_equal(vol, expected)


def test_correction_weight_equals_difference_weight() -> None:
    x, p = volume(seed=1), volume(seed=2)
    spec = PostprocessSpec(diff_grid=(12, 16, 14), weight_max_filter=3, weight_sigma=1.0)
    np.testing.assert_allclose(correction_weight((p - x).astype(np.float16), spec, ops=OPS), difference_weight(x, p, spec), atol=2e-3)
    np.testing.assert_allclose(correction_weight(p - x, spec, ops=OPS), difference_weight(x, p, spec), atol=1e-5)


@pytest.mark.parametrize("dtype", ["float32", "uint16"])
@pytest.mark.parametrize("filters", [(0, 0.0), (3, 0.8)])
def test_final_source_equals_finalise_then_cast(dtype: str, filters: tuple[int, float]) -> None:
    vol = volume((40, 30, 20)) * 5
    spec = with_output_sigma(PostprocessSpec(output_max_filter=filters[0]), filters[1])
    expected = to_output_dtype(finalise(vol, spec), dtype)
    got = materialise(final_source(ArraySource(vol), spec, dtype, ops=OPS), dtype=expected.dtype)
    np.testing.assert_allclose(got.astype(np.float64), expected.astype(np.float64), atol=1.0 if dtype == "uint16" else 1e-5)


@pytest.mark.parametrize("hybrid", [True, False])
def test_output_filters_are_exact_at_slab_borders(hybrid: bool) -> None:
    vol = volume((37, 12, 11))
    ops = Ops("cpu", threads=2, cpu_hybrid=hybrid)
    lazy = OutputSource(ArraySource(vol), with_output_sigma(PostprocessSpec(output_max_filter=5), 1.3), None, ops)
    whole = ndimage.gaussian_filter(ndimage.maximum_filter(vol, size=5, mode="nearest"), sigma=1.3, mode="nearest")
    np.testing.assert_allclose(np.concatenate([lazy.planes(0, 7), lazy.planes(7, 20), lazy.planes(20, 37)]), whole, atol=1e-6)


def test_compact_float16_output_stays_within_its_precision_of_the_exact_one(fixture_resources: Path) -> None:
    outputs = {}
    for name, compact_voxels in (("exact", 1 << 27), ("compact", 0)):
        policy = BudgetPolicy(device="cpu", half=False, vram_budget_gib=None, time_budget_s=None, threads=1, compact_voxels=compact_voxels)
        fused = Fuser(load_manifest(fixture_resources), policy).fuse(blob_volume((12, 40, 36)), (1.0, 0.39, 0.39), "nucleus", output_dtype="float32")
        outputs[name] = fused.to_array()
        assert fused.report.degradation == 0 and not fused.report.warnings
    scale = float(np.abs(outputs["exact"]).max())
    assert np.abs(outputs["compact"] - outputs["exact"]).max() <= 2e-3 * scale
    assert not np.array_equal(outputs["compact"], outputs["exact"])  # the compact path really ran


def test_correction_weight_with_filters_in_um_equals_difference_weight() -> None:
    inp, pred = volume(seed=1), volume(seed=2)
    spec = PostprocessSpec(diff_grid=(9, 12, 10), weight_max_filter=5.0, weight_sigma=2.0, weight_filter_unit="um")
    extent = (46.0, 12.4, 10.8)
    expected = difference_weight(inp, pred, spec, extent)
    np.testing.assert_allclose(correction_weight(ArraySource(pred - inp), spec, extent, ops=OPS), expected, atol=1e-5)
    voxels = PostprocessSpec(diff_grid=spec.diff_grid, weight_filter_unit="voxel", weight_max_filter=5, weight_sigma=2.0)
    assert not np.allclose(expected, difference_weight(inp, pred, voxels, extent))  # the µm sizes really differ here
