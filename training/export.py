"""Export trained checkpoints to TorchScript + ONNX, check parity, write ``resources/manifest.json``.

    python -m training.export --checkpoints work_dirs/ckpt --out resources [--channels nucleus membrane]

For each channel, ``<checkpoints>/<channel>/global.pt`` and ``patch.pt`` are traced
(``torch.jit.trace``) and exported to ONNX (opset 17, dynamic batch and spatial axes). Eager,
TorchScript and ONNX Runtime must agree within ``--tolerance`` on a random input of a shape the
network was not traced at, or the export aborts. The manifest records sha256 checksums and every
inference parameter; channels not exported now (and ``time_budget_s`` unless ``--time-budget`` is
given) are kept from an existing manifest.

Everything is written to a temporary folder beside ``--out`` first; files are moved into ``--out``
(the manifest last) only once every parity check and the manifest/checksum verification passed,
so a failed export leaves an existing ``resources/`` folder untouched.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fusemycells.config import (
    DEFAULT_POSTPROCESS,
    DEFAULT_TIME_BUDGET_S,
    FORMAT_VERSION,
    MANIFEST_NAME,
    PATCH_STAGE_DEFAULTS,
    load_manifest,
    sha256_of,
    upgrade_manifest,
    verify_files,
)

from .models import ResidualUNet3D
from .provenance import portable_legacy_command

log = logging.getLogger("training.export")
REPO = Path(__file__).resolve().parent.parent
OPSET = 17


class ExportError(RuntimeError):
    """An exported network does not reproduce the trained one."""


def load_model(path: Path) -> tuple[ResidualUNet3D, dict[str, Any]]:
    checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    model = ResidualUNet3D(**checkpoint["config"])
    model.load_state_dict(checkpoint["state_dict"])
    return model.eval(), checkpoint


def structured_input(shape: tuple[int, ...], seed: int = 1) -> torch.Tensor:
    """An image-like NCZYX float32 tensor: smooth bright blobs (≈0–1.5) on an exactly flat zero background."""
    from scipy import ndimage

    noise = np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
    smooth = ndimage.gaussian_filter(noise, sigma=(0, 0, 3, 3, 3))
    smooth /= max(float(smooth.std()), 1e-6)
    return torch.from_numpy(np.clip(smooth - 1.0, 0.0, None).astype(np.float32))


def write_networks(model: torch.nn.Module, example: torch.Tensor, out_dir: Path, stem: str) -> dict[str, dict[str, str]]:
    """Trace ``model`` on ``example`` (NCZYX) into ``<stem>.pt`` (TorchScript) and ``<stem>.onnx`` (batch
    and Z, Y, X dynamic); returns the manifest's ``files`` entry (paths relative to ``out_dir``, sha256)."""
    ts_path, onnx_path = out_dir / f"{stem}.pt", out_dir / f"{stem}.onnx"
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.jit.trace(model, example).save(str(ts_path))
        torch.onnx.export(
            model,
            (example,),
            str(onnx_path),
            input_names=["input"],
            output_names=["output"],
            dynamic_axes={"input": {0: "n", 2: "z", 3: "y", 4: "x"}, "output": {0: "n", 2: "z", 3: "y", 4: "x"}},
            opset_version=OPSET,
            dynamo=False,
        )
    return {"torchscript": {"path": ts_path.name, "sha256": sha256_of(ts_path)}, "onnx": {"path": onnx_path.name, "sha256": sha256_of(onnx_path)}}


def export_stage(
    model: ResidualUNet3D, trace_shape: tuple[int, ...], check_shape: tuple[int, ...], out_dir: Path, stem: str, tolerance: float, image_tolerance: float = 1e-3
) -> dict[str, Any]:
    """Write ``<stem>.pt`` and ``<stem>.onnx``; returns their manifest entries and the parity figures.

    ``tolerance`` bounds |exported − eager| on a random input; ``image_tolerance`` on an image-like
    one (flat background), where onnxruntime's CPU kernels differ from torch by up to ~4e-4 on a
    128³ grid (torch float32 stays within ~1e-6 of float64 there): low-variance channels of the
    instance norms amplify float32 rounding.
    """
    import onnxruntime as ort

    files = write_networks(model, torch.randn(*trace_shape), out_dir, stem)
    ts_path, onnx_path = out_dir / files["torchscript"]["path"], out_dir / files["onnx"]["path"]
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    scripted_model = torch.jit.load(str(ts_path))
    diffs: dict[str, float] = {}
    # a random input at a shape not traced at, and an image-like one (flat background, smooth
    # bright structures) at the traced shape: runtimes' normalisation kernels differ on the latter
    checks = {"": torch.randn(*check_shape, generator=torch.Generator().manual_seed(0)), "image_": structured_input(trace_shape)}
    for prefix, check in checks.items():
        with torch.no_grad():
            eager = model(check).numpy()
            scripted = scripted_model(check).numpy()
        onnx_out = session.run(None, {"input": check.numpy()})[0]
        diffs[prefix + "torchscript"] = float(np.abs(scripted - eager).max())
        diffs[prefix + "onnx"] = float(np.abs(onnx_out - eager).max())
    log.info("%s: parity at %s and image-like %s: %s", stem, check_shape, trace_shape, diffs)
    if max(diffs["torchscript"], diffs["onnx"]) > tolerance or max(diffs["image_torchscript"], diffs["image_onnx"]) > image_tolerance:
        raise ExportError(f"{stem}: exported networks differ from the trained one by {diffs} (> {tolerance} random / {image_tolerance} image-like) at shapes {check_shape} / {trace_shape}")
    return {"files": files, "parity": {"shape": list(check_shape), **diffs}}


def export_channel(checkpoints: Path, channel: str, out_dir: Path, tolerance: float, postprocess: dict[str, Any]) -> dict[str, Any]:
    """Manifest entry of one channel (exports both stages)."""
    global_model, g_ckpt = load_model(checkpoints / channel / "global.pt")
    patch_model, p_ckpt = load_model(checkpoints / channel / "patch.pt")
    grid = tuple(int(v) for v in g_ckpt["grid"])
    patch = tuple(int(v) for v in p_ckpt["patch_size"])
    # parity at shapes the networks were not traced at (odd sizes included)
    g = export_stage(global_model, (1, 1, *grid), (1, 1, 40, 56, 45), out_dir, f"{channel}_global", tolerance)
    p = export_stage(patch_model, (2, 2, *patch), (1, 2, 37, 48, 40), out_dir, f"{channel}_patch", tolerance)
    return {
        "target_spacing_um": float(g_ckpt["target_spacing_um"]),
        "normalisation": dict(g_ckpt["normalisation"]),
        "global_stage": {"in_channels": 1, "grid": list(grid), "files": g["files"]},
        "patch_stage": {"in_channels": 2, "patch_size": list(patch), **PATCH_STAGE_DEFAULTS, "files": p["files"]},
        "postprocess": postprocess,
        "training": training_record(g_ckpt, p_ckpt),
        "parity": {"global": g["parity"], "patch": p["parity"]},
    }


def training_record(g_ckpt: dict[str, Any], p_ckpt: dict[str, Any]) -> dict[str, Any]:
    """The manifest's ``training`` entry of a channel: steps, model configs, and how they were trained.

    Commands carry no machine paths (older checkpoints' absolute script paths are rewritten as
    ``python -m training.train ...``); ``command`` finished the global stage, ``patch_command`` the patch
    stage when that was another invocation (a ``--resume`` with other flags); checkpoints written by the current trainer add the wall time
    per stage (s), the hardware, the number of processes, the mixed precision and the preset.
    """
    def portable(command: Any) -> Any:
        return portable_legacy_command(command) if isinstance(command, str) and command.startswith("/") else command

    command, patch_command = portable(g_ckpt.get("command")), portable(p_ckpt.get("command"))
    record: dict[str, Any] = {"global_steps": g_ckpt.get("steps"), "patch_steps": p_ckpt.get("steps"), "command": command, "model": g_ckpt["config"], "patch_model": p_ckpt["config"]}
    if patch_command is not None and patch_command != command:
        record["patch_command"] = patch_command  # the invocation that finished the patch stage (e.g. a --resume)
    provenance = p_ckpt.get("provenance")  # written after both stages: covers both
    if isinstance(provenance, dict):
        record.update({k: provenance[k] for k in ("seconds", "hardware", "world_size", "amp", "preset") if k in provenance})
    return record


def parse_overrides(items: list[str]) -> dict[str, float]:
    out = {}
    for item in items:
        channel, _, value = item.partition("=")
        if not value:
            raise SystemExit(f"--output-gaussian-sigma expects CHANNEL=VALUE, got {item!r}")
        out[channel] = float(value)
    return out


def output_sigma_knots(previous: dict[str, Any], sigma: float | None) -> list[list[float]]:
    """The manifest's ``output_sigma_knots`` of a new export: ``--output-gaussian-sigma``'s constant σ when given
    (one knot; 0 = off), else the previous manifest's constant σ (format 2 ``postprocess``); a previous
    noise-adaptive policy (several knots) is not carried over (the ``--postprocess`` policy file sets it)."""
    if sigma is not None:
        return [[0.0, sigma]] if sigma > 0 else []
    knots = previous.get("output_sigma_knots", [])
    return [list(knot) for knot in knots] if len(knots) == 1 else []


def read_policy(path: Path) -> dict[str, dict[str, Any]]:
    """``{channel: {postprocess field: value}}`` of a ``--postprocess`` policy file in manifest format 2 (its
    ``format_version`` says so; ``training/policy/postprocess.json``)."""
    policy = json.loads(path.read_text())
    if policy.get("format_version") != FORMAT_VERSION:
        raise SystemExit(f"{path}: a postprocess policy needs \"format_version\": {FORMAT_VERSION} (the manifest's fields)")
    return {channel: fields for channel, fields in policy.items() if channel != "format_version"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Export checkpoints to TorchScript + ONNX and write the weights manifest.")
    parser.add_argument("--checkpoints", type=Path, default=Path("work_dirs/ckpt"), help="folder with <channel>/global.pt and patch.pt")
    parser.add_argument("--out", type=Path, default=Path("resources"), help="resources folder to write")
    parser.add_argument("--channels", nargs="+", default=["nucleus", "membrane"], choices=["nucleus", "membrane"])
    parser.add_argument("--tolerance", type=float, default=1e-4, help="max |exported − eager| allowed")
    parser.add_argument("--output-gaussian-sigma", nargs="*", default=[], metavar="CH=SIGMA", help="output Gaussian σ (voxels) per channel, e.g. nucleus=0.5")
    parser.add_argument("--postprocess", type=Path, default=None, metavar="FILE", help="JSON {channel: {postprocess field: value}} merged over the defaults (e.g. format_version 2 fields: the noise-adaptive output_sigma_knots, gate_knots, background_threshold chosen with training/tune.py; training/policy/postprocess.json)")
    parser.add_argument("--time-budget", type=float, default=None, help=f"time_budget_s written to the manifest (seconds; default: the existing manifest's, else {DEFAULT_TIME_BUDGET_S:g})")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    manifest_path = args.out / MANIFEST_NAME
    manifest: dict[str, Any] = upgrade_manifest(json.loads(manifest_path.read_text())) if manifest_path.is_file() else {}
    channels = dict(manifest.get("channels", {}))
    time_budget = args.time_budget if args.time_budget is not None else float(manifest.get("time_budget_s", DEFAULT_TIME_BUDGET_S))
    sigmas = parse_overrides(args.output_gaussian_sigma)
    overrides = read_policy(args.postprocess) if args.postprocess else {}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{args.out.name}-export-", dir=args.out.parent))  # same file system: atomic moves
    try:
        for channel in args.channels:
            post = dict(DEFAULT_POSTPROCESS)
            post["output_sigma_knots"] = output_sigma_knots(channels.get(channel, {}).get("postprocess", {}), sigmas.get(channel))
            post.update(overrides.get(channel, {}))
            channels[channel] = export_channel(args.checkpoints, channel, staging, args.tolerance, post)
        new_files = sorted(p.name for p in staging.iterdir())
        for channel in set(channels) - set(args.channels):  # kept channels: verify their files along with the new ones
            for stage in ("global_stage", "patch_stage"):
                for entry in channels[channel][stage]["files"].values():
                    if (args.out / entry["path"]).is_file() and entry["path"] not in new_files:
                        shutil.copy2(args.out / entry["path"], staging / entry["path"])
        manifest = {
            "format_version": FORMAT_VERSION,
            "time_budget_s": time_budget,
            "provenance": {
                "exported": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                "torch": torch.__version__,
                "data": "simulated light-sheet pairs (training/simulate.py); see training/README.md",
            },
            "channels": channels,
        }
        (staging / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n")
        problems = verify_files(load_manifest(staging), require_all=True)  # the inference side must accept what we wrote
        if problems:
            raise ExportError("; ".join(problems))
        args.out.mkdir(parents=True, exist_ok=True)
        for name in new_files:
            os.replace(staging / name, args.out / name)
        os.replace(staging / MANIFEST_NAME, manifest_path)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log.info("wrote %s (%s)", manifest_path, ", ".join(sorted(channels)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
