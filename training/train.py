"""Train both stages for one channel, within wall-clock budgets.

    python -m training.train --data work_dirs/data/train --channel nucleus --out work_dirs/nucleus \
        --minutes-global 8 --minutes-patch 14

Stage 1 learns the fused volume from the single view on the global grid (random crops of it, so
a CPU step stays cheap; the network is fully convolutional and sees the whole grid at inference).
Stage 2 learns it from patches of the high-resolution grid H with two channels: the image and
stage 1's prediction, upsampled exactly as at inference. Checkpoints: ``global.pt``, ``patch.pt``
(state dict + model config + grid/patch + normalisation), and ``train_log.json``.

``--init DIR`` fine-tunes from exported weights: ``DIR/<channel>_global.pt`` / ``_patch.pt``
(TorchScript) with the model configs of ``DIR/manifest.json`` (``channels.<channel>.training``).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fusemycells.preprocess import resize

from .data import Pair, ShapeMismatchError, bright_centres, cached_pair, find_pairs, random_crop, random_flip, save_npy
from .losses import difference_weighted_mae, lsgan_discriminator_loss, lsgan_generator_loss
from .models import PatchDiscriminator3D, ResidualUNet3D, count_parameters

log = logging.getLogger("training.train")
DEFAULT_NORMALISATION = {"kind": "percentile", "low": 1.0, "high": 99.8}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Train the global and patch stages for one channel.")
    p.add_argument("--data", type=Path, required=True, help="folder with image_<N>_<channel>_angle.tif / _fused.tif pairs (searched recursively)")
    p.add_argument("--channel", choices=["nucleus", "membrane"], required=True)
    p.add_argument("--out", type=Path, required=True, help="checkpoint folder")
    p.add_argument("--grid", type=int, nargs=3, default=[128, 128, 128], help="global grid ZYX (voxels)")
    p.add_argument("--global-crop", type=int, nargs=3, default=[80, 80, 80], help="training crop of the global grid (voxels)")
    p.add_argument("--patch", type=int, nargs=3, default=[64, 64, 64], help="patch size ZYX on H (voxels)")
    p.add_argument("--base", type=int, default=8, help="U-Net width of the first level")
    p.add_argument("--depth", type=int, default=3)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--alpha", type=float, default=2.0, help="difference weighting of the MAE")
    p.add_argument("--minutes-global", type=float, default=8.0)
    p.add_argument("--minutes-patch", type=float, default=14.0)
    p.add_argument("--max-steps", type=int, default=None, help="stop each stage after this many steps (tests)")
    p.add_argument("--adversarial", action="store_true", help="add the LSGAN term with a 3D patch discriminator (stage 2)")
    p.add_argument("--adv-weight", type=float, default=0.01)
    p.add_argument("--target-spacing", type=float, default=0.6, help="isotropic spacing of H (µm)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cache", type=Path, default=None, metavar="DIR", help="where each case is cached as .npy on the 0.6 µm grid and memory-mapped (default OUT/cache)")
    p.add_argument("--init", type=Path, default=None, metavar="DIR", help="start from exported weights: DIR/<channel>_global.pt, DIR/<channel>_patch.pt (TorchScript) and DIR/manifest.json")
    return p.parse_args(argv)


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


def build_model(in_channels: int, first_stride: int, args: argparse.Namespace, stage: str, device: str) -> ResidualUNet3D:
    """A fresh stage network, or the exported one with ``--init``."""
    model = ResidualUNet3D(in_channels, base=args.base, depth=args.depth, first_stride=first_stride)
    if getattr(args, "init", None) is not None:
        model.load_state_dict(init_state(args.init, args.channel, stage, model.config))
        log.info("%s stage initialised from %s", stage, args.init / f"{args.channel}_{stage}.pt")
    return model.to(device)


class Budget:
    """Stops a stage after ``minutes`` of wall time or ``max_steps`` steps."""

    def __init__(self, minutes: float, max_steps: int | None) -> None:
        self.seconds, self.max_steps, self.started = minutes * 60.0, max_steps, time.perf_counter()

    def running(self, step: int) -> bool:
        if self.max_steps is not None and step >= self.max_steps:
            return False
        return time.perf_counter() - self.started < self.seconds

    def fraction(self, step: int) -> float:
        by_time = (time.perf_counter() - self.started) / self.seconds if self.seconds > 0 else 1.0
        by_steps = step / self.max_steps if self.max_steps else 0.0
        return min(1.0, max(by_time, by_steps))


def set_lr(optimiser: torch.optim.Optimizer, base_lr: float, fraction: float, warmup: float = 0.03) -> None:
    """Linear warm-up then cosine decay to 2 % of ``base_lr`` over the stage's budget."""
    if fraction < warmup:
        lr = base_lr * (0.1 + 0.9 * fraction / warmup)
    else:
        lr = base_lr * (0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * (fraction - warmup) / (1 - warmup))))
    for group in optimiser.param_groups:
        group["lr"] = lr


def optimise(optimiser: torch.optim.Optimizer, loss: torch.Tensor) -> None:
    """One gradient step on ``loss``."""
    optimiser.zero_grad(set_to_none=True)
    loss.backward()
    optimiser.step()


def to_tensor(arrays: list[np.ndarray], device: str) -> torch.Tensor:
    """Stack (C, Z, Y, X) arrays of one sample; returns (1, C, Z, Y, X)."""
    return torch.from_numpy(np.stack(arrays)[None].astype(np.float32)).to(device)


def evaluate_whole(model: torch.nn.Module, x: np.ndarray, y: np.ndarray, extra: np.ndarray | None, device: str) -> tuple[float, float]:
    """(MAE of the model, MAE of the identity) on one whole volume."""
    model.eval()
    with torch.no_grad():
        inp = to_tensor([x] if extra is None else [x, extra], device)
        pred = model(inp)[0, 0].cpu().numpy()
    model.train()
    return float(np.abs(pred - y).mean()), float(np.abs(x - y).mean())


def train_global(cases: list[dict[str, Any]], held: list[dict[str, Any]], args: argparse.Namespace, device: str, history: list[dict]) -> ResidualUNet3D:
    grid = tuple(args.grid)
    crop = tuple(min(c, g) for c, g in zip(args.global_crop, grid))
    for case in cases + held:
        case["x_g"], case["y_g"] = resize(case["x"], grid), resize(case["y"], grid)
    model = build_model(1, 2, args, "global", device)
    log.info("global stage: %d parameters, grid %s, crops %s", count_parameters(model), grid, crop)
    optimiser = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=1e-4)
    rng = np.random.default_rng(args.seed)
    budget, step, running = Budget(args.minutes_global, args.max_steps), 0, []
    while budget.running(step):
        set_lr(optimiser, args.lr, budget.fraction(step))
        xs, ys = [], []
        for _ in range(args.batch):
            case = cases[rng.integers(len(cases))]
            x, y = random_flip(random_crop([case["x_g"], case["y_g"]], crop, rng), rng)
            xs.append(x)
            ys.append(y)
        inp = torch.from_numpy(np.stack(xs)[:, None].copy()).to(device)
        target = torch.from_numpy(np.stack(ys)[:, None].copy()).to(device)
        loss = difference_weighted_mae(model(inp), target, inp, args.alpha)
        optimise(optimiser, loss)
        running.append(loss.item())
        step += 1
        if step % 25 == 0:
            record = {"stage": "global", "step": step, "seconds": round(time.perf_counter() - budget.started, 1), "loss": float(np.mean(running))}
            running = []
            if held:
                scores = [evaluate_whole(model, c["x_g"], c["y_g"], None, device) for c in held]
                record["held_mae"], record["held_identity_mae"] = float(np.mean([s[0] for s in scores])), float(np.mean([s[1] for s in scores]))
            history.append(record)
            log.info("%s", record)
    log.info("global stage: %d steps in %.0f s", step, time.perf_counter() - budget.started)
    args.global_steps = step
    return model.eval()


def predict_global(model: ResidualUNet3D, x: np.ndarray, grid: tuple[int, int, int], device: str) -> np.ndarray:
    """Stage-1 prediction upsampled to H, through the same resize path as inference."""
    with torch.no_grad():
        coarse = torch.from_numpy(resize(x, grid)[None, None]).to(device)
        p1 = model(coarse)[0, 0].cpu().numpy()
    return resize(p1, x.shape)


def train_patch(cases: list[dict[str, Any]], held: list[dict[str, Any]], args: argparse.Namespace, device: str, history: list[dict]) -> ResidualUNet3D:
    patch = tuple(args.patch)
    model = build_model(2, 1, args, "patch", device)
    log.info("patch stage: %d parameters, patch %s, batch %d", count_parameters(model), patch, args.batch)
    optimiser = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=1e-4)
    disc = d_opt = None
    if args.adversarial:
        disc = PatchDiscriminator3D(2).to(device)
        d_opt = torch.optim.AdamW(disc.parameters(), lr=args.lr * 0.5)
        d_initial = [q.detach().clone() for q in disc.parameters()]
    d_losses: list[float] = []
    rng = np.random.default_rng(args.seed + 1)
    for case in cases:
        case["bright"] = bright_centres(case["y"], rng)
    budget, step, running = Budget(args.minutes_patch, args.max_steps), 0, []
    while budget.running(step):
        set_lr(optimiser, args.lr, budget.fraction(step))
        samples = []
        for i in range(args.batch):
            case = cases[rng.integers(len(cases))]
            centre = case["bright"] if i % 2 == 0 else None  # half the patches on bright structures
            samples.append(random_flip(random_crop([case["x"], case["p1"], case["y"]], patch, rng, centres=centre), rng))
        inp = torch.from_numpy(np.stack([np.stack(s[:2]) for s in samples]).copy()).to(device)
        target = torch.from_numpy(np.stack([s[2][None] for s in samples]).copy()).to(device)
        pred = model(inp)
        loss = difference_weighted_mae(pred, target, inp[:, :1], args.alpha)
        if disc is not None and d_opt is not None:
            loss = loss + args.adv_weight * lsgan_generator_loss(disc(torch.cat([inp[:, :1], pred], 1)))
        optimise(optimiser, loss)
        if disc is not None and d_opt is not None:
            d_loss = lsgan_discriminator_loss(disc(torch.cat([inp[:, :1], target], 1)), disc(torch.cat([inp[:, :1], pred.detach()], 1)))
            optimise(d_opt, d_loss)
            d_losses.append(d_loss.item())
        running.append(loss.item())
        step += 1
        if step % 50 == 0:
            record = {"stage": "patch", "step": step, "seconds": round(time.perf_counter() - budget.started, 1), "loss": float(np.mean(running))}
            running = []
            history.append(record)
            log.info("%s", record)
    if disc is not None:
        change = float(sum((q.detach() - q0).abs().sum().item() for q, q0 in zip(disc.parameters(), d_initial)))
        history.append({"stage": "discriminator", "steps": len(d_losses), "d_loss": float(np.mean(d_losses)) if d_losses else None, "param_change": change})
        log.info("%s", history[-1])
    if held:
        scores = [evaluate_whole(model, c["x"], c["y"], c["p1"], device) for c in held]
        history.append({"stage": "patch", "step": step, "held_mae": float(np.mean([s[0] for s in scores])), "held_identity_mae": float(np.mean([s[1] for s in scores]))})
        log.info("%s", history[-1])
    log.info("patch stage: %d steps in %.0f s", step, time.perf_counter() - budget.started)
    args.patch_steps = step
    return model.eval()


def save_checkpoint(path: Path, model: ResidualUNet3D, extra: dict[str, Any]) -> None:
    torch.save({"state_dict": model.state_dict(), "config": model.config, **extra}, path)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    torch.manual_seed(args.seed)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = "cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available()) else "cpu"
    if args.init is not None:  # fail before loading any data
        try:
            init_state(args.init, args.channel, "global", ResidualUNet3D(1, base=args.base, depth=args.depth, first_stride=2).config)
            init_state(args.init, args.channel, "patch", ResidualUNet3D(2, base=args.base, depth=args.depth, first_stride=1).config)
        except InitError as exc:
            log.error("%s", exc)
            return 2
    pairs: list[Pair] = find_pairs(args.data, args.channel)
    if not pairs:
        log.error("no %s pairs under %s", args.channel, args.data)
        return 2
    started = time.perf_counter()
    cache = args.cache if args.cache is not None else args.out / "cache"
    cases = []
    for pair in pairs:
        try:
            x, y = cached_pair(pair, DEFAULT_NORMALISATION, args.target_spacing, cache)
        except ShapeMismatchError as exc:
            log.warning("skipped: %s", exc)
            continue
        cases.append({"name": pair.angle.name, "x": x, "y": y})
    if not cases:
        log.error("no usable %s pairs under %s", args.channel, args.data)
        return 2
    held = cases[-1:] if len(cases) >= 4 else []
    train_cases = cases[: len(cases) - len(held)]
    log.info("%d %s pairs loaded in %.0f s (%d for training, %d held out)", len(cases), args.channel, time.perf_counter() - started, len(train_cases), len(held))
    args.out.mkdir(parents=True, exist_ok=True)
    history: list[dict] = []
    common = {"normalisation": DEFAULT_NORMALISATION, "target_spacing_um": args.target_spacing, "channel": args.channel, "command": " ".join(sys.argv)}

    global_model = train_global(train_cases, held, args, device, history)
    save_checkpoint(args.out / "global.pt", global_model, {**common, "grid": list(args.grid), "steps": args.global_steps})
    for i, case in enumerate(cases):  # stage-1 predictions on H, memory-mapped like the cases (rewritten every run)
        p1_path = cache / "stage1" / f"{i:05d}_{Path(case['name']).stem}.npy"
        save_npy(p1_path, predict_global(global_model, case["x"], tuple(args.grid), device))
        case["p1"] = np.load(p1_path, mmap_mode="r")
        case.pop("x_g", None)
        case.pop("y_g", None)
    patch_model = train_patch(train_cases, held, args, device, history)
    save_checkpoint(args.out / "patch.pt", patch_model, {**common, "patch_size": list(args.patch), "steps": args.patch_steps})
    summary = {
        "channel": args.channel,
        "pairs": len(cases),
        "held_out": [c["name"] for c in held],
        "global_steps": args.global_steps,
        "patch_steps": args.patch_steps,
        "seconds": round(time.perf_counter() - started, 1),
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "history": history,
    }
    (args.out / "train_log.json").write_text(json.dumps(summary, indent=1))
    log.info("done in %.0f s: %s", summary["seconds"], args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
