"""``python -m fusemycells.evaluate``: file matching, scores, JSON, QC picture, exit codes."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import blob_volume, write_case
from scipy import ndimage

from fusemycells import evaluate
from fusemycells.qc import read_png


@pytest.fixture()
def folders(tmp_path):
    gt = blob_volume((16, 40, 36), seed=3)
    inp = ndimage.gaussian_filter(gt.astype(np.float32), (2.0, 1.5, 1.5)).astype(np.uint16)
    dirs = {k: tmp_path / k for k in ("input", "pred", "gt")}
    for d in dirs.values():
        d.mkdir()
    write_case(dirs["input"], "image_1_nucleus_angle.tif", inp)
    write_case(dirs["gt"], "image_1_nucleus_fused.tif", gt)
    write_case(dirs["input"], "image_2_membrane_angle.tif", inp, channel="membrane")
    write_case(dirs["gt"], "image_2_membrane_fused.tif", gt, channel="membrane")
    write_case(dirs["pred"], "image_1_nucleus_angle.tif", gt)  # perfect prediction
    write_case(dirs["pred"], "image_2_membrane_angle.tif", inp, channel="membrane")  # identity
    return dirs


def test_evaluate_scores_perfect_and_identity_predictions(folders, tmp_path):
    out_json, out_png = tmp_path / "scores.json", tmp_path / "qc.png"
    rc = evaluate.main(["--input", str(folders["input"]), "--pred", str(folders["pred"]), "--gt", str(folders["gt"]),
                        "--json", str(out_json), "--png", str(out_png)])
    assert rc == 0
    report = json.loads(out_json.read_text())
    by_name = {c["name"]: c for c in report["cases"]}
    assert by_name["image_1_nucleus_angle.tif"]["n_ssim"] == pytest.approx(1.0)
    assert by_name["image_2_membrane_angle.tif"]["n_ssim"] == pytest.approx(0.0, abs=1e-12)
    assert by_name["image_2_membrane_angle.tif"]["channel"] == "membrane"
    assert report["summary"]["nucleus"]["cases"] == 1 and report["problems"] == []
    image = read_png(out_png)
    assert image.shape[0] > 2 * 40 and image.max() == 255  # two cases × (XY, XZ) rows


def test_evaluate_reports_a_missing_prediction_and_exits_1(folders, tmp_path, capsys):
    (folders["pred"] / "image_2_membrane_angle.tif").unlink()
    out_json = tmp_path / "scores.json"
    rc = evaluate.main(["--input", str(folders["input"]), "--pred", str(folders["pred"]), "--gt", str(folders["gt"]), "--json", str(out_json)])
    assert rc == 1
    report = json.loads(out_json.read_text())
    assert [c["name"] for c in report["cases"]] == ["image_1_nucleus_angle.tif"]
    assert "image_2_membrane_angle.tif: no prediction found" in report["problems"]


def test_evaluate_skips_ground_truth_files_sharing_the_input_folder(folders):
    for path in folders["gt"].iterdir():
        (folders["input"] / path.name).write_bytes(path.read_bytes())
    scores, problems = evaluate.evaluate(folders["input"], folders["pred"], folders["input"])
    assert sorted(s.name for s in scores) == ["image_1_nucleus_angle.tif", "image_2_membrane_angle.tif"] and problems == []


def test_evaluate_with_nothing_to_score_exits_2(tmp_path):
    for d in ("i", "p", "g"):
        (tmp_path / d).mkdir()
    assert evaluate.main(["--input", str(tmp_path / "i"), "--pred", str(tmp_path / "p"), "--gt", str(tmp_path / "g")]) == 2
    assert evaluate.main(["--input", str(tmp_path / "nope"), "--pred", str(tmp_path / "p"), "--gt", str(tmp_path / "g")]) == 2
