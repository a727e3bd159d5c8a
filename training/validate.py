"""Held-out validation of the FULL container pipeline on simulated data.

Generates a simulated set with seeds never used in training, runs ``inference.py`` on the TIFF
files exactly as the container would (subprocess, real manifest and weights), then scores the
outputs with ``python -m fusemycells.evaluate`` (N-SSIM, Gaussian baseline, identity = 0).

    python -m training.validate --resources resources --out work_dirs/val --n 6 --seed 900000
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import subprocess
import sys
import time
from pathlib import Path

from fusemycells.config import INPUT_SUBDIR, OUTPUT_SUBDIR

from .simulate import write_dataset

log = logging.getLogger("training.validate")
REPO = Path(__file__).resolve().parent.parent


def prepare_inputs(data_dir: Path, input_root: Path) -> list[Path]:
    """Copy every ``*_angle.tif`` under ``data_dir`` into the GC input layout under ``input_root``."""
    target = input_root / INPUT_SUBDIR
    target.mkdir(parents=True, exist_ok=True)
    copied = []
    for path in sorted(data_dir.rglob("*_angle.tif")):
        shutil.copy2(path, target / path.name)
        copied.append(target / path.name)
    return copied


def run(cmd: list[str]) -> None:
    log.info("$ %s", " ".join(cmd))
    subprocess.run(cmd, check=False, cwd=REPO).check_returncode()


def summarise(scores: dict) -> dict[str, dict[str, float]]:
    """Per-channel mean/min of ours and the Gaussian baseline from the evaluate JSON."""
    table: dict[str, dict[str, float]] = {}
    cases = scores["cases"]
    for channel in sorted({c["channel"] for c in cases}):
        rows = [c for c in cases if c["channel"] == channel]
        ours = [c["n_ssim"] for c in rows]
        gauss = [c["n_ssim_gaussian"] for c in rows]
        table[channel] = {
            "n": len(rows),
            "ours_mean": sum(ours) / len(ours),
            "ours_min": min(ours),
            "gaussian_mean": sum(gauss) / len(gauss),
            "identity": 0.0,
        }
    return table


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--resources", type=Path, default=REPO / "resources", help="weights folder with manifest.json")
    parser.add_argument("--out", type=Path, required=True, help="work folder (data, predictions, scores)")
    parser.add_argument("--n", type=int, default=6, help="cases per channel")
    parser.add_argument("--seed", type=int, default=900_000, help="first seed (training uses seeds < 100000)")
    parser.add_argument("--channels", nargs="+", default=["nucleus", "membrane"])
    parser.add_argument("--data", type=Path, default=None, help="use an existing dataset folder instead of simulating")
    parser.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="extra inference.py flags")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)-7s %(message)s", datefmt="%H:%M:%S")

    data_dir = args.data or args.out / "data"
    if args.data is None:
        started = time.perf_counter()
        write_dataset(data_dir, args.n, args.seed, channels=args.channels, study="validation")
        log.info("simulated %d case(s) per channel in %.1f s", args.n, time.perf_counter() - started)
    input_root, output_root = args.out / "input", args.out / "output"
    shutil.rmtree(input_root, ignore_errors=True)
    shutil.rmtree(output_root, ignore_errors=True)
    prepare_inputs(data_dir, input_root)
    started = time.perf_counter()
    run([sys.executable, "inference.py", "--input", str(input_root), "--output", str(output_root),
         "--resources", str(args.resources), "--report", str(args.out / "report.json"), *args.extra])
    log.info("inference took %.1f s", time.perf_counter() - started)
    scores_path = args.out / "scores.json"
    run([sys.executable, "-m", "fusemycells.evaluate", "--input", str(input_root / INPUT_SUBDIR),
         "--pred", str(output_root / OUTPUT_SUBDIR), "--gt", str(data_dir), "--json", str(scores_path),
         "--png", str(args.out / "qc.png")])
    table = summarise(json.loads(scores_path.read_text()))
    (args.out / "summary.json").write_text(json.dumps(table, indent=2))
    print("| channel | n | ours (mean) | ours (min) | Gaussian (mean) | identity |")
    print("|---|---|---|---|---|---|")
    for channel, row in table.items():
        print(f"| {channel} | {row['n']} | {row['ours_mean']:.4f} | {row['ours_min']:.4f} | {row['gaussian_mean']:.4f} | 0 |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
