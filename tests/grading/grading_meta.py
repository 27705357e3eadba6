"""The meta-tests every chapter's exercises get, from one declaration per exercise.

A chapter's test module (tests/grading/test_chNN_*.py) declares, for each of its exercises::

    Declared(check_softmax,
             mistakes=[(wrong_fn, "phrase the message must contain"), ...],
             alternatives=[right_fn_written_differently, ...])

and ends with ``globals().update(meta_tests(DECLARED))``. That yields, per exercise:

- ``test_reference_passes``: the exercise's reference (or ``Declared.reference``) passes the
  visible and the hidden cases;
- ``test_catalogue_is_named``: for every catalogued mistake M, a function that makes M on the
  first visible case where M differs from the reference (and is right before it) fails there,
  and the message is M's;
- ``test_catalogue_is_unambiguous``: no two catalogued mistakes with different messages give the
  same wrong output on the visible case where both first differ from the reference;
- ``test_mistake_is_named``: each declared learner-style mistake fails (the visible test, else
  the hidden one) and the message contains the declared phrase(s);
- ``test_alternative_passes``: each valid alternative passes visible and hidden, printing one
  line to stdout and nothing to stderr.

Kinds whose catalogue is not written with the learner's signature (gradient pairs, judged
outputs) get the declared mistakes only.
"""

from __future__ import annotations

import contextlib
import io
import types
import warnings
from dataclasses import dataclass, field

import numpy as np
import pytest

from qkv.grading import _trusted as _t
from qkv.grading.engine import _float64
from qkv.grading.exercise import no_mistakes
from qkv.grading.kinds import Array, Filter, Parts, Value
from qkv.grading.several import _flatten, _strict_matches
from qkv.grading.values import VALUE_KINDS


@dataclass
class Declared:
    check: object  # the public checker, e.g. qkv.grading.check_softmax
    mistakes: list = field(default_factory=list)  # [(fn or (fwd, bwd), phrase or [phrases])]
    alternatives: list = field(default_factory=list)  # [learner fn or (fwd, bwd), ...]
    reference: object = None  # learner-style reference, where the exercise's is not one
    backend: str = "auto"

    @property
    def exercise(self):
        return self.check.exercise

    @property
    def id(self):
        return self.exercise.check_name


def _fns(fn):
    return fn if isinstance(fn, tuple) else (fn,)


def run(check, fn, hidden=False, backend="auto"):
    """(message or None, stdout, stderr) of one checker call."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            check(*_fns(fn), hidden=hidden, backend=backend)
        except AssertionError as exc:
            return str(exc), out.getvalue(), err.getvalue()
    return None, out.getvalue(), err.getvalue()


# --- the catalogue, used as a learner -------------------------------------------------------------


def _catalogued(ex):
    return (isinstance(ex.output, (Array, Filter, Parts, Value)) and ex.reference is not None
            and "numpy" in ex.backends and ex.mistakes is not no_mistakes)


def _same_value(a, b) -> bool:
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        return (isinstance(a, np.ndarray) and isinstance(b, np.ndarray) and a.shape == b.shape
                and a.dtype == b.dtype and bool(np.array_equal(a, b, equal_nan=a.dtype.kind
                                                               == "f")))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same_value(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(
            _same_value(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, types.FunctionType) and isinstance(b, types.FunctionType):
        return a.__code__ == b.__code__
    if type(a) is type(b) and hasattr(a, "__dict__"):
        return vars(a).keys() == vars(b).keys() and all(
            _same_value(vars(a)[k], vars(b)[k]) for k in vars(a))
    return a is b or (type(a) is type(b) and isinstance(a, (int, float, str, bool)) and a == b)


def _which(cases, args):
    for i, case in enumerate(cases):
        if len(case.args) == len(args) and all(
                _same_value(a, b) for a, b in zip(case.args, args, strict=True)):
            return i
    raise AssertionError("the meta-test's learner was called with inputs of no visible case")


def _quiet(fn, *args):
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore")
        return fn(*args)


def _outputs_equal(ex, a, b, args) -> bool:
    """Would the engine take output ``a`` for output ``b`` on this case?"""
    kind = ex.output
    single = any(x.dtype == np.float32 for x in _arrays(args))
    tol = _t.tolerances[getattr(kind, "tol32", "float32_op") if single else "float64"]
    if isinstance(kind, Value):
        norm = VALUE_KINDS[kind.value][1]
        return norm(a) == norm(b)
    if isinstance(kind, Parts):
        fa, fb = _flatten(a, kind.labels), _flatten(b, kind.labels)
        return fa.keys() == fb.keys() and all(
            _t.close(np.asarray(fa[k], float), np.asarray(fb[k], float), **tol) for k in fa)
    if isinstance(kind, Filter):
        return _strict_matches(np.asarray(a), np.asarray(b), tol)
    parts_a = a if kind.dtype == "int_pair" else (a,)
    parts_b = b if kind.dtype == "int_pair" else (b,)
    return all(np.asarray(x).shape == np.asarray(y).shape
               and _t.close(np.asarray(x, float), np.asarray(y, float), **tol)
               for x, y in zip(parts_a, parts_b, strict=True))


def _arrays(args):
    for a in args:
        if isinstance(a, np.ndarray):
            yield a
        elif isinstance(a, dict):
            yield from _arrays(a.values())


def _wrong_on_visible(ex):
    """[(case index, Mistake, wrong output)]: each catalogued mistake at the first visible case
    where it differs from the reference (where a learner who makes it first fails). Mistakes
    are told apart by their message with the case-dependent numbers left out. For a whole-run
    kind (a mistake is named only if it gives the learner's answers on every case) the index is
    None and the output is the list of its answers on every case."""
    found, seen = [], set()
    cases = ex.visible()
    whole = isinstance(ex.output, Value) and ex.output.whole_run
    for i, case in enumerate(cases):
        args = _float64(case.args)
        right = _quiet(ex.reference, *args)
        for mistake in ex.mistakes(*args):
            key = _key(mistake.says)
            if key in seen:
                continue
            try:
                wrong = _quiet(mistake.fn, *args)
            except Exception:
                continue
            if _outputs_equal(ex, wrong, right, case.args):
                continue
            seen.add(key)
            if whole:
                try:
                    wrong = [_quiet(mistake.fn, *_float64(c.args)) for c in cases]
                except Exception:
                    continue
                found.append((None, mistake, wrong))
            else:
                found.append((i, mistake, wrong))
    return cases, found


def _key(says: str) -> str:
    """A mistake's message without its numbers (some messages quote the case's sizes)."""
    return "".join(c for c in says if not c.isdigit())


def _learner_making(ex, cases, index, wrong):
    def learner(*args):
        i = _which(cases, args)
        if index is None:
            return wrong[i]
        if i == index:
            return wrong
        return _quiet(ex.reference, *_float64(tuple(args)))
    learner.__name__ = ex.name
    return learner


# --- the tests ------------------------------------------------------------------------------------


def meta_tests(declared: list[Declared]) -> dict:
    """The parametrized meta-tests for one chapter's declarations (see the module docstring)."""
    ids = [d.id for d in declared]
    catalogued = [d for d in declared if _catalogued(d.exercise)]
    named = [(d, fn, phrase) for d in declared for fn, phrase in d.mistakes]
    alternatives = [(d, fn) for d in declared for fn in d.alternatives]

    @pytest.mark.parametrize("d", declared, ids=ids)
    def test_reference_passes(d):
        reference = d.reference if d.reference is not None else d.exercise.reference
        assert reference is not None, f"{d.id}: declare a learner-style reference"
        for hidden in (False, True):
            message, out, err = run(d.check, reference, hidden, d.backend)
            assert message is None, f"{d.id} (hidden={hidden}): {message}"
            assert err == ""

    @pytest.mark.parametrize("d", catalogued, ids=[d.id for d in catalogued])
    def test_catalogue_is_named(d):
        ex = d.exercise
        cases, found = _wrong_on_visible(ex)
        assert found, f"{d.id}: no catalogued mistake differs from the reference"
        for index, mistake, wrong in found:
            message, _, _ = run(d.check, _learner_making(ex, cases, index, wrong),
                                backend="numpy" if "numpy" in ex.backends else d.backend)
            says = mistake.says.replace("{name}", ex.name)
            head = says.split("{case}")[0]
            assert message is not None, f"{d.id}: passed with mistake {says!r}"
            assert head in message, (f"{d.id}, visible case {index}: expected the message of "
                                     f"{says!r}, got {message!r}")

    @pytest.mark.parametrize("d", catalogued, ids=[d.id for d in catalogued])
    def test_catalogue_is_unambiguous(d):
        ex = d.exercise
        cases, found = _wrong_on_visible(ex)
        for a in range(len(found)):
            for b in range(a + 1, len(found)):
                (i, ma, wa), (j, mb, wb) = found[a], found[b]
                if i != j or ma.says == mb.says:
                    continue
                if i is None:  # whole run: the answers on every case must differ somewhere
                    same = all(_outputs_equal(ex, x, y, c.args)
                               for x, y, c in zip(wa, wb, cases, strict=True))
                else:
                    same = _outputs_equal(ex, wa, wb, cases[i].args)
                assert not same, (
                    f"{d.id}, visible case {i}: two catalogued mistakes give the same output: "
                    f"{ma.says[:60]!r} and {mb.says[:60]!r}")

    @pytest.mark.parametrize("d, fn, phrase", named,
                             ids=[f"{d.id}-{k}" for k, (d, _, _) in enumerate(named)])
    def test_mistake_is_named(d, fn, phrase):
        message, _, err = run(d.check, fn, False, d.backend)
        if message is None:  # some mistakes show only on an edge the hidden cases try
            message, _, err = run(d.check, fn, True, d.backend)
        assert message is not None, f"{d.id}: a wrong answer passed ({phrase!r})"
        for part in [phrase] if isinstance(phrase, str) else phrase:
            assert part in message, f"{d.id}: expected {part!r} in {message!r}"

    @pytest.mark.parametrize("d, fn", alternatives,
                             ids=[f"{d.id}-{k}" for k, (d, _) in enumerate(alternatives)])
    def test_alternative_passes(d, fn):
        for hidden in (False, True):
            message, out, err = run(d.check, fn, hidden, d.backend)
            assert message is None, f"{d.id} (hidden={hidden}): {message}"
            assert err == ""
            if not hidden:
                assert out.count("\n") == 1 and d.exercise.name in out, out

    return {"test_reference_passes": test_reference_passes,
            "test_catalogue_is_named": test_catalogue_is_named,
            "test_catalogue_is_unambiguous": test_catalogue_is_unambiguous,
            "test_mistake_is_named": test_mistake_is_named,
            "test_alternative_passes": test_alternative_passes}
