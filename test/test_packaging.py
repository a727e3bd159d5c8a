"""The installable package: pyproject.toml's dependencies against the pinned requirements files, the console
scripts, where the weights are found, and (slow) a wheel built, installed in a fresh virtual environment and
run from outside the repository."""

from __future__ import annotations

import importlib
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import tomllib
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from fusemycells.config import MANIFEST_NAME, bundled_resources

REPO = Path(__file__).resolve().parent.parent
LOCK_FILES = ["requirements.txt", "requirements-dev.txt", "requirements-eval.txt", "requirements-scale.txt", "requirements-napari.txt"]
SAMPLE = REPO / "test" / "input"


def pyproject() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def declared(project: dict) -> list[tuple[str, Requirement]]:
    """(group, requirement) for the runtime dependencies ('' group) and every extra."""
    groups = [("", project.get("dependencies", []))] + sorted(project.get("optional-dependencies", {}).items())
    return [(group, Requirement(line)) for group, lines in groups for line in lines]


def pins(files: list[str] = LOCK_FILES) -> dict[str, list[tuple[str, str]]]:
    """Canonical name -> [(file, pinned version)] of every ``name==version`` line of the lock files."""
    found: dict[str, list[tuple[str, str]]] = {}
    for name in files:
        for line in (REPO / name).read_text().splitlines():
            line = line.split("#", 1)[0].strip()
            if not line or line.startswith("-"):
                continue
            req = Requirement(line)
            versions = [s.version for s in req.specifier if s.operator == "=="]
            assert len(versions) == 1, f"{name}: {line!r} is not pinned with =="
            found.setdefault(canonicalize_name(req.name), []).append((name, versions[0]))
    return found


def drift(project: dict, pinned: dict[str, list[tuple[str, str]]]) -> list[str]:
    """Every way the lock files and the pyproject disagree: a pyproject requirement (that applies on this
    platform) pinned nowhere, or a pin outside the pyproject's range for that package."""
    problems = []
    for group, req in declared(project):
        if req.marker is not None and not req.marker.evaluate({"extra": group}):
            continue  # another platform's or Python's requirement (onnxruntime on macOS)
        where = f"[{group}]" if group else "dependencies"
        name = canonicalize_name(req.name)
        if name not in pinned:
            problems.append(f"{where}: {req} is pinned in none of {LOCK_FILES}")
        for file, version in pinned.get(name, []):
            if not req.specifier.contains(version, prereleases=True):
                problems.append(f"{file}: {req.name}=={version} is outside {where}'s {req}")
    return problems


def test_every_pin_satisfies_the_pyproject_range_and_every_pyproject_dependency_is_pinned() -> None:
    project = pyproject()["project"]
    assert drift(project, pins()) == []
    assert {"eval", "scale", "napari", "dev"} <= set(project["optional-dependencies"])
    runtime = {canonicalize_name(Requirement(r).name) for r in project["dependencies"]}
    image = {name for name, where in pins(["requirements.txt"]).items()}
    assert image - {"openvino-telemetry"} <= runtime, "a package of the image's lock that pyproject does not declare"


def test_drift_is_caught_both_ways() -> None:
    """The check itself: a pin outside the range, and a declared dependency pinned nowhere, are reported."""
    project = {"dependencies": ["numpy>=2.4,<3", "tqdm>=4"], "optional-dependencies": {"eval": ["matplotlib>=3.11"]}}
    pinned = {"numpy": [("requirements.txt", "3.0.1")], "matplotlib": [("requirements-eval.txt", "3.11.2")]}
    problems = drift(project, pinned)
    assert any("numpy==3.0.1 is outside" in p for p in problems), problems
    assert any("tqdm>=4 is pinned in none" in p for p in problems), problems
    assert len(problems) == 2, problems


def test_console_scripts_and_the_napari_manifest_point_at_what_exists() -> None:
    project = pyproject()["project"]
    assert project["scripts"] == {
        "fusemycells": "fusemycells.cli:run",
        "fusemycells-batch": "fusemycells.batch:main",
        "fusemycells-evaluate": "fusemycells.evaluate:main",
    }
    for target in project["scripts"].values():
        module, name = target.split(":")
        assert callable(getattr(importlib.import_module(module), name)), target
    package, resource = project["entry-points"]["napari.manifest"]["fusemycells"].split(":")
    assert (REPO / package.replace(".", "/") / resource).is_file()


def test_the_weights_come_from_the_wheels_package_data_when_it_has_them_else_from_the_checkout(tmp_path: Path) -> None:
    packaged, checkout = tmp_path / "fusemycells" / "resources", tmp_path / "resources"
    assert bundled_resources(packaged, checkout) == checkout  # a checkout, or the image (no package data)
    packaged.mkdir(parents=True)
    assert bundled_resources(packaged, checkout) == checkout  # an empty folder is not weights
    (packaged / MANIFEST_NAME).write_text("{}")
    assert bundled_resources(packaged, checkout) == packaged  # an installed wheel


def build_wheel(out: Path, work: Path) -> Path:
    """The wheel of a copy of the sources the wheel takes (no build folder or egg-info in the checkout),
    built without isolation (the installed setuptools; no download)."""
    src = work / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, src / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in ("fusemycells", "resources"):
        shutil.copytree(REPO / name, src / name, ignore=ignore)
    cmd = [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(out), str(src)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (wheel,) = out.glob("fusemycells-*.whl")
    return wheel


@pytest.mark.slow
def test_a_built_wheel_installs_commands_that_fuse_the_sample_from_outside_the_repository(tmp_path: Path) -> None:
    """pip wheel → a fresh venv (system site-packages: torch and the rest come from the machine, nothing is
    downloaded) → ``fusemycells --help``, ``fusemycells-evaluate --help``, ``fusemycells-batch --help`` and a real
    ``fusemycells`` run on the bundled sample in a folder outside the repository, with the wheel's own weights:
    outputs written, equal to the checkout's ``inference.py`` outputs."""
    wheel = build_wheel(tmp_path / "dist", tmp_path)
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
    manifest = json.loads((REPO / "resources" / MANIFEST_NAME).read_text())
    files = {f["path"] for ch in manifest["channels"].values() for st in ("global_stage", "patch_stage") for f in ch[st]["files"].values()}
    assert {f"fusemycells/resources/{n}" for n in files | {MANIFEST_NAME}} <= names
    assert {"fusemycells/napari/napari.yaml", "fusemycells/report.schema.json", "fusemycells/io/tiff.py"} <= names

    venv = tmp_path / "venv"
    # without pip: the machine's pip (a system site-package) installs into the venv; a venv's own old
    # setuptools would hide the machine's, which torch's metadata requires (>= 77)
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(venv)], check=True, timeout=120)
    python, bin_dir = venv / "bin" / "python", venv / "bin"
    proc = subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-index", str(wheel)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    for script in ("fusemycells", "fusemycells-evaluate", "fusemycells-batch"):
        proc = subprocess.run([str(bin_dir / script), "--help"], capture_output=True, text=True, timeout=120, cwd=elsewhere, env=env)
        assert proc.returncode == 0 and "usage:" in proc.stdout, (script, proc.stderr[-2000:])

    shutil.copytree(SAMPLE, elsewhere / "in")
    cmd = [str(bin_dir / "fusemycells"), "--input", "in", "--output", "out", "--device", "cpu", "--report", "report.json"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=elsewhere, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((elsewhere / "report.json").read_text())
    installed = venv / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}" / "site-packages" / "fusemycells"
    assert Path(report["resources"]) == installed / "resources"  # the wheel's weights, not the checkout's
    check = "from fusemycells.config import *; print(verify_files(load_manifest(DEFAULT_RESOURCES), require_all=True))"
    proc = subprocess.run([str(python), "-c", check], capture_output=True, text=True, timeout=120, cwd=elsewhere, env=env)
    assert proc.stdout.strip() == "[]", proc.stdout + proc.stderr[-2000:]  # every weights file there, sha256 verified

    # napari lists the plugin (from the wheel's entry point) where napari is installed (CI: requirements-napari.txt)
    probe = (
        "import importlib.util, sys\n"
        "if importlib.util.find_spec('npe2') is None: sys.exit(3)\n"
        "import npe2\n"
        "pm = npe2.PluginManager.instance(); pm.discover()\n"
        "print([w.display_name for w in pm.get_manifest('fusemycells').contributions.widgets])"
    )
    proc = subprocess.run([str(python), "-c", probe], capture_output=True, text=True, timeout=300, cwd=elsewhere, env=env)
    assert proc.returncode == 3 or proc.stdout.strip() == "['Fuse view']", proc.stdout + proc.stderr[-2000:]

    reference = tmp_path / "reference"
    cmd = [sys.executable, "inference.py", "--input", str(SAMPLE), "--output", str(reference), "--device", "cpu"]
    assert subprocess.run(cmd, capture_output=True, timeout=600, cwd=REPO).returncode == 0
    from fusemycells.config import OUTPUT_SUBDIR
    from fusemycells.io.tiff import read_volume

    expected = sorted(p.name for p in (SAMPLE / "images" / "fluorescence-lightsheet-3D-microscopy").glob("*.tif"))
    written = sorted(p.name for p in (elsewhere / "out" / OUTPUT_SUBDIR).iterdir())
    assert written == expected and [f["status"] for f in report["files"]] == ["ok"] * len(expected)
    for name in expected:
        ours = read_volume(elsewhere / "out" / OUTPUT_SUBDIR / name).data
        np.testing.assert_array_equal(ours, read_volume(reference / OUTPUT_SUBDIR / name).data)
