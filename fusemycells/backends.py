"""Network runners: TorchScript (``torch.jit.load``), ONNX (onnxruntime) and OpenVINO (the ONNX file on the CPU).

A runner maps a float32 NCZYX numpy batch to a float32 N1ZYX numpy batch and says which
backend, execution provider and precision really ran it. Device choice comes from
:mod:`fusemycells.runtime.devices`, a CPU forward's precision from :mod:`fusemycells.runtime.precision`.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, Protocol

import numpy as np

from fusemycells.config import (
    BACKEND_FORMAT,
    BACKENDS,
    MANIFEST_NAME,
    Manifest,
    ManifestError,
    StageSpec,
    verified_path,
)
from fusemycells.runtime.devices import free_device_cache, is_out_of_memory

log = logging.getLogger(__name__)


def memory_fraction(vram_budget_gib: float | None, total_bytes: int) -> float | None:
    """Share of the device's ``total_bytes`` that a ``vram_budget_gib`` (GiB) allows, in (0, 1]; None: no budget."""
    if vram_budget_gib is None or total_bytes <= 0:
        return None
    return min(1.0, max(vram_budget_gib * 2**30 / total_bytes, 1e-3))


def cuda_provider_options(vram_budget_gib: float | None, device_id: int = 0) -> dict[str, str]:
    """onnxruntime CUDAExecutionProvider options: a session's VRAM share (GiB) as ``gpu_mem_limit`` (bytes).

    cuDNN's algorithm search is 'HEURISTIC': the default 'EXHAUSTIVE' benchmarks every
    convolution on first use, seconds per new shape. The limit applies per session (per stage),
    each with its own arena, so the run's budget must be shared (see :func:`load_stage`).
    """
    options = {"device_id": str(device_id), "cudnn_conv_algo_search": "HEURISTIC"}
    if vram_budget_gib is not None:
        options["gpu_mem_limit"] = str(int(vram_budget_gib * 2**30))
    return options


MAX_CPU_WORKERS = 8
"""Most patch batches run side by side on a CPU (see :func:`patch_workers`)."""


class Runner(Protocol):
    """Callable network: ``(N, C, Z, Y, X)`` float32 → ``(N, 1, Z, Y, X)`` float32.

    A runner whose forward runs on torch's CPU thread pool says so with ``torch_cpu_forward = True``
    (TorchScript on the CPU); the patch stage's workers and threads follow from it (:func:`patch_workers`,
    :func:`patch_torch_threads`). Runners that do not say (stand-ins in tests) count as False.
    """

    backend: str
    provider: str
    device: str
    precision: str  # 'fp32', 'fp16' (CUDA autocast) or 'bf16' (CPU autocast / inference precision)

    def __call__(self, batch: np.ndarray) -> np.ndarray: ...


def torch_cpu_forward(runner: Runner) -> bool:
    """Whether ``runner``'s forward runs on torch's CPU thread pool (see :class:`Runner`)."""
    return bool(getattr(runner, "torch_cpu_forward", False))


def patch_workers(runner: Runner, threads: int | None) -> int:
    """Patch batches a patch stage of ``runner`` runs at once with ``threads`` CPU threads.

    A forward on torch's CPU threads (TorchScript on a CPU): one single-threaded forward per thread (up to
    :data:`MAX_CPU_WORKERS`); on 2 cores two side by side ran 1.8× the batches per second of one 2-thread
    forward, since torch spreads the small 3D convolutions of these networks over threads poorly. 1
    otherwise: ONNX Runtime's own threads gained nothing from it (measured), and a GPU runs one batch at a time.
    """
    if not torch_cpu_forward(runner) or (threads or 1) < 2:
        return 1
    return min(int(threads or 1), MAX_CPU_WORKERS)


def patch_torch_threads(runner: Runner, workers: int) -> int | None:
    """torch's threads while a patch stage of ``runner`` runs ``workers`` batches at once: its own (None) only
    for one multi-threaded forward on torch's CPU threads; else one thread: one per concurrent forward, and
    the accumulation's ``addcmul_`` without OpenMP workers that spin between patches and took the cores the
    prefetch thread and ONNX Runtime need (fake network: 0.62 → 1.59 s)."""
    return None if workers == 1 and torch_cpu_forward(runner) else 1


class TorchScriptRunner:
    """Runs a TorchScript file on CPU or CUDA: fp16 autocast on CUDA when ``half``, bf16 autocast on the CPU
    when ``precision`` is 'bf16' (see :func:`fusemycells.runtime.precision.cpu_precision`)."""

    backend = "torchscript"

    def __init__(
        self,
        path: Path,
        device: str,
        half: bool = False,
        threads: int | None = None,
        vram_budget_gib: float | None = None,
        precision: str = "fp32",
    ) -> None:
        import torch

        if threads:
            torch.set_num_threads(threads)
        self._torch = torch
        self.device = device
        self.provider = "CUDA" if device == "cuda" else "CPU"
        self.torch_cpu_forward = device == "cpu"
        self.half = half and device == "cuda"
        self.precision = "fp16" if self.half else ("bf16" if device == "cpu" and precision == "bf16" else "fp32")
        if device == "cuda":
            fraction = memory_fraction(vram_budget_gib, torch.cuda.get_device_properties(0).total_memory)
            if fraction is not None:
                torch.cuda.set_per_process_memory_fraction(fraction)  # beyond it: OutOfMemoryError → OOM ladder
        try:
            self.module = torch.jit.load(str(path), map_location=device).eval()
        except Exception as exc:
            raise ManifestError(f"cannot load TorchScript file {path}: {exc}") from exc

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        torch = self._torch
        with torch.inference_mode():
            tensor = torch.from_numpy(np.ascontiguousarray(batch, dtype=np.float32)).to(self.device)
            if self.precision != "fp32":
                kind, dtype = ("cuda", torch.float16) if self.half else ("cpu", torch.bfloat16)
                with torch.autocast(kind, dtype=dtype):
                    out = self.module(tensor)
            else:
                out = self.module(tensor)
            return out.float().cpu().numpy()


def preload_cuda_libraries(ort: object) -> None:
    """Load CUDA/cuDNN from the pip packages torch installed (the image has no other copy)."""
    preload = getattr(ort, "preload_dlls", None)
    if preload is None:
        return
    try:
        preload()
    except Exception as exc:  # missing libraries: the CUDA provider will fail and we run on CPU
        log.debug("onnxruntime.preload_dlls failed: %s", exc)


class OnnxRunner:
    """Runs an ONNX file with onnxruntime: CUDA provider first when asked, else CPU."""

    backend = "onnx"
    precision = "fp32"
    torch_cpu_forward = False

    def __init__(
        self, path: Path, device: str, threads: int | None = None, vram_budget_gib: float | None = None
    ) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.log_severity_level = 3
        if threads:
            options.intra_op_num_threads = threads
        wanted = ["CUDAExecutionProvider", "CPUExecutionProvider"] if device == "cuda" else ["CPUExecutionProvider"]
        if device == "cuda":
            preload_cuda_libraries(ort)
        available = set(ort.get_available_providers())
        names = [p for p in wanted if p in available] or ["CPUExecutionProvider"]
        providers = [(p, cuda_provider_options(vram_budget_gib)) if p == "CUDAExecutionProvider" else p for p in names]
        try:
            self.session = ort.InferenceSession(str(path), sess_options=options, providers=providers)
        except Exception as exc:
            raise ManifestError(f"cannot load ONNX file {path}: {exc}") from exc
        used = self.session.get_providers()
        self.provider = "CUDA" if used and used[0] == "CUDAExecutionProvider" else "CPU"
        self.device = "cuda" if self.provider == "CUDA" else "cpu"
        if device == "cuda" and self.provider != "CUDA":
            log.warning("onnxruntime CUDA provider unavailable for %s: running on CPU", path.name)
        self._ort = ort
        self._input = self.session.get_inputs()[0].name
        self._output = self.session.get_outputs()[0].name

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        batch = np.ascontiguousarray(batch, dtype=np.float32)
        if self.provider == "CUDA":
            return self._run_bound(batch)
        out = self.session.run(None, {self._input: batch})[0]
        return np.asarray(out, dtype=np.float32)

    def _run_bound(self, batch: np.ndarray) -> np.ndarray:
        """One forward with IOBinding: the input copied to the GPU once, the output left there and copied back once."""
        binding = self.session.io_binding()
        binding.bind_ortvalue_input(self._input, self._ort.OrtValue.ortvalue_from_numpy(batch, "cuda", 0))
        binding.bind_output(self._output, "cuda", 0)
        self.session.run_with_iobinding(binding)
        return np.asarray(binding.copy_outputs_to_cpu()[0], dtype=np.float32)


def import_openvino() -> ModuleType:
    """``import openvino`` with its usage telemetry declined.

    The package's import sends a usage event and writes a client id under ``$HOME/intel`` unless it runs
    in CI (``openvino_telemetry`` declines when ``CI=true``): a container has no network and may have no
    writable home, and a user's run should not report anywhere. The variable is set for the import only.
    """
    previous = os.environ.get("CI")
    os.environ["CI"] = "true"
    try:
        import openvino
    finally:
        if previous is None:
            del os.environ["CI"]
        else:
            os.environ["CI"] = previous
    return openvino


class OpenVinoRunner:
    """Runs an ONNX file with OpenVINO's CPU plugin, at inference precision ``precision`` ('fp32' or 'bf16').

    The precision is always set explicitly: OpenVINO's default on CPUs with AMX/AVX512-BF16 is bf16.
    On this project's 2-core AVX2 machine it ran the patch network 2× faster than ONNX Runtime
    (``benchmarks/bench_precision.py``; docs/performance-cpu.md), outputs within 4e-5 of it. With ``streams`` > 1
    (a patch stage) it compiles for throughput: ``streams`` streams share the ``threads``, and a batch's patches
    run as that many single-patch requests at once (1.31× the patches per second of one 2-thread batch on the
    loaded 2-core machine, the same outputs).
    """

    backend = "openvino"
    provider = "CPU"
    device = "cpu"
    torch_cpu_forward = False

    def __init__(
        self,
        path: Path,
        device: str,
        threads: int | None = None,
        precision: str = "fp32",
        one_shot: bool = False,
        streams: int = 1,
    ) -> None:
        """``one_shot``: a network run once per file (the global stage), whose intermediate tensors are released
        after each call (:meth:`__call__`); ``streams``: requests run at once (see the class)."""
        if device != "cpu":
            raise ManifestError(f"OpenVINO runs {path.name} on the CPU only (asked for {device})")
        self.one_shot, self.streams = one_shot, max(1, int(streams))
        try:
            ov = import_openvino()
        except ImportError as exc:
            raise ManifestError(f"OpenVINO is not installed ({exc}): cannot run {path.name} with it") from exc
        self.precision = precision
        config = {"INFERENCE_PRECISION_HINT": "bf16" if precision == "bf16" else "f32", "PERFORMANCE_HINT": "LATENCY"}
        if self.streams > 1:
            config.update(PERFORMANCE_HINT="THROUGHPUT", NUM_STREAMS=str(self.streams))
        if threads:
            config["INFERENCE_NUM_THREADS"] = str(threads)
        try:
            self.model = ov.Core().compile_model(str(path), "CPU", config)
        except Exception as exc:
            raise ManifestError(f"cannot load ONNX file {path} with OpenVINO: {exc}") from exc
        self._request = self.model.create_infer_request()
        self._queue = ov.AsyncInferQueue(self.model, self.streams) if self.streams > 1 else None

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        batch = np.ascontiguousarray(batch, dtype=np.float32)
        if self._queue is not None and len(batch) > 1:
            return self._per_patch(batch)
        out = self._request.infer([batch])[0]
        out = np.array(out, dtype=np.float32)  # a copy: the request reuses its output buffer
        if self.one_shot:  # else kept until the process ends: 290 MiB for the 128³ global stage (performance-cpu.md)
            self.model.release_memory()
        return out

    def _per_patch(self, batch: np.ndarray) -> np.ndarray:
        """The batch's patches as single-patch requests, :attr:`streams` at a time; outputs in batch order."""
        assert self._queue is not None
        outputs: list[np.ndarray | None] = [None] * len(batch)

        def done(request: Any, index: int) -> None:
            outputs[index] = np.array(request.get_output_tensor(0).data, dtype=np.float32)  # copied: reused buffer

        self._queue.set_callback(done)
        for index in range(len(batch)):
            self._queue.start_async([batch[index : index + 1]], index)
        self._queue.wait_all()
        return np.concatenate(outputs)  # type: ignore[arg-type]


@dataclass(frozen=True)
class LoadedStage:
    """A runner with the spec it came from (for logging and the report)."""

    spec: StageSpec
    runner: Runner
    file: str


def backend_order(requested: str, device: str, precision: str = "fp32") -> list[str]:
    """Backends to try, best first. 'auto': TorchScript on CUDA; on the CPU TorchScript when its forward runs
    in bf16 (autocast on a CPU with native bf16), else OpenVINO, then ONNX Runtime.

    On this project's 2-core AVX2 CPU, two 64³ patches took 1.6–1.9 s with ONNX Runtime, 0.8–0.9 s with
    OpenVINO (one thread, loaded machine; docs/performance-cpu.md); bf16 autocast there is emulated (70 s).
    The issue that asked for bf16 measured TorchScript bf16 at 0.12 s against ONNX Runtime's 0.21 s on a
    Xeon with AMX. CUDA keeps TorchScript (fp16 autocast) first.
    """
    if requested in BACKENDS:
        return [requested, *[b for b in BACKENDS if b != requested]]
    if requested != "auto":
        raise ValueError(f"unknown backend '{requested}' (expected auto, {', '.join(BACKENDS)})")
    if device == "cuda":
        return ["torchscript", "onnx"]
    if precision == "bf16":
        return ["torchscript", "openvino", "onnx"]
    return ["openvino", "onnx", "torchscript"]


def expected_in_channels(spec: StageSpec) -> int | None:
    """Channels the pipeline feeds a stage: 2 (input, stage-1 prediction) for the patch stage
    (it has a ``patch_size``), 1 (input) for the global stage (a ``grid``); None if neither."""
    if spec.patch_size is not None:
        return 2
    return 1 if spec.grid is not None else None


def check_in_channels(manifest: Manifest, spec: StageSpec) -> None:
    """Raise :class:`ManifestError` naming the manifest when a stage's ``in_channels`` is not what
    the pipeline feeds it (see :func:`expected_in_channels`)."""
    expected = expected_in_channels(spec)
    if expected is not None and spec.in_channels != expected:
        files = ", ".join(w.path for w in spec.files.values())
        raise ManifestError(
            f"{manifest.root / MANIFEST_NAME}: stage {files} declares in_channels={spec.in_channels}, "
            f"but the pipeline feeds the {'patch' if expected == 2 else 'global'} stage {expected} channel(s)"
        )


def load_stage(
    manifest: Manifest,
    spec: StageSpec,
    backend: str,
    device: str,
    half: bool = False,
    threads: int | None = None,
    strict: bool = False,
    vram_budget_gib: float | None = None,
    vram_sessions: int = 1,
    precision: str = "fp32",
) -> LoadedStage:
    """Load one stage, verifying the file's checksum; fall back to the next backend if it fails.

    With ``strict`` (an explicit ``--backend``) no fallback happens. Raises :class:`ManifestError`
    naming every file that failed, never returning an unverified network, and naming the
    manifest when the stage's ``in_channels`` is wrong (:func:`check_in_channels`).
    ``vram_budget_gib`` (GiB) is the run's device memory budget:
    TorchScript caps the whole process at it; each ONNX Runtime session has its own arena and gets
    ``vram_budget_gib / vram_sessions``, ``vram_sessions`` being the device stages that may be open at once.
    ``precision`` ('fp32' or 'bf16', see :func:`fusemycells.runtime.precision.cpu_precision`) is a CPU forward's
    (TorchScript autocast, OpenVINO's inference precision); ONNX Runtime always runs fp32.
    """
    check_in_channels(manifest, spec)
    errors: list[str] = []
    order = backend_order(backend, device, precision)
    for name in order[:1] if strict else order:
        weights = spec.files.get(BACKEND_FORMAT[name])
        if weights is None:
            errors.append(f"{name}: no {BACKEND_FORMAT[name]} file in manifest")
            continue
        try:
            path = verified_path(manifest, weights)
            one_shot = spec.patch_size is None
            runner = _runner(
                name, path, device, half, threads, vram_budget_gib, vram_sessions, precision, one_shot,
                spec.batch_size or 1,
            )  # fmt: skip
        except ManifestError as exc:
            errors.append(str(exc))
            log.warning("%s", exc)
            continue
        if errors:
            log.warning("using %s after: %s", name, "; ".join(errors))
        return LoadedStage(spec=spec, runner=runner, file=weights.path)
    raise ManifestError("no usable weights: " + "; ".join(errors))


def _runner(
    name: str,
    path: Path,
    device: str,
    half: bool,
    threads: int | None,
    vram_budget_gib: float | None,
    vram_sessions: int,
    precision: str,
    one_shot: bool = False,
    batch: int = 1,
) -> Runner:
    """The runner of backend ``name`` for the verified file ``path`` (see :func:`load_stage`); ``one_shot``: the
    network runs once per file (a global stage), so OpenVINO releases its intermediate memory after each call;
    ``batch``: patches per batch (a patch stage), which OpenVINO runs as up to that many streams."""
    if name == "torchscript":
        return TorchScriptRunner(
            path, device, half=half, threads=threads, vram_budget_gib=vram_budget_gib, precision=precision
        )
    if name == "openvino":
        streams = 1 if one_shot else min(threads or os.cpu_count() or 1, batch)
        return OpenVinoRunner(path, device, threads=threads, precision=precision, one_shot=one_shot, streams=streams)
    share = None if vram_budget_gib is None else vram_budget_gib / max(1, vram_sessions)
    return OnnxRunner(path, device, threads=threads, vram_budget_gib=share)


def warm_up(stage: LoadedStage) -> float | None:
    """Run one zero patch (batch 1) through a patch stage right after loading; returns its seconds.

    One-time costs (CUDA context, kernel choice, memory arenas) are paid here, not by the first
    batch whose rate the deadline logic uses. None for a stage without a patch size (the global
    stage runs once per file anyway) or when even one patch runs out of memory (the OOM ladder
    deals with that later).
    """
    size = stage.spec.patch_size
    if size is None:
        return None
    started = time.perf_counter()
    try:
        stage.runner(np.zeros((1, stage.spec.in_channels, *size), dtype=np.float32))
    except Exception as exc:
        if not is_out_of_memory(exc):
            raise
        free_device_cache()
        log.info("warm-up of %s skipped: out of memory for one patch", stage.file)
        return None
    seconds = time.perf_counter() - started
    log.info("warm-up of %s (%s on %s): %.2f s", stage.file, stage.runner.backend, stage.runner.provider, seconds)
    return seconds
