"""Chapter 4, scores and softmax: softmax, the scaled attention scores, softmax with a
temperature."""

import math
from functools import partial

import numpy as np

from .. import _trusted as _t
from ..engine import Case, Mistake, _normal
from ..exercise import Exercise
from ..variants import plain_softmax, qk

_STABLE_FIX = ("Subtract each row's maximum before exponentiating: "
               "e = np.exp(x - np.max(x, axis=-1, keepdims=True)). The result does not change "
               "(the factor exp(-max) cancels), but exp never sees a huge number.")


# --- softmax ------------------------------------------------------------------------------------


def _softmax_mistakes(x):
    yield Mistake(
        "{name} is not numerically stable: for {case} it overflows (exp(1000) is inf in float64, "
        "and inf / inf is nan). " + _STABLE_FIX,
        partial(plain_softmax, stable=False))
    yield Mistake(
        "{name} subtracts the maximum of the whole array instead of each row's maximum: for "
        "{case}, rows far below the overall maximum underflow to 0 / 0 = nan. Use "
        "np.max(x, axis=-1, keepdims=True).",
        lambda x: np.exp(x - np.max(x)) / np.sum(np.exp(x - np.max(x)), axis=-1, keepdims=True))
    for axis in range(-x.ndim, -1):
        yield Mistake(
            f"{{name}} normalizes along axis {axis} (axis {axis + x.ndim}) instead of the last "
            "axis: for {case}, each slice x[..., :] along the LAST axis must sum to 1. Use "
            "axis=-1 with keepdims=True in both the max and the sum.",
            partial(plain_softmax, axis=axis))
    yield Mistake(
        "{name} divides by the sum over the whole array (np.sum without axis=...): for {case}, "
        "every row along the last axis must sum to 1 on its own. Use "
        "np.sum(e, axis=-1, keepdims=True).",
        lambda x: np.exp(x - np.max(x)) / np.sum(np.exp(x - np.max(x))))
    yield Mistake(
        "{name} sums without keepdims=True: for {case} the row sums, of shape x.shape[:-1], "
        "broadcast against the wrong axis, so entries are divided by another row's sum. Use "
        "np.sum(e, axis=-1, keepdims=True).",
        lambda x: np.exp(x - np.max(x, -1, keepdims=True))
        / np.sum(np.exp(x - np.max(x, -1, keepdims=True)), axis=-1))
    yield Mistake(
        "{name} forgot the exponential: it divides x by its row sum. Softmax is "
        "exp(x) / sum(exp(x)).",
        lambda x: x / np.sum(x, axis=-1, keepdims=True))
    yield Mistake(
        "{name} returns log-probabilities (log softmax); return the probabilities themselves, "
        "which lie in [0, 1] and sum to 1 along the last axis.",
        lambda x: np.log(_t.ref_softmax(x)))


def _softmax_cases(hidden: bool):
    if not hidden:
        rng = _t.default_rng(0)
        return [
            Case((_normal(rng, 4, 7),), ("x",)),
            Case((np.array([[1000.0, 1001.0, 1002.0], [-1000.0, -999.0, -1001.0]]),), ("x",),
                 "These inputs are large: exp(1000) is inf in float64."),
            Case((_normal(rng, 2, 3, 5, scale=3.0),), ("x",),
                 "x is a batch here, (2, 3, 5): normalize along the last axis only."),
        ]
    rng = _t.default_rng(101)
    return [
        Case((_normal(rng, 1, 9, scale=2.0),), ("x",)),
        Case((_normal(rng, 6),), ("x",), "x is 1-D here: the whole vector sums to 1."),
        Case((_normal(rng, 3, 4, 6, scale=5.0),), ("x",)),
        Case((_normal(rng, 5, 1),), ("x",), "Each row has one entry, so every output is 1."),
        Case((rng.uniform(-1e4, 1e4, size=(3, 5)),), ("x",),
             "These inputs are huge (up to 1e4): exp overflows unless the row max is subtracted."),
        Case((np.array([[0.0, -np.inf, 1.0, 2.0], [-np.inf, 3.0, -np.inf, 3.0]]),), ("x",),
             "Entries equal to -inf must get probability exactly 0."),
        Case((_normal(rng, 4, 6, dtype=np.float32),), ("x",), "x is float32 here."),
        Case((np.full((2, 4), 7.0),), ("x",), "Equal entries share the probability equally."),
        Case((_normal(rng, 2, 2, 3, 4, scale=10.0),), ("x",)),
    ]


SOFTMAX = Exercise(
    name="softmax",
    reference=_t.ref_softmax,
    visible=lambda: _softmax_cases(False),
    hidden=lambda: _softmax_cases(True),
    mistakes=_softmax_mistakes,
    doc="softmax(x) over the last axis, stable for large inputs; x (..., n) -> (..., n).",
)


# --- attention scores ---------------------------------------------------------------------------


_BATCHED_NOTE = ("q and k are batched here, (..., seq, d_head): transpose only the last two axes "
                 "of k, with np.swapaxes(k, -1, -2) (k.T reverses every axis).")


def _reference_scores(q, k):
    # No qkv.np function computes the scores on their own; this is the book's formula.
    return q @ np.swapaxes(k, -1, -2) / _t.sqrt(q.shape[-1])


def _scores_mistakes(q, k):
    d_head = q.shape[-1]
    yield Mistake(
        f"{{name}} does not scale the scores: for {{case}}, divide q @ k^T by sqrt(d_head) = "
        f"sqrt({d_head}), where d_head = q.shape[-1].",
        lambda q, k: qk(q, k, 1.0))
    yield Mistake(
        f"{{name}} divides by d_head = {d_head} instead of by its square root, sqrt({d_head}).",
        lambda q, k: qk(q, k, d_head))
    yield Mistake(
        f"{{name}} multiplies by sqrt(d_head) instead of dividing by it: scores = "
        f"q @ k^T / sqrt({d_head}).",
        lambda q, k: qk(q, k, 1.0 / math.sqrt(d_head)))
    if q.ndim == 4:
        n_head = q.shape[-3]
        yield Mistake(
            f"{{name}} divides by sqrt(d_model) = sqrt(n_head * d_head) = sqrt({n_head * d_head}) "
            f"for {{case}}; each head's scores are divided by sqrt(d_head) = sqrt({d_head}), the "
            "size of q's LAST axis.",
            lambda q, k: qk(q, k, math.sqrt(n_head * d_head)))
    for axis in range(-q.ndim, -1):
        size = q.shape[axis]
        if size != d_head:
            yield Mistake(
                f"{{name}} divides by sqrt(q.shape[{axis + q.ndim}]) = sqrt({size}) for {{case}}, "
                f"but d_head is the size of the LAST axis: use sqrt(q.shape[-1]) = "
                f"sqrt({d_head}). (len(q) is the first axis, not d_head.)",
                partial(lambda q, k, size: qk(q, k, math.sqrt(size)), size=size))
    yield Mistake(
        "{name} computes k q^T, so rows belong to keys: scores[..., i, j] must be q_i · k_j, "
        "i.e. q @ np.swapaxes(k, -1, -2) (queries along the rows).",
        lambda q, k: qk(k, q, math.sqrt(d_head)))


def _scores_cases(hidden: bool):
    if not hidden:
        rng = _t.default_rng(1)
        return [
            Case((_normal(rng, 5, 8), _normal(rng, 5, 8)), ("q", "k")),
            Case((_normal(rng, 3, 4), _normal(rng, 6, 4)), ("q", "k"),
                 "Here seq_q = 3 and seq_k = 6: the scores are (seq_q, seq_k) = (3, 6)."),
            Case((_normal(rng, 2, 3, 5, 4), _normal(rng, 2, 3, 6, 4)), ("q", "k"),
                 _BATCHED_NOTE, on_error=_BATCHED_NOTE),
        ]
    rng = _t.default_rng(102)
    return [
        Case((_normal(rng, 1, 3), _normal(rng, 2, 3)), ("q", "k")),
        Case((_normal(rng, 7, 16), _normal(rng, 7, 16)), ("q", "k")),
        Case((_normal(rng, 4, 9, 2), _normal(rng, 4, 3, 2)), ("q", "k"), _BATCHED_NOTE,
             on_error=_BATCHED_NOTE),
        Case((_normal(rng, 6, 8, dtype=np.float32), _normal(rng, 6, 8, dtype=np.float32)),
             ("q", "k"), "q and k are float32 here."),
        Case((_normal(rng, 1, 2, 4, 8, scale=3.0), _normal(rng, 1, 2, 4, 8)), ("q", "k"),
             _BATCHED_NOTE, on_error=_BATCHED_NOTE),
    ]


ATTENTION_SCORES = Exercise(
    name="attention_scores",
    reference=_reference_scores,
    visible=lambda: _scores_cases(False),
    hidden=lambda: _scores_cases(True),
    mistakes=_scores_mistakes,
    doc="attention_scores(q, k) = q k^T / sqrt(d_head); (..., seq_q, d_head) x "
        "(..., seq_k, d_head) -> (..., seq_q, seq_k).",
)


# --- softmax with temperature -------------------------------------------------------------------


def _reference_temperature(x, temperature):
    return _t.ref_softmax(x / temperature)


def _temperature_mistakes(x, temperature):
    yield Mistake(
        "{name} multiplies the logits by the temperature instead of dividing: softmax(x / T). "
        "A temperature above 1 must flatten the distribution, one below 1 must sharpen it.",
        lambda x, t: _t.ref_softmax(x * t))
    yield Mistake(
        "{name} ignores the temperature: for {case} it returned plain softmax(x). Divide the "
        "logits by the temperature first: softmax(x / temperature).",
        lambda x, t: _t.ref_softmax(x))
    yield Mistake(
        "{name} divides the probabilities by the temperature after the softmax, so they no longer "
        "sum to 1; divide the logits before it: softmax(x / temperature).",
        lambda x, t: _t.ref_softmax(x) / t)
    yield Mistake(
        "{name} divides by the temperature squared; divide by the temperature itself.",
        lambda x, t: _t.ref_softmax(x / t**2))
    yield Mistake(
        "{name} is not numerically stable: for {case}, x / temperature is large and exp "
        "overflows to inf (giving nan). Compute z = x / temperature, then subtract each row's "
        "maximum before exponentiating: np.exp(z - np.max(z, axis=-1, keepdims=True)).",
        lambda x, t: plain_softmax(x / t, stable=False))


def _temperature_cases(hidden: bool):
    if not hidden:
        rng = _t.default_rng(2)
        return [
            Case((_normal(rng, 3, 6), 0.5), ("x", "temperature")),
            Case((_normal(rng, 2, 5), 2.0), ("x", "temperature")),
            Case((np.array([[10.0, 9.5, 3.0], [-2.0, 8.0, 8.1]]), 0.01), ("x", "temperature"),
                 "A low temperature makes x / temperature large (here up to 1000)."),
        ]
    rng = _t.default_rng(103)
    return [
        Case((_normal(rng, 4), 1.0), ("x", "temperature"),
             "With temperature 1 the result is plain softmax(x)."),
        Case((_normal(rng, 2, 7, scale=5.0) + 12.0, 0.01), ("x", "temperature"),
             "A low temperature makes x / temperature large (about 1000)."),
        Case((_normal(rng, 2, 3, 4), 10.0), ("x", "temperature")),
        Case((_normal(rng, 3, 5, dtype=np.float32), 0.7), ("x", "temperature"),
             "x is float32 here."),
        Case((_normal(rng, 6), 100.0), ("x", "temperature"),
             "A high temperature makes the distribution nearly uniform."),
    ]


SOFTMAX_TEMPERATURE = Exercise(
    name="softmax_with_temperature",
    check="check_softmax_temperature",
    reference=_reference_temperature,
    visible=lambda: _temperature_cases(False),
    hidden=lambda: _temperature_cases(True),
    mistakes=_temperature_mistakes,
    doc="softmax_with_temperature(x, temperature) = softmax(x / temperature) over the last axis.",
)


EXERCISES = [SOFTMAX, ATTENTION_SCORES, SOFTMAX_TEMPERATURE]
