#!/usr/bin/env python3
"""Per-case trust in the network correction (issues #14, #24): offline study, the measurements the
trust calibration (:mod:`training.calibrate_trust`) is fitted on.

    python benchmarks/trust_study.py --set NAME=ROOT[:N] [--set ...] --cache DIR [--resources DIR]
        [--json FILE] [--networks-only | --cached-only | --sigma-scan SIGMA ...]
    python benchmarks/trust_study.py --cost Z Y X [--resources DIR]

Each ROOT is a TUNING set in our simulator's layout (``*_angle.tif`` beside ``*_fused.tif``) or the
Grand Challenge layout (``ROOT/images/...`` and ``ROOT/ground-truth``: ``benchmarks/crosscheck_sim.py``,
``benchmarks/families.py``); ``:N`` takes the first N cases per channel. Never pass a held-out set.
Sets of one generator form a family (``training.trust_calibration.family_of``: ``ours*``, ``xc*``,
else the name).

Per case the container's own steps (:class:`fusemycells.pipeline.Fuser`: prepare, global stage, patch
stage, weight map; CPU) compute once the network correction on H, its weight map at gate 1 and the raw
material of every trust signal of :mod:`fusemycells.trust`, cached in
``DIR/<weights_key>/<set>/<case>.npz`` (keyed by the weights' checksums: new weights never reuse old
outputs). Then it scores N-SSIM of the output the container would write for networks off, the factors
of :data:`SCORED` (with and without the region factor), the Gaussian baseline and networks off at σ 0
and at v3's σ, under both SSIM conventions (:mod:`fusemycells.evaluation.metrics`' uniform window and
:func:`ssim_gaussian`), cached per case and output σ; and prints the per-case table, each signal's
correlation with the benefit over networks off, and the cost of the signals. ``--json`` writes the
per-case rows.

The calibration (leave one family out, the decision table docs/quality_table.md, the manifest's trust
block) runs on those rows: ``python -m training.calibrate_trust --rows FILE <the --set list>
[--table FILE] [--write-manifest FILE]`` (docs/quality.md gives the full commands).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import sys
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
from scipy import stats

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # run as a script: the repository's packages (fusemycells, training)
    sys.path.insert(0, str(REPO))

from fusemycells import postprocess, trust  # noqa: E402
from fusemycells.config import DEFAULT_RESOURCES, Manifest, TrustSpec, load_manifest, with_output_sigma  # noqa: E402
from fusemycells.evaluate import ground_truth_name, tiff_files  # noqa: E402
from fusemycells.evaluation.metrics import gaussian_baseline, metric_normalise, n_ssim, ssim  # noqa: E402
from fusemycells.io.tiff import read_volume  # noqa: E402
from fusemycells.ops import choose_ops  # noqa: E402
from fusemycells.pipeline import Fuser, HighRes, Prepared  # noqa: E402
from fusemycells.preprocess import ResizedSource  # noqa: E402
from fusemycells.report import CaseReport  # noqa: E402
from fusemycells.runtime.budget import BudgetPolicy  # noqa: E402
from fusemycells.runtime.deadline import Countdown  # noqa: E402
from fusemycells.runtime.timing import Profile  # noqa: E402
from fusemycells.sources import materialise  # noqa: E402
from training import trust_calibration as cal  # noqa: E402
from training.calibrate_trust import SEARCH_SIGNALS, parse_sets  # noqa: E402

log = logging.getLogger("trust_study")
OPS = choose_ops("cpu")
"""Where the study's resizes and weight maps run outside a case (the pipeline's CPU steps)."""

INPUT_DIR = "images/fluorescence-lightsheet-3D-microscopy"
GT_DIR = "ground-truth"
GATES = (0.0, 0.25, 0.5, 1.0)
REGIONS = ("none", "agreement")
SCORED = ("none@0.25", "agreement@0.25", "none@0.5", "agreement@0.5", "none@1", "agreement@1")
"""The (region, gate) outputs scored per case besides networks off ('none@0')."""
CACHE_VERSION = 2
ROW_VERSION = 4  # 4: agreement@0.5 and agreement@1 scored too
SIGNALS_VERSION = 3  # bump when fusemycells.trust.case_signals changes: cached rows remeasure their signals


@dataclass
class Case:
    """One simulated case: its files and channel."""

    set_name: str
    name: str
    channel: str
    input_path: Path
    gt_path: Path


def find_cases(set_name: str, root: Path, per_channel: int | None = None) -> list[Case]:
    """The (input, ground truth) pairs of a set (either simulator's layout); the first ``per_channel``
    of each channel (by name) when given."""
    if (root / INPUT_DIR).is_dir():  # benchmarks/crosscheck_sim.py: same names in two folders
        inputs, gts = tiff_files(root / INPUT_DIR), tiff_files(root / GT_DIR)
    else:  # training/simulate.py: <name>_angle.tif beside <name>_fused.tif
        inputs = gts = tiff_files(root)
    cases = []
    for name, path in sorted(inputs.items()):
        gt = next((gts[n] for n in ground_truth_name(name) if n in gts), None)
        if gt is None or gt == path or "_angle" not in name:
            continue
        channel = "membrane" if "membrane" in name else "nucleus"
        cases.append(Case(set_name, name, channel, path, gt))
    if per_channel is not None:
        cases = [c for ch in ("nucleus", "membrane") for c in [c for c in cases if c.channel == ch][:per_channel]]
    return cases


def ungated(manifest: Manifest) -> Manifest:
    """The manifest with every channel's gate knots and trust off: the networks always run, at gate 1."""
    channels = {
        name: replace(ch, postprocess=replace(ch.postprocess, gate_knots=()), trust=TrustSpec())
        for name, ch in manifest.channels.items()
    }
    return replace(manifest, channels=channels)


def prepare(fuser: Fuser, case: Case) -> tuple[Prepared, CaseReport]:
    """The container's first step on a case (sanitise, normalise, noise, σ, grid H)."""
    volume = read_volume(case.input_path)
    report = CaseReport(file=case.name)
    return fuser._prepare(volume.data, volume.spacing, case.channel, report, Profile({})), report


def compute_artefacts(fuser: Fuser, case: Case) -> dict[str, np.ndarray]:
    """The network outputs and trust raw material of one case, with the container's own steps.

    ``correction`` (H), ``weight`` (diff grid, gate 1), ``coarse``, ``p1`` (global grid), ``noise``,
    ``seconds`` (global stage, patch stage, signals and region factor, the correction's resize to the
    diff grid) and ``patches`` (forwards of the patch stage). (Caches written before issue #24's
    clean-up also hold the flip probes' ``p1_flip`` and ``probe``, unused since.)
    """
    prepared, report = prepare(fuser, case)
    channel = prepared.channel
    assert channel.global_stage.grid is not None and channel.patch_stage.patch_size is not None
    started = time.perf_counter()
    ops = prepared.ops
    x_h = ResizedSource(prepared.x_in, prepared.grid_h, ops=ops)
    coarse = materialise(ResizedSource(x_h, channel.global_stage.grid, cache=False, ops=ops))
    p1, _ = fuser._run_global(channel, coarse)
    global_s = time.perf_counter() - started
    high = HighRes(x_h, ResizedSource(p1, prepared.grid_h, ops=ops))
    started = time.perf_counter()
    correction = fuser._patch_stage(prepared, high, Countdown(None), report).astype(np.float32)
    patch_s = time.perf_counter() - started
    patches = int(report.stages["patch"]["patches"])
    extent_um = [n * s for n, s in zip(prepared.data.shape, prepared.spacing)]
    weight = postprocess.blend_weight(correction, prepared.x_in, prepared.post, 1.0, extent_um, ops=ops)
    grid = weight.shape
    started = time.perf_counter()
    c2 = trust.coarse_correction(correction, grid, ops)  # shared with the weight map in the pipeline
    resize_s = time.perf_counter() - started
    started = time.perf_counter()
    x_d, p1_d = trust.on_grid(coarse, grid, ops), trust.on_grid(p1, grid, ops)
    trust.case_signals(prepared.noise, x_d, p1_d, c2, trust.foreground_mask(x_d, TrustSpec().foreground))
    trust.agreement_map(p1_d - x_d, c2, TrustSpec().region_sigma)
    signals_s = time.perf_counter() - started
    return {
        "version": np.int64(CACHE_VERSION),
        "correction": correction,
        "weight": weight,
        "coarse": coarse,
        "p1": p1,
        "noise": np.float64(prepared.noise),
        "seconds": np.array([global_s, 0.0, patch_s, 0.0, signals_s, resize_s]),
        "patches": np.int64(patches),
    }


def artefact_path(cache: Path, case: Case) -> Path:
    """Where a case's network outputs are cached: ``cache/<set>/<case name without suffix>.npz``."""
    return cache / case.set_name / (case.name.rsplit(".", 1)[0] + ".npz")


def cached_artefacts(
    rows: Sequence[dict[str, Any]], sets: Sequence[str], cache: Path, resources: Path, keys: Sequence[str], threads: int
) -> Iterator[tuple[dict[str, Any], Case, dict[str, np.ndarray]]]:
    """(row, case, artefacts ``keys``) for each of ``rows`` (this study's JSON rows of the ``--set`` values
    ``sets``), read from its cache under ``cache/<weights_key>/``; the worker's Fuser (``_WORKER['fuser']``)
    is set up once, before the first."""
    if not rows:
        return
    cases = {(c.set_name, c.name): c for n, (root, k) in parse_sets(sets).items() for c in find_cases(n, root, k)}
    cache = cache / weights_key(load_manifest(resources))
    _init_worker(resources, threads, "auto")
    for row in rows:
        case = cases[(row["set"], row["case"])]
        with np.load(artefact_path(cache, case)) as stored:
            yield row, case, {k: stored[k] for k in keys}


def load_or_compute(fuser: Fuser, case: Case, cache: Path) -> dict[str, np.ndarray]:
    """The case's artefacts from ``cache`` when stored by this version, else computed and stored."""
    path = artefact_path(cache, case)
    if path.is_file():
        with np.load(path) as stored:
            if "version" in stored.files and int(stored["version"]) == CACHE_VERSION:
                return {k: stored[k] for k in stored.files}
    log.info("[%s/%s] running the networks", case.set_name, case.name)
    artefacts = compute_artefacts(fuser, case)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, **artefacts)
    return artefacts


def signals_of(artefacts: dict[str, np.ndarray], spec: TrustSpec) -> dict[str, float]:
    """:func:`fusemycells.trust.case_signals` of a case from its artefacts, as :func:`fusemycells.trust.decide`
    measures them (on the weight map's grid)."""
    grid = artefacts["weight"].shape
    coarse = trust.on_grid(artefacts["coarse"], grid, OPS)
    return trust.case_signals(
        float(artefacts["noise"]),
        coarse,
        trust.on_grid(artefacts["p1"], grid, OPS),
        trust.coarse_correction(artefacts["correction"], grid, OPS),
        trust.foreground_mask(coarse, spec.foreground),
    )


def ssim_gaussian(a: np.ndarray, b: np.ndarray) -> float:
    """The other SSIM convention in public use for this challenge (BiaPy's evaluation script):
    ``skimage.metrics.structural_similarity`` with a Gaussian window (σ 1.5), population
    covariance, data range 1, on the metric-normalised ZYX volumes. Volumes thinner than the window
    (11 voxels) on an axis pass the largest odd size that fits (only skimage's size check uses it)."""
    from skimage.metrics import structural_similarity

    smallest = min(a.shape)
    win = None if smallest >= 11 else max(1, smallest - (1 - smallest % 2))
    return float(
        structural_similarity(
            a, b, win_size=win, gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=1.0
        )
    )


class Scorer:
    """N-SSIM of the container's output for one case and a weight map on the diff grid, under both
    SSIM conventions (:func:`fusemycells.evaluation.metrics.ssim`, the 7³ uniform window, and :func:`ssim_gaussian`)."""

    def __init__(self, fuser: Fuser, case: Case, correction: np.ndarray) -> None:
        self.case, _ = prepare(fuser, case)
        self.correction = correction
        self.gt = metric_normalise(read_volume(case.gt_path).data)
        raw = read_volume(case.input_path).data
        inp = metric_normalise(raw)
        self.ssim_input = (ssim(inp, self.gt), ssim_gaussian(inp, self.gt))
        self.gaussian = metric_normalise(gaussian_baseline(raw, case.channel))

    def _both(self, out: np.ndarray) -> tuple[float, float]:
        return (
            n_ssim(ssim(out, self.gt), self.ssim_input[0]),
            n_ssim(ssim_gaussian(out, self.gt), self.ssim_input[1]),
        )

    def score(self, weight: np.ndarray | None, sigma: float | None = None) -> tuple[float, float]:
        """N-SSIM (uniform, Gaussian window) of the output blended with ``weight`` (None: networks off),
        as ``inference.py`` writes it; ``sigma`` replaces the case's output σ (voxels)."""
        case = self.case
        if weight is None:
            blended = case.x_in
        else:
            blended = postprocess.blend_slabs(case.data, case.x_in, self.correction, weight, compact=False, ops=case.ops)
        post = case.post if sigma is None else with_output_sigma(case.post, float(sigma))
        return self._both(materialise(postprocess.final_source(blended, post, "float32", spacing=case.spacing, ops=case.ops)))

    def baseline(self) -> tuple[float, float]:
        """N-SSIM of the challenge's Gaussian baseline (:func:`fusemycells.evaluation.metrics.gaussian_baseline`)."""
        return self._both(self.gaussian)


V3_SIGMA_KNOTS = {
    "nucleus": ((0.005, 0.6), (0.01, 0.7), (0.02, 0.9), (0.035, 1.0), (0.06, 1.2), (0.09, 1.4)),
    "membrane": ((0.01, 0.4), (0.02, 0.6), (0.03, 0.7), (0.045, 0.9), (0.06, 1.1), (0.1, 1.3)),
}
"""The output σ knots shipped with v3 (before the clean-stack floor of issue #24): 'off_sigma_v3'."""


def score_case(
    fuser: Fuser, case: Case, artefacts: dict[str, np.ndarray]
) -> tuple[dict[str, float], dict[str, float]]:
    """N-SSIM per policy key ('none@0' networks off, '<region>@<gate>' of :data:`SCORED`, 'gaussian' the
    challenge's baseline, 'off_sigma0' networks off without the output filter, 'off_sigma_v3' networks off
    with the σ of the v3 manifest's knots), under the uniform-window
    SSIM and under :func:`ssim_gaussian` (two dicts)."""
    scorer = Scorer(fuser, case, artefacts["correction"])
    weight = artefacts["weight"]
    grid = weight.shape
    coarse, p1 = trust.on_grid(artefacts["coarse"], grid, OPS), trust.on_grid(artefacts["p1"], grid, OPS)
    c2 = trust.coarse_correction(artefacts["correction"], grid, OPS)
    region = trust.agreement_map(p1 - coarse, c2, TrustSpec().region_sigma)
    both = {"none@0": scorer.score(None), "gaussian": scorer.baseline(), "off_sigma0": scorer.score(None, 0.0)}
    v3 = postprocess.adaptive_settings(
        scorer.case.noise, replace(scorer.case.post, output_sigma_knots=V3_SIGMA_KNOTS[case.channel])
    )[0]
    same = abs(v3 - scorer.case.post.output_sigma) < 1e-6
    both["off_sigma_v3"] = both["none@0"] if same else scorer.score(None, v3)
    for key in SCORED:
        area, gate = key.split("@")
        w = np.float32(float(gate)) * weight * (region if area == "agreement" else np.float32(1.0))
        both[key] = scorer.score(w)
    return {k: v[0] for k, v in both.items()}, {k: v[1] for k, v in both.items()}


def case_row(
    fuser: Fuser, shipped: Manifest, case: Case, cache: Path, cached_only: bool = False
) -> dict[str, Any] | None:
    """One case's row (set, case, channel, signals, N-SSIM per policy under both SSIM conventions,
    seconds, patches), cached as JSON beside its artefacts and keyed by the output σ the manifest gives
    the case (new σ knots rescore only the cases whose σ they change). With ``cached_only``: None when
    the network outputs are not cached yet (a scoring pass that runs no network)."""
    path = artefact_path(cache, case)
    if cached_only and not path.is_file():
        return None
    sigma = None
    if path.is_file():
        with np.load(path) as stored:
            sigma = postprocess.adaptive_settings(float(stored["noise"]), shipped.channel(case.channel).postprocess)[0]
    row_path = path.with_name(path.stem + f".row-{ROW_VERSION}-{sigma:.4f}.json") if sigma is not None else None
    if row_path is not None and row_path.is_file():
        row = json.loads(row_path.read_text())
        if row.get("signals_version") != SIGNALS_VERSION:  # the signals' code changed: remeasure them only
            with np.load(path) as stored:
                started = time.perf_counter()
                row["signals"] = signals_of({k: stored[k] for k in stored.files}, TrustSpec())
                row["seconds"]["signals_now"] = time.perf_counter() - started
            row["signals_version"] = SIGNALS_VERSION
            row_path.write_text(json.dumps(row))
        return row
    artefacts = load_or_compute(fuser, case, cache)
    noise = float(artefacts["noise"])
    old_gate = postprocess.adaptive_settings(noise, shipped.channel(case.channel).postprocess)[1]
    scores, scores_g = score_case(fuser, case, artefacts)
    started = time.perf_counter()
    signals = signals_of(artefacts, TrustSpec())
    signals_s = time.perf_counter() - started
    parts = ("global", "global_flip", "patch", "probe", "signals", "resize")
    row = {
        "version": ROW_VERSION,
        "signals_version": SIGNALS_VERSION,
        "sigma": postprocess.adaptive_settings(noise, shipped.channel(case.channel).postprocess)[0],
        "noise": noise,
        "set": case.set_name,
        "case": case.name,
        "channel": case.channel,
        "signals": signals,
        "old_gate": old_gate,
        "n_ssim": scores,
        "n_ssim_gaussian_window": scores_g,
        "seconds": dict(zip(parts, map(float, artefacts["seconds"]))) | {"signals_now": signals_s},
        "patches": int(artefacts["patches"]),
    }
    row_path = path.with_name(path.stem + f".row-{ROW_VERSION}-{row['sigma']:.4f}.json")
    row_path.write_text(json.dumps(row))
    log.info("[%s/%s] %s", case.set_name, case.name, " ".join(f"{k} {v:.3f}" for k, v in scores.items()))
    return row


_WORKER: dict[str, Any] = {}
"""A worker process's Fuser and manifest (built once per process by :func:`_init_worker`)."""


def _init_worker(resources: Path, threads: int, backend: str) -> None:
    logging.getLogger("fusemycells").setLevel(logging.ERROR)
    shipped = load_manifest(resources)
    _WORKER["shipped"] = shipped
    _WORKER["fuser"] = Fuser(ungated(shipped), BudgetPolicy.create("cpu", None, None, threads), backend=backend)


def _worker_row(case: Case, cache: Path, cached_only: bool = False) -> dict[str, Any] | None:
    return case_row(_WORKER["fuser"], _WORKER["shipped"], case, cache, cached_only)


def sigma_scan(sets: dict[str, tuple[Path, int | None]], resources: Path, sigmas: Sequence[float]) -> list[dict[str, Any]]:
    """Networks off, per case: the input's relative noise, the manifest's output σ for it and N-SSIM
    (uniform window) of the output at each σ of ``sigmas`` (voxels) and at the manifest's: how much
    the output filter costs or gains with little noise (no network runs)."""
    shipped = load_manifest(resources)
    fuser = Fuser(shipped, BudgetPolicy.create("cpu", None, None, 2), backend="auto")
    rows = []
    for name, (root, n) in sets.items():
        for case in find_cases(name, root, n):
            scorer = Scorer(fuser, case, np.zeros((1, 1, 1), np.float32))
            scores = {f"{sigma:g}": scorer.score(None, sigma)[0] for sigma in sigmas}
            scores["manifest"] = scorer.score(None)[0]
            row = {"set": name, "case": case.name, "channel": case.channel, "noise": scorer.case.noise,
                   "sigma": scorer.case.post.output_sigma, "ssim_input": scorer.ssim_input[0], "n_ssim": scores}
            log.info("sigma scan %s", json.dumps(row))
            rows.append(row)
    return rows


def networks_only(sets: dict[str, tuple[Path, int | None]], resources: Path, cache: Path, threads: int, backend: str) -> int:
    """Fill the cache with every case's network outputs (the expensive part), scoring nothing; returns
    the number of cases. A later run scores from the cache."""
    cache = cache / weights_key(load_manifest(resources))
    _init_worker(resources, threads, backend)
    cases = [case for name, (root, n) in sets.items() for case in find_cases(name, root, n)]
    for case in cases:
        load_or_compute(_WORKER["fuser"], case, cache)
    return len(cases)


def weights_key(manifest: Manifest) -> str:
    """12 hex digits identifying the networks of ``manifest`` (a hash of every stage file's sha256):
    the cache's subfolder, so new weights never reuse old network outputs."""
    digest = hashlib.sha256()
    for name, ch in sorted(manifest.channels.items()):
        for stage in (ch.global_stage, ch.patch_stage):
            for kind, f in sorted(stage.files.items()):
                digest.update(f"{name}/{kind}/{f.sha256};".encode())
    return digest.hexdigest()[:12]


def study(
    sets: dict[str, tuple[Path, int | None]],
    resources: Path,
    cache: Path,
    threads: int,
    backend: str,
    workers: int,
    cached_only: bool = False,
) -> list[dict[str, Any]]:
    """The rows of every case of ``sets``, ``workers`` cases at a time (each with ``threads`` threads);
    network outputs cached under ``cache/<weights_key>/``; ``cached_only``: only the cases whose network
    outputs are cached."""
    cache = cache / weights_key(load_manifest(resources))
    cases = [case for name, (root, n) in sets.items() for case in find_cases(name, root, n)]
    n = len(cases)
    if workers <= 1:
        _init_worker(resources, threads, backend)
        rows = [_worker_row(case, cache, cached_only) for case in cases]
    else:
        with ProcessPoolExecutor(workers, initializer=_init_worker, initargs=(resources, threads, backend)) as pool:
            rows = list(pool.map(_worker_row, cases, [cache] * n, [cached_only] * n))
    return [r for r in rows if r is not None]


# ---------------------------------------------------------------- analysis

def benefit(row: dict[str, Any], key: str) -> float:
    return row["n_ssim"][key] - row["n_ssim"]["none@0"]


def correlations(rows: list[dict[str, Any]], names: Sequence[str], key: str) -> dict[str, tuple[float, float]]:
    """signal → (Pearson r, Spearman ρ) with the benefit of policy ``key`` (nan when undefined)."""
    y = np.array([benefit(r, key) for r in rows])
    out = {}
    for name in names:
        x = np.array([r["signals"].get(name, np.nan) for r in rows], dtype=np.float64)
        ok = np.isfinite(x) & np.isfinite(y)
        if ok.sum() < 4 or np.std(x[ok]) == 0 or np.std(y[ok]) == 0:
            out[name] = (float("nan"), float("nan"))
        else:
            out[name] = (float(np.corrcoef(x[ok], y[ok])[0, 1]), float(stats.spearmanr(x[ok], y[ok]).statistic))
    return out


def groups(rows: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """Rows by 'family/channel' and pooled 'all/channel'."""
    out: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        out.setdefault(f"{cal.family_of(r['set'])}/{r['channel']}", []).append(r)
        out.setdefault(f"all/{r['channel']}", []).append(r)
    return dict(sorted(out.items()))


def print_tables(rows: list[dict[str, Any]]) -> None:
    """Per-case table, correlations, mean N-SSIM per policy, and the cost of the signals."""
    names = list(SEARCH_SIGNALS)
    keys = ["none@0", *SCORED, "gaussian", "off_sigma0"]
    print("per case: N-SSIM per policy (region@gate; off_sigma0: networks off without the output filter) and signals")
    print("\t".join(["set", "case", "sigma", *keys, *names]))
    for r in rows:
        cells = [r["set"], r["case"].replace("_angle.tif", ""), f"{r['sigma']:.2f}"]
        cells += [f"{r['n_ssim'][k]:.3f}" for k in keys] + [f"{r['signals'][n]:.3g}" for n in names]
        print("\t".join(cells))
    for key in ("none@1", "none@0.5"):
        print(f"\ncorrelation (Pearson r / Spearman rho) of each signal with the benefit of {key} over gate 0")
        print("\t".join(["group", "n", *names]))
        for name, members in groups(rows).items():
            corr = correlations(members, names, key)
            print("\t".join([name, str(len(members))] + [f"{corr[n][0]:+.2f}/{corr[n][1]:+.2f}" for n in names]))
    print("\ncost (CPU, this machine): mean seconds and share of the patch stage; signals_now: the current signals")
    print("(with the stage-2 correction's numpy resize to the diff grid, which the pipeline shares with the weight map)")
    parts = ("global", "global_flip", "patch", "probe", "signals", "resize", "signals_now")
    print("\t".join(["group", "n", *parts, "signals_now / patch: median, max"]))
    for name, members in groups(rows).items():
        mean = {p: np.mean([m["seconds"].get(p, np.nan) for m in members]) for p in parts}
        share = [m["seconds"]["signals_now"] / m["seconds"]["patch"] for m in members if "signals_now" in m["seconds"]]
        tail = f"{np.median(share):.1%}, {max(share):.1%}" if share else "-"
        print("\t".join([name, str(len(members)), *(f"{mean[p]:.2f} ({mean[p] / mean['patch']:.0%})" for p in parts), tail]))


# ---------------------------------------------------------------- cost


def cost(shape: Sequence[int], resources: Path, channel: str = "nucleus", seed: int = 0) -> dict[str, float]:
    """Seconds of :func:`fusemycells.trust.decide` (the manifest's ``channel`` policy; shipped rules need no
    network) on a synthetic float16 correction of ``shape`` (H, ZYX voxels), and of the weight map computed
    from the correction itself and from the coarse correction trust hands on (what the pipeline does)."""
    spec = load_manifest(resources).channel(channel)
    grid = spec.postprocess.diff_grid
    rng = np.random.default_rng(seed)
    correction = np.empty(tuple(int(n) for n in shape), dtype=np.float16)
    for z0 in range(0, correction.shape[0], 16):
        block = rng.standard_normal((min(16, correction.shape[0] - z0), *correction.shape[1:]), dtype=np.float32)
        correction[z0 : z0 + 16] = 0.05 * block
    coarse = rng.random(grid, dtype=np.float32)
    p1 = coarse + 0.1 * rng.random(grid, dtype=np.float32)
    trusted = replace(spec.trust, mode="case")
    decision = trust.decide(trusted, 0.02, coarse, p1, correction, grid, ops=OPS)
    started = time.perf_counter()
    postprocess.correction_weight(correction, spec.postprocess, ops=OPS)
    from_h = time.perf_counter() - started
    started = time.perf_counter()
    postprocess.correction_weight(decision.coarse_correction, spec.postprocess, ops=OPS)
    from_coarse = time.perf_counter() - started
    return {**decision.seconds, "weight_map_from_H": from_h, "weight_map_from_coarse": from_coarse}


# ---------------------------------------------------------------- command line


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--set", action="append", metavar="NAME=ROOT", help="a tuning set (repeat)")
    parser.add_argument("--cache", type=Path, help="folder for the per-case network outputs")
    parser.add_argument(
        "--cost", type=int, nargs=3, metavar=("Z", "Y", "X"), help="only time trust on a synthetic H of this size"
    )
    parser.add_argument("--resources", type=Path, default=DEFAULT_RESOURCES, help="weights folder (manifest.json)")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads per worker")
    parser.add_argument("--workers", type=int, default=1, help="cases run at once, each in its own process")
    parser.add_argument("--backend", default="auto", choices=["auto", "onnx", "torchscript"])
    parser.add_argument("--json", type=Path, default=None, help="write the per-case rows here")
    parser.add_argument("--sigma-scan", type=float, nargs="+", default=None, metavar="SIGMA", help="networks off: N-SSIM per output σ")
    parser.add_argument("--cached-only", action="store_true", help="score only the cases whose network outputs are cached")
    parser.add_argument("--networks-only", action="store_true", help="only run the networks into the cache")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)-7s %(message)s", datefmt="%H:%M:%S")
    if args.cost:
        print(json.dumps({k: round(v, 3) for k, v in cost(args.cost, args.resources).items()}))
        return 0
    if not args.set or args.cache is None:
        parser.error("--set and --cache are required (or --cost)")
    sets = parse_sets(args.set)
    if args.sigma_scan:
        rows = sigma_scan(sets, args.resources, args.sigma_scan)
        if args.json is not None:
            args.json.write_text(json.dumps(rows, indent=1))
        return 0
    if args.networks_only:
        log.info("%d cases' network outputs cached", networks_only(sets, args.resources, args.cache, args.threads, args.backend))
        return 0
    rows = study(
        sets, args.resources, args.cache, args.threads, args.backend, args.workers, args.cached_only
    )
    print_tables(rows)
    if args.json is not None:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
