#!/usr/bin/env python3
"""Per-case trust in the network correction (issue #14, item 3): offline study and calibration.

    python benchmarks/trust_study.py --set NAME=ROOT [--set NAME=ROOT ...] --cache DIR
        [--resources DIR] [--json FILE] [--calibrate [--write-manifest FILE]] [--margin 0.01]

Each ROOT is a simulated TUNING set, in either simulator's layout (``python -m training.simulate
--study tuning``: ``ROOT`` holds ``*_angle.tif`` beside ``*_fused.tif``; ``benchmarks/crosscheck_sim.py``:
``ROOT/images/...`` and ``ROOT/ground-truth``). Never pass a held-out set.

Per case the container's own steps (:class:`fusemycells.pipeline.Fuser`: prepare, global stage,
patch stage, weight map; CPU) compute once the network correction on H, its weight map at gate 1 and
the raw material of every trust signal of :mod:`fusemycells.trust` (a mirrored forward of the global
network, the patch flip probe on the pipeline's share of tiles), cached in ``DIR/<set>/<case>.npz``
(a rerun on the same weights only scores; delete the cache for new weights). Then it scores N-SSIM
(:mod:`fusemycells.metrics`) of the output the container would write for gates 0, ¼, ½, ¾, 1, each
without and with the region factor ('agreement'), and the shipped constant gate ('old'), and prints:
the per-case table, per set/channel the correlation (Pearson r / Spearman ρ) of each signal with the
benefit N-SSIM(gate g) − N-SSIM(gate 0), the mean N-SSIM per gate, and the cost of each signal.

``--calibrate`` chooses, per channel, the trust policy from the family "factor G (¼, ½, ¾, 1), with
or without the region factor, constant or when one signal is ≥ t (or ≤ t)": the family is the one
with the best leave-one-set-out benefit (thresholds fitted without a set, scored on it) among those
that keep every held-back case within ``--tolerance`` (0.02, the quality bar) of gate 0; its
threshold is then fitted on all sets, as the best mean benefit over gate 0 (sets weighted equally)
that puts no tuning case more than ``--margin`` below gate 0, even with the threshold moved
``--buffer`` standard deviations of the signal towards trusting more. No family gaining ≥ 0.002
held-back: networks off. Cases where the manifest's noise gate (``gate_knots``) skips the networks
count as networks off, as in the container. It prints each policy's tuning figures next to gates 0
and 1 and the old constant gate, and the leave-one-set-out figures. ``--write-manifest`` writes the
chosen policies into that manifest (``channels.<ch>.trust``, and ``provenance.trust_calibration``),
keeping everything else.

Recalibrating new weights: delete the cache (it holds the old networks' outputs), then run with the
same ``--set`` list, ``--calibrate --write-manifest resources/manifest.json``; ``--workers N`` runs
N cases at once.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import sys
import time
from collections.abc import Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
from scipy import stats

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from fusemycells import postprocess, trust  # noqa: E402
from fusemycells.budget import BudgetPolicy  # noqa: E402
from fusemycells.config import DEFAULT_RESOURCES, MANIFEST_NAME, Manifest, TrustSpec, load_manifest, trust_form  # noqa: E402
from fusemycells.deadline import Deadline  # noqa: E402
from fusemycells.evaluate import ground_truth_name, tiff_files  # noqa: E402
from fusemycells.io import read_volume  # noqa: E402
from fusemycells.metrics import metric_normalise, n_ssim, ssim  # noqa: E402
from fusemycells.pipeline import Fuser, HighRes, Prepared  # noqa: E402
from fusemycells.preprocess import ResizedSource  # noqa: E402
from fusemycells.report import CaseReport  # noqa: E402
from fusemycells.sources import materialise  # noqa: E402
from fusemycells.timing import Profile  # noqa: E402

log = logging.getLogger("trust_study")

INPUT_DIR = "images/fluorescence-lightsheet-3D-microscopy"
GT_DIR = "ground-truth"
GATES = (0.0, 0.25, 0.5, 0.75, 1.0)
REGIONS = ("none", "agreement")
CACHE_VERSION = 2


@dataclass
class Case:
    """One simulated case: its files and channel."""

    set_name: str
    name: str
    channel: str
    input_path: Path
    gt_path: Path


def find_cases(set_name: str, root: Path) -> list[Case]:
    """The (input, ground truth) pairs of a set (either simulator's layout)."""
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


def compute_artefacts(fuser: Fuser, case: Case, probe_fraction: float) -> dict[str, np.ndarray]:
    """The network outputs and trust raw material of one case, with the container's own steps.

    ``correction`` (H), ``weight`` (diff grid, gate 1), ``coarse``, ``p1``, ``p1_flip`` (global
    grid), ``probe`` (flip-probe sums: disagreement, correction, tiles), ``noise``, ``seconds``
    (global stage, its mirrored forward, patch stage, probe, signals and region factor, the
    correction's resize to the diff grid) and
    ``patches`` (forwards of the patch stage).
    """
    prepared, report = prepare(fuser, case)
    channel = prepared.channel
    assert channel.global_stage.grid is not None and channel.patch_stage.patch_size is not None
    started = time.perf_counter()
    x_h = ResizedSource(prepared.x_in, prepared.grid_h)
    coarse = materialise(ResizedSource(x_h, channel.global_stage.grid, cache=False))
    p1, stage = fuser._run_global(channel, coarse)
    global_s = time.perf_counter() - started
    started = time.perf_counter()
    p1_flip = trust.flipped(stage.runner(trust.flipped(coarse)[None, None])[0, 0])
    global_flip_s = time.perf_counter() - started
    high = HighRes(x_h, ResizedSource(p1, prepared.grid_h))
    started = time.perf_counter()
    correction = fuser._patch_stage(prepared, high, Deadline(None), report).astype(np.float32)
    patch_s = time.perf_counter() - started
    patches = int(report.stages["patch"]["patches"])
    started = time.perf_counter()
    probe = trust.flip_probe(
        fuser.patch_stage(channel).ladder,
        high.x_h,
        high.p1_h,
        correction,
        channel.patch_stage.patch_size,
        trust.probe_count(patches, probe_fraction),
        batch_size=channel.patch_stage.batch_size,
    )
    probe_s = time.perf_counter() - started
    extent_um = [n * s for n, s in zip(prepared.data.shape, prepared.spacing)]
    weight = postprocess.blend_weight(correction, prepared.x_in, prepared.post, 1.0, extent_um)
    grid = weight.shape
    started = time.perf_counter()
    c2 = trust.coarse_correction(correction, grid)  # shared with the weight map in the pipeline
    resize_s = time.perf_counter() - started
    started = time.perf_counter()
    x_d, p1_d = trust.on_grid(coarse, grid), trust.on_grid(p1, grid)
    trust.case_signals(prepared.noise, x_d, p1_d, c2, trust.foreground_mask(x_d, TrustSpec().foreground))
    trust.agreement_map(p1_d - x_d, c2, TrustSpec().region_sigma)
    signals_s = time.perf_counter() - started
    return {
        "version": np.int64(CACHE_VERSION),
        "correction": correction,
        "weight": weight,
        "coarse": coarse,
        "p1": p1,
        "p1_flip": p1_flip,
        "probe": np.array([probe.disagreement, probe.correction, probe.tiles], dtype=np.float64),
        "noise": np.float64(prepared.noise),
        "seconds": np.array([global_s, global_flip_s, patch_s, probe_s, signals_s, resize_s]),
        "patches": np.int64(patches),
    }


def load_or_compute(fuser: Fuser, case: Case, cache: Path, probe_fraction: float) -> dict[str, np.ndarray]:
    """The case's artefacts from ``cache`` when stored by this version, else computed and stored."""
    path = cache / case.set_name / (case.name.rsplit(".", 1)[0] + ".npz")
    if path.is_file():
        with np.load(path) as stored:
            if "version" in stored.files and int(stored["version"]) == CACHE_VERSION:
                return {k: stored[k] for k in stored.files}
    log.info("[%s/%s] running the networks", case.set_name, case.name)
    artefacts = compute_artefacts(fuser, case, probe_fraction)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, **artefacts)
    return artefacts


def signals_of(artefacts: dict[str, np.ndarray], spec: TrustSpec) -> dict[str, float]:
    """:func:`fusemycells.trust.case_signals` of a case from its artefacts, as :func:`fusemycells.trust.decide`
    measures them (on the weight map's grid)."""
    grid = artefacts["weight"].shape
    coarse = trust.on_grid(artefacts["coarse"], grid)
    dis, cor, tiles = artefacts["probe"]
    return trust.case_signals(
        float(artefacts["noise"]),
        coarse,
        trust.on_grid(artefacts["p1"], grid),
        trust.coarse_correction(artefacts["correction"], grid),
        trust.foreground_mask(coarse, spec.foreground),
        trust.on_grid(artefacts["p1_flip"], grid),
        trust.ProbeResult(float(dis), float(cor), int(tiles), int(tiles)),
    )


class Scorer:
    """N-SSIM of the container's output for one case and a weight map on the diff grid."""

    def __init__(self, fuser: Fuser, case: Case, correction: np.ndarray) -> None:
        self.case, _ = prepare(fuser, case)
        self.correction = correction
        self.gt = metric_normalise(read_volume(case.gt_path).data)
        self.ssim_input = ssim(metric_normalise(read_volume(case.input_path).data), self.gt)

    def score(self, weight: np.ndarray | None) -> float:
        """N-SSIM of the output blended with ``weight`` (None: networks off), as ``inference.py`` writes it."""
        case = self.case
        if weight is None:
            blended = case.x_in
        else:
            blended = postprocess.blend_slabs(case.data, case.x_in, self.correction, weight, compact=False)
        out = materialise(postprocess.final_source(blended, case.post, "float32", spacing=case.spacing))
        return n_ssim(ssim(metric_normalise(out), self.gt), self.ssim_input)


def score_case(fuser: Fuser, case: Case, artefacts: dict[str, np.ndarray], old_gate: float) -> dict[str, float]:
    """N-SSIM per '<region>@<gate>' (gate 0 once, as 'none@0') and for the old constant gate ('old')."""
    scorer = Scorer(fuser, case, artefacts["correction"])
    weight = artefacts["weight"]
    grid = weight.shape
    coarse, p1 = trust.on_grid(artefacts["coarse"], grid), trust.on_grid(artefacts["p1"], grid)
    c2 = trust.coarse_correction(artefacts["correction"], grid)
    region = trust.agreement_map(p1 - coarse, c2, TrustSpec().region_sigma)
    scores = {"none@0": scorer.score(None)}
    for gate in GATES[1:]:
        scores[f"none@{gate:g}"] = scorer.score(np.float32(gate) * weight)
        scores[f"agreement@{gate:g}"] = scorer.score(np.float32(gate) * weight * region)
    known = {f"none@{g:g}": g for g in GATES}
    match = next((k for k, g in known.items() if abs(g - old_gate) < 1e-6), None)
    scores["old"] = (
        scores[match] if match else (scorer.score(np.float32(old_gate) * weight) if old_gate > 0 else scores["none@0"])
    )
    return scores


def case_row(fuser: Fuser, shipped: Manifest, case: Case, cache: Path, probe_fraction: float) -> dict[str, Any]:
    """One case's row (set, case, channel, signals, N-SSIM per policy, seconds, patches), cached as JSON
    beside its artefacts (delete the cache folder after changing the weights or the scoring)."""
    path = cache / case.set_name / (case.name.rsplit(".", 1)[0] + ".row.json")
    if path.is_file():
        row = json.loads(path.read_text())
        if row.get("version") == CACHE_VERSION:
            return row
    artefacts = load_or_compute(fuser, case, cache, probe_fraction)
    noise = float(artefacts["noise"])
    old_gate = postprocess.adaptive_settings(noise, shipped.channel(case.channel).postprocess)[1]
    scores = score_case(fuser, case, artefacts, old_gate)
    parts = ("global", "global_flip", "patch", "probe", "signals", "resize")
    row = {
        "version": CACHE_VERSION,
        "set": case.set_name,
        "case": case.name,
        "channel": case.channel,
        "signals": signals_of(artefacts, TrustSpec()),
        "old_gate": old_gate,
        "n_ssim": scores,
        "seconds": dict(zip(parts, map(float, artefacts["seconds"]))),
        "patches": int(artefacts["patches"]),
        "probe_tiles": int(artefacts["probe"][2]),
    }
    path.write_text(json.dumps(row))
    log.info("[%s/%s] %s", case.set_name, case.name, " ".join(f"{k} {v:.3f}" for k, v in scores.items()))
    return row


_WORKER: dict[str, Any] = {}
"""A worker process's Fuser and manifest (built once per process by :func:`_init_worker`)."""


def _init_worker(resources: Path, threads: int, backend: str) -> None:
    logging.getLogger("fusemycells").setLevel(logging.ERROR)
    shipped = load_manifest(resources)
    _WORKER["shipped"] = shipped
    _WORKER["fuser"] = Fuser(ungated(shipped), BudgetPolicy.create("cpu", None, None, threads), backend=backend)


def _worker_row(case: Case, cache: Path, probe_fraction: float) -> dict[str, Any]:
    return case_row(_WORKER["fuser"], _WORKER["shipped"], case, cache, probe_fraction)


def study(
    sets: dict[str, Path], resources: Path, cache: Path, probe_fraction: float, threads: int, backend: str, workers: int
) -> list[dict[str, Any]]:
    """The rows of every case of ``sets``, ``workers`` cases at a time (each with ``threads`` threads)."""
    cases = [case for name, root in sets.items() for case in find_cases(name, root)]
    if workers <= 1:
        _init_worker(resources, threads, backend)
        return [_worker_row(case, cache, probe_fraction) for case in cases]
    with ProcessPoolExecutor(workers, initializer=_init_worker, initargs=(resources, threads, backend)) as pool:
        return list(pool.map(_worker_row, cases, [cache] * len(cases), [probe_fraction] * len(cases)))


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
    """Rows by 'set/channel' and pooled 'all/channel'."""
    out: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        out.setdefault(f"{r['set']}/{r['channel']}", []).append(r)
        out.setdefault(f"all/{r['channel']}", []).append(r)
    return dict(sorted(out.items()))


def print_tables(rows: list[dict[str, Any]]) -> None:
    """Per-case table, correlations, mean N-SSIM per policy, and the cost of the signals."""
    names = list(trust.SIGNALS)
    keys = ["none@0", *(f"none@{g:g}" for g in GATES[1:]), *(f"agreement@{g:g}" for g in GATES[1:]), "old"]
    print("per case: N-SSIM per policy (region@gate) and signals")
    print("\t".join(["set", "case", *keys, *names]))
    for r in rows:
        cells = [r["set"], r["case"].replace("_angle.tif", "")]
        cells += [f"{r['n_ssim'][k]:.3f}" for k in keys] + [f"{r['signals'][n]:.3g}" for n in names]
        print("\t".join(cells))
    for key in ("none@1", "none@0.5", "agreement@0.5"):
        print(f"\ncorrelation (Pearson r / Spearman rho) of each signal with the benefit of {key} over gate 0")
        print("\t".join(["group", "n", *names]))
        for name, members in groups(rows).items():
            corr = correlations(members, names, key)
            print("\t".join([name, str(len(members))] + [f"{corr[n][0]:+.2f}/{corr[n][1]:+.2f}" for n in names]))
    print("\nmean N-SSIM per policy (min over cases in brackets)")
    print("\t".join(["group", "n", *keys]))
    for name, members in groups(rows).items():
        cells = [
            f"{np.mean([m['n_ssim'][k] for m in members]):.3f} ({min(m['n_ssim'][k] for m in members):.3f})"
            for k in keys
        ]
        print("\t".join([name, str(len(members)), *cells]))
    print("\ncost (CPU, this machine): mean seconds and share of the patch stage")
    parts = ("global", "global_flip", "patch", "probe", "signals", "resize")
    print("\t".join(["group", "n", *parts, "probe tiles / patches"]))
    for name, members in groups(rows).items():
        mean = {p: np.mean([m["seconds"][p] for m in members]) for p in parts}
        cells = [f"{mean[p]:.2f} ({mean[p] / mean['patch']:.0%})" for p in parts]
        ratio = np.mean([m["probe_tiles"] / max(m["patches"], 1) for m in members])
        print("\t".join([name, str(len(members)), *cells, f"{ratio:.2f}"]))


# ---------------------------------------------------------------- calibration


@dataclass(frozen=True)
class Policy:
    """A candidate trust policy: region factor, and one step rule (or none) with factor ``gate``."""

    region: str
    gate: float
    signal: str | None = None
    above: bool = True  # trust when the signal is ≥ threshold (else ≤)
    threshold: float = 0.0

    def factor(self, row: dict[str, Any]) -> float:
        """The factor on a case's correction; 0 where the manifest's noise gate skips the networks."""
        if row.get("old_gate", 1.0) <= 0.0:
            return 0.0  # postprocess.gate_knots: the networks do not run at all (pipeline._networks_wanted)
        if self.signal is None:
            return self.gate
        value = row["signals"][self.signal]
        return self.gate if (value >= self.threshold if self.above else value <= self.threshold) else 0.0

    def key(self, row: dict[str, Any]) -> str:
        factor = self.factor(row)
        return "none@0" if factor == 0 else f"{self.region}@{factor:g}"

    def family(self) -> tuple[str, float, str | None, bool]:
        return (self.region, self.gate, self.signal, self.above)

    def spec(self) -> TrustSpec:
        """The manifest form: a step at the threshold (a ramp 1e-4 wide, outside the trusted side)."""
        if self.signal is None:
            return TrustSpec(mode="case", rules=(("noise", ((0.0, self.gate),)),), region=self.region)
        t = self.threshold
        if self.above:
            knots = ((round(t - 1e-4, 6), 0.0), (t, self.gate))
        else:
            knots = ((t, self.gate), (round(t + 1e-4, 6), 0.0))
        return TrustSpec(mode="case", rules=((self.signal, knots),), region=self.region)

    def describe(self) -> str:
        if self.signal is None or self.gate == 0:
            return f"constant factor {self.gate:g}" + (f", region {self.region}" if self.gate else " (networks off)")
        side = "≥" if self.above else "≤"
        return f"factor {self.gate:g} when {self.signal} {side} {self.threshold:.4g} (else 0), region {self.region}"


OFF = Policy("none", 0.0)


def evaluate(policy: Policy, rows: list[dict[str, Any]]) -> tuple[float, float]:
    """(mean benefit over gate 0 with every set weighted equally, worst benefit of a case)."""
    if not rows:
        return 0.0, 0.0
    per_set: dict[str, list[float]] = {}
    for r in rows:
        per_set.setdefault(r["set"], []).append(benefit(r, policy.key(r)))
    return float(np.mean([np.mean(v) for v in per_set.values()])), float(min(min(v) for v in per_set.values()))


def families(signals: Iterable[str] = trust.SIGNALS) -> list[tuple[str, float, str | None, bool]]:
    """(region, gate, signal or None, above) of every policy family: constant factors and step rules."""
    out: list[tuple[str, float, str | None, bool]] = [(r, g, None, True) for r in REGIONS for g in GATES[1:]]
    out += list(itertools.product(REGIONS, GATES[1:], signals, (True, False)))
    return out


def fit_family(
    family: tuple[str, float, str | None, bool], rows: list[dict[str, Any]], margin: float, buffer: float
) -> Policy:
    """The family's policy with the best mean benefit on ``rows`` among the *safe* ones (``OFF`` if none).

    Safe: no case more than ``margin`` below gate 0, also with the threshold moved ``buffer`` standard
    deviations of the signal towards trusting more (a threshold that only just separates the harmed
    cases from the helped ones on a handful of tuning cases does not hold on new ones). Thresholds
    are the midpoints between the cases' signal values.
    """
    region, gate, signal, above = family
    if signal is None:
        policy = Policy(region, gate)
        return policy if evaluate(policy, rows)[1] >= -margin else OFF
    values = np.array([r["signals"][signal] for r in rows if signal in r["signals"]])
    if values.size < 2:
        return OFF
    shift = buffer * float(values.std()) * (-1.0 if above else 1.0)
    unique = np.unique(values)
    best, best_mean = OFF, 0.0
    for lo, hi in zip(unique[:-1], unique[1:]):
        t = float(np.round((lo + hi) / 2.0, 4))  # a readable threshold, strictly between the two cases
        t = t if lo < t < hi else float((lo + hi) / 2.0)
        policy = Policy(region, gate, signal, above, float(t))
        mean, worst = evaluate(policy, rows)
        if worst < -margin or mean <= best_mean + 1e-9:
            continue
        if evaluate(replace(policy, threshold=float(t) + shift), rows)[1] >= -margin:
            best, best_mean = policy, mean
    return best


@dataclass
class Calibration:
    """The chosen policy of a channel and its leave-one-set-out figures."""

    policy: Policy
    loso_mean: float  # mean over held-back sets of the mean benefit over gate 0
    loso_worst: float  # worst benefit of a held-back case
    per_set: dict[str, tuple[str, float, float]]  # held-back set → (policy fitted without it, mean, worst)


def leave_one_set_out(
    family: tuple[str, float, str | None, bool], rows: list[dict[str, Any]], margin: float, buffer: float
) -> Calibration:
    """Fit the family without each set in turn and score the held-back set (an honest estimate)."""
    per_set = {}
    for held in sorted({r["set"] for r in rows}):
        policy = fit_family(family, [r for r in rows if r["set"] != held], margin, buffer)
        gains = [benefit(r, policy.key(r)) for r in rows if r["set"] == held]
        per_set[held] = (policy.describe(), float(np.mean(gains)), float(min(gains)))
    means = [v[1] for v in per_set.values()]
    worst = min((v[2] for v in per_set.values()), default=0.0)
    return Calibration(
        fit_family(family, rows, margin, buffer), float(np.mean(means)) if means else 0.0, worst, per_set
    )


def calibrate(
    rows: list[dict[str, Any]], margin: float, tolerance: float = 0.02, buffer: float = 0.25, min_gain: float = 0.002
) -> Calibration:
    """Choose a channel's policy: the family with the best leave-one-set-out mean benefit among those whose
    held-back cases all stay within ``tolerance`` of gate 0 (the quality bar), fitted on every set; networks
    off (``OFF``) unless that mean is at least ``min_gain``. With one set, the family's in-sample fit.
    """
    if len({r["set"] for r in rows}) < 2:
        fits = [fit_family(f, rows, margin, buffer) for f in families()]
        best = max(fits, key=lambda p: evaluate(p, rows)[0], default=OFF)
        gain = evaluate(best, rows)[0]
        return Calibration(best if gain >= min_gain else OFF, gain, evaluate(best, rows)[1], {})
    best = Calibration(OFF, 0.0, 0.0, {})
    for family in families():
        result = leave_one_set_out(family, rows, margin, buffer)
        if result.loso_worst >= -tolerance and result.loso_mean > max(best.loso_mean, min_gain - 1e-12) + 1e-9:
            best = result
    return best


def report_policy(name: str, rows: list[dict[str, Any]], calibration: Calibration) -> None:
    """The policy's tuning figures per set next to gates 0 and 1 and the old gate, and its leave-one-set-out check."""
    policy = calibration.policy
    print(f"\n{name}: {policy.describe()}")
    head = ["set", "n", "gate 0 mean/min", "gate 1 mean/min", "old gate mean/min", "policy mean/min", "worst vs gate 0"]
    print("\t".join([*head, "trusted"]))
    by_set: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        by_set.setdefault(r["set"], []).append(r)
    for set_name, members in [*by_set.items(), ("all", rows)]:
        keys = [policy.key(m) for m in members]

        def cell(keys: list[str], members: list[dict[str, Any]] = members) -> str:
            values = [m["n_ssim"][k] for m, k in zip(members, keys)]
            return f"{np.mean(values):.3f} / {min(values):.3f}"

        worst = min(benefit(m, k) for m, k in zip(members, keys))
        n = len(members)
        cells = [cell(["none@0"] * n), cell(["none@1"] * n), cell(["old"] * n), cell(keys), f"{worst:+.3f}"]
        print("\t".join([set_name, str(n), *cells, f"{sum(k != 'none@0' for k in keys)}/{n}"]))
    if calibration.per_set:
        print(f"leave-one-set-out: mean benefit {calibration.loso_mean:+.4f}, worst case {calibration.loso_worst:+.3f}")
        for held, (described, mean, worst) in calibration.per_set.items():
            print(f"  without {held}: {described}; on {held}: mean {mean:+.4f}, worst {worst:+.3f}")


def write_manifest(path: Path, policies: dict[str, Policy], provenance: dict[str, Any]) -> None:
    """Put each channel's policy into the manifest at ``path`` (``channels.<ch>.trust``), keeping the rest."""
    raw = json.loads(path.read_text())
    for channel, policy in policies.items():
        if channel in raw.get("channels", {}):
            raw["channels"][channel]["trust"] = trust_form(policy.spec())
    raw.setdefault("provenance", {})["trust_calibration"] = provenance
    path.write_text(json.dumps(raw, indent=2, ensure_ascii=False) + "\n")


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
    decision = trust.decide(trusted, 0.02, coarse, p1, correction, grid)
    started = time.perf_counter()
    postprocess.correction_weight(correction, spec.postprocess)
    from_h = time.perf_counter() - started
    started = time.perf_counter()
    postprocess.correction_weight(decision.coarse_correction, spec.postprocess)
    from_coarse = time.perf_counter() - started
    return {**decision.seconds, "weight_map_from_H": from_h, "weight_map_from_coarse": from_coarse}


# ---------------------------------------------------------------- command line


def parse_sets(values: list[str]) -> dict[str, Path]:
    sets = {}
    for value in values:
        name, _, root = value.partition("=")
        if not root:
            raise SystemExit(f"--set expects NAME=ROOT, got {value!r}")
        sets[name] = Path(root)
    return sets


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
    parser.add_argument("--probe-fraction", type=float, default=TrustSpec().probe_fraction)
    parser.add_argument("--json", type=Path, default=None, help="write the per-case rows here")
    parser.add_argument("--calibrate", action="store_true", help="choose the policy per channel")
    parser.add_argument("--margin", type=float, default=0.01, help="largest drop below gate 0 allowed on a tuning case")
    parser.add_argument("--tolerance", type=float, default=0.02, help="largest drop allowed on a held-back case")
    parser.add_argument("--buffer", type=float, default=0.25, help="threshold shift (signal σ) that must stay safe")
    parser.add_argument(
        "--write-manifest", type=Path, default=None, help="write the chosen policies into this manifest"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)-7s %(message)s", datefmt="%H:%M:%S")
    if args.cost:
        print(json.dumps({k: round(v, 3) for k, v in cost(args.cost, args.resources).items()}))
        return 0
    if not args.set or args.cache is None:
        parser.error("--set and --cache are required (or --cost)")
    sets = parse_sets(args.set)
    rows = study(sets, args.resources, args.cache, args.probe_fraction, args.threads, args.backend, args.workers)
    print_tables(rows)
    if args.json is not None:
        args.json.write_text(json.dumps(rows, indent=1))
    if args.calibrate:
        chosen = {}
        for channel in sorted({r["channel"] for r in rows}):
            mine = [r for r in rows if r["channel"] == channel]
            chosen[channel] = calibrate(mine, args.margin, args.tolerance, args.buffer)
            report_policy(channel, mine, chosen[channel])
        if args.write_manifest is not None:
            shipped = load_manifest(args.resources)
            provenance = {
                "command": "benchmarks/trust_study.py --calibrate",
                "date": time.strftime("%Y-%m-%d"),
                "weights_sha256": {  # the networks this calibration is for (first 12 hex digits per stage file)
                    name: sorted(f.sha256[:12] for st in (ch.global_stage, ch.patch_stage) for f in st.files.values())
                    for name, ch in shipped.channels.items()
                },
                "sets": sorted(sets),
                "cases": len(rows),
                "margin": args.margin,
                "tolerance": args.tolerance,
                "buffer": args.buffer,
                "policies": {ch: c.policy.describe() for ch, c in chosen.items()},
                "leave_one_set_out": {ch: [round(c.loso_mean, 4), round(c.loso_worst, 4)] for ch, c in chosen.items()},
            }
            target = args.write_manifest / MANIFEST_NAME if args.write_manifest.is_dir() else args.write_manifest
            write_manifest(target, {ch: c.policy for ch, c in chosen.items()}, provenance)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
