"""Shared fixtures: small synthetic volumes and fixture networks (never shipped, never trained)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from fusemycells.io.tiff import Volume, write_volume  # noqa: E402
from training.export import write_networks  # noqa: E402


class SmoothingNet(torch.nn.Module):
    """Fixture network: channel 0 plus a fixed small 3×3×3 conv of all channels (deterministic)."""

    def __init__(self, in_channels: int) -> None:
        super().__init__()
        self.conv = torch.nn.Conv3d(in_channels, 1, 3, padding=1)
        generator = torch.Generator().manual_seed(in_channels)
        with torch.no_grad():
            self.conv.weight.copy_(torch.rand(self.conv.weight.shape, generator=generator) * 0.02)
            self.conv.bias.fill_(0.01)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, :1] + self.conv(x)


def export_fixture_stage(model: torch.nn.Module, in_channels: int, out_dir: Path, stem: str) -> dict[str, dict[str, str]]:
    """TorchScript + ONNX files of a fixture network, exported as the trained ones are; returns the manifest 'files' entry."""
    return write_networks(model.eval(), torch.rand(1, in_channels, 16, 16, 16), out_dir, stem)


class PositionNet(torch.nn.Module):
    """Fixture patch network whose output depends on where a voxel sits inside its patch (so the
    stitching weights matter): the mean of its two input channels plus ``strength`` × a bump that is
    the product of each axis's relative position (0, 1] within the patch, largest at the far corner."""

    def __init__(self, strength: float = 0.3) -> None:
        super().__init__()
        self.strength = strength

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ones = torch.ones_like(x[:, :1])
        bump = ones
        for dim in (2, 3, 4):  # cumsum / sum: shape-generic, so the traced and exported graphs keep it
            bump = bump * (torch.cumsum(ones, dim) / ones.sum(dim, keepdim=True))
        return 0.5 * (x[:, :1] + x[:, 1:2]) + self.strength * bump


class IdentityNet(torch.nn.Module):
    """Fixture network that returns its first input channel unchanged (the 'nothing to fix' model)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, :1]


def fixture_manifest(
    resources: Path,
    grid: int = 24,
    patch: int = 16,
    patch_net: torch.nn.Module | None = None,
    global_net: torch.nn.Module | None = None,
) -> dict:
    """Write fixture networks and a manifest for both channels into ``resources``; returns the dict.

    ``patch_net`` and ``global_net`` replace the stage-2 and stage-1 networks (default ``SmoothingNet(2)``
    and ``SmoothingNet(1)``).
    """
    resources.mkdir(parents=True, exist_ok=True)
    stage1 = export_fixture_stage(global_net if global_net is not None else SmoothingNet(1), 1, resources, "fixture_stage1")
    stage2_net = patch_net if patch_net is not None else SmoothingNet(2)
    stage2 = export_fixture_stage(stage2_net, 2, resources, "fixture_stage2")
    channel = {
        "target_spacing_um": 0.6,
        "normalisation": {"kind": "percentile", "low": 1.0, "high": 99.8},
        "global_stage": {"in_channels": 1, "grid": [grid, grid, grid], "files": stage1},
        "patch_stage": {"in_channels": 2, "patch_size": [patch, patch, patch], "overlap": 0.5, "batch_size": 2, "files": stage2},
        "postprocess": {"diff_grid": [16, 16, 16], "weight_max_filter": 3, "weight_sigma": 1.0},
    }
    manifest = {"format_version": 2, "provenance": {"note": "test fixture"}, "channels": {"nucleus": channel, "membrane": channel}}
    (resources / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return manifest


@pytest.fixture(scope="session")
def fixture_resources(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A resources folder with fixture networks (read-only use; copy it to tamper)."""
    resources = tmp_path_factory.mktemp("resources")
    fixture_manifest(resources)
    return resources


@pytest.fixture(scope="session")
def identity_resources(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Like ``fixture_resources`` but the patch stage is :class:`IdentityNet` (read-only use)."""
    resources = tmp_path_factory.mktemp("identity_resources")
    fixture_manifest(resources, patch_net=IdentityNet())
    return resources


def blob_volume(shape: tuple[int, int, int] = (12, 40, 36), seed: int = 0) -> np.ndarray:
    """uint16 ZYX test stack: a few bright Gaussian blobs on a noisy background."""
    rng = np.random.default_rng(seed)
    zz, yy, xx = np.meshgrid(*[np.arange(n, dtype=np.float32) for n in shape], indexing="ij")
    vol = np.full(shape, 100.0, dtype=np.float32)
    for _ in range(6):
        c = [rng.uniform(0, n) for n in shape]
        vol += 2000 * np.exp(-(((zz - c[0]) / 2) ** 2 + ((yy - c[1]) / 4) ** 2 + ((xx - c[2]) / 4) ** 2))
    vol += rng.normal(0, 20, shape)
    return np.clip(vol, 0, 65535).astype(np.uint16)


def write_case(
    folder: Path, name: str, data: np.ndarray, spacing=(1.0, 0.39, 0.39), channel: str = "nucleus", meta: dict | None = None
) -> Path:
    """Write a challenge-style TIFF; returns its path."""
    path = folder / name
    write_volume(path, data, Volume(data=data, spacing=spacing, channel=channel, metadata=dict(meta or {})))
    return path
