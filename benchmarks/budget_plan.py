"""What the deadline rules choose for each real study shape on a CPU fallback, as a Markdown table.

    python benchmarks/budget_plan.py [--budget 480] [--speed 0.7 1.0 1.3]

For each shape, ``fusemycells.budget.plan_first_file``: the policy's first-file estimates decide
(reserve, global-stage guard), the patch stage's level follows from the real patch rate, and each
phase takes the measured 2-core time (``CPU_2CORE``) divided by ``speed`` (Grand Challenge's 4 vCPUs
are 2 hyperthreaded cores: speed ≈ 1, read as 0.7–1.3; README *Budgets*). No computation is run.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fusemycells.budget import plan_first_file  # noqa: E402

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
    args = parser.parse_args(argv)
    speeds = " | ".join(f"speed {s:g}: level, s" for s in args.speed)
    print(f"| stack @ µm (H grid) | {speeds} |")
    print("|---|" + "---|" * len(args.speed))
    for shape, spacing in STUDY_SHAPES:
        plans = [plan_first_file(shape, spacing, args.budget, speed=s) for s in args.speed]
        name = "×".join(map(str, shape)) + f" @ {spacing[0]:g}/{spacing[1]:g} ({'×'.join(map(str, plans[0].high_res_grid))})"
        cells = " | ".join(f"{p.level}, {p.total_s:.0f}" for p in plans)
        print(f"| {name} | {cells} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
