"""The challenge metric: SSIM as skimage defines it, N-SSIM's known answers (the QC figure: test_qc.py)."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage
from skimage.metrics import structural_similarity

from fusemycells.evaluation.metrics import (
    GAUSSIAN_BASELINE_SIGMA,
    gaussian_baseline,
    metric_normalise,
    n_ssim,
    score_case,
    ssim,
)


def _pair(shape=(20, 33, 41), seed=0):
    rng = np.random.default_rng(seed)
    gt = ndimage.gaussian_filter(rng.random(shape), 1.5).astype(np.float32) * 1000
    inp = (ndimage.gaussian_filter(gt, (2.0, 1.0, 1.0)) + rng.normal(0, 5, shape)).astype(np.float32)
    return inp, gt


@pytest.mark.parametrize("slab", [1, 5, 64])
def test_ssim_matches_skimage_3d_for_any_slab_size(slab):
    a, b = _pair()
    a, b = metric_normalise(a), metric_normalise(b)
    expected = structural_similarity(a.astype(np.float64), b.astype(np.float64), data_range=1.0)
    assert ssim(a, b, slab=slab) == pytest.approx(expected, abs=1e-10)


def test_ssim_of_identical_volumes_is_one_and_drops_with_noise():
    a, _ = _pair()
    assert ssim(a, a) == pytest.approx(1.0)
    noisy = a + np.random.default_rng(1).normal(0, a.std(), a.shape).astype(np.float32)
    assert ssim(metric_normalise(noisy), metric_normalise(a)) < 0.9


def test_ssim_works_on_volumes_thinner_than_the_window():
    a, b = _pair(shape=(3, 30, 30))
    value = ssim(metric_normalise(a), metric_normalise(b))
    assert 0 < value < 1


def test_metric_normalise_maps_percentiles_without_clipping():
    v = np.arange(1000, dtype=np.float32)
    out = metric_normalise(v)
    lo, hi = np.percentile(v, [2, 99.8])
    assert out[0] < 0 and out[-1] > 1  # no clipping
    assert np.interp(lo, v, out) == pytest.approx(0, abs=1e-5)
    assert np.interp(hi, v, out) == pytest.approx(1, abs=1e-5)
    assert np.all(metric_normalise(np.full((4, 4, 4), 7.0)) == 0)  # flat: shifted, no division


def test_n_ssim_known_answers():
    inp, gt = _pair()
    perfect = score_case("c", "nucleus", inp, gt.copy(), gt)
    assert perfect.n_ssim == pytest.approx(1.0)
    identity = score_case("c", "nucleus", inp, inp.copy(), gt)
    assert identity.n_ssim == pytest.approx(0.0, abs=1e-12)
    # affine intensity changes do not matter: every volume is percentile-normalised
    rescaled = score_case("c", "nucleus", inp, 3.0 * gt + 100.0, gt)
    assert rescaled.n_ssim == pytest.approx(1.0, abs=1e-5)
    assert n_ssim(0.5, 0.5) == 0.0 and n_ssim(1.0, 0.5) == 1.0 and n_ssim(0.25, 0.5) == -0.5
    assert n_ssim(0.9, 1.0) == 0.0  # a perfect input cannot be improved: no division by zero


def test_gaussian_baseline_uses_the_channel_sigma():
    inp, _ = _pair()
    for channel, sigma in GAUSSIAN_BASELINE_SIGMA.items():
        np.testing.assert_allclose(gaussian_baseline(inp, channel), ndimage.gaussian_filter(inp, sigma), rtol=1e-6)
    assert GAUSSIAN_BASELINE_SIGMA == {"nucleus": 0.442, "membrane": 0.5}


def test_score_case_refuses_mismatched_shapes():
    inp, gt = _pair()
    with pytest.raises(ValueError, match="shapes differ"):
        score_case("c", "nucleus", inp, gt[:-1], gt)

