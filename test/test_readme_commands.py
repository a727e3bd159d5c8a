"""The README's commands run or parse, its test command is what CI (.ci/run) runs (issue 27), and its flag table
is `inference.py --help`'s, one line per flag (issue 26)."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from fusemycells import cli

REPO = Path(__file__).resolve().parent.parent
README = REPO / "README.md"
SHELL_STARTS = ("python3 ", "python ", "./", "bash ", "test/run_docker.sh")


def _requirement_files(command: str) -> list[str]:
    words = shlex.split(command)
    return sorted(words[i + 1] for i, w in enumerate(words) if w == "-r")


def _pytest_run(command: str) -> str:
    [run] = re.findall(r"(?:\S+=\S+ )*python3 -m pytest[^\n&]*", command)
    return run.strip()


def test_the_readme_test_command_runs_what_ci_runs() -> None:
    readme = README.read_text()
    block = readme.split("Run the tests as `.ci/run` does", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    ci = (REPO / ".ci" / "run").read_text()
    ci_installs = " ".join(line for line in ci.splitlines() if "pip install" in line and " -r " in line)
    assert _requirement_files(block) == _requirement_files(ci_installs)  # requirements-scale.txt too: no batch test skipped
    assert _pytest_run(block) == _pytest_run(ci)


def test_the_scale_out_recipe_installs_torch_and_the_runtime_requirements() -> None:
    page = (REPO / "docs" / "scale-out.md").read_text()  # moved there from the README (issue 26)
    recipe = next(line for line in page.splitlines() if "-m venv" in line and "requirements-scale.txt" in line)
    assert "--system-site-packages" not in recipe, recipe  # a fresh machine has no torch to share
    assert "torch==2.13.0" in recipe and "-r requirements.txt" in recipe, recipe


def readme_commands(text: str) -> list[str]:
    """Every shell command the README shows: the lines of its ```bash blocks (split at ``&&``) and the inline code
    spans that start like a command (``python3 ...``, ``./save.sh ...``, ``bash ...``)."""
    commands: list[str] = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        lines = [line for line in block.splitlines() if line.strip() and not line.lstrip().startswith("#")]
        commands += [part.strip() for line in lines for part in line.split("&&")]
    commands += [span for span in re.findall(r"`([^`\n]+)`", text) if span.startswith(SHELL_STARTS)]
    return commands


def program_and_args(command: str) -> tuple[list[str], list[str]]:
    """(how to run the program, its arguments) of one README command; environment assignments dropped."""
    words = shlex.split(command)
    while words and re.fullmatch(r"[A-Z_]+=\S*", words[0]):
        words = words[1:]
    if words[0] in ("python3", "python"):
        if words[1] == "-m":
            return [sys.executable, "-m", words[2]], words[3:]
        return [sys.executable, words[1]], words[2:]
    if words[0] == "bash":
        return ["bash", words[1]], words[2:]
    return [words[0]], words[1:]


def check_command(command: str) -> str | None:
    """Why a README command would not run as written (None when it parses)."""
    program, args = program_and_args(command)
    if program[:1] == ["."] or program[-1] == "venv":  # `python3 -m venv DIR`, `. DIR/bin/activate`
        return None
    if program[-1] == "pip":
        missing = [f for f in _requirement_files(command) if not (REPO / f).is_file()]
        return f"{command}: no requirement file {missing}" if missing else None
    if program[-1] == "pytest":
        return None if (REPO / args[-1]).exists() else f"{command}: no test path {args[-1]}"
    if program[-1] == "inference.py" and "--help" not in args:
        try:
            cli.parse_args(args)
        except SystemExit:
            return f"{command}: inference.py refuses these arguments"
        return None
    script = program[-1]
    if program[1:2] != ["-m"] and not (REPO / script).is_file():
        return f"{command}: no file {script}"
    flags = [a.split("=", 1)[0] for a in args if a.startswith("--")]
    if not flags or flags == ["--help"]:
        return None
    shown = subprocess.run([*program, "--help"], capture_output=True, text=True, cwd=REPO, timeout=120)
    unknown = [f for f in flags if not re.search(rf"{re.escape(f)}\b", shown.stdout + shown.stderr)]
    return f"{command}: {script} --help has no {unknown}" if shown.returncode or unknown else None


def test_every_command_the_readme_shows_parses_with_files_and_flags_that_exist() -> None:
    commands = readme_commands(README.read_text())
    assert any("inference.py" in c for c in commands) and any("pytest" in c for c in commands), commands
    problems = [p for p in map(check_command, commands) if p]
    assert not problems, "\n".join(problems)


def help_flags(capsys: pytest.CaptureFixture[str]) -> dict[str, str]:
    """``inference.py --help``'s options: long flag → its choices as the help shows them (``{auto,cuda,cpu}``, or '')."""
    with pytest.raises(SystemExit):
        cli.parse_args(["--help"])
    options = capsys.readouterr().out.split("options:", 1)[1]
    found = re.finditer(r"^  (?:-\w, )?(--[\w-]+)( \{[^}]*\})?", options, re.M)
    return {m.group(1): (m.group(2) or "").strip() for m in found}


def test_the_readme_flag_table_has_one_line_for_every_inference_flag_with_its_choices(
    capsys: pytest.CaptureFixture[str],
) -> None:
    flags = help_flags(capsys)
    assert {"--help", "--time-budget", "--verbose"} <= set(flags), flags
    table = README.read_text().split("| flag | meaning (default) |", 1)[1].split("\n\n", 1)[0]
    first_cells = [row.split("|")[1] for row in table.splitlines()[2:]]
    in_table = {re.search(r"--[\w-]+", cell).group(0): cell for cell in first_cells}
    assert set(in_table) == set(flags), "README flag table out of date with inference.py --help"
    for flag, choices in flags.items():
        assert choices in in_table[flag], (flag, choices, in_table[flag])  # e.g. a new backend
    for row in table.splitlines()[2:]:
        assert len(row) <= 160, f"not a one-liner: {row}"


def test_the_readme_stays_a_page_a_newcomer_reads_with_details_in_docs() -> None:
    lines = README.read_text().splitlines()
    assert len(lines) <= 250, f"README.md has {len(lines)} lines: move details to a docs/ page (issue 26)"


def test_every_relative_link_of_the_readme_and_the_docs_pages_points_to_a_file_that_exists() -> None:
    broken = []
    for page in [README, *sorted((REPO / "docs").glob("*.md"))]:
        for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
            path = target.split("#", 1)[0]
            if path and not re.match(r"[a-z]+:", path) and not (page.parent / path).exists():
                broken.append(f"{page.relative_to(REPO)}: {target}")
    assert not broken, broken
