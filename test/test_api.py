"""The three-line Python API (issue 28, item 4): ``from fusemycells import Fuser; Fuser.from_resources(); fuse``."""

from __future__ import annotations

import dataclasses
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
from conftest import blob_volume

from fusemycells.config import load_manifest
from fusemycells.pipeline import Fuser
from fusemycells.runtime.budget import BudgetPolicy

REPO = Path(__file__).resolve().parents[1]
SPACING = (1.0, 0.39, 0.39)


def readme_api_example() -> str:
    """The README's Python block that uses ``Fuser.from_resources`` (verbatim)."""
    blocks = re.findall(r"```python\n(.*?)```", (REPO / "README.md").read_text(), re.S)
    [example] = [b for b in blocks if "Fuser.from_resources" in b]
    return example


def test_the_readme_example_is_three_lines_and_fuses_an_array_with_the_shipped_weights() -> None:
    example = readme_api_example()
    assert len(example.strip().splitlines()) == 3, example
    data = blob_volume((8, 32, 28))
    names: dict[str, object] = {"array": data.copy(), "spacing_zyx": SPACING}
    exec(compile(example, "README.md", "exec"), names)  # noqa: S102 - the README's own example, verbatim
    out = names["out"].to_array()  # type: ignore[attr-defined]
    assert out.shape == data.shape and out.dtype == np.uint16
    np.testing.assert_array_equal(names["array"], data)  # the caller's array is left as it was
    manifest = load_manifest(REPO / "resources")
    explicit = Fuser(manifest, BudgetPolicy.create("auto", None, None, None)).fuse(data.copy(), SPACING, "nucleus")
    np.testing.assert_array_equal(out, explicit.to_array())  # the container's defaults: the same output


def test_from_resources_gives_each_fuse_call_the_manifests_time_budget(fixture_resources: Path) -> None:
    fuser = Fuser.from_resources(fixture_resources, device="cpu")
    assert fuser.time_budget_s == load_manifest(fixture_resources).time_budget_s
    assert fuser.fuse(blob_volume((6, 24, 24)), SPACING, "nucleus").report.degradation == 0
    hurried = Fuser.from_resources(fixture_resources, device="cpu", time_budget_s=1e-6)
    assert hurried.fuse(blob_volume((6, 24, 24)), SPACING, "nucleus").report.degradation > 0
    unbounded = Fuser.from_resources(fixture_resources, device="cpu", time_budget_s=None)
    assert unbounded.time_budget_s is None


def test_from_resources_uses_the_folder_device_and_precision_it_is_given(fixture_resources: Path) -> None:
    fuser = Fuser.from_resources(str(fixture_resources), device="cpu", precision="fp32")
    assert fuser.manifest == load_manifest(fixture_resources)
    assert fuser.policy.device == "cpu" and fuser.policy.cpu_precision == "fp32"


def test_import_fusemycells_does_not_import_torch_until_fuser_is_asked_for() -> None:
    code = (
        "import sys, fusemycells; before = 'torch' in sys.modules; "
        "from fusemycells import Fuser; print(before, 'torch' in sys.modules, Fuser.__module__)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["False", "True", "fusemycells.pipeline"]


def test_from_resources_leaves_the_callers_array_as_it_was_even_where_the_blend_reuses_its_buffer(
    fixture_resources: Path,
) -> None:
    data = blob_volume((8, 32, 28))
    changed = {}
    for keep in (True, False):
        fuser = Fuser.from_resources(fixture_resources, device="cpu", keep_input=keep)
        fuser.policy = dataclasses.replace(fuser.policy, compact_voxels=0)  # the big-stack blend: in place, float16
        array = data.copy()
        fuser.fuse(array, SPACING, "nucleus").to_array()
        changed[keep] = not np.array_equal(array, data)
    assert changed == {True: False, False: True}  # without keep_input the blend overwrites the array (the pipeline's)
