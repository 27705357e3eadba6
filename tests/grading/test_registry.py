"""The exercise registry as a whole: every exported checker is declared in a chapter module,
has the documented signature, honours ``backend``, and is covered by a chapter test module.

Also issue 12, finding 7: a passing visible test prints one short line to stdout, nothing to
stderr; a passing hidden test prints nothing.
"""

import importlib
import inspect
from pathlib import Path

import numpy as np
import pytest
from grading_meta import run

import qkv.grading as grading
from qkv.grading.exercises import EXERCISES

HERE = Path(__file__).resolve().parent
CHAPTER_TESTS = sorted(p.stem for p in HERE.glob("test_ch*.py"))


def _declared():
    found = {}
    for name in CHAPTER_TESTS:
        for d in importlib.import_module(name).DECLARED:
            found[d.id] = d
    return found


def test_every_checker_is_declared_and_tested():
    assert set(grading.__all__) == set(EXERCISES)
    assert set(_declared()) == set(grading.__all__)


def test_one_module_per_chapter_each_small():
    root = Path(grading.__file__).parent
    chapters = sorted(p for p in (root / "exercises").glob("ch[0-9][0-9]_*.py"))
    names = [p.name[:4] for p in chapters]
    # one module per chapter; chapters 12-17 add theirs on their own branches
    assert len(set(names)) == len(names) and {f"ch{n:02d}" for n in range(1, 12)} <= set(names)
    for path in root.rglob("*.py"):
        assert len(path.read_text().splitlines()) <= 600, path


@pytest.mark.parametrize("name", sorted(EXERCISES))
def test_signature_is_the_documented_one(name):
    check = getattr(grading, name)
    params = list(inspect.signature(check).parameters.values())
    *fns, hidden, backend = params
    assert len(fns) == EXERCISES[name].output.learners
    assert (hidden.name, hidden.default) == ("hidden", False)
    assert (backend.name, backend.default) == ("backend", "auto")
    assert check.__doc__ and check.__doc__ != f"Check {EXERCISES[name].name}."


@pytest.mark.parametrize("name", sorted(EXERCISES))
def test_backend_is_honoured(name):
    """A backend the exercise does not declare is refused, never accepted and ignored."""
    ex = EXERCISES[name]
    check = getattr(grading, name)
    args = [lambda *a: None] * ex.output.learners
    for backend in ("numpy", "torch"):
        if backend not in ex.backends:
            with pytest.raises(ValueError, match="is not one of them"):
                check(*args, backend=backend)
    with pytest.raises(ValueError, match="backend must be"):
        check(*args, backend="jax")


def test_forced_backend_reaches_the_learner():
    seen = []

    def softmax(x):
        seen.append(type(x).__module__)
        e = np.exp(x - x.max(axis=-1, keepdims=True)) if isinstance(x, np.ndarray) else \
            (x - x.amax(dim=-1, keepdim=True)).exp()
        return e / e.sum(-1, keepdims=True) if isinstance(x, np.ndarray) else e / e.sum(-1, True)

    assert run(grading.check_softmax, softmax, backend="torch")[0] is None
    assert set(seen) == {"torch"}
    seen.clear()
    assert run(grading.check_softmax, softmax, backend="numpy")[0] is None
    assert set(seen) == {"numpy"}


def test_finding_7_a_passing_visible_test_prints_one_line_to_stdout():
    def softmax(x):
        e = np.exp(x - x.max(axis=-1, keepdims=True))
        return e / e.sum(axis=-1, keepdims=True)

    message, out, err = run(grading.check_softmax, softmax)
    assert message is None and err == ""
    assert out.count("\n") == 1 and out.startswith("\u2713 softmax: ") and len(out) < 120, out
    assert "3 visible inputs" in out
    message, out, err = run(grading.check_softmax, softmax, hidden=True)
    assert (message, out, err) == (None, "", "")
