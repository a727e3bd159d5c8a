#!/usr/bin/env python3
"""Evaluation families beyond the training simulator (issue #24, item 3): benchmarks only, never training.

    python benchmarks/families.py --out DIR --family near_identity --n 4 --seed 1000
    python benchmarks/families.py --out DIR --family organoid --n 4 --seed 2000

Each family is written in the Grand Challenge layout, so ``benchmarks/trust_study.py``,
``training/evaluate_sets.py`` and ``python -m fusemycells.evaluate`` run on it unchanged:
``DIR/images/fluorescence-lightsheet-3D-microscopy/image_<i>_<channel>_angle.tif`` (one view, the
input) and ``DIR/ground-truth/image_<i>_<channel>_angle.tif`` (two opposite views fused, same grid).

* ``near_identity`` — clean, weakly degraded stacks: the training simulator's embryo specimen
  (:func:`training.simulate.specimen`) seen with a thin sheet, little attenuation and blur growth, no
  haze and a high photon budget; the ground truth fuses the acquired views, the input among them
  (:func:`shared_fusion`), so that SSIM(input, GT) ≥ :data:`NEAR_IDENTITY_MIN_SSIM` (a draw
  below it is replaced by a milder one of the same seed). N-SSIM's denominator is small there: every
  unnecessary change of the stack is magnified (the danger side of a trust rule).
* ``organoid`` — a morphology the training simulator never draws: a hollow epithelial cyst, one layer
  of columnar cells around a lumen (cells as radial wedges of a spherical shell; nuclei elongated
  along the radius, near the basal side; membranes: the lateral walls plus the apical and basal
  surfaces), optionally several cysts touching. The light travels along Y or X (never Z) from one
  side with Beer–Lambert attenuation, a depth-growing PSF and haze
  (:func:`training.simulate.clean_view`), Poisson and read noise; the ground truth fuses both opposite
  views (:func:`training.simulate.fuse_views`) at a higher photon budget.

No real 3D volume could be used (see docs/quality.md: the packages searched ship either synthetic or
2D images, or fetch their volumes from the web at run time; scikit-image's ``cells3d`` is reserved for
independent evaluation), hence the organoid family is synthetic but morphologically different.
All arrays ZYX, lengths in µm unless named ``_vox``; deterministic per seed.
"""

from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
from scipy.spatial import cKDTree
from scipy.special import expit

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from fusemycells.evaluation.metrics import metric_normalise, ssim  # noqa: E402
from fusemycells.io.tiff import Volume, write_volume  # noqa: E402
from training import simulate as sim  # noqa: E402

log = logging.getLogger("families")

INPUT_DIR = Path("images/fluorescence-lightsheet-3D-microscopy")
GT_DIR = Path("ground-truth")
CHANNELS = ("nucleus", "membrane")
FAMILIES = ("near_identity", "organoid")
NEAR_IDENTITY_MIN_SSIM = 0.95
FULL_SCALE_ADU = 30000.0  # a bright voxel of the fusion, at most (uint16 headroom for brighter ones)
SHAPE = ((40, 56), (128, 176))  # (Z range, YX range) in voxels: small stacks, a CPU run each


def _shape(rng: np.random.Generator) -> tuple[int, int, int]:
    nyx = int(rng.integers(SHAPE[1][0], SHAPE[1][1] + 1))
    return int(rng.integers(SHAPE[0][0], SHAPE[0][1] + 1)), nyx, int(np.clip(nyx * rng.uniform(0.85, 1.15), 96, 256))


def shared_fusion(
    label: np.ndarray, tissue: np.ndarray, p: sim.SimParams, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """(input, ground truth) uint16 ZYX where the ground truth is the fusion of the *acquired* views:
    the input itself (the view from ``p.side``, with its noise) and the opposite view (its own noise),
    voxel-wise weighted towards the view whose light travelled less tissue. Where the input's view is
    the better one the ground truth is that very acquisition, as in a real multi-view fusion: there
    any change of the input, denoising included, moves away from the ground truth."""
    axis = p.light_axis
    other = "bottom" if p.side == "top" else "top"
    view_in = sim.clean_view(label, tissue, p, p.side, None)
    view_other = sim.clean_view(label, tissue, p, other, None)
    tau_in, _ = sim.optical_depth(tissue, p.spacing[axis], p.mu_per_um, p.side, axis)
    tau_other, _ = sim.optical_depth(tissue, p.spacing[axis], p.mu_per_um, other, axis)
    scale = 1.0 / max(float(np.percentile(np.maximum(view_in, view_other), 99.9)), 1e-6)
    gain = min(1.0, FULL_SCALE_ADU / p.photons)
    inp = acquire(view_in * scale, p.photons, gain, p.offset, p.read_noise, rng)
    acquired_other = acquire(view_other * scale, p.photons, gain, p.offset, p.read_noise, rng)
    fused = sim.fuse_views(inp.astype(np.float32), acquired_other.astype(np.float32), tau_in, tau_other)
    return inp, np.clip(np.round(fused), 0, 65535).astype(np.uint16)


def two_views(
    label: np.ndarray, tissue: np.ndarray, p: sim.SimParams, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """(input, ground truth) uint16 ZYX: the view from ``p.side`` along ``p.light_axis`` with noise, and
    the fusion of both opposite noise-free views (Z sharper by ``p.gt_axial_factor``), acquired at
    ``p.gt_photon_factor`` times the photons (fusion averages several acquisitions); intensities scaled
    so that the fusion's 99.9th percentile is one bright voxel."""
    axis = p.light_axis
    gt_ratio = p.axial_ratio * p.gt_axial_factor
    top = sim.clean_view(label, tissue, p, "top", gt_ratio)
    bottom = sim.clean_view(label, tissue, p, "bottom", gt_ratio)
    tau_top, _ = sim.optical_depth(tissue, p.spacing[axis], p.mu_per_um, "top", axis)
    tau_bottom, _ = sim.optical_depth(tissue, p.spacing[axis], p.mu_per_um, "bottom", axis)
    fused = sim.fuse_views(top, bottom, tau_top, tau_bottom)
    single = sim.clean_view(label, tissue, p, p.side, None)
    scale = 1.0 / max(float(np.percentile(fused, 99.9)), 1e-6)
    gain = min(1.0, FULL_SCALE_ADU / (p.photons * p.gt_photon_factor))  # ADU per photon: no uint16 saturation
    inp = acquire(single * scale, p.photons, gain, p.offset, p.read_noise, rng)
    gt = acquire(fused * scale, p.photons * p.gt_photon_factor, gain, p.offset, p.read_noise, rng)
    return inp, gt


def acquire(
    view: np.ndarray, photons: float, gain: float, offset: float, read_noise: float, rng: np.random.Generator
) -> np.ndarray:
    """Camera: Poisson photon noise at ``photons`` per unit signal, ``gain`` ADU per photon, offset and
    read noise (ADU) → uint16 ZYX."""
    counts = rng.poisson(np.clip(view, 0, None) * photons).astype(np.float32) * np.float32(gain)
    adu = counts + offset + rng.normal(0.0, read_noise, size=view.shape).astype(np.float32)
    return np.clip(np.round(adu), 0, 65535).astype(np.uint16)


def input_ssim(inp: np.ndarray, gt: np.ndarray) -> float:
    """SSIM(input, GT) after the metric's 2/99.8 normalisation (:mod:`fusemycells.evaluation.metrics`)."""
    return ssim(metric_normalise(inp), metric_normalise(gt))


def near_identity(seed: int, channel: str) -> tuple[np.ndarray, np.ndarray, tuple[float, float, float], float]:
    """One near-identity case: (input, GT, spacing ZYX µm, SSIM(input, GT) ≥ 0.95).

    The simulator's specimen with mild optics: attenuation μ 0.003–0.015 /µm, lateral PSF σ
    0.15–0.3 µm growing 0.0005–0.003 per µm of tissue, axial ratio 1.5–3, no haze,
    3 000–30 000 photons; the ground truth fuses the acquired views (:func:`shared_fusion`). Each
    retry (up to 6) halves the degradation."""
    rng = np.random.default_rng([seed, 24])
    shape = _shape(rng)
    base = sim.draw_params(seed, channel, shape=shape)
    strength = 1.0
    for attempt in range(6):
        p = replace(
            base,
            mu_per_um=float(strength * rng.uniform(0.003, 0.015)),
            psf_sigma0_um=float(rng.uniform(0.15, 0.3)),
            psf_growth=float(strength * rng.uniform(0.0005, 0.003)),
            axial_ratio=float(1.0 + strength * rng.uniform(0.5, 2.0)),
            haze=0.0,
            photons=float(10 ** rng.uniform(np.log10(3000), np.log10(30000)) / strength),
            read_noise=float(rng.uniform(1.0, 4.0)),
        )
        label, tissue = sim.specimen(p, np.random.default_rng([seed, 1, attempt]))
        inp, gt = shared_fusion(label, tissue, p, np.random.default_rng([seed, 2, attempt]))
        score = input_ssim(inp, gt)
        if score >= NEAR_IDENTITY_MIN_SSIM:
            return inp, gt, p.spacing, score
        log.info("near_identity seed %d attempt %d: SSIM(input, GT) %.3f < %.2f, milder", seed, attempt, score, NEAR_IDENTITY_MIN_SSIM)
        strength *= 0.5
    raise RuntimeError(f"near_identity seed {seed}: no draw reached SSIM(input, GT) {NEAR_IDENTITY_MIN_SSIM}")


def cyst_specimen(
    shape: tuple[int, int, int], spacing: tuple[float, float, float], channel: str, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """(label, tissue) float32 ZYX of 1–3 hollow epithelial cysts (see the module doc).

    Each cyst: outer radius R 0.35–0.6 of the stack's smallest lateral half-extent (µm), wall
    (cell height) 0.3–0.5 R, cells as Voronoi wedges of points on the mid-wall sphere (cell
    width 4–8 µm). Nuclei: ellipsoids 1.5–2.2× longer along the radius than across, 60–75 % of
    the wall out from the lumen; membranes: the walls between wedges and both surfaces.
    """
    z, y, x = sim._coordinates(shape, spacing)
    half = np.array([(n - 1) / 2 * s for n, s in zip(shape, spacing)])
    label = np.zeros(shape, dtype=np.float32)
    tissue = np.zeros(shape, dtype=np.float32)
    for _ in range(int(rng.integers(1, 4))):
        radius = float(rng.uniform(0.35, 0.6) * min(half[1], half[2], 1.6 * half[0] + 10))
        wall = float(rng.uniform(0.3, 0.5) * radius)
        centre = rng.uniform(-0.4, 0.4, 3) * half
        dz, dy, dx = z - centre[0], y - centre[1], x - centre[2]
        r = np.sqrt(dz * dz + dy * dy + dx * dx) + 1e-6
        inner = radius - wall
        shell = (expit((radius - r) * 4.0) * expit((r - inner) * 4.0)).astype(np.float32)
        tissue = np.maximum(tissue, shell)
        mid = radius - wall / 2
        width = float(rng.uniform(4.0, 8.0))
        n_cells = int(np.clip(4 * np.pi * mid**2 / width**2, 12, 400))
        directions = rng.standard_normal((n_cells, 3))
        directions /= np.linalg.norm(directions, axis=1, keepdims=True)
        unit = np.stack(np.broadcast_arrays(dz / r, dy / r, dx / r), axis=-1).reshape(-1, 3)
        dist, index = cKDTree(directions).query(unit, k=2, workers=1)
        if channel == "membrane":
            gap = (dist[:, 1] - dist[:, 0]).reshape(shape) / 2 * r  # angular gap → µm at radius r
            thickness = float(rng.uniform(0.3, 0.7))
            walls = np.exp(-0.5 * (gap / (thickness / 2)) ** 2) * shell
            surfaces = np.exp(-0.5 * ((r - radius) / (thickness / 2)) ** 2) + np.exp(-0.5 * ((r - inner) / (thickness / 2)) ** 2)
            brightness = rng.lognormal(0.0, 0.3, n_cells)[index[:, 0]].reshape(shape)
            label = np.maximum(label, (walls * brightness + 1.2 * surfaces).astype(np.float32))
        else:
            own = directions[index[:, 0]].reshape(*shape, 3)
            cos = np.clip(np.einsum("...k,...k->...", own, np.stack(np.broadcast_arrays(dz / r, dy / r, dx / r), axis=-1)), -1, 1)
            lateral = r * np.sqrt(np.clip(1.0 - cos * cos, 0.0, None))  # µm from the cell's axis
            depth = inner + rng.uniform(0.6, 0.75) * wall
            along = r * cos - depth  # µm along the radius from the nucleus centre
            semi_lat = 0.35 * width
            semi_rad = semi_lat * rng.uniform(1.5, 2.2)
            level = np.sqrt((lateral / semi_lat) ** 2 + (along / semi_rad) ** 2)
            brightness = rng.lognormal(0.0, 0.35, n_cells)[index[:, 0]].reshape(shape)
            label = np.maximum(label, (expit((1.0 - level) * semi_lat / 0.35) * brightness).astype(np.float32))
    texture = 1.0 + 0.25 * sim._smooth_noise(shape, tuple(float(np.clip(0.8 / s, 0.3, 4)) for s in spacing), rng)
    label = label * np.clip(texture, 0.2, None) * np.clip(tissue * 1.5, 0.0, 1.0) + 0.03 * tissue
    return label.astype(np.float32), tissue


def organoid(seed: int, channel: str) -> tuple[np.ndarray, np.ndarray, tuple[float, float, float], float]:
    """One organoid case: (input, GT, spacing ZYX µm, SSIM(input, GT)); light along Y or X."""
    rng = np.random.default_rng([seed, 25])
    shape = _shape(rng)
    p = sim.draw_params(seed, channel, shape=shape)
    p = replace(
        p,
        light_axis=int(rng.choice([1, 2])),
        haze=float(rng.uniform(0.0, 0.2)),
        mu_per_um=float(10 ** rng.uniform(np.log10(0.01), np.log10(0.06))),  # a thin shell: denser tissue
    )
    label, tissue = cyst_specimen(p.shape, p.spacing, channel, np.random.default_rng([seed, 1]))
    inp, gt = two_views(label, tissue, p, np.random.default_rng([seed, 2]))
    return inp, gt, p.spacing, input_ssim(inp, gt)


GENERATORS = {"near_identity": near_identity, "organoid": organoid}


def write_family(out: Path, family: str, n: int, seed: int, channels: tuple[str, ...] = CHANNELS) -> list[dict]:
    """Write ``n`` cases per channel (seeds ``seed + i``, membranes ``seed + 500 + i``) in the GC layout."""
    (out / INPUT_DIR).mkdir(parents=True, exist_ok=True)
    (out / GT_DIR).mkdir(parents=True, exist_ok=True)
    rows = []
    index = 0
    for channel in channels:
        for i in range(n):
            case_seed = seed + i + (500 if channel == "membrane" else 0)
            inp, gt, spacing, score = GENERATORS[family](case_seed, channel)
            name = f"image_{index}_{channel}_angle.tif"
            meta = {"unit": "um", "axes": "ZYX", "study": family}
            for folder, data in ((INPUT_DIR, inp), (GT_DIR, gt)):
                write_volume(out / folder / name, data, Volume(data=data, spacing=spacing, channel=channel, metadata=dict(meta)))
            log.info("%s %s seed %d shape %s: SSIM(input, GT) %.3f", family, name, case_seed, inp.shape, score)
            rows.append({"name": name, "seed": case_seed, "ssim_input": score, "shape": list(inp.shape)})
            index += 1
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--family", choices=FAMILIES, required=True)
    parser.add_argument("--n", type=int, default=4, help="cases per channel")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--channels", nargs="+", default=list(CHANNELS), choices=CHANNELS)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)-7s %(message)s", datefmt="%H:%M:%S")
    write_family(args.out, args.family, args.n, args.seed, tuple(args.channels))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
