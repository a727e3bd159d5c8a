"""Non-network time of the pipeline: a generated stack through read → fuse → write with an instant network.

    python benchmarks/bench_stages.py --shape Z Y X [--json FILE] [--case-dir DIR] [--repeat N] [--device cpu|cuda]

A challenge-style uint16 stack (``make_large_case.py``'s synthetic texture, spacing 1.01/0.388/0.388 µm)
is written once to ``--case-dir`` (kept there for later runs; a temporary folder by default), then
``files.process_file`` runs on it in a fresh subprocess (so its peak RSS, ``VmHWM``, is its own) with
the shipped manifest's settings and a fake network injected through ``Fuser(..., loader=...)``: the
global stage returns 0.9·input + 0.05, the patch stage the mean of its two channels. Both cost next to
nothing, so everything else the pipeline does (reading, resampling, stitching, weight map, blending,
output filter, percentile normalisation, writing) is what is timed. Printed: the report's seconds per
stage and its ``profile_s`` (exclusive seconds per kind of work, where the code reports it), the fake
network's own seconds, the non-network seconds (total − fake forward), the CPU seconds of all threads
(less sensitive than wall time to other processes on a shared machine), peak RSS against the input's
size, and the load average before and after (the machine may be shared). Level 0 (no time budget).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))
SPACING = (1.01, 0.388, 0.388)


class InstantRunner:
    """A stand-in network: ``fn`` of the batch (N, C, Z, Y, X) → (N, 1, Z, Y, X), timing its own calls."""

    backend, precision = "fake", "fp32"

    def __init__(self, fn, device: str, seconds: list[float]) -> None:
        self.fn, self.device, self.seconds = fn, device, seconds
        self.provider = "CUDA" if device == "cuda" else "CPU"
        self.lock = threading.Lock()

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        started = time.perf_counter()
        out = np.ascontiguousarray(self.fn(batch), dtype=np.float32)
        with self.lock:
            self.seconds[0] += time.perf_counter() - started
        return out


def instant_loader(seconds: list[float]):
    """A ``Fuser`` stage loader whose networks are :class:`InstantRunner` s adding their time to ``seconds[0]``."""
    from fusemycells.backends import LoadedStage

    def global_fn(batch: np.ndarray) -> np.ndarray:
        return batch[:, :1] * np.float32(0.9) + np.float32(0.05)

    def patch_fn(batch: np.ndarray) -> np.ndarray:
        return (batch[:, :1] + batch[:, 1:2]) * np.float32(0.5)

    def loader(manifest, spec, backend, device, **options) -> LoadedStage:
        fn = patch_fn if spec.patch_size is not None else global_fn
        return LoadedStage(spec=spec, runner=InstantRunner(fn, device, seconds), file="instant")

    return loader


def make_case(folder: Path, shape: tuple[int, int, int]) -> Path:
    """The generated stack's TIFF in ``folder`` (written unless already there)."""
    import make_large_case

    path = folder / make_large_case.INPUT_SUBDIR / "large_nucleus.tif"
    if not path.exists():
        spacing = [str(s) for s in SPACING]
        make_large_case.main(["--out", str(folder), "--shape", *map(str, shape), "--spacing", *spacing])
    return path


def worker(path: Path, out: Path, device: str, threads: int) -> dict:
    """process_file on ``path`` with the instant network; the report and the fake forward seconds."""
    import dataclasses

    from fusemycells.config import load_manifest, without_trust
    from fusemycells.files import process_file
    from fusemycells.pipeline import Fuser
    from fusemycells.runtime import allocator
    from fusemycells.runtime.budget import BudgetPolicy
    from fusemycells.runtime.devices import peak_rss_mib

    allocator.configure()  # as inference.py does at start-up
    seconds = [0.0]
    policy = BudgetPolicy(device=device, half=device == "cuda", vram_budget_gib=None, time_budget_s=None, threads=threads)
    manifest = without_trust(load_manifest(REPO / "resources"))  # the whole pipeline, whatever trust would decide
    fuser = Fuser(manifest, policy, loader=instant_loader(seconds))
    started, cpu = time.perf_counter(), time.process_time()
    report = process_file(path, out, fuser, "float32")
    wall, cpu = time.perf_counter() - started, time.process_time() - cpu
    (out / path.name).unlink(missing_ok=True)
    return {"report": dataclasses.asdict(report), "fake_forward_s": seconds[0], "wall_s": wall, "cpu_s": cpu, "peak_rss_mib": peak_rss_mib()}


def run_once(path: Path, device: str, threads: int) -> dict:
    with tempfile.TemporaryDirectory(dir=path.parent) as out:
        cmd = [sys.executable, __file__, "--worker", str(path), "--out", out, "--device", device, "--threads", str(threads)]
        env = {**os.environ, "MALLOC_ARENA_MAX": os.environ.get("MALLOC_ARENA_MAX", "1")}  # as in the image
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"worker failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def summarise(run: dict, input_mib: float) -> dict:
    """The figures of one run: seconds per stage, profile, non-network seconds, peak RSS / input."""
    report = run["report"]
    seconds = dict(report["seconds"])
    profile = seconds.pop("profile_s", None)
    total = seconds.get("total", run["wall_s"])
    return {
        "status": report["status"], "error": report["error"], "degradation": report["degradation"],
        "seconds": seconds, "profile_s": profile, "fake_forward_s": round(run["fake_forward_s"], 3),
        "non_network_s": round(total - run["fake_forward_s"], 3), "cpu_s": round(run.get("cpu_s", 0.0), 1),
        "peak_rss_mib": round(run["peak_rss_mib"], 1),
        "rss_over_input": round(run["peak_rss_mib"] / input_mib, 3), "high_res_grid": report["high_res_grid"],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", type=int, nargs=3, default=[40, 400, 400], metavar=("Z", "Y", "X"), help="stack (voxels)")
    parser.add_argument("--json", type=Path, default=None, help="write the figures here")
    parser.add_argument("--case-dir", type=Path, default=None, help="keep the generated stack here (reused when present)")
    parser.add_argument("--repeat", type=int, default=1, help="runs (each in a fresh process); the fastest is summarised")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args.worker, args.out, args.device, args.threads), default=str))
        return 0
    shape = tuple(args.shape)
    with tempfile.TemporaryDirectory(dir=REPO / "work_dirs" if (REPO / "work_dirs").is_dir() else None) as tmp:
        folder = args.case_dir / "x".join(map(str, shape)) if args.case_dir is not None else Path(tmp)
        path = make_case(folder, shape)
        input_mib = 2 * float(np.prod(shape)) / 2**20
        load_before = os.getloadavg()
        runs = [summarise(run_once(path, args.device, args.threads), input_mib) for _ in range(max(1, args.repeat))]
        load_after = os.getloadavg()
    best = min(runs, key=lambda r: r["non_network_s"])
    result = {
        "shape": list(shape), "spacing_um": list(SPACING), "device": args.device, "threads": args.threads, "cpu_count": os.cpu_count(),
        "input_mib": round(input_mib, 1), "loadavg_before": [round(v, 2) for v in load_before],
        "loadavg_after": [round(v, 2) for v in load_after], "best": best, "runs": runs,
    }
    print(f"stack {shape} uint16 ({input_mib:.0f} MiB), H {best['high_res_grid']}, device {args.device}, {args.threads} threads; "
          f"load average {load_before[0]:.2f} → {load_after[0]:.2f}; status {best['status']}, level {best['degradation']}")
    for name, value in best["seconds"].items():
        print(f"  {name:<28s} {value:8.2f} s")
    if best["profile_s"]:
        print("  profile (exclusive seconds):")
        for name, value in best["profile_s"].items():
            print(f"    {name:<26s} {value:8.2f} s")
    print(f"  fake network forward         {best['fake_forward_s']:8.2f} s")
    print(f"  non-network                  {best['non_network_s']:8.2f} s" + (f"   (runs: {[r['non_network_s'] for r in runs]})" if len(runs) > 1 else ""))
    print(f"  CPU time (all threads)       {best['cpu_s']:8.1f} s")
    print(f"  peak RSS                     {best['peak_rss_mib']:8.0f} MiB = {best['rss_over_input']:.2f}× the input")
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=1))
    return 0 if best["status"] == "ok" else 1


if __name__ == "__main__":
    raise SystemExit(main())
