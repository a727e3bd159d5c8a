"""Domain randomisation (training/domain.py): each physical effect does what its docstring says."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from fusemycells.evaluation.metrics import metric_normalise, ssim
from training import domain as dr
from training.simulate import Effects, draw_params, optical_depth, simulate_pair

SMALL = (20, 48, 40)


def test_randomise_adds_its_parameters_without_changing_the_other_draws():
    plain, wide = draw_params(5, "nucleus"), draw_params(5, "nucleus", effects=Effects(randomise=True))
    assert plain.domain is None and wide.domain == dr.draw_domain(5)
    assert (wide.shape, wide.spacing, wide.light_axis, wide.photons, wide.side) == (plain.shape, plain.spacing, plain.light_axis, plain.photons, plain.side)


@pytest.mark.parametrize("channel", ["nucleus", "membrane"])
def test_randomised_pairs_are_deterministic_and_the_target_stays_closer_to_the_specimen(channel):
    a = simulate_pair(31, channel, shape=(24, 64, 64), spacing=(1.5, 0.3, 0.3), return_clean=True, effects=Effects(randomise=True))
    b = simulate_pair(31, channel, shape=(24, 64, 64), spacing=(1.5, 0.3, 0.3), return_clean=True, effects=Effects(randomise=True))
    np.testing.assert_array_equal(a.input, b.input)
    np.testing.assert_array_equal(a.fused, b.fused)
    assert a.input.dtype == a.fused.dtype == np.uint16 and a.input.shape == (24, 64, 64)
    assert not np.array_equal(a.fused, simulate_pair(31, channel, shape=(24, 64, 64), spacing=(1.5, 0.3, 0.3)).fused)
    clean = metric_normalise(a.clean)
    assert ssim(metric_normalise(a.fused.astype(np.float32)), clean) > ssim(metric_normalise(a.input.astype(np.float32)), clean)


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_absorber_shadows_are_stripes_along_the_light_axis(axis):
    shape, spacing = (40, 40, 40), (0.5, 0.5, 0.5)
    tissue = np.ones(shape, dtype=np.float32)
    absorb = dr.absorber_density(tissue, spacing, np.random.default_rng(0), 30, 0.8, 0.6, axis)
    tau, _ = optical_depth(absorb, spacing[axis], 1.0, "top", axis)
    light = np.exp(-2 * tau)
    assert light.min() == pytest.approx(np.exp(-2 * 0.6), abs=0.05)  # the darkest line has optical depth 0.6
    along = np.abs(np.diff(light, axis=axis)).mean()
    across = np.mean([np.abs(np.diff(light, axis=a)).mean() for a in range(3) if a != axis])
    assert along < 0.25 * across
    assert (np.diff(light, axis=axis) <= 1e-6).all()  # shadows only downstream: light never recovers


def test_membrane_profile_has_the_requested_thickness_at_half_maximum():
    d = np.linspace(-3, 3, 6001)
    for thickness in (0.5, 1.2):
        profile = dr.membrane_profile(d, thickness)
        above = d[profile >= 0.5 * profile.max()]
        assert above.max() - above.min() == pytest.approx(thickness, abs=0.01)
        assert profile.max() > 0.95  # a plateau, not a thin Gaussian


def test_cell_centres_follow_the_density_field_and_keep_their_distance():
    rng = np.random.default_rng(1)
    gradient = np.broadcast_to(np.linspace(-1, 1, 6, dtype=np.float32), (6, 6, 6)).copy()  # increases along X
    flat = np.zeros((6, 6, 6), dtype=np.float32)
    semi = half = (60.0, 60.0, 60.0)
    centres, scales = dr.variable_cell_centres(semi, half, 400, 8.0, 0.7, flat, 0.0, gradient, 6.0, 0.0, rng)
    assert (centres[:, 2] > 20).sum() > 3 * (centres[:, 2] < -20).sum()  # dense and sparse regions
    dist = np.linalg.norm(centres[:, None] - centres[None], axis=-1) + np.eye(len(centres)) * 1e9
    assert dist.min() >= 0.7 * 8.0 - 1e-4 and np.allclose(scales, 1.0)
    big, big_scales = dr.variable_cell_centres(semi, half, 400, 8.0, 0.7, gradient, 0.5, flat, 0.0, 3.0, rng)
    assert big_scales.max() / big_scales.min() > 2  # varied cell size
    assert len(big[big[:, 2] > 20]) < len(big[big[:, 2] < -20])  # larger cells, fewer of them


def _radius_along(occupancy: np.ndarray, direction: tuple[int, int, int], centre: int) -> int:
    pos = np.array([centre] * 3)
    steps = 0
    while occupancy[tuple(pos)] > 0.5:
        pos += direction
        steps += 1
    return steps


def test_nuclei_are_rotated_ellipsoids_made_irregular_by_the_bump_field():
    n = 41
    grid = np.arange(n, dtype=np.float32) - n // 2
    offsets = (grid[:, None, None], grid[None, :, None], grid[None, None, :])  # 1 µm voxels
    radii = np.array([12.0, 8.0, 8.0])
    plain = dr.nucleus_occupancy(offsets, radii, np.eye(3), 0.3)
    assert _radius_along(plain, (1, 0, 0), n // 2) == 12 and _radius_along(plain, (0, 1, 0), n // 2) == 8
    swap = np.array([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])  # long axis now along Y
    assert _radius_along(dr.nucleus_occupancy(offsets, radii, swap, 0.3), (0, 1, 0), n // 2) == 12
    round_radii = np.array([10.0, 10.0, 10.0])
    bumps = dr.unit_noise((n, n, n), (5.0, 5.0, 5.0), np.random.default_rng(2))
    lumpy = dr.nucleus_occupancy(offsets, round_radii, np.eye(3), 0.3, bumps, 0.3)
    directions = [(1, 0, 0), (-1, 0, 0), (0, 1, 0), (0, -1, 0), (0, 0, 1), (0, 0, -1)]
    reach = [_radius_along(lumpy, d, n // 2) for d in directions]
    assert max(reach) - min(reach) >= 3


def test_chromatin_texture_has_mean_one_and_finer_granules_for_smaller_sizes():
    shape, spacing = (30, 60, 60), (0.5, 0.2, 0.2)
    fine = dr.chromatin_texture(shape, spacing, np.random.default_rng(0), 0.3, 0.4)
    coarse = dr.chromatin_texture(shape, spacing, np.random.default_rng(0), 0.9, 0.4)
    weak = dr.chromatin_texture(shape, spacing, np.random.default_rng(0), 0.3, 0.1)
    assert fine.mean() == pytest.approx(1.0, abs=0.05) and fine.min() >= 0.1
    assert np.abs(np.diff(fine, axis=2)).mean() > 1.5 * np.abs(np.diff(coarse, axis=2)).mean()
    assert fine.std() > 2.5 * weak.std()


def test_sheet_thickening_widens_only_the_axial_psf_with_depth():
    sz0, sy0, _ = dr.psf_sigmas_um(0.0, 0.3, 0.01, 3.0, sheet_growth=0.02)
    sz1, sy1, sx1 = dr.psf_sigmas_um(100.0, 0.3, 0.01, 3.0, sheet_growth=0.02)
    rz1, ry1, _ = dr.psf_sigmas_um(100.0, 0.3, 0.01, 3.0)
    assert (sy1, sx1) == (ry1, ry1) and sz1 == pytest.approx(rz1 + 2.0)
    assert sz0 == pytest.approx(0.9) and sy0 == pytest.approx(0.3)


def test_scatter_halo_keeps_the_light_and_spreads_it_over_its_radius():
    point = np.zeros((31, 31, 31), dtype=np.float32)
    point[15, 15, 15] = 1.0
    halo = dr.scatter_halo(point, (0.5, 0.5, 0.5), 2.0)
    assert halo.sum() == pytest.approx(1.0, rel=1e-3)
    profile = halo[15, 15, 15:]
    assert profile[4] == pytest.approx(profile[0] * np.exp(-0.5), rel=0.02)  # σ = 2 µm = 4 voxels


@pytest.mark.parametrize("side", ["top", "bottom"])
def test_refractive_defocus_blurs_planes_deeper_from_the_objective(side):
    rng = np.random.default_rng(3)
    view = np.zeros((20, 40, 40), dtype=np.float32)
    view[:, rng.integers(5, 35, 30), rng.integers(5, 35, 30)] = 1.0  # the same beads in every plane
    tissue = np.ones_like(view)
    out = dr.refractive_defocus(view, tissue, (2.0, 0.25, 0.25), 0.02, side)
    peaks = out.reshape(20, -1).max(axis=1)
    if side == "bottom":
        peaks = peaks[::-1]
    assert (np.diff(peaks) <= 1e-6).all() and peaks[-1] < 0.3 * peaks[0]
    np.testing.assert_allclose(out.reshape(20, -1).sum(1), view.reshape(20, -1).sum(1), rtol=0.02)  # light kept (beads near the border lose a little)


def test_plane_gains_drift_between_planes_and_bleach_towards_the_last_acquired():
    rng = np.random.default_rng(4)
    assert np.allclose(dr.plane_gains(12, rng, 0.0, 0.0), 1.0)
    bleach = dr.plane_gains(12, rng, 0.0, 0.3)
    assert bleach[0] == pytest.approx(1.0) and bleach[-1] == pytest.approx(0.7)
    assert dr.plane_gains(12, rng, 0.0, 0.3, reverse=True)[0] == pytest.approx(0.7)
    drift = dr.plane_gains(200, rng, 0.1, 0.0)
    assert 0.05 < np.log(drift).std() < 0.15 and np.abs(np.diff(np.log(drift))).max() < 0.1  # a smooth walk


def test_misregister_moves_the_volume_by_the_shift_in_um():
    vol = np.zeros((20, 30, 30), dtype=np.float32)
    vol[8:12, 10:16, 12:18] = 1.0
    moved = dr.misregister(vol, (1.0, -0.3, 0.45), (2.0, 0.3, 0.3))
    shift = np.array(ndimage.center_of_mass(moved)) - np.array(ndimage.center_of_mass(vol))
    np.testing.assert_allclose(shift, (0.5, -1.0, 1.5), atol=0.05)


def test_residual_blur_widens_the_target_and_keeps_its_sum():
    point = np.zeros((21, 41, 41), dtype=np.float32)
    point[10, 20, 20] = 1.0
    blurred = dr.residual_blur(point, (1.0, 0.2, 0.2), 0.3, 2.0)
    assert blurred.sum() == pytest.approx(1.0, rel=1e-3) and blurred.max() < 0.2
    width_x = np.sqrt((blurred.sum((0, 1)) * (np.arange(41) - 20) ** 2).sum()) * 0.2
    width_z = np.sqrt((blurred.sum((1, 2)) * (np.arange(21) - 10) ** 2).sum()) * 1.0
    assert width_x == pytest.approx(0.3, rel=0.1) and width_z == pytest.approx(0.6, rel=0.15)
    assert dr.residual_blur(point, (1.0, 0.2, 0.2), 0.0, 2.0) is point


def test_smooth_fields_agree_between_points_and_the_grid():
    field = dr.smooth_field(np.random.default_rng(5))
    grid = dr.field_on_grid(field, (9, 11, 13))
    z, y, x = 4, 7, 2
    point = np.array([[z / 8 * 2 - 1, y / 10 * 2 - 1, x / 12 * 2 - 1]])
    assert dr.field_at(field, point)[0] == pytest.approx(grid[z, y, x], abs=1e-5)
    assert grid[0, 0, 0] == pytest.approx(field[0, 0, 0]) and grid[-1, -1, -1] == pytest.approx(field[-1, -1, -1])


def test_background_flag_is_off_by_default_and_leaves_old_seeds_bit_identical():
    import hashlib

    digests = {}
    for randomise in (False, True):
        pair = simulate_pair(31, "nucleus", shape=(24, 64, 64), spacing=(1.5, 0.3, 0.3), effects=Effects(randomise=randomise))
        digests[randomise] = hashlib.sha256(pair.input.tobytes() + pair.fused.tobytes()).hexdigest()[:16]
        assert pair.params.background is None
    assert digests == {False: "6eeeebfc38b02241", True: "9f62248e59f0742d"}  # taken before the flag existed
    plain, with_bg = draw_params(31, "nucleus", effects=Effects(randomise=True)), draw_params(31, "nucleus", effects=Effects(randomise=True, background=True))
    assert with_bg.background == dr.draw_background(31) and with_bg.domain == plain.domain and with_bg.photons == plain.photons


def test_background_field_is_a_smooth_nonnegative_pedestal_of_the_requested_level():
    shape, spacing = (30, 120, 120), (2.0, 0.3, 0.3)
    flat = dr.background_field(shape, spacing, np.random.default_rng(0), 0.05, 0.0, 30.0)
    np.testing.assert_allclose(flat, 0.05, rtol=1e-6)
    field = dr.background_field(shape, spacing, np.random.default_rng(0), 0.05, 0.6, 30.0)
    assert field.min() >= 0 and field.mean() == pytest.approx(0.05, rel=0.25)
    assert field.std() > 0.01  # it varies ...
    step = np.abs(np.diff(field, axis=2)).mean()  # ... slowly: neighbouring voxels 0.3 µm apart barely differ
    assert step < 0.02 * field.std()


def test_background_reaches_the_view_fully_and_the_target_by_its_fraction():
    kwargs = dict(shape=(24, 64, 64), spacing=(1.5, 0.3, 0.3))
    base = simulate_pair(35, "nucleus", return_clean=True, effects=Effects(randomise=True), **kwargs)  # seed 35: level 0.06, a quarter of it left in the target
    lit = simulate_pair(35, "nucleus", effects=Effects(randomise=True, background=True), **kwargs)
    b = lit.params.background
    empty = base.clean <= np.percentile(base.clean, 20)  # voxels without specimen (chosen noise-free: no selection bias)
    photons = lit.params.photons  # counts per unit signal; the target has gt_photon_factor times more
    gain_in = (float(lit.input[empty].mean()) - float(base.input[empty].mean())) / photons
    gain_gt = (float(lit.fused[empty].mean()) - float(base.fused[empty].mean())) / (photons * lit.params.gt_photon_factor)
    assert gain_in == pytest.approx(b.level, rel=0.5)
    assert gain_gt == pytest.approx(b.target_fraction * gain_in, rel=0.2)


def test_weaken_scales_attenuation_and_blur_growth_down_and_keeps_the_target_axial_factor_near_one():
    rng = np.random.default_rng(0)
    for _ in range(50):
        mu, growth, factor = dr.weaken(0.02, 0.01, 0.6, rng)
        assert 0.02 * 0.03 - 1e-12 <= mu <= 0.02 * 0.3 and 0.01 * 0.03 - 1e-12 <= growth <= 0.01 * 0.3
        assert 0.85 <= factor <= 1.0
    assert dr.weaken(0.02, 0.01, 0.95, np.random.default_rng(1))[2] >= 0.95  # never sharpens the target more


def test_gentle_pairs_keep_the_other_draws_and_their_input_is_closer_to_the_target():
    plain, gentle = draw_params(40, "nucleus", effects=Effects(randomise=True)), draw_params(40, "nucleus", effects=Effects(randomise=True, gentle=True))
    assert gentle.mu_per_um < plain.mu_per_um and gentle.psf_growth < plain.psf_growth
    assert (gentle.shape, gentle.photons, gentle.light_axis, gentle.domain) == (plain.shape, plain.photons, plain.light_axis, plain.domain)
    assert "gentle" not in plain.extra
    kwargs = dict(shape=(24, 64, 64), spacing=(1.5, 0.3, 0.3), photons=(3000, 3001))
    scores = {}
    for flag in (False, True):
        pair = simulate_pair(40, "nucleus", effects=Effects(randomise=True, gentle=flag), **kwargs)
        scores[flag] = ssim(metric_normalise(pair.input.astype(np.float32)), metric_normalise(pair.fused.astype(np.float32)))
    assert scores[True] > scores[False]


def test_layout_and_shared_target_flags_draw_from_their_own_streams_and_leave_the_rest():
    plain = draw_params(41, "nucleus", effects=Effects(randomise=True))
    both = draw_params(41, "nucleus", effects=Effects(randomise=True, layouts=True, shared_target=True))
    assert plain.layout is None and plain.shared_target is None
    assert both.layout == dr.draw_layout(41) and 0.3 <= both.shared_target <= 1.0
    assert (both.shape, both.photons, both.light_axis, both.domain) == (plain.shape, plain.photons, plain.light_axis, plain.domain)
    with pytest.raises(ValueError, match="randomise"):
        draw_params(41, "nucleus", effects=Effects(layouts=True))


def _layout(kind: str, **kw) -> dr.LayoutParams:
    base = dict(kind=kind, centre_shift=(0.0, 0.0, 0.0), thickness_cells=1.5, sheet_axis=0, bend_um=0.0, clusters=3, cell_share=1.0)
    return dr.LayoutParams(**(base | kw))


def _grid(shape=(40, 80, 80), spacing=(1.0, 1.0, 1.0)):
    return [((np.arange(n) - (n - 1) / 2) * s).reshape([-1 if a == i else 1 for a in range(3)]) for i, (n, s) in enumerate(zip(shape, spacing))]


def test_layouts_put_the_tissue_where_their_names_say():
    coords, half, semi, cell = _grid(), (19.5, 39.5, 39.5), (15.0, 30.0, 30.0), 8.0
    rng = np.random.default_rng(0)
    embryo = dr.tissue_distance(_layout("embryo"), coords, half, semi, cell, rng)
    shell = dr.tissue_distance(_layout("shell"), coords, half, semi, cell, rng)
    assert embryo[20, 40, 40] > 0 and shell[20, 40, 40] < 0  # a shell is hollow ...
    assert shell[20, 40, 40 + 28] > 0 and embryo[0, 0, 0] < 0  # ... its tissue lies under the surface
    shifted = dr.tissue_distance(_layout("embryo", centre_shift=(0.0, 0.0, 0.7)), coords, half, semi, cell, rng)
    assert shifted[20, 40, 79] > 0 > shifted[20, 40, 5]  # off-centre, cut by the stack's face
    sheet = dr.tissue_distance(_layout("sheet", sheet_axis=0), coords, half, semi, cell, rng)
    assert (sheet > 0).any(axis=(1, 2)).sum() <= 13 and (sheet[20] > 0).all()  # thin along its normal, across the stack
    assert (dr.tissue_distance(_layout("filled"), coords, half, semi, cell, rng) > 0).all()
    clusters = dr.tissue_distance(_layout("clusters", clusters=4), coords, half, semi, cell, np.random.default_rng(3))
    assert ndimage.label(clusters > 0)[1] >= 2


def test_cells_are_placed_inside_the_layouts_tissue_and_sparse_layouts_hold_few():
    kwargs = dict(shape=(24, 64, 64), spacing=(1.5, 0.4, 0.4), effects=Effects(randomise=True, layouts=True), return_clean=True)
    seen = set()
    for seed in range(300000, 300040):
        p = draw_params(seed, "nucleus", effects=Effects(randomise=True, layouts=True))
        if p.layout.kind in seen or p.layout.kind not in ("shell", "sheet", "sparse", "filled"):
            continue
        seen.add(p.layout.kind)
        pair = simulate_pair(seed, "nucleus", **kwargs)
        assert pair.clean.max() > 0, p.layout.kind
        if p.layout.kind == "sparse":
            assert pair.params.n_cells < 0.3 * dr.layout_cell_count(np.ones((24, 64, 64)), (1.5, 0.4, 0.4), p.cell_distance_um, dr.LayoutParams(**(vars(p.layout) | {"cell_share": 1.0})), np.random.default_rng(0)) + 4
    assert len(seen) >= 3


def test_share_input_view_is_the_input_where_its_view_has_all_the_weight_and_the_target_where_none():
    target, view = np.zeros((2, 3, 3), np.float32), np.ones((2, 3, 3), np.float32)
    weight = np.stack([np.ones((3, 3)), np.zeros((3, 3))]).astype(np.float32)
    mixed = dr.share_input_view(target, view, weight, 1.0)
    np.testing.assert_array_equal(mixed[0], 1.0) and np.testing.assert_array_equal(mixed[1], 0.0)
    np.testing.assert_allclose(dr.share_input_view(target, view, weight, 0.4)[0], 0.4)


def test_a_shared_target_carries_the_inputs_own_noise():
    kwargs = dict(shape=(24, 64, 64), spacing=(1.5, 0.3, 0.3), photons=(200, 201))
    plain = simulate_pair(44, "nucleus", effects=Effects(randomise=True), **kwargs)
    shared = simulate_pair(44, "nucleus", effects=Effects(randomise=True, shared_target=True), **kwargs)
    np.testing.assert_array_equal(plain.input, shared.input)
    close = [ssim(metric_normalise(p.input.astype(np.float32)), metric_normalise(p.fused.astype(np.float32))) for p in (plain, shared)]
    assert close[1] > close[0] + 0.05
