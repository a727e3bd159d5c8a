"""3D residual U-Nets for both stages, and the 3D patch discriminator of the adversarial term.

Tensors are (N, C, Z, Y, X). The U-Net works on any spatial shape: strided convolutions round
odd sizes up and each decoder level is upsampled to the exact size of its skip connection, so a
network traced at one shape runs at others (the export checks this).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class ResBlock(nn.Module):
    """Two 3×3×3 conv – instance norm – LeakyReLU layers with a (1×1×1 if needed) skip."""

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv3d(c_in, c_out, 3, padding=1, bias=False)
        self.norm1 = nn.InstanceNorm3d(c_out, affine=True)
        self.conv2 = nn.Conv3d(c_out, c_out, 3, padding=1, bias=False)
        self.norm2 = nn.InstanceNorm3d(c_out, affine=True)
        self.skip = nn.Identity() if c_in == c_out else nn.Conv3d(c_in, c_out, 1, bias=False)
        self.act = nn.LeakyReLU(0.01, inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.act(self.norm1(self.conv1(x)))
        y = self.norm2(self.conv2(y))
        return self.act(y + self.skip(x))


class Down(nn.Module):
    """Strided 3×3×3 convolution (halves each axis, rounding up) followed by a residual block."""

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        self.conv = nn.Conv3d(c_in, c_out, 3, stride=2, padding=1, bias=False)
        self.norm = nn.InstanceNorm3d(c_out, affine=True)
        self.block = ResBlock(c_out, c_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(F.leaky_relu(self.norm(self.conv(x)), 0.01))


class Up(nn.Module):
    """Trilinear upsampling to the skip's size, 1×1×1 projection, concatenation, residual block."""

    def __init__(self, c_in: int, c_skip: int, c_out: int) -> None:
        super().__init__()
        self.proj = nn.Conv3d(c_in, c_out, 1, bias=False)
        self.block = ResBlock(c_out + c_skip, c_out)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(self.proj(x), size=skip.shape[2:], mode="trilinear", align_corners=False)
        return self.block(torch.cat([x, skip], dim=1))


class ResidualUNet3D(nn.Module):
    """Residual U-Net predicting the fused volume as ``x[:, :1] + correction``.

    ``first_stride=2`` runs the whole U-Net at half resolution (cheap for the large global
    grid) and refines at full resolution with the raw input. The output head is zero-initialised,
    so an untrained network is exactly the identity on the image channel: training can only
    start from "change nothing".
    """

    def __init__(self, in_channels: int, out_channels: int = 1, base: int = 8, depth: int = 3, first_stride: int = 1) -> None:
        super().__init__()
        if first_stride not in (1, 2):
            raise ValueError("first_stride must be 1 or 2")
        self.config = {"in_channels": in_channels, "out_channels": out_channels, "base": base, "depth": depth, "first_stride": first_stride}
        self.first_stride = first_stride
        widths = [base * 2**i for i in range(depth + 1)]
        if first_stride == 2:
            self.stem: nn.Module = nn.Sequential(
                nn.Conv3d(in_channels, base, 3, stride=2, padding=1, bias=False),
                nn.InstanceNorm3d(base, affine=True),
                nn.LeakyReLU(0.01, inplace=True),
                ResBlock(base, base),
            )
        else:
            self.stem = ResBlock(in_channels, base)
        self.downs = nn.ModuleList(Down(widths[i], widths[i + 1]) for i in range(depth))
        self.ups = nn.ModuleList(Up(widths[i + 1], widths[i], widths[i]) for i in reversed(range(depth)))
        self.refine = ResBlock(base + in_channels, base) if first_stride == 2 else None
        self.head = nn.Conv3d(base, out_channels, 1)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = [self.stem(x)]
        for down in self.downs:
            features.append(down(features[-1]))
        y = features[-1]
        for up, skip in zip(self.ups, reversed(features[:-1])):
            y = up(y, skip)
        if self.refine is not None:
            y = F.interpolate(y, size=x.shape[2:], mode="trilinear", align_corners=False)
            y = self.refine(torch.cat([y, x], dim=1))
        return x[:, :1] + self.head(y)


class PatchDiscriminator3D(nn.Module):
    """Small 3D PatchGAN: a map of real/fake logits, one per receptive field."""

    def __init__(self, in_channels: int, base: int = 8, layers: int = 3) -> None:
        super().__init__()
        blocks: list[nn.Module] = [nn.Conv3d(in_channels, base, 4, stride=2, padding=1), nn.LeakyReLU(0.2, inplace=True)]
        width = base
        for _ in range(1, layers):
            blocks += [nn.Conv3d(width, width * 2, 4, stride=2, padding=1, bias=False), nn.InstanceNorm3d(width * 2, affine=True), nn.LeakyReLU(0.2, inplace=True)]
            width *= 2
        blocks.append(nn.Conv3d(width, 1, 3, padding=1))
        self.net = nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
