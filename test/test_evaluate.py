"""``python -m fusemycells.evaluate``: file matching, scores, JSON, QC picture, exit codes."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys

import numpy as np
import pytest
from conftest import REPO, blob_volume, write_case
from scipy import ndimage

from fusemycells import evaluate


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


def test_evaluate_scores_perfect_and_identity_predictions(folders, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="fusemycells.evaluate")
    out_json = tmp_path / "scores.json"
    rc = evaluate.main(["--input", str(folders["input"]), "--pred", str(folders["pred"]), "--gt", str(folders["gt"]), "--json", str(out_json)])
    assert rc == 0
    report = json.loads(out_json.read_text())
    by_name = {c["name"]: c for c in report["cases"]}
    assert by_name["image_1_nucleus_angle.tif"]["n_ssim"] == pytest.approx(1.0)
    assert by_name["image_2_membrane_angle.tif"]["n_ssim"] == pytest.approx(0.0, abs=1e-12)
    assert by_name["image_2_membrane_angle.tif"]["channel"] == "membrane"
    assert report["summary"]["nucleus"]["cases"] == 1 and report["problems"] == []
    line = next(r.getMessage() for r in caplog.records if "image_1_nucleus_angle.tif" in r.getMessage())
    assert "N-SSIM +1.0000 (Gaussian baseline" in line and "SSIM(input,GT) 0." in line and "SSIM(pred,GT) 1.0000" in line


def test_evaluate_writes_the_qc_figure_of_every_scored_case(folders, tmp_path):
    pytest.importorskip("matplotlib", reason="the QC figure is optional: pip install -r requirements-eval.txt (CI does)")
    from matplotlib.image import imread

    out_png = tmp_path / "qc.png"
    rc = evaluate.main(["--input", str(folders["input"]), "--pred", str(folders["pred"]), "--gt", str(folders["gt"]), "--png", str(out_png), "--diff"])
    assert rc == 0
    # two cases of 16×40×36 voxels at 1.0/0.39/0.39 µm (16 × 15.6 × 14.04 µm): XY 300·15.6/14.04 = 333 px,
    # XZ 300·16/14.04 = 342 px high, + 64 + 12 + 24 px per case; 4 columns + 2 colour bars + labels wide
    assert imread(out_png).shape[:2] == (2 * 775, 1440)


def _figure_texts(monkeypatch) -> list[str]:
    """Collects the texts of the QC figure that evaluate draws (matplotlib artists), and still writes it."""
    from matplotlib.text import Text

    from fusemycells.evaluation import qc

    texts: list[str] = []

    def write(path, cases, diff=False):
        fig, size = qc.draw_figure(cases, diff)
        texts.extend(t.get_text() for t in fig.findobj(Text))
        return qc.write_figure(path, cases, diff)

    monkeypatch.setattr(evaluate, "write_figure", write)
    return texts


def test_the_qc_figure_says_the_networks_were_off_as_the_run_report_says(folders, tmp_path, monkeypatch):
    pytest.importorskip("matplotlib", reason="the QC figure is optional: pip install -r requirements-eval.txt (CI does)")
    texts = _figure_texts(monkeypatch)
    off = {"file": "image_1_nucleus_angle.tif", "status": "ok", "trust": {"mode": "case", "factor": 0.0, "why": None}}
    report = tmp_path / "run" / "report.json"
    report.parent.mkdir()
    report.write_text(json.dumps({"files": [off]}))
    args = ["--input", str(folders["input"]), "--pred", str(folders["pred"]), "--gt", str(folders["gt"])]
    assert evaluate.main([*args, "--png", str(tmp_path / "qc.png"), "--report", str(report)]) == 0
    assert "networks off: trust factor 0.00" in texts  # image_1's entry
    assert any(t.startswith("networks: not known") and "not in the run report" in t for t in texts)  # image_2
    texts.clear()
    assert evaluate.main([*args, "--png", str(tmp_path / "qc2.png")]) == 0  # no report given, none beside --pred
    assert texts.count(qc_no_report()) == 2
    (folders["pred"] / "report.json").write_text(json.dumps({"files": [off]}))  # found beside the predictions
    texts.clear()
    assert evaluate.main([*args, "--png", str(tmp_path / "qc3.png")]) == 0
    assert "networks off: trust factor 0.00" in texts


def qc_no_report() -> str:
    from fusemycells.evaluation import qc

    return qc.NO_REPORT


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


@pytest.mark.parametrize("module", ["fusemycells.evaluate", "fusemycells.batch"])
def test_help_names_the_console_script_it_was_started_as(module, tmp_path):
    # what pip's console-script wrapper does: sys.argv[0] is the script's path, main() is called
    script = tmp_path / module.replace("fusemycells.", "fusemycells-")
    entry = "main" if module.endswith("evaluate") else "parse_args"
    script.write_text(f"import sys\nfrom {module} import {entry}\nsys.exit({entry}())\n")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, str(script), "--help"], capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0 and proc.stdout.startswith(f"usage: {script.name} "), proc.stdout[:200]
    by_module = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert by_module.stdout.startswith(f"usage: python -m {module} ")


def test_help_names_the_module_command():
    proc = subprocess.run([sys.executable, "-m", "fusemycells.evaluate", "--help"], capture_output=True, text=True, timeout=60, cwd=REPO)
    assert proc.returncode == 0 and proc.stdout.startswith("usage: python -m fusemycells.evaluate ")
    assert "SSIM(input, GT)" in proc.stdout and "requirements-eval.txt" in proc.stdout


def test_figure_without_matplotlib_is_a_setup_error_naming_the_install_command(folders, tmp_path):
    # a Python where `import matplotlib` fails, as on a machine with only requirements.txt
    code = "import sys; sys.modules['matplotlib'] = None; from fusemycells import evaluate; sys.exit(evaluate.main(sys.argv[1:]))"
    args = ["--input", str(folders["input"]), "--pred", str(folders["pred"]), "--gt", str(folders["gt"]), "--png", str(tmp_path / "qc.png")]
    proc = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=60, cwd=REPO)
    assert proc.returncode == 2 and "pip install -r requirements-eval.txt" in proc.stderr
    assert "N-SSIM" not in proc.stderr and not (tmp_path / "qc.png").exists()  # refused before scoring


def test_diff_without_png_is_refused(folders):
    assert evaluate.main(["--input", str(folders["input"]), "--pred", str(folders["pred"]), "--gt", str(folders["gt"]), "--diff"]) == 2
