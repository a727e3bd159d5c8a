"""Patch-stage benchmark: our streamed sliding window against MONAI ``sliding_window_inference``.

    python benchmarks/bench_stitching.py [--shape Z Y X] [--json FILE]

Same TorchScript model (the shipped nucleus patch stage by default), same 2-channel float32
volume, same patch size, overlap and batch size, Gaussian weighting (σ = patch/8) on both sides.
Each method runs in its own subprocess so that its peak RSS (``VmHWM``) is its own. Printed:
time ratio (ours / MONAI), peak-RSS ratio (whole process, and above the common baseline of the
interpreter + torch + model), max |ours − MONAI|, and our overhead ratio = patch-stage wall
time / Σ pure forward time of the same patches. Our side runs as in the pipeline: it streams the
channels a row of patches at a time (here from the file), keeps a float16 correction
(prediction − image) and, on a CPU, runs one single-threaded forward per thread side by side
(``--workers``; MONAI's loop runs one multi-threaded forward at a time); then the pure forward
time is that of the same batches run as many at a time without stitching (timed on a sample).
MONAI needs the whole input as a tensor and returns a float32 volume.
Needs ``pip install -r benchmarks/requirements.txt`` (MONAI is never part of the image).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
IMAGE_MALLOC_ARENA_MAX = "1"
"""glibc arenas as the Dockerfile sets them; both workers run with it unless MALLOC_ARENA_MAX is set."""
GOALS = {"time_ratio": 0.67, "rss_ratio": 0.5, "overhead_ratio": 1.15, "max_abs_diff": 1e-3}


def peak_rss_bytes() -> int:
    """This worker's own peak RSS (``VmHWM``; ``ru_maxrss`` would include the parent's peak, which
    Linux carries across fork and exec: here the parent made the input volume)."""
    from fusemycells.runtime.devices import peak_rss_mib

    return int(peak_rss_mib() * 2**20)


def make_input(shape: tuple[int, int, int], seed: int = 0) -> np.ndarray:
    """(2, Z, Y, X) float32: a blob volume and a smoothed copy (image, stage-1 prediction)."""
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    image = ndimage.gaussian_filter(rng.random(shape, dtype=np.float32), 2.0)
    image = (image - image.mean()) / (image.std() + 1e-6)
    return np.stack([image, ndimage.gaussian_filter(image, 3.0)]).astype(np.float32)


class NpyPlanes:
    """One channel of a (C, Z, Y, X) float32 .npy file as a plane source, read with plain file reads
    (no memory map, whose touched pages would count towards RSS): it stands in for the pipeline's
    row-by-row resampled channels, so only what the caller keeps counts towards its RSS."""

    def __init__(self, path: Path, channel: int) -> None:
        with open(path, "rb") as handle:
            major, _ = np.lib.format.read_magic(handle)
            read_header = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
            shape, _, dtype = read_header(handle)
            self.offset = handle.tell()
        if dtype != np.float32 or len(shape) != 4:
            raise ValueError(f"{path}: expected a (C, Z, Y, X) float32 array, got {shape} {dtype}")
        self.path, self.channel = path, channel
        self.shape = tuple(int(n) for n in shape[1:])

    def planes(self, z0: int, z1: int) -> np.ndarray:
        plane = self.shape[1] * self.shape[2]
        with open(self.path, "rb") as handle:
            handle.seek(self.offset + 4 * plane * (self.channel * self.shape[0] + z0))
            return np.fromfile(handle, dtype=np.float32, count=plane * (z1 - z0)).reshape(z1 - z0, *self.shape[1:])


def load_model(path: Path, threads: int):
    import torch

    torch.set_num_threads(threads)
    return torch, torch.jit.load(str(path), map_location="cpu").eval()


def default_workers(threads: int) -> int:
    """Concurrent patch batches our pipeline would use for TorchScript on ``threads`` CPU cores."""
    from types import SimpleNamespace

    from fusemycells.backends import patch_workers

    return patch_workers(SimpleNamespace(torch_cpu_forward=True), threads)  # a TorchScriptRunner on the CPU says so


def pure_forward_seconds(predict, batches: int, workers: int, shape: tuple[int, ...], sample: int = 24) -> float:
    """Σ forward time of ``batches`` batches run ``workers`` at a time without any stitching, from a
    timed sample of them (with concurrent forwards, the sum of per-call times would overstate it)."""
    from concurrent.futures import ThreadPoolExecutor

    from fusemycells.runtime.devices import torch_threads

    x = np.random.default_rng(0).random(shape, dtype=np.float32)
    count = max(workers, min(batches, sample))
    with torch_threads(1 if workers > 1 else None), ThreadPoolExecutor(workers) as pool:
        list(pool.map(lambda _: predict(x), range(workers)))  # each thread warmed up once
        t0 = time.perf_counter()
        list(pool.map(lambda _: predict(x), range(count)))
        per_batch = (time.perf_counter() - t0) / count
    return per_batch * batches


def worker(method: str, data: Path, model_path: Path, out: Path, patch: int, overlap: float, batch: int, threads: int, workers: int | None) -> dict:
    torch, model = load_model(model_path, threads)
    volume = np.load(data, mmap_mode="r")
    # The shared baseline: interpreter, torch, the model, each side's stitching module (MONAI's import alone is
    # ≈ 40 MiB) and a warm-up forward, so both sides pay the same one-time costs before timing and RSS counting.
    if method == "ours":
        import fusemycells.stitching  # noqa: F401
    else:
        import monai.inferers  # noqa: F401
    with torch.inference_mode():
        model(torch.zeros(batch, 2, patch, patch, patch))
    baseline = peak_rss_bytes()
    started = time.perf_counter()
    if method == "ours":
        from fusemycells.runtime import allocator
        from fusemycells.runtime.devices import torch_threads
        from fusemycells.stitching import sliding_window

        workers = default_workers(threads) if workers is None else workers

        def predict(batch_array: np.ndarray) -> np.ndarray:
            with torch.inference_mode():
                return model(torch.from_numpy(batch_array)).numpy()

        # As in the pipeline: the channels are streamed (here from the file, a row of patches at a
        # time) and the result is kept as a float16 correction (prediction − image).
        del volume
        image = NpyPlanes(data, 0)
        correction = np.empty(image.shape, dtype=np.float16)

        def emit(z0: int, z1: int, planes: np.ndarray) -> None:
            planes -= image.planes(z0, z1)  # in place, as the pipeline does
            correction[z0:z1] = planes

        # As in the pipeline: TorchScript on a CPU runs `workers` single-threaded forwards side by side,
        # with inference.py's allocator settings.
        allocator.configure()
        with torch_threads(1 if workers > 1 else None):
            _, stats = sliding_window([image, NpyPlanes(data, 1)], predict, (patch,) * 3, overlap=overlap, batch_size=batch, emit=emit, workers=workers)
        wall = time.perf_counter() - started
        forward_s = stats.forward_s if workers == 1 else pure_forward_seconds(predict, stats.batches, workers, (batch, 2, patch, patch, patch))
        result = correction
        patches = stats.patches
    else:
        from monai.inferers import sliding_window_inference

        from fusemycells.stitching import gaussian_importance

        tensor = torch.from_numpy(np.ascontiguousarray(volume))[None]
        calls, forward = [0], [0.0]  # patches and Σ forward seconds (MONAI calls one forward at a time)

        def predict_monai(x):
            calls[0] += x.shape[0]
            t0 = time.perf_counter()
            with torch.inference_mode():
                y = model(x)
            forward[0] += time.perf_counter() - t0
            return y

        # MONAI's own Gaussian map (σ = patch/8) is clamped at 1e-3 in 3D, which gives patch borders
        # equal weight near the volume's faces; ours floors each axis (as nnU-Net, tiny corners).
        # Feed MONAI our map so that both stitch with the same Gaussian weights and the difference
        # measures the stitching itself.
        weight_map = torch.from_numpy(gaussian_importance((patch,) * 3))
        with torch.inference_mode():
            output = sliding_window_inference(
                tensor, (patch,) * 3, batch, predict_monai, overlap=overlap, mode="gaussian", sigma_scale=0.125, padding_mode="reflect", roi_weight_map=weight_map
            )
        result = output[0, 0].numpy()
        patches = calls[0]
        wall = time.perf_counter() - started
        forward_s = forward[0]
        workers = 1
    peak = peak_rss_bytes()
    np.save(out, result)
    return {"method": method, "wall_s": wall, "forward_s": forward_s, "patches": patches, "workers": workers, "peak_rss_bytes": peak, "baseline_rss_bytes": baseline}


def run_worker(method: str, args: argparse.Namespace, data: Path, out: Path) -> dict:
    cmd = [sys.executable, __file__, "--worker", method, "--data", str(data), "--out", str(out), "--model", str(args.model),
           "--patch", str(args.patch), "--overlap", str(args.overlap), "--batch", str(args.batch), "--threads", str(args.threads)]
    if args.workers is not None:
        cmd += ["--workers", str(args.workers)]
    env = {**os.environ, "MALLOC_ARENA_MAX": os.environ.get("MALLOC_ARENA_MAX", IMAGE_MALLOC_ARENA_MAX)}
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"{method} worker failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def default_model() -> Path:
    manifest = json.loads((REPO / "resources" / "manifest.json").read_text())
    return REPO / "resources" / manifest["channels"]["nucleus"]["patch_stage"]["files"]["torchscript"]["path"]


def monai_starts(length: int, patch: int, overlap: float) -> list[int]:
    """Window starts of MONAI's ``sliding_window_inference`` along one axis (voxels): every
    ``int(patch·(1 − overlap))`` voxels, the last one moved back to end at the border."""
    if length <= patch:
        return [0]
    step = max(1, int(patch * (1.0 - overlap)))
    count = math.ceil((length - patch) / step) + 1
    return [min(i * step, length - patch) for i in range(count)]


def same_windows(shape: list[int], patch: int, overlap: float) -> bool:
    """Whether both methods place their windows at the same positions (ours spread them evenly,
    as nnU-Net; they coincide where ``length − patch`` is a multiple of the step on every axis)."""
    from fusemycells.stitching import window_starts

    return all(window_starts(n, patch, overlap) == monai_starts(n, patch, overlap) for n in shape)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", type=int, nargs=3, default=[128, 320, 320], metavar=("Z", "Y", "X"), help="volume (voxels)")
    parser.add_argument("--patch", type=int, default=64, help="cubic patch size (voxels)")
    parser.add_argument("--overlap", type=float, default=0.5)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--workers", type=int, default=None, help="our concurrent patch batches (default: as the pipeline, one per thread for TorchScript on CPU)")
    parser.add_argument("--model", type=Path, default=None, help="TorchScript patch model with 2 input channels (default: shipped nucleus patch stage)")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--worker", choices=["ours", "monai"], help=argparse.SUPPRESS)
    parser.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.model is None:
        args.model = default_model()
    if args.worker:
        print(json.dumps(worker(args.worker, args.data, args.model, args.out, args.patch, args.overlap, args.batch, args.threads, args.workers)))
        return 0

    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "input.npy"
        np.save(data, make_input(tuple(args.shape)))
        runs = {m: run_worker(m, args, data, Path(tmp) / f"{m}.npy") for m in ("ours", "monai")}
        ours_out = np.load(Path(tmp) / "ours.npy").astype(np.float32) + np.load(data, mmap_mode="r")[0]  # image + correction
        diff = float(np.abs(ours_out - np.load(Path(tmp) / "monai.npy")).max())
    ours, monai = runs["ours"], runs["monai"]
    result = {
        "shape": args.shape, "malloc_arena_max": os.environ.get("MALLOC_ARENA_MAX", IMAGE_MALLOC_ARENA_MAX), "patch": args.patch, "overlap": args.overlap, "batch": args.batch, "threads": args.threads, "model": str(args.model),
        "ours": ours, "monai": monai,
        "time_ratio": ours["wall_s"] / monai["wall_s"],
        "rss_ratio": ours["peak_rss_bytes"] / monai["peak_rss_bytes"],
        "rss_above_baseline_ratio": (ours["peak_rss_bytes"] - ours["baseline_rss_bytes"]) / max(1, monai["peak_rss_bytes"] - monai["baseline_rss_bytes"]),
        "overhead_ratio": ours["wall_s"] / ours["forward_s"],
        "monai_overhead_ratio": monai["wall_s"] / monai["forward_s"],
        "max_abs_diff": diff,
        "same_windows": same_windows(args.shape, args.patch, args.overlap),
        "goals": GOALS,
    }
    mib = 2**20
    arenas = os.environ.get("MALLOC_ARENA_MAX", IMAGE_MALLOC_ARENA_MAX)
    print(f"volume {tuple(args.shape)}, patch {args.patch}³, overlap {args.overlap}, batch {args.batch}, {args.threads} threads (ours: {ours['workers']} concurrent batch(es)), MALLOC_ARENA_MAX={arenas}; patches ours {ours['patches']}, MONAI {monai['patches']}")
    print(f"wall         ours {ours['wall_s']:8.2f} s   MONAI {monai['wall_s']:8.2f} s   ratio {result['time_ratio']:.3f}  (goal ≤ {GOALS['time_ratio']})")
    print(f"peak RSS     ours {ours['peak_rss_bytes'] / mib:8.0f} MiB MONAI {monai['peak_rss_bytes'] / mib:8.0f} MiB ratio {result['rss_ratio']:.3f}  (goal ≤ {GOALS['rss_ratio']})")
    print(f"  above baseline (interpreter + torch + model): ours {(ours['peak_rss_bytes'] - ours['baseline_rss_bytes']) / mib:.0f} MiB, MONAI {(monai['peak_rss_bytes'] - monai['baseline_rss_bytes']) / mib:.0f} MiB, ratio {result['rss_above_baseline_ratio']:.3f}")
    print(f"overhead     ours {result['overhead_ratio']:.3f} (wall / Σ forward; goal ≤ {GOALS['overhead_ratio']}), MONAI {result['monai_overhead_ratio']:.3f}")
    print(f"max |ours − MONAI| {diff:.2e}  (goal ≤ {GOALS['max_abs_diff']})")
    if not result["same_windows"]:
        print("  windows at different positions (MONAI steps and moves the last one back, ours spreads them evenly):"
              " the difference includes the network's dependence on where a window starts, not only the stitching;"
              " for a like-for-like comparison make each (size − patch) a multiple of the step")
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
