"""Peak memory of the issue #29 mid-size run against its goal: ≤ 3× the input's bytes.

    python benchmarks/mid_memory.py [--work work_dirs/mid] [--shape 160 900 900] [--time-budget 25] [--no-trust]

Writes the synthetic nucleus stack of ``make_large_case.py`` (once; 160×900×900 uint16, 247 MB by default),
runs ``inference.py --device cpu --time-budget 25 --report R`` on it in a fresh process and prints the report's
peak RSS (``VmHWM``), its ratio to the input's bytes, the degradation level and the profile. ``--no-trust``
runs the networks whatever the shipped trust decides (a copy of the manifest without trust blocks, the weights
linked): the worst case. Exit status 1 when the peak is above the goal. For measurement, not for CI (≈ 15–60 s
on 2 cores; ``test/test_memory.py`` checks a smaller proxy of the output pass).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))

GOAL_RATIO = 3.0
"""Peak RSS over the input's bytes (the issue's done-when)."""


def make_case(work: Path, shape: tuple[int, int, int]) -> Path:
    """The input root with the synthetic stack (written on first use)."""
    from make_large_case import INPUT_SUBDIR
    from make_large_case import main as make

    root = work / "input"
    if not (root / INPUT_SUBDIR / "large_nucleus.tif").exists():
        make(["--out", str(root), "--shape", *map(str, shape)])
    return root


def untrusted_resources(work: Path) -> Path:
    """A resources folder whose manifest has no trust blocks (the constant gate), the weights linked."""
    source = REPO / "resources"
    target = work / "resources_no_trust"
    target.mkdir(parents=True, exist_ok=True)
    for path in source.iterdir():
        link = target / path.name
        if path.name != "manifest.json" and not link.exists():
            link.symlink_to(path)
    manifest = json.loads((source / "manifest.json").read_text())
    for channel in manifest["channels"].values():
        channel.pop("trust", None)
    (target / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=REPO / "work_dirs" / "mid")
    parser.add_argument("--shape", type=int, nargs=3, default=[160, 900, 900], metavar=("Z", "Y", "X"))
    parser.add_argument("--time-budget", type=float, default=25.0)
    parser.add_argument("--no-trust", action="store_true", help="run the networks whatever trust decides")
    args = parser.parse_args(argv)
    root = make_case(args.work, tuple(args.shape))
    report = args.work / "report.json"
    command = [sys.executable, str(REPO / "inference.py"), "--input", str(root), "--output", str(args.work / "out"),
               "--device", "cpu", "--time-budget", str(args.time_budget), "--report", str(report)]  # fmt: skip
    if args.no_trust:
        command += ["--resources", str(untrusted_resources(args.work))]
    subprocess.run(command, check=True, capture_output=True)
    case = json.loads(report.read_text())["files"][0]
    input_mib = 2 * args.shape[0] * args.shape[1] * args.shape[2] / 2**20
    ratio = case["peak_rss_mib"] / input_mib
    print(json.dumps({
        "shape": args.shape, "no_trust": args.no_trust, "degradation": case["degradation"],
        "peak_rss_mib": case["peak_rss_mib"], "input_mib": round(input_mib, 1), "ratio": round(ratio, 2),
        "goal_ratio": GOAL_RATIO, "profile_s": case["seconds"].get("profile_s"),
    }))  # fmt: skip
    return 0 if ratio <= GOAL_RATIO else 1


if __name__ == "__main__":
    raise SystemExit(main())
