"""Light-sheet simulator: one degraded view (the input) and a two-view fusion (the target).

Physics (all lengths in µm, arrays ZYX; documented with the parameter ranges in training/README.md):

* **Specimen** – an embryo-like ellipsoid filled with cells. Cell centres are drawn with a
  minimum distance; ``nucleus`` = textured ellipsoidal nuclei of varied size and brightness,
  ``membrane`` = Voronoi cell boundaries of the same centres plus the outer surface.
* **One view** – the light travels along the *light axis* (``light_axis`` 0 = Z, 1 = Y,
  2 = X; probabilities 0.4 / 0.3 / 0.3) from one side (``top`` = entering at index 0 of that
  axis, ``bottom`` = at index −1). Each voxel sees the optical depth τ = μ·∫density dl along that
  axis from that side: Beer–Lambert attenuation exp(−2τ) (excitation and emission), and a PSF
  that widens with the depth d travelled inside tissue (lateral σ_yx = σ0 + k·d). The PSF stays
  anisotropic in the microscope frame whatever the light axis: axial σ_z = a·σ_yx, a > 1. Plus
  depth-growing scattering haze, a camera offset, Poisson photon noise and Gaussian read noise.
* **Ground truth** – both opposite views along the same light axis simulated without noise,
  fused voxel-wise with a sigmoid weight favouring the view whose light travelled less tissue,
  then a little photon noise at a higher photon budget (fusion averages several acquisitions).
  Optionally (default on) the fused views are sharper in Z: their axial ratio is
  a × ``gt_axial_factor`` (0.5–1.0), as multi-view fusion improves the axial resolution.

Deterministic per seed: ``simulate_pair(seed, channel)`` always returns the same arrays.

CLI::

    python -m training.simulate --out data/sim --n 40 --seed 0 --channels nucleus membrane
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage
from scipy.spatial import cKDTree
from scipy.special import expit

from fusemycells.io.tiff import Volume, write_volume

from . import domain as dr
from .domain import BackgroundParams, DomainParams, LayoutParams

log = logging.getLogger("training.simulate")

CHANNELS = ("nucleus", "membrane")
SPACING_Z_UM = (1.0, 3.0)
SPACING_XY_UM = (0.195, 0.39)
SHAPE_Z = (24, 80)
SHAPE_YX = (96, 256)
BLUR_LEVELS = 5  # the depth-dependent PSF is interpolated between this many blur levels
LIGHT_AXES = (0, 1, 2)  # Z, Y, X
LIGHT_AXIS_P = (0.4, 0.3, 0.3)
PHOTONS = (30.0, 30000.0)  # photons at a bright voxel (log-uniform)
SEMI_AXES_FRACTION = (0.4, 1.3)  # embryo semi-axes / half the stack extent
LAYOUT_EDGE_UM = 1.0  # width of a layout's tissue edge (the logistic's scale, µm); the centred embryo keeps its own
GT_AXIAL_FACTOR = (0.5, 1.0)  # axial-ratio factor of the fused views (fusion sharpens Z)


@dataclass(frozen=True)
class Effects:
    """The simulator's optional effects (each draws from its own stream of the seed, so a pair without
    one has exactly the arrays it had before the effect existed; :mod:`training.domain`).

    ``randomise``: domain randomisation (stream ``[seed, 11]``); ``background``: a smooth additive
    background (``[seed, 13]``); ``gentle``: a weakly degraded, near-identity pair (``[seed, 15]``);
    ``layouts``: the specimen's layout (``[seed, 16]``, needs ``randomise``); ``shared_target``: the
    target partly made of the acquired input (``[seed, 17]``).
    """

    randomise: bool = False
    background: bool = False
    gentle: bool = False
    layouts: bool = False
    shared_target: bool = False

    def __post_init__(self) -> None:
        if self.layouts and not self.randomise:
            raise ValueError("specimen layouts need domain randomisation (randomise=True)")


PLAIN = Effects()
"""No optional effect: the v2 simulator."""


@dataclass
class SimParams:
    """Every random choice of one simulated pair (lengths in µm unless named ``_vox``)."""

    seed: int
    channel: str
    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]
    side: str  # 'top': light enters at index 0 of the light axis; 'bottom': at index -1
    flip_y: bool
    flip_x: bool
    semi_axes_um: tuple[float, float, float]
    cell_distance_um: float
    n_cells: int
    nucleus_fraction: float  # nucleus radius / half the cell distance
    membrane_width_um: float
    mu_per_um: float  # attenuation coefficient of tissue (density 1)
    psf_sigma0_um: float  # lateral PSF σ at the surface
    psf_growth: float  # lateral σ growth per µm of tissue depth
    axial_ratio: float  # axial σ / lateral σ
    haze: float  # scattering haze amplitude relative to the signal
    photons: float  # expected photons at a bright voxel at the surface
    offset: float  # camera offset (ADU)
    read_noise: float  # read-noise σ (ADU)
    gt_photon_factor: float  # the fused target has this many times more photons
    light_axis: int = 0  # axis (ZYX) the light sheet travels along: 0 = Z, 1 = Y, 2 = X
    gt_axial_factor: float = 1.0  # the fused views' axial ratio is axial_ratio × this (≤ 1)
    extra: dict[str, Any] = field(default_factory=dict)
    domain: DomainParams | None = None  # domain randomisation (training/domain.py); None = the v2 simulator
    background: BackgroundParams | None = None  # additive background (training/domain.py); None = camera offset only
    layout: LayoutParams | None = None  # specimen layout (training/domain.py); None = the centred embryo
    shared_target: float | None = None  # share of the input's acquisition in the target where its view is the better one; None = independent target

    def entry_at_start(self, axis: int) -> bool:
        """Whether the light enters at index 0 of ``axis`` in the *written* (flipped) arrays."""
        flipped = (axis == 1 and self.flip_y) or (axis == 2 and self.flip_x)
        return (self.side == "top") != flipped


@dataclass
class SimulatedPair:
    """One simulated acquisition: ``input`` and ``fused`` are uint16 ZYX on the same grid."""

    input: np.ndarray
    fused: np.ndarray
    spacing: tuple[float, float, float]
    channel: str
    params: SimParams
    clean: np.ndarray | None = None  # noise-free specimen (float32, 1 ≈ a bright voxel), when asked for


def draw_params(
    seed: int,
    channel: str,
    shape: tuple[int, int, int] | None = None,
    spacing: tuple[float, float, float] | None = None,
    sharpen_gt: bool = True,
    effects: Effects = PLAIN,
) -> SimParams:
    """All random parameters of a pair, drawn from ``seed`` (wide ranges on purpose).

    ``light_axis`` and ``gt_axial_factor`` come from a separate stream of the seed; with
    ``sharpen_gt=False`` the fused views keep the input's axial ratio (factor 1). ``effects`` adds
    the optional effects' parameters (:class:`Effects`): domain randomisation
    (:func:`training.domain.draw_domain`), the additive background (:func:`training.domain.draw_background`),
    weakened degradation (:func:`training.domain.weaken`), the layout (:func:`training.domain.draw_layout`)
    and the input acquisition's share in the target (:func:`training.domain.share_input_view`); every
    other parameter is drawn as without them.
    """
    if channel not in CHANNELS:
        raise ValueError(f"channel must be one of {CHANNELS}, got {channel!r}")
    rng = np.random.default_rng(seed)
    if spacing is None:
        sxy = float(rng.uniform(*SPACING_XY_UM))
        spacing = (float(rng.uniform(*SPACING_Z_UM)), sxy, sxy)
    if shape is None:
        nyx = int(rng.integers(SHAPE_YX[0], SHAPE_YX[1] + 1))
        ny = int(np.clip(nyx * rng.uniform(0.8, 1.25), *SHAPE_YX))
        shape = (int(rng.integers(SHAPE_Z[0], SHAPE_Z[1] + 1)), ny, nyx)
    extent = np.asarray(shape) * np.asarray(spacing)
    # Embryo size is decoupled from the stack: sometimes much background, sometimes cut.
    semi = tuple(float(e / 2 * rng.uniform(*SEMI_AXES_FRACTION)) for e in extent)
    cell_distance = float(rng.uniform(5.0, 12.0))
    volume_um3 = 4.0 / 3.0 * np.pi * np.prod(semi)
    n_cells = int(np.clip(volume_um3 / cell_distance**3 * rng.uniform(0.5, 0.9), 8, 1500))
    extra_rng = np.random.default_rng([seed, 3])  # new parameters: the main stream stays as before
    gt_axial_factor = float(extra_rng.uniform(*GT_AXIAL_FACTOR))
    params = SimParams(
        seed=seed,
        channel=channel,
        shape=tuple(int(s) for s in shape),  # type: ignore[arg-type]
        spacing=tuple(float(s) for s in spacing),  # type: ignore[arg-type]
        side=str(rng.choice(["top", "bottom"])),
        flip_y=bool(rng.integers(2)),
        flip_x=bool(rng.integers(2)),
        semi_axes_um=semi,  # type: ignore[arg-type]
        cell_distance_um=cell_distance,
        n_cells=n_cells,
        nucleus_fraction=float(rng.uniform(0.45, 0.8)),
        membrane_width_um=float(rng.uniform(0.3, 0.9)),
        mu_per_um=float(10 ** rng.uniform(np.log10(0.004), np.log10(0.04))),
        psf_sigma0_um=float(rng.uniform(0.2, 0.45)),
        psf_growth=float(10 ** rng.uniform(np.log10(0.004), np.log10(0.03))),
        axial_ratio=float(rng.uniform(2.0, 4.5)),
        haze=float(rng.uniform(0.0, 0.3)),
        photons=float(10 ** rng.uniform(np.log10(PHOTONS[0]), np.log10(PHOTONS[1]))),
        offset=float(rng.uniform(90, 500)),
        read_noise=float(rng.uniform(1.0, 8.0)),
        gt_photon_factor=float(rng.uniform(3.0, 10.0)),
        light_axis=int(extra_rng.choice(LIGHT_AXES, p=LIGHT_AXIS_P)),
        gt_axial_factor=gt_axial_factor if sharpen_gt else 1.0,
        domain=dr.draw_domain(seed) if effects.randomise else None,
        background=dr.draw_background(seed) if effects.background else None,
        layout=dr.draw_layout(seed) if effects.layouts else None,
        shared_target=float(np.random.default_rng([seed, 17]).uniform(0.3, 1.0)) if effects.shared_target else None,
    )
    if effects.gentle:
        params.mu_per_um, params.psf_growth, factor = dr.weaken(params.mu_per_um, params.psf_growth, params.gt_axial_factor, np.random.default_rng([seed, 15]))
        params.gt_axial_factor = factor if sharpen_gt else 1.0
        params.extra["gentle"] = True
    return params


def _coordinates(shape: tuple[int, int, int], spacing: tuple[float, float, float]) -> list[np.ndarray]:
    """Broadcastable ZYX coordinates in µm, centred on the stack centre."""
    return [((np.arange(n, dtype=np.float32) - (n - 1) / 2) * s).reshape([-1 if a == i else 1 for a in range(3)]) for i, (n, s) in enumerate(zip(shape, spacing))]


def _cell_centres(p: SimParams, rng: np.random.Generator) -> np.ndarray:
    """(N, 3) cell centres in µm inside the ellipsoid, roughly ``cell_distance`` apart."""
    semi = np.asarray(p.semi_axes_um)
    accepted: list[np.ndarray] = []
    min_dist = 0.75 * p.cell_distance_um
    for _ in range(40):
        cand = rng.uniform(-1, 1, size=(4 * p.n_cells, 3))
        cand = cand[(cand**2).sum(1) < 0.92] * semi
        for c in cand:
            if len(accepted) >= p.n_cells:
                break
            if accepted and np.min(np.linalg.norm(np.asarray(accepted) - c, axis=1)) < min_dist:
                continue
            accepted.append(c)
        if len(accepted) >= p.n_cells:
            break
    return np.asarray(accepted, dtype=np.float32).reshape(-1, 3)


def _smooth_noise(shape: tuple[int, ...], sigma_vox: tuple[float, ...], rng: np.random.Generator) -> np.ndarray:
    """Band-limited noise with unit standard deviation."""
    noise = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), sigma_vox)
    return noise / max(float(noise.std()), 1e-6)


def specimen(p: SimParams, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Fluorophore density (the channel's label) and tissue density in [0, 1], both float32 ZYX."""
    shape, spacing = p.shape, p.spacing
    z, y, x = _coordinates(shape, spacing)
    semi = p.semi_axes_um
    level = (z / semi[0]) ** 2 + (y / semi[1]) ** 2 + (x / semi[2]) ** 2  # 1 on the embryo surface
    tissue = expit((1.0 - level) * 25.0).astype(np.float32)
    centres = _cell_centres(p, rng)
    label = np.zeros(shape, dtype=np.float32)
    texture_sigma = tuple(float(np.clip(0.8 / s, 0.3, 4)) for s in spacing)
    if p.channel == "nucleus":
        texture = 1.0 + 0.25 * _smooth_noise(shape, texture_sigma, rng)
        radius = p.nucleus_fraction * p.cell_distance_um / 2
        edge_um = 0.35
        for c in centres:
            radii = radius * rng.uniform(0.7, 1.3, size=3)
            brightness = float(rng.lognormal(0.0, 0.4))
            if rng.random() < 0.04:  # dividing / apoptotic cells: small and very bright
                radii *= 0.6
                brightness *= 2.5
            lo = [max(0, int(np.floor((c[a] - radii[a] - 2 * edge_um) / spacing[a] + (shape[a] - 1) / 2))) for a in range(3)]
            hi = [min(shape[a], int(np.ceil((c[a] + radii[a] + 2 * edge_um) / spacing[a] + (shape[a] - 1) / 2)) + 1) for a in range(3)]
            if any(h <= lo_ for lo_, h in zip(lo, hi)):
                continue
            zz, yy, xx = (coord[tuple(slice(lo[a], hi[a]) if a == i else slice(None) for a in range(3))] for i, coord in enumerate((z, y, x)))
            r = np.sqrt(((zz - c[0]) / radii[0]) ** 2 + ((yy - c[1]) / radii[1]) ** 2 + ((xx - c[2]) / radii[2]) ** 2)
            inside = expit((1.0 - r) * float(radii.mean()) / edge_um)
            region = label[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]]
            np.maximum(region, brightness * inside, out=region)
        label *= np.clip(texture, 0.2, None)
    else:
        coords = np.stack(np.broadcast_arrays(z, y, x), axis=-1).reshape(-1, 3)
        tree = cKDTree(centres)
        dist, _ = tree.query(coords, k=2, workers=1)
        gap = (dist[:, 1] - dist[:, 0]).reshape(shape) / 2  # distance to the Voronoi boundary (µm)
        width = p.membrane_width_um
        label = np.exp(-0.5 * (gap / (width / 2)) ** 2).astype(np.float32)
        # The outer surface of the embryo is a membrane too.
        surface_um = np.abs(np.sqrt(level) - 1.0) * float(np.mean(semi))
        label = np.maximum(label * tissue, 1.3 * np.exp(-0.5 * (surface_um / (width / 2)) ** 2)).astype(np.float32)
        label *= np.clip(1.0 + 0.3 * _smooth_noise(shape, texture_sigma, rng), 0.2, None)
    label *= tissue
    label += 0.03 * tissue  # weak cytoplasmic autofluorescence
    return label.astype(np.float32), tissue


def _tissue_lookup(tissue: np.ndarray, spacing: tuple[float, float, float]) -> Callable[[np.ndarray], np.ndarray]:
    """(M, 3) ZYX points in µm (centred on the stack) → (M,) bool: inside the tissue (nearest voxel > 0.5)."""
    shape = np.asarray(tissue.shape)

    def inside(points: np.ndarray) -> np.ndarray:
        idx = np.clip(np.rint(points / np.asarray(spacing) + (shape - 1) / 2).astype(int), 0, shape - 1)
        return tissue[idx[:, 0], idx[:, 1], idx[:, 2]] > 0.5

    return inside


def specimen_randomised(p: SimParams, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """:func:`specimen` with domain randomisation (``p.domain``): (label, tissue), float32 ZYX in [0, ~3].

    Irregular embryo outline (with ``p.layout``: the layout's tissue instead, :func:`training.domain.tissue_distance`,
    cells only inside it); cells of varied size in dense and sparse regions; rotated, irregular,
    possibly touching nuclei with chromatin granules and nucleoli; membranes of real thickness
    (plateau profile) whose faces differ in brightness.
    """
    d = p.domain
    assert d is not None
    shape, spacing = p.shape, p.spacing
    z, y, x = _coordinates(shape, spacing)
    half = tuple(max((n - 1) / 2 * s, 1e-6) for n, s in zip(shape, spacing))
    semi = p.semi_axes_um
    level = (z / semi[0]) ** 2 + (y / semi[1]) ** 2 + (x / semi[2]) ** 2
    level = level / np.clip(1.0 + d.embryo_irregularity * dr.field_on_grid(dr.smooth_field(rng), shape), 0.5, None) ** 2
    inside = None
    if p.layout is None:
        tissue = expit((1.0 - level) * 25.0).astype(np.float32)
        surface_um = np.abs(np.sqrt(level) - 1.0) * float(np.mean(semi))
    else:
        distance = dr.tissue_distance(p.layout, [z, y, x], half, semi, p.cell_distance_um, rng)
        tissue, surface_um = expit(distance / LAYOUT_EDGE_UM).astype(np.float32), np.abs(distance)
        p.n_cells = dr.layout_cell_count(tissue, spacing, p.cell_distance_um, p.layout, rng)
        inside = _tissue_lookup(tissue, spacing)
    centres, scales = dr.variable_cell_centres(
        semi, half, p.n_cells, p.cell_distance_um, d.min_distance_fraction, dr.smooth_field(rng), d.size_variation,
        dr.smooth_field(rng), d.density_contrast, d.density_bias, rng, inside,
    )
    label = np.zeros(shape, dtype=np.float32)
    if p.channel == "nucleus" and len(centres):
        texture = dr.chromatin_texture(shape, spacing, rng, d.chromatin_granule_um, d.chromatin_amplitude)
        base_radius = d.nucleus_fraction * p.cell_distance_um / 2
        bumps = dr.unit_noise(shape, tuple(max(0.4 * base_radius / s, 0.3) for s in spacing), rng)
        edge_um = 0.3
        for c, s in zip(centres, scales):
            radii = base_radius * s * rng.uniform(0.7, 1.3, size=3)
            brightness = float(rng.lognormal(0.0, d.brightness_sigma))
            if rng.random() < 0.04:  # dividing / apoptotic cells: small and very bright
                radii *= 0.6
                brightness *= 2.5
            rotation = dr.random_rotation(rng)
            reach = float(radii.max()) * (1.0 + d.irregularity * 3) + 2 * edge_um
            lo = [max(0, int(np.floor((c[a] - reach) / spacing[a] + (shape[a] - 1) / 2))) for a in range(3)]
            hi = [min(shape[a], int(np.ceil((c[a] + reach) / spacing[a] + (shape[a] - 1) / 2)) + 1) for a in range(3)]
            if any(h <= lo_ for lo_, h in zip(lo, hi)):
                continue
            box = tuple(slice(lo[a], hi[a]) for a in range(3))
            offsets = tuple(coord[tuple(box[a] if a == i else slice(None) for a in range(3))] - c[i] for i, coord in enumerate((z, y, x)))
            inside = dr.nucleus_occupancy(offsets, radii, rotation, edge_um, bumps[box], d.irregularity)  # type: ignore[arg-type]
            if rng.random() < d.nucleolus_probability:  # a dark nucleolus off the centre
                n_radii = radii * rng.uniform(0.2, 0.35)
                shift = rotation @ (radii * rng.uniform(-0.35, 0.35, size=3))
                hole = dr.nucleus_occupancy(tuple(o - shift[i] for i, o in enumerate(offsets)), n_radii, rotation, edge_um)  # type: ignore[arg-type]
                inside = inside * (1.0 - 0.7 * hole)
            region = label[box]
            np.maximum(region, brightness * inside, out=region)
        label *= texture
    elif len(centres):
        coords = np.stack(np.broadcast_arrays(z, y, x), axis=-1).reshape(-1, 3)
        dist, idx = cKDTree(centres).query(coords, k=2, workers=1)
        gap = ((dist[:, 1] - dist[:, 0]) / 2).reshape(shape)  # distance to the Voronoi boundary (µm)
        face = rng.lognormal(0.0, d.brightness_sigma, size=len(centres)).astype(np.float32)
        face_brightness = np.sqrt(face[idx[:, 0]] * face[idx[:, 1]]).reshape(shape)
        label = dr.membrane_profile(gap, d.membrane_thickness_um) * face_brightness
        del coords, dist, idx, gap, face_brightness
        label = np.maximum(label * tissue, 1.3 * dr.membrane_profile(surface_um, d.membrane_thickness_um)).astype(np.float32)
        label *= np.clip(1.0 + 0.3 * dr.unit_noise(shape, tuple(float(np.clip(0.8 / s, 0.3, 4)) for s in spacing), rng), 0.2, None)
    label *= tissue
    label += d.autofluorescence * tissue
    return label.astype(np.float32), tissue


def optical_depth(tissue: np.ndarray, spacing_um: float, mu: float, side: str, axis: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(τ, depth in tissue in µm) per voxel for light travelling along ``axis`` (ZYX) from ``side``.

    ``spacing_um`` is the voxel size along ``axis``; ``top`` = light enters at index 0.
    """
    flip = [slice(None)] * tissue.ndim
    flip[axis] = slice(None, None, -1)
    seq = tissue if side == "top" else tissue[tuple(flip)]
    depth = np.cumsum(seq, axis=axis, dtype=np.float32) * spacing_um
    depth -= 0.5 * seq * spacing_um
    if side == "bottom":
        depth = depth[tuple(flip)]
    return (mu * depth).astype(np.float32), np.ascontiguousarray(depth)


def clean_view(
    label: np.ndarray, tissue: np.ndarray, p: SimParams, side: str, axial_ratio: float | None = None, extra_tau: np.ndarray | None = None
) -> np.ndarray:
    """Noise-free single view, light along ``p.light_axis`` from ``side``: attenuation, depth-dependent PSF, haze (float32).

    ``axial_ratio`` (default ``p.axial_ratio``) sets the Z σ relative to the lateral σ, whatever the light axis.
    ``extra_tau`` (e.g. the absorbers' optical depth from ``side``) adds to the tissue's. With
    ``p.domain``: the sheet thickens with depth (:func:`training.domain.psf_sigmas_um`) and a
    scattering halo grows with depth (:func:`training.domain.scatter_halo`).
    """
    axis = p.light_axis
    ratio = p.axial_ratio if axial_ratio is None else axial_ratio
    sheet_growth = p.domain.sheet_growth if p.domain is not None else 0.0
    tau, depth = optical_depth(tissue, p.spacing[axis], p.mu_per_um, side, axis)
    if extra_tau is not None:
        tau = tau + extra_tau
    attenuated = label * np.exp(-2.0 * tau)  # excitation and emission both attenuated
    max_depth = max(float(depth.max()), 1e-3)
    levels = np.linspace(0.0, max_depth, BLUR_LEVELS)
    blurred = []
    for d in levels:
        sz, sy, sx = dr.psf_sigmas_um(float(d), p.psf_sigma0_um, p.psf_growth, ratio, sheet_growth)
        sigma_vox = (sz / p.spacing[0], sy / p.spacing[1], sx / p.spacing[2])
        blurred.append(ndimage.gaussian_filter(attenuated, sigma_vox, mode="nearest"))
    # Linear interpolation between the blur levels at each voxel's depth.
    pos = np.clip(depth / max_depth * (BLUR_LEVELS - 1), 0, BLUR_LEVELS - 1 - 1e-6)
    idx = pos.astype(np.int32)
    frac = pos - idx
    view = np.zeros_like(attenuated)
    for k in range(BLUR_LEVELS - 1):
        sel = idx == k
        view[sel] = (1 - frac[sel]) * blurred[k][sel] + frac[sel] * blurred[k + 1][sel]
    if p.haze > 0:
        wide = tuple(float(8.0 / s) for s in p.spacing)
        haze = ndimage.gaussian_filter(attenuated, wide, mode="nearest")
        view += p.haze * haze * np.clip(depth / max_depth, 0, 1)
    if p.domain is not None and p.domain.halo > 0:
        view += p.domain.halo * dr.scatter_halo(attenuated, p.spacing, p.domain.halo_radius_um) * np.clip(depth / max_depth, 0, 1)
    return view


def acquire(view: np.ndarray, photons: float, offset: float, read_noise: float, rng: np.random.Generator) -> np.ndarray:
    """Camera model: Poisson photon noise at ``photons`` per unit signal, offset, read noise → uint16."""
    counts = rng.poisson(np.clip(view, 0, None) * photons).astype(np.float32)
    adu = counts + offset + rng.normal(0.0, read_noise, size=view.shape).astype(np.float32)
    return np.clip(np.round(adu), 0, 65535).astype(np.uint16)


def fuse_views(top: np.ndarray, bottom: np.ndarray, tau_top: np.ndarray, tau_bottom: np.ndarray) -> np.ndarray:
    """Voxel-wise fusion of two opposite views, weighting the one that travelled less tissue."""
    w_top = expit((tau_bottom - tau_top) * 6.0)
    return w_top * top + (1.0 - w_top) * bottom


def simulate_pair(
    seed: int,
    channel: str = "nucleus",
    shape: tuple[int, int, int] | None = None,
    spacing: tuple[float, float, float] | None = None,
    photons: tuple[float, float] | None = None,
    sharpen_gt: bool = True,
    return_clean: bool = False,
    effects: Effects = PLAIN,
) -> SimulatedPair:
    """Simulate one (single view, fused) pair; deterministic in ``seed``.

    ``photons`` (min, max) replaces the photon budget's range (log-uniform, drawn from a separate
    stream of the seed, so every other parameter stays as without it): e.g. clean stress sets.
    ``sharpen_gt=False`` gives the fused views the input's axial ratio. ``return_clean`` also
    returns the noise-free specimen (``pair.clean``, float32, same grid and flips). ``effects``
    (:class:`Effects`): ``randomise`` switches on domain randomisation (:mod:`training.domain`): the specimen of
    :func:`specimen_randomised`, absorbers casting stripes along the light axis, sheet thickening,
    scattering halo, refractive defocus, intensity drift between planes, misregistered views and
    the target's residual blur; without it the arrays are exactly those of the simulator before.
    ``background`` adds a smooth additive background (:func:`training.domain.background_field`,
    its own stream ``[seed, 14]``) to the view before the camera, and a share of it to the target;
    without it the arrays are unchanged. ``gentle`` weakens the degradation (near-identity pair,
    :func:`training.domain.weaken`). ``layouts`` draws the specimen's layout (:func:`training.domain.tissue_distance`),
    ``shared_target`` makes the target partly the acquired input where its view is the better one
    (:func:`training.domain.share_input_view`); without them the arrays are unchanged.
    """
    p = draw_params(seed, channel, shape, spacing, sharpen_gt, effects)
    if photons is not None:
        p.photons = float(10 ** np.random.default_rng([seed, 7]).uniform(np.log10(photons[0]), np.log10(photons[1])))
    rng = np.random.default_rng([seed, 1])
    d = p.domain
    if d is None:
        label, tissue = specimen(p, rng)
    else:
        label, tissue = specimen_randomised(p, rng)
    axis = p.light_axis
    d_rng = np.random.default_rng([seed, 12])  # the randomised effects' own stream
    extra_top = extra_bottom = None
    if d is not None and d.absorbers > 0:
        absorb = dr.absorber_density(tissue, p.spacing, d_rng, d.absorbers, d.absorber_radius_um, d.absorber_tau, axis)
        extra_top = optical_depth(absorb, p.spacing[axis], 1.0, "top", axis)[0]
        extra_bottom = optical_depth(absorb, p.spacing[axis], 1.0, "bottom", axis)[0]
        del absorb
    gt_ratio = p.axial_ratio * p.gt_axial_factor
    top = clean_view(label, tissue, p, "top", gt_ratio, extra_top)
    bottom = clean_view(label, tissue, p, "bottom", gt_ratio, extra_bottom)
    tau_top, _ = optical_depth(tissue, p.spacing[axis], p.mu_per_um, "top", axis)
    tau_bottom, _ = optical_depth(tissue, p.spacing[axis], p.mu_per_um, "bottom", axis)
    if extra_top is not None and extra_bottom is not None:
        tau_top, tau_bottom = tau_top + extra_top, tau_bottom + extra_bottom
    if d is not None:
        bottom = dr.misregister(bottom, d.gt_view_shift_um, p.spacing)
    fused = fuse_views(top, bottom, tau_top, tau_bottom)
    input_weight = None
    if p.shared_target is not None:  # the fusion's weight of the input's view (fuse_views' weights)
        w_top = expit((tau_bottom - tau_top) * 6.0).astype(np.float32)
        input_weight = w_top if p.side == "top" else 1.0 - w_top
    del tau_top, tau_bottom
    if p.gt_axial_factor == 1.0 and d is None:
        single = top if p.side == "top" else bottom
    else:
        single = clean_view(label, tissue, p, p.side, None, extra_top if p.side == "top" else extra_bottom)
    del top, bottom
    if d is not None:
        fused = dr.refractive_defocus(fused, tissue, p.spacing, d.defocus_growth * p.gt_axial_factor, d.detection_side)
        fused = dr.residual_blur(fused, p.spacing, d.gt_residual_blur_um, gt_ratio)
        single = dr.refractive_defocus(single, tissue, p.spacing, d.defocus_growth, d.detection_side)
        single = dr.misregister(single, d.input_shift_um, p.spacing)
        gains = dr.plane_gains(p.shape[0], d_rng, d.drift_sigma, d.bleaching, reverse=d.detection_side != "top")
        single = single * gains[:, None, None]
    scale = 1.0 / max(float(np.percentile(fused, 99.9)), 1e-6)  # 'photons' = count at a bright voxel
    single, fused = single * scale, fused * scale
    if p.background is not None:
        b = p.background
        field_ = dr.background_field(p.shape, p.spacing, np.random.default_rng([seed, 14]), b.level, b.variation, b.length_um)
        single, fused = single + field_, fused + b.target_fraction * field_
    inp = acquire(single, p.photons, p.offset, p.read_noise, rng)
    gt = acquire(fused, p.photons * p.gt_photon_factor, p.offset, p.read_noise, rng)
    if input_weight is not None and p.shared_target is not None:
        gt_gain = p.photons * p.gt_photon_factor
        view = (inp.astype(np.float32) - p.offset) / p.photons
        target = dr.share_input_view((gt.astype(np.float32) - p.offset) / gt_gain, view, input_weight, p.shared_target)
        gt = np.clip(np.round(target * gt_gain + p.offset), 0, 65535).astype(np.uint16)
    clean = (label * scale).astype(np.float32) if return_clean else None
    flips = tuple(a for a, f in ((1, p.flip_y), (2, p.flip_x)) if f)
    if flips:
        inp = np.ascontiguousarray(np.flip(inp, flips))
        gt = np.ascontiguousarray(np.flip(gt, flips))
        clean = np.ascontiguousarray(np.flip(clean, flips)) if clean is not None else None
    return SimulatedPair(input=inp, fused=gt, spacing=p.spacing, channel=channel, params=p, clean=clean)


def write_pair(pair: SimulatedPair, folder: Path, index: int, study: str) -> tuple[Path, Path]:
    """Write ``image_<index>_<channel>_angle.tif`` and ``..._fused.tif`` with challenge metadata."""
    meta = {"unit": "um", "axes": "ZYX", "study": study}
    paths = []
    for kind, data in (("angle", pair.input), ("fused", pair.fused)):
        path = Path(folder) / f"image_{index}_{pair.channel}_{kind}.tif"
        write_volume(path, data, Volume(data=data, spacing=pair.spacing, channel=pair.channel, metadata=dict(meta)))
        paths.append(path)
    return paths[0], paths[1]


def write_dataset(
    out_dir: Path,
    n: int,
    seed: int,
    channels: tuple[str, ...] = CHANNELS,
    study: str = "simulated",
    shape: tuple[int, int, int] | None = None,
    photons: tuple[float, float] | None = None,
    sharpen_gt: bool = True,
    effects: Effects = PLAIN,
) -> list[dict[str, Any]]:
    """Write ``n`` pairs per channel under ``out_dir/<study>/``; pair i of a channel uses seed ``seed + i``.

    Nucleus and membrane pairs with the same index come from different seeds (membrane seeds are
    offset by 50 000) so the two channels never share a specimen. Returns the parameter records,
    also written to ``params.json``. ``shape`` (ZYX voxels) fixes the stack size; default random.
    ``effects``: the optional simulator effects (:class:`Effects`, :func:`simulate_pair`).
    """
    folder = Path(out_dir) / study
    folder.mkdir(parents=True, exist_ok=True)
    records = []
    index = 0
    for channel in channels:
        offset = 0 if channel == "nucleus" else 50_000
        for i in range(n):
            started = time.perf_counter()
            pair = simulate_pair(seed + offset + i, channel, shape, photons=photons, sharpen_gt=sharpen_gt, effects=effects)
            write_pair(pair, folder, index, study)
            record = asdict(pair.params) | {"index": index}
            records.append(record)
            log.info("pair %d %s seed %d shape %s spacing %s (%.1f s)", index, channel, pair.params.seed, pair.params.shape, tuple(round(s, 3) for s in pair.spacing), time.perf_counter() - started)
            index += 1
    (folder / "params.json").write_text(json.dumps(records, indent=1))
    return records


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Write simulated light-sheet (single view, fused) pairs in the challenge layout.")
    parser.add_argument("--out", type=Path, required=True, help="output root; files go to OUT/<study>/")
    parser.add_argument("--n", type=int, default=10, help="pairs per channel")
    parser.add_argument("--seed", type=int, default=0, help="first seed (pair i uses seed+i)")
    parser.add_argument("--channels", nargs="+", default=list(CHANNELS), choices=CHANNELS)
    parser.add_argument("--study", default="simulated")
    parser.add_argument("--photons", type=float, nargs=2, default=None, metavar=("MIN", "MAX"), help="photon budget range at a bright voxel (default 30–30000, log-uniform)")
    parser.add_argument("--no-gt-sharpening", action="store_true", help="fused views keep the input's axial ratio (no Z sharpening of the target)")
    parser.add_argument("--randomise", action="store_true", help="domain randomisation (training/domain.py): wider morphology, light-sheet artefacts, misregistration, target blur")
    parser.add_argument("--background", action="store_true", help="smooth additive background (stray light, medium) in the view, partly in the target (training/domain.py)")
    parser.add_argument("--gentle", action="store_true", help="weakly degraded pairs (near-identity: little attenuation and blur growth, target barely sharper; training/domain.py)")
    parser.add_argument("--layouts", action="store_true", help="specimen layouts (needs --randomise): embryo, hollow shell, bent sheet, clusters, filled field, scattered cells, off-centre and cut (training/domain.py)")
    parser.add_argument("--shared-target", action="store_true", help="the target is partly the acquired input where its view is the better one, as in a fusion of the acquired views (training/domain.py)")
    parser.add_argument("--shape", type=int, nargs=3, default=None, metavar=("Z", "Y", "X"), help="stack size in voxels (default: random per pair)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    write_dataset(args.out, args.n, args.seed, tuple(args.channels), args.study, tuple(args.shape) if args.shape else None, tuple(args.photons) if args.photons else None, not args.no_gt_sharpening, Effects(args.randomise, args.background, args.gentle, args.layouts, args.shared_target))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
