"""Autograding speed: seconds per submitted notebook, serially and with every core.

A class of students is generated from the released notebook (exercises/) of one chapter: half
hand in the reference solution (the text between the solution markers in solutions/), half
hand in the notebook untouched. The class is graded twice from scratch with
``python -m qkv.grading grade DIR --workers N --out TMP``: with 1 worker and with one per core.
"""

from __future__ import annotations

import csv
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .common import ROOT, log

CHAPTER, NOTEBOOK = "04-scores-and-softmax", "softmax.ipynb"
COLUMNS = ["workers", "status", "notebooks", "wall_s", "s_per_notebook", "speedup",
           "full_marks", "zero"]


def make_class(dest: Path, n_students: int) -> None:
    """dest/<student>/<CHAPTER>/<NOTEBOOK>: even students solved it, odd ones left it alone."""
    import nbformat

    release = nbformat.read(ROOT / "exercises" / CHAPTER / NOTEBOOK, as_version=4)
    source = nbformat.read(ROOT / "solutions" / CHAPTER / NOTEBOOK, as_version=4)
    answers = {}  # grade_id -> the solution, markers removed
    for cell in source.cells:
        meta = cell.metadata.get("nbgrader", {})
        if meta.get("solution"):
            answers[meta["grade_id"]] = "\n".join(
                line for line in cell.source.splitlines()
                if "### BEGIN SOLUTION" not in line and "### END SOLUTION" not in line)
    solved = nbformat.reads(nbformat.writes(release), as_version=4)  # a copy
    for cell in solved.cells:
        grade_id = cell.metadata.get("nbgrader", {}).get("grade_id")
        if grade_id in answers:
            cell.source = answers[grade_id]
    for i in range(n_students):
        path = dest / f"student{i:02d}" / CHAPTER / NOTEBOOK
        path.parent.mkdir(parents=True)
        nbformat.write(solved if i % 2 == 0 else release, path)


def grade(submissions: Path, workers: int) -> dict:
    """Grade the class into a fresh folder; wall time and the scores it gave."""
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}"
                                 f"{os.environ.get('PATH', '')}"}  # nbgrader runs alembic
    with tempfile.TemporaryDirectory(prefix="qkv-bench-grades-") as out:
        cmd = [sys.executable, "-m", "qkv.grading", "grade", str(submissions),
               "--workers", str(workers), "--out", out]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
        wall = time.perf_counter() - t0
        grades_csv = Path(out) / "grades.csv"
        grades = list(csv.DictReader(grades_csv.open())) if grades_csv.exists() else []
    row = dict(workers=workers, wall_s=wall, notebooks=len(grades),
               full_marks=sum(g["score"] == g["max_score"] and g["status"] == "graded"
                              for g in grades),
               zero=sum(float(g["score"] or 0) == 0 for g in grades))
    row["status"] = "ok" if proc.returncode == 0 else (
        f"exit {proc.returncode}: {(proc.stderr or proc.stdout).strip().splitlines()[-1:]}")
    if grades:
        row["s_per_notebook"] = wall / len(grades)
    return row


def run(args) -> list[dict]:
    section = dict(name="grading", title="Grading (python -m qkv.grading grade)",
                   columns=COLUMNS, rows=[], notes=[])
    try:
        from qkv.grading import driver  # noqa: F401 - the grade command lives there
    except ImportError as e:
        section["rows"].append(dict(status=f"missing (qkv.grading grade not built yet: {e})"))
        return [section]
    n_students = 2 if args.quick else 6
    cores = os.cpu_count() or 1
    with tempfile.TemporaryDirectory(prefix="qkv-bench-class-") as tmp:
        make_class(Path(tmp), n_students)
        for workers in dict.fromkeys([1, cores]):
            log(f"  grading: {n_students} notebooks, {workers} worker(s)")
            section["rows"].append(grade(Path(tmp), workers))
    serial = section["rows"][0]["wall_s"]
    for row in section["rows"]:
        row["speedup"] = serial / row["wall_s"]
    section["notes"].append(
        f"class: {n_students} students x {CHAPTER}/{NOTEBOOK}, half solved (expect full marks), "
        f"half untouched (expect 0); wall time includes the grader's start-up and gradebook")
    return [section]
