"""The manifest's defaults (one source for config.py and training/export.py) and its recorded provenance."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

from fusemycells.config import DEFAULT_POSTPROCESS, PATCH_STAGE_DEFAULTS, PostprocessSpec, StageSpec, _postprocess
from training import export

REPO = Path(__file__).resolve().parent.parent


def test_export_writes_the_defaults_the_inference_side_parses():
    assert export.DEFAULT_POSTPROCESS is DEFAULT_POSTPROCESS and export.PATCH_STAGE_DEFAULTS is PATCH_STAGE_DEFAULTS
    assert _postprocess(json.loads(json.dumps(DEFAULT_POSTPROCESS))) == PostprocessSpec()
    stage = StageSpec(in_channels=2, files={})
    assert (stage.overlap, stage.batch_size) == (PATCH_STAGE_DEFAULTS["overlap"], PATCH_STAGE_DEFAULTS["batch_size"])


def test_training_commands_are_recorded_without_machine_paths():
    legacy = {"command": "/work/main/training/train.py --data work_dirs/data2/train --channel nucleus", "config": {}}
    record = export.training_record(legacy, {"config": {}})
    assert not any(token.startswith("/") for token in shlex.split(record["command"]))
    assert "training.train" in record["command"] and "--channel nucleus" in record["command"]


def test_a_patch_stage_finished_by_another_invocation_records_that_command_too():
    first = {"command": "python -m training.train --channel nucleus --out CKPT", "config": {}}
    resumed = {"command": "python -m training.train --channel nucleus --out CKPT --steps-patch 3200 --resume", "config": {}}
    record = export.training_record(first, resumed)
    assert record["command"] == first["command"] and record["patch_command"] == resumed["command"]
    assert "patch_command" not in export.training_record(first, {**first})


def test_the_shipped_manifest_names_no_absolute_path_in_its_provenance():
    manifest = json.loads((REPO / "resources" / "manifest.json").read_text())
    for name, channel in manifest["channels"].items():
        for key in ("command", "patch_command"):
            command = channel["training"].get(key, "")
            assert not any(token.startswith("/") for token in shlex.split(command)), (name, command)
