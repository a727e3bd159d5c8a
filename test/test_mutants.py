"""benchmarks/mutants.py itself (fast; the mutation run is not part of CI): its list still matches the code."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))

import mutants  # noqa: E402


def test_every_mutant_snippet_still_matches_the_code_exactly_once() -> None:
    """When this fails, the code moved on: update the snippet in benchmarks/mutants.py (its message names it)."""
    assert mutants.drift(REPO) == []
    assert len(mutants.MUTANTS) >= 20 and len({m.file for m in mutants.MUTANTS}) >= 8


def test_drift_names_a_snippet_that_is_gone_or_ambiguous_and_check_exits_2(tmp_path: Path, capsys) -> None:
    gone = mutants.Mutant("gone", "fusemycells/x.py", "a = 1", "a = 2", ("test/test_x.py",), "")
    twice = mutants.Mutant("twice", "fusemycells/x.py", "b = 1", "b = 2", ("test/test_x.py",), "")
    (tmp_path / "fusemycells").mkdir()
    (tmp_path / "fusemycells" / "x.py").write_text("b = 1\nb = 1\n")
    problems = mutants.drift(tmp_path, [gone, twice])
    assert any(p.startswith("gone:") and "found 0 times" in p for p in problems)
    assert any(p.startswith("twice:") and "found 2 times" in p for p in problems)
    assert any("test file test/test_x.py missing" in p for p in problems)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(mutants, "REPO", tmp_path)
        patch.setattr(mutants, "MUTANTS", (gone,))
        assert mutants.main(["--check"]) == 2
    assert "no longer matches" in capsys.readouterr().err


def test_mutants_are_planted_in_a_copy_of_the_tree_never_in_it(tmp_path: Path) -> None:
    mutants.copy_tree(REPO, tmp_path)
    for m in mutants.MUTANTS:
        assert (tmp_path / m.file).read_text(encoding="utf-8") == (REPO / m.file).read_text(encoding="utf-8")
    assert (tmp_path / "resources" / "manifest.json").is_file() and not (tmp_path / ".git").exists()


@pytest.mark.parametrize("code, verdict", [(0, "survived"), (1, "killed"), (2, "killed (collection error)"), (None, "killed (timeout)")])
def test_pytest_exit_status_gives_the_verdict(code: int | None, verdict: str) -> None:
    assert mutants.verdict(code) == verdict
    with pytest.raises(RuntimeError, match="select nothing"):
        mutants.verdict(5)
