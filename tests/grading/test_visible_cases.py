"""Every known mistake that the hidden tests catch is caught by a visible case too.

A learner runs only the visible tests before handing in: a mistake that they let through costs
hidden points with no warning. For each exercise, each catalogued mistake (its message with the
numbers blanked out, since a message names the case's sizes) that gives a wrong answer on some
hidden case must give a wrong answer (or raise) on some visible case as well.
"""

import re
import warnings

import numpy as np
import pytest

from qkv.grading.exercises import CHECKERS

# exercises judged by code of their own (no reference function, e.g. chapter 12's) are left out
EXERCISES = {name: check.exercise for name, check in sorted(CHECKERS.items())
             if getattr(check, "exercise", None) is not None and check.exercise.mistakes
             and check.exercise.reference is not None}


def _values(out):
    """An output as a list of float arrays (a dict's values in key order, a tuple's parts), or
    the value itself (text, ids) when it is not numeric."""
    if isinstance(out, dict):
        return [v for k in sorted(out) for v in _values(out[k])]
    if isinstance(out, tuple):
        return [v for part in out for v in _values(part)]
    try:
        return [np.asarray(out, dtype=np.float64)]
    except (TypeError, ValueError):
        return [out]


def _differs(a, b) -> bool:
    if len(a) != len(b):
        return True
    for x, y in zip(a, b, strict=True):
        if not (isinstance(x, np.ndarray) and isinstance(y, np.ndarray)):
            if type(x) is not type(y) or x != y:
                return True
        elif x.shape != y.shape or not np.allclose(x, y, rtol=1e-6, atol=1e-9, equal_nan=True):
            return True
    return False


def _caught(ex, cases) -> set[str]:
    """The mistakes (numbers blanked) that differ from the reference on at least one case."""
    caught = set()
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore")
        for case in cases:
            right = _values(ex.reference(*case.args))
            for mistake in ex.mistakes(*case.args):
                key = re.sub(r"[0-9]+", "#", mistake.says)
                try:
                    wrong = _values(mistake.fn(*case.args))
                except Exception:  # raising is caught too: the learner sees an error
                    caught.add(key)
                    continue
                if _differs(wrong, right):
                    caught.add(key)
    return caught


@pytest.mark.parametrize("name", sorted(EXERCISES))
def test_hidden_tests_catch_no_known_mistake_the_visible_ones_miss(name):
    ex = EXERCISES[name]
    if not all(hasattr(case, "args") for case in [*ex.visible(), *ex.hidden()]):
        pytest.skip("a forward/backward pair: its cases are not plain arguments")
    missed = _caught(ex, ex.hidden()) - _caught(ex, ex.visible())
    assert not missed, f"{name}: only the hidden tests catch:\n" + "\n".join(sorted(missed))
