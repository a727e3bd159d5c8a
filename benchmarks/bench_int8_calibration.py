"""OpenVINO int8 (NNCF post-training quantisation) of a patch network, calibrated on the patch stage's real inputs.

    python benchmarks/bench_int8_calibration.py [--channel nucleus] [--calibration-seeds 1000 1001 1002]
                                               [--test-seeds 1003 1004 1005] [--threads 2]

Simulates training cases with this project's simulator (``training.simulate.simulate_pair``; never cells3d or
the independent simulator), runs the pipeline on them (shipped networks, trust off so that both stages run)
and records every full batch the patch network receives: the (image, stage-1 prediction) pairs on H it sees in
a run. Batches of the calibration seeds calibrate NNCF's quantisation (presets PERFORMANCE and MIXED); those of
the test seeds compare the int8 model with OpenVINO fp32: rms and max output difference, median seconds per
batch. Needs ``nncf`` (not a project dependency). For measurement, not for CI.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from fusemycells.backends import OpenVinoRunner, import_openvino, load_stage  # noqa: E402
from fusemycells.config import load_manifest, without_trust  # noqa: E402
from fusemycells.pipeline import Fuser  # noqa: E402
from fusemycells.runtime.budget import BudgetPolicy  # noqa: E402


class Recorder:
    """A patch runner that keeps a copy of every full batch it runs (``batch`` patches)."""

    def __init__(self, inner, batch: int, store: list[np.ndarray]) -> None:
        self.inner, self.batch, self.store = inner, batch, store
        self.backend, self.provider, self.device, self.precision = inner.backend, inner.provider, inner.device, inner.precision

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        if batch.shape[0] == self.batch:
            self.store.append(np.array(batch))
        return self.inner(batch)


def patch_batches(resources: Path, channel: str, seeds: list[int]) -> dict[int, list[np.ndarray]]:
    """The full patch batches the pipeline feeds the patch network on each simulated case (seed → batches)."""
    from training.simulate import simulate_pair

    manifest = without_trust(load_manifest(resources))
    store: list[np.ndarray] = []

    def loader(manifest, spec, backend, device, **options):
        loaded = load_stage(manifest, spec, backend, device, **options)
        if spec.patch_size is None:
            return loaded
        return dataclasses.replace(loaded, runner=Recorder(loaded.runner, spec.batch_size, store))

    fuser = Fuser(manifest, BudgetPolicy.create("cpu", None, None, 2), loader=loader)
    found: dict[int, list[np.ndarray]] = {}
    for seed in seeds:
        pair = simulate_pair(seed, channel)
        first = len(store)
        fuser.fuse(pair.input, pair.spacing, channel)
        found[seed] = store[first:]
        print(f"seed {seed}: {pair.input.shape} voxels, {len(found[seed])} full patch batches", flush=True)
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--resources", type=Path, default=REPO / "resources")
    parser.add_argument("--channel", default="nucleus")
    parser.add_argument("--calibration-seeds", type=int, nargs="+", default=[1000, 1001, 1002])
    parser.add_argument("--test-seeds", type=int, nargs="+", default=[1003, 1004, 1005])
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    import nncf

    batches = patch_batches(args.resources, args.channel, args.calibration_seeds + args.test_seeds)
    calibration = [b for s in args.calibration_seeds for b in batches[s]]
    test = [b for s in args.test_seeds for b in batches[s]]
    if not calibration or not test:
        raise SystemExit("no full patch batch in the calibration or the test cases: choose other seeds")
    ov = import_openvino()
    path = args.resources / load_manifest(args.resources).channel(args.channel).patch_stage.files["onnx"].path
    fp32 = OpenVinoRunner(path, "cpu", threads=args.threads)
    config = {"INFERENCE_PRECISION_HINT": "f32", "PERFORMANCE_HINT": "LATENCY", "INFERENCE_NUM_THREADS": str(args.threads)}
    for preset in ("PERFORMANCE", "MIXED"):
        model = ov.Core().read_model(str(path))
        dataset = nncf.Dataset(calibration)
        quantised = nncf.quantize(model, dataset, subset_size=len(calibration), preset=getattr(nncf.QuantizationPreset, preset))
        request = ov.Core().compile_model(quantised, "CPU", config).create_infer_request()
        rms, largest, reference, t8, t32 = [], [], [], [], []
        for batch in test:
            started = time.perf_counter()
            y32 = fp32(batch)
            t32.append(time.perf_counter() - started)
            started = time.perf_counter()
            y8 = np.array(request.infer([batch])[0], dtype=np.float32)
            t8.append(time.perf_counter() - started)
            diff = y8 - y32
            rms.append(float(np.sqrt(np.mean(diff**2))))
            largest.append(float(np.abs(diff).max()))
            reference.append(float(np.sqrt(np.mean(y32**2))))
        print(
            f"{preset}: {len(calibration)} calibration / {len(test)} test batches: int8 − fp32 rms {np.mean(rms):.2e} "
            f"(fp32 output rms {np.mean(reference):.3f}), max {max(largest):.2e}; seconds per batch int8 "
            f"{statistics.median(t8):.3f}, fp32 {statistics.median(t32):.3f}",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
