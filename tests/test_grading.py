"""`python -m qkv.grading grade` against an adversarial corpus (tests/grading_corpus.py).

The whole corpus is graded in ONE run (2 workers on 2 cores, 10 s per cell, kernels limited to
1.5 GB of address space) into a temporary _grading folder. Then: every case ends with its
expected status, score and findings; nothing leaks or gets written; the submissions are
untouched; the gradebook holds exactly what grades.csv says (and an earlier student's row is
unchanged); a re-run resumes instead of regrading or double-counting.
"""

import csv
import hashlib
import os
import re
import shutil
import subprocess
import time
import warnings
from pathlib import Path

import grading_corpus as corpus
import nbformat
import pytest

from qkv.grading.course import generate_assignment, load_config, other_copies
from qkv.grading.driver import STUDENT_ID, Grader
from qkv.grading.integrity import scan

REPO = Path(__file__).resolve().parents[1]
RELEASED = REPO / "exercises" / corpus.CHAPTER / f"{corpus.NOTEBOOK}.ipynb"
REMOTE = re.compile(
    r"""(src|href)\s*=\s*["']?(https?:)?//|url\(\s*["']?(https?:)?//|@import""", re.I)
SEED_SCORE = 1.5  # an earlier student's per-test score, which grading others must not change

pytestmark = pytest.mark.skipif(not RELEASED.is_file(), reason="run `make release` first")


def _tree_hash(folder: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        h.update(str(p.relative_to(folder)).encode() + oct(p.stat().st_mode).encode())
        if p.is_file():
            h.update(p.read_bytes())
    return h.hexdigest()


def _grader(subs, out, logs):
    return Grader(subs, root=REPO, timeout=10, sandbox={"mem_mb": 1536, "cpu_s": 120},
                  grading_dir=out, log=logs.append)


def _git(*args: str) -> str:
    """git's answer in REPO ("" outside a repository); `worktree list` gives one path a line."""
    try:
        done = subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True,
                              timeout=30)
    except OSError:
        return ""
    if done.returncode != 0:
        return ""
    if args[:2] == ("worktree", "list"):
        return "\n".join(line.split()[0] for line in done.stdout.splitlines() if line.strip())
    return done.stdout.strip()


def _gradebook_scores(out: Path) -> dict[str, float]:
    from nbgrader.api import Gradebook

    with Gradebook(f"sqlite:///{out / 'gradebook.db'}") as gb:
        subs = gb.notebook_submissions(corpus.NOTEBOOK, corpus.CHAPTER)
        return {s.student.id: s.score for s in subs}


def _seed(out: Path) -> None:
    """An earlier grading session: student "aaa-earlier" already has a score in the gradebook."""
    from nbgrader.api import Gradebook

    out.mkdir(parents=True)
    cfg = load_config(REPO)
    cfg.CourseDirectory.db_url = f"sqlite:///{out / 'gradebook.db'}"
    cfg.CourseDirectory.release_directory = str(out / "seed-release")
    cfg.Application.log_level = "WARN"
    generate_assignment(cfg, corpus.CHAPTER)
    with Gradebook(cfg.CourseDirectory.db_url, "qkv") as gb, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # nbgrader's SQLAlchemy use warns on SQLAlchemy 2.1
        gb.update_or_create_student("aaa-earlier")
        gb.update_or_create_submission(corpus.CHAPTER, "aaa-earlier")
        nb = gb.find_submission_notebook(corpus.NOTEBOOK, corpus.CHAPTER, "aaa-earlier")
        for grade in nb.grades:
            grade.auto_score = SEED_SCORE
            grade.needs_manual_grade = False
        gb.db.commit()


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("corpus")
    subs, out = tmp / "submissions", tmp / "_grading"
    targets = [
        str(REPO / "solutions" / corpus.CHAPTER / f"{corpus.NOTEBOOK}.ipynb"),
        str(REPO / "solutions"),
        str(REPO / "_grading" / "gradebook.db"),
        str(out / "gradebook.db"),
        str(out / "autograded"),
        str(subs / "correct" / corpus.CHAPTER / f"{corpus.NOTEBOOK}.ipynb"),
        str(REPO / ".git" / "HEAD"),
        # other checkouts of the repository: worktrees' solutions/ and the shared .git
        *[str(Path(p) / "solutions") for p in _git("worktree", "list").split("\n")
          if p and Path(p).resolve() != REPO.resolve()],
        str(Path(_git("rev-parse", "--path-format=absolute", "--git-common-dir") or
                 REPO / ".git") / "HEAD"),
    ]
    expect = corpus.build(REPO, subs, targets)
    assert set(expect) == set(corpus.CASES)
    _seed(out)
    before = _tree_hash(subs)
    logs: list[str] = []
    start = time.monotonic()
    code = _grader(subs, out, logs).run()
    seconds = time.monotonic() - start
    rows = {r["student"]: r for r in csv.DictReader(open(out / "grades.csv"))}
    findings: dict[str, set[str]] = {}
    for r in csv.DictReader(open(out / "integrity.csv")):
        findings.setdefault(r["student"], set()).add(r["finding"])
    print(f"\ngraded {len(rows)} corpus notebooks in {seconds:.1f} s")
    return {"subs": subs, "out": out, "expect": expect, "code": code, "rows": rows,
            "findings": findings, "before": before, "logs": logs, "seconds": seconds}


@pytest.mark.slow
@pytest.mark.parametrize("case", corpus.CASES)
def test_case_ends_as_expected(run, case):
    exp, row = run["expect"][case], run["rows"][case]
    assert exp.status_ok(row["status"]), f"{case}: {row['status']!r}, expected {exp.status!r}"
    expected_score = corpus.score_expected(exp, float(row["max_score"] or 0))
    if expected_score is not None:
        assert row["score"] != "", f"{case}: no score"
        assert float(row["score"]) == pytest.approx(expected_score), f"{case}: {row}"
    if not row["status"].startswith("graded") and row["status"] != "missing":
        assert row["score"] == "", f"{case}: an ungradable submission must not get a score"
    missing = exp.findings - run["findings"].get(case, set())
    assert not missing, f"{case}: findings {missing} not reported (got {run['findings'].get(case)})"
    assert (run["out"] / "feedback" / case / corpus.CHAPTER / f"{corpus.NOTEBOOK}.html").is_file()


@pytest.mark.slow
def test_clean_submissions_have_no_findings(run):
    for case in ("correct", "untouched", "wrong", "partial", "warns", "loop", "memory", "flood"):
        assert not run["findings"].get(case), f"{case}: unexpected findings {run['findings'][case]}"


@pytest.mark.slow
def test_command_exits_nonzero_when_something_is_not_graded(run):
    assert run["code"] == 1
    summary = "\n".join(run["logs"])
    assert "ungradable" in summary and "missing" in summary


@pytest.mark.slow
def test_submissions_are_untouched(run):
    assert _tree_hash(run["subs"]) == run["before"]


@pytest.mark.slow
def test_nothing_leaks_or_gets_written(run):
    out = run["out"]
    hidden = corpus.hidden_test_lines(REPO)
    assert hidden
    for path in (out / "autograded").rglob("*.ipynb"):
        nb = nbformat.read(path, as_version=4)
        for cell in nb.cells:
            for o in cell.get("outputs", []):
                text = o.get("text", "") if o.get("output_type") == "stream" else ""
                assert not corpus.LEAK.search(text), f"{path}: {text[:500]}"
    for path in (out / "feedback").rglob("*.html"):
        if "mathjax" in path.parts:
            continue
        page = path.read_text()
        assert not corpus.LEAK.search(page), path
        for line in hidden:
            assert line not in page, f"{path} shows hidden test code {line!r}"
        remote = REMOTE.search(page)
        assert not remote, f"{path} loads {remote.group(0)!r} from the network"
    assert not (REPO / "lib" / "qkv" / "_corpus_write_probe.txt").exists()


def _feedback(run, case: str) -> str:
    return (run["out"] / "feedback" / case / corpus.CHAPTER / f"{corpus.NOTEBOOK}.html").read_text()


@pytest.mark.slow
def test_feedback_renders_math_offline(run):
    page = _feedback(run, "correct")
    src = re.search(r'<script id="MathJax-script" src="([^"]+)"', page).group(1)
    assert (run["out"] / "feedback" / "correct" / corpus.CHAPTER / src).resolve().is_file()
    assert 'id="qkv-grading"' in page


@pytest.mark.slow
def test_findings_are_in_the_feedback(run):
    page = _feedback(run, "monkeypatch")
    assert "monkeypatch" in page and "np.allclose" in page


@pytest.mark.slow
def test_output_flood_is_truncated(run):
    path = run["out"] / "autograded" / "flood" / corpus.CHAPTER / f"{corpus.NOTEBOOK}.ipynb"
    nb = nbformat.read(path, as_version=4)
    text = "".join(o.get("text", "") for c in nb.cells for o in c.get("outputs", []))
    assert "Output truncated" in text and text.count("\n") < 2000


@pytest.mark.slow
def test_gradebook_matches_grades_csv(run):
    scores = _gradebook_scores(run["out"])
    graded_cells = sum(1 for c in nbformat.read(RELEASED, as_version=4).cells
                       if c.metadata.get("nbgrader", {}).get("grade"))
    assert scores.pop("aaa-earlier") == pytest.approx(SEED_SCORE * graded_cells), (
        "an earlier row changed")
    for case, row in run["rows"].items():
        if row["status"].startswith("graded") or row["status"] == "missing":
            assert scores[case] == pytest.approx(float(row["score"])), case
        else:  # no auto score (formgrader: needs manual grading); an invalid id gets no row
            assert scores.get(case, 0) == 0


@pytest.mark.slow
def test_rerun_resumes_without_regrading_or_double_counting(run):
    out, subs = run["out"], run["subs"]
    grades = (out / "grades.csv").read_text()
    integrity = (out / "integrity.csv").read_text()
    logs: list[str] = []
    code = _grader(subs, out, logs).run()
    assert code == 1
    assert any("grading 0 notebook(s)" in line for line in logs), logs
    assert (out / "grades.csv").read_text() == grades
    assert (out / "integrity.csv").read_text() == integrity
    # An interruption loses at most the submissions in flight: their result file is missing.
    (out / "results" / "correct" / corpus.CHAPTER / f"{corpus.NOTEBOOK}.json").unlink()
    logs.clear()
    _grader(subs, out, logs).run()
    assert any("grading 1 notebook(s)" in line for line in logs), logs
    assert (out / "grades.csv").read_text() == grades
    scores = _gradebook_scores(out)
    valid = [c for c in corpus.CASES if STUDENT_ID.match(c)]
    assert len(scores) == len(valid) + 1  # one submission per student, the seed included


# -- fast checks that need no kernel ---------------------------------------------------------------

WARNING_ONLY = [
    "/x/y.py:3: UserWarning: careful\n  warnings.warn('careful')\n",
    "<ipython-input-1>:2: RuntimeWarning: overflow encountered in exp\n",
    "a.py:1: DeprecationWarning: old\n  x()\nb.py:2: FutureWarning: new\n  y()\n",
]
NOT_ONLY_WARNINGS = ["Traceback (most recent call last):\n", "oops\n",
                     "a.py:1: UserWarning: w\n  x()\nsomething else\n"]


@pytest.mark.parametrize("text", WARNING_ONLY)
def test_ignore_pattern_drops_warning_only_stderr(text):
    pattern = load_config(REPO).IgnorePattern.pattern
    assert re.search(pattern, text)


@pytest.mark.parametrize("text", NOT_ONLY_WARNINGS)
def test_ignore_pattern_keeps_other_stderr(text):
    pattern = load_config(REPO).IgnorePattern.pattern
    assert not re.search(pattern, text)


def test_ignore_pattern_is_linear_on_a_flood():
    pattern = load_config(REPO).IgnorePattern.pattern
    start = time.monotonic()
    assert not re.search(pattern, "UserWarning: x\n" * 20000 + "a" * 100000)
    assert time.monotonic() - start < 2


@pytest.mark.parametrize("code, finding", [
    ("import importlib\nf = importlib.import_module('qkv.np').softmax", "reference-use"),
    ("import sys\nf = sys.modules['qkv.np'].softmax", "dynamic-import"),
    ("f = __import__('qkv.np', fromlist=['x'])", "dynamic-import"),
    ("import builtins\nbuiltins.isinstance = lambda *a: True", "monkeypatch"),
    ("import torch\ntorch.allclose = lambda *a, **k: True", "monkeypatch"),
    ("get_ipython().events.register('pre_run_cell', print)", "ipython-hook"),
    ("import signal\nsignal.signal(signal.SIGINT, signal.SIG_IGN)", "process-control"),
    ("open('/etc/passwd').read()", "file-access"),
    ("import os\nos.environ['NBGRADER_EXECUTION']", "grader-detection"),
    ("check_softmax = print", "test-name-rebound"),
    ("%%bash\nls ..", "magic"),
])
def test_scan_flags(code, finding):
    release = nbformat.read(RELEASED, as_version=4)
    answer = next(c for c in release.cells if c.metadata.get("nbgrader", {}).get("solution"))
    answer.source = code
    assert finding in {f.finding for f in scan(release, nbformat.read(RELEASED, as_version=4))}


@pytest.mark.slow
def test_missing_notebook_feedback_says_it_scores_zero(run):
    page = _feedback(run, "missing")
    assert "missing" in page and "0 / " in page and "No notebook was found" in page
    assert "could not be graded" not in page


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
def test_other_copies_names_worktrees_and_the_shared_git_folder(tmp_path):
    main, other = tmp_path / "main", tmp_path / "other"
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t",
           "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}
    for args in (["init", "-q", str(main)], ["-C", str(main), "commit", "-q", "--allow-empty",
                                            "-m", "x"],
                 ["-C", str(main), "worktree", "add", "-q", str(other)]):
        subprocess.run(["git", *args], check=True, env=env, capture_output=True)
    from_worktree = {str(p) for p in other_copies(other)}
    assert from_worktree == {str(main / "solutions"), str(main / "_grading"), str(main / ".git")}
    from_main = {str(p) for p in other_copies(main)}
    assert from_main == {str(other / "solutions"), str(other / "_grading"), str(main / ".git")}
    assert other_copies(tmp_path) == []  # not a repository: nothing more to hide


def test_hide_option_reaches_every_kernel(tmp_path):
    """`grade --hide PATH`: the path joins the list each job's sandbox hides (the corpus run
    proves that a hidden path reads as empty inside the kernel)."""
    subs, extra = tmp_path / "submissions", tmp_path / "backup-of-solutions"
    (subs / "ada" / corpus.CHAPTER).mkdir(parents=True)
    nbformat.write(nbformat.read(RELEASED, as_version=4),
                   subs / "ada" / corpus.CHAPTER / f"{corpus.NOTEBOOK}.ipynb")
    extra.mkdir()
    grader = Grader(subs, root=REPO, grading_dir=tmp_path / "_grading", log=lambda *a: None,
                    hide=[extra])
    expected = grader.discover()
    grader.prepare_chapters(tmp_path / "scratch")
    _, jobs = grader.plan(expected, tmp_path / "scratch")
    assert len(jobs) == 1
    assert str(extra.resolve()) in jobs[0]["hide"]
    assert str(REPO / "solutions") in jobs[0]["hide"]


def test_discover_finds_notebooks_handed_in_at_the_wrong_place(tmp_path):
    """A flat upload, a zip's nested folder and a renamed file are graded in place of the missing
    notebook; Jupyter's checkpoints are not submissions; what stays ambiguous is skipped, loudly."""
    ch, nb = corpus.CHAPTER, f"{corpus.NOTEBOOK}.ipynb"
    files = ["flat/" + nb, f"nested/{ch}/{ch}/{nb}", f"renamed/{ch}/x (1).ipynb",
             f"ckpt/{ch}/{nb}", f"ckpt/{ch}/.ipynb_checkpoints/{corpus.NOTEBOOK}-checkpoint.ipynb",
             f"both/{ch}/{nb}", "both/" + nb, f"two/{ch}/a.ipynb", f"two/{ch}/b.ipynb",
             "other/notes.txt"]
    subs = tmp_path / "submissions"
    for f in files:
        (subs / f).parent.mkdir(parents=True, exist_ok=True)
        (subs / f).write_text("{}")
    logs: list[str] = []
    grader = Grader(subs, root=REPO, grading_dir=tmp_path / "_grading", log=logs.append)
    expected = grader.discover()
    students = {"flat", "nested", "renamed", "ckpt", "both", "two", "other"}
    assert set(expected) == {(s, ch, corpus.NOTEBOOK) for s in students}
    shown = {key[0]: rel for key, (_, rel) in grader.stand_ins.items()}
    assert shown == {"flat": nb, "nested": f"{ch}/{nb}", "renamed": "x (1).ipynb"}
    text = "\n".join(logs)
    assert f"both/{nb}: not in a chapter folder, skipped" in text
    assert f"two/{ch}/a.ipynb: not a notebook" in text and "other/notes.txt" in text
    assert "checkpoint" not in text


@pytest.mark.slow
def test_feedback_runs_no_learner_script(run):
    page = _feedback(run, "script")
    # The strings appear in the cell's (escaped) source; never inside a live tag.
    assert not re.search(r"<script[^>]*>[^<]*QKV-", page), "a learner's script is live"
    assert not re.search(r"<style[^>]*>[^<]*qkv-grading", page), "a learner's style is live"
    assert "<b>QKV-BOLD</b>" in page  # harmless HTML output still shows
    assert 'id="qkv-grading"' in page  # the grader's own box is still there


@pytest.mark.slow
def test_grades_csv_counts_each_notebooks_integrity_rows(run):
    counts: dict[str, int] = {}
    for r in csv.DictReader(open(run["out"] / "integrity.csv")):
        counts[r["student"]] = counts.get(r["student"], 0) + 1
    for case, row in run["rows"].items():
        assert int(row["findings"]) == counts.get(case, 0), case
    assert int(run["rows"]["monkeypatch"]["findings"]) > 0
