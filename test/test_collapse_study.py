"""benchmarks/collapse_study.py's figures of what the networks' correction does."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import collapse_study as cst  # noqa: E402


def test_mechanism_sees_blobs_added_to_the_background_as_a_move_away_from_the_truth() -> None:
    gt = np.zeros((8, 16, 16), dtype=np.float32)
    gt[3:5, 6:10, 6:10] = 1.0  # one bright nucleus
    off = gt * 0.8  # networks off: dimmer than the truth
    toward = off + 0.5 * (gt - off)  # halfway to the truth
    blobs = off - 0.1 * gt  # dims the nucleus ...
    blobs[0:2, 0:4, 0:4] = 0.3  # ... and invents structure in the empty background
    good, bad = cst.mechanism(off, toward, gt, 0, True), cst.mechanism(off, blobs, gt, 0, True)
    assert good["toward"] > 0.99 and bad["toward"] < 0.0
    assert bad["bg_shift"] > 0.0 and abs(good["bg_shift"]) < 1e-6
    assert good["fg_shift"] > 0.05
    assert bad["near_far"] > 1.0  # the blobs sit in the half where the light enters (low Z)
    assert bad["sharp_Y_full"] > bad["sharp_Y_off"]


def test_flatten_keeps_numeric_parameters_under_dotted_names() -> None:
    flat = cst.flatten({"kind": "sheet", "optics": {"axis": 2, "from_low": True, "sigma0_um": [1.5, 0.2, 0.2]}, "fusion": {"shift_um": [0.3, 0.4, 0.0]}})
    assert flat == {"optics.axis": 2.0, "optics.from_low": 1.0, "optics.sigma0_um": 1.5, "fusion.shift_um": 0.5}
