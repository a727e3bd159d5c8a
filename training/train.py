"""Train both stages for one channel: step-based schedules, resumable, CUDA mixed precision, DDP.

    python -m training.train --preset cpu --data DATA --channel nucleus --out CKPT [--resume]
    torchrun --nproc_per_node 4 -m training.train --preset paper --data DATA --channel nucleus --out CKPT

Stage 1 learns the fused volume from the single view on the global grid (random crops of it; the
network is fully convolutional and sees the whole grid at inference). Stage 2 learns it from
patches of the high-resolution grid H with two channels: the image and stage 1's prediction,
upsampled exactly as at inference.

Each stage runs ``--steps-global`` / ``--steps-patch`` optimiser steps (the learning-rate schedule
is a function of the step); the wall-clock caps ``--minutes-global`` / ``--minutes-patch``,
``--stop-after-steps`` and SIGTERM only stop an invocation early. ``OUT/state.pt`` (model,
optimiser, AMP scaler, step, stage, RNG, history) is written atomically every
``--checkpoint-minutes`` and whenever an invocation stops; ``--resume`` continues where it stopped
and gives the same weights as an uninterrupted run (samples are pure functions of their index).
Finished stages are written as ``global.pt`` / ``patch.pt`` (state dict + model config + grid or
patch + normalisation + provenance) for ``training.export``, and ``train_log.json``.

``--preset NAME`` (``training/presets/NAME.json``, or a path) sets defaults; explicit flags win.
``--init DIR`` fine-tunes from exported weights: ``DIR/<channel>_global.pt`` / ``_patch.pt``
(TorchScript) with the model configs of ``DIR/manifest.json`` (``channels.<channel>.training``).
On CUDA: mixed precision (bf16 where supported, else fp16 with a gradient scaler), and with
``torchrun`` DistributedDataParallel (NCCL; gloo on CPU): each rank draws its own samples, rank 0
writes checkpoints and logs.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import logging
import math
import os
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel

from fusemycells.preprocess import resize

from .data import (
    RESIZE_OPS,
    CropDataset,
    Pair,
    ShapeMismatchError,
    bright_centres,
    cached_pair,
    cached_resize,
    find_pairs,
    save_npy,
)
from .distributed import DistInfo, any_rank, barrier, gather_strings, init_distributed, shutdown
from .losses import difference_weighted_mae, lsgan_discriminator_loss, lsgan_generator_loss
from .models import PatchDiscriminator3D, ResidualUNet3D, count_parameters
from .provenance import hardware, portable_command

log = logging.getLogger("training.train")
DEFAULT_NORMALISATION = {"kind": "percentile", "low": 1.0, "high": 99.8}
PRESETS = Path(__file__).resolve().parent / "presets"
STAGES = {"global": 0, "patch": 1}
STATE_NAME = "state.pt"


def load_preset(name: str) -> dict[str, Any]:
    """Defaults from ``training/presets/<name>.json`` (or a JSON file path); keys are the flags' names with ``_``."""
    path = Path(name) if name.endswith(".json") else PRESETS / f"{name}.json"
    if not path.is_file():
        raise SystemExit(f"--preset {name}: no such preset ({', '.join(sorted(p.stem for p in PRESETS.glob('*.json')))} or a .json path)")
    data = json.loads(path.read_text())
    data.pop("description", None)
    return {k.replace("-", "_"): v for k, v in data.items()}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Train the global and patch stages for one channel.")
    p.add_argument("--preset", default=None, help="defaults from training/presets/NAME.json (cpu, paper, ...) or a .json path")
    p.add_argument("--data", type=Path, required=True, help="folder with image_<N>_<channel>_angle.tif / _fused.tif pairs (searched recursively)")
    p.add_argument("--channel", choices=["nucleus", "membrane"], required=True)
    p.add_argument("--out", type=Path, required=True, help="checkpoint folder")
    p.add_argument("--grid", type=int, nargs=3, default=[128, 128, 128], help="global grid ZYX (voxels)")
    p.add_argument("--global-crop", type=int, nargs=3, default=[64, 64, 64], help="training crop of the global grid (voxels)")
    p.add_argument("--patch", type=int, nargs=3, default=[64, 64, 64], help="patch size ZYX on H (voxels)")
    p.add_argument("--base", type=int, default=8, help="U-Net width of the first level")
    p.add_argument("--depth", type=int, default=3)
    p.add_argument("--batch", type=int, default=2, help="samples per step and process")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--alpha", type=float, default=2.0, help="difference weighting of the MAE")
    p.add_argument("--steps-global", type=int, default=2400, help="optimiser steps of stage 1 (the LR schedule spans them)")
    p.add_argument("--steps-patch", type=int, default=9000, help="optimiser steps of stage 2")
    p.add_argument("--minutes-global", type=float, default=600.0, help="wall-clock cap of stage 1 in this invocation (stop condition; --resume continues)")
    p.add_argument("--minutes-patch", type=float, default=1200.0, help="wall-clock cap of stage 2 in this invocation")
    p.add_argument("--max-minutes", type=float, default=None, help="wall-clock cap of this whole invocation from its start (stop condition; --resume continues)")
    p.add_argument("--stop-after-steps", type=int, default=None, help="stop this invocation after this many steps (both stages counted); --resume continues")
    p.add_argument("--resume", action="store_true", help="continue from OUT/state.pt")
    p.add_argument("--checkpoint-minutes", type=float, default=10.0, help="write OUT/state.pt at least this often")
    p.add_argument("--log-every", type=int, default=50, help="steps between log records")
    p.add_argument("--eval-every", type=int, default=200, help="steps between held-out evaluations (0: only at the end)")
    p.add_argument("--augment", action=argparse.BooleanOptionalAction, default=True, help="training-time augmentations (training/augment.py)")
    p.add_argument("--workers", type=int, default=0, help="DataLoader worker processes per rank")
    p.add_argument("--amp", choices=["auto", "off", "bf16", "fp16"], default="auto", help="mixed precision on CUDA (auto: bf16 where supported, else fp16); off on CPU")
    p.add_argument("--adversarial", action="store_true", help="add the LSGAN term with a 3D patch discriminator (stage 2)")
    p.add_argument("--adv-weight", type=float, default=0.01)
    p.add_argument("--target-spacing", type=float, default=0.6, help="isotropic spacing of H (µm)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cache", type=Path, default=None, metavar="DIR", help="where each case is cached as .npy on the 0.6 µm grid and memory-mapped (default OUT/cache)")
    p.add_argument("--init", type=Path, default=None, metavar="DIR", help="start from exported weights: DIR/<channel>_global.pt, DIR/<channel>_patch.pt (TorchScript) and DIR/manifest.json")
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """CLI flags over the preset's defaults over the built-in ones (today's CPU sizes)."""
    parser = build_parser()
    known, _ = parser.parse_known_args(argv)
    if known.preset:
        preset = load_preset(known.preset)
        dests = {a.dest for a in parser._actions}
        unknown = sorted(set(preset) - dests)
        if unknown:
            raise SystemExit(f"--preset {known.preset}: unknown keys {unknown}")
        parser.set_defaults(**preset)
    return parser.parse_args(argv)


class InitError(RuntimeError):
    """Exported weights given to ``--init`` do not fit the model being trained."""


def init_state(init_dir: Path, channel: str, stage: str, config: dict[str, Any]) -> dict[str, torch.Tensor]:
    """State dict of the exported ``stage`` ('global' or 'patch') network, checked against ``config``.

    The manifest's ``channels.<channel>.training.model`` (global) / ``patch_model`` must equal the
    model config being trained, and the TorchScript file's parameters must match its keys and shapes.
    """
    manifest_path = init_dir / "manifest.json"
    path = init_dir / f"{channel}_{stage}.pt"
    if not manifest_path.is_file() or not path.is_file():
        raise InitError(f"--init {init_dir}: needs {manifest_path.name} and {path.name}")
    training = json.loads(manifest_path.read_text()).get("channels", {}).get(channel, {}).get("training", {})
    exported = training.get("model" if stage == "global" else "patch_model")
    if exported != config:
        raise InitError(f"--init {init_dir}: {channel} {stage} model in the manifest is {exported}, training {config} (check --base/--depth)")
    state = {k: v.detach().clone() for k, v in torch.jit.load(str(path), map_location="cpu").state_dict().items()}
    expected = ResidualUNet3D(**config).state_dict()
    wrong = sorted(set(state) ^ set(expected)) + sorted(k for k in set(state) & set(expected) if state[k].shape != expected[k].shape)
    if wrong:
        raise InitError(f"--init {path}: {len(wrong)} parameters differ from the model ({', '.join(wrong[:5])}...)")
    return state


def build_model(in_channels: int, first_stride: int, args: argparse.Namespace, stage: str, device: torch.device) -> ResidualUNet3D:
    """A fresh stage network (initialised from ``seed`` and the stage alone), or the exported one with ``--init``."""
    torch.manual_seed(args.seed * 10 + STAGES[stage])  # independent of what ran before: resumed runs build the same model
    model = ResidualUNet3D(in_channels, base=args.base, depth=args.depth, first_stride=first_stride)
    if getattr(args, "init", None) is not None:
        model.load_state_dict(init_state(args.init, args.channel, stage, model.config))
        log.info("%s stage initialised from %s", stage, args.init / f"{args.channel}_{stage}.pt")
    return model.to(device)


def lr_at(base_lr: float, fraction: float, warmup: float = 0.03) -> float:
    """Linear warm-up (10 % → 100 %) then cosine decay to 2 % of ``base_lr``; ``fraction`` = step / total steps."""
    if fraction < warmup:
        return base_lr * (0.1 + 0.9 * fraction / warmup)
    return base_lr * (0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * min(1.0, (fraction - warmup) / (1 - warmup)))))


def amp_dtype(choice: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype: None on CPU or with 'off'; 'auto' = bf16 where the GPU supports it, else fp16."""
    if device.type != "cuda" or choice == "off":
        return None
    if choice == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if choice == "bf16" else torch.float16


class StopSignal:
    """Set by SIGTERM / SIGINT: the run saves its state at the next step and exits (``--resume`` continues)."""

    def __init__(self) -> None:
        self.raised = False

    def install(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(ValueError):  # not the main thread (tests)
                signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:  # noqa: ARG002
        log.warning("signal %d: stopping after this step (state is saved; --resume continues)", signum)
        self.raised = True


def atomic_save(obj: Any, path: Path) -> None:
    """``torch.save`` to a temporary file renamed into place: a crash never leaves a half-written checkpoint."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def rng_state(device: torch.device) -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def evaluate_whole(model: torch.nn.Module, x: np.ndarray, y: np.ndarray, extra: np.ndarray | None, device: torch.device) -> tuple[float, float]:
    """(MAE of the model, MAE of the identity) on one whole volume (ZYX, normalised)."""
    was_training = model.training
    model.eval()
    with torch.no_grad():
        arrays = [np.asarray(x)] if extra is None else [np.asarray(x), np.asarray(extra)]
        inp = torch.from_numpy(np.stack(arrays)[None].astype(np.float32)).to(device)
        pred = model(inp)[0, 0].float().cpu().numpy()
    model.train(was_training)
    y = np.asarray(y)
    return float(np.abs(pred - y).mean()), float(np.abs(np.asarray(x) - y).mean())


class Run:
    """What one invocation carries between the stages: args, process info, history and timing."""

    def __init__(self, args: argparse.Namespace, info: DistInfo, stop: StopSignal) -> None:
        self.args, self.info, self.stop = args, info, stop
        self.started = time.perf_counter()
        self.history: list[dict[str, Any]] = []
        self.steps_this_invocation = 0
        self.stage_seconds: dict[str, float] = {"global": 0.0, "patch": 0.0}
        self.hardware: list[str] = []
        self.steps: dict[str, int] = {"global": 0, "patch": 0}
        self.amp = amp_dtype(args.amp, info.device)

    @property
    def this_hardware(self) -> str:
        return hardware(self.info.device, self.info.world)

    def record(self) -> dict[str, Any]:
        """Provenance kept in the checkpoints (no machine paths)."""
        hw = self.hardware + ([self.this_hardware] if self.this_hardware not in self.hardware else [])
        return {
            "steps": dict(self.steps),
            "seconds": {k: round(v, 3) for k, v in self.stage_seconds.items()},
            "hardware": hw,
            "world_size": self.info.world,
            "amp": str(self.amp).replace("torch.", "") if self.amp else "off",
            "preset": self.args.preset,
            "command": portable_command(list(self.args.argv)),
        }


def save_state(run: Run, stage: str, step: int, complete: bool, parts: dict[str, Any]) -> None:
    """Write ``OUT/state.pt`` (rank 0): everything ``--resume`` needs to continue ``stage`` at ``step``."""
    if not run.info.main:
        return
    atomic_save(
        {
            "stage": stage,
            "step": step,
            "complete": complete,
            "steps_total": run.args.steps_global if stage == "global" else run.args.steps_patch,
            "rng": rng_state(run.info.device),
            "history": run.history,
            "stage_seconds": run.stage_seconds,
            "steps": run.steps,
            "hardware": run.record()["hardware"],
            **parts,
        },
        run.args.out / STATE_NAME,
    )


def run_stage(
    run: Run,
    stage: str,
    model: ResidualUNet3D,
    dataset: CropDataset,
    evaluate: Callable[[torch.nn.Module], dict[str, float]] | None,
    resume: dict[str, Any] | None,
) -> bool:
    """Train ``stage`` from step 0 or from ``resume``; returns whether it reached its total steps.

    Stops early (state saved, returns False) on the wall-clock cap, ``--stop-after-steps`` or a
    signal; all ranks stop at the same step. ``evaluate(model)`` (rank 0) logs held-out figures.
    """
    args, info, device = run.args, run.info, run.info.device
    total = args.steps_global if stage == "global" else args.steps_patch
    minutes = args.minutes_global if stage == "global" else args.minutes_patch
    optimiser = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=1e-4)
    scaler = torch.amp.GradScaler(device.type, enabled=run.amp == torch.float16)
    disc = d_opt = None
    if stage == "patch" and args.adversarial:
        torch.manual_seed(args.seed * 10 + 7)
        disc = PatchDiscriminator3D(2).to(device)
        d_opt = torch.optim.AdamW(disc.parameters(), lr=args.lr * 0.5)
    d_losses: list[float] = []
    step = 0
    if resume is not None:
        model.load_state_dict(resume["model"])
        optimiser.load_state_dict(resume["optimiser"])
        scaler.load_state_dict(resume["scaler"])
        if disc is not None and d_opt is not None and resume.get("disc") is not None:
            disc.load_state_dict(resume["disc"])
            d_opt.load_state_dict(resume["d_opt"])
        set_rng_state(resume["rng"], device)
        step = int(resume["step"])
        log.info("%s stage resumed at step %d of %d", stage, step, total)
    train_model: torch.nn.Module = model
    train_disc: torch.nn.Module | None = disc
    if info.world > 1:
        ids = [device.index] if device.type == "cuda" else None
        train_model = DistributedDataParallel(model, device_ids=ids)
        train_disc = DistributedDataParallel(disc, device_ids=ids) if disc is not None else None
    initial_digest = weights_digest(model)
    model.train()
    d_initial = [q.detach().clone() for q in disc.parameters()] if disc is not None else []
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=args.batch,
        sampler=range(step * args.batch, total * args.batch),
        num_workers=args.workers,
        pin_memory=device.type == "cuda",
        persistent_workers=False,
        prefetch_factor=4 if args.workers > 0 else None,
    )
    log.info("%s stage: %d parameters, %d steps (from %d), batch %d x %d process(es), amp %s", stage, count_parameters(model), total, step, args.batch, info.world, run.amp)

    def parts() -> dict[str, Any]:
        return {
            "model": model.state_dict(),
            "optimiser": optimiser.state_dict(),
            "scaler": scaler.state_dict(),
            "disc": disc.state_dict() if disc is not None else None,
            "d_opt": d_opt.state_dict() if d_opt is not None else None,
            "config": model.config,
        }

    began = last_save = last_log = time.perf_counter()
    seconds_before = run.stage_seconds[stage]
    log_step, running = step, []
    stopped = False
    autocast = (lambda: torch.autocast(device.type, dtype=run.amp)) if run.amp is not None else contextlib.nullcontext
    for inp, target in loader if step < total else []:
        inp, target = inp.to(device, non_blocking=True), target.to(device, non_blocking=True)
        for group in optimiser.param_groups:
            group["lr"] = lr_at(args.lr, step / total)
        with autocast():
            pred = train_model(inp)
        loss = difference_weighted_mae(pred.float(), target, inp[:, :1], args.alpha)
        if train_disc is not None:
            with autocast():
                fake_logits = train_disc(torch.cat([inp[:, :1], pred], 1))
            loss = loss + args.adv_weight * lsgan_generator_loss(fake_logits.float())
        optimiser.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimiser)
        if train_disc is not None and d_opt is not None:
            with autocast():
                real, fake = train_disc(torch.cat([inp[:, :1], target], 1)), train_disc(torch.cat([inp[:, :1], pred.detach()], 1))
            d_loss = lsgan_discriminator_loss(real.float(), fake.float())
            d_opt.zero_grad(set_to_none=True)
            scaler.scale(d_loss).backward()
            scaler.step(d_opt)
            d_losses.append(d_loss.item())
        scaler.update()
        running.append(loss.item())
        step += 1
        run.steps_this_invocation += 1
        run.steps[stage] = step
        now = time.perf_counter()
        run.stage_seconds[stage] = seconds_before + now - began
        if info.main and (step % args.log_every == 0 or step == total):
            rate = (step - log_step) / max(now - last_log, 1e-9)
            record = {"stage": stage, "step": step, "seconds": round(run.stage_seconds[stage], 1), "loss": float(np.mean(running)), "steps_per_s": round(rate, 3), "eta_min": round((total - step) / max(rate, 1e-9) / 60, 1)}
            if evaluate is not None and args.eval_every and (step % args.eval_every == 0 or step == total):
                record.update(evaluate(model))
            run.history.append(record)
            log.info("%s", record)
            running, log_step, last_log = [], step, now
        if step >= total:
            break
        stop = (
            run.stop.raised
            or now - began > minutes * 60
            or (args.max_minutes is not None and now - run.started > args.max_minutes * 60)
            or (args.stop_after_steps is not None and run.steps_this_invocation >= args.stop_after_steps)
        )
        if any_rank(stop, info):
            stopped = True
            break
        if now - last_save > args.checkpoint_minutes * 60:
            save_state(run, stage, step, False, parts())
            last_save = now
    complete = step >= total and not stopped
    if info.world > 1:  # the replicas must have stayed identical
        digests = gather_strings(weights_digest(model), info)
        run.history.append({"stage": stage, "step": step, "initial_digest": initial_digest, "replica_digests": digests})
        if len(set(digests)) != 1:
            log.error("%s stage: replicas differ after step %d: %s", stage, step, digests)
    if disc is not None and info.main:
        change = float(sum((q.detach() - q0).abs().sum().item() for q, q0 in zip(disc.parameters(), d_initial)))
        run.history.append({"stage": "discriminator", "steps": len(d_losses), "d_loss": float(np.mean(d_losses)) if d_losses else None, "param_change": change})
        log.info("%s", run.history[-1])
    save_state(run, stage, step, complete, parts())
    if stopped:
        log.warning("%s stage stopped at step %d of %d (%.0f s in this run): --resume continues", stage, step, total, time.perf_counter() - began)
    return complete


def load_cases(args: argparse.Namespace, pairs: list[Pair], cache: Path, info: DistInfo) -> list[dict[str, Any]]:
    """Cache every pair on H (and on the global grid) as .npy; each rank prepares its share first."""
    grid = tuple(args.grid)
    for phase in ("prepare", "open"):
        cases = []
        for i, pair in enumerate(pairs):
            if phase == "prepare" and i % info.world != info.rank:
                continue
            try:
                x, y = cached_pair(pair, DEFAULT_NORMALISATION, args.target_spacing, cache)
            except ShapeMismatchError as exc:
                if phase == "open" and info.main:
                    log.warning("skipped: %s", exc)
                continue
            folder = Path(x.filename).parent  # type: ignore[attr-defined]
            tag = "x".join(str(g) for g in grid)
            x_g = cached_resize(x, grid, folder / f"global_{tag}_input.npy")
            y_g = cached_resize(y, grid, folder / f"global_{tag}_target.npy")
            cases.append({"name": pair.angle.name, "x": x, "y": y, "x_g": x_g, "y_g": y_g, "dir": folder})
        if phase == "prepare":
            barrier(info)
    return cases


def predict_global(model: torch.nn.Module, x: np.ndarray, grid: tuple[int, int, int], device: torch.device) -> np.ndarray:
    """Stage-1 prediction upsampled to H (ZYX), through the same resize path as inference."""
    with torch.no_grad():
        coarse = torch.from_numpy(resize(np.asarray(x), grid, RESIZE_OPS)[None, None]).to(device)
        p1 = model(coarse)[0, 0].float().cpu().numpy()
    return resize(p1, x.shape, RESIZE_OPS)


def weights_digest(model: torch.nn.Module) -> str:
    """sha256 (16 hex digits) of a model's parameters and buffers: equal digests = identical replicas."""
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def file_digest(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


def stage1_predictions(model: ResidualUNet3D, cases: list[dict[str, Any]], grid: tuple[int, int, int], cache: Path, tag: str, info: DistInfo) -> None:
    """Stage-1 predictions on H for every case, memory-mapped under ``cache/stage1/<tag>/`` (shared out between ranks)."""
    model.eval()
    folder = cache / "stage1" / tag
    for i, case in enumerate(cases):
        path = folder / f"{i:05d}_{Path(case['name']).stem}.npy"
        if i % info.world == info.rank and not path.is_file():
            save_npy(path, predict_global(model, case["x"], grid, info.device))
        case["p1_path"] = path
    barrier(info)
    for case in cases:
        case["p1"] = np.load(case["p1_path"], mmap_mode="r")


def save_stage(run: Run, stage: str, model: ResidualUNet3D, extra: dict[str, Any]) -> Path:
    """Write ``OUT/global.pt`` or ``OUT/patch.pt`` (the export format) with provenance (rank 0)."""
    path = run.args.out / f"{stage}.pt"
    if run.info.main:
        common = {"normalisation": DEFAULT_NORMALISATION, "target_spacing_um": run.args.target_spacing, "channel": run.args.channel}
        atomic_save({"state_dict": model.state_dict(), "config": model.config, **common, **extra, "steps": run.steps[stage], "command": portable_command(list(run.args.argv)), "provenance": run.record()}, path)
    barrier(run.info)
    return path


def write_log(run: Run, cases: list[dict[str, Any]], held: list[dict[str, Any]], complete: bool) -> None:
    if not run.info.main:
        return
    summary = {
        "channel": run.args.channel,
        "complete": complete,
        "pairs": len(cases),
        "held_out": [c["name"] for c in held],
        "global_steps": run.steps["global"],
        "patch_steps": run.steps["patch"],
        "seconds": round(time.perf_counter() - run.started, 1),
        "provenance": run.record(),
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(run.args).items() if k != "argv"},
        "history": run.history,
    }
    tmp = run.args.out / ".train_log.json.tmp"
    tmp.write_text(json.dumps(summary, indent=1))
    os.replace(tmp, run.args.out / "train_log.json")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    info = init_distributed(args.device)
    try:
        return train(args, info)
    finally:
        shutdown(info)


def train(args: argparse.Namespace, info: DistInfo) -> int:
    device = info.device
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    if args.init is not None:  # fail before loading any data
        try:
            init_state(args.init, args.channel, "global", ResidualUNet3D(1, base=args.base, depth=args.depth, first_stride=2).config)
            init_state(args.init, args.channel, "patch", ResidualUNet3D(2, base=args.base, depth=args.depth, first_stride=1).config)
        except InitError as exc:
            log.error("%s", exc)
            return 2
    state_path = args.out / STATE_NAME
    resume = None
    if state_path.is_file():
        if not args.resume:
            log.error("%s exists: pass --resume to continue it, or choose another --out", state_path)
            return 2
        resume = torch.load(state_path, map_location="cpu", weights_only=False)
    elif args.resume:
        log.warning("--resume: no %s yet, starting from step 0", state_path)
    pairs = find_pairs(args.data, args.channel)
    if not pairs:
        log.error("no %s pairs under %s", args.channel, args.data)
        return 2
    cache = args.cache if args.cache is not None else args.out / "cache"
    args.out.mkdir(parents=True, exist_ok=True)
    cases = load_cases(args, pairs, cache, info)
    if not cases:
        log.error("no usable %s pairs under %s", args.channel, args.data)
        return 2
    held = cases[-1:] if len(cases) >= 4 else []
    train_cases = cases[: len(cases) - len(held)]
    if info.main:
        log.info("%d %s pairs (%d for training, %d held out), %s", len(cases), args.channel, len(train_cases), len(held), hardware(device, info.world))
    stop = StopSignal()
    stop.install()
    run = Run(args, info, stop)
    if resume is not None:
        run.history, run.stage_seconds, run.steps = resume["history"], resume["stage_seconds"], resume["steps"]
        run.hardware = list(resume.get("hardware", []))
    grid = tuple(args.grid)
    crop = tuple(min(c, g) for c, g in zip(args.global_crop, grid))

    # --- stage 1 ---
    global_model = build_model(1, 2, args, "global", device)
    global_path = args.out / "global.pt"
    if resume is None or resume["stage"] == "global":
        files = [[c["x_g"].filename, c["y_g"].filename] for c in train_cases]
        dataset = CropDataset([[Path(f) for f in fs] for fs in files], crop, args.seed, STAGES["global"], info.rank, augment=args.augment)

        def evaluate_global(model: torch.nn.Module) -> dict[str, float]:
            scores = [evaluate_whole(model, c["x_g"], c["y_g"], None, device) for c in held]
            return {"held_mae": float(np.mean([s[0] for s in scores])), "held_identity_mae": float(np.mean([s[1] for s in scores]))} if scores else {}

        if not run_stage(run, "global", global_model, dataset, evaluate_global, resume):
            write_log(run, cases, held, False)
            return 0
        save_stage(run, "global", global_model, {"grid": list(grid)})
        resume = None
    else:
        global_model.load_state_dict(torch.load(global_path, map_location="cpu", weights_only=False)["state_dict"])
    stage1_predictions(global_model, cases, grid, cache, file_digest(global_path), info)

    # --- stage 2 ---
    rng = np.random.default_rng([args.seed, 99])
    bright = [bright_centres(c["y"], rng) for c in train_cases]
    dataset = CropDataset([[Path(c["x"].filename), c["p1_path"], Path(c["y"].filename)] for c in train_cases], tuple(args.patch), args.seed, STAGES["patch"], info.rank, bright, args.augment)
    patch_model = build_model(2, 1, args, "patch", device)
    if resume is not None and resume.get("complete"):
        patch_model.load_state_dict(resume["model"])
        complete = True
    else:
        complete = run_stage(run, "patch", patch_model, dataset, None, resume)
    if complete:
        save_stage(run, "patch", patch_model, {"patch_size": list(args.patch)})
        if info.main and held:
            scores = [evaluate_whole(patch_model, c["x"], c["y"], c["p1"], device) for c in held]
            run.history.append({"stage": "patch", "step": run.steps["patch"], "held_mae": float(np.mean([s[0] for s in scores])), "held_identity_mae": float(np.mean([s[1] for s in scores]))})
            log.info("%s", run.history[-1])
    write_log(run, cases, held, complete)
    if info.main:
        log.info("%s in %.0f s: %s", "done" if complete else "stopped", time.perf_counter() - run.started, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
