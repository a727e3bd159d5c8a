"""benchmarks/gpu_check.sh without a GPU: the CPU dry run end to end, failing steps recorded, and the summary logic."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))

import gpu_check  # noqa: E402

SCRIPT = REPO / "benchmarks" / "gpu_check.sh"


def _run(out: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "2", **(env or {})}
    return subprocess.run(["bash", str(SCRIPT), str(out), *args], cwd=REPO, env=full_env, capture_output=True, text=True, timeout=300)


def test_cpu_dry_run_records_every_step_with_parity_vram_and_end_to_end_figures(tmp_path: Path):
    out = tmp_path / "check"
    proc = _run(out, "--device", "cpu", "--quick")
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((out / "gpu_check.json").read_text())
    assert {name: s["status"] for name, s in result["steps"].items()} == {name: "ok" for name in gpu_check.STEPS}
    assert result["elapsed_s"] <= result["total_s"] == 300
    assert result["env"]["cuda_plan"]["route"] in ("no-driver", "cpu-build") and result["env"]["torch"]["version"]
    rows = result["parity"]["rows"]
    assert {(r["stage"], r["variant"], r["provider"]) for r in rows} == {("global", "onnx_cpu", "CPU"), ("patch", "onnx_cpu", "CPU")}
    assert all(r["ok"] and r["max_normalised"] <= gpu_check.PARITY_GOAL for r in rows)
    for backend in ("torchscript", "onnx"):
        vram = result["vram"][backend]
        assert vram["backend"] == backend and len(vram["stages"]) == 2 and vram["honoured"] is None  # no CUDA: nothing to honour
    assert result["pytest_cuda"]["failures"] == 0 and result["pytest_cuda"]["skipped"] >= 1  # the CUDA test skips without a GPU
    e2e = result["e2e"]
    assert e2e["status"] == "ok" and e2e["shape"] == [16, 128, 128] and e2e["device"] == "cpu" and e2e["output_dtype"] == "uint16"
    [fault] = result["faults"]["rows"]  # on the CPU the switch is a logged no-op: the run writes its output
    assert fault["plan"] == "global" and fault["exit_code"] == 0 and fault["written"] and fault["status"] == "ok"
    assert fault["output_dtype"] == "uint16" and fault["device_fault"] is None
    assert {"preprocess", "global_stage", "patch_stage", "postprocess", "write"} <= set(e2e["seconds"]) and e2e["degradation"] == 0
    assert result["checks"] == {
        "cuda_tests_passed": True, "parity_within_goal": True, "vram_budget_honoured": {"torchscript": None, "onnx": None},
        "device_faults_recovered": True, "e2e_written": True, "e2e_within_goal_s": None, "non_network_within_goal_s": None,
    }
    assert e2e["non_network_s"] is not None and 0 < e2e["non_network_s"] <= e2e["seconds"]["total"]
    assert "onnx_cpu" in (out / "summary.md").read_text() and not (out / "case" / "input").exists()  # the stack is removed


def test_failing_steps_are_recorded_and_do_not_stop_the_others(tmp_path: Path):
    out = tmp_path / "check"
    proc = _run(out, "--device", "cpu", "--quick", "--total", "20", env={"PYTHON": "false"})  # every Python step fails
    assert proc.returncode != 0
    result = json.loads((out / "gpu_check.json").read_text())  # written by the shell when the Python summary fails
    assert result["summary_error"] != 0
    assert sorted(s["name"] for s in result["steps"]) == sorted(set(gpu_check.STEPS) - {"e2e"})  # no time left for e2e
    assert all(s["rc"] != 0 and s["timed_out"] is False for s in result["steps"])


def test_step_status_and_checks_from_records():
    assert gpu_check.step_status(None) == "not run"
    assert gpu_check.step_status({"rc": 124, "timed_out": True}) == "timeout"
    assert gpu_check.step_status({"rc": 1, "timed_out": False}) == "failed"
    assert gpu_check.step_status({"rc": 0, "timed_out": False}) == "ok"
    report = {"seconds": 48.5, "policy": {"device": "cuda"}, "files": [{"status": "ok", "shape": [309, 1920, 1920], "degradation": 0,
              "seconds": {"patch_stage": 20.0, "total": 46.0, "profile_s": {"forward_s": 33.5, "blend_s": 2.0}},
              "peak_vram_mib": 3072.0, "stages": {"global": {"backend": "torchscript", "provider": "CUDA"}}}]}
    e2e = gpu_check.e2e_facts(report, "512\n4200\n3900\n")
    assert e2e["peak_vram_mib_device"] == 4200.0 and e2e["providers"] == {"global": ("torchscript", "CUDA")} and e2e["wall_s"] == 48.5
    counts = {"tests": 3, "failures": 0, "errors": 0, "skipped": 1}
    result = gpu_check.summarize({"e2e": {"rc": 0, "timed_out": False}}, {"pytest_cuda": counts, "e2e": e2e}, "cuda", quick=False)
    assert result["checks"]["cuda_tests_passed"] is False  # a CUDA test skipped on a CUDA machine is not a pass
    assert result["checks"]["e2e_within_goal_s"] is True and result["steps"]["parity"]["status"] == "not run"
    assert gpu_check.summarize({}, {"e2e": {**e2e, "wall_s": 75.0}}, "cuda", quick=False)["checks"]["e2e_within_goal_s"] is False
    assert e2e["non_network_s"] == 12.5 and result["checks"]["non_network_within_goal_s"] is True
    assert gpu_check.non_network_seconds({"total": 3.0}) is None and gpu_check.non_network_seconds(None) is None
    assert "not run" in gpu_check.render_summary(result)


def test_junit_counts_and_vram_samples_are_parsed():
    xml = '<testsuites><testsuite name="pytest" tests="5" failures="1" errors="0" skipped="2"/></testsuites>'
    assert gpu_check.parse_junit(xml) == {"tests": 5, "failures": 1, "errors": 0, "skipped": 2}
    assert gpu_check.max_vram_sample("") is None and gpu_check.max_vram_sample("10\n 250 \n30\n") == 250.0


def test_parity_figure_ignores_affine_changes_and_sees_structure():
    ref = gpu_check.image_like((2, 1, 16, 16, 16), seed=3)
    assert gpu_check.normalised_difference(ref, ref * 3.0 + 1.0) < 1e-5  # percentile normalisation removes gain and offset
    noisy = ref + np.random.default_rng(0).normal(0, 0.05, ref.shape).astype(np.float32)
    assert gpu_check.normalised_difference(ref, noisy) > 1e-2
