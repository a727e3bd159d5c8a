"""Domain randomisation of the simulator: one small function per physical effect.

Used by :mod:`training.simulate` when a pair is simulated with ``Effects(randomise=True)``; without it the
simulator is unchanged (the documented seeds keep their meaning). Arrays are float32 ZYX, lengths
in µm unless a name ends in ``_vox``. Every random parameter is drawn by :func:`draw_domain` from
its own stream of the seed; the effects themselves take an explicit ``numpy.random.Generator``.

Specimen: :func:`smooth_field` (low-frequency random fields: dense and sparse regions, varied cell
size, irregular embryo outline), :func:`variable_cell_centres`, :func:`nucleus_occupancy`
(rotated, irregular, touching nuclei), :func:`chromatin_texture`, :func:`membrane_profile`
(membranes of real thickness). Light sheet: :func:`absorber_density` (absorbers whose shadows are
stripes along the light axis), :func:`psf_sigmas_um` (sheet thickening with depth),
:func:`scatter_halo`, :func:`refractive_defocus`, :func:`plane_gains` (intensity drift between
planes), :func:`misregister` (views slightly misregistered), :func:`residual_blur` (the fused
target's own blur). Camera side (``Effects.background``, stream ``[seed, 13]``, drawn by
:func:`draw_background`): :func:`background_field` (a smooth additive background that does not
follow the specimen — stray light, autofluorescent medium — partly removed in the fused target).
Degradation strength (``Effects.gentle``, stream ``[seed, 15]``): :func:`weaken` (transparent, thin
specimens where the single view is nearly as good as the fusion: the networks must learn to leave
them almost unchanged). Specimen layout (``Effects.layouts``, stream ``[seed, 16]``, drawn by
:func:`draw_layout`): :func:`tissue_distance` (an embryo, a hollow shell, a bent sheet, several
clusters, a field filled to the edges or a few scattered cells, off-centre and possibly cut by the
stack) and :func:`layout_cell_count`. Target made of the acquired views (``Effects.shared_target``,
stream ``[seed, 17]``): :func:`share_input_view` (where the input's view is the better one, a real
fused stack *is* that acquisition, its noise and blur included).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from scipy import ndimage
from scipy.special import expit


@dataclass
class DomainParams:
    """The randomised parameters of one pair (lengths in µm)."""

    embryo_irregularity: float  # relative modulation of the embryo outline (0 = ellipsoid)
    size_variation: float  # σ of the log of the local cell size factor (0 = all cells alike)
    density_contrast: float  # gain of the acceptance field: 0 = uniform packing, large = dense and empty regions
    density_bias: float  # offset of the acceptance field (logit)
    min_distance_fraction: float  # closest centres / cell distance (small: touching nuclei)
    nucleus_fraction: float  # nucleus radius / half the local cell distance (replaces the v1 draw)
    irregularity: float  # relative modulation of each nucleus' radius (0 = ellipsoid)
    brightness_sigma: float  # σ of the log-normal nucleus / membrane-face brightness
    chromatin_granule_um: float  # size of the chromatin granules
    chromatin_amplitude: float  # relative amplitude of the chromatin texture
    nucleolus_probability: float  # chance that a nucleus holds a dark nucleolus
    membrane_thickness_um: float  # full width at half maximum of a membrane
    autofluorescence: float  # cytoplasm signal relative to a bright structure
    absorbers: int  # number of absorbing bodies (their shadows: stripes along the light axis)
    absorber_radius_um: float
    absorber_tau: float  # optical depth of the darkest shadow (attenuation exp(-2τ))
    halo: float  # amplitude of the scattering halo at the deepest point
    halo_radius_um: float
    sheet_growth: float  # axial σ growth (µm) per µm of depth along the light axis
    defocus_growth: float  # lateral σ growth (µm) per µm of depth along Z from the detection side
    detection_side: str  # 'top': the objective looks from Z index 0
    drift_sigma: float  # σ of the log gain random walk between Z planes
    bleaching: float  # fraction of the signal lost from the first to the last acquired plane
    input_shift_um: tuple[float, float, float]  # misregistration of the single view vs the target (ZYX)
    gt_view_shift_um: tuple[float, float, float]  # misregistration between the two fused views (ZYX)
    gt_residual_blur_um: float  # lateral σ of the fused target's residual blur (axial: × the axial ratio)


def draw_domain(seed: int) -> DomainParams:
    """All domain-randomisation parameters of a pair, from the stream ``[seed, 11]``."""
    rng = np.random.default_rng([seed, 11])
    return DomainParams(
        embryo_irregularity=float(rng.uniform(0.0, 0.2)),
        size_variation=float(rng.uniform(0.0, 0.35)),
        density_contrast=float(rng.uniform(0.0, 4.0)),
        density_bias=float(rng.uniform(-0.5, 2.0)),
        min_distance_fraction=float(rng.uniform(0.45, 0.8)),
        nucleus_fraction=float(rng.uniform(0.45, 0.95)),
        irregularity=float(rng.uniform(0.0, 0.3)),
        brightness_sigma=float(rng.uniform(0.2, 0.7)),
        chromatin_granule_um=float(rng.uniform(0.3, 0.9)),
        chromatin_amplitude=float(rng.uniform(0.1, 0.6)),
        nucleolus_probability=float(rng.uniform(0.0, 0.8)),
        membrane_thickness_um=float(rng.uniform(0.4, 1.6)),
        autofluorescence=float(rng.uniform(0.0, 0.08)),
        absorbers=int(rng.uniform(0.0, 1.0) ** 2 * 60),
        absorber_radius_um=float(rng.uniform(0.5, 4.0)),
        absorber_tau=float(rng.uniform(0.05, 1.0)),
        halo=float(rng.uniform(0.0, 0.5)),
        halo_radius_um=float(rng.uniform(1.5, 4.0)),
        sheet_growth=float(rng.uniform(0.0, 0.02)),
        defocus_growth=float(rng.uniform(0.0, 0.006)),
        detection_side=str(rng.choice(["top", "bottom"])),
        drift_sigma=float(rng.uniform(0.0, 0.08)),
        bleaching=float(rng.uniform(0.0, 0.3)),
        input_shift_um=tuple(float(v) for v in rng.uniform(-0.4, 0.4, size=3)),  # type: ignore[arg-type]
        gt_view_shift_um=tuple(float(v) for v in rng.uniform(-0.3, 0.3, size=3)),  # type: ignore[arg-type]
        gt_residual_blur_um=float(rng.uniform(0.0, 0.3)),
    )


@dataclass
class BackgroundParams:
    """Additive background of one pair, in units of a bright voxel of the target (lengths in µm)."""

    level: float  # mean background / bright voxel
    variation: float  # relative σ of its slow spatial variation
    length_um: float  # correlation length of the variation
    target_fraction: float  # share of it left in the fused target (fusion and background subtraction remove the rest)


def draw_background(seed: int) -> BackgroundParams:
    """The additive-background parameters of a pair, from the stream ``[seed, 13]`` (no other draw moves)."""
    rng = np.random.default_rng([seed, 13])
    return BackgroundParams(
        level=float(10 ** rng.uniform(-3.0, -1.0)),
        variation=float(rng.uniform(0.0, 1.0)),
        length_um=float(rng.uniform(12.0, 70.0)),
        target_fraction=float(rng.uniform(0.0, 1.0)),
    )


def weaken(mu_per_um: float, psf_growth: float, gt_axial_factor: float, rng: np.random.Generator) -> tuple[float, float, float]:
    """(μ, PSF growth, target axial factor) of a weakly degraded acquisition (near-identity pair).

    Attenuation (1/µm) and the lateral σ growth with depth (µm per µm) are scaled by factors drawn
    log-uniformly in [0.03, 0.3]; the target's axial factor (fusion sharpening Z, ≤ 1) moves to
    within [0.85, 1] of the input's: the single view is almost as good as the fusion.
    """
    att, blur = (float(10 ** rng.uniform(np.log10(0.03), np.log10(0.3))) for _ in range(2))
    return mu_per_um * att, psf_growth * blur, float(max(gt_axial_factor, rng.uniform(0.85, 1.0)))


LAYOUTS = ("embryo", "shell", "sheet", "clusters", "filled", "sparse")
"""Specimen layouts of :func:`tissue_distance` (``embryo``: the simulator's one layout before)."""
LAYOUT_P = (0.25, 0.15, 0.15, 0.15, 0.15, 0.15)


@dataclass
class LayoutParams:
    """Where the tissue is in the stack (lengths in µm, shifts in units of the half extent)."""

    kind: str  # one of LAYOUTS
    centre_shift: tuple[float, float, float]  # embryo / shell centre off the stack centre (ZYX; ±1 = the stack's face)
    thickness_cells: float  # shell and sheet thickness, in cell distances
    sheet_axis: int  # the sheet's normal (ZYX)
    bend_um: float  # amplitude of the sheet's bending
    clusters: int  # number of clusters
    cell_share: float  # share of the tissue's cells present (sparse: a few scattered cells)


def draw_layout(seed: int) -> LayoutParams:
    """The specimen-layout parameters of a pair, from the stream ``[seed, 16]`` (no other draw moves)."""
    rng = np.random.default_rng([seed, 16])
    kind = str(rng.choice(LAYOUTS, p=LAYOUT_P))
    return LayoutParams(
        kind=kind,
        centre_shift=tuple(float(v) for v in rng.uniform(-0.7, 0.7, size=3)),  # type: ignore[arg-type]
        thickness_cells=float(rng.uniform(1.0, 3.0)),
        sheet_axis=int(rng.integers(3)),
        bend_um=float(rng.uniform(0.0, 15.0)),
        clusters=int(rng.integers(2, 7)),
        cell_share=float(10 ** rng.uniform(np.log10(0.03), np.log10(0.25))) if kind == "sparse" else 1.0,
    )


def _ellipsoid_distance(coords: list[np.ndarray], centre: np.ndarray, semi: np.ndarray) -> np.ndarray:
    """Approximate signed distance (µm, > 0 inside) to the surface of an ellipsoid: (1 − r) × mean semi-axis."""
    r = np.sqrt(sum(((c - m) / a) ** 2 for c, m, a in zip(coords, centre, semi)))
    return ((1.0 - r) * float(np.mean(semi))).astype(np.float32)


def tissue_distance(
    layout: LayoutParams,
    coords: list[np.ndarray],
    half_um: tuple[float, float, float],
    semi_um: tuple[float, float, float],
    cell_distance_um: float,
    rng: np.random.Generator,
) -> np.ndarray:
    """Signed distance (µm, ZYX grid, > 0 inside the tissue) of the specimen's layout.

    ``coords`` are the broadcastable ZYX coordinates of the grid (µm, centred), ``half_um`` the stack's
    half extent, ``semi_um`` the embryo's semi-axes. ``embryo`` and ``sparse``: the ellipsoid, shifted
    by ``centre_shift``; ``shell``: a hollow layer ``thickness_cells`` cell distances thick under its
    surface; ``sheet``: a bent slab of that thickness across the stack; ``clusters``: several small
    ellipsoids anywhere, possibly cut by the stack; ``filled``: tissue everywhere (no surface).
    """
    half, semi = np.asarray(half_um), np.asarray(semi_um)
    centre = np.asarray(layout.centre_shift) * half
    thickness = layout.thickness_cells * cell_distance_um
    shape = tuple(int(np.broadcast_shapes(*(c.shape for c in coords))[a]) for a in range(3))
    if layout.kind == "filled":
        return np.full(shape, 4.0 * cell_distance_um, dtype=np.float32)
    if layout.kind in ("embryo", "sparse"):
        return np.broadcast_to(_ellipsoid_distance(coords, centre, semi), shape).astype(np.float32)
    if layout.kind == "shell":
        outer = _ellipsoid_distance(coords, centre, np.maximum(semi, thickness * 1.5))
        return np.broadcast_to(thickness / 2 - np.abs(outer - thickness / 2), shape).astype(np.float32)
    if layout.kind == "sheet":
        a = layout.sheet_axis
        bend = layout.bend_um * field_on_grid(smooth_field(rng, 4), shape)
        return (thickness / 2 - np.abs(coords[a] - centre[a] - bend)).astype(np.float32)
    distance = np.full(shape, -np.inf, dtype=np.float32)
    for _ in range(layout.clusters):  # clusters
        c = rng.uniform(-0.9, 0.9, size=3) * half
        axes = np.maximum(half * rng.uniform(0.15, 0.4, size=3), cell_distance_um)
        np.maximum(distance, _ellipsoid_distance(coords, c, axes), out=distance)
    return distance


def layout_cell_count(tissue: np.ndarray, spacing: tuple[float, float, float], cell_distance_um: float, layout: LayoutParams, rng: np.random.Generator) -> int:
    """Cells to place in a layout's tissue (ZYX density in [0, 1]): its volume over a cell's, × ``cell_share``."""
    volume_um3 = float(tissue.sum()) * float(np.prod(spacing))
    return int(np.clip(volume_um3 / cell_distance_um**3 * rng.uniform(0.5, 0.9) * layout.cell_share, 4, 3000))


def share_input_view(
    target: np.ndarray, view: np.ndarray, input_weight: np.ndarray, share: float
) -> np.ndarray:
    """The fused target when it is made of the acquired views, the input's among them (float32, ZYX).

    ``target`` and ``view`` are the target and the acquired input in the same signal units (noise
    included), ``input_weight`` (ZYX, 0..1) the fusion's weight of the input's view, ``share`` (0..1)
    how much of that weight is the acquisition itself rather than a better (deconvolved, re-acquired)
    estimate: target · (1 − s·w) + view · s·w. Where the input's view is the better one, the real
    ground truth carries the input's very noise and blur: denoising it there costs SSIM.
    """
    mix = (np.float32(share) * input_weight).astype(np.float32)
    return (target * (1.0 - mix) + view * mix).astype(np.float32)


# --- specimen -------------------------------------------------------------------------------


def smooth_field(rng: np.random.Generator, n: int = 6) -> np.ndarray:
    """A coarse (n, n, n) random field with zero mean and unit σ, spanning the stack ([-1, 1] per axis)."""
    coarse = ndimage.gaussian_filter(rng.standard_normal((n, n, n)), 1.0, mode="wrap")
    return ((coarse - coarse.mean()) / max(float(coarse.std()), 1e-9)).astype(np.float32)


def field_at(field: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Values of a :func:`smooth_field` at (N, 3) points in stack-normalised coordinates ([-1, 1] ZYX), trilinear."""
    n = np.asarray(field.shape, dtype=np.float64)
    idx = (np.clip(np.asarray(points, dtype=np.float64), -1, 1) + 1) / 2 * (n - 1)
    return ndimage.map_coordinates(field, idx.T, order=1, mode="nearest").astype(np.float32)


def field_on_grid(field: np.ndarray, shape: tuple[int, int, int]) -> np.ndarray:
    """A :func:`smooth_field` sampled on every voxel of a ZYX grid of ``shape`` (trilinear)."""
    axes = [np.linspace(0, n - 1, s) for n, s in zip(field.shape, shape)]
    out = field
    for a, coords in enumerate(axes):  # separable linear interpolation, one axis at a time
        lo = np.floor(coords).astype(int).clip(0, field.shape[a] - 2)
        frac = (coords - lo).astype(np.float32).reshape([-1 if i == a else 1 for i in range(3)])
        out = np.take(out, lo, axis=a) * (1 - frac) + np.take(out, lo + 1, axis=a) * frac
    return out.astype(np.float32)


def variable_cell_centres(
    semi_um: tuple[float, float, float],
    half_extent_um: tuple[float, float, float],
    n_cells: int,
    cell_distance_um: float,
    min_fraction: float,
    scale_field: np.ndarray,
    size_variation: float,
    density_field: np.ndarray,
    density_contrast: float,
    density_bias: float,
    rng: np.random.Generator,
    inside: Callable[[np.ndarray], np.ndarray] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """((N, 3) centres in µm inside the ellipsoid ``semi_um``, (N,) local size factors).

    With ``inside`` ((M, 3) ZYX points in µm → (M,) bool: the tissue of a :func:`tissue_distance`
    layout) candidates are drawn over the whole stack and kept where ``inside`` says so, instead of
    inside the ellipsoid (the ellipsoid's draws are unchanged without it).

    The local size factor is exp(size_variation · scale_field) (varied cell size); a candidate is
    kept with probability expit(density_contrast · density_field + density_bias) (dense and sparse
    regions) and only if no kept centre is closer than min_fraction · cell_distance · the mean size
    factor of the two (small fractions give touching nuclei). Fields are :func:`smooth_field`s over
    the stack (half extent ``half_extent_um``).
    """
    semi, half = np.asarray(semi_um), np.asarray(half_extent_um)
    centres = np.zeros((n_cells, 3), dtype=np.float64)
    scales = np.zeros(n_cells, dtype=np.float64)
    count = 0
    for _ in range(60):
        cand = rng.uniform(-1, 1, size=(4 * n_cells, 3))
        cand = cand[(cand**2).sum(1) < 0.92] * semi if inside is None else (cand * half)[inside(cand * half)]
        if not len(cand):
            continue
        norm = cand / half
        scale = np.exp(size_variation * field_at(scale_field, norm))
        keep = rng.random(len(cand)) < expit(density_contrast * field_at(density_field, norm) + density_bias)
        for c, s in zip(cand[keep], scale[keep]):
            if count >= n_cells:
                break
            if count and np.any(np.linalg.norm(centres[:count] - c, axis=1) < min_fraction * cell_distance_um * (s + scales[:count]) / 2):
                continue
            centres[count], scales[count] = c, s
            count += 1
        if count >= n_cells:
            break
    return centres[:count].astype(np.float32), scales[:count].astype(np.float32)


def nucleus_occupancy(
    offsets_um: tuple[np.ndarray, np.ndarray, np.ndarray],
    radii_um: np.ndarray,
    rotation: np.ndarray,
    edge_um: float,
    bumps: np.ndarray | None = None,
    irregularity: float = 0.0,
) -> np.ndarray:
    """Soft occupancy in [0, 1] of one nucleus: a rotated ellipsoid whose radius is modulated by ``bumps``.

    ``offsets_um`` are broadcastable ZYX offsets from the centre (µm), ``radii_um`` the semi-axes in
    the nucleus frame, ``rotation`` a 3×3 matrix (columns: the nucleus axes in ZYX), ``bumps`` a
    unit-σ smooth field on the same voxels: the radius is scaled by 1 + irregularity · bumps.
    """
    dz, dy, dx = offsets_um
    r2 = 0.0
    for k in range(3):
        along = rotation[0, k] * dz + rotation[1, k] * dy + rotation[2, k] * dx
        r2 = r2 + (along / radii_um[k]) ** 2
    r = np.sqrt(r2)
    if bumps is not None and irregularity > 0:
        r = r / np.clip(1.0 + irregularity * bumps, 0.3, None)
    return expit((1.0 - r) * float(np.mean(radii_um)) / edge_um).astype(np.float32)


def random_rotation(rng: np.random.Generator) -> np.ndarray:
    """A uniformly random 3×3 rotation matrix (QR of a Gaussian matrix, signs fixed)."""
    q, r = np.linalg.qr(rng.standard_normal((3, 3)))
    q = q * np.sign(np.diag(r))
    if np.linalg.det(q) < 0:
        q[:, 0] = -q[:, 0]
    return q


def _sigma_vox(sigma_um: float, spacing: tuple[float, float, float], floor: float = 0.3) -> tuple[float, ...]:
    return tuple(float(max(sigma_um / s, floor)) for s in spacing)


def unit_noise(shape: tuple[int, ...], sigma_vox: tuple[float, ...], rng: np.random.Generator) -> np.ndarray:
    """Gaussian-smoothed white noise with zero mean and unit σ (float32)."""
    noise = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), sigma_vox)
    return ((noise - noise.mean()) / max(float(noise.std()), 1e-6)).astype(np.float32)


def chromatin_texture(
    shape: tuple[int, int, int], spacing: tuple[float, float, float], rng: np.random.Generator, granule_um: float, amplitude: float
) -> np.ndarray:
    """Multiplicative chromatin texture (mean ≈ 1, ≥ 0.1): granules of ≈ ``granule_um`` over a 2 µm mottle.

    The granules are skewed towards bright foci (heterochromatin): exp of a smooth field.
    """
    fine = unit_noise(shape, _sigma_vox(granule_um / 2, spacing), rng)
    coarse = unit_noise(shape, _sigma_vox(1.0, spacing), rng)
    foci = np.exp(0.8 * fine)
    foci /= float(foci.mean())
    return np.clip(1.0 + amplitude * (0.7 * (foci - 1.0) / max(float(foci.std()), 1e-6) + 0.3 * coarse), 0.1, None).astype(np.float32)


def membrane_profile(distance_um: np.ndarray, thickness_um: float) -> np.ndarray:
    """Membrane intensity at ``distance_um`` from the cell boundary: a plateau of full width ``thickness_um`` at half maximum.

    The edges are soft over min(0.12, thickness / 10) µm, so the plateau reaches > 0.99.
    """
    softness_um = min(0.12, thickness_um / 10)
    return expit((thickness_um / 2 - np.abs(distance_um)) / softness_um).astype(np.float32)


# --- light sheet ----------------------------------------------------------------------------


def absorber_density(
    tissue: np.ndarray, spacing: tuple[float, float, float], rng: np.random.Generator, count: int, radius_um: float, tau: float, axis: int
) -> np.ndarray:
    """Absorption coefficient (1/µm, ZYX) of ``count`` absorbing bodies placed inside the tissue.

    Blobs of Gaussian radius ``radius_um`` and log-normal strength, scaled so that the darkest line
    through them along ``axis`` (the light axis) has optical depth ``tau``: downstream they cast
    shadows, i.e. stripes along the light axis (see :func:`training.simulate.optical_depth`).
    """
    out = np.zeros(tissue.shape, dtype=np.float32)
    inside = np.flatnonzero(tissue.reshape(-1) > 0.5)
    if count <= 0 or not len(inside):
        return out
    picks = rng.choice(inside, size=min(count, len(inside)), replace=False)
    out.reshape(-1)[picks] = rng.lognormal(0.0, 0.5, size=len(picks)).astype(np.float32)
    out = ndimage.gaussian_filter(out, _sigma_vox(radius_um, spacing, floor=0.5))
    line = out.sum(axis=axis) * spacing[axis]  # optical depth through each line (µm · 1/µm)
    return (out * (tau / max(float(line.max()), 1e-12))).astype(np.float32)


def psf_sigmas_um(depth_um: float, sigma0_um: float, growth: float, axial_ratio: float, sheet_growth: float = 0.0) -> tuple[float, float, float]:
    """(σ_z, σ_y, σ_x) in µm of the PSF at ``depth_um`` along the light axis.

    Lateral σ = σ0 + growth · depth (scattering); axial σ = axial_ratio · lateral σ, plus
    sheet_growth · depth for a light sheet that thickens as it travels into the tissue.
    """
    sxy = sigma0_um + growth * depth_um
    return axial_ratio * sxy + sheet_growth * depth_um, sxy, sxy


def scatter_halo(signal: np.ndarray, spacing: tuple[float, float, float], radius_um: float) -> np.ndarray:
    """Scattered light around bright structures: ``signal`` blurred with a Gaussian of ``radius_um`` (same total)."""
    return ndimage.gaussian_filter(signal, _sigma_vox(radius_um, spacing), mode="nearest").astype(np.float32)


def refractive_defocus(
    view: np.ndarray, tissue: np.ndarray, spacing: tuple[float, float, float], growth: float, detection_side: str
) -> np.ndarray:
    """Each Z plane blurred laterally by σ = growth · (tissue depth of the plane along Z from the objective) µm.

    Refractive-index mismatch defocuses planes deeper in the specimen as seen from the detection
    objective (``detection_side`` 'top' = Z index 0). The depth of a plane counts the planes with
    tissue between it and the objective.
    """
    has_tissue = tissue.reshape(tissue.shape[0], -1).max(axis=1) > 0.5
    order = has_tissue if detection_side == "top" else has_tissue[::-1]
    depth = (np.cumsum(order) - 0.5 * order) * spacing[0]
    if detection_side != "top":
        depth = depth[::-1]
    out = np.empty_like(view)
    for z in range(view.shape[0]):
        sigma = growth * float(depth[z])
        out[z] = ndimage.gaussian_filter(view[z], (sigma / spacing[1], sigma / spacing[2]), mode="nearest") if sigma / spacing[1] > 0.05 else view[z]
    return out


def plane_gains(n_planes: int, rng: np.random.Generator, drift_sigma: float, bleaching: float, reverse: bool = False) -> np.ndarray:
    """(n_planes,) multiplicative gains of the Z planes: a log-normal random walk (laser drift) times linear bleaching.

    Bleaching loses ``bleaching`` of the signal from the first acquired plane to the last (``reverse``:
    acquired from the last index).
    """
    walk = np.cumsum(rng.standard_normal(n_planes))
    walk = (walk - walk.mean()) / max(float(walk.std()), 1e-9) if n_planes > 1 else np.zeros(1)
    fade = 1.0 - bleaching * np.linspace(0.0, 1.0, n_planes)
    gains = np.exp(drift_sigma * walk) * (fade[::-1] if reverse else fade)
    return gains.astype(np.float32)


def misregister(volume: np.ndarray, shift_um: tuple[float, float, float], spacing: tuple[float, float, float]) -> np.ndarray:
    """``volume`` translated by ``shift_um`` (ZYX, µm; positive = towards higher indices), linear interpolation."""
    shift_vox = [s / sp for s, sp in zip(shift_um, spacing)]
    if all(abs(s) < 1e-6 for s in shift_vox):
        return volume
    return ndimage.shift(volume, shift_vox, order=1, mode="nearest").astype(np.float32)


def background_field(
    shape: tuple[int, int, int], spacing: tuple[float, float, float], rng: np.random.Generator, level: float, variation: float, length_um: float
) -> np.ndarray:
    """Additive background on a ZYX grid (float32, ≥ 0): ``level`` × max(0, 1 + ``variation`` · F).

    F is a unit-σ random field that varies over ≈ ``length_um`` (µm) on every axis, independent of
    the specimen (stray light, autofluorescent medium): empty regions get a slowly varying pedestal.
    """
    extent = np.asarray(shape, dtype=np.float64) * np.asarray(spacing)
    coarse_shape = tuple(int(np.clip(np.ceil(e / length_um) + 2, 3, 24)) for e in extent)
    coarse = ndimage.gaussian_filter(rng.standard_normal(coarse_shape), 0.7, mode="wrap")
    coarse = ((coarse - coarse.mean()) / max(float(coarse.std()), 1e-9)).astype(np.float32)
    return (level * np.clip(1.0 + variation * field_on_grid(coarse, shape), 0.0, None)).astype(np.float32)


def residual_blur(volume: np.ndarray, spacing: tuple[float, float, float], sigma_um: float, axial_ratio: float) -> np.ndarray:
    """The fused target's own blur: Gaussian of lateral σ ``sigma_um`` and axial σ ``axial_ratio`` × that (µm)."""
    if sigma_um <= 0:
        return volume
    sigma_vox = (axial_ratio * sigma_um / spacing[0], sigma_um / spacing[1], sigma_um / spacing[2])
    return ndimage.gaussian_filter(volume, sigma_vox, mode="nearest").astype(np.float32)
