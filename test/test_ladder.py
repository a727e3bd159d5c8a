"""The degradation ladder: each decision point on its own (fake time: seconds are whatever the test says), and
the planner (``plan_first_file``) taking the same decisions as the pipeline (``Fuser``) for the same inputs."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import blob_volume

from fusemycells.backends import LoadedStage, load_stage
from fusemycells.config import load_manifest
from fusemycells.pipeline import Fuser
from fusemycells.report import CaseReport
from fusemycells.runtime.budget import BudgetPolicy, LinearCost, PhaseRates, default_stage_costs
from fusemycells.runtime.deadline import Countdown
from fusemycells.runtime.ladder import (
    PATCH_SKIPPED,
    Degradation,
    Ladder,
    PatchAttempt,
    learn_finish_cost,
    patch_attempts,
    patches_fit,
    plan_first_file,
)
from fusemycells.stitching import count_windows


class FakeNow:
    """A time source the test moves (seconds)."""

    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def fixed(seconds: float) -> LinearCost:
    return LinearCost(seconds, 0.0)


def ladder(**costs: LinearCost) -> Ladder:
    return Ladder({"global": fixed(1.0), "fallback": fixed(1.0), "finish": fixed(1.0), **costs})


def test_the_reserve_is_the_fallback_and_the_finish_estimate_and_the_countdown_keeps_it_back() -> None:
    steps = ladder(fallback=LinearCost(1.0, 1e-6, 2e-6), finish=LinearCost(2.0, 3e-6))
    assert steps.reserve_s(1e6, 1e6) == pytest.approx((1.0 + 1.0 + 2.0) + (2.0 + 3.0))
    now = FakeNow()
    countdown = steps.countdown(100.0, 1e6, 1e6, now)
    now.t = 10.0
    assert countdown.left() == pytest.approx(100.0 - 9.0 - 10.0)
    assert steps.countdown(None, 1e6, 1e6, now).left() == float("inf")


def test_the_global_stage_is_skipped_when_the_time_left_is_not_more_than_its_estimate() -> None:
    steps = ladder(**{"global": LinearCost(2.0, 1e-6)})  # 3 s for 1e6 voxels
    now = FakeNow()
    skip = steps.skip_global(Countdown(3.0, now=now), 1e6, 0.0)  # exactly the estimate left: skipped
    assert skip == Degradation(3, "3.0 s left, the global stage needs ~3.0 s")
    assert steps.skip_global(Countdown(3.01, now=now), 1e6, 0.0) is None
    assert steps.skip_global(Countdown(None, now=now), 1e12, 0.0) is None  # no deadline: always run


def test_a_global_stage_slower_than_its_estimate_raises_the_reserve_by_the_same_factor() -> None:
    steps = ladder(**{"global": LinearCost(1.0, 1e-6)})  # 1 + 10 s on 1e7 voxels: the per-voxel part dominates
    countdown = steps.countdown(1000.0, 1e7, 0.0, FakeNow())
    event = steps.learn_global(countdown, 22.0, 1e7, 0.0)  # 2× its estimate
    assert event == "the global stage took 2.00× its estimate; time kept back for finishing raised to 4 s"
    assert steps.costs["fallback"] == steps.costs["finish"] == LinearCost(2.0, 0.0)  # fixed part too: a slower machine
    assert countdown.reserve_s == pytest.approx(4.0)
    assert steps.costs["global"].per_voxel_s == pytest.approx(1.25 * 2.1e-6)  # learnt with the margin


@pytest.mark.parametrize("cost, seconds", [(LinearCost(1.0, 1e-6), 10.0), (LinearCost(1.0, 1e-8), 3.0)])
def test_a_global_stage_within_its_estimate_or_on_a_small_stack_leaves_the_reserve(cost: LinearCost, seconds: float) -> None:
    steps = ladder(**{"global": cost})  # 11 s estimated and 10 s taken; or 1.1 s, mostly fixed, taking 3 s
    countdown = steps.countdown(1000.0, 1e7, 0.0, FakeNow())
    assert steps.learn_global(countdown, seconds, 1e7, 0.0) is None
    assert countdown.reserve_s == 2.0 and steps.costs["finish"] == fixed(1.0)


def test_level_3_once_the_global_stage_used_up_the_time_left() -> None:
    now = FakeNow()
    countdown = Countdown(10.0, reserve_s=2.0, now=now)
    now.t = 8.0
    assert Ladder.global_overran(countdown, 7.5) == Degradation(3, "deadline passed during the global stage (7.5 s)")
    now.t = 7.99
    assert Ladder.global_overran(countdown, 7.5) is None


def test_the_patch_stage_tries_the_manifest_overlap_then_none_and_level_2_when_neither_finishes() -> None:
    assert patch_attempts(0.5) == [PatchAttempt(0.5, 0), PatchAttempt(0.0, 1)]
    assert patch_attempts(0.0) == [PatchAttempt(0.0, 0)]  # no second, identical pass
    assert PATCH_SKIPPED == Degradation(2, "patch stage skipped")


def test_patches_fit_when_their_seconds_are_not_more_than_the_time_left() -> None:
    now = FakeNow()
    countdown = Countdown(10.0, reserve_s=2.0, now=now)  # 8 s left
    assert patches_fit(16, 0.5, countdown) and not patches_fit(17, 0.5, countdown)
    assert patches_fit(10**9, 1.0, Countdown(None))


@pytest.mark.parametrize("level, fallback", [(0, False), (1, False), (2, True), (3, True)])
def test_trust_takes_its_fallback_once_the_patch_stage_was_cut(level: int, fallback: bool) -> None:
    assert Ladder.trust_fallback(level) is fallback


def test_the_finish_cost_is_learnt_from_fully_fused_files_only() -> None:
    steps = ladder(finish=LinearCost(1.0, 1e-8))  # 1 + 10 s for 1e9 voxels
    skipped = CaseReport(file="l3.tif", status="ok", shape=[1000, 1000, 1000], seconds={"write": 3.0}, degradation=3)
    learn_finish_cost(steps.costs, skipped)
    assert steps.costs["finish"] == LinearCost(1.0, 1e-8)
    steps.learn_finish(CaseReport(file="ok.tif", status="ok", shape=[1000, 1000, 1000], seconds={"postprocess": 15.0, "write": 6.0}))
    assert steps.costs["finish"].per_voxel_s == pytest.approx(1.25 * 2e-8)  # 20 s of per-voxel work, × the margin


def test_the_planner_works_on_a_copy_of_the_costs_it_is_given() -> None:
    costs = default_stage_costs()
    before = {name: dataclasses.replace(cost) for name, cost in costs.items()}
    plan_first_file((309, 1920, 1920), (1.01, 0.388, 0.388), 480.0, speed=0.4, costs=costs)  # a slow global stage
    assert costs == before


# --- the planner and the pipeline: one ladder, the same decisions ---

SHAPE, SPACING, PATCH = (24, 64, 64), (0.6, 0.6, 0.6), 16  # H = the input grid: 98 patches with overlap, 32 without
GLOBAL_S, PATCH_S, FIRST_BATCH_S = 2.0, 0.1, 0.5  # what the stand-in networks take on the fake time source
COSTS = {"global": fixed(1.0), "fallback": fixed(1.0), "finish": fixed(1.0)}  # reserve 2 s, global estimate 1 s


class Timed:
    """A runner that moves the fake time source as a real network of known speed would."""

    def __init__(self, runner, now: FakeNow, per_call_s: float, per_patch_s: float = 0.0) -> None:
        self.runner, self.now, self.per_call_s, self.per_patch_s = runner, now, per_call_s, per_patch_s
        self.backend, self.provider, self.device, self.precision = runner.backend, runner.provider, runner.device, runner.precision
        self.armed = False  # the first batch after arming pays FIRST_BATCH_S (warm-up at loading does not count)

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        if self.armed:
            self.now.t += self.per_call_s + self.per_patch_s * len(batch)
            self.per_call_s = 0.0 if self.per_patch_s else self.per_call_s
        return self.runner(batch)


def fused_level(resources: Path, budget_s: float) -> int:
    """The level a fresh Fuser (first file) reaches on a blob stack with ``budget_s`` on the fake time source."""
    now = FakeNow()
    runners: list[Timed] = []

    def loader(manifest, spec, backend, device, **options) -> LoadedStage:
        loaded = load_stage(manifest, spec, backend, device, **options)
        patch = spec.patch_size is not None
        timed = Timed(loaded.runner, now, FIRST_BATCH_S if patch else GLOBAL_S, PATCH_S if patch else 0.0)
        runners.append(timed)
        return dataclasses.replace(loaded, runner=timed)

    policy = BudgetPolicy(device="cpu", half=False, vram_budget_gib=None, time_budget_s=None, threads=1)
    costs = {name: dataclasses.replace(cost) for name, cost in COSTS.items()}
    fuser = Fuser(load_manifest(resources), policy, loader=loader, backend="onnx", costs=costs, now=now)
    fuser.load_stages("nucleus")
    for runner in runners:
        runner.armed = True
    report = CaseReport(file="blob.tif")
    fuser.fuse(blob_volume(SHAPE), SPACING, "nucleus", deadline=now() + budget_s, output_dtype="float32", report=report)
    return report.degradation


def planned_level(budget_s: float) -> int:
    nothing = LinearCost(0.0, 0.0)
    rates = PhaseRates(
        startup_s=0.0, read=nothing, load_s=0.0, preprocess=nothing, global_stage=fixed(GLOBAL_S), patch_s=PATCH_S,
        first_batch_s=FIRST_BATCH_S, fallback=nothing, finish=nothing, level3_finish=nothing,
    )  # fmt: skip
    plan = plan_first_file(SHAPE, SPACING, budget_s, 0.6, (PATCH,) * 3, 0.5, rates, costs=COSTS)
    return plan.level


@pytest.fixture(scope="module")
def one_patch_batches(fixture_resources: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The fixture networks with one patch per batch: the watcher then sees the rate the planner assumes."""
    resources = tmp_path_factory.mktemp("one_patch_batches")
    for path in fixture_resources.iterdir():
        shutil.copy(path, resources / path.name)
    manifest = json.loads((resources / "manifest.json").read_text())
    for channel in manifest["channels"].values():
        channel["patch_stage"]["batch_size"] = 1
    (resources / "manifest.json").write_text(json.dumps(manifest))
    return resources


# budgets (s) either side of each threshold: skip ≤ 3 < overrun ≤ 4 < level 2 < 7.9 ≤ level 1 < 14.3 ≤ level 0
BUDGETS = [2.9, 3.1, 3.9, 4.1, 6.0, 7.85, 7.95, 10.0, 14.25, 14.35, 30.0]


@pytest.mark.parametrize("budget_s", BUDGETS)
def test_the_planner_and_the_pipeline_take_the_same_decision_for_the_same_inputs(one_patch_batches: Path, budget_s: float) -> None:
    assert count_windows(SHAPE, (PATCH,) * 3, 0.5) == 98 and count_windows(SHAPE, (PATCH,) * 3, 0.0) == 32
    assert fused_level(one_patch_batches, budget_s) == planned_level(budget_s)


def test_the_budgets_compared_cover_every_level() -> None:
    assert sorted({planned_level(b) for b in BUDGETS}) == [0, 1, 2, 3]
