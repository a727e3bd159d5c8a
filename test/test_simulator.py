"""The light-sheet simulator: determinism, physics directions, challenge file layout."""

from __future__ import annotations

import json

import numpy as np
import pytest

from fusemycells.io import read_volume
from training.simulate import SHAPE_YX, SHAPE_Z, SPACING_XY_UM, SPACING_Z_UM, draw_params, simulate_pair, write_dataset

SMALL = (20, 48, 40)


def test_same_seed_gives_identical_pairs():
    a = simulate_pair(7, "nucleus", shape=SMALL)
    b = simulate_pair(7, "nucleus", shape=SMALL)
    np.testing.assert_array_equal(a.input, b.input)
    np.testing.assert_array_equal(a.fused, b.fused)


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


def test_single_view_loses_signal_with_depth_while_the_fusion_does_not():
    pair = simulate_pair(11, "nucleus", shape=(40, 64, 64), spacing=(2.0, 0.35, 0.35))
    p = pair.params
    inp, gt = _signal(pair.input, p.offset), _signal(pair.fused, p.offset)
    if p.side == "bottom":
        inp, gt = inp[::-1], gt[::-1]
    near, far = slice(8, 16), slice(24, 32)  # mirror-symmetric depths inside the specimen
    ratio_input = inp[far].mean() / inp[near].mean()
    ratio_fused = gt[far].mean() / gt[near].mean()
    assert ratio_input < ratio_fused


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
