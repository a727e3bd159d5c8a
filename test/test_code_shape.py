"""The package's shape rules (issue #26): every function of ``fusemycells/`` and ``inference.py`` fits in 60
lines, and the 120-character line limit holds there without per-file exceptions."""

from __future__ import annotations

import ast
from pathlib import Path

import tomllib

REPO = Path(__file__).resolve().parent.parent
MAX_FUNCTION_LINES = 60


def package_files() -> list[Path]:
    """The package's Python files and the image's entry point."""
    return sorted((REPO / "fusemycells").rglob("*.py")) + [REPO / "inference.py"]


def function_lengths(path: Path) -> list[tuple[int, str]]:
    """(lines, 'file:line name') of every function in ``path``, decorators and docstring included."""
    rows = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            start = min([node.lineno, *(d.lineno for d in node.decorator_list)])
            rows.append((node.end_lineno - start + 1, f"{path.relative_to(REPO)}:{node.lineno} {node.name}"))
    return rows


def test_every_package_function_fits_in_sixty_lines():
    too_long = [f"{where} ({lines} lines)" for path in package_files() for lines, where in function_lengths(path)
                if lines > MAX_FUNCTION_LINES]
    assert not too_long, f"functions over {MAX_FUNCTION_LINES} lines: {too_long}"


def test_the_line_limit_has_no_exceptions_in_package_code():
    ignores = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["ruff"]["lint"].get("per-file-ignores", {})
    package = [pattern for pattern, rules in ignores.items() if "E501" in rules
               and (pattern.startswith("fusemycells") or pattern == "inference.py" or pattern.startswith("*"))]
    assert not package, f"E501 ignored in package code: {package}"
