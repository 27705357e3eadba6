"""An adversarial corpus of submissions, built at test time from a released notebook.

``build(root, submissions, targets)`` writes SUBMISSIONS/<case>/04-scores-and-softmax/softmax.ipynb
for every case in CASES (one student per case) and returns ``{case: Expect}``. The correct answers
come from the source notebook (the text between the solution markers), everything else from the
released notebook, so no student files are committed.

``targets`` names the paths an attacker would love to read or write (gradebooks, solutions/); the
reader and writer cases try every one and print "LEAK:" / "WROTE:" when they succeed.
"""

from __future__ import annotations

import copy
import re
import textwrap
from dataclasses import dataclass, field
from pathlib import Path

import nbformat

CHAPTER, NOTEBOOK = "04-scores-and-softmax", "softmax"
FULL = object()  # expected score: the notebook's max score
CASES = (
    "correct", "untouched", "wrong", "partial", "warns", "loop", "swallow", "exit", "memory",
    "flood", "edited-tests", "deleted-tests", "stripped", "stripped-correct", "reference",
    "monkeypatch", "liar", "reader", "writer", "transformer", "rebind", "detect", "malformed",
    "empty", "not-a-notebook", "bad id!", "missing", "patch-checker", "renamed", "script",
)


@dataclass
class Expect:
    status: str  # exact status, or a prefix ending in "*"
    score: object = None  # a number, FULL, or None (not asserted; see the case's comment)
    findings: set[str] = field(default_factory=set)  # finding kinds that must be reported

    def status_ok(self, status: str) -> bool:
        if self.status.endswith("*"):
            return status.startswith(self.status[:-1])
        return status == self.status


def _solutions(source) -> dict[str, str]:
    """grade_id -> the solution cell with its solution markers removed."""
    out = {}
    for cell in source.cells:
        meta = cell.metadata.get("nbgrader", {})
        if meta.get("solution"):
            lines = [ln for ln in cell.source.splitlines() if "### BEGIN SOLUTION" not in ln
                     and "### END SOLUTION" not in ln]
            out[meta["grade_id"]] = "\n".join(lines) + "\n"
    return out


WRONG = {  # plausible wrong answers, one per answer cell of softmax.ipynb
    "softmax-answer": "def softmax(x):\n    return np.exp(x) / np.sum(np.exp(x))\n",
    "scores-answer": "def attention_scores(q, k):\n    return q @ np.swapaxes(k, -1, -2)\n",
    "temperature-answer": "def softmax_with_temperature(x, temperature):\n"
                          "    return softmax(x * temperature)\n",
    "jacobian-answer": "def softmax_jacobian(x):\n"
                       "    p = softmax(x)\n    return -p[..., :, None] * p[..., None, :]\n",
}


def _ids(nb):
    return [c.metadata.get("nbgrader", {}).get("grade_id") for c in nb.cells]


def build(root: Path, submissions: Path, targets: list[str]) -> dict[str, Expect]:
    release = nbformat.read(root / "exercises" / CHAPTER / f"{NOTEBOOK}.ipynb", as_version=4)
    source = nbformat.read(root / "solutions" / CHAPTER / f"{NOTEBOOK}.ipynb", as_version=4)
    right = _solutions(source)
    answer_ids = list(right)
    tests = [g for g, c in zip(_ids(release), release.cells, strict=True)
             if c.metadata.get("nbgrader", {}).get("grade") and g not in right]
    assert set(WRONG) == set(answer_ids), "the corpus's wrong answers no longer fit softmax.ipynb"
    expect: dict[str, Expect] = {}

    points = {c.metadata["nbgrader"]["grade_id"]: c.metadata["nbgrader"]["points"]
              for c in release.cells if c.metadata.get("nbgrader", {}).get("grade")}

    def nb_with(answers: dict[str, str] | None = None, prefix: str = "",
                suffix: str = "") -> nbformat.NotebookNode:
        """The release with some answers filled in; prefix/suffix go around the first answer."""
        nb = copy.deepcopy(release)
        for cell in nb.cells:
            g = cell.metadata.get("nbgrader", {}).get("grade_id")
            if answers and g in answers:
                cell.source = answers[g]
            if g == answer_ids[0]:
                cell.source = prefix + ("\n" if prefix else "") + cell.source + (
                    "\n" + suffix if suffix else "")
        return nb

    def put(case: str, nb_or_text, exp: Expect) -> None:
        path = submissions / case / CHAPTER / f"{NOTEBOOK}.ipynb"
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(nb_or_text, (str, bytes)):
            path.write_bytes(nb_or_text.encode() if isinstance(nb_or_text, str) else nb_or_text)
        else:
            nbformat.write(nb_or_text, path)
        expect[case] = exp

    put("correct", nb_with(right), Expect("graded", FULL))
    put("untouched", nb_with(), Expect("graded", 0))
    put("wrong", nb_with(WRONG), Expect("graded", 0))
    # softmax and the scores right, temperature wrong: 3 + 2 of 6 points.
    put("partial", nb_with({**right, "temperature-answer": WRONG["temperature-answer"]}),
        Expect("graded", sum(points.values()) - points["temperature-tests"]))
    put("warns", nb_with({**right, "softmax-answer": textwrap.dedent("""\
        import warnings
        def softmax(x):
            warnings.warn("qkv corpus: a harmless warning")
            e = np.exp(x - np.max(x, axis=-1, keepdims=True))
            return e / np.sum(e, axis=-1, keepdims=True)
        """)}), Expect("graded", FULL))
    # softmax never returns: its test cell times out and is interrupted, the other tests still run.
    put("loop", nb_with({
        **right, "softmax-answer": "def softmax(x):\n    while True:\n        pass\n",
        "temperature-answer": "def softmax_with_temperature(x, t):\n    return x\n",
        "jacobian-answer": "def softmax_jacobian(x):\n    return x[..., None] * x\n"}),
        Expect("graded (softmax-tests timed out*", points["scores-tests"]))
    put("swallow", nb_with(right, prefix=textwrap.dedent("""\
        while True:
            try:
                while True:
                    pass
            except KeyboardInterrupt:
                pass
        """)), Expect(f"ungradable: timeout in {answer_ids[0]} (*"))
    put("exit", nb_with(right, prefix="import os\nos._exit(0)\n"),
        Expect(f"ungradable: kernel died in {answer_ids[0]} (*", None, {"process-control"}))
    # Allocates until RLIMIT_AS (set low by the test) stops it with a MemoryError; the memory is
    # freed with the frame and the rest of the notebook runs. np.empty reserves address space
    # without touching the pages, so the limit is reached at once even on a busy machine.
    put("memory", nb_with(right, suffix=textwrap.dedent("""\
        def _hog():
            chunks = []
            while True:
                chunks.append(np.empty(10**8))
        _hog()
        """)), Expect("graded", FULL))
    # 10**6 lines in 1000 writes (a print per line takes longer than a cell may, on a slow machine).
    flood = "for i in range(1000):\n    print('\\n'.join(map(str, range(1000))))\n"
    put("flood", nb_with(right, prefix=flood),
        Expect("graded", FULL))

    edited = nb_with(WRONG)
    for cell in edited.cells:
        if cell.metadata.get("nbgrader", {}).get("grade_id") in tests:
            cell.source = "assert True\n"
    put("edited-tests", edited, Expect("graded", 0, {"test-cell-edited"}))
    deleted = nb_with(WRONG)
    deleted.cells = [c for c in deleted.cells
                     if c.metadata.get("nbgrader", {}).get("grade_id") not in tests]
    put("deleted-tests", deleted, Expect("graded", 0, {"test-cell-deleted"}))
    for case, answers, score in (("stripped", WRONG, 0), ("stripped-correct", right, FULL)):
        nb = nb_with(answers)
        for cell in nb.cells:
            cell.metadata.pop("nbgrader", None)
        put(case, nb, Expect("graded", score, {"nbgrader-metadata-stripped"}))

    # Using the reference passes the tests (they cannot tell); the scan reports it.
    put("reference", nb_with({**right, "softmax-answer": "from qkv.np import softmax\n"}),
        Expect("graded", FULL, {"reference-use"}))
    put("monkeypatch", nb_with(WRONG, prefix=textwrap.dedent("""\
        np.allclose = lambda *a, **k: True
        np.isclose = lambda a, b, *r, **k: np.ones(np.broadcast(a, b).shape, dtype=bool)
        np.array_equal = lambda *a, **k: True
        np.testing.assert_allclose = lambda *a, **k: None
        setattr(np, "all", lambda *a, **k: True)
        """)), Expect("graded", 0, {"monkeypatch"}))
    liar = textwrap.dedent("""\
        class Liar:
            shape = property(lambda self: self._shape)
            dtype = np.dtype("float64")
            def __init__(self, shape):
                self._shape = shape
            def __eq__(self, other):
                return True
            def __ne__(self, other):
                return False
            def __array__(self, dtype=None, copy=None):
                return np.zeros(self._shape)
            def __array_ufunc__(self, ufunc, method, *args, **kwargs):
                return True
        """)
    put("liar", nb_with({
        "softmax-answer": liar + "def softmax(x):\n    return Liar(x.shape)\n",
        "scores-answer":
            "def attention_scores(q, k):\n    return Liar(q.shape[:-1] + k.shape[-2:-1])\n",
        "temperature-answer": "def softmax_with_temperature(x, t):\n    return Liar(x.shape)\n",
    }), Expect("graded", 0, {"operator-override"}))
    put("reader", nb_with(right, prefix=_reader(targets)), Expect("graded", FULL, {"file-access"}))
    put("writer", nb_with(right, prefix=_writer(targets, root)),
        Expect("graded", FULL, {"file-access"}))
    # An input transformer that blanks every later cell: nbgrader alone would see tests that
    # "pass" (no error output); the worker's check that each test cell ran gives them zero.
    put("transformer", nb_with(WRONG, prefix=(
        "get_ipython().input_transformers_cleanup.append(lambda lines: [])\n")),
        Expect("graded", 0, {"ipython-hook", "test-cell-not-run"}))
    # Rebinding the checkers' names in the learner's own namespace. The scan reports it; whether
    # it also fails depends on the notebook (test cells that re-import their checker defeat it),
    # so the score is not asserted: see the grading report.
    put("rebind", nb_with(prefix="".join(
        f"def {name}(*args, **kwargs):\n    pass\n" for name in
        ("check_softmax", "check_attention_scores", "check_softmax_temperature",
         "check_softmax_jacobian"))),
        Expect("graded", None, {"test-name-rebound"}))
    # Replacing the checkers in the qkv.grading module itself, where the test cells re-import
    # them from: the worker puts the import-time objects back before every test cell.
    put("patch-checker", nb_with(WRONG, prefix=textwrap.dedent("""\
        import qkv.grading
        for _name in dir(qkv.grading):
            if _name.startswith("check_"):
                setattr(qkv.grading, _name, lambda *args, **kwargs: print("ok"))
        """)), Expect("graded", 0, {"monkeypatch"}))
    # Output that would run in the browser of whoever opens the feedback page, or hide the
    # grader's box on it: the page is sanitized (test_feedback_runs_no_learner_script).
    put("script", nb_with(right, prefix=textwrap.dedent("""\
        from IPython.display import HTML, Javascript, display
        display(HTML("<script>document.title = 'QKV-SCRIPT-RAN'</script>"
                     "<style>#qkv-grading { display: none }</style><b>QKV-BOLD</b>"))
        display(Javascript("document.title = 'QKV-JS-RAN'"))
        """)), Expect("graded", FULL))
    # The notebook saved under another name (a browser's second download): graded, and said so.
    renamed = submissions / "renamed" / CHAPTER / f"{NOTEBOOK} (1).ipynb"
    renamed.parent.mkdir(parents=True)
    nbformat.write(nb_with(right), renamed)
    expect["renamed"] = Expect(f"graded (submitted as '{NOTEBOOK} (1).ipynb')", FULL)
    # Behaving differently when graded: the sandbox removes NBGRADER_EXECUTION from the kernel.
    put("detect", nb_with({**right, "softmax-answer": textwrap.dedent("""\
        import os
        def softmax(x):
            if os.environ.get("NBGRADER_EXECUTION"):
                e = np.exp(x - np.max(x, axis=-1, keepdims=True))
                return e / np.sum(e, axis=-1, keepdims=True)
            return x
        """)}), Expect("graded", points["scores-tests"], {"grader-detection"}))

    text = nbformat.writes(nb_with(right))
    put("malformed", text[: len(text) // 2], Expect("ungradable: malformed JSON at line*"))
    put("empty", b"", Expect("ungradable: empty file"))
    put("not-a-notebook", '{"cells": "none"}', Expect("ungradable: not a valid notebook*"))
    put("bad id!", nb_with(right), Expect("ungradable: student folder name is not a valid id*"))
    (submissions / "missing" / CHAPTER).mkdir(parents=True)
    expect["missing"] = Expect("missing", 0)
    return expect


def _reader(targets: list[str]) -> str:
    return textwrap.dedent(f"""\
        import glob, os
        _paths = {targets!r} + glob.glob("/tmp/qkv-*/**/gradebook.db", recursive=True) + \\
            [p for p in glob.glob("/tmp/qkv-*") if p != os.getcwd()] + ["../../../gradebook.db"]
        for _pid in os.listdir("/proc"):
            if _pid.isdigit() and int(_pid) != os.getpid():
                _paths += [f"/proc/{{_pid}}/cwd/gradebook.db", f"/proc/{{_pid}}/cwd/source",
                           f"/proc/{{_pid}}/root/tmp"]
        for _p in _paths:
            try:
                if os.path.isdir(_p):
                    _names = os.listdir(_p)
                    if _names:
                        print("LEAK:", _p, _names[:5])
                else:
                    with open(_p, "rb") as _f:
                        _data = _f.read(4000)
                    if _data:
                        print("LEAK:", _p, _data[:200])
            except Exception as _e:
                pass
        """)


def _writer(targets: list[str], root: Path) -> str:
    probe = str(root / "lib" / "qkv" / "_corpus_write_probe.txt")
    return textwrap.dedent(f"""\
        import glob, os, sqlite3
        _paths = {targets!r} + glob.glob("/tmp/qkv-*/**/gradebook.db", recursive=True) + \\
            [f"/proc/{{os.getppid()}}/cwd/gradebook.db", "../../../gradebook.db"]
        for _p in _paths:
            if _p.endswith(".db"):
                try:
                    _c = sqlite3.connect(_p)
                    _n = _c.execute("UPDATE grade SET auto_score = 1000").rowcount
                    _c.commit()
                    if _n:
                        print("WROTE:", _p, _n)
                except Exception:
                    pass
        try:
            with open({probe!r}, "w") as _f:
                _f.write("x")
            print("WROTE:", {probe!r})
        except Exception:
            pass
        """)


def score_expected(exp: Expect, max_score: float):
    return max_score if exp.score is FULL else exp.score


def hidden_test_lines(root: Path) -> list[str]:
    """Lines of hidden test code in the source notebook (must never reach a learner)."""
    source = nbformat.read(root / "solutions" / CHAPTER / f"{NOTEBOOK}.ipynb", as_version=4)
    lines = []
    for cell in source.cells:
        inside = False
        for ln in cell.source.splitlines():
            if "BEGIN HIDDEN TESTS" in ln:
                inside = True
            elif "END HIDDEN TESTS" in ln:
                inside = False
            elif inside and ln.strip():
                lines.append(ln.strip())
    return lines


LEAK = re.compile(r"^(LEAK|WROTE):", re.M)
