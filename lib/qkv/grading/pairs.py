"""The gradient-pair kind: a forward/backward exercise (chapter 9).

The learner's forward is called and compared with the reference; then the learner's backward
gets a seeded upstream gradient and the learner's OWN cache, and every named gradient is compared
with the reference's (relative error at most TOL["float64_gradcheck"]["rel_err"]). A failure
names the gradient(s) that are wrong, their relative error against centred finite differences of
the forward pass, and, when the learner's numbers match a catalogued wrong derivation, that
mistake.
"""

from dataclasses import dataclass

import numpy as np

from . import _trusted as _t
from .engine import (
    Case,
    Learner,
    Spec,
    _as_array,
    _attempt,
    _call,
    _describe,
    _float64,
    _kind_of_object,
    _mismatch,
    _raised,
    _shape,
    _with_note,
)

_GRAD_TOL = _t.tolerances["float64_gradcheck"]["rel_err"]


def _quiet():
    return _t.errstate(all="ignore")


@dataclass(frozen=True)
class Pair:
    """One forward/backward exercise, as the gradient-pair kind runs it."""

    forward: str  # the learner's function names
    backward: str
    reference: object  # (*args) -> (out, cache): trusted qkv.np forward
    ref_backward: object  # (dout, cache) -> dict of gradients: trusted qkv.np backward
    grads: tuple  # ((gradient key, index of the argument it belongs to), ...)
    mistakes: object  # (*args, dout) -> iterable of Mistake whose fn() -> {key: wrong gradient}
    out: str = "float"  # "float", or "scalar" for a loss


def _relative_error(a, b) -> float:
    """max |a - b| / max(|a| + |b|), as qkv.np.relative_error (nan if either has a nan)."""
    a = _t.asarray(a, dtype=_t.float64)
    b = _t.asarray(b, dtype=_t.float64)
    with _quiet():
        top = _t.absolute(_t.subtract(a, b)).max(initial=0.0)
        scale = _t.add(_t.absolute(a), _t.absolute(b)).max(initial=0.0)
    return float(top) / max(float(scale), 2.2250738585072014e-308)


def _same(a, b) -> bool:
    return a.shape == b.shape and _relative_error(a, b) <= _GRAD_TOL


def _numerical(pair: Pair, args: tuple, dout, index: int, h: float = 1e-6):
    """Centred differences of L = sum(forward(*args) * dout) with respect to args[index]."""
    args = [a.copy() if _t.type_(a) is _t.ndarray else a for a in args]
    x = args[index]
    grad = np.zeros(x.shape)

    def loss():
        out = pair.reference(*args)[0]
        return float(_t.multiply(out, dout).sum()) if pair.out != "scalar" else float(out) * dout

    with _quiet():
        for i in np.ndindex(x.shape):
            old = x[i]
            x[i] = old + h
            plus = loss()
            x[i] = old - h
            minus = loss()
            x[i] = old
            grad[i] = (plus - minus) / (2.0 * h)
    return grad


def _names(keys) -> str:
    keys = list(keys)
    return keys[0] if len(keys) == 1 else ", ".join(keys[:-1]) + " and " + keys[-1]


def run_pair(pair: Pair, fwd: Learner, bwd: Learner, cases) -> None:
    """The body of every backward checker: cases is a list of (Case, dout)."""
    fspec = Spec(pair.forward, pair.reference, lambda *a: (), out=pair.out)
    bspec = Spec(pair.backward, pair.ref_backward, lambda *a: ())
    with _t.pristine():
        for case, dout in cases:
            args = _float64(case.args)
            with _t.catch_warnings(), _quiet():
                _t.simplefilter("ignore")
                ref_out, ref_cache = pair.reference(*args)
                ref_grads = pair.ref_backward(dout, ref_cache)
            result = _call(fspec, fwd, case)
            if not (_t.type_(result) is tuple or _t.type_(result) is list) or \
                    _t.len_(result) != 2:
                raise AssertionError(
                    f"{pair.forward} should return two things, (out, cache); it returned "
                    f"{_kind_of_object(result)} for {_describe(case)}.")
            out, cache = result
            got = _as_array(fspec, out, "", pair.out, case)
            problem = _mismatch(fspec, (got,), (_t.asarray(ref_out),), case,
                                _t.tolerances["float64"])
            if problem is not None:
                raise AssertionError(_with_note(problem, case) + " The forward pass must be "
                                     "right before its gradients can be.")
            grads = _call_backward(pair, bwd, dout, cache, case)
            _compare_grads(pair, bspec, grads, ref_grads, args, dout, case)


def _call_backward(pair: Pair, learner: Learner, dout, cache, case: Case):
    said = Case((dout,), ("dloss" if pair.out == "scalar" else "dout",))
    cache_from = f"(The cache was what your {pair.forward} returned for {_describe(case)}.)"
    out, exc, copies = _attempt(learner.fn, Case((dout, cache), ("dout", "cache")),
                                learner.backend)
    if exc is not None:
        message = _raised(pair.backward, exc, said, learner.fn)
        if "not implemented yet" not in message:
            message += " " + cache_from  # the backward's other input
        raise AssertionError(message) from exc
    for label, original, passed in copies:
        if not _t.identical(passed, original):
            raise AssertionError(
                f"{pair.backward} changed its input {label} in place (for example with "
                f"`{label} *= ...` or `{label}[...] = ...`) when called with {_describe(said)} "
                f"{cache_from} Build new arrays instead: `{label} = {label} * ...`.")
    return out


def _compare_grads(pair: Pair, bspec: Spec, grads, ref_grads, args, dout, case: Case):
    keys = [key for key, _ in pair.grads]
    wanted = "{" + ", ".join(f'"{k}": ...' for k in keys) + "}"
    where = _describe(case)
    if _t.type_(grads) is not dict:
        raise AssertionError(f"{pair.backward} returned {_kind_of_object(grads)} for {where}; it "
                             f"should return a dict of gradients, {wanted}.")
    present = {k for k in grads if _t.type_(k) is str}
    missing = [k for k in keys if k not in present]
    if missing:
        raise AssertionError(f"{pair.backward} returned a dict without {_names(missing)} for "
                             f"{where}; it should return {wanted}.")
    got, wrong, shapes = {}, [], []
    for key, index in pair.grads:
        g = _as_array(bspec, grads[key], key, "float", case)
        got[key] = g
        e = _t.asarray(ref_grads[key])
        if g.shape != e.shape:
            shapes.append((key, index, g, e))
        elif not _t.isfinite(g).all():
            wrong.append((key, index, float("nan")))
        else:
            err = _relative_error(g, e)
            if not err <= _GRAD_TOL:
                wrong.append((key, index, err))
    if not wrong and not shapes:
        return
    diagnosis = _diagnose_grads(pair, got, ref_grads, args, dout, case)
    if shapes:
        key, index, g, e = shapes[0]
        message = (f"{pair.backward} returned {key} with shape {_shape(g)} for {where}; a "
                   f"gradient has the shape of what it belongs to, {case.names[index]}: "
                   f"{_shape(e)}.")
    else:
        right = [k for k in keys if k not in {w[0] for w in wrong}]
        errors = []
        for key, index, _ in wrong:
            numeric = _numerical(pair, args, dout, index)
            versus = _relative_error(got[key], numeric)
            errors.append(f"{versus:.2g}" + (f" ({key})" if len(wrong) > 1 else ""))
        message = (f"{pair.backward} returned a wrong {_names(w[0] for w in wrong)} for {where}: "
                   f"relative error {_names(errors)} against centred finite differences of the "
                   f"forward pass (it should be below {_GRAD_TOL:g})."
                   + (f" {_names(right)} {'is' if len(right) == 1 else 'are'} right."
                      if right else ""))
    if diagnosis is not None:
        message += " " + diagnosis
    elif case.note:
        message += " " + case.note
    raise AssertionError(message)


def _diagnose_grads(pair: Pair, got, ref_grads, args, dout, case: Case):
    """The first mistake whose gradients the learner's match (on the keys it changes)."""
    for mistake in pair.mistakes(*args, dout=dout):
        try:
            with _t.catch_warnings(), _quiet():
                _t.simplefilter("ignore")
                wrong = {k: _t.asarray(v, dtype=_t.float64) for k, v in mistake.fn().items()}
        except Exception:  # a variant that cannot run on this input says nothing
            continue
        differs = any(not _same(w, _t.asarray(ref_grads[k], dtype=_t.float64))
                      for k, w in wrong.items())
        if differs and all(_same(got[k], w) for k, w in wrong.items()):
            return mistake.says.replace("{name}", pair.backward).replace("{case}",
                                                                         _describe(case))
    return None

