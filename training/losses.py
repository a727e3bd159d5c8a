"""Losses: MAE weighted by the paper's |input − target| difference, and the LSGAN terms."""

from __future__ import annotations

import torch


def difference_weights(inp: torch.Tensor, target: torch.Tensor, alpha: float = 2.0, eps: float = 1e-6) -> torch.Tensor:
    """Per-voxel weights 1 + α·d/mean(d) with d = |input − target| (per sample): voxels that need changing count more."""
    d = (inp - target).abs()
    mean = d.mean(dim=tuple(range(1, d.ndim)), keepdim=True)
    return 1.0 + alpha * d / (mean + eps)


def difference_weighted_mae(pred: torch.Tensor, target: torch.Tensor, inp: torch.Tensor, alpha: float = 2.0) -> torch.Tensor:
    """Mean of w·|pred − target| / mean(w) (see :func:`difference_weights`); tensors (N, 1, Z, Y, X)."""
    w = difference_weights(inp, target, alpha).detach()
    return (w * (pred - target).abs()).sum() / w.sum()


def lsgan_discriminator_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """Least-squares GAN: real → 1, fake → 0."""
    return 0.5 * ((real_logits - 1.0) ** 2).mean() + 0.5 * (fake_logits**2).mean()


def lsgan_generator_loss(fake_logits: torch.Tensor) -> torch.Tensor:
    """Least-squares GAN generator term: fake → 1."""
    return 0.5 * ((fake_logits - 1.0) ** 2).mean()
