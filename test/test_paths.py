"""Setup errors of ``inference.py`` say what is wrong with ``--input`` / ``--output`` and the fix."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, blob_volume, write_case

from fusemycells import cli
from fusemycells.config import INPUT_SUBDIR
from fusemycells.io.paths import input_root_problem


@pytest.fixture()
def root(tmp_path: Path) -> Path:
    """A valid input root: tmp/in/images/fluorescence-lightsheet-3D-microscopy/case.tif."""
    folder = tmp_path / "in" / INPUT_SUBDIR
    folder.mkdir(parents=True)
    write_case(folder, "case.tif", blob_volume((4, 16, 16)))
    return tmp_path / "in"


def test_a_valid_root_has_no_problem(root: Path):
    assert input_root_problem(root) is None


def test_the_image_folder_itself_names_the_root_to_pass(root: Path):
    message = input_root_problem(root / INPUT_SUBDIR)
    assert "is the image folder itself" in message
    assert f"pass the root that contains {INPUT_SUBDIR.as_posix()}/, e.g. --input {root}" in message
    assert f"e.g. --input {root}" in input_root_problem(root / "images")


def test_a_relative_image_folder_suggests_the_relative_root(root: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.chdir(root.parent)
    assert input_root_problem(Path("in") / INPUT_SUBDIR).endswith("e.g. --input in")


def test_a_typo_does_not_exist_and_suggests_the_close_name(root: Path):
    message = input_root_problem(root.parent / "inn")
    assert "does not exist" in message and f"did you mean {root}?" in message and "exists but" not in message


def test_a_folder_without_the_layout_exists_but_has_no_images_inside(root: Path):
    message = input_root_problem(root.parent)
    assert f"exists but has no {INPUT_SUBDIR.as_posix()}/ inside" in message and "does not exist" not in message


def test_tiffs_directly_in_the_root_say_where_they_belong(tmp_path: Path):
    write_case(tmp_path, "case.tif", blob_volume((4, 16, 16)))
    assert f"move them to {tmp_path / INPUT_SUBDIR}/" in input_root_problem(tmp_path)


def test_a_file_and_an_empty_image_folder_are_told_apart(root: Path):
    assert "is a file, not a folder" in input_root_problem(root / INPUT_SUBDIR / "case.tif")
    (root / INPUT_SUBDIR / "case.tif").unlink()
    assert input_root_problem(root).startswith("no .tif/.tiff files in")


def test_cli_exits_2_with_the_fix_when_given_the_image_folder(root: Path, tmp_path: Path, fixture_resources: Path):
    report = tmp_path / "report.json"
    code = cli.main(["--input", str(root / INPUT_SUBDIR), "--output", str(tmp_path / "out"), "--resources", str(fixture_resources), "--report", str(report)])
    assert code == 2 and not (tmp_path / "out").exists()
    assert f"e.g. --input {root}" in json.loads(report.read_text())["error"]


def test_unwritable_output_is_reported_before_torch_and_the_weights_load(root: Path, tmp_path: Path, fixture_resources: Path):
    blocker = tmp_path / "a_file"
    blocker.write_text("an output root that is a file cannot hold folders")
    code = (
        "import sys; from fusemycells import cli; rc = cli.main(sys.argv[1:]); "
        "print('torch imported' if 'torch' in sys.modules else 'torch not imported'); sys.exit(rc)"
    )
    args = ["--input", str(root), "--output", str(blocker), "--resources", str(fixture_resources), "--device", "cpu"]
    proc = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert proc.returncode == 2 and "output folder not writable" in proc.stderr
    assert proc.stdout.strip() == "torch not imported"
