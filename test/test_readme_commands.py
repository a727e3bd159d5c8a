"""The README's install and test commands do what CI (.ci/run) does (issue 27)."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def _requirement_files(command: str) -> list[str]:
    words = shlex.split(command)
    return sorted(words[i + 1] for i, w in enumerate(words) if w == "-r")


def _pytest_run(command: str) -> str:
    [run] = re.findall(r"(?:\S+=\S+ )*python3 -m pytest[^\n&]*", command)
    return run.strip()


def test_the_readme_test_command_runs_what_ci_runs() -> None:
    readme = (REPO / "README.md").read_text()
    block = readme.split("Run the tests as `.ci/run` does", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    ci = (REPO / ".ci" / "run").read_text()
    ci_installs = " ".join(line for line in ci.splitlines() if "pip install" in line and " -r " in line)
    assert _requirement_files(block) == _requirement_files(ci_installs)  # requirements-scale.txt too: no batch test skipped
    assert _pytest_run(block) == _pytest_run(ci)


def test_the_readme_scale_out_recipe_installs_torch_and_the_runtime_requirements() -> None:
    readme = (REPO / "README.md").read_text()
    recipe = next(line for line in readme.splitlines() if "-m venv" in line and "requirements-scale.txt" in line)
    assert "--system-site-packages" not in recipe, recipe  # a fresh machine has no torch to share
    assert "torch==2.13.0" in recipe and "-r requirements.txt" in recipe, recipe
