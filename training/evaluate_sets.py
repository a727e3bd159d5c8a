"""Full-pipeline evaluation of a set of weights on held-out sets, with the gate ablations.

    python -m training.evaluate_sets --checkpoints CKPT --out WORK [--n 4] [--xcheck-seeds 202601 ...]
    python -m training.evaluate_sets --resources resources --out WORK          # the shipped weights

1. Weights: ``--checkpoints`` (``<channel>/global.pt`` / ``patch.pt``) are exported with
   ``training.export`` and the post-processing policy (``--postprocess``) into ``WORK/resources/policy``;
   ``--resources`` is copied there as it is. Two variants differ only in the manifest's
   ``gate_knots``: ``gate0`` (networks off: the pipeline skips them) and ``gate1`` (full weight).
2. Sets (written once, reused): ``validation`` (our simulator, seeds from 900000 as in § 5),
   ``validation_dr`` (our domain-randomised simulator, seeds from 910000; never trained on), and
   ``xcheck_<S>`` (the independent simulator ``benchmarks/crosscheck_sim.py`` at each seed S,
   which must never have been used for a choice).
3. Per set and variant: ``inference.py`` on the TIFF files (the container's entry point, CPU
   here) and ``python -m fusemycells.evaluate`` (N-SSIM). ``WORK/table.md`` and
   ``WORK/results.json``: per set and channel the mean and minimum of each variant, the Gaussian
   baseline, and networks-on (policy and gate 1) minus networks-off per case (mean, worst).
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
from typing import Any

from fusemycells.config import INPUT_SUBDIR, MANIFEST_NAME, OUTPUT_SUBDIR

from .simulate import Effects, write_dataset

log = logging.getLogger("training.evaluate_sets")
REPO = Path(__file__).resolve().parent.parent
GATES = {"gate0": 0.0, "gate1": 1.0}


def run(cmd: list[str], log_path: Path) -> None:
    """Run ``cmd`` in the repository root; its output goes to ``log_path``; raises on failure."""
    log.info("$ %s", " ".join(cmd))
    with open(log_path, "w") as handle:
        subprocess.run(cmd, cwd=REPO, stdout=handle, stderr=subprocess.STDOUT, check=True)


def with_constant_gate(manifest: dict[str, Any], gate: float) -> dict[str, Any]:
    """A copy of ``manifest`` whose every channel applies the networks' correction with the constant factor ``gate``
    (per-case ``trust`` removed: it would replace the factor)."""
    out = json.loads(json.dumps(manifest))
    for channel in out["channels"].values():
        channel.setdefault("postprocess", {})["gate_knots"] = [[0.0, gate], [1.0, gate]]
        channel.pop("trust", None)
    return out


def prepare_resources(args: argparse.Namespace, root: Path) -> dict[str, Path]:
    """The policy weights folder and its constant-gate variants."""
    policy = root / "policy"
    if not (policy / MANIFEST_NAME).is_file():
        if args.checkpoints is not None:
            run([sys.executable, "-m", "training.export", "--checkpoints", str(args.checkpoints), "--out", str(policy), "--postprocess", str(args.postprocess)], root / "export.log")
        else:
            shutil.copytree(args.resources, policy)
    variants = {"policy": policy}
    manifest = json.loads((policy / MANIFEST_NAME).read_text())
    for name, gate in GATES.items():
        folder = root / name
        if folder.exists():
            shutil.rmtree(folder)
        shutil.copytree(policy, folder)
        (folder / MANIFEST_NAME).write_text(json.dumps(with_constant_gate(manifest, gate), indent=2) + "\n")
        variants[name] = folder
    return variants


def prepare_sets(args: argparse.Namespace, root: Path) -> dict[str, tuple[Path, Path]]:
    """{set name: (GC input root, ground-truth folder)}; simulated once, reused."""
    sets: dict[str, tuple[Path, Path]] = {}
    for name, seed, randomise in (("validation", args.val_seed, False), ("validation_dr", args.val_dr_seed, True)):
        if seed is None:
            continue
        data = root / name / "data"
        if not (data / "validation" / "params.json").is_file():
            write_dataset(data, args.n, seed, channels=tuple(args.channels), study="validation", effects=Effects(randomise=randomise))
        inputs = root / name / "input"
        target = inputs / INPUT_SUBDIR
        target.mkdir(parents=True, exist_ok=True)
        for path in sorted(data.rglob("*_angle.tif")):
            if not (target / path.name).is_file():
                shutil.copy2(path, target / path.name)
        sets[name] = (inputs, data)
    for seed in args.xcheck_seeds:
        folder = root / f"xcheck_{seed}"
        if not (folder / "params.json").is_file():
            run([sys.executable, "benchmarks/crosscheck_sim.py", "--out", str(folder), "--n", str(args.n), "--seed", str(seed), "--channels", *args.channels], root / f"xcheck_{seed}.log")
        sets[f"xcheck_{seed}"] = (folder, folder / "ground-truth")
    return sets


def score_variant(set_name: str, inputs: Path, gt: Path, variant: str, resources: Path, root: Path, extra: list[str]) -> dict[str, Any]:
    """Run the pipeline and the evaluation for one (set, variant); returns evaluate's JSON."""
    work = root / "runs" / set_name / variant
    scores = work / "scores.json"
    if scores.is_file():
        return json.loads(scores.read_text())
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    started = time.perf_counter()
    run([sys.executable, "inference.py", "--input", str(inputs), "--output", str(work / "output"), "--resources", str(resources), "--report", str(work / "report.json"), *extra], work / "inference.log")
    seconds = time.perf_counter() - started
    run([sys.executable, "-m", "fusemycells.evaluate", "--input", str(inputs / INPUT_SUBDIR), "--pred", str(work / "output" / OUTPUT_SUBDIR), "--gt", str(gt), "--json", str(scores)], work / "evaluate.log")
    result = json.loads(scores.read_text())
    result["inference_seconds"] = round(seconds, 1)
    scores.write_text(json.dumps(result, indent=1))
    return result


def _case_key(case: dict[str, Any]) -> str:
    return str(case.get("name") or case.get("file") or case.get("input"))


def summarise(results: dict[str, dict[str, dict[str, Any]]]) -> dict[str, dict[str, dict[str, float]]]:
    """Per set and channel: mean / min N-SSIM per variant, Gaussian mean, on − off per case (mean, worst), cases below 0."""
    table: dict[str, dict[str, dict[str, float]]] = {}
    for set_name, variants in results.items():
        per_variant = {v: {_case_key(c): c for c in r["cases"]} for v, r in variants.items()}
        off = per_variant.get("gate0", {})
        channels = sorted({c["channel"] for r in variants.values() for c in r["cases"]})
        for channel in channels:
            row: dict[str, float] = {}
            for variant, cases in per_variant.items():
                vals = [c["n_ssim"] for c in cases.values() if c["channel"] == channel]
                row["n"] = len(vals)
                row[f"{variant}_mean"], row[f"{variant}_min"] = sum(vals) / len(vals), min(vals)
                row[f"{variant}_below0"] = sum(v < 0 for v in vals)
                if variant != "gate0" and off:
                    diffs = [c["n_ssim"] - off[k]["n_ssim"] for k, c in cases.items() if c["channel"] == channel and k in off]
                    row[f"{variant}_minus_off_mean"], row[f"{variant}_minus_off_worst"] = sum(diffs) / len(diffs), min(diffs)
            gauss = [c["n_ssim_gaussian"] for c in next(iter(per_variant.values())).values() if c["channel"] == channel]
            row["gaussian_mean"] = sum(gauss) / len(gauss)
            table.setdefault(set_name, {})[channel] = row
    return table


def markdown(table: dict[str, dict[str, dict[str, float]]]) -> str:
    lines = [
        "| set | channel | n | policy mean (min) | networks off, gate 0 (min) | full weight, gate 1 (min) | policy − off: mean / worst case | gate 1 − off: mean / worst case | Gaussian mean |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for set_name, channels in table.items():
        for channel, r in channels.items():
            lines.append(
                f"| {set_name} | {channel} | {r['n']} | {r['policy_mean']:.3f} ({r['policy_min']:.3f}) | {r['gate0_mean']:.3f} ({r['gate0_min']:.3f}) | "
                f"{r['gate1_mean']:.3f} ({r['gate1_min']:.3f}) | {r['policy_minus_off_mean']:+.3f} / {r['policy_minus_off_worst']:+.3f} | "
                f"{r['gate1_minus_off_mean']:+.3f} / {r['gate1_minus_off_worst']:+.3f} | {r['gaussian_mean']:.3f} |"
            )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoints", type=Path, help="training output with <channel>/global.pt and patch.pt (exported here)")
    source.add_argument("--resources", type=Path, help="an exported weights folder (manifest.json), used as it is")
    parser.add_argument("--out", type=Path, required=True, help="work folder (sets, weights variants, runs, table)")
    parser.add_argument("--postprocess", type=Path, default=REPO / "training" / "policy" / "postprocess.json", help="policy given to the export")
    parser.add_argument("--n", type=int, default=4, help="cases per channel and set")
    parser.add_argument("--val-seed", type=int, default=900_000, help="our validation set's first seed (None: skip)")
    parser.add_argument("--val-dr-seed", type=int, default=910_000, help="our domain-randomised validation set's first seed")
    parser.add_argument("--xcheck-seeds", type=int, nargs="*", default=[202611], help="independent-simulator seeds never used for a choice (777777, 31337, 4242 were)")
    parser.add_argument("--channels", nargs="+", default=["nucleus", "membrane"], choices=["nucleus", "membrane"], help="channels simulated in the sets (a new --out when changed)")
    parser.add_argument("--variants", nargs="+", default=["policy", *GATES], choices=["policy", *GATES])
    parser.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="extra inference.py flags (e.g. --device cpu)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)-7s %(message)s", datefmt="%H:%M:%S")
    args.out.mkdir(parents=True, exist_ok=True)
    variants = prepare_resources(args, args.out / "resources")
    sets = prepare_sets(args, args.out / "sets")
    results: dict[str, dict[str, dict[str, Any]]] = {}
    for set_name, (inputs, gt) in sets.items():
        for variant in args.variants:
            results.setdefault(set_name, {})[variant] = score_variant(set_name, inputs, gt, variant, variants[variant], args.out, args.extra)
            log.info("%s %s: %s", set_name, variant, json.dumps(results[set_name][variant].get("summary", {})))
    table = summarise(results)
    (args.out / "results.json").write_text(json.dumps({"table": table, "sets": {k: [str(p) for p in v] for k, v in sets.items()}}, indent=1))
    text = markdown(table) if set(args.variants) == {"policy", *GATES} else json.dumps(table, indent=1)
    (args.out / "table.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
