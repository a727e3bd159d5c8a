"""What the degradation ladder chooses for each real study shape on a CPU fallback, as a Markdown table.

    python benchmarks/budget_plan.py [--budget 480] [--speed 0.7 1.0 1.3] [--backend auto] [--precision auto]

For each shape, ``fusemycells.runtime.ladder.plan_first_file``: the pipeline's own ladder decides on the
policy's first-file estimates (reserve, global-stage guard), the patch stage's level follows from the real
patch rate of the backend and precision the run uses (``budget.cpu_rates``; ``auto``: what ``inference.py
--backend auto --precision auto`` picks on this machine), and each phase takes the measured 2-core time
(``CPU_2CORE``) divided by ``speed`` (Grand Challenge's 4 vCPUs are 2 hyperthreaded cores: speed ≈ 1, read as
0.7–1.3; docs/budget.md). No computation is run.

The last columns are the transfer margin: Grand Challenge's limit per case (``--limit``, 600 s) holds the
download of the input (uint16) and the upload of the output besides the process, whose budget counts from
its start; the time left is the limit less the slowest speed's planned total, and the rate shown is what
moving the input and the output (uint16, the default, / float32) in that time needs.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fusemycells.backends import backend_order  # noqa: E402
from fusemycells.runtime.budget import cpu_rates  # noqa: E402
from fusemycells.runtime.ladder import plan_first_file  # noqa: E402
from fusemycells.runtime.precision import cpu_flags, cpu_precision  # noqa: E402

MODULES = {"openvino": "openvino", "onnx": "onnxruntime", "torchscript": "torch"}

STUDY_SHAPES = [  # ZYX voxels, ZYX µm (README, issue 13)
    ((222, 731, 860), (1.0, 0.195, 0.195)),
    ((264, 2008, 1091), (1.0, 0.195, 0.195)),
    ((891, 817, 817), (1.0, 0.39, 0.39)),
    ((80, 1920, 1920), (3.0, 0.33, 0.33)),
    ((309, 1920, 1920), (1.01, 0.388, 0.388)),
]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget", type=float, default=480.0, help="seconds from the process start")
    parser.add_argument("--speed", type=float, nargs="+", default=[0.7, 1.0, 1.3])
    parser.add_argument("--limit", type=float, default=600.0, help="seconds per case, transfers included")
    parser.add_argument("--backend", default="auto", choices=["auto", *MODULES], help="network runtime on the CPU")
    parser.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"], help="CPU forward precision")
    args = parser.parse_args(argv)
    precision, backend = run_backend(args.backend, args.precision)
    rates = cpu_rates(backend, precision)
    print(f"{backend} {precision}: {rates.patch_s:.3f} s per 64³ patch on 2 cores (speed 1), budget {args.budget:g} s\n")
    speeds = " | ".join(f"speed {s:g}: level, s" for s in args.speed)
    print(f"| stack @ µm (H grid) | {speeds} | input, output MB (uint16 / float32) | transfer s left | MB/s needed |")
    print("|---|" + "---|" * (len(args.speed) + 3))
    for shape, spacing in STUDY_SHAPES:
        plans = [plan_first_file(shape, spacing, args.budget, rates=rates, speed=s) for s in args.speed]
        name = "×".join(map(str, shape)) + f" @ {spacing[0]:g}/{spacing[1]:g} ({'×'.join(map(str, plans[0].high_res_grid))})"
        cells = " | ".join(f"{p.level}, {p.total_s:.0f}" for p in plans)
        moved = transfer_margin(shape, max(p.total_s for p in plans), args.limit)
        print(f"| {name} | {cells} | {moved} |")
    return 0


def run_backend(backend: str, precision: str) -> tuple[str, str]:
    """(precision, backend) a CPU run uses: ``auto`` precision from this machine's flags, ``auto`` backend the
    first of :func:`backend_order` whose module is installed here."""
    precision = cpu_precision(precision, cpu_flags())
    if backend == "auto":
        order = backend_order("auto", "cpu", precision)
        backend = next((b for b in order if importlib.util.find_spec(MODULES[b]) is not None), order[-1])
    return precision, backend


def transfer_margin(shape: tuple[int, int, int], process_s: float, limit_s: float) -> str:
    """Table cells: input and output sizes (MB; uint16 input, uint16 / float32 output), the seconds the case's
    ``limit_s`` leaves after a process of ``process_s``, and the MB/s that moving both needs in them."""
    voxels = shape[0] * shape[1] * shape[2]
    input_mb, uint16_mb, float32_mb = 2 * voxels / 1e6, 2 * voxels / 1e6, 4 * voxels / 1e6
    left = limit_s - process_s
    rates = " / ".join(f"{(input_mb + out) / left:.0f}" if left > 0 else "∞" for out in (uint16_mb, float32_mb))
    return f"{input_mb:.0f}, {uint16_mb:.0f} / {float32_mb:.0f} | {left:.0f} | {rates}"


if __name__ == "__main__":
    raise SystemExit(main())
