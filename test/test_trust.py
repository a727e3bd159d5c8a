"""Per-case trust (fusemycells.trust): signals, rules, region factor, manifest and Fuser."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest
from conftest import blob_volume

from fusemycells import trust
from fusemycells.config import ManifestError, PostprocessSpec, TrustSpec, load_manifest, parse_manifest, trust_form
from fusemycells.ops import Ops
from fusemycells.pipeline import Fuser
from fusemycells.postprocess import blend_weight
from fusemycells.runtime.budget import BudgetPolicy

SPACING = (1.0, 0.39, 0.39)
RNG = np.random.default_rng(7)
OPS = Ops("cpu", threads=2)


def smooth_field(shape: tuple[int, int, int], seed: int) -> np.ndarray:
    from scipy import ndimage

    return ndimage.gaussian_filter(np.random.default_rng(seed).normal(size=shape), 2).astype(np.float32)


def test_stages_that_agree_give_s12_corr_1_and_opposite_stages_minus_1() -> None:
    coarse = np.full((12, 12, 12), 0.5, dtype=np.float32)
    c1 = smooth_field(coarse.shape, 1)
    mask = trust.foreground_mask(coarse, 0.1)
    same = trust.case_signals(0.02, coarse, coarse + c1, 2 * c1, mask)
    assert same["s12_corr"] == pytest.approx(1.0) and same["s12_ratio"] == pytest.approx(2.0)
    rms2 = float(np.sqrt(np.mean((2.0 * c1.astype(np.float64)) ** 2)))
    assert same["corr_to_noise"] == pytest.approx(rms2 / 0.02, rel=1e-5)
    opposite = trust.case_signals(0.02, coarse, coarse + c1, -c1, mask)
    assert opposite["s12_corr"] == pytest.approx(-1.0)


def test_foreground_mask_falls_back_to_every_voxel_on_an_empty_image() -> None:
    empty = np.zeros((8, 8, 8), dtype=np.float32)
    assert trust.foreground_mask(empty, 0.1).all()
    bright = empty.copy()
    bright[:4] = 1.0
    assert trust.foreground_mask(bright, 0.1).sum() == 4 * 64


def test_rules_interpolate_their_knots_clip_to_0_1_and_the_case_takes_the_least_trusting() -> None:
    assert trust.rule_factor(0.5, ((0.0, 0.0), (1.0, 1.0))) == pytest.approx(0.5)
    assert trust.rule_factor(-3.0, ((0.0, 0.2), (1.0, 1.0))) == pytest.approx(0.2)  # held at the ends
    assert trust.rule_factor(9.0, ((0.0, 0.0), (1.0, 3.0))) == 1.0  # clipped
    factor, each = trust.case_factor(
        {"s12_corr": 0.9, "noise": 0.08}, {"s12_corr": ((0.8, 0.0), (1.0, 1.0)), "noise": ((0.06, 1.0), (0.09, 0.0))}
    )
    assert each["s12_corr"] == pytest.approx(0.5) and each["noise"] == pytest.approx(1 / 3)
    assert factor == pytest.approx(1 / 3)
    assert trust.case_factor({"noise": 0.1}, {}) == (1.0, {})
    with pytest.raises(KeyError):
        trust.case_factor({"noise": 0.1}, {"hf": ((0.0, 1.0),)})


def test_agreement_map_trusts_where_stage1_backs_stage2_and_not_where_it_opposes_or_is_silent() -> None:
    c2 = np.zeros((16, 16, 16), dtype=np.float32)
    c2[:, :, :8], c2[:, :, 8:] = 1.0, -1.0
    c1 = np.zeros_like(c2)
    c1[:6] = c2[:6]  # agrees
    c1[6:10] = 2 * c2[6:10]  # agrees, larger: clipped to 1
    c1[10:] = -c2[10:]  # opposes
    factor = trust.agreement_map(c1, c2, sigma=0.5)
    assert factor.dtype == np.float32 and factor.min() >= 0 and factor.max() <= 1
    assert factor[1:5].min() == pytest.approx(1.0, abs=1e-3) and factor[7:9].min() == pytest.approx(1.0, abs=1e-3)
    assert factor[12:].max() == pytest.approx(0.0, abs=1e-3)
    assert trust.agreement_map(np.zeros_like(c2), c2, 1.0).max() == 0.0
    assert trust.agreement_map(c2, np.zeros_like(c2), 1.0).max() == 0.0  # no correction: nothing to trust


def test_decide_applies_the_rules_on_the_diff_grid_and_hands_the_coarse_correction_on() -> None:
    coarse = np.full((12, 12, 12), 0.5, dtype=np.float32)
    c1 = smooth_field(coarse.shape, 3)
    correction = np.repeat(c1, 2, axis=0)  # on a finer 'H' grid along Z
    spec = TrustSpec(mode="case", rules=(("s12_corr", ((0.5, 0.0), (0.9, 0.8))),), region="agreement")
    decision = trust.decide(spec, 0.02, coarse, coarse + c1, correction, (8, 8, 8), ops=OPS)  # signals on the diff grid
    assert decision.signals["s12_corr"] > 0.95 and decision.factor == pytest.approx(0.8)
    assert decision.region is not None and decision.region.shape == (8, 8, 8)
    np.testing.assert_array_equal(decision.coarse_correction, trust.coarse_correction(correction, (8, 8, 8), OPS))
    report = decision.as_report()
    json.dumps(report)
    assert report["factor"] == pytest.approx(0.8) and set(report["seconds"]) == {"coarse_correction", "signals"}


def test_blend_weight_takes_a_region_factor_and_the_coarse_correction_gives_the_same_weight_map() -> None:
    region = np.ones((16, 16, 16), dtype=np.float32)
    region[:8] = 0.0
    spec = PostprocessSpec(diff_grid=(16, 16, 16), weight_max_filter=3, weight_sigma=1.0)
    correction = RNG.random((20, 30, 25), dtype=np.float32)
    x = np.ones((20, 30, 25), dtype=np.float32)
    scalar = blend_weight(correction, x, spec, 0.5, ops=OPS)
    per_region = blend_weight(correction, x, spec, 0.5 * region, ops=OPS)
    np.testing.assert_array_equal(per_region[8:], scalar[8:])
    assert per_region[:8].max() == 0.0
    # what the pipeline does with trust on: the weight map from the correction trust already resized
    np.testing.assert_array_equal(blend_weight(trust.coarse_correction(correction, (16, 16, 16), OPS), x, spec, 0.5, ops=OPS), scalar)


def fixture_with_trust(resources: Path, tmp_path: Path, trust_entry: dict | None) -> Path:
    raw = json.loads((resources / "manifest.json").read_text())
    for channel in raw["channels"].values():
        if trust_entry is not None:
            channel["trust"] = trust_entry
    target = tmp_path / "res"
    target.mkdir(parents=True)
    for path in resources.iterdir():
        if path.name != "manifest.json":
            (target / path.name).symlink_to(path)
    (target / "manifest.json").write_text(json.dumps(raw))
    return target


def test_a_manifest_without_trust_keeps_the_constant_gate_and_a_trust_entry_round_trips(
    fixture_resources: Path,
) -> None:
    assert load_manifest(fixture_resources).channel("nucleus").trust == TrustSpec()
    spec = TrustSpec(
        mode="case", rules=(("s12_corr", ((0.8, 0.0), (0.85, 0.5))),), region="agreement", region_sigma=2.0
    )
    raw = json.loads((fixture_resources / "manifest.json").read_text())
    raw["channels"]["nucleus"]["trust"] = trust_form(spec)
    assert parse_manifest(raw, fixture_resources).channel("nucleus").trust == spec
    for bad in (
        {"mode": "sometimes"},
        {"rules": {"luck": [[0, 1]]}},
        {"rules": {"noise": []}},
        {"rules": {"noise": [[0.1, 1], [0.05, 0]]}},
        {"colour": 1},
        {"probe_fraction": 0.125},  # the flip probes are gone: an old manifest naming them is refused
        {"rules": {"patch_flip": [[0, 1]]}},
        [],
    ):
        raw["channels"]["nucleus"]["trust"] = bad
        with pytest.raises(ManifestError):
            parse_manifest(raw, fixture_resources)


def cpu_policy() -> BudgetPolicy:
    return BudgetPolicy(device="cpu", half=False, vram_budget_gib=None, time_budget_s=None, threads=1)


def test_fuser_reports_the_trust_decision_and_a_zero_factor_writes_the_networks_off_output(
    fixture_resources: Path, tmp_path: Path
) -> None:
    data = blob_volume((10, 40, 36))
    on = Fuser(
        load_manifest(
            fixture_with_trust(
                fixture_resources,
                tmp_path / "a",
                {"mode": "case", "rules": {"s12_corr": [[-2, 1]]}, "region": "agreement"},
            )
        ),
        cpu_policy(),
    )
    fused = on.fuse(data.copy(), SPACING, "nucleus")
    entry = fused.report.trust
    assert (
        entry["mode"] == "case"
        and entry["factor"] == 1.0
        and set(entry["signals"]) == {"noise", "corr_to_noise", "s12_corr", "s12_ratio", "corr_rel", "hf", "asym"}
    )
    assert "trust" in fused.report.seconds and "region_mean" in entry
    zero_here = {"mode": "case", "rules": {"s12_corr": [[1.5, 0], [2, 1]]}}  # s12_corr ≤ 1: factor 0 on this case
    zero = Fuser(load_manifest(fixture_with_trust(fixture_resources, tmp_path / "b", zero_here)), cpu_policy())
    gated_off = zero.fuse(data.copy(), SPACING, "nucleus")
    assert gated_off.report.trust["factor"] == 0.0 and "postprocess" not in gated_off.report.seconds
    always_zero = {"mode": "case", "rules": {"noise": [[0, 0]]}}
    never = Fuser(load_manifest(fixture_with_trust(fixture_resources, tmp_path / "c", always_zero)), cpu_policy())
    skipped = never.fuse(data.copy(), SPACING, "nucleus")
    assert skipped.report.stages == {} and skipped.report.trust == {}  # factor 0 whatever the case: no network runs
    np.testing.assert_array_equal(skipped.to_array(), gated_off.to_array())
    manifest = load_manifest(fixture_resources)
    channel = manifest.channel("nucleus")
    off_channel = dataclasses.replace(
        channel, postprocess=dataclasses.replace(channel.postprocess, gate_knots=((0.0, 0.0),))
    )
    networks_off = Fuser(dataclasses.replace(manifest, channels={"nucleus": off_channel}), cpu_policy()).fuse(
        data.copy(), SPACING, "nucleus"
    )
    np.testing.assert_array_equal(gated_off.to_array(), networks_off.to_array())


def test_trust_with_a_constant_rule_equals_the_constant_gate(fixture_resources: Path, tmp_path: Path) -> None:
    data = blob_volume((10, 40, 36))
    manifest = load_manifest(fixture_resources)
    channel = manifest.channel("nucleus")
    half = dataclasses.replace(channel, postprocess=dataclasses.replace(channel.postprocess, gate_knots=((0.0, 0.5),)))
    old = Fuser(dataclasses.replace(manifest, channels={"nucleus": half}), cpu_policy()).fuse(
        data.copy(), SPACING, "nucleus", output_dtype="float32"
    )
    assert old.report.trust == {}  # trust off: nothing in the report, the gate as before
    spec = TrustSpec(mode="case", rules=(("noise", ((0.0, 0.5),)),))
    new_channel = dataclasses.replace(channel, trust=spec)
    new = Fuser(dataclasses.replace(manifest, channels={"nucleus": new_channel}), cpu_policy()).fuse(
        data.copy(), SPACING, "nucleus", output_dtype="float32"
    )
    assert new.report.trust["factor"] == 0.5 and math.isclose(old.report.adaptive["network_gate"], 0.5)
    np.testing.assert_allclose(new.to_array(), old.to_array(), atol=1e-6)


def test_when_the_time_budget_skipped_the_patch_stage_the_fallback_factor_is_used_and_reported(fixture_resources: Path, tmp_path: Path) -> None:
    import time

    data = blob_volume((10, 40, 36))
    why = "degradation level 2: no signals; the manifest's fallback_factor"
    outputs = {}
    for fallback in (None, 0.5):  # None: the default, networks off
        entry = {"mode": "case", "rules": {"s12_corr": [[0.5, 0.0], [0.6, 1.0]]}}
        if fallback is not None:
            entry["fallback_factor"] = fallback
        manifest = load_manifest(fixture_with_trust(fixture_resources, tmp_path / str(fallback), entry))
        fuser = Fuser(manifest, cpu_policy())
        fuser.patch_stage(manifest.channel("nucleus")).watcher.seconds_per_patch = 1e3  # learned: far too slow
        fused = fuser.fuse(data.copy(), SPACING, "nucleus", deadline=time.perf_counter() + 60.0)
        assert fused.report.degradation == 2  # stage 1 only: its correction would agree with itself (s12_corr 1)
        assert fused.report.trust == {"mode": "fallback", "factor": 0.0 if fallback is None else 0.5, "why": why}
        assert "trust" not in fused.report.seconds
        outputs[fallback] = fused.to_array()
    manifest = load_manifest(fixture_resources)
    channel = manifest.channel("nucleus")
    off = dataclasses.replace(channel, postprocess=dataclasses.replace(channel.postprocess, gate_knots=((0.0, 0.0),)))
    networks_off = Fuser(dataclasses.replace(manifest, channels={"nucleus": off}), cpu_policy()).fuse(
        data.copy(), SPACING, "nucleus"
    )
    np.testing.assert_array_equal(outputs[None], networks_off.to_array())  # factor 0: exactly networks off
    assert not np.array_equal(outputs[0.5], outputs[None])


def _study_module():
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
    import trust_study

    return trust_study


def test_the_study_measures_rows_the_calibration_turns_into_a_manifest_that_loads(fixture_resources: Path, tmp_path: Path, capsys) -> None:
    import shutil

    from conftest import write_case
    from scipy import ndimage

    from training import calibrate_trust

    study = _study_module()
    flat, split = tmp_path / "ours", tmp_path / "xc"  # training/simulate.py's and crosscheck_sim.py's layouts
    for i, channel in enumerate(("nucleus", "membrane")):
        data = blob_volume((8, 32, 28), seed=i)
        truth = ndimage.gaussian_filter(data.astype(np.float32), 1.0).astype(np.uint16)
        write_case(flat, f"image_{i}_{channel}_angle.tif", data, channel=channel)
        write_case(flat, f"image_{i}_{channel}_fused.tif", truth, channel=channel)
        write_case(split / study.INPUT_DIR, f"image_{i}_{channel}_angle.tif", data, channel=channel)
        write_case(split / study.GT_DIR, f"image_{i}_{channel}_angle.tif", truth, channel=channel)
    resources = tmp_path / "res"
    shutil.copytree(fixture_resources, resources)
    args = ["--set", f"ours={flat}", "--set", f"xc={split}", "--cache", str(tmp_path / "cache"), "--resources", str(resources), "--threads", "1"]
    assert study.main([*args, "--json", str(tmp_path / "rows.json")]) == 0
    assert "correlation" in capsys.readouterr().out
    calibration = ["--rows", str(tmp_path / "rows.json"), *args[:4], "--resources", str(resources)]
    assert calibrate_trust.main([*calibration, "--write-manifest", str(resources)]) == 0
    out = capsys.readouterr().out
    assert "leave-one-family-out" in out and "| family | channel |" in out
    rows = json.loads((tmp_path / "rows.json").read_text())
    assert len(rows) == 4 and set(rows[0]["signals"]) == set(trust.SIGNALS)
    assert {"none@0", "none@1", "agreement@0.25", "gaussian", "off_sigma0"} <= set(rows[0]["n_ssim"])
    assert set(rows[0]["n_ssim_gaussian_window"]) == set(rows[0]["n_ssim"])
    manifest = load_manifest(resources)
    assert all(ch.trust.mode == "case" for ch in manifest.channels.values())
    provenance = json.loads((resources / "manifest.json").read_text())["provenance"]["trust_calibration"]
    assert provenance["cases"] == 4 and provenance["sets"] == {"ours": "all", "xc": "all"}
    assert set(provenance["ceiling"]) == set(provenance["policies_gaussian_window_ssim"])
    assert "calibrated under the Gaussian-window SSIM" in out and "perfect case-level choice" in out
    assert study.main([*args, "--workers", "2"]) == 0  # a rerun reads its cache, here in two worker processes


def test_the_cost_probe_times_trust_and_both_weight_maps(fixture_resources: Path) -> None:
    seconds = _study_module().cost((20, 24, 24), fixture_resources)
    assert {"coarse_correction", "signals", "weight_map_from_H", "weight_map_from_coarse"} <= set(seconds)
    assert all(v >= 0 for v in seconds.values())
