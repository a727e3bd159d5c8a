"""Difference-weighted blending and output normalisation (fusemycells.postprocess)."""

from __future__ import annotations

import numpy as np
import pytest

from fusemycells.config import PostprocessSpec, with_output_sigma
from fusemycells.ops import Ops
from fusemycells.postprocess import (
    FLOAT16_MAX,
    OutputSource,
    blend_slabs,
    correction_weight,
    final_source,
    uint16_affine,
    weight_stats,
)
from fusemycells.sources import ArraySource, materialise

SPEC = PostprocessSpec(diff_grid=(8, 12, 12), weight_max_filter=3, weight_sigma=1.0)
OPS = Ops("cpu", threads=2)


def difference_weight(inp: np.ndarray, pred: np.ndarray, spec: PostprocessSpec) -> np.ndarray:
    """The package's weight map of pred − inp (ZYX)."""
    return correction_weight(pred - inp, spec, ops=OPS)


def blend(inp: np.ndarray, pred: np.ndarray, weight: np.ndarray) -> np.ndarray:
    """The package's blend inp + w·(pred − inp) on inp's grid (float32 ZYX)."""
    return blend_slabs(inp.copy(), ArraySource(inp), pred - inp, weight, compact=False, ops=OPS).array


def finalise(volume: np.ndarray, spec: PostprocessSpec, spacing=None, dtype: str = "float32") -> np.ndarray:
    """The package's output of a blended ZYX volume (filters, percentile normalisation, ``dtype``)."""
    return materialise(final_source(ArraySource(volume), spec, dtype, spacing, ops=OPS))


def to_uint16(volume: np.ndarray) -> np.ndarray:
    """The package's uint16 map of a normalised output (its [min, max] onto 0..65535, :func:`uint16_affine`)."""
    source = OutputSource(ArraySource(volume), PostprocessSpec(), None, OPS)
    return source.with_affine(*uint16_affine(float(volume.min()), float(volume.max())), np.uint16).planes(0, len(volume))


def _pair(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    inp = rng.random((10, 30, 28), dtype=np.float32)
    pred = inp.copy()
    pred[2:6, 5:15, 10:20] += 3.0  # the network changed one region only
    return inp, pred


def test_difference_weight_is_in_unit_interval_on_the_diff_grid() -> None:
    inp, pred = _pair()
    w = difference_weight(inp, pred, SPEC)
    assert w.shape == SPEC.diff_grid and w.dtype == np.float32
    assert w.min() >= 0.0 and w.max() <= 1.0
    assert w.max() == pytest.approx(1.0) and w.min() == pytest.approx(0.0)


def test_difference_weight_is_high_where_the_prediction_changed() -> None:
    inp, pred = _pair()
    w = difference_weight(inp, pred, PostprocessSpec(diff_grid=(10, 30, 28), weight_max_filter=0, weight_sigma=0.0))
    assert w[3:5, 8:12, 13:17].min() > 0.9
    assert w[8:, 20:, :5].max() < 0.1


def test_identical_input_and_prediction_blend_to_the_input() -> None:
    inp = np.random.default_rng(1).random((10, 30, 28), dtype=np.float32)
    w = difference_weight(inp, inp.copy(), SPEC)
    np.testing.assert_array_equal(w, 0.0)
    out = blend(inp, inp.copy(), w)
    np.testing.assert_allclose(out, inp, atol=1e-7)


@pytest.mark.parametrize("value", [0.0, 0.25, 1.0])
def test_blend_with_constant_weight_is_the_convex_combination(value: float) -> None:
    rng = np.random.default_rng(2)
    inp = rng.random((6, 9, 11), dtype=np.float32)
    pred = rng.random((6, 9, 11), dtype=np.float32)
    coarse = np.full((3, 4, 5), value, dtype=np.float32)  # resized to the input grid inside blend
    np.testing.assert_allclose(blend(inp, pred, coarse), inp * (1 - value) + pred * value, atol=1e-6)


def test_blend_clips_weights_outside_unit_interval() -> None:
    inp = np.zeros((4, 5, 6), dtype=np.float32)
    pred = np.ones((4, 5, 6), dtype=np.float32)
    np.testing.assert_allclose(blend(inp, pred, np.full((4, 5, 6), 1.7, dtype=np.float32)), 1.0)
    np.testing.assert_allclose(blend(inp, pred, np.full((4, 5, 6), -0.5, dtype=np.float32)), 0.0)


def test_finalise_maps_2nd_percentile_to_0_and_99_8th_to_1() -> None:
    vol = np.random.default_rng(3).lognormal(3.0, 1.0, (12, 40, 40)).astype(np.float32)
    out = finalise(vol, PostprocessSpec())
    lo, hi = np.percentile(out, [2.0, 99.8])
    assert lo == pytest.approx(0.0, abs=1e-4)
    assert hi == pytest.approx(1.0, abs=1e-4)
    # monotone: the ranking of voxels is unchanged by a pure normalisation
    assert np.array_equal(np.argsort(out, axis=None)[-50:], np.argsort(vol, axis=None)[-50:])


def test_finalise_optional_filters_change_the_output_only_when_enabled() -> None:
    vol = np.random.default_rng(4).random((8, 20, 20), dtype=np.float32)
    plain = finalise(vol, PostprocessSpec())
    filtered = finalise(vol, with_output_sigma(PostprocessSpec(output_max_filter=3), 1.0))
    assert filtered.dtype == np.float32
    assert not np.allclose(plain, filtered)
    assert np.std(np.diff(filtered, axis=2)) < np.std(np.diff(plain, axis=2))  # smoother


def test_constant_image_gives_no_nan() -> None:
    flat = np.full((6, 10, 10), 5.0, dtype=np.float32)
    w = difference_weight(flat, flat.copy(), SPEC)
    out = finalise(blend(flat, flat.copy(), w), PostprocessSpec())
    assert np.isfinite(w).all() and np.isfinite(out).all()
    assert np.isfinite(finalise(out, PostprocessSpec(), dtype="uint16")).all()


def test_uint16_output_is_affine_and_lossless_within_quantisation() -> None:
    vol = (np.random.default_rng(5).normal(0.4, 0.3, (6, 20, 20))).astype(np.float32)  # includes <0 and >1
    vol.flat[:50] = 0.0  # a plateau at the 2nd percentile's level, 0 after percentile normalisation
    out = to_uint16(vol)
    assert out.dtype == np.uint16
    assert out.min() <= 1 and out.max() == 65535
    offset, scale = uint16_affine(float(vol.min()), float(vol.max()))
    level = -offset * scale
    assert level == pytest.approx(round(level), abs=1e-6) and np.all(out.flat[:50] == round(level))  # 0 on a level
    restored = out.astype(np.float64) / scale + offset
    assert np.abs(restored - vol).max() <= 0.5 / scale + 1e-6 * (vol.max() - vol.min())
    # affine: a least-squares line through (input, output) leaves less than one grey level anywhere
    slope, intercept = np.polyfit(vol.ravel().astype(np.float64), out.ravel().astype(np.float64), 1)
    residual = out.ravel() - (slope * vol.ravel() + intercept)
    assert np.abs(residual).max() < 1.0
    assert uint16_affine(0.5, 2.0) == (0.5, 65535.0 / 1.5)  # 0 outside the range: the plain [min, max] map


def test_a_constant_output_maps_to_zero_and_an_unknown_dtype_is_rejected() -> None:
    vol = np.random.default_rng(6).random((3, 4, 5), dtype=np.float32)
    assert to_uint16(np.zeros((2, 2, 2), np.float32)).max() == 0  # constant: no division by zero
    assert finalise(np.zeros((2, 2, 2), np.float32), PostprocessSpec(), dtype="uint16").max() == 0
    with pytest.raises(ValueError):
        final_source(ArraySource(vol), PostprocessSpec(), "uint8", ops=OPS)


def test_weight_stats_fractions() -> None:
    w = np.array([0.0, 0.2, 0.6, 0.95], dtype=np.float32)
    assert weight_stats(w) == {"w>0.1": 0.75, "w>0.5": 0.5, "w>0.9": 0.25}


def test_relative_noise_recovers_white_noise_relative_to_the_range():
    from fusemycells.postprocess import relative_noise

    rng = np.random.default_rng(0)
    clean = np.zeros((12, 96, 96), dtype=np.float32)
    clean[:, 16:80, 16:80] = 1000.0  # a bright block: foreground, flat inside
    for sigma in (10.0, 40.0):
        noisy = clean + rng.normal(0, sigma, clean.shape).astype(np.float32)
        lo, hi = np.percentile(noisy, [2, 99.8])
        assert relative_noise(noisy) == pytest.approx(sigma / (hi - lo), rel=0.15)
    assert relative_noise(np.zeros((4, 32, 32), dtype=np.float32)) == 0.0  # no foreground


def test_adaptive_settings_interpolate_knots_and_hold_the_ends():
    from dataclasses import replace

    from fusemycells.postprocess import adaptive_settings

    assert adaptive_settings(0.05, PostprocessSpec()) == (0.0, 1.0)  # no knots: no output filter, network on
    spec = replace(PostprocessSpec(), output_sigma_knots=((0.0, 0.7),))
    assert adaptive_settings(0.05, spec) == (0.7, 1.0)  # one knot: a fixed σ, network on
    assert adaptive_settings(float("nan"), spec) == (0.7, 1.0)  # whatever the noise
    spec = replace(spec, output_sigma_knots=((0.01, 0.4), (0.03, 1.0)), gate_knots=((0.06, 1.0), (0.09, 0.0)))
    assert adaptive_settings(0.0, spec) == (0.4, 1.0)
    assert adaptive_settings(0.02, spec)[0] == pytest.approx(0.7)
    assert adaptive_settings(0.075, spec) == (pytest.approx(1.0), pytest.approx(0.5))
    assert adaptive_settings(1.0, spec) == (1.0, 0.0)


def test_background_mask_is_zero_in_empty_space_and_one_on_the_specimen():
    from dataclasses import replace

    from fusemycells.postprocess import background_mask

    vol = np.zeros((32, 32, 32), dtype=np.float32)
    vol[8:24, 8:24, 8:24] = 1.0
    spec = replace(PostprocessSpec(), diff_grid=(16, 16, 16), background_threshold=0.1)
    mask = background_mask(vol, spec, ops=OPS)
    assert mask.shape == (16, 16, 16)
    assert mask[0, 0, 0] < 1e-6 and mask[8, 8, 8] == 1.0
    assert np.all(background_mask(vol, replace(spec, background_threshold=0.0), ops=OPS) == 1.0)  # off


def test_output_sigma_isotropic_in_um_scales_z_by_the_spacing_ratio():
    from dataclasses import replace

    from fusemycells.postprocess import output_sigma_zyx

    spec = with_output_sigma(PostprocessSpec(), 0.8)
    assert output_sigma_zyx(spec, (2.0, 0.4, 0.4)) == (0.8, 0.8, 0.8)  # voxels on every axis (default)
    physical = replace(spec, output_sigma_isotropic_um=True)
    assert output_sigma_zyx(physical, (2.0, 0.4, 0.4)) == pytest.approx((0.16, 0.8, 0.8))  # same 0.32 µm on Z
    assert output_sigma_zyx(physical, None) == (0.8, 0.8, 0.8)


def test_output_sigma_isotropic_in_um_also_scales_y_when_its_spacing_differs_from_x():
    from dataclasses import replace

    from fusemycells.postprocess import output_sigma_zyx

    spec = replace(with_output_sigma(PostprocessSpec(), 0.8), output_sigma_isotropic_um=True)
    sigma = output_sigma_zyx(spec, (2.0, 0.2, 0.4))  # Y pixels half the X ones: 0.32 µm is 1.6 Y voxels
    assert sigma == pytest.approx((0.16, 1.6, 0.8))
    assert [s * d for s, d in zip(sigma, (2.0, 0.2, 0.4))] == pytest.approx([0.32] * 3)  # one width in µm


def test_isotropic_um_output_filter_smooths_along_z_less_on_an_anisotropic_stack():
    from dataclasses import replace

    import reference

    vol = np.zeros((12, 16, 16), dtype=np.float32)
    vol[6, 8, 8] = 1.0
    spec = replace(with_output_sigma(PostprocessSpec(), 1.0), output_sigma_isotropic_um=True)
    out = materialise(OutputSource(ArraySource(vol), spec, (2.5, 0.25, 0.25), OPS))
    assert out[5, 8, 8] / out[6, 8, 8] < 1e-6  # σ_z 0.1 voxel: next plane nearly untouched
    assert out[6, 8, 7] / out[6, 8, 8] == pytest.approx(np.exp(-0.5), rel=0.05)  # σ_y 1 voxel
    lazy = materialise(final_source(ArraySource(vol), spec, spacing=(2.5, 0.25, 0.25), ops=OPS))
    np.testing.assert_allclose(lazy, reference.finalise(vol, spec, (2.5, 0.25, 0.25)), atol=1e-6)


def test_weight_filters_are_diff_grid_voxels_by_default_and_a_physical_width_when_given_in_um():
    from dataclasses import replace

    from fusemycells.postprocess import weight_filters

    spec = PostprocessSpec(diff_grid=(128, 128, 128), weight_max_filter=9, weight_sigma=3.0)
    assert weight_filters(spec, (92.0, 38.4, 38.4)) == (9, 3.0)  # shipped: voxels, whatever the extent
    physical = replace(spec, weight_max_filter=2.7, weight_sigma=0.9, weight_filter_unit="um")
    size, sigma = weight_filters(physical, (92.16, 38.4, 38.4))  # diff voxels of 0.72, 0.3, 0.3 µm
    assert size == (3, 9, 9)  # 2.7 µm: 3.75 → 3 voxels in Z (odd), 9 in Y/X
    assert sigma == pytest.approx((1.25, 3.0, 3.0))
    with pytest.raises(ValueError, match="extent"):
        weight_filters(physical, None)  # µm without an extent: no silent fallback to voxels


@pytest.mark.parametrize("ops", [Ops("cpu", threads=2), Ops("cpu", cpu_hybrid=False, threads=2)], ids=["cpu", "gpu code"])
def test_the_compact_blend_clips_to_float16s_range_so_the_output_stays_finite(ops: Ops) -> None:
    """In place over 2-byte pixels the blend is float16: an input of 6·10⁴ (normalised) plus a correction at
    float16's limit (as the patch stage stores it) exceeds ±65504 and would be ±inf, then NaN downstream."""
    data = np.full((4, 8, 8), 600, dtype=np.uint16)
    data[:, :, :4] = 0
    x_in = ArraySource(data, 0.0, 100.0)  # 60000 and 0
    correction = np.full((4, 8, 8), FLOAT16_MAX, dtype=np.float16)
    correction[:, :, :4] = -FLOAT16_MAX
    out = blend_slabs(data, x_in, correction, np.ones((2, 4, 4), np.float32), compact=True, ops=ops).array
    assert out.dtype == np.float16 and np.shares_memory(out, data)
    assert np.isfinite(out).all()
    assert (out[:, :, 4:] == FLOAT16_MAX).all() and (out[:, :, :4] == -FLOAT16_MAX).all()
