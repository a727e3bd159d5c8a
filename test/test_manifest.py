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


def test_training_commands_are_recorded_relative_to_the_repository(tmp_path: Path):
    other_checkout = "/work/main/training/train.py --data work_dirs/data2/train --channel nucleus --out /elsewhere/ckpt"
    assert export.relative_command(other_checkout, REPO) == "training/train.py --data work_dirs/data2/train --channel nucleus --out /elsewhere/ckpt"
    assert export.relative_command(f"{REPO}/training/train.py --data {REPO}/work_dirs/d", REPO) == "training/train.py --data work_dirs/d"
    assert export.relative_command(None, REPO) is None


def test_the_shipped_manifest_names_no_absolute_path_in_its_provenance():
    manifest = json.loads((REPO / "resources" / "manifest.json").read_text())
    for name, channel in manifest["channels"].items():
        command = channel["training"]["command"]
        assert command.startswith("training/train.py "), (name, command)
        assert not any(token.startswith("/") for token in shlex.split(command)), (name, command)
