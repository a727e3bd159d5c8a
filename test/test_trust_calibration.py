"""Leave-one-family-out calibration of the per-case trust (training/trust_calibration.py), its writing
into the manifest (training/calibrate_trust.py) and the output filter's σ on clean stacks (issue #24)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from fusemycells import trust
from fusemycells.config import TrustSpec
from training import trust_calibration as cal

BENCHMARKS = str(Path(__file__).resolve().parent.parent / "benchmarks")  # scripts, not a package

KEYS = ("none@0.25", "none@0.5", "none@1")
SEARCH = cal.Search(keys=KEYS, signals=("noise", "hf"))


def _row(set_name: str, hf: float, gain: float, noise: float = 0.05) -> dict:
    """A case whose full-weight correction gains ``gain`` over networks off (linearly less at lower gates)."""
    scores = {"none@0": 0.3} | {key: 0.3 + gain * float(key.split("@")[1]) for key in KEYS}
    return {"set": set_name, "channel": "nucleus", "signals": {"hf": hf, "noise": noise}, "old_gate": 1.0, "n_ssim": scores}


def _table() -> list[dict]:
    """Three families; the correction helps (+0.2) where the case is degraded (hf < 0.3) and harms (−0.4)
    where it is clean (hf > 0.5); noise says nothing."""
    rng = np.random.default_rng(7)
    rows = []
    for fam in ("ours800", "ours805", "xc31337", "near"):
        for _ in range(4):
            degraded = rng.random() < 0.5 if fam != "near" else False
            hf = rng.uniform(0.05, 0.25) if degraded else rng.uniform(0.55, 0.9)
            rows.append(_row(fam, hf, 0.2 if degraded else -0.4, float(rng.uniform(0.005, 0.1))))
    return rows


def test_the_fitted_policy_trusts_degraded_cases_and_keeps_clean_ones_at_networks_off() -> None:
    rows = _table()
    policy = cal.fit(rows, SEARCH, margin=0.03, buffer=0.0)
    assert policy.key == "none@1" and [(c.signal, c.above) for c in policy.conditions] == [("hf", False)]
    assert 0.25 < policy.conditions[0].threshold < 0.55
    # both directions, through the container's own rule code (the manifest form of the policy)
    rules = policy.rules()
    helped, harmed = _row("new", 0.1, 0.2), _row("new", 0.8, -0.4)
    assert trust.case_factor(helped["signals"], rules)[0] == 1.0
    assert trust.case_factor(harmed["signals"], rules)[0] == 0.0
    assert cal.benefits([helped, harmed], policy).tolist() == pytest.approx([0.2, 0.0])
    # where the manifest's noise gate skips the networks the container writes networks off
    assert policy.key_for(helped | {"old_gate": 0.0}) == "none@0"


def test_the_ceiling_is_a_perfect_case_choice_that_no_fitted_policy_beats() -> None:
    rows = [_row("a", 0.1, 0.2), _row("a", 0.8, -0.4), _row("b", 0.2, 0.1), _row("b", 0.3, 0.3)]
    rows.append(_row("b", 0.1, 0.5) | {"old_gate": 0.0})  # the noise gate skips the networks: nothing to gain
    best = cal.ceiling(rows, KEYS)
    # per case the best gate's gain over networks off, 0 where every gate harms; families weighted equally
    assert best == pytest.approx({"a": (0.2 + 0.0) / 2, "b": (0.1 + 0.3 + 0.0) / 3, "mean": (0.1 + 0.4 / 3) / 2})
    assert cal.ceiling(rows, ("none@0.25",))["a"] == pytest.approx(0.05 / 2)  # only the offered factors count
    policy = cal.fit(rows, SEARCH, margin=0.03, buffer=0.0)
    assert policy != cal.OFF and cal.summary(rows, policy)[0] <= best["mean"] + 1e-12


def test_nothing_safe_means_networks_off() -> None:
    rows = [_row(f, 0.5, -0.2) for f in ("a", "b") for _ in range(3)]
    assert cal.fit(rows, SEARCH) == cal.OFF
    assert cal.OFF.rules() == {"noise": ((0.0, 0.0),)} and cal.OFF.describe() == "networks off"


def test_leave_one_family_out_fits_without_the_family_and_is_reproducible() -> None:
    rows = _table()
    first = cal.leave_one_family_out(rows, SEARCH, guard=False, margin=0.03, buffer=0.0)
    again = cal.leave_one_family_out(rows, SEARCH, guard=False, margin=0.03, buffer=0.0)
    assert first.policy == again.policy
    assert {k: (p, g.tolist()) for k, (p, g) in first.held_out.items()} == {
        k: (p, g.tolist()) for k, (p, g) in again.held_out.items()
    }
    assert set(first.held_out) == {"ours", "xc", "near"}  # ours800 and ours805 are one family
    for fam, (policy, gains) in first.held_out.items():
        without = [r for r in rows if cal.family_of(r["set"]) != fam]
        assert policy == cal.fit(without, SEARCH, margin=0.03, buffer=0.0)
        held = [r for r in rows if cal.family_of(r["set"]) == fam]
        assert gains.tolist() == pytest.approx(cal.benefits(held, policy).tolist())
    # the held-out family's own scores never enter its policy: change them, its policy stays
    changed = [r if cal.family_of(r["set"]) != "near" else _row("near", r["signals"]["hf"], 0.9) for r in rows]
    again = cal.leave_one_family_out(changed, SEARCH, guard=False, margin=0.03, buffer=0.0)
    assert again.held_out["near"][0] == first.held_out["near"][0]
    # guarded: each held-out family is scored by the whole guarded procedure run without it
    guarded = cal.leave_one_family_out(rows, SEARCH, margin=0.03, buffer=0.0)
    for fam, (policy, _) in guarded.held_out.items():
        without = [r for r in rows if cal.family_of(r["set"]) != fam]
        assert policy == cal.leave_one_family_out(without, SEARCH, nested=False, margin=0.03, buffer=0.0).policy


def test_the_guard_ships_networks_off_when_the_fit_does_not_hold_on_unseen_families() -> None:
    # low hf helps in families a-c; in d it harms, and only d's noise tells its cases apart: a fit on all
    # families finds "hf low and noise low", a fit without d has no reason to look at the noise
    rows = [_row(f, hf, 0.2, 0.02) for f in "abc" for hf in (0.1, 0.2)] + [_row(f, 0.8, -0.2, 0.02) for f in "abc"]
    rows += [_row("d", hf, -0.3, 0.08) for hf in (0.1, 0.2)] + [_row("d", 0.15, 0.2, 0.02)]
    unguarded = cal.leave_one_family_out(rows, SEARCH, guard=False, margin=0.03, buffer=0.0)
    assert unguarded.fitted != cal.OFF and unguarded.loso()[1] < 0  # a fit exists, but it loses on a held-out family
    guarded = cal.leave_one_family_out(rows, SEARCH, margin=0.03, buffer=0.0)
    assert guarded.policy == cal.OFF
    assert guarded.fitted == unguarded.fitted and guarded.fitted_loso == unguarded.loso()  # what the guard judged, for the record


def test_a_constant_factor_ships_when_threshold_rules_overfit_but_the_constant_holds_on_unseen_families() -> None:
    # every case gains a little at ¼; in a-c the full correction also pays where hf is low, in d it harms there
    # and only d's noise tells its cases apart (as in the guard test above): thresholds fitted without d lose on
    # d, the constant ¼ gains in every family
    def row(fam: str, hf: float, full: float, quarter: float, noise: float = 0.02) -> dict:
        scores = {"none@0": 0.3, "none@0.25": 0.3 + quarter, "none@0.5": 0.3 + full / 2, "none@1": 0.3 + full}
        return {"set": fam, "channel": "membrane", "signals": {"hf": hf, "noise": noise}, "old_gate": 1.0, "n_ssim": scores}

    rows = [row(f, hf, 0.3, 0.04) for f in "abc" for hf in (0.1, 0.2)] + [row(f, 0.8, -0.2, 0.01) for f in "abc"]
    rows += [row("d", hf, -0.3, 0.03, 0.08) for hf in (0.1, 0.2)] + [row("d", 0.15, 0.3, 0.04)]
    plain = cal.leave_one_family_out(rows, SEARCH, guard=False, margin=0.03, buffer=0.0)
    assert plain.fitted.conditions and plain.loso()[1] < 0  # the threshold rule loses on d when d is held out
    guarded = cal.leave_one_family_out(rows, SEARCH, margin=0.03, buffer=0.0)
    assert guarded.policy == cal.Policy("none@0.25", ()) and guarded.policy.describe().endswith("(constant)")
    for fam, (policy, _) in guarded.held_out.items():  # each family is scored by the ladder run without it
        assert policy == cal.procedure([r for r in rows if r["set"] != fam], SEARCH, margin=0.03, buffer=0.0)
    assert guarded.held_out["d"][0].conditions  # without d nothing speaks against the thresholds: honest, d loses
    assert cal.procedure(rows, cal.Search(keys=KEYS, signals=("noise", "hf"), max_conditions=0), margin=0.03, buffer=0.0) == guarded.policy


def test_a_threshold_that_only_just_separates_the_cases_is_refused_by_the_buffer() -> None:
    rows = [_row("a", 0.20, 0.2), _row("a", 0.21, -0.3), _row("a", 0.9, -0.3), _row("a", 0.05, 0.2)]
    assert cal.fit(rows, SEARCH, margin=0.03, buffer=0.0).conditions[0].threshold == pytest.approx(0.205)
    # 0.205 moved 0.25 σ of hf (0.08) towards trusting takes the harmed case at 0.21: the next threshold down
    assert cal.fit(rows, SEARCH, margin=0.03, buffer=0.25).conditions[0].threshold == pytest.approx(0.125)


def test_two_conditions_become_two_rules_whose_minimum_is_the_gate_only_when_both_hold() -> None:
    policy = cal.Policy("none@0.5", (cal.Condition("hf", False, 0.3), cal.Condition("noise", True, 0.01)))
    rules = policy.rules()
    assert trust.case_factor({"hf": 0.2, "noise": 0.02}, rules)[0] == 0.5
    assert trust.case_factor({"hf": 0.4, "noise": 0.02}, rules)[0] == 0.0
    assert trust.case_factor({"hf": 0.2, "noise": 0.005}, rules)[0] == 0.0


def _stack(noise_sigma: float, seed: int = 0) -> np.ndarray:
    """uint16 ZYX: smooth bright blobs on a dark background plus white noise of ``noise_sigma`` ADU."""
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    shape = (16, 64, 64)
    spots = np.zeros(shape, dtype=np.float32)
    spots[tuple(rng.integers(0, n, 40) for n in shape)] = 1.0
    clean = 100.0 + 4000.0 * ndimage.gaussian_filter(spots, (1.0, 3.0, 3.0)) / 0.01
    return np.clip(clean + rng.normal(0.0, noise_sigma, shape), 0, 65535).astype(np.uint16)


def test_the_shipped_nucleus_output_filter_is_off_on_a_clean_stack_and_on_for_a_noisy_one() -> None:
    from fusemycells.config import DEFAULT_RESOURCES, load_manifest
    from fusemycells.postprocess import adaptive_settings, relative_noise

    spec = load_manifest(DEFAULT_RESOURCES).channel("nucleus").postprocess
    clean, noisy = _stack(1.0), _stack(400.0)
    assert relative_noise(clean) < 0.008 < 0.02 < relative_noise(noisy)
    assert adaptive_settings(relative_noise(clean), spec)[0] == 0.0  # little noise: the filter only blurs
    assert adaptive_settings(relative_noise(noisy), spec)[0] > 0.5
    # (membranes keep v3's σ 0.4: on clean membrane stacks it cost at most 0.026, a floor cost 0.18 on a
    # noisier one; docs/quality.md)


def _blurred_spots(seed: int, shape: tuple[int, int, int], count: int) -> np.ndarray:
    """A sharp stack of ``count`` random point sources (ZYX, Gaussian σ 0.8 voxels), its 99.8th percentile at 1."""
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    spots = np.zeros(shape, dtype=np.float32)
    spots[tuple(rng.integers(2, n - 2, count) for n in shape)] = 1.0
    clean = ndimage.gaussian_filter(spots, 0.8)
    return clean / np.percentile(clean, 99.8)


def test_degradation_signals_see_depth_dependent_blur_along_any_axis_and_not_on_a_clean_stack() -> None:
    from scipy import ndimage

    shape = (48, 48, 48)
    clean = _blurred_spots(3, shape, 300)
    mask = trust.foreground_mask(clean, 0.1)
    flat = trust.degradation_signals(clean, mask)
    assert flat["asym"] < 0.3
    for axis in range(3):
        # a light sheet entering at index 0 of ``axis``: blur grows and intensity falls with depth
        blurred = [ndimage.gaussian_filter(clean, s) for s in (0.0, 1.0, 2.0)]
        depth = np.arange(shape[axis]).reshape([-1 if a == axis else 1 for a in range(3)]) / (shape[axis] - 1)
        level = np.clip(depth * 2.0, 0.0, 2.0)
        degraded = np.where(level < 1, (1 - level) * blurred[0] + level * blurred[1], (2 - level) * blurred[1] + (level - 1) * blurred[2])
        degraded = (degraded * np.exp(-1.5 * depth)).astype(np.float32)
        degraded /= np.percentile(degraded, 99.8)
        signals = trust.degradation_signals(degraded, trust.foreground_mask(degraded, 0.1))
        assert signals["asym"] > 1.0 > flat["asym"] + 0.5, axis
        assert signals["hf"] < flat["hf"], axis


def test_the_shipped_trust_never_corrects_a_clean_stack_where_it_was_calibrated_with_the_clean_prior() -> None:
    """Channels calibrated with the clean-stack prior (provenance ``clean_noise`` > 0: nuclei) never correct a
    stack below that noise, whatever its other signals say. (Membranes were calibrated without it since v4c:
    their rule fitted without the near-identity family gains there; docs/quality.md.)"""
    import json

    from fusemycells.config import DEFAULT_RESOURCES, MANIFEST_NAME, load_manifest

    record = json.loads((DEFAULT_RESOURCES / MANIFEST_NAME).read_text())["provenance"]["trust_calibration"]
    with_prior = [ch for ch, level in record["clean_noise"].items() if level > 0]
    assert "nucleus" in with_prior and all(record["clean_noise"][ch] >= 0.010 for ch in with_prior)
    for channel in with_prior:
        _never_corrects_clean(load_manifest(DEFAULT_RESOURCES).channel(channel).trust)


def _never_corrects_clean(spec: TrustSpec) -> None:
    """Factor 0 at every noise below 0.010 for any combination of the other signals (0, 1.2, 50)."""
    import itertools

    assert spec.mode == "case"
    rules = dict(spec.rules)
    grid = {name: (0.0, 1.2, 50.0) for name in trust.SIGNALS if name != "noise"}
    for values in itertools.product(*grid.values()):
        signals = dict(zip(grid, values))
        for noise in (0.0, 0.004, 0.008, 0.0099):  # below 0.010 < training.calibrate_trust.CLEAN_NOISE: clean
            assert trust.case_factor(signals | {"noise": noise}, rules)[0] == 0.0, (signals, noise)


def test_the_candidate_degradation_signals_see_axial_blur_and_a_fall_along_the_light_path() -> None:
    from scipy import ndimage

    sys.path.insert(0, BENCHMARKS)
    import trust_signals

    shape = (40, 40, 40)
    clean = _blurred_spots(5, shape, 250)
    sharp = trust_signals.candidates(clean)
    axial = ndimage.gaussian_filter(clean, (2.5, 0.0, 0.0))  # an elongated axial PSF: Z blurred only
    axial /= np.percentile(axial, 99.8)
    blurred_z = trust_signals.candidates(axial)
    assert 0.6 < sharp["axlat"] < 1.6 and blurred_z["axlat"] < 0.5 * sharp["axlat"]
    assert blurred_z["hf"] < sharp["hf"] and blurred_z["fall"] < 0.5
    # the far half along X blurred laterally (light entering at x = 0): the fall is along X, not Z
    far = clean.copy()
    far[:, :, 20:] = ndimage.gaussian_filter(clean, (0.0, 2.0, 2.0))[:, :, 20:]
    far /= np.percentile(far, 99.8)
    side = trust_signals.candidates(far)
    assert side["fall"] > 1.0 > sharp["fall"] + 0.5 and side["fallz"] < 0.5


def test_the_foreground_region_keeps_the_networks_off_where_little_of_the_neighbourhood_is_foreground() -> None:
    sys.path.insert(0, BENCHMARKS)
    import trust_regions

    coarse = np.zeros((24, 24, 24), dtype=np.float32)
    coarse[:, :, :12] = 0.5  # a dense half and an empty half
    coarse[:, :, 20] = 0.5  # one thin sheet in the empty half: little foreground around it
    region = trust_regions.foreground_map(coarse)
    assert region.dtype == np.float32 and region.shape == coarse.shape
    assert region[:, :, :8].min() == 1.0 and region[:, :, 15:18].max() == 0.0
    assert region[:, :, 20].max() < 0.9  # a thin structure alone is not trusted in full


def _study_row(set_name: str, channel: str, hf: float, gain: float, noise: float) -> dict:
    """A row as ``benchmarks/trust_study.py --json`` writes it: N-SSIM of every key the calibration and its
    table read, under both SSIM conventions (the same here)."""
    row = _row(set_name, hf, gain, noise)
    from training.calibrate_trust import SEARCH_SIGNALS

    n = row["n_ssim"]
    scores = n | {"agreement@0.25": n["none@0.25"], "agreement@0.5": n["none@0.5"], "gaussian": 0.2}
    signals = dict.fromkeys(SEARCH_SIGNALS, 1.0) | row["signals"]  # the others say nothing
    return row | {"channel": channel, "signals": signals, "n_ssim": scores, "n_ssim_gaussian_window": dict(scores)}


def test_the_calibration_writes_only_the_trust_blocks_and_their_record_into_the_manifest(
    fixture_resources: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import json
    import shutil

    from fusemycells.config import load_manifest
    from training import calibrate_trust

    rng = np.random.default_rng(3)
    rows = []
    for fam in ("ours800", "xc31337", "near", "organoid"):
        for degraded in (True, False, True, False):  # nuclei: the correction helps degraded noisy stacks only
            hf = rng.uniform(0.05, 0.25) if degraded else rng.uniform(0.55, 0.9)
            rows.append(_study_row(fam, "nucleus", hf, 0.2 if degraded else -0.4, float(rng.uniform(0.02, 0.1))))
    resources = tmp_path / "res"
    shutil.copytree(fixture_resources, resources)
    before = json.loads((resources / "manifest.json").read_text())
    (tmp_path / "rows.json").write_text(json.dumps(rows))
    sets = ["--set", "ours800=/x:2", "--set", "xc31337=/y", "--set", "near=/z:1", "--set", "organoid=/w"]
    args = ["--rows", str(tmp_path / "rows.json"), *sets, "--resources", str(resources)]
    assert calibrate_trust.main([*args, "--table", str(tmp_path / "t.md"), "--write-manifest", str(resources)]) == 0
    after = json.loads((resources / "manifest.json").read_text())
    nucleus = load_manifest(resources).channel("nucleus").trust
    assert nucleus.mode == "case" and trust.case_factor({"noise": 0.05, "hf": 0.1}, dict(nucleus.rules))[0] == 0.5
    assert trust.case_factor({"noise": 0.05, "hf": 0.8}, dict(nucleus.rules))[0] == 0.0
    record = after["provenance"].pop("trust_calibration")
    assert record["sets"] == {"near": 1, "organoid": "all", "ours800": 2, "xc31337": "all"} and record["cases"] == 16
    assert record["command"].startswith("python -m training.calibrate_trust")
    after["channels"]["nucleus"].pop("trust"), before["channels"]["nucleus"].pop("trust", None)
    before["provenance"].pop("trust_calibration", None)
    assert after == before  # the membrane channel (no rows), the stages, the knobs: all as they were
    assert "| ours | nucleus | 4 |" in (tmp_path / "t.md").read_text() and "shipped policy: factor 0.5" in capsys.readouterr().out


def test_the_clean_stack_prior_can_be_lifted_for_one_channel_only(fixture_resources: Path, tmp_path: Path) -> None:
    """``--no-clean-prior membrane``: clean membrane stacks (noise below CLEAN_NOISE) where the correction helps
    may be trusted; nuclei keep the prior (never corrected below it), and the record says which."""
    import json
    import shutil

    from fusemycells.config import load_manifest
    from training import calibrate_trust

    rows = [
        _study_row(fam, channel, 0.1, 0.2, noise)
        for fam in ("ours800", "xc31337", "near", "organoid")
        for channel in ("nucleus", "membrane")
        for noise in (0.004, 0.006, 0.05)
    ]
    resources = tmp_path / "res"
    shutil.copytree(fixture_resources, resources)
    (tmp_path / "rows.json").write_text(json.dumps(rows))
    args = ["--rows", str(tmp_path / "rows.json"), "--resources", str(resources), "--write-manifest", str(resources)]
    assert calibrate_trust.main([*args, "--no-clean-prior", "membrane"]) == 0
    record = json.loads((resources / "manifest.json").read_text())["provenance"]["trust_calibration"]
    assert record["clean_noise"] == {"membrane": 0.0, "nucleus": calibrate_trust.CLEAN_NOISE}
    manifest = load_manifest(resources)
    clean = {"noise": 0.004, "hf": 0.1}
    assert trust.case_factor(clean, dict(manifest.channel("membrane").trust.rules))[0] > 0  # trusted when clean
    assert trust.case_factor(clean, dict(manifest.channel("nucleus").trust.rules))[0] == 0.0  # never when clean
    assert trust.case_factor(clean | {"noise": 0.05}, dict(manifest.channel("nucleus").trust.rules))[0] > 0
