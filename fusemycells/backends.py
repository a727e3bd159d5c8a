"""Network runners: TorchScript (``torch.jit.load``) and ONNX (onnxruntime).

A runner maps a float32 NCZYX numpy batch to a float32 N1ZYX numpy batch and says which
backend and execution provider really ran it. Device choice comes from :mod:`fusemycells.budget`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from .config import FORMATS, Manifest, ManifestError, StageSpec, verified_path

log = logging.getLogger(__name__)


class Runner(Protocol):
    """Callable network: ``(N, C, Z, Y, X)`` float32 → ``(N, 1, Z, Y, X)`` float32."""

    backend: str
    provider: str
    device: str

    def __call__(self, batch: np.ndarray) -> np.ndarray: ...


class TorchScriptRunner:
    """Runs a TorchScript file on CPU or CUDA (fp16 autocast on CUDA when ``half``)."""

    backend = "torchscript"

    def __init__(self, path: Path, device: str, half: bool = False, threads: int | None = None) -> None:
        import torch

        if threads:
            torch.set_num_threads(threads)
        self._torch = torch
        self.device = device
        self.provider = "CUDA" if device == "cuda" else "CPU"
        self.half = half and device == "cuda"
        try:
            self.module = torch.jit.load(str(path), map_location=device).eval()
        except Exception as exc:
            raise ManifestError(f"cannot load TorchScript file {path}: {exc}") from exc

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        torch = self._torch
        with torch.inference_mode():
            tensor = torch.from_numpy(np.ascontiguousarray(batch, dtype=np.float32)).to(self.device)
            if self.half:
                with torch.autocast("cuda", dtype=torch.float16):
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

    def __init__(self, path: Path, device: str, threads: int | None = None) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.log_severity_level = 3
        if threads:
            options.intra_op_num_threads = threads
        wanted = ["CUDAExecutionProvider", "CPUExecutionProvider"] if device == "cuda" else ["CPUExecutionProvider"]
        if device == "cuda":
            preload_cuda_libraries(ort)
        available = set(ort.get_available_providers())
        providers = [p for p in wanted if p in available] or ["CPUExecutionProvider"]
        try:
            self.session = ort.InferenceSession(str(path), sess_options=options, providers=providers)
        except Exception as exc:
            raise ManifestError(f"cannot load ONNX file {path}: {exc}") from exc
        used = self.session.get_providers()
        self.provider = "CUDA" if used and used[0] == "CUDAExecutionProvider" else "CPU"
        self.device = "cuda" if self.provider == "CUDA" else "cpu"
        if device == "cuda" and self.provider != "CUDA":
            log.warning("onnxruntime CUDA provider unavailable for %s: running on CPU", path.name)
        self._input = self.session.get_inputs()[0].name

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        out = self.session.run(None, {self._input: np.ascontiguousarray(batch, dtype=np.float32)})[0]
        return np.asarray(out, dtype=np.float32)


@dataclass(frozen=True)
class LoadedStage:
    """A runner with the spec it came from (for logging and the report)."""

    spec: StageSpec
    runner: Runner
    file: str


def backend_order(requested: str, device: str) -> list[str]:
    """Formats to try, best first. 'auto': ONNX on CPU (measured ~2× faster), TorchScript on CUDA."""
    if requested in FORMATS:
        return [requested, *[f for f in FORMATS if f != requested]]
    if requested != "auto":
        raise ValueError(f"unknown backend '{requested}' (expected auto, torchscript or onnx)")
    return ["torchscript", "onnx"] if device == "cuda" else ["onnx", "torchscript"]


def load_stage(manifest: Manifest, spec: StageSpec, backend: str, device: str, half: bool = False, threads: int | None = None, strict: bool = False) -> LoadedStage:
    """Load one stage, verifying the file's checksum; fall back to the other format if it fails.

    With ``strict`` (an explicit ``--backend``) no fallback happens. Raises :class:`ManifestError`
    naming every file that failed, never returning an unverified network.
    """
    errors: list[str] = []
    order = backend_order(backend, device)
    if strict:
        order = order[:1]
    for fmt in order:
        weights = spec.files.get(fmt)
        if weights is None:
            errors.append(f"{fmt}: not in manifest")
            continue
        try:
            path = verified_path(manifest, weights)
            runner: Runner
            if fmt == "torchscript":
                runner = TorchScriptRunner(path, device, half=half, threads=threads)
            else:
                runner = OnnxRunner(path, device, threads=threads)
        except ManifestError as exc:
            errors.append(str(exc))
            log.warning("%s", exc)
            continue
        if errors:
            log.warning("using %s after: %s", fmt, "; ".join(errors))
        return LoadedStage(spec=spec, runner=runner, file=weights.path)
    raise ManifestError("no usable weights: " + "; ".join(errors))
