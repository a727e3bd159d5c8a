"""Independent light-sheet (single view -> multi-view fusion) pair simulator, for cross-checking generalisation.

    python benchmarks/crosscheck_sim.py --out DIR --n N --seed S [--channels nucleus membrane]

Writes DIR/images/fluorescence-lightsheet-3D-microscopy/image_<i>_<channel>_angle.tif (one degraded view),
DIR/ground-truth/image_<i>_<channel>_angle.tif (fusion of two opposite views, same name and grid) and
DIR/params.json (every case-level drawn parameter). Arrays are uint16 in ZYX order; lengths are in µm unless
a name ends in _vox. Case i of channel c draws from SeedSequence([S, i, c]): a case never depends on N.

specimen  Voronoi tissue of dart-thrown seeds inside a cluster / embryo shell / tilted sheet / scattered cells /
          filled field (random placement leaves empty regions); nuclei = deformed textured soft ellipsoids with
          nucleoli, mitoses and mosaic labelling; membranes = anti-aliased bisector profile between neighbouring
          seeds, optional bright outer surface.
view      light enters along a random axis (Z, Y or X) from a random side: attenuation exp(-∫ mu·density ds)
          with sparse strong absorbers that cast stripe shadows, Gaussian-beam sheet divergence, depth-dependent
          anisotropic blur (axial Z worse; Gaussian core + scatter halo, blended levels), optional detection
          attenuation along Z, haze, offset + slowly varying background, Poisson x gain + read noise.
truth     both opposite views (Z blur scaled by gt_axial < 1: fusion sharpens Z), optionally mis-registered and
          intensity-mismatched, blended voxel-wise by a smoothed quality weight; higher photon level (or noise-free), own gain/offset/background.

Ablation (``--force KEY=VALUE``, repeatable): pins a drawn parameter right after it is drawn, so every other
draw keeps its value (``kind`` changes the draws that depend on it). KEY is ``kind``, ``shape``, ``spacing_um``
or ``<section>.<name>`` with section ``nuc``, ``mem``, ``optics``, ``fusion`` or ``noise`` (names as in
params.json); VALUE is JSON (``optics.axis=0``, ``fusion.shift_um=[0,0,0]``) or a bare string. Neutral
settings: ``optics.halo_frac=0``, ``optics.absorber_rel=0``, ``optics.det_tau=0``, ``optics.haze_frac=0``,
``optics.gt_axial=1``, ``optics.beam_amp=0``, ``fusion.shift_um=[0,0,0]``, ``fusion.mismatch=1``,
``noise.bg=0``. Without ``--force`` the output is unchanged.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import tifffile
from scipy import ndimage
from scipy.spatial import cKDTree
from scipy.special import expit

INPUT_SUBDIR = Path("images/fluorescence-lightsheet-3D-microscopy")
GT_SUBDIR = Path("ground-truth")
CHANNELS = ("nucleus", "membrane")
KINDS = ("cluster", "embryo", "sheet", "scattered", "filled")
Shape = tuple[int, int, int]
SECTIONS = ("nuc", "mem", "optics", "fusion", "noise")
TOP_KEYS = ("kind", "shape", "spacing_um")


def parse_force(items: list[str]) -> dict[str, dict]:
    """``["optics.axis=0", "kind=sheet"]`` → ``{"optics": {"axis": 0}, "": {"kind": "sheet"}}`` (values JSON or strings)."""
    out: dict[str, dict] = {}
    for item in items:
        key, sep, text = item.partition("=")
        section, _, name = key.rpartition(".")
        if not sep or (section and section not in SECTIONS) or (not section and name not in TOP_KEYS):
            raise ValueError(f"--force wants KEY=VALUE with KEY in {TOP_KEYS} or <{'|'.join(SECTIONS)}>.<name>, got {item!r}")
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            value = text
        out.setdefault(section, {})[name] = value
    return out


def pin(drawn: dict, force: dict[str, dict] | None, section: str) -> dict:
    """``drawn`` with the forced values of ``section`` put in place (in place; unknown names are an error)."""
    for name, value in ((force or {}).get(section) or {}).items():
        if section and name not in drawn:
            raise KeyError(f"--force {section}.{name}: no such drawn parameter (have {sorted(drawn)})")
        drawn[name] = value
    return drawn


def logu(rng: np.random.Generator, lo: float, hi: float) -> float:
    return float(np.exp(rng.uniform(np.log(lo), np.log(hi))))


def rotations(rng: np.random.Generator, n: int) -> np.ndarray:
    """n random orthogonal 3x3 matrices, shape (n, 3, 3)."""
    q, r = np.linalg.qr(rng.standard_normal((n, 3, 3)))
    return q * np.sign(np.diagonal(r, axis1=1, axis2=2))[:, None, :]


def smooth_noise(rng: np.random.Generator, shape: Shape, spacing: np.ndarray, sigma_um: float) -> np.ndarray:
    """Zero-mean unit-std Gaussian random field on the ZYX grid, correlation length sigma_um (µm)."""
    sig = sigma_um / spacing
    if sig.min() >= 3:  # long correlation: coarse field, linear upsampling
        coarse = tuple(int(np.ceil(n / (s / 2))) + 3 for n, s in zip(shape, sig))
        g = ndimage.gaussian_filter(rng.standard_normal(coarse, dtype=np.float32), 2.0)
        g = ndimage.zoom(g, [n / c for n, c in zip(shape, coarse)], order=1)
    else:
        g = ndimage.gaussian_filter(rng.standard_normal(shape, dtype=np.float32), sig, truncate=3.0)
    return ((g - g.mean()) / (g.std() + 1e-12)).astype(np.float32)


def draw_specimen(rng: np.random.Generator, extent: np.ndarray, force: dict[str, dict] | None = None) -> dict:
    """Case-level specimen geometry; positions in µm, ZYX, origin at voxel (0, 0, 0)."""
    kind = str(pin({"kind": str(rng.choice(KINDS, p=[0.3, 0.2, 0.2, 0.12, 0.18]))}, force, "")["kind"])
    vol = np.prod(extent + 28.0)
    p: dict = {"kind": kind, "cell_d_um": max(rng.uniform(5, 14), (vol / 15000) ** (1 / 3))}
    if kind in ("cluster", "embryo"):
        p["center_um"] = extent * rng.uniform(-0.15, 1.15, 3)
        p["radii_um"] = rng.uniform(0.3, 0.9) * extent.max() * rng.uniform(0.6, 1.4, 3)
        p["rotation"] = rotations(rng, 1)[0]
        p["shell_um"] = rng.uniform(1.0, 2.5) * p["cell_d_um"]
    elif kind == "sheet":
        n = rng.standard_normal(3) + [rng.uniform(0, 4), 0, 0]
        p["normal"] = n / np.linalg.norm(n)
        p["center_um"] = extent * rng.uniform(0.25, 0.75, 3)
        p["thickness_um"] = rng.uniform(1.2, 4.0) * p["cell_d_um"]
    elif kind == "scattered":
        k = int(rng.integers(2, 16))
        p["centers_um"] = extent * rng.uniform(0, 1, (k, 3))
        p["radii_um"] = p["cell_d_um"] * rng.uniform(0.4, 0.7, k)
    elif rng.random() < 0.4:  # "filled", cut by a half-space
        n = rng.standard_normal(3)
        p["normal"], p["center_um"] = n / np.linalg.norm(n), extent * rng.uniform(0.1, 0.9, 3)
    p["undulation_um"] = rng.uniform(0, 0.4) * p["cell_d_um"]
    return p


def specimen_phi(p: dict, z: np.ndarray, y: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Signed level function (≈ µm, negative inside) at broadcastable Z, Y, X coordinates in µm."""
    zero = 0 * z + 0 * y + 0 * x
    if p["kind"] in ("cluster", "embryo"):
        d = (z - p["center_um"][0], y - p["center_um"][1], x - p["center_um"][2])
        rot, r = p["rotation"], p["radii_um"]
        q2 = sum(((rot[i, 0] * d[0] + rot[i, 1] * d[1] + rot[i, 2] * d[2]) / r[i]) ** 2 for i in range(3))
        phi = (np.sqrt(q2) - 1) * r.min()
        return np.abs(phi + p["shell_um"] / 2) - p["shell_um"] / 2 if p["kind"] == "embryo" else phi
    if p["kind"] == "scattered":
        phi = zero + np.inf
        for c, r in zip(p["centers_um"], p["radii_um"]):
            phi = np.minimum(phi, np.sqrt((z - c[0]) ** 2 + (y - c[1]) ** 2 + (x - c[2]) ** 2) - r)
        return phi
    if "normal" not in p:
        return zero - 1e3
    n, c = p["normal"], p["center_um"]
    s = n[0] * (z - c[0]) + n[1] * (y - c[1]) + n[2] * (x - c[2])
    return np.abs(s) - p["thickness_um"] / 2 if p["kind"] == "sheet" else s


def throw_seeds(rng: np.random.Generator, p: dict, extent: np.ndarray) -> np.ndarray:
    """Cell centres (N, 3) in µm by random sequential addition with a minimum distance, inside the specimen."""
    d = p["cell_d_um"]
    if p["kind"] == "scattered":
        return p["centers_um"] + rng.normal(0, 0.1 * d, p["centers_um"].shape)
    d_min = p["d_min_um"] = d * rng.uniform(0.7, 0.9)
    lo, hi = -np.full(3, d), extent + d
    n_cand = int(min(5 * np.prod(hi - lo) / d_min**3, 100_000))
    cand = rng.uniform(lo, hi, (n_cand, 3))
    cand = cand[specimen_phi(p, cand[:, 0], cand[:, 1], cand[:, 2]) < 0.2 * d]
    if len(cand) == 0:
        return rng.uniform(0, extent, (1, 3))
    nbrs = cKDTree(cand).query_ball_point(cand, d_min)
    alive, keep = np.ones(len(cand), bool), []
    for i in rng.permutation(len(cand)):
        if alive[i]:
            keep.append(i)
            alive[nbrs[i]] = False
    return cand[keep]


def render_object(rng: np.random.Generator, p: dict, channel: str, shape: Shape, spacing: np.ndarray,
                  seeds: np.ndarray, phi: np.ndarray, force: dict[str, dict] | None = None) -> np.ndarray:
    """Fluorophore density on the ZYX grid (float32, ≈1 for bright structures)."""
    n, tree, d = len(seeds), cKDTree(seeds), p["cell_d_um"]
    nn = tree.query(seeds, k=2)[0][:, 1] if n > 1 else np.full(1, d)
    nn = np.minimum(nn, 1.5 * d)
    c = p["cell_bright"] = {"sd": rng.uniform(0.1, 0.5)}
    bright = np.exp(rng.normal(0, c["sd"], n)).astype(np.float32)
    px = float(np.hypot(p.setdefault("edge_um", rng.uniform(0.15, 0.5)), spacing.max() / 3.5))
    obj = np.zeros(shape, np.float32)
    if channel == "nucleus":
        q = p["nuc"] = {"frac": rng.uniform(0.45, 0.8), "aniso": rng.uniform(0.05, 0.3),
                        "label_frac": float(min(1.0, rng.uniform(0.5, 1.6))), "mitotic": rng.uniform(0, 0.06),
                        "deform": rng.uniform(0, 0.25), "texture": rng.uniform(0, 0.6),
                        "texture_um": rng.uniform(0.3, 1.0), "nucleoli_dim": rng.uniform(0.3, 1.0)}
        pin(q, force, "nuc")
        axes = (q["frac"] * nn / 2)[:, None] * np.exp(rng.normal(0, q["aniso"], (n, 3)))
        mit = rng.random(n) < q["mitotic"]
        axes[mit] *= [0.35, 0.7, 0.7]
        bright = bright * np.where(mit, 2.5, 1.0) * (rng.random(n) < q["label_frac"])
        rot, off = rotations(rng, n), rng.normal(0, 0.1, (n, 3)) * axes
        deform = q["deform"] * smooth_noise(rng, shape, spacing, 1.5)
        tex = np.clip(1 + q["texture"] * smooth_noise(rng, shape, spacing, q["texture_um"]), 0.15, None)
        tex *= np.where(smooth_noise(rng, shape, spacing, 0.7) > 1.8, q["nucleoli_dim"], 1.0)
    else:
        q = p["mem"] = {"fwhm_um": rng.uniform(0.3, 1.5), "punctate": rng.uniform(0, 0.5), "punctate_um": rng.uniform(0.5, 2),
                        "surface_gain": rng.uniform(1, 3) if rng.random() < 0.6 else 0.0}
        pin(q, force, "mem")
        var0 = (q["fwhm_um"] / 2.355) ** 2
        tex = np.clip(1 + q["punctate"] * smooth_noise(rng, shape, spacing, q["punctate_um"]), 0.1, None)
    inside = phi < 0.7 * d
    for z0 in range(0, shape[0], 8):
        sl = slice(z0, z0 + 8)
        idx = np.nonzero(inside[sl])
        if not len(idx[0]):
            continue
        pts = np.stack([(idx[0] + z0) * spacing[0], idx[1] * spacing[1], idx[2] * spacing[2]], 1)
        if channel == "nucleus":
            _, j = tree.query(pts, k=1)
            u = np.einsum("nij,nj->ni", rot[j], pts - seeds[j] - off[j]) / axes[j]
            rho = np.linalg.norm(u, axis=1) * (1 + deform[sl][idx])
            val = bright[j] * expit((1 - rho) * axes[j].min(1) / px)
        else:
            dist, j = tree.query(pts, k=2)
            normal = seeds[j[:, 1]] - seeds[j[:, 0]]
            sep = np.linalg.norm(normal, axis=1) + 1e-6
            h = (dist[:, 1] ** 2 - dist[:, 0] ** 2) / (2 * sep)
            var = var0 + (((normal / sep[:, None]) * spacing) ** 2).sum(1) / 12  # voxel anti-aliasing
            val = 0.5 * (bright[j[:, 0]] + bright[j[:, 1]]) * np.sqrt(var0 / var) * np.exp(-(h**2) / (2 * var))
        obj[sl][idx] = val
    obj *= tex
    if channel == "membrane":
        obj *= expit(-phi / px)
        grad = np.gradient(phi, *spacing)  # surface normal, for anti-aliasing over the voxel extent along it
        var = var0 + sum((g * s) ** 2 for g, s in zip(grad, spacing)) / (sum(g**2 for g in grad) + 1e-6) / 12
        obj += q["surface_gain"] * np.sqrt(var0 / var) * np.exp(-(phi**2) / (2 * var))
    p["cyto_level"] = rng.uniform(0, 0.1)
    obj += p["cyto_level"] * expit(-phi / px)
    pos = obj[obj > 0.05]
    return obj / (np.percentile(pos, 99.5) if pos.size else 1.0)


def path_integral(dens: np.ndarray, axis: int, from_low: bool, dx: float) -> np.ndarray:
    """∫ dens ds (µm·density) from the entry face (low or high index) to each voxel centre along axis."""
    d = dens if from_low else np.flip(dens, axis)
    t = (np.cumsum(d, axis=axis, dtype=np.float32) - 0.5 * d) * dx
    return t if from_low else np.flip(t, axis)


def render_view(obj: np.ndarray, tau: np.ndarray, level: np.ndarray, o: dict, spacing: np.ndarray,
                axial: float = 1.0) -> np.ndarray:
    """Detected view: illumination exp(-tau), blur blended over levels (level in [0, 1]); axial scales Z sigmas."""
    emitted = obj * np.exp(-tau)
    halo = ndimage.gaussian_filter(emitted, o["halo_um"] / spacing, truncate=3.0) if o["halo_frac"] else 0
    s0, s1, k = np.asarray(o["sigma0_um"]), np.asarray(o["sigma1_um"]), o["levels"]
    s0[0], s1[0] = s0[0] * axial, s1[0] * axial
    t, out = level * (k - 1), np.zeros_like(obj)
    for i in range(k):
        w = np.clip(1 - np.abs(t - i), 0, None)
        if w.max() > 0:
            f = i / (k - 1)
            core = ndimage.gaussian_filter(emitted, (s0 + f * (s1 - s0)) / spacing, truncate=3.0)
            out += w * ((1 - o["halo_frac"] * f) * core + o["halo_frac"] * f * halo)
    return out


def simulate(rng: np.random.Generator, channel: str, force: dict[str, dict] | None = None) -> tuple[np.ndarray, np.ndarray, dict]:
    """One (input view, fused ground truth) pair, both uint16 ZYX, and its parameters (``force``: :func:`parse_force`)."""
    shape: Shape = (int(rng.integers(24, 81)), int(rng.integers(96, 257)), int(rng.integers(96, 257)))
    xy = rng.uniform(0.195, 0.39)
    grid = pin({"shape": shape, "spacing_um": [rng.uniform(1.0, 3.0), xy, xy]}, force, "")
    shape, spacing = tuple(int(n) for n in grid["shape"]), np.array(grid["spacing_um"], dtype=float)
    extent = np.array(shape) * spacing
    p = draw_specimen(rng, extent, force)
    p.update(shape=shape, spacing_um=spacing, channel=channel)
    z, y, x = (np.arange(n, dtype=np.float32).reshape([-1 if a == i else 1 for a in range(3)]) * s
               for i, (n, s) in enumerate(zip(shape, spacing)))
    phi = specimen_phi(p, z, y, x).astype(np.float32)
    phi += p["undulation_um"] * smooth_noise(rng, shape, spacing, 2 * p["cell_d_um"])
    seeds = throw_seeds(rng, p, extent)
    p["n_cells"] = len(seeds)
    obj = render_object(rng, p, channel, shape, spacing, seeds, phi, force)
    # optics: illumination axis/side, extinction, absorbers (stripes), sheet divergence, blur
    o = p["optics"] = {"axis": int(rng.choice(3, p=[0.2, 0.4, 0.4])), "from_low": bool(rng.random() < 0.5),
                       "tau_total": logu(rng, 0.1, 3.0), "kappa_blur": rng.uniform(0.3, 1.5),
                       "n_absorbers": int(rng.integers(1, 30)) if rng.random() < 0.6 else 0,
                       "absorber_um": rng.uniform(0.5, 3.0), "absorber_rel": logu(rng, 3, 60),
                       "waist_frac": rng.uniform(0.3, 0.7), "rayleigh_frac": rng.uniform(0.5, 3.0),
                       "beam_amp": rng.uniform(0, 1.0), "levels": 4,
                       "sigma0_um": [rng.uniform(0.6, 2.5), *[rng.uniform(0.12, 0.3)] * 2],
                       "halo_frac": rng.uniform(0, 0.4) if rng.random() < 0.7 else 0.0, "halo_um": rng.uniform(3, 8),
                       "det_tau": rng.uniform(0.1, 1.0) if rng.random() < 0.4 else 0.0,
                       "det_from_top": bool(rng.random() < 0.5), "haze_frac": rng.uniform(0, 0.3),
                       "haze_um": rng.uniform(5, 15)}
    o["sigma1_um"] = [o["sigma0_um"][0] * rng.uniform(1.5, 4), *[o["sigma0_um"][1] * rng.uniform(2, 6)] * 2]
    o["gt_axial"] = rng.uniform(0.4, 1.0)  # multi-view fusion also sharpens Z
    pin(o, force, "optics")
    a, dx = o["axis"], float(spacing[o["axis"]])
    dens = np.clip(expit(-phi / 1.0) * (1 + 0.3 * smooth_noise(rng, shape, spacing, 5.0)), 0, None)
    lines = dens.sum(a) * dx
    mu = o["tau_total"] / float(max(np.percentile(lines[lines > 0], 90) if (lines > 0).any() else 1.0, 1e-3))
    if o["n_absorbers"]:
        spikes = np.zeros(shape, np.float32)
        o["absorber_vox"] = pts = (rng.random((o["n_absorbers"], 3)) * shape).astype(int)
        spikes[tuple(pts.T)] = o["absorber_weight"] = np.exp(rng.normal(0, 0.5, len(pts)))
        spikes = ndimage.gaussian_filter(spikes, o["absorber_um"] / spacing)
        dens += spikes * (o["absorber_rel"] / spikes.max())
    pos = (np.arange(shape[a]) * dx).reshape([-1 if i == a else 1 for i in range(3)])
    views = {}  # the input view, then the two opposite views that the ground truth fuses
    for key, from_low, axial in (("in", o["from_low"], 1.0), ("a", o["from_low"], o["gt_axial"]),
                                 ("b", not o["from_low"], o["gt_axial"])):
        tau = mu * path_integral(dens, a, from_low, dx)
        depth = pos if from_low else extent[a] - pos
        beam = o["beam_amp"] * ((depth - o["waist_frac"] * extent[a]) / (o["rayleigh_frac"] * extent[a])) ** 2
        level = (1 - np.exp(-(o["kappa_blur"] * tau + beam))).astype(np.float32)
        v = render_view(obj, tau, level, o, spacing, axial)
        v += o["haze_frac"] * ndimage.gaussian_filter(v, o["haze_um"] / spacing, truncate=2.0)
        views[key] = (v, np.exp(-tau) * (1 - 0.8 * level))
    if o["det_tau"]:
        det = np.exp(-o["det_tau"] * path_integral(dens, 0, not o["det_from_top"], spacing[0]) * mu)
        views = {k: (v * det, q) for k, (v, q) in views.items()}
    # fusion of the two opposite views
    f = p["fusion"] = {"power": rng.uniform(1, 8), "smooth_um": rng.uniform(2, 10),
                       "shift_um": rng.uniform(-0.6, 0.6, 3) * (rng.random() < 0.5), "mismatch": rng.uniform(0.85, 1.15)}
    pin(f, force, "fusion")
    f["shift_um"] = np.asarray(f["shift_um"], dtype=float)
    (va, qa), (vb, qb), vin = views["a"], views["b"], views["in"][0]
    wa = ndimage.gaussian_filter(qa**f["power"] / (qa**f["power"] + qb**f["power"] + 1e-12), f["smooth_um"] / spacing)
    vb = ndimage.shift(vb, f["shift_um"] / spacing, order=1, mode="nearest") * f["mismatch"]
    fused = wa * va + (1 - wa) * vb
    scale = float(np.percentile(fused, 99.95)) + 1e-6  # photons and gt_peak_adu refer to bright fused voxels
    vin, fused = vin / scale, fused / scale
    # detection: background, Poisson x gain + read noise
    n = p["noise"] = {"photons": logu(rng, 40, 5000), "gain": logu(rng, 0.3, 3), "read_e": rng.uniform(0.5, 3),
                      "offset": rng.uniform(80, 600), "bg": logu(rng, 1e-3, 0.08), "bg_var": rng.uniform(0, 0.8), "bg_um": rng.uniform(20, 60),
                      "gt_photon_factor": rng.uniform(5, 50) if rng.random() < 0.75 else 0.0,
                      "gt_peak_adu": rng.uniform(1500, 20000), "gt_offset": rng.uniform(0, 400),
                      "gt_bg_factor": rng.uniform(0.2, 1.0)}
    pin(n, force, "noise")
    bg = n["bg"] * np.clip(1 + n["bg_var"] * smooth_noise(rng, shape, spacing, n["bg_um"]), 0, None)
    counts = rng.poisson(n["photons"] * (vin + bg)) + rng.normal(0, n["read_e"], shape)
    img = n["offset"] + n["gain"] * counts
    clean = fused + n["gt_bg_factor"] * bg
    if n["gt_photon_factor"]:
        ph = n["photons"] * n["gt_photon_factor"]
        clean = rng.poisson(ph * clean) / ph
    gt = n["gt_offset"] + n["gt_peak_adu"] * clean
    return to_uint16(img), to_uint16(gt), p


def to_uint16(a: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(a), 0, 65535).astype(np.uint16)


def jsonable(v):
    if isinstance(v, dict):
        return {k: jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple, np.ndarray)):
        return [jsonable(x) for x in v]
    return v.item() if isinstance(v, np.generic) else v


def write_tif(path: Path, arr: np.ndarray, spacing: np.ndarray, channel: str) -> None:
    z, y, x = (float(s) for s in spacing)
    meta = {"axes": "ZYX", "unit": "um", "PhysicalSizeX": x, "PhysicalSizeY": y, "PhysicalSizeZ": z,
            "channel": channel, "study": "crosscheck"}
    tifffile.imwrite(path, arr, bigtiff=True, resolution=(1 / x, 1 / y), metadata=meta, tile=(128, 128))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--n", type=int, default=4, help="cases per channel")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--channels", nargs="+", default=list(CHANNELS), choices=CHANNELS)
    parser.add_argument("--force", action="append", default=[], metavar="KEY=VALUE",
                        help="pin a drawn parameter after drawing it (ablation; see the module docstring)")
    args = parser.parse_args(argv)
    force = parse_force(args.force)
    (args.out / INPUT_SUBDIR).mkdir(parents=True, exist_ok=True)
    (args.out / GT_SUBDIR).mkdir(parents=True, exist_ok=True)
    cases = []
    for i in range(args.n):
        for channel in args.channels:
            t0 = time.perf_counter()
            entropy = [args.seed, i, CHANNELS.index(channel)]
            img, gt, p = simulate(np.random.default_rng(np.random.SeedSequence(entropy)), channel, force)
            name = f"image_{i}_{channel}_angle.tif"
            write_tif(args.out / INPUT_SUBDIR / name, img, p["spacing_um"], channel)
            write_tif(args.out / GT_SUBDIR / name, gt, p["spacing_um"], channel)
            cases.append({"file": name, "entropy": entropy, "seconds": round(time.perf_counter() - t0, 2), **p})
            print(f"{name}: {img.shape} {p['kind']} axis={'ZYX'[p['optics']['axis']]} "
                  f"photons={p['noise']['photons']:.0f} ({cases[-1]['seconds']} s)", flush=True)
    (args.out / "params.json").write_text(json.dumps(jsonable(cases), indent=1))
    if args.force:
        (args.out / "force.json").write_text(json.dumps(force, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
