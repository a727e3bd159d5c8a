"""Output-σ tuning table (training.tune): the numbers the manifest's output_sigma_knots are read from."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import blob_volume, write_case
from scipy import ndimage

from fusemycells.evaluation.metrics import metric_normalise, n_ssim, ssim
from training.tune import score_sigmas


def test_sigma_table_scores_the_isotropic_um_filter_the_container_applies(tmp_path: Path) -> None:
    clean = blob_volume((10, 40, 36), seed=3)
    noisy = np.clip(clean + np.random.default_rng(1).normal(0, 300, clean.shape), 0, 65535).astype(np.uint16)
    spacing = (2.0, 0.4, 0.4)
    for folder, data in (("in", noisy), ("gt", clean)):
        (tmp_path / folder).mkdir()
        write_case(tmp_path / folder, "image_0_nucleus_angle.tif", data, spacing=spacing)
    cases: list[dict] = []
    table = score_sigmas(tmp_path / "in", tmp_path / "in", tmp_path / "gt", [0.0, 1.0], cases)
    scores = table["nucleus"]
    assert scores[0.0] == [0.0]  # the prediction is the input: identity scores 0
    g = metric_normalise(clean.astype(np.float32))
    s_in = ssim(metric_normalise(noisy.astype(np.float32)), g)
    expected = n_ssim(ssim(metric_normalise(ndimage.gaussian_filter(noisy.astype(np.float32), (0.2, 1.0, 1.0))), g), s_in)
    assert scores[1.0][0] == pytest.approx(expected, abs=1e-9)  # Z σ = 1.0 · 0.4 / 2.0 voxels
    assert scores[1.0][0] > 0  # smoothing a noisy stack helps
    assert cases[0]["relative_noise"] > 0
    voxel = score_sigmas(tmp_path / "in", tmp_path / "in", tmp_path / "gt", [1.0], isotropic_um=False)["nucleus"][1.0][0]
    assert voxel != scores[1.0][0]
