"""Forward seconds and output parity of the shipped networks per runtime and precision, on the CPU.

    python benchmarks/bench_precision.py [--channel nucleus] [--stage patch] [--threads 2] [--repeats 7] [--json F]

One batch as the pipeline feeds it (patch stage: ``batch_size`` × 2 × 64³; global stage: 1 × 1 × grid), filled
with a smooth random volume in the normalised range, run by each variant in turn, ``--repeats`` rounds
interleaved (variant A, B, C, A, B, C, ...) so that a loaded machine slows every variant alike; the median
seconds per batch are reported with the output difference to ONNX Runtime fp32 (the shipped CPU path):
rms, max and the rms of the reference output. Variants: ``onnx_fp32``, ``torchscript_fp32``,
``torchscript_fp32_cl`` (channels_last_3d input), ``torchscript_bf16`` (``torch.autocast('cpu', bfloat16)``),
``openvino_fp32`` / ``openvino_bf16`` (OpenVINO's CPU plugin on the ONNX file, inference precision hint f32 / bf16),
``onnx_int8`` (a static QDQ int8 model made with onnxruntime.quantization from calibration batches of the
same kind). ``--variants`` picks some (default: all but the bf16 ones where the CPU lacks native bf16, which
take minutes per batch there). The CPU's bf16/int8 capabilities (from /proc/cpuinfo) are printed with the results:
on a CPU without AVX512-BF16/AMX, bf16 runs emulated and is expected to be slower.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

Forward = Callable[[np.ndarray], np.ndarray]
VARIANTS = (
    "onnx_fp32", "torchscript_fp32", "torchscript_fp32_cl", "torchscript_bf16", "openvino_fp32", "openvino_bf16",
    "onnx_int8", "openvino_int8", "openvino_fp32_streams",
)  # fmt: skip


def smooth_batch(shape: tuple[int, ...], seed: int) -> np.ndarray:
    """A float32 NCZYX batch of smooth random structure in roughly [0, 1] (normalised-input-like)."""
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    raw = rng.random(shape, dtype=np.float32)
    smooth = ndimage.gaussian_filter(raw, sigma=(0, 0, 2, 2, 2))
    lo, hi = np.percentile(smooth, [2, 99.8])
    return ((smooth - lo) / (hi - lo)).astype(np.float32)


def torchscript_forward(path: Path, threads: int, mode: str) -> Forward:
    """A TorchScript forward on the CPU: ``mode`` 'fp32', 'fp32_cl' (channels_last_3d input) or 'bf16' (autocast)."""
    import torch

    torch.set_num_threads(threads)
    module = torch.jit.load(str(path), map_location="cpu").eval()

    def forward(batch: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            tensor = torch.from_numpy(batch)
            if mode == "fp32_cl":
                tensor = tensor.contiguous(memory_format=torch.channels_last_3d)
            if mode == "bf16":
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    out = module(tensor)
            else:
                out = module(tensor)
            return out.float().numpy()

    return forward


def openvino_forward(path: Path, threads: int, precision: str) -> Forward:
    """An OpenVINO CPU forward of the ONNX file, inference precision ``precision`` ('fp32' or 'bf16')."""
    from fusemycells.backends import OpenVinoRunner

    return OpenVinoRunner(path, "cpu", threads=threads, precision=precision)


def openvino_int8_forward(path: Path, threads: int, calibration: list[np.ndarray]) -> Forward:
    """OpenVINO on an int8 copy of the ONNX model made by NNCF's post-training quantisation (default preset:
    symmetric int8 weights and activations) calibrated on ``calibration`` batches; inference precision hint f32
    (the layers left in floating point). Needs ``nncf``."""
    import nncf

    from fusemycells.backends import OpenVinoRunner, import_openvino

    ov = import_openvino()
    model = ov.Core().read_model(str(path))
    quantised = nncf.quantize(model, nncf.Dataset(calibration), subset_size=len(calibration))
    runner = OpenVinoRunner.__new__(OpenVinoRunner)
    runner.precision, runner.one_shot, runner.streams, runner._queue = "int8", False, 1, None
    config = {"INFERENCE_PRECISION_HINT": "f32", "PERFORMANCE_HINT": "LATENCY", "INFERENCE_NUM_THREADS": str(threads)}
    runner.model = ov.Core().compile_model(quantised, "CPU", config)
    runner._request = runner.model.create_infer_request()
    return runner


def openvino_streams_forward(path: Path, threads: int) -> Forward:
    """OpenVINO fp32 with the THROUGHPUT hint: ``threads`` streams of one thread, the batch's patches run as
    that many single-patch requests at once (what OpenVINO does with cores instead of one multi-threaded call)."""
    from fusemycells.backends import import_openvino

    ov = import_openvino()
    config = {
        "INFERENCE_PRECISION_HINT": "f32", "PERFORMANCE_HINT": "THROUGHPUT",
        "NUM_STREAMS": str(threads), "INFERENCE_NUM_THREADS": str(threads),
    }  # fmt: skip
    model = ov.Core().compile_model(str(path), "CPU", config)
    queue = ov.AsyncInferQueue(model, threads)

    def forward(batch: np.ndarray) -> np.ndarray:
        out = np.empty((batch.shape[0], 1, *batch.shape[2:]), dtype=np.float32)

        def done(request, index: int) -> None:
            out[index] = request.get_output_tensor(0).data[0]

        queue.set_callback(done)
        for i in range(batch.shape[0]):
            queue.start_async({0: np.ascontiguousarray(batch[i : i + 1])}, i)
        queue.wait_all()
        return out

    return forward


def onnx_forward(path: Path, threads: int) -> Forward:
    """An ONNX Runtime CPU forward."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return lambda batch: np.asarray(session.run(None, {name: batch})[0], dtype=np.float32)


def quantize_int8(path: Path, calibration: list[np.ndarray], out: Path) -> Path:
    """A static QDQ int8 copy of the ONNX model ``path`` calibrated on ``calibration`` batches (written to ``out``)."""
    import onnxruntime as ort
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    name = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).get_inputs()[0].name

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.items = iter([{name: b} for b in calibration])

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.items, None)

    prepared = out.with_suffix(".pre.onnx")
    quant_pre_process(str(path), str(prepared))
    quantize_static(
        str(prepared), str(out), Reader(), quant_format=QuantFormat.QDQ,
        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, per_channel=True,
    )  # fmt: skip
    return out


def cpu_capabilities() -> list[str]:
    """The reduced-precision flags of this CPU (from /proc/cpuinfo), e.g. ['avx512_bf16', 'amx_bf16']."""
    from fusemycells.runtime.precision import cpu_flags

    return sorted(cpu_flags() & {"avx512_bf16", "amx_bf16", "amx_tile", "amx_int8", "avx512_vnni", "avx_vnni"})


def measure(variants: dict[str, Forward], batch: np.ndarray, repeats: int) -> dict[str, dict[str, float]]:
    """Median seconds per batch of each variant (interleaved rounds) and its output difference to 'onnx_fp32'."""
    outputs = {name: forward(batch) for name, forward in variants.items()}  # warm-up, and the outputs compared
    seconds: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(repeats):
        for name, forward in variants.items():
            started = time.perf_counter()
            forward(batch)
            seconds[name].append(time.perf_counter() - started)
    reference = outputs["onnx_fp32"]
    results = {}
    for name, out in outputs.items():
        diff = out - reference
        results[name] = {
            "median_s": round(statistics.median(seconds[name]), 4),
            "min_s": round(min(seconds[name]), 4),
            "rms_diff": float(np.sqrt(np.mean(diff**2))),
            "max_diff": float(np.abs(diff).max()),
            "reference_rms": float(np.sqrt(np.mean(reference**2))),
        }
    return results


def main(argv: list[str] | None = None) -> int:
    from fusemycells.config import load_manifest
    from fusemycells.runtime.precision import cpu_flags, cpu_precision

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--resources", type=Path, default=REPO / "resources")
    parser.add_argument("--channel", default="nucleus")
    parser.add_argument("--stage", choices=("patch", "global"), default="patch")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=None, help="variants to run (onnx_fp32 always)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)

    manifest = load_manifest(args.resources)
    channel = manifest.channel(args.channel)
    spec = channel.patch_stage if args.stage == "patch" else channel.global_stage
    shape = (
        (spec.batch_size or 2, 2, *spec.patch_size) if args.stage == "patch" and spec.patch_size else (1, 1, *spec.grid)
    )
    batch = smooth_batch(shape, seed=0)
    files = {fmt: manifest.root / weights.path for fmt, weights in spec.files.items()}
    native_bf16 = cpu_precision("auto", cpu_flags()) == "bf16"
    wanted = args.variants or [v for v in VARIANTS if native_bf16 or not v.endswith("bf16")]
    variants: dict[str, Forward] = {"onnx_fp32": onnx_forward(files["onnx"], args.threads)}
    for mode in ("fp32", "fp32_cl", "bf16"):
        if f"torchscript_{mode}" in wanted:
            variants[f"torchscript_{mode}"] = torchscript_forward(files["torchscript"], args.threads, mode)
    for mode in ("fp32", "bf16"):
        if f"openvino_{mode}" in wanted:
            variants[f"openvino_{mode}"] = openvino_forward(files["onnx"], args.threads, mode)
    if "openvino_fp32_streams" in wanted:
        variants["openvino_fp32_streams"] = openvino_streams_forward(files["onnx"], args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        calibration = [smooth_batch(shape, seed=s) for s in range(1, 9)]
        if "onnx_int8" in wanted:
            model = quantize_int8(files["onnx"], calibration, Path(tmp) / "int8.onnx")
            variants["onnx_int8"] = onnx_forward(model, args.threads)
        if "openvino_int8" in wanted:
            variants["openvino_int8"] = openvino_int8_forward(files["onnx"], args.threads, calibration)
        results = measure(variants, batch, args.repeats)
    report = {
        "channel": args.channel, "stage": args.stage, "batch": list(shape), "threads": args.threads,
        "repeats": args.repeats, "cpu_flags": cpu_capabilities(), "variants": results,
    }  # fmt: skip
    base = results["onnx_fp32"]["median_s"]
    print(f"{args.channel} {args.stage} batch {shape}, {args.threads} threads, CPU flags {report['cpu_flags']}")
    for name, r in results.items():
        print(
            f"  {name:20s} {r['median_s']:.4f} s/batch ({base / r['median_s']:.2f}× onnx_fp32)  "
            f"rms diff {r['rms_diff']:.2e} (output rms {r['reference_rms']:.3f}), max {r['max_diff']:.2e}"
        )
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
