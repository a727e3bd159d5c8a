"""The JSON reports explain themselves: every key documented (with its unit) in fusemycells/report.schema.json,
real reports validated against it, counts, exit code, version, weights checksum, degradation names."""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from conftest import REPO, blob_volume, write_case
from jsonschema import Draft202012Validator
from report_check import SCHEMA, assert_valid_report, numbers_without_units, report_problems, resolve

import fusemycells
from fusemycells import batch, cli
from fusemycells.config import INPUT_SUBDIR
from fusemycells.report import BATCH_UNITS, RUN_UNITS, SCHEMA_FILE, SCHEMA_VERSION, CaseReport, case_entry
from fusemycells.runtime.ladder import DEGRADATION_LEVELS


def run_inference(root: Path, resources: Path, *extra: str) -> tuple[int, dict[str, Any]]:
    """``cli.main`` in this process (fixture networks, one thread); (exit code, report)."""
    report = root / "report.json"
    args = ["--input", str(root), "--output", str(root / "out"), "--resources", str(resources), "--device", "cpu", "--threads", "1", "--report", str(report), *extra]
    code = cli.main(args)
    return code, json.loads(report.read_text())


def schema_objects(node: Any = SCHEMA, path: str = "#") -> list[tuple[str, dict[str, Any]]]:
    """(pointer, schema) of every key's schema: the values of properties, patternProperties and a schema-valued additionalProperties."""
    found = []
    if isinstance(node, dict):
        for keyword in ("properties", "patternProperties"):
            for name, child in node.get(keyword, {}).items():
                found.append((f"{path}/{keyword}/{name}", child))
        extra = node.get("additionalProperties")
        if isinstance(extra, dict):
            found.append((f"{path}/additionalProperties", extra))
        for key, child in node.items():
            found += schema_objects(child, f"{path}/{key}")
    elif isinstance(node, list):
        for i, child in enumerate(node):
            found += schema_objects(child, f"{path}/{i}")
    return found


def test_the_schema_is_a_valid_json_schema_that_describes_every_key() -> None:
    Draft202012Validator.check_schema(SCHEMA)
    keys = schema_objects()
    assert len(keys) > 100
    undescribed = [pointer for pointer, schema in keys if not str(schema.get("description", "")).strip()]
    assert not undescribed, "keys without a description in fusemycells/report.schema.json:\n" + "\n".join(undescribed)


def test_a_run_with_a_refused_file_reports_counts_exit_code_version_and_weights_checksum(fixture_resources: Path, tmp_path: Path) -> None:
    folder = tmp_path / INPUT_SUBDIR
    write_case(folder, "good.tif", blob_volume((6, 24, 24), seed=6))
    folder.joinpath("bad.tif").write_bytes(b"II*\x00garbage")
    code, report = run_inference(tmp_path, fixture_resources)
    assert code == 1
    assert_valid_report(report)
    assert report["schema_version"] == SCHEMA_VERSION and report["program"] == "inference.py"
    assert report["exit_code"] == 1 and report["error"] is None and report["terminated"] is False
    assert report["fusemycells_version"] == fusemycells.__version__
    assert report["manifest_sha256"] == hashlib.sha256((fixture_resources / "manifest.json").read_bytes()).hexdigest()
    assert report["counts"] == {"inputs": 2, "written": 1, "refused": 1, "unfinished": 0, "skipped": 0}
    assert report["written"] == ["good.tif"] and report["refused"] == ["bad.tif"]
    good = next(f for f in report["files"] if f["file"] == "good.tif")
    assert good["degradation_name"] == DEGRADATION_LEVELS[good["degradation"]]
    assert set(good["weight_map"]) == {"w>0.1", "w>0.5", "w>0.9"}
    assert report["units"]["keys"]["files[].shape"].startswith("voxels")


def test_a_setup_error_report_has_every_key_with_what_was_known(fixture_resources: Path, tmp_path: Path) -> None:
    code, missing_input = run_inference(tmp_path, fixture_resources)
    assert code == 2
    assert_valid_report(missing_input)
    assert missing_input["exit_code"] == 2 and "input folder not found" in missing_input["error"]
    assert missing_input["policy"] is None and missing_input["files"] == [] and missing_input["resources"] is None
    assert missing_input["counts"] == {"inputs": 0, "written": 0, "refused": 0, "unfinished": 0, "skipped": 0}

    write_case(tmp_path / INPUT_SUBDIR, "case.tif", blob_volume((6, 16, 16)))
    no_weights = tmp_path / "no_weights"
    no_weights.mkdir()
    code, no_manifest = run_inference(tmp_path, no_weights)
    assert code == 2
    assert_valid_report(no_manifest)
    assert no_manifest["resources"] == str(no_weights) and no_manifest["manifest_sha256"] is None
    assert no_manifest["counts"]["inputs"] == 1 and no_manifest["counts"]["unfinished"] == 1


def test_a_batch_setup_error_report_validates(tmp_path: Path) -> None:
    report = tmp_path / "report.json"
    assert batch.main([str(tmp_path / "missing"), "--output", str(tmp_path / "out"), "--report", str(report)]) == 2
    data = json.loads(report.read_text())
    assert_valid_report(data)
    assert data["program"] == "fusemycells.batch" and data["exit_code"] == 2 and data["cluster"] is None


@pytest.fixture(scope="module")
def valid_report(fixture_resources: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("valid")
    write_case(root / INPUT_SUBDIR, "case.tif", blob_volume((6, 24, 24), seed=2))
    code, report = run_inference(root, fixture_resources)
    assert code == 0
    return report


def test_an_undocumented_key_is_named_with_the_place_to_document_it(valid_report: dict[str, Any]) -> None:
    assert report_problems(valid_report) == []
    report = copy.deepcopy(valid_report)
    report["files"][0]["seconds"]["queue_wait"] = 0.1  # a new phase timer, not yet in the schema
    report["files"][0]["quality_estimate"] = {"score": 0.7}  # a new per-file block
    report["policy"]["new_limit"] = 3
    problems = report_problems(report)
    assert "$.files[0].seconds: undocumented key 'queue_wait': add it to fusemycells/report.schema.json at #/$defs/seconds/properties with a type and a description" in problems
    assert any(p.startswith("$.files[0]: undocumented key 'quality_estimate'") and "#/$defs/case/properties" in p for p in problems), problems
    assert any(p.startswith("$.policy: undocumented key 'new_limit'") and "#/$defs/run_report/properties/policy/properties" in p for p in problems), problems
    assert len(problems) == 3

    wrong_type = copy.deepcopy(valid_report)
    wrong_type["counts"]["written"] = "one"
    assert any(p.startswith("$.counts.written: 'one' is not of type 'integer'") for p in report_problems(wrong_type))


def test_a_number_without_a_unit_is_named(valid_report: dict[str, Any]) -> None:
    assert numbers_without_units(valid_report) == []
    report = copy.deepcopy(valid_report)
    report["files"][0]["trust"] = {"score": 0.7, "margin_s": 2.0}
    assert numbers_without_units(report) == ["files[].trust.score"]  # margin_s says its unit


def test_every_case_report_field_is_documented_and_every_documented_key_is_written() -> None:
    documented = set(SCHEMA["$defs"]["case"]["properties"])
    written = set(case_entry(CaseReport(file="x.tif")))
    assert written == {f.name for f in dataclasses.fields(CaseReport)} | {"degradation_name"}
    assert documented == written, f"undocumented: {sorted(written - documented)}; documented, never written: {sorted(documented - written)}"


def _schema_at(path: str, root: dict[str, Any]) -> dict[str, Any] | None:
    """The schema of a units path (``files[].adaptive.output_sigma``) below ``root``, or None."""
    node = resolve(root)
    for part in path.split("."):
        items = part.endswith("[]")
        props = {**resolve(node).get("properties", {}), **node.get("properties", {})}
        if part.removesuffix("[]") not in props:
            return None
        node = resolve(props[part.removesuffix("[]")])
        if items:
            node = node["items"]
    return node


@pytest.mark.parametrize("units, program", [(RUN_UNITS, "run_report"), (BATCH_UNITS, "batch_report")])
def test_every_units_entry_names_a_documented_numeric_key(units: dict[str, str], program: str) -> None:
    root = SCHEMA["$defs"][program]
    stale = [path for path in units if _schema_at(path, root) is None]
    assert not stale, f"units entries naming no key of {program}: {stale}"


def test_each_degradation_level_is_reported_with_its_name() -> None:
    for level, name in DEGRADATION_LEVELS.items():
        entry = case_entry(CaseReport(file="x.tif", degradation=level))
        assert entry["degradation"] == level and entry["degradation_name"] == name
        assert list(entry).index("degradation_name") == list(entry).index("degradation") + 1
    assert SCHEMA["$defs"]["case"]["properties"]["degradation"]["maximum"] == max(DEGRADATION_LEVELS)


def test_the_version_is_written_once_and_pyproject_reads_it_from_the_package() -> None:
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert "version" not in project["project"] and "version" in project["project"]["dynamic"]
    assert project["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "fusemycells.__version__"}
    assert "report.schema.json" in project["tool"]["setuptools"]["package-data"]["fusemycells"]
    assert fusemycells.__version__.count(".") >= 1


def test_the_image_gets_the_schema_and_does_not_need_jsonschema(tmp_path: Path) -> None:
    from test_image import assemble, parse_dockerfile

    image = parse_dockerfile((REPO / "Dockerfile").read_text())
    assemble(dataclasses.replace(image, copies=[c for c in image.copies if "resources" not in c[0]]), REPO, tmp_path)
    shipped = tmp_path / image.workdir.lstrip("/") / "fusemycells" / SCHEMA_FILE.name
    assert shipped.read_bytes() == SCHEMA_FILE.read_bytes()
    assert "jsonschema" not in (REPO / "requirements.txt").read_text()
    # the CLI builds and writes its report without jsonschema installed
    code = "import sys; sys.modules['jsonschema'] = None; import fusemycells.cli, fusemycells.report, fusemycells.batch; print('ok')"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=str(REPO))
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]
