"""`python -m qkv.grading release`: exercises/ is exactly what solutions/ generates, carries no
solution or hidden-test text, and nbgrader's autograde gives every solution full marks and every
untouched exercise zero."""

import csv
import filecmp
from pathlib import Path

import nbformat
import pytest

from qkv.grading.course import GradingError, chapters, notebooks
from qkv.grading.driver import Grader
from qkv.grading.release import release

REPO = Path(__file__).resolve().parents[1]
CHAPTERS = chapters(REPO)

pytestmark = pytest.mark.skipif(not CHAPTERS, reason="no chapters in solutions/")


def _files(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")
            if p.is_file() and ".ipynb_checkpoints" not in p.parts}


def test_release_has_no_drift(tmp_path):
    """Regenerating every chapter reproduces the committed exercises/ byte for byte."""
    out = tmp_path / "exercises"
    release(REPO, out=out)
    committed = REPO / "exercises"
    assert _files(out) == _files(committed), (
        "exercises/ is out of date with solutions/: run `make release` and commit exercises/")
    for rel in sorted(_files(out)):
        assert filecmp.cmp(out / rel, committed / rel, shallow=False), (
            f"exercises/{rel} differs from what solutions/ generates: run `make release`")


def test_release_twice_is_identical(tmp_path):
    release(REPO, CHAPTERS[:1], out=tmp_path / "a")
    release(REPO, CHAPTERS[:1], out=tmp_path / "b")
    for rel in _files(tmp_path / "a"):
        assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes()


def test_release_rejects_unknown_chapter(tmp_path):
    with pytest.raises(GradingError, match="no such chapter"):
        release(REPO, ["99-nope"], out=tmp_path)


def _regions(source: str, begin: str, end: str) -> list[str]:
    lines, inside = [], False
    for line in source.splitlines():
        if begin in line:
            inside = True
        elif end in line:
            inside = False
        elif inside and line.strip() and not line.strip().startswith("#"):
            lines.append(line.strip())
    return lines


@pytest.mark.parametrize("chapter", CHAPTERS)
def test_exercises_hold_no_solution_or_hidden_tests(chapter):
    for name in notebooks(REPO, chapter):
        source = nbformat.read(REPO / "solutions" / chapter / f"{name}.ipynb", as_version=4)
        path = REPO / "exercises" / chapter / f"{name}.ipynb"
        assert path.is_file(), f"{path} missing: run `make release`"
        text = path.read_text()
        released = nbformat.read(path, as_version=4)
        code_lines = {ln.strip() for c in released.cells if c.cell_type == "code"
                      for ln in c.source.splitlines()}
        for marker in ("BEGIN SOLUTION", "END SOLUTION", "BEGIN HIDDEN TESTS", "END HIDDEN TESTS"):
            assert marker not in text, f"{path}: '{marker}' survived the release"
        for cell in source.cells:
            for line in _regions(cell.source, "BEGIN SOLUTION", "END SOLUTION"):
                assert line not in code_lines, f"{path}: solution line leaked: {line!r}"
            for line in _regions(cell.source, "BEGIN HIDDEN TESTS", "END HIDDEN TESTS"):
                assert line not in text, f"{path}: hidden test line leaked: {line!r}"
        assert not any(c.get("outputs") for c in released.cells), f"{path} has outputs"


@pytest.mark.slow
def test_solutions_score_full_and_exercises_zero(tmp_path):
    """Graded through nbgrader's autograde (the same pipeline as `make grade`)."""
    subs = tmp_path / "submissions"
    for chapter in CHAPTERS:
        for name in notebooks(REPO, chapter):
            for student, folder in (("solution", "solutions"), ("untouched", "exercises")):
                dest = subs / student / chapter / f"{name}.ipynb"
                dest.parent.mkdir(parents=True, exist_ok=True)
                dest.write_bytes((REPO / folder / chapter / f"{name}.ipynb").read_bytes())
    out = tmp_path / "_grading"
    code = Grader(subs, root=REPO, timeout=60, grading_dir=out, log=lambda *a: None).run()
    rows = list(csv.DictReader(open(out / "grades.csv")))
    assert len(rows) == 2 * sum(len(notebooks(REPO, c)) for c in CHAPTERS)
    for row in rows:
        where = f"{row['student']}/{row['chapter']}/{row['notebook']}: {row}"
        assert row["status"] == "graded", where
        assert float(row["max_score"]) > 0, where
        if row["student"] == "solution":
            assert float(row["score"]) == float(row["max_score"]), where
        else:
            assert float(row["score"]) == 0, where
    assert code == 0


@pytest.mark.parametrize("chapter", CHAPTERS)
def test_solution_answers_raise_no_integrity_findings(chapter):
    """The scan must not flag the model answers themselves (no false positives)."""
    from qkv.grading.integrity import scan

    for name in notebooks(REPO, chapter):
        source = nbformat.read(REPO / "solutions" / chapter / f"{name}.ipynb", as_version=4)
        released = nbformat.read(REPO / "exercises" / chapter / f"{name}.ipynb", as_version=4)
        answers = {c.metadata["nbgrader"]["grade_id"]: c.source for c in source.cells
                   if c.metadata.get("nbgrader", {}).get("solution")}
        submission = nbformat.read(REPO / "exercises" / chapter / f"{name}.ipynb", as_version=4)
        for cell in submission.cells:
            grade_id = cell.metadata.get("nbgrader", {}).get("grade_id")
            if grade_id in answers:
                cell.source = "\n".join(ln for ln in answers[grade_id].splitlines()
                                        if "SOLUTION" not in ln)
        assert scan(submission, released) == [], f"{chapter}/{name}"
