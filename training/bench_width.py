"""Cost of the patch stage per U-Net width: measured on this CPU, extrapolated to a T4.

    python -m training.bench_width --bases 8 12 16 24 32 --json work_dirs/width.json

For each base width: parameters, FLOPs of one forward of a (1, 2, 64, 64, 64) patch (torch's
FlopCounterMode: 2 per multiply-add), the bytes of every layer's output (activation traffic), and
the measured single-thread CPU time (median of ``--repeats``). The global stage (first stride 2)
is counted at the ``--grid`` (224³ in the paper preset), FLOPs only.

T4 extrapolation (unmeasured: no GPU here): time per patch = FLOPs / (efficiency × 65 TFLOP/s
fp16 tensor peak) + activation bytes × 2 (written, read again) in fp16 / (efficiency × 320 GB/s),
for efficiency 0.3 (optimistic) and 0.1 (pessimistic); times the number of patches of a case
(50 % overlap). The cases: 2 470 patches (a real H grid ≈ 448×640×352) and 23 104 (the largest
real study, H 520×1242×1242; README *Budgets*).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from .models import ResidualUNet3D, count_parameters

T4_FP16_TFLOPS = 65.0  # NVIDIA T4 datasheet: mixed-precision (fp16 tensor core) peak
T4_BANDWIDTH_GBS = 320.0  # NVIDIA T4 datasheet: GDDR6 bandwidth
CASES = {"typical (448x640x352 H)": 2470, "largest (520x1242x1242 H)": 23104}


def forward_flops(model: torch.nn.Module, x: torch.Tensor) -> int:
    """FLOPs of one forward (2 per multiply-add)."""
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(x)
    return int(counter.get_total_flops())


def activation_bytes(model: torch.nn.Module, x: torch.Tensor, bytes_per_value: int = 2) -> int:
    """Bytes of every leaf module's output in one forward (``bytes_per_value`` 2: fp16)."""
    total = 0

    def hook(_module: torch.nn.Module, _inp: object, out: torch.Tensor) -> None:
        nonlocal total
        total += out.numel() * bytes_per_value

    handles = [m.register_forward_hook(hook) for m in model.modules() if not list(m.children())]
    with torch.no_grad():
        model(x)
    for h in handles:
        h.remove()
    return total


def cpu_seconds(model: torch.nn.Module, x: torch.Tensor, repeats: int) -> float:
    """Median wall time of one forward on this CPU (after one warm-up)."""
    times = []
    with torch.no_grad():
        model(x)
        for _ in range(repeats):
            started = time.perf_counter()
            model(x)
            times.append(time.perf_counter() - started)
    return statistics.median(times)


def t4_seconds(flops: int, act_bytes: int, efficiency: float) -> float:
    """Estimated T4 time of one forward: compute at ``efficiency`` × fp16 peak plus activation traffic at ``efficiency`` × bandwidth."""
    return flops / (efficiency * T4_FP16_TFLOPS * 1e12) + 2 * act_bytes / (efficiency * T4_BANDWIDTH_GBS * 1e9)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bases", type=int, nargs="+", default=[8, 12, 16, 24, 32])
    parser.add_argument("--depth", type=int, default=3)
    parser.add_argument("--patch", type=int, default=64)
    parser.add_argument("--grid", type=int, default=224, help="global grid edge (voxels) for the global stage's FLOPs")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = []
    x = torch.randn(1, 2, args.patch, args.patch, args.patch)
    g = torch.randn(1, 1, args.grid, args.grid, args.grid)
    for base in args.bases:
        patch_model = ResidualUNet3D(2, base=base, depth=args.depth).eval()
        global_model = ResidualUNet3D(1, base=base, depth=args.depth, first_stride=2).eval()
        flops, act = forward_flops(patch_model, x), activation_bytes(patch_model, x)
        row = {
            "base": base,
            "patch_parameters": count_parameters(patch_model),
            "patch_gflops": flops / 1e9,
            "patch_activation_mb_fp16": act / 1e6,
            "patch_cpu_s": cpu_seconds(patch_model, x, args.repeats),
            "global_gflops": forward_flops(global_model, g) / 1e9,
            "global_activation_mb_fp16": activation_bytes(global_model, g) / 1e6,
        }
        row["cpu_gflop_per_s"] = row["patch_gflops"] / row["patch_cpu_s"]
        for eff in (0.3, 0.1):
            per_patch = t4_seconds(flops, act, eff)
            row[f"t4_ms_per_patch_eff{eff}"] = per_patch * 1e3
            row[f"t4_global_s_eff{eff}"] = t4_seconds(int(row["global_gflops"] * 1e9), int(row["global_activation_mb_fp16"] * 1e6), eff)
            for name, n in CASES.items():
                row[f"t4_patch_stage_s_eff{eff} {name}"] = per_patch * n
        rows.append(row)
        print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"threads": args.threads, "patch": args.patch, "grid": args.grid, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
