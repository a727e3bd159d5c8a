"""The light-sheet simulator: determinism, physics directions, challenge file layout."""

from __future__ import annotations

import json

import numpy as np
import pytest

from fusemycells.evaluation.metrics import metric_normalise, ssim
from fusemycells.io.tiff import read_volume
from training.simulate import (
    LIGHT_AXIS_P,
    SHAPE_YX,
    SHAPE_Z,
    SPACING_XY_UM,
    SPACING_Z_UM,
    clean_view,
    draw_params,
    simulate_pair,
    specimen,
    write_dataset,
)

SMALL = (20, 48, 40)


def test_same_seed_gives_identical_pairs():
    a = simulate_pair(7, "nucleus", shape=SMALL)
    b = simulate_pair(7, "nucleus", shape=SMALL)
    np.testing.assert_array_equal(a.input, b.input)
    np.testing.assert_array_equal(a.fused, b.fused)
    assert a.params == b.params


def test_clean_label_is_deterministic_and_only_returned_on_request():
    a = simulate_pair(8, "membrane", shape=SMALL, return_clean=True)
    b = simulate_pair(8, "membrane", shape=SMALL, return_clean=True)
    assert simulate_pair(8, "membrane", shape=SMALL).clean is None
    assert a.clean is not None and a.clean.shape == SMALL and a.clean.dtype == np.float32
    np.testing.assert_array_equal(a.clean, b.clean)


def test_light_axis_follows_its_probabilities_and_gt_sharpening_is_optional():
    axes = np.array([draw_params(s, "nucleus", shape=SMALL).light_axis for s in range(600)])
    freq = np.bincount(axes, minlength=3) / len(axes)
    np.testing.assert_allclose(freq, LIGHT_AXIS_P, atol=0.07)
    p = draw_params(3, "nucleus", shape=SMALL)
    assert 0.5 <= p.gt_axial_factor <= 1.0
    q = draw_params(3, "nucleus", shape=SMALL, sharpen_gt=False)
    assert q.gt_axial_factor == 1.0 and q.light_axis == p.light_axis and q.photons == p.photons


def test_different_seeds_give_different_specimens():
    a = simulate_pair(1, "nucleus", shape=SMALL, spacing=(2.0, 0.3, 0.3))
    b = simulate_pair(2, "nucleus", shape=SMALL, spacing=(2.0, 0.3, 0.3))
    assert not np.array_equal(a.fused, b.fused)


@pytest.mark.parametrize("seed", range(6))
def test_random_parameters_stay_in_the_real_studies_ranges(seed):
    p = draw_params(seed, "membrane")
    assert SPACING_Z_UM[0] <= p.spacing[0] <= SPACING_Z_UM[1]
    assert SPACING_XY_UM[0] <= p.spacing[1] == p.spacing[2] <= SPACING_XY_UM[1]
    assert SHAPE_Z[0] <= p.shape[0] <= SHAPE_Z[1]
    assert all(SHAPE_YX[0] <= n <= SHAPE_YX[1] for n in p.shape[1:])


@pytest.mark.parametrize("channel", ["nucleus", "membrane"])
def test_pair_is_uint16_zyx_on_one_grid(channel):
    pair = simulate_pair(3, channel, shape=SMALL)
    assert pair.input.shape == pair.fused.shape == SMALL
    assert pair.input.dtype == pair.fused.dtype == np.uint16
    assert pair.channel == channel


def _signal(volume: np.ndarray, offset: float) -> np.ndarray:
    return np.clip(volume.astype(np.float64) - offset, 0, None)


def _entry_first(volume: np.ndarray, axis: int, entry_at_start: bool) -> np.ndarray:
    """``volume`` with the light axis first and the entry side at index 0."""
    v = np.moveaxis(volume, axis, 0)
    return v if entry_at_start else v[::-1]


@pytest.mark.parametrize("seed,axis", [(13, 0), (19, 1), (35, 2)])  # seed 19: Y flipped after simulation
def test_single_view_loses_signal_with_depth_along_the_drawn_light_axis(seed, axis):
    pair = simulate_pair(seed, "nucleus", shape=(32, 64, 64), spacing=(1.5, 0.4, 0.4), photons=(5000.0, 10000.0))
    p = pair.params
    assert p.light_axis == axis
    inp = _entry_first(_signal(pair.input, p.offset), axis, p.entry_at_start(axis))
    gt = _entry_first(_signal(pair.fused, p.offset), axis, p.entry_at_start(axis))
    n = inp.shape[0]
    near, far = slice(int(0.3 * n), int(0.45 * n)), slice(int(0.55 * n), int(0.7 * n))  # mirror-symmetric depths
    assert inp[far].mean() / gt[far].mean() < 0.9 * inp[near].mean() / gt[near].mean()


def _relative_sharpness(volume: np.ndarray) -> float:
    """Mean gradient magnitude over mean intensity (per voxel, unitless)."""
    grads = np.gradient(volume.astype(np.float64))
    return float(np.mean(np.sqrt(sum(g**2 for g in grads))) / max(float(volume.mean()), 1e-12))


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_noise_free_view_is_sharper_near_the_entry_side_along_any_light_axis(axis):
    p = draw_params(21, "nucleus", shape=(24, 48, 48), spacing=(1.0, 0.4, 0.4))
    p.light_axis, p.side, p.haze = axis, "bottom", 0.0
    p.semi_axes_um = (20.0, 20.0, 20.0)  # tissue fills the stack: depth grows along the whole axis
    p.psf_growth, p.mu_per_um = 0.05, 0.03
    label, tissue = specimen(p, np.random.default_rng(0))
    view = _entry_first(clean_view(label, tissue, p, "bottom"), axis, False)
    lab = _entry_first(label, axis, False)
    n = view.shape[0]
    near, far = slice(0, n // 3), slice(n - n // 3, n)
    assert view[far].mean() / lab[far].mean() < view[near].mean() / lab[near].mean()  # attenuation
    blur_near = _relative_sharpness(view[near]) / _relative_sharpness(lab[near])
    blur_far = _relative_sharpness(view[far]) / _relative_sharpness(lab[far])
    assert blur_far < blur_near  # the PSF widens with depth


@pytest.mark.parametrize("seed,channel", [(31, "nucleus"), (32, "membrane")])
def test_fused_target_is_closer_to_the_specimen_than_the_single_view(seed, channel):
    pair = simulate_pair(seed, channel, shape=(24, 64, 64), spacing=(1.5, 0.3, 0.3), return_clean=True)
    clean = metric_normalise(pair.clean)
    assert ssim(metric_normalise(pair.fused.astype(np.float32)), clean) > ssim(metric_normalise(pair.input.astype(np.float32)), clean)


def test_fused_target_is_less_noisy_than_the_single_view():
    pair = simulate_pair(5, "membrane", shape=SMALL, spacing=(2.0, 0.3, 0.3))
    p = pair.params
    # Outside the specimen only camera and photon noise remain: compare relative noise there.
    corner = (slice(None), slice(0, 4), slice(0, 4))
    rel_in = pair.input[corner].std() / max(np.percentile(_signal(pair.input, p.offset), 99.5), 1)
    rel_gt = pair.fused[corner].std() / max(np.percentile(_signal(pair.fused, p.offset), 99.5), 1)
    assert rel_gt < rel_in


def test_membranes_are_thin_structures_and_nuclei_are_filled_blobs():
    nuc = simulate_pair(4, "nucleus", shape=SMALL, spacing=(2.0, 0.3, 0.3)).fused.astype(float)
    mem = simulate_pair(4, "membrane", shape=SMALL, spacing=(2.0, 0.3, 0.3)).fused.astype(float)

    def bright_fraction(v):
        v = v - np.percentile(v, 1)
        return float((v > 0.5 * np.percentile(v, 99.5)).mean())

    assert bright_fraction(mem) != pytest.approx(bright_fraction(nuc), rel=0.05)


def test_write_dataset_uses_the_challenge_layout_and_metadata(tmp_path):
    records = write_dataset(tmp_path, n=1, seed=100, channels=("nucleus", "membrane"), study="study_x")
    folder = tmp_path / "study_x"
    names = sorted(p.name for p in folder.glob("*.tif"))
    assert names == ["image_0_nucleus_angle.tif", "image_0_nucleus_fused.tif", "image_1_membrane_angle.tif", "image_1_membrane_fused.tif"]
    vol = read_volume(folder / "image_1_membrane_angle.tif")
    assert vol.channel == "membrane"
    assert vol.warnings == []
    assert vol.spacing == pytest.approx(tuple(records[1]["spacing"]), rel=1e-6)
    assert vol.metadata.get("study") == "study_x"
    saved = json.loads((folder / "params.json").read_text())
    assert [r["seed"] for r in saved] == [100, 50_100]


def test_photon_override_changes_only_the_photon_budget_and_stays_deterministic():
    from training.simulate import simulate_pair

    base = simulate_pair(5, "nucleus", shape=(12, 40, 40))
    clean = simulate_pair(5, "nucleus", shape=(12, 40, 40), photons=(20000.0, 30000.0))
    again = simulate_pair(5, "nucleus", shape=(12, 40, 40), photons=(20000.0, 30000.0))
    assert 20000.0 <= clean.params.photons <= 30000.0
    np.testing.assert_array_equal(clean.input, again.input)
    assert clean.params.mu_per_um == base.params.mu_per_um and clean.params.spacing == base.params.spacing
