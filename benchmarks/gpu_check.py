"""Steps and summary of the one-call GPU verification (run by benchmarks/gpu_check.sh, one step per call).

    python benchmarks/gpu_check.py env     --device cuda --out OUT/env.json
    python benchmarks/gpu_check.py parity  --device cuda --out OUT/parity.json
    python benchmarks/gpu_check.py vram    --device cuda --backend torchscript --out OUT/vram_torchscript.json
    python benchmarks/gpu_check.py faults  --device cuda --out OUT/faults.json
    python benchmarks/gpu_check.py summarize OUT   (reads OUT/steps/*.json and the step outputs)

parity: each stage of each channel of the shipped networks on an image-like input (global stage: its grid;
patch stage: the manifest's batch of 2-channel patches), TorchScript fp32 on the CPU as the reference against
TorchScript fp16 autocast on CUDA, ONNX Runtime CUDA (IOBinding) and ONNX Runtime CPU; the figure is
max |p(ref) − p(x)| after percentile normalisation p (2 / 99.8), per output, goal ≤ 1e-2.
vram: all four stages loaded with one backend under a VRAM budget, one forward each at the pipeline's batch
shapes; device memory in use (torch.cuda.mem_get_info, above the CUDA context) against the budget.
faults: inference.py on a small generated stack with a real CUDA fault injected (FUSEMYCELLS_INJECT_DEVICE_FAULT:
global stage, second patch batch, output filter; ``fusemycells/runtime/faults.py``), each in a fresh process: the file must
still be written (exit 0) with the fault in its report entry, in the default output dtype (uint16).
On ``--device cpu`` (the dry run) the same code runs on the CPU and the CUDA-only figures are null (the fault
switch is a logged no-op there).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from fusemycells.runtime import cuda_support  # noqa: E402

PARITY_GOAL = 1e-2
"""Largest allowed difference after percentile normalisation (issue #13)."""
E2E_GOAL_S = 60.0
"""309×1920×1920 end to end on an H100/H200-class GPU (issue #13)."""
NON_NETWORK_GOAL_S = 15.0
"""Seconds outside the network forward passes (read, resampling, stitching, weight map, blend, output filter,
normalisation, write) of that end-to-end run on an H100/H200-class GPU (issue #16)."""
STEPS = ("env", "make_case", "pytest_cuda", "parity", "vram_torchscript", "vram_onnx", "faults", "e2e")
FAULT_PLANS = ("global", "patch:2", "ops")
"""The injected faults of the ``faults`` step (the dry run: the first only)."""


def image_like(shape: tuple[int, ...], seed: int) -> np.ndarray:
    """Float32 array of ``shape`` (…ZYX): smoothed noise blobs in [0, 1] over an empty first eighth in Z (flat background)."""
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    volume = ndimage.gaussian_filter(rng.random(shape, dtype=np.float32), sigma=[0] * (len(shape) - 3) + [2, 2, 2])
    volume = (volume - volume.min()) / max(float(np.ptp(volume)), 1e-6)
    volume[..., : max(1, shape[-3] // 8), :, :] = 0.0
    return volume.astype(np.float32)


def normalised_difference(reference: np.ndarray, other: np.ndarray) -> float:
    """max |p(reference) − p(other)| over the outputs of a batch (N1ZYX), p = percentile normalisation 2 / 99.8
    (the metric's, :func:`fusemycells.evaluation.metrics.metric_normalise`)."""
    from fusemycells.evaluation.metrics import metric_normalise

    return max(float(np.abs(metric_normalise(a[0]) - metric_normalise(b[0])).max()) for a, b in zip(reference, other))


def stage_inputs(spec, which: str, quick: bool = False) -> np.ndarray:
    """The batch the pipeline feeds a stage: global (1, 1, *grid); patch (batch, 2, *patch_size) = image + its smoothed copy.

    ``quick`` (the CPU dry run) feeds a quarter of each axis and one patch: the networks are fully convolutional.
    """
    from scipy import ndimage

    if which == "global":
        return image_like((1, 1, *(g // 4 if quick else g for g in spec.grid)), seed=1)
    size = tuple(p // 2 if quick else p for p in spec.patch_size)
    image = image_like((1 if quick else spec.batch_size, 1, *size), seed=2)
    stage1 = ndimage.gaussian_filter(image, sigma=(0, 0, 1.5, 1.5, 1.5))
    return np.concatenate([image, stage1], axis=1)


def selected_channels(manifest, quick: bool) -> list:
    """(name, ChannelSpec) of every channel; the first only for ``quick``."""
    channels = sorted(manifest.channels.items())
    return channels[:1] if quick else channels


def parity(device: str, threads: int, resources: Path, quick: bool = False) -> dict:
    """Per channel and stage: each variant's normalised difference to TorchScript fp32 on the CPU, and the provider that ran it."""
    from fusemycells.backends import load_stage
    from fusemycells.config import load_manifest

    manifest = load_manifest(resources)
    variants = [("onnx_cpu", "onnx", "cpu", False)]
    if device == "cuda":
        variants = [("torchscript_cuda_fp16", "torchscript", "cuda", True), ("onnx_cuda_iobinding", "onnx", "cuda", False), *variants]
    rows = []
    for name, channel in selected_channels(manifest, quick):
        for which, spec in (("global", channel.global_stage), ("patch", channel.patch_stage)):
            batch = stage_inputs(spec, which, quick)
            reference = load_stage(manifest, spec, "torchscript", "cpu", threads=threads, strict=True).runner(batch)
            for label, backend, dev, half in variants:
                runner = load_stage(manifest, spec, backend, dev, half=half, threads=threads, strict=True).runner
                started = time.perf_counter()
                out = runner(batch)
                difference = normalised_difference(reference, out)
                rows.append({
                    "channel": name, "stage": which, "variant": label, "provider": runner.provider, "input_shape": list(batch.shape),
                    "max_abs_raw": float(np.abs(reference - out).max()), "max_normalised": difference, "seconds": round(time.perf_counter() - started, 3),
                    "ok": bool(difference <= PARITY_GOAL and (dev == "cpu" or runner.provider == "CUDA")),
                })
    return {"device": device, "goal": PARITY_GOAL, "rows": rows, "ok": all(r["ok"] for r in rows)}


def vram(device: str, backend: str, budget_gib: float, threads: int, resources: Path, quick: bool = False) -> dict:
    """All four stages with ``backend`` under ``budget_gib``, one forward each; device memory in use against the budget."""
    from fusemycells.backends import load_stage
    from fusemycells.config import load_manifest
    from fusemycells.runtime.devices import proc_status_mib

    manifest = load_manifest(resources)
    torch = None
    baseline = None
    if device == "cuda":
        import torch

        torch.cuda.init()
        torch.zeros(1, device="cuda")  # the CUDA context exists before the baseline
        free, total = torch.cuda.mem_get_info()
        baseline = total - free
    loaded = []
    for name, channel in selected_channels(manifest, quick):
        for which, spec in (("global", channel.global_stage), ("patch", channel.patch_stage)):
            stage = load_stage(manifest, spec, backend, device, half=device == "cuda", threads=threads, strict=True, vram_budget_gib=budget_gib if device == "cuda" else None)
            stage.runner(stage_inputs(spec, which, quick))
            loaded.append({"stage": f"{name}/{which}", "file": stage.file, "provider": stage.runner.provider})
    result = {"device": device, "backend": backend, "budget_gib": budget_gib, "stages": loaded, "peak_rss_mib": proc_status_mib("VmHWM")}
    if torch is not None and baseline is not None:
        torch.cuda.synchronize()
        free, total = torch.cuda.mem_get_info()
        used = (total - free - baseline) / 2**30
        result.update({
            "device_total_gib": round(total / 2**30, 2), "context_gib": round(baseline / 2**30, 3), "used_above_context_gib": round(used, 3),
            "torch_reserved_peak_gib": round(torch.cuda.max_memory_reserved() / 2**30, 3), "honoured": bool(used <= budget_gib),
            "all_on_cuda": all(s["provider"] == "CUDA" for s in loaded),
        })
    else:
        result.update({"used_above_context_gib": None, "honoured": None, "all_on_cuda": None})
    return result


def env_facts(device: str) -> dict:
    """Machine, driver, CUDA route, library builds and what each library says about CUDA."""
    facts: dict = {"requested_device": device, "python": sys.version.split()[0], "platform": platform.platform(), "cpu_count": os.cpu_count()}
    facts["cuda_plan"] = cuda_support.host_plan().as_report()
    facts["builds"] = cuda_support.installed_cuda_builds()
    facts["route_env"] = os.environ.get(cuda_support.ROUTE_ENV)
    try:
        smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,compute_cap", "--format=csv,noheader"], capture_output=True, text=True, timeout=30)
        facts["nvidia_smi"] = smi.stdout.strip() if smi.returncode == 0 else f"rc {smi.returncode}: {smi.stderr.strip()[:300]}"
    except (OSError, subprocess.SubprocessError) as exc:
        facts["nvidia_smi"] = f"unavailable: {exc}"
    import torch

    facts["torch"] = {"version": torch.__version__, "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version(), "cuda_available": torch.cuda.is_available()}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        facts["torch"].update({"device": props.name, "capability": f"{props.major}.{props.minor}", "total_memory_gib": round(props.total_memory / 2**30, 2)})
    import onnxruntime as ort

    from fusemycells.backends import preload_cuda_libraries

    if device == "cuda":
        preload_cuda_libraries(ort)
    facts["onnxruntime"] = {"version": ort.__version__, "build_cuda": facts["builds"].get("onnxruntime"), "available_providers": ort.get_available_providers(), "device": ort.get_device()}
    facts["cuda_error"] = cuda_support.cuda_failure_message(facts["cuda_plan"]["driver"], facts["cuda_plan"]["needed"], torch.cuda.is_available(), facts["route_env"])
    return facts


# ---- summary (pure: the step records and outputs in, one dictionary and a text out) ----


def faults(device: str, work: Path, resources: Path, quick: bool = False) -> dict:
    """inference.py once per :data:`FAULT_PLANS` entry with that fault injected, on a small generated stack in
    ``work``; per plan the exit code, the file's status, output dtype and device fault. ``ok``: every run wrote
    its output with exit 0 (and, on CUDA, named the fault)."""
    from fusemycells.config import INPUT_SUBDIR, OUTPUT_SUBDIR
    from fusemycells.io.tiff import Volume, write_volume
    from fusemycells.runtime.faults import FAULT_ENV

    data = (image_like((16, 96, 96), seed=25) * 3000 + 100).astype(np.uint16)
    write_volume(work / INPUT_SUBDIR / "fault.tif", data, Volume(data, (1.01, 0.388, 0.388), "nucleus"))
    rows = []
    for plan in FAULT_PLANS[:1] if quick else FAULT_PLANS:
        report_path = work / f"report_{plan.replace(':', '_')}.json"
        command = [sys.executable, str(REPO / "inference.py"), "--input", str(work), "--output", str(work / plan.replace(":", "_")),
                   "--resources", str(resources), "--device", device, "--report", str(report_path)]
        proc = subprocess.run(command, env={**os.environ, FAULT_ENV: plan}, capture_output=True, text=True, timeout=120)
        entry = ((_load_json(report_path) or {}).get("files") or [{}])[0]
        written = (work / plan.replace(":", "_") / OUTPUT_SUBDIR / "fault.tif").exists()
        rows.append({"plan": plan, "exit_code": proc.returncode, "status": entry.get("status"), "written": written,
                     "output_dtype": entry.get("output_dtype"), "device_fault": entry.get("device_fault"),
                     "log_tail": proc.stderr[-600:] if proc.returncode else ""})
    ok = all(r["exit_code"] == 0 and r["written"] and (device != "cuda" or r["device_fault"]) for r in rows)
    return {"device": device, "rows": rows, "ok": ok}


def step_status(record: dict | None) -> str:
    """'ok', 'failed', 'timeout' or 'not run' for a step record written by gpu_check.sh."""
    if record is None:
        return "not run"
    if record.get("timed_out"):
        return "timeout"
    return "ok" if record.get("rc") == 0 else "failed"


def parse_junit(text: str) -> dict:
    """Counts of a pytest junit XML report (tests, failures, errors, skipped)."""
    root = ET.fromstring(text)
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    keys = ("tests", "failures", "errors", "skipped")
    return {k: sum(int(s.get(k, 0)) for s in suites) for k in keys}


def max_vram_sample(text: str) -> float | None:
    """Largest value (MiB) in nvidia-smi ``--query-gpu=memory.used --format=csv,noheader,nounits`` samples."""
    values = [float(v) for v in re.findall(r"^\s*(\d+(?:\.\d+)?)\s*$", text, re.M)]
    return max(values) if values else None


def non_network_seconds(seconds: dict | None) -> float | None:
    """A file's seconds outside the network forward passes: its ``total`` less ``profile_s['forward_s']`` (the
    per-kind profile of the report; None when either is missing)."""
    seconds = seconds or {}
    profile = seconds.get("profile_s") or {}
    if "total" not in seconds or "forward_s" not in profile:
        return None
    return round(float(seconds["total"]) - float(profile["forward_s"]), 3)


def e2e_facts(report: dict, vram_samples: str | None) -> dict:
    """Per-file seconds per stage and per kind of work, the non-network seconds, degradation, peak VRAM (torch's and the
    device's sampled peak) of an inference.py report."""
    files = report.get("files") or []
    first = files[0] if files else {}
    return {
        "non_network_s": non_network_seconds(first.get("seconds")),
        "wall_s": report.get("seconds"), "status": first.get("status"), "shape": first.get("shape"), "seconds": first.get("seconds"),
        "output_dtype": first.get("output_dtype"),
        "degradation": first.get("degradation"), "peak_vram_mib_torch": first.get("peak_vram_mib"), "peak_rss_mib": first.get("peak_rss_mib"),
        "peak_vram_mib_device": max_vram_sample(vram_samples) if vram_samples else None,
        "providers": {k: (v.get("backend"), v.get("provider")) for k, v in (first.get("stages") or {}).items() if isinstance(v, dict)},
        "device": (report.get("policy") or {}).get("device"), "error": report.get("error") or first.get("error"),
    }


def summarize(steps: dict[str, dict | None], outputs: dict[str, dict | None], device: str, quick: bool, elapsed_s: float | None = None, total_s: float | None = None) -> dict:
    """The gpu_check.json content: step statuses, the step outputs, and the checks the issue asks for."""
    pytest_counts = outputs.get("pytest_cuda")
    parity_out = outputs.get("parity")
    vram_out = {b: outputs.get(f"vram_{b}") for b in ("torchscript", "onnx")}
    e2e = outputs.get("e2e")
    fault_out = outputs.get("faults")
    checks = {
        "cuda_tests_passed": None if pytest_counts is None else bool(pytest_counts["failures"] == 0 and pytest_counts["errors"] == 0 and (device != "cuda" or pytest_counts["skipped"] == 0)),
        "parity_within_goal": None if parity_out is None else parity_out["ok"],
        "vram_budget_honoured": {b: (None if v is None else v.get("honoured")) for b, v in vram_out.items()},
        "device_faults_recovered": None if fault_out is None else fault_out["ok"],
        "e2e_written": None if e2e is None else e2e.get("status") == "ok",
        "e2e_within_goal_s": None if e2e is None or device != "cuda" or quick or e2e.get("wall_s") is None else bool(e2e["wall_s"] <= E2E_GOAL_S),
        "non_network_within_goal_s": None if e2e is None or device != "cuda" or quick or e2e.get("non_network_s") is None
        else bool(e2e["non_network_s"] <= NON_NETWORK_GOAL_S),
    }
    return {
        "device": device, "quick": quick, "elapsed_s": elapsed_s, "total_s": total_s,
        "steps": {name: {**(steps.get(name) or {}), "status": step_status(steps.get(name))} for name in STEPS},
        "env": outputs.get("env"), "pytest_cuda": pytest_counts, "parity": parity_out, "vram": vram_out, "faults": fault_out, "e2e": e2e, "checks": checks,
    }


def render_summary(result: dict) -> str:
    """Markdown summary of :func:`summarize`'s result."""
    lines = [f"# GPU check ({result['device']}{', quick' if result['quick'] else ''}): {result.get('elapsed_s')} s of {result.get('total_s')} s", "", "| step | status | seconds |", "|---|---|---|"]
    lines += [f"| {name} | {s['status']} | {s.get('seconds', '')} |" for name, s in result["steps"].items()]
    env = result.get("env") or {}
    plan = env.get("cuda_plan") or {}
    lines += ["", f"- NVIDIA: {env.get('nvidia_smi')}; CUDA route: {plan.get('route')} ({plan.get('reason')})",
              f"- torch {((env.get('torch') or {}).get('version'))} CUDA {((env.get('torch') or {}).get('cuda'))}; onnxruntime {((env.get('onnxruntime') or {}).get('version'))} providers {((env.get('onnxruntime') or {}).get('available_providers'))}"]
    if env.get("cuda_error"):
        lines.append(f"- ERROR: {env['cuda_error']}")
    if result.get("parity"):
        lines += ["", "| channel | stage | variant | provider | max normalised diff | ok |", "|---|---|---|---|---|---|"]
        lines += [f"| {r['channel']} | {r['stage']} | {r['variant']} | {r['provider']} | {r['max_normalised']:.2e} | {r['ok']} |" for r in result["parity"]["rows"]]
    for backend, v in (result.get("vram") or {}).items():
        if v:
            lines.append(f"- VRAM {backend}: budget {v.get('budget_gib')} GiB, used above context {v.get('used_above_context_gib')} GiB, honoured {v.get('honoured')}")
    for row in (result.get("faults") or {}).get("rows", []):
        lines.append(f"- injected fault {row['plan']}: exit {row['exit_code']}, {row['status']}, {row['output_dtype']}, device fault {row['device_fault']}")
    e2e = result.get("e2e")
    if e2e:
        lines.append(f"- end to end {e2e.get('shape')}: {e2e.get('status')}, {e2e.get('wall_s')} s, stages {e2e.get('seconds')}, degradation {e2e.get('degradation')}, "
                     f"peak VRAM torch {e2e.get('peak_vram_mib_torch')} MiB / device {e2e.get('peak_vram_mib_device')} MiB, providers {e2e.get('providers')}")
        lines.append(f"- non-network seconds (total − forward): {e2e.get('non_network_s')} s (goal ≤ {NON_NETWORK_GOAL_S} s on an H100/H200)")
    lines += ["", "checks: " + json.dumps(result["checks"])]
    return "\n".join(lines) + "\n"


def _load_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def collect(out: Path, device: str, quick: bool, elapsed_s: float | None = None, total_s: float | None = None) -> dict:
    """Read what the steps left in ``out`` and summarise it."""
    steps = {name: _load_json(out / "steps" / f"{name}.json") for name in STEPS}
    outputs: dict[str, dict | None] = {name: _load_json(out / f"{name}.json") for name in ("env", "parity", "vram_torchscript", "vram_onnx", "faults")}
    junit = out / "pytest_cuda.xml"
    try:
        outputs["pytest_cuda"] = parse_junit(junit.read_text())
    except (OSError, ET.ParseError):
        outputs["pytest_cuda"] = None
    report = _load_json(out / "e2e_report.json")
    samples = out / "vram_samples.csv"
    outputs["e2e"] = e2e_facts(report, samples.read_text() if samples.exists() else None) if report else None
    return summarize(steps, outputs, device, quick, elapsed_s, total_s)


def write_full_path_resources(resources: Path, out: Path) -> Path:
    """A copy of the weights folder with no ``trust`` in its manifest (the constant noise gate), so that the
    end-to-end run times the whole pipeline (both networks and the blend) whatever trust would decide on
    the generated stack: the worst case for the time limit. Returns ``out``."""
    import shutil

    from fusemycells.config import MANIFEST_NAME

    shutil.copytree(resources, out, dirs_exist_ok=True)
    raw = json.loads((out / MANIFEST_NAME).read_text())
    for spec in raw.get("channels", {}).values():
        spec.pop("trust", None)
    (out / MANIFEST_NAME).write_text(json.dumps(raw, indent=2, ensure_ascii=False) + "\n")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("step", choices=["env", "parity", "vram", "faults", "full-path-resources", "summarize"])
    parser.add_argument("folder", nargs="?", type=Path, help="summarize: the output folder")
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--out", type=Path, help="JSON file of this step")
    parser.add_argument("--backend", choices=["torchscript", "onnx"], default="torchscript")
    parser.add_argument("--vram-budget", type=float, default=2.0, metavar="GiB")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--resources", type=Path, default=REPO / "resources")
    parser.add_argument("--quick", action="store_true", help="dry run: first channel only, smaller inputs")
    parser.add_argument("--elapsed", type=float, help="summarize: seconds the check took so far")
    parser.add_argument("--total", type=float, help="summarize: the check's time limit (s)")
    args = parser.parse_args(argv)
    if args.step == "summarize":
        result = collect(args.folder, args.device, args.quick, args.elapsed, args.total)
        (args.folder / "gpu_check.json").write_text(json.dumps(result, indent=2, default=str))
        text = render_summary(result)
        (args.folder / "summary.md").write_text(text)
        print(text)
        return 0
    if args.step == "full-path-resources":
        print(write_full_path_resources(args.resources, args.out))
        return 0
    if args.step == "env":
        result = env_facts(args.device)
    elif args.step == "parity":
        result = parity(args.device, args.threads, args.resources, args.quick)
    elif args.step == "faults":
        work = args.out.parent / "faults_case"
        result = faults(args.device, work, args.resources, args.quick)
        import shutil

        shutil.rmtree(work, ignore_errors=True)
    else:
        result = vram(args.device, args.backend, args.vram_budget, args.threads, args.resources, args.quick)
    args.out.write_text(json.dumps(result, indent=2, default=str))
    print(json.dumps(result, default=str)[:2000])
    return 0 if result.get("ok", True) is not False else 1


if __name__ == "__main__":
    raise SystemExit(main())
