"""Normalisation and spacing-aware resampling (fusemycells.preprocess)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from reference import normalise_intensity, percentile_normalise, sanitise

from fusemycells.ops import CPU_SLAB_BYTES, Ops, antialias_sigma
from fusemycells.preprocess import (
    INPUT_SAFE_ABS,
    ResizedSource,
    Sanitised,
    resize,
    safe_range,
    sanitise_inplace,
)
from fusemycells.sources import iter_planes, shape_for_spacing

OPS = Ops("cpu", threads=2)

ANISO = (2.0, 0.3, 0.3)  # typical light-sheet grid (z, y, x µm)
ISO = (0.6, 0.6, 0.6)


def smooth_volume(
    shape: tuple[int, int, int], spacing: tuple[float, float, float], sigma_um: float, seed: int = 0
) -> np.ndarray:
    """Sum of Gaussian blobs of physical width ``sigma_um`` sampled at voxel centres (float32 ZYX)."""
    rng = np.random.default_rng(seed)
    z, y, x = np.meshgrid(*[(np.arange(n) + 0.5) * s for n, s in zip(shape, spacing)], indexing="ij")
    vol = np.zeros(shape, dtype=np.float32)
    for _ in range(5):
        c = [rng.uniform(0, n * s) for n, s in zip(shape, spacing)]
        vol += np.exp(-((z - c[0]) ** 2 + (y - c[1]) ** 2 + (x - c[2]) ** 2) / (2 * sigma_um**2)).astype(np.float32)
    return vol


def test_resampling_to_isotropic_and_back_restores_a_smooth_volume() -> None:
    shape = (13, 61, 59)
    vol = smooth_volume(shape, ANISO, sigma_um=5.0)
    high = resize(vol, shape_for_spacing(shape, ANISO, ISO), OPS)
    assert high.shape == (43, 31, 30)
    back = resize(high, shape, OPS)
    assert back.shape == shape
    err = np.abs(back - vol) / np.ptp(vol)
    # Tolerance: the blobs are only 2.5 z-voxels wide, the y/x downsampling is Gaussian-prefiltered
    # (σ ≈ 0.9 voxel) and each axis' extent is rounded to whole 0.6 µm voxels, so a few % of the
    # range is the expected interpolation loss (measured: max 3.8 %, mean 1.0 %). A wrong axis
    # order, an off-by-half-voxel grid or a missing z interpolation gives errors of 10-50 %.
    assert err.max() < 0.05
    assert err.mean() < 0.015
    assert np.corrcoef(back.ravel(), vol.ravel())[0, 1] > 0.995


@pytest.mark.parametrize(
    "in_shape, out_shape",
    [
        ((7, 13, 11), (10, 6, 17)),  # mixed up/down, odd sizes, one slab
        ((5, 9, 7), (37, 5, 11)),  # output deeper than one 32-plane slab
        ((9, 8, 8), (4, 8, 8)),  # z only
        ((1, 6, 5), (3, 7, 5)),  # single input plane
        ((20, 8, 8), (12, 32, 32)),  # y/x upsampled: z is interpolated first
        ((8, 32, 32), (20, 8, 8)),  # y/x downsampled: y/x are resized first
    ],
)
def test_resize_without_antialias_equals_torch_trilinear(
    in_shape: tuple[int, int, int], out_shape: tuple[int, int, int]
) -> None:
    vol = np.random.default_rng(1).random(in_shape, dtype=np.float32)
    expected = F.interpolate(torch.from_numpy(vol)[None, None], size=out_shape, mode="trilinear", align_corners=False)[
        0, 0
    ].numpy()
    got = resize(vol, out_shape, OPS, antialias=False)
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, expected, atol=1e-5)


def test_resized_source_slabs_tile_the_output_in_order() -> None:
    vol = np.random.default_rng(2).random((6, 7, 8), dtype=np.float32)
    pieces = list(iter_planes(ResizedSource(vol, (70, 5, 9), antialias=False, cache=False, ops=OPS), slab=32))
    assert [(z0, z1) for z0, z1, _ in pieces] == [(0, 32), (32, 64), (64, 70)]
    whole = resize(vol, (70, 5, 9), OPS, antialias=False)
    np.testing.assert_allclose(np.concatenate([p for _, _, p in pieces]), whole, atol=1e-6)


def test_resize_antialias_damps_checkerboard_when_downsampling() -> None:
    vol = np.indices((8, 32, 32)).sum(axis=0) % 2 * 1.0  # highest frequency: aliases without a prefilter
    plain = resize(vol, (8, 10, 10), OPS, antialias=False)
    smooth = resize(vol, (8, 10, 10), OPS, antialias=True)
    assert np.std(smooth) < 0.25 * np.std(plain)
    assert np.mean(smooth) == pytest.approx(0.5, abs=0.05)


def test_resize_same_shape_is_a_float32_copy() -> None:
    vol = np.arange(24, dtype=np.uint16).reshape(2, 3, 4)
    out = resize(vol, vol.shape, OPS)
    assert out.dtype == np.float32 and out is not vol
    np.testing.assert_array_equal(out, vol)


@pytest.mark.parametrize(
    "shape, spacing, target",
    [((13, 61, 59), ANISO, ISO), ((100, 512, 480), (1.0, 0.39, 0.39), ISO), ((1, 3, 3), (0.1, 0.1, 0.1), ISO)],
)
def test_shape_for_spacing_preserves_physical_extent(
    shape: tuple[int, int, int], spacing: tuple[float, float, float], target: tuple[float, float, float]
) -> None:
    out = shape_for_spacing(shape, spacing, target)
    assert len(out) == 3 and all(isinstance(n, int) and n >= 1 for n in out)
    for n, s, m, t in zip(shape, spacing, out, target):
        if n * s >= t:
            assert abs(m * t - n * s) <= t / 2 + 1e-9  # rounded to the nearest whole target voxel
        else:
            assert m == 1  # never an empty axis


def test_antialias_sigma_follows_the_shrink_factor_rule() -> None:
    sig = antialias_sigma((40, 30, 30), (10, 30, 60))
    assert sig[0] == pytest.approx(math.sqrt(15) / 2)
    assert sig[1:] == (0.0, 0.0)


def test_percentile_normalise_maps_low_and_high_percentiles_to_0_and_1() -> None:
    vol = np.random.default_rng(3).gamma(2.0, 100.0, (10, 30, 30)).astype(np.float32)
    out = percentile_normalise(vol, 2.0, 99.8)
    assert out.dtype == np.float32
    lo, hi = np.percentile(out, [2.0, 99.8])
    assert lo == pytest.approx(0.0, abs=1e-5) and hi == pytest.approx(1.0, abs=1e-5)
    assert out.max() > 1.0 and out.min() < 0.0  # no clipping (the challenge's definition)


def test_percentile_normalise_of_constant_volume_is_finite_zeros() -> None:
    out = percentile_normalise(np.full((4, 5, 6), 7.0, dtype=np.float32))
    assert np.isfinite(out).all()
    np.testing.assert_array_equal(out, 0.0)


def test_normalise_intensity_zscore_and_unknown_kind() -> None:
    vol = np.random.default_rng(4).normal(50.0, 10.0, (6, 10, 10)).astype(np.float32)
    z = normalise_intensity(vol, kind="zscore")
    assert z.mean() == pytest.approx(0.0, abs=1e-4) and z.std() == pytest.approx(1.0, abs=1e-4)
    with pytest.raises(ValueError, match="unknown normalisation"):
        normalise_intensity(vol, kind="minmax")


def test_sanitise_replaces_non_finite_with_the_finite_median() -> None:
    vol = np.arange(27, dtype=np.float32).reshape(3, 3, 3)
    vol[0, 0, 0], vol[1, 1, 1], vol[2, 2, 2] = np.nan, np.inf, -np.inf
    out, count = sanitise(vol)
    assert count == 3
    assert np.isfinite(out).all()
    median = np.median(vol[np.isfinite(vol)])
    assert out[0, 0, 0] == out[1, 1, 1] == out[2, 2, 2] == pytest.approx(median)
    assert np.isnan(vol[0, 0, 0]), "input must not be modified"


def test_sanitise_integer_input_becomes_float32_without_replacements() -> None:
    out, count = sanitise(np.ones((2, 2, 2), dtype=np.uint16))
    assert out.dtype == np.float32 and count == 0


@pytest.mark.parametrize("dtype, value", [("float64", 1e39), ("float64", -1e300), ("float32", 3e38), ("int64", 2**62)])
def test_values_beyond_the_safe_range_are_clipped_before_any_cast_and_counted(dtype: str, value: float) -> None:
    vol = (np.random.default_rng(0).random((6, 20, 20)) * 1000).astype(dtype)
    vol[3, 10, 10] = value
    vol[1, 2, 3] = np.nan if vol.dtype.kind == "f" else 0
    expected, count = sanitise(vol)
    result = sanitise_inplace(vol)
    assert result.clipped == 1 and result.non_finite == count == (1 if vol.dtype.kind == "f" else 0)
    low, high = result.limits
    assert -INPUT_SAFE_ABS <= low < 0 and 1000 < high <= 1e4 * 1000 + 1000  # the data's spread × 1e4 beyond it
    assert vol[3, 10, 10] == vol.dtype.type(high if value > 0 else low)
    as_float32 = vol.astype(np.float32)  # what ArraySource does next
    assert np.isfinite(as_float32).all() and np.abs(as_float32).max() <= 1.1e7
    np.testing.assert_array_equal(as_float32, expected)  # the whole-volume twin agrees


def test_in_range_values_and_small_integer_types_are_never_clipped() -> None:
    rng = np.random.default_rng(1)
    floats = rng.lognormal(0.0, 3.0, (8, 16, 16))  # heavy-tailed: max / p99.9 ≈ 20, far below the relative limit
    kept = floats.copy()
    assert sanitise_inplace(floats).clipped == 0 and np.array_equal(floats, kept)
    ints = rng.integers(0, 2**32, (4, 8, 8), dtype=np.uint32)
    ints[0, 0, 0] = 2**32 - 1
    assert sanitise_inplace(ints) == Sanitised(0, 0) and ints[0, 0, 0] == 2**32 - 1
    constant = np.zeros((2, 4, 4))
    constant[0, 0, 0] = 1e20  # no spread to scale by: only the absolute limit applies
    assert safe_range(constant) == (-INPUT_SAFE_ABS, INPUT_SAFE_ABS)


def test_resized_source_reads_big_planes_in_small_requests_with_the_same_result():
    from fusemycells.sources import materialise

    class Big:  # 309 planes of 1920² (never allocated whole): only its shape matters here
        shape = (309, 1920, 1920)

    slab = ResizedSource(Big(), (128, 128, 128), ops=Ops("cpu")).preferred_slab
    assert 1 <= slab < 32 and slab * (309 / 128) * 4 * 1920 * 1920 <= CPU_SLAB_BYTES
    vol = np.random.default_rng(0).random((40, 30, 20), dtype=np.float32)
    small = ResizedSource(vol, (13, 11, 9), ops=OPS)
    small.preferred_slab = 2
    np.testing.assert_allclose(materialise(small), materialise(ResizedSource(vol, (13, 11, 9), ops=OPS)), atol=1e-6)
