"""Exit codes of inference.py: 2 for every setup failure (1 is reserved for "a file was refused")."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import blob_volume, write_case

from fusemycells import cli
from fusemycells.config import INPUT_SUBDIR

REPO = Path(__file__).resolve().parent.parent


def _run(root: Path, resources: Path) -> tuple[subprocess.CompletedProcess[str], dict]:
    report = root / "report.json"
    cmd = [sys.executable, str(REPO / "inference.py"), "--input", str(root), "--output", str(root / "out"), "--resources", str(resources), "--device", "cpu", "--report", str(report)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=str(REPO))
    return proc, json.loads(report.read_text()) if report.is_file() else {}


@pytest.mark.parametrize("manifest", ["[]", '{"format_version": 1, "channels": []}', '{"format_version": 1, "channels": {"nucleus": "weights.pt"}}'])
def test_a_manifest_of_the_wrong_shape_is_a_setup_error_with_exit_2(tmp_path: Path, manifest: str) -> None:
    folder = tmp_path / INPUT_SUBDIR
    folder.mkdir(parents=True)
    write_case(folder, "case.tif", blob_volume((4, 16, 16)))
    resources = tmp_path / "res"
    resources.mkdir()
    (resources / "manifest.json").write_text(manifest)
    proc, report = _run(tmp_path, resources)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "manifest" in report["error"] and "Traceback" not in proc.stderr  # an expected error: one clear line


def test_an_unexpected_setup_failure_exits_2_with_its_traceback_logged(fixture_resources: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog) -> None:
    folder = tmp_path / INPUT_SUBDIR
    folder.mkdir(parents=True)
    write_case(folder, "case.tif", blob_volume((4, 16, 16)))

    def broken(_resources: Path) -> None:
        raise KeyError("some bug")

    monkeypatch.setattr(cli, "load_manifest", broken)  # the CLI has no injection point: its own name
    with caplog.at_level("INFO", logger="fusemycells"):
        code = cli.main(["--input", str(tmp_path), "--output", str(tmp_path / "out"), "--resources", str(fixture_resources), "--report", str(tmp_path / "r.json")])
    assert code == 2
    assert "KeyError" in json.loads((tmp_path / "r.json").read_text())["error"]
    assert any(r.levelname == "ERROR" and r.exc_info is not None and r.exc_info[0] is KeyError for r in caplog.records)
