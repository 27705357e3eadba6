"""The value kind: exercises that return a Python value rather than an array (text, a list of
token ids, True/False, a count of parameters).

They take the same steps as arrays (``engine._call``; a check of what kind of value came back;
the comparison with the reference; the catalogued mistakes), on exact builtin values: the
learner's output is read into a str, a tuple of ints, a bool or an int before it is compared, so
no learner code (a lying ``__eq__``) runs in the comparison.
"""

import math

import numpy as np

from . import _trusted as _t
from .engine import Case, Learner, Spec, _call, _describe, _kind_of_object, _shape, _with_note


def run_value(spec: Spec, learner: Learner, cases, whole_run: bool = False) -> None:
    """The body of a checker whose exercise returns a value: ``spec.out`` is a ``VALUE_KINDS`` key.

    The learner's output is read into an exact builtin (str, tuple of int, bool, int) before it is
    compared, so no learner code (a lying ``__eq__``) runs in the comparison. ``whole_run``: take
    the learner's answers on every case first and name a mistake only if it gives those answers
    on every case (one True/False on one input says little about what was done).
    """
    read, norm = VALUE_KINDS[spec.out]
    with _t.pristine():
        with _t.catch_warnings(), _t.errstate(all="ignore"):
            _t.simplefilter("ignore")
            expected = [norm(spec.reference(*case.args)) for case in cases]
        got = []
        for case, want in zip(cases, expected, strict=True):
            out = _call(spec, learner, case)  # changed input lists: named there
            got.append(read(spec, out, case))
            if not whole_run and got[-1] != want:
                break
        for i, (case, want, value) in enumerate(zip(cases, expected, got, strict=False)):
            if value != want:
                said = _diagnose_value(spec, cases, expected, got, i, norm, whole_run)
                raise AssertionError(said if said is not None else _with_note(
                    _value_mismatch(spec, value, want, case), case))


def _diagnose_value(spec: Spec, cases, expected, got, i: int, norm, whole_run: bool):
    """The first mistake that gives the learner's answer on case ``i`` (on every case if
    ``whole_run``) where the right answer differs."""
    def wrong_value(mistake, args):
        with _t.catch_warnings(), _t.errstate(all="ignore"):
            _t.simplefilter("ignore")
            return norm(mistake.fn(*args))

    case = cases[i]
    for mistake in spec.mistakes(*case.args):
        try:
            wrong = wrong_value(mistake, case.args)
        except Exception:  # a variant that cannot run on this input says nothing
            continue
        if wrong == expected[i] or wrong != got[i]:
            continue
        if whole_run:
            try:
                if any(wrong_value(mistake, c.args) != g for c, g in zip(cases, got, strict=True)):
                    continue
            except Exception:
                continue
        return mistake.says.replace("{name}", spec.name).replace("{case}", _describe(case))
    return None


def _value_mismatch(spec: Spec, got, want, case: Case) -> str:
    """What is wrong with a value answer, in words (the case's note is added by the caller)."""
    where = _describe(case)
    if spec.out == "ids":
        g, w = list(got), list(want)
        text = f"{spec.name} returned {g} for {where}; expected {w}."
        if len(g) != len(w):
            return text + f" That is {len(g)} ids instead of {len(w)}."
        first = next(k for k in range(len(w)) if g[k] != w[k])
        return text + f" The first difference is at position {first}."
    if spec.out == "count":
        # the right count is not shown: it would answer the hidden cases too
        return (f"{spec.name} returned {got:,} for {where}, which is not the right count. "
                + (spec.hint or "Count every weight matrix and bias vector of the layer."))
    return f"{spec.name} returned {got!r} for {where}; expected {want!r}."


# --- reading a value answer (each raises the AssertionError that says what was expected) --------


def _read_text(spec: Spec, out, case: Case) -> str:
    if _t.type_(out) is str:
        return out
    if (_t.type_(out) is list or _t.type_(out) is tuple) and all(_t.type_(s) is str for s in out):
        raise AssertionError(
            f"{spec.name} returned a {_t.type_(out).__name__} of strings for {_describe(case)}; "
            f"return one string: join the pieces with ''.join(...).")
    raise AssertionError(f"{spec.name} returned {_kind_of_object(out)} for {_describe(case)}; "
                         f"it should return a string (str).")


def _is_integer(v) -> bool:
    return _t.type_(v) is int or _t.isinstance_(v, np.integer)


def _read_ids(spec: Spec, out, case: Case) -> tuple:
    torch = _t.torch_refs()
    if _t.type_(out) is _t.ndarray or (torch is not None and _t.type_(out) is torch.Tensor):
        arr = out if _t.type_(out) is _t.ndarray else torch.numpy(torch.cpu(torch.detach(out)))
        if _t.kind_of(arr) in "iu" and arr.ndim == 1:
            return _t.tuple_(int(v) for v in arr.tolist())
        raise AssertionError(
            f"{spec.name} returned an array of dtype {arr.dtype} and shape {_shape(arr)} for "
            f"{_describe(case)}; it should return the token ids, one integer per token, e.g. "
            f"a list like [4, 3, 5].")
    if _t.type_(out) is list or _t.type_(out) is tuple:
        for v in out:
            if not _is_integer(v):
                shown = repr(v) if _t.type_(v) is str else _kind_of_object(v)
                raise AssertionError(
                    f"{spec.name} returned a {_t.type_(out).__name__} containing {shown} for "
                    f"{_describe(case)}; every entry must be a token id, an integer "
                    f"(its index in the vocabulary).")
        return _t.tuple_(int(v) for v in out)
    raise AssertionError(f"{spec.name} returned {_kind_of_object(out)} for {_describe(case)}; it "
                         f"should return a list of token ids (integers).")


def _read_flag(spec: Spec, out, case: Case) -> bool:
    if _t.type_(out) is bool or _t.type_(out) is np.bool_:
        return bool(out)
    torch = _t.torch_refs()
    if _t.type_(out) is _t.ndarray or (torch is not None and _t.type_(out) is torch.Tensor):
        if out.shape == () and out.dtype in (np.bool_, getattr(torch, "bool", None)):
            return bool(out.item())
        raise AssertionError(
            f"{spec.name} returned an array of shape {_shape(out)} for {_describe(case)}; return "
            f"a single True or False for the whole comparison: np.allclose(a, b) (a == b compares "
            f"entry by entry).")
    raise AssertionError(f"{spec.name} returned {_kind_of_object(out)} for {_describe(case)}; it "
                         f"should return True or False.")


def _read_count(spec: Spec, out, case: Case) -> int:
    if _is_integer(out):
        return int(out)
    if _t.type_(out) in (float, _t.float64, _t.float32):
        if math.isfinite(out) and float(out).is_integer():
            return int(out)
        raise AssertionError(f"{spec.name} returned {float(out)!r} for {_describe(case)}, which is "
                             f"not a whole number; a count is an integer (use // "
                             f"rather than / to divide).")
    raise AssertionError(f"{spec.name} returned {_kind_of_object(out)} for {_describe(case)}; it "
                         f"should return a whole number (an int).")


VALUE_KINDS = {
    # spec.out: (read the learner's output, normalize a trusted reference or variant output)
    "text": (_read_text, str),
    "ids": (_read_ids, lambda v: _t.tuple_(int(i) for i in v)),
    "flag": (_read_flag, bool),
    "count": (_read_count, int),
}


class Shown:
    """A function handed to the learner's code that reads as a description in messages."""

    def __init__(self, text: str, fn):
        self.text = text
        self.fn = fn

    def __call__(self, *args):
        return self.fn(*args)

    def __repr__(self):
        return self.text
