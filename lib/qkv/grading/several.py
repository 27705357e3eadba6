"""Two array-like kinds with their own comparison: several outputs at once (``Parts``: a tuple of
arrays, or of dicts of arrays, compared part by part) and a filter's output (``Filter``: logits
with removed entries set to -inf, whose -inf pattern must match exactly)."""

import numpy as np

from . import _trusted as _t
from .engine import (
    Case,
    Learner,
    Spec,
    _arrays,
    _as_array,
    _call,
    _describe,
    _float64,
    _kind_of_object,
    _matches,
    _mismatch,
    _with_note,
)


def _quiet():
    return _t.errstate(all="ignore")


# ==============================================================================================
# Several outputs: a tuple of arrays, or of dicts of arrays
# ==============================================================================================


def _flatten(value, labels) -> dict:
    """A reference or variant output (tuple of arrays or dicts) -> {label: float64 ndarray}."""
    flat = {}
    for label, part in zip(labels, value, strict=True):
        if _t.type_(part) is dict:
            for key, arr in part.items():
                flat[f"{label}[{key!r}]"] = _t.asarray(arr)
        else:
            flat[label] = _t.asarray(part)
    return flat


def _read_parts(spec: Spec, out, case: Case, labels, expected: dict) -> dict:
    """The learner's output as {label: ndarray}, after checking its structure."""
    n = _t.len_(labels)
    if not (_t.type_(out) is tuple or _t.type_(out) is list) or _t.len_(out) != n:
        raise AssertionError(f"{spec.name} should return {n} things, ({', '.join(labels)}); it "
                             f"returned {_kind_of_object(out)} for {_describe(case)}.")
    flat = {}
    for label, part in zip(labels, out, strict=True):
        wanted = {k: v for k, v in expected.items() if k.startswith(label + "[")}
        if wanted:  # a dict of arrays
            if _t.type_(part) is not dict:
                raise AssertionError(f"{spec.name} should return {label} as a dict of arrays "
                                     f"(name -> array); it returned {_kind_of_object(part)} "
                                     f"for {_describe(case)}.")
            got_keys = sorted(repr(k) for k in part)
            want_keys = sorted(k[len(label) + 1:-1] for k in wanted)  # "label['w']" -> "'w'"
            if got_keys != want_keys:
                raise AssertionError(f"{spec.name} returned {label} with the keys "
                                     f"{', '.join(got_keys) or 'none'} for {_describe(case)}; "
                                     f"it should have the keys of params: "
                                     f"{', '.join(want_keys)}.")
            for key, arr in part.items():
                flat[f"{label}[{key!r}]"] = _as_array(spec, arr, f"{label}[{key!r}]", "float",
                                                      case)
        else:
            flat[label] = _as_array(spec, part, label, "float", case)
    return flat


def run_parts(spec: Spec, learner: Learner, cases, labels) -> None:
    """``engine.run_array`` for a function returning several arrays (or dicts of arrays)."""
    with _t.pristine():
        for case in cases:
            args = _float64(case.args)
            with _t.catch_warnings(), _quiet():
                _t.simplefilter("ignore")
                expected = _flatten(spec.reference(*args), labels)
            out = _call(spec, learner, case)
            got = _read_parts(spec, out, case, labels, expected)
            single = any(g.dtype.itemsize < 8 for g in got.values()) or any(
                a.dtype == np.float32 for a in _arrays(case.args))
            tol = _t.tolerances[spec.tol32 if single else "float64"]
            for label, e in expected.items():
                problem = _mismatch(Spec(spec.name, None, None), (got[label],), (e,), case, tol)
                if problem is None:
                    continue
                problem = problem.replace(f"{spec.name} returned",
                                          f"{spec.name} returned {label} with", 1)
                said = _diagnose_parts(spec, got, expected, args, case, tol, labels)
                raise AssertionError(said if said is not None else _with_note(problem, case))


def _diagnose_parts(spec, got, expected, args, case, tol, labels):
    for mistake in spec.mistakes(*args):
        try:
            with _t.catch_warnings(), _quiet():
                _t.simplefilter("ignore")
                wrong = _flatten(mistake.fn(*args), labels)
        except Exception:
            continue
        if wrong.keys() != got.keys():
            continue
        same_as_right = all(_matches((wrong[k],), (expected[k],), tol) for k in wrong)
        if same_as_right or not all(_matches((got[k],), (wrong[k],), tol) for k in wrong):
            continue
        return mistake.says.replace("{name}", spec.name).replace("{case}", _describe(case))
    return None


# ==============================================================================================
# A filter's output: which entries are -inf must match exactly
# ==============================================================================================
#
# The engine's comparison treats an expected -inf as matching any number (|x - -inf| <= rtol *
# inf), so a filter that writes 0 or -1e9 would pass it. Filters are compared here with the
# removed (-inf) entries first, exactly, then the kept values.


def _strict_matches(a, b, tol) -> bool:
    if a.shape != b.shape:
        return False
    for test in (_t.isnan, np.isposinf, np.isneginf):
        if not _t.identical(test(a), test(b)):
            return False
    finite = _t.isfinite(b)
    return _t.close(np.where(finite, a, 0.0), np.where(finite, b, 0.0), **tol)


def _filter_problem(spec, got, expected, case, tol):
    if got.shape != expected.shape:
        return _mismatch(spec, (got,), (expected,), case, tol)
    kept_wrongly = np.logical_and(np.isneginf(expected), np.logical_not(np.isneginf(got)))
    if kept_wrongly.any():
        idx = tuple(int(i) for i in _t.argwhere(kept_wrongly)[0])
        return (f"{spec.name} returned {float(got[idx]):.6g} at index {idx} for {_describe(case)}, "
                f"where the token should be removed: set removed logits to -np.inf.")
    removed_wrongly = np.logical_and(np.isneginf(got), np.logical_not(np.isneginf(expected)))
    if removed_wrongly.any():
        idx = tuple(int(i) for i in _t.argwhere(removed_wrongly)[0])
        return (f"{spec.name} removed the token at index {idx} (logit "
                f"{float(expected[idx]):.6g}) for {_describe(case)}, but it should be kept.")
    finite = _t.isfinite(expected)
    return _mismatch(spec, (np.where(finite, got, 0.0),), (np.where(finite, expected, 0.0),),
                     case, tol)


def run_filter(spec: Spec, learner: Learner, cases) -> None:
    """``engine.run_array`` for an output with -inf entries (top-k, top-p), compared strictly."""
    with _t.pristine():
        for case in cases:
            args = _float64(case.args)
            with _t.catch_warnings(), _quiet():
                _t.simplefilter("ignore")
                expected = _t.asarray(spec.reference(*args))
            got = _as_array(spec, _call(spec, learner, case), "", "float", case)
            single = got.dtype.itemsize < 8 or args[0].dtype != case.args[0].dtype
            tol = _t.tolerances[spec.tol32 if single else "float64"]
            problem = _filter_problem(spec, got, expected, case, tol)
            if problem is None:
                continue
            said = None
            for mistake in spec.mistakes(*args):
                try:
                    with _t.catch_warnings(), _quiet():
                        _t.simplefilter("ignore")
                        wrong = _t.asarray(mistake.fn(*args))
                except Exception:
                    continue
                if _strict_matches(wrong, expected, tol) or not _strict_matches(got, wrong, tol):
                    continue
                said = mistake.says.replace("{name}", spec.name).replace("{case}",
                                                                          _describe(case))
                break
            raise AssertionError(said if said is not None else _with_note(problem, case))
