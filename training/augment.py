"""Cheap training-time augmentations of one crop (numpy, float32 ZYX, intensities normalised as at inference).

They make the networks robust to what other code may feed them: another intensity mapping
(gamma, contrast, offset: applied to input and target alike, the output follows the input),
another noise level (input only), and the interpolation of a coarser axis onto the 0.6 µm grid
(input only: the stack was resampled from a coarser spacing). All draws come from the caller's
generator, so a sample is a pure function of its seed.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class AugmentConfig:
    """Probabilities and ranges of the augmentations (intensities in normalised units, 1 ≈ bright)."""

    p_intensity: float = 0.5
    gamma: tuple[float, float] = (0.7, 1.4)
    contrast: tuple[float, float] = (0.8, 1.25)
    offset: tuple[float, float] = (-0.05, 0.05)
    p_noise: float = 0.3
    noise_sigma: tuple[float, float] = (0.005, 0.04)
    p_resample: float = 0.2
    resample_factor: tuple[float, float] = (1.5, 3.0)
    resample_z_probability: float = 0.6  # coarse axis: Z (like real stacks), else Y or X


def intensity_map(arrays: list[np.ndarray], gamma: float, contrast: float, offset: float) -> list[np.ndarray]:
    """The same monotone map v → contrast · sign(v)|v|^gamma + offset applied to every array."""
    return [(contrast * np.sign(a) * np.abs(a) ** gamma + offset).astype(np.float32) for a in arrays]


def add_noise(array: np.ndarray, sigma: float, rng: np.random.Generator) -> np.ndarray:
    """``array`` plus white Gaussian noise of σ ``sigma`` (normalised units)."""
    return (array + rng.normal(0.0, sigma, size=array.shape)).astype(np.float32)


def coarse_axis_resample(array: np.ndarray, axis: int, factor: float) -> np.ndarray:
    """``array`` sampled ``factor`` times more coarsely along ``axis`` and linearly interpolated back to its shape.

    What an isotropic grid holds after resampling a stack acquired with a ``factor`` × coarser
    spacing along ``axis`` (no anti-aliasing, as a plain interpolation would do).
    """
    n = array.shape[axis]
    coarse_n = max(2, int(round(n / factor)))
    t = torch.from_numpy(np.ascontiguousarray(np.moveaxis(array, axis, -1)))[None]  # (1, A, B, n)
    flat = t.reshape(1, -1, n)
    down = F.interpolate(flat, size=coarse_n, mode="linear", align_corners=True)
    up = F.interpolate(down, size=n, mode="linear", align_corners=True).reshape(t.shape)[0]
    return np.ascontiguousarray(np.moveaxis(up.numpy(), -1, axis))


def augment(inputs: list[np.ndarray], target: np.ndarray, rng: np.random.Generator, cfg: AugmentConfig = AugmentConfig()) -> tuple[list[np.ndarray], np.ndarray]:
    """Augmented (input channels, target): channel 0 is the image; later channels (stage-1 prediction) only get the intensity map."""
    arrays = [*inputs, target]
    if rng.random() < cfg.p_intensity:
        arrays = intensity_map(arrays, float(rng.uniform(*cfg.gamma)), float(rng.uniform(*cfg.contrast)), float(rng.uniform(*cfg.offset)))
    image = arrays[0]
    if rng.random() < cfg.p_resample:
        axis = 0 if rng.random() < cfg.resample_z_probability else int(rng.integers(1, 3))
        image = coarse_axis_resample(image, axis, float(rng.uniform(*cfg.resample_factor)))
    if rng.random() < cfg.p_noise:
        image = add_noise(image, float(rng.uniform(*cfg.noise_sigma)), rng)
    return [image, *arrays[1:-1]], arrays[-1]
