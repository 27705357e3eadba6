"""Checkers of the attention core: softmax, attention scores and temperature, the causal mask,
masked attention, layer norm, GELU, multi-head attention, the decoder block, next-token targets
and cross-entropy.

Each is ``check_xxx(fn, hidden=False, backend="auto")``: a Spec (the name, the trusted
reference, the known mistakes) and a list of seeded cases, handed to ``engine._run``.
"""

import math
from functools import partial
from itertools import permutations

import numpy as np

from . import _trusted as _t
from ._legacy import (
    Case,
    Mistake,
    Spec,
    _attention_variant,
    _block_variant,
    _layer_norm_variant,
    _mha_variant,
    _normal,
    _plain_softmax,
    _run,
    _scores,
)

# ==============================================================================================
# The checkers
# ==============================================================================================

_STABLE_FIX = ("Subtract each row's maximum before exponentiating: "
               "e = np.exp(x - np.max(x, axis=-1, keepdims=True)). The result does not change "
               "(the factor exp(-max) cancels), but exp never sees a huge number.")


# --- softmax ------------------------------------------------------------------------------------


def _softmax_mistakes(x):
    yield Mistake(
        "{name} is not numerically stable: for {case} it overflows (exp(1000) is inf in float64, "
        "and inf / inf is nan). " + _STABLE_FIX,
        partial(_plain_softmax, stable=False))
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
            partial(_plain_softmax, axis=axis))
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


def check_softmax(softmax, hidden: bool = False, backend: str = "auto") -> None:
    """softmax(x) over the last axis, stable for large inputs; x (..., n) -> (..., n)."""
    spec = Spec("softmax", _t.ref_softmax, _softmax_mistakes)
    _run(spec, softmax, _softmax_cases(hidden), backend)


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
        lambda q, k: _scores(q, k, 1.0))
    yield Mistake(
        f"{{name}} divides by d_head = {d_head} instead of by its square root, sqrt({d_head}).",
        lambda q, k: _scores(q, k, d_head))
    yield Mistake(
        f"{{name}} multiplies by sqrt(d_head) instead of dividing by it: scores = "
        f"q @ k^T / sqrt({d_head}).",
        lambda q, k: _scores(q, k, 1.0 / math.sqrt(d_head)))
    if q.ndim == 4:
        n_head = q.shape[-3]
        yield Mistake(
            f"{{name}} divides by sqrt(d_model) = sqrt(n_head * d_head) = sqrt({n_head * d_head}) "
            f"for {{case}}; each head's scores are divided by sqrt(d_head) = sqrt({d_head}), the "
            "size of q's LAST axis.",
            lambda q, k: _scores(q, k, math.sqrt(n_head * d_head)))
    for axis in range(-q.ndim, -1):
        size = q.shape[axis]
        if size != d_head:
            yield Mistake(
                f"{{name}} divides by sqrt(q.shape[{axis + q.ndim}]) = sqrt({size}) for {{case}}, "
                f"but d_head is the size of the LAST axis: use sqrt(q.shape[-1]) = "
                f"sqrt({d_head}). (len(q) is the first axis, not d_head.)",
                partial(lambda q, k, size: _scores(q, k, math.sqrt(size)), size=size))
    yield Mistake(
        "{name} computes k q^T, so rows belong to keys: scores[..., i, j] must be q_i · k_j, "
        "i.e. q @ np.swapaxes(k, -1, -2) (queries along the rows).",
        lambda q, k: _scores(k, q, math.sqrt(d_head)))


def _scores_cases(hidden: bool):
    if not hidden:
        rng = _t.default_rng(1)
        return [
            Case((_normal(rng, 5, 8), _normal(rng, 5, 8)), ("q", "k")),
            Case((_normal(rng, 3, 4), _normal(rng, 6, 4)), ("q", "k"),
                 "Here seq_q = 3 and seq_k = 6: the scores are (seq_q, seq_k) = (3, 6)."),
            Case((_normal(rng, 2, 3, 5, 4), _normal(rng, 2, 3, 6, 4)), ("q", "k"),
                 _BATCHED_NOTE),
        ]
    rng = _t.default_rng(102)
    return [
        Case((_normal(rng, 1, 3), _normal(rng, 2, 3)), ("q", "k")),
        Case((_normal(rng, 7, 16), _normal(rng, 7, 16)), ("q", "k")),
        Case((_normal(rng, 4, 9, 2), _normal(rng, 4, 3, 2)), ("q", "k"), _BATCHED_NOTE),
        Case((_normal(rng, 6, 8, dtype=np.float32), _normal(rng, 6, 8, dtype=np.float32)),
             ("q", "k"), "q and k are float32 here."),
        Case((_normal(rng, 1, 2, 4, 8, scale=3.0), _normal(rng, 1, 2, 4, 8)), ("q", "k"),
             _BATCHED_NOTE),
    ]


def check_attention_scores(attention_scores, hidden: bool = False, backend: str = "auto") -> None:
    """attention_scores(q, k) = q k^T / sqrt(d_head); (..., seq_q, d_head) x (..., seq_k, d_head)
    -> (..., seq_q, seq_k)."""
    spec = Spec("attention_scores", _reference_scores, _scores_mistakes)
    _run(spec, attention_scores, _scores_cases(hidden), backend)


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
        lambda x, t: _plain_softmax(x / t, stable=False))


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


def check_softmax_temperature(softmax_with_temperature, hidden: bool = False,
                              backend: str = "auto") -> None:
    """softmax_with_temperature(x, temperature) = softmax(x / temperature) over the last axis."""
    spec = Spec("softmax_with_temperature", _reference_temperature, _temperature_mistakes)
    _run(spec, softmax_with_temperature, _temperature_cases(hidden), backend)


# --- causal mask --------------------------------------------------------------------------------


def _tri(seq, keep):
    i = np.arange(seq)[:, None]
    j = np.arange(seq)[None, :]
    return keep(i, j)


def _mask_mistakes(seq):
    yield Mistake(
        "{name} is transposed: it lets each position see the future (for {case}, the True "
        "entries sit above the diagonal). Row i is query i and may attend keys j <= i, so the "
        "True entries belong on and below the diagonal: np.tril(np.ones((seq, seq), dtype=bool)).",
        lambda s: _tri(s, lambda i, j: j >= i))
    yield Mistake(
        "{name} is off by one: it lets each position see one step into the future (key i + 1). "
        "Query i may attend keys j <= i only: np.tril(..., k=0), not k=1.",
        lambda s: _tri(s, lambda i, j: j <= i + 1))
    yield Mistake(
        "{name} marks the blocked positions with True; in this course True means 'may attend'. "
        "Flip it: query i may attend keys j <= i.",
        lambda s: _tri(s, lambda i, j: j > i))
    yield Mistake(
        "{name} blocks the diagonal: a position may attend to itself (j <= i, not j < i). Use "
        "np.tril(..., k=0), not k=-1.",
        lambda s: _tri(s, lambda i, j: j < i))
    yield Mistake(
        "{name} allows everything: it must block the future, keys j > i of query i.",
        lambda s: np.ones((s, s), dtype=bool))


def _mask_cases(hidden: bool):
    seqs = (2, 9, 17, 3) if hidden else (4, 1, 6)
    return [Case((s,), ("seq",)) for s in seqs]


def check_causal_mask(causal_mask, hidden: bool = False, backend: str = "auto") -> None:
    """causal_mask(seq) -> bool (seq, seq), True where query i may attend key j (j <= i)."""
    spec = Spec("causal_mask", _t.ref_causal_mask, _mask_mistakes, out="bool")
    _run(spec, causal_mask, _mask_cases(hidden), backend)


# --- masked scaled dot-product attention --------------------------------------------------------


def _reference_attention(q, k, v, mask=None):
    return _t.ref_attention(q, k, v, mask=mask)


def _attention_mistakes(q, k, v, mask=None):
    d_head = q.shape[-1]
    variant = partial(partial, _attention_variant)  # variant(**knobs) -> fn(q, k, v, mask)
    yield Mistake(
        f"{{name}} does not scale the scores: divide q @ k^T by sqrt(d_head) = sqrt({d_head}) "
        "before the softmax.",
        variant(divide_by=1.0))
    yield Mistake(
        f"{{name}} divides the scores by d_head = {d_head} instead of sqrt(d_head).",
        variant(divide_by=d_head))
    if q.shape[0] != d_head:
        yield Mistake(
            f"{{name}} divides by sqrt(q.shape[0]) = sqrt({q.shape[0]}) (len(q)) instead of "
            f"sqrt(d_head) = sqrt(q.shape[-1]) = sqrt({d_head}).",
            variant(divide_by=math.sqrt(q.shape[0])))
    if mask is not None:
        yield Mistake(
            "{name} sets the blocked scores to 0 instead of -inf: exp(0) = 1, so blocked keys "
            "still get weight. Use np.where(mask, scores, -np.inf) before the softmax.",
            variant(masking="zero"))
        yield Mistake(
            "{name} masks after the softmax instead of before: zeroing blocked weights leaves "
            "rows that no longer sum to 1. Set blocked scores to -inf BEFORE the softmax, "
            "so exp(-inf) = 0 and the allowed weights share the whole probability.",
            variant(masking="after"))
        yield Mistake(
            "{name} applies the mask after the softmax (putting -inf into the weights), which "
            "turns the output into inf/nan. Set blocked SCORES to -inf before the softmax.",
            variant(masking="after -inf"))
        yield Mistake(
            "{name} ignores the mask: blocked keys still get weight. Set scores to -inf where "
            "mask is False: np.where(mask, scores, -np.inf).",
            variant(masking="none"))
        yield Mistake(
            "{name} treats True in the mask as 'blocked'; in this course True means 'may "
            "attend'. Keep the scores where mask is True: np.where(mask, scores, -np.inf).",
            variant(masking="inverted"))
        yield Mistake(
            "{name} uses the mask transposed (mask[j, i] for query i and key j), which lets a "
            "position see the future under a causal mask. Row i of the mask belongs to query i: "
            "np.where(mask, scores, -np.inf) with scores of shape (..., seq_q, seq_k).",
            variant(masking="transposed"))
        yield Mistake(
            "{name} gives nan for a query whose mask row is all False (a fully masked row: it may "
            "attend to nothing). Every score in that row is -inf, so the softmax computes "
            "0 / 0. Such a row's weights, and so its output, must be all zeros: e.g. replace the "
            "row max by 0 where it is -inf, and divide by 1 where the row sum is 0.",
            variant(guard=False))
        yield Mistake(
            "{name} returns the average of all values for a query whose mask row is all False "
            "(a fully masked row): that is what a large negative number like -1e9 instead of "
            "-inf gives. A query that may attend to nothing must get all-zero weights and an "
            "all-zero output; use -inf and handle the empty row.",
            variant(masking="-1e9"))
    yield Mistake(
        "{name} uses a softmax that is not numerically stable: for {case} the scores are large, "
        "exp overflows to inf and the output becomes nan. Subtract each row's maximum score "
        "before exponentiating.",
        variant(stable=False))
    yield Mistake(
        "{name} normalizes the weights over the queries (axis -2) instead of over the keys (the "
        "last axis): each query's weights must sum to 1. Use axis=-1 in the softmax.",
        variant(axis=-2))
    yield Mistake(
        "{name} computes the scores as k q^T, so rows belong to keys; they must be "
        "q @ np.swapaxes(k, -1, -2), of shape (..., seq_q, seq_k).",
        variant(transpose_scores=True))


def _empty_row_mask(rng, batch, seq_q, seq_k):
    mask = rng.random((batch, seq_q, seq_k)) < 0.6
    mask[..., 0] = True  # every row may attend to something ...
    mask[0, 1, :] = False  # ... except query 1 of the first sequence
    return mask


def _attention_cases(hidden: bool):
    causal_note = "mask is the causal mask here: query i may attend keys 0..i."
    if not hidden:
        rng = _t.default_rng(3)
        return [
            Case((_normal(rng, 4, 8), _normal(rng, 4, 8), _normal(rng, 4, 6)), ("q", "k", "v")),
            Case((_normal(rng, 5, 8), _normal(rng, 5, 8), _normal(rng, 5, 8),
                  _t.ref_causal_mask(5)), ("q", "k", "v", "mask"), causal_note),
            Case((_normal(rng, 2, 4, 8), _normal(rng, 2, 4, 8), _normal(rng, 2, 4, 8),
                  _empty_row_mask(rng, 2, 4, 4)), ("q", "k", "v", "mask"),
                 "mask[0, 1] is all False: that query may attend to nothing, so its output row "
                 "must be all zeros (not nan)."),
        ]
    rng = _t.default_rng(104)
    padding = np.ones((2, 1, 1, 5), dtype=bool)
    padding[1, ..., 3:] = False  # the second sequence is 3 tokens long plus 2 of padding
    return [
        Case((_normal(rng, 3, 8), _normal(rng, 6, 8), _normal(rng, 6, 5), _t.ref_causal_mask(3, 6)),
             ("q", "k", "v", "mask"),
             "seq_q = 3 < seq_k = 6 here, as with a KV cache; the mask is given to you."),
        Case((_normal(rng, 2, 3, 5, 4), _normal(rng, 2, 3, 5, 4), _normal(rng, 2, 3, 5, 4),
              padding), ("q", "k", "v", "mask"),
             "mask has shape (2, 1, 1, 5) and must broadcast over heads and queries."),
        Case((_normal(rng, 2, 5, 8, dtype=np.float32), _normal(rng, 2, 5, 8, dtype=np.float32),
              _normal(rng, 2, 5, 8, dtype=np.float32), _t.ref_causal_mask(5)),
             ("q", "k", "v", "mask"), "q, k and v are float32 here."),
        Case((_normal(rng, 6, 8, scale=30.0), _normal(rng, 6, 8, scale=30.0), _normal(rng, 6, 8),
              _t.ref_causal_mask(6)), ("q", "k", "v", "mask"),
             "The scores here are large (hundreds): subtract each row's max before exp."),
        Case((_normal(rng, 3, 4), _normal(rng, 3, 4), _normal(rng, 3, 4),
              np.zeros((3, 3), dtype=bool)), ("q", "k", "v", "mask"),
             "Every entry of mask is False: every output row must be all zeros."),
        Case((_normal(rng, 1, 4), _normal(rng, 1, 4), _normal(rng, 1, 4),
              np.ones((1, 1), dtype=bool)), ("q", "k", "v", "mask")),
        Case((_normal(rng, 3, 6, 8), _normal(rng, 3, 6, 8), _normal(rng, 3, 6, 2),
              _empty_row_mask(rng, 3, 6, 6)), ("q", "k", "v", "mask"),
             "mask[0, 1] is all False: that query's output row must be all zeros."),
    ]


def check_attention(attention, hidden: bool = False, backend: str = "auto") -> None:
    """attention(q, k, v, mask=None): masked scaled dot-product attention.

    q (..., seq_q, d_head), k (..., seq_k, d_head), v (..., seq_k, d_v), mask bool broadcastable
    to (..., seq_q, seq_k) (True = may attend) -> (..., seq_q, d_v); fully masked rows give zeros.
    Called as attention(q, k, v) without a mask and attention(q, k, v, mask) with one.
    NumPy or torch functions are both accepted.
    """
    spec = Spec("attention", _reference_attention, _attention_mistakes)
    _run(spec, attention, _attention_cases(hidden), backend)


# --- layer norm ---------------------------------------------------------------------------------


def _layer_norm_mistakes(x, gamma, beta):
    variant = partial(partial, _layer_norm_variant)
    yield Mistake(
        "{name} uses the unbiased variance (dividing by d_model - 1, like np.var(..., ddof=1) or "
        "torch.var's default). Layer norm divides by d_model: np.var(x, axis=-1, keepdims=True) "
        "(torch: unbiased=False).",
        variant(ddof=1))
    yield Mistake(
        "{name} puts eps outside the square root: (x - mean) / (sqrt(var) + eps). It belongs "
        "inside: (x - mean) / sqrt(var + eps).",
        variant(eps_outside=True))
    for eps in (0.0, 1e-12, 1e-8, 1e-6, 1e-3):
        yield Mistake(
            f"{{name}} uses eps = {eps:g}; use the eps argument, 1e-5 by default, inside the "
            "square root: sqrt(var + eps).",
            variant(eps=eps))
    yield Mistake(
        "{name} does not subtract the mean: x_hat = (x - mean) / sqrt(var + eps).",
        variant(center=False))
    yield Mistake(
        "{name} uses the mean of x**2 as the variance; the variance is the mean of "
        "(x - mean)**2.",
        variant(raw_second_moment=True))
    for axis in range(-x.ndim, -1):
        yield Mistake(
            f"{{name}} normalizes along axis {axis} instead of the last axis: each vector "
            "x[..., :] (one position's d_model features) gets its own mean and variance. Use "
            "axis=-1, keepdims=True.",
            variant(axis=axis))
    yield Mistake(
        "{name} forgets to scale by gamma: return x_hat * gamma + beta.",
        variant(use_gamma=False))
    yield Mistake(
        "{name} forgets to add beta: return x_hat * gamma + beta.",
        variant(use_beta=False))
    yield Mistake(
        "{name} swaps gamma and beta: gamma scales, beta shifts (x_hat * gamma + beta).",
        variant(swap=True))


def _ln_args(rng, *shape, scale=2.0, shift=1.0, dtype=np.float64):
    d = shape[-1]
    x = _normal(rng, *shape, scale=scale, dtype=dtype) + shift
    gamma = (1.0 + 0.3 * rng.normal(size=d)).astype(dtype)
    beta = (0.5 * rng.normal(size=d)).astype(dtype)
    return x, gamma, beta


def _layer_norm_cases(hidden: bool):
    names = ("x", "gamma", "beta")
    if not hidden:
        rng = _t.default_rng(4)
        return [
            Case(_ln_args(rng, 4, 8), names),
            Case(_ln_args(rng, 2, 3, 6), names, "x is (batch, seq, d_model) = (2, 3, 6) here."),
            Case(_ln_args(rng, 3, 8, scale=1e-3, shift=0.0), names,
                 "The rows here have a tiny variance (about 1e-6), so where eps goes matters."),
        ]
    rng = _t.default_rng(105)
    constant = _ln_args(rng, 2, 5)
    constant[0][0] = 3.0  # first row constant: variance 0
    return [
        Case(constant, names, "x[0] is constant: its variance is 0 and eps keeps it finite."),
        Case(_ln_args(rng, 5, 16, dtype=np.float32), names, "x is float32 here."),
        Case(_ln_args(rng, 3, 2), names),
        Case(_ln_args(rng, 4, 10, scale=1e3, shift=-50.0), names),
        Case(_ln_args(rng, 2, 2, 3, 8), names),
    ]


def check_layer_norm(layer_norm, hidden: bool = False, backend: str = "auto") -> None:
    """layer_norm(x, gamma, beta) over the last axis, biased variance, eps=1e-5 inside the sqrt;
    x (..., d_model), gamma and beta (d_model,)."""
    spec = Spec("layer_norm", _t.ref_layer_norm, _layer_norm_mistakes)
    _run(spec, layer_norm, _layer_norm_cases(hidden), backend)


# --- GELU ---------------------------------------------------------------------------------------


_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)


def _gelu_tanh(x, c=0.044715, k=_SQRT_2_OVER_PI, half=0.5, power=3):
    return half * x * (1.0 + np.tanh(k * (x + c * x**power)))


def _gelu_mistakes(x):
    exact = np.frompyfunc(lambda z: 0.5 * z * (1.0 + _t.erf(z / math.sqrt(2.0))), 1, 1)
    yield Mistake(
        "{name} computes the exact GELU, x * Phi(x) with erf; the course (like GPT-2) uses the "
        "tanh approximation 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))).",
        lambda x: exact(x).astype(np.float64))
    yield Mistake(
        "{name} computes a ReLU, max(x, 0); GELU is 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 "
        "x^3))), smooth and slightly negative for small negative x.",
        lambda x: np.maximum(x, 0.0))
    yield Mistake(
        "{name} uses the sigmoid approximation x * sigmoid(1.702 x); use the tanh form "
        "0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))).",
        lambda x: x / (1.0 + np.exp(-1.702 * x)))
    yield Mistake("{name} is missing the factor 0.5 in front: 0.5 x (1 + tanh(...)).",
                  partial(_gelu_tanh, half=1.0))
    yield Mistake("{name} uses sqrt(2 pi); the constant is sqrt(2 / pi) (about 0.7979).",
                  partial(_gelu_tanh, k=math.sqrt(2.0 * math.pi)))
    yield Mistake("{name} leaves out the cubic term: tanh(sqrt(2/pi) (x + 0.044715 x^3)).",
                  partial(_gelu_tanh, c=0.0))
    yield Mistake("{name} uses x^2 in the cubic term; it is 0.044715 x^3.",
                  partial(_gelu_tanh, power=2))
    for c in (0.44715, 0.0044715):
        yield Mistake(f"{{name}} uses the coefficient {c}; it is 0.044715.",
                      partial(_gelu_tanh, c=c))


def _gelu_cases(hidden: bool):
    if not hidden:
        rng = _t.default_rng(5)
        return [Case((np.linspace(-5.0, 5.0, 21),), ("x",)),
                Case((_normal(rng, 3, 7, scale=2.0),), ("x",))]
    rng = _t.default_rng(106)
    return [Case((_normal(rng, 4, 5, scale=3.0, dtype=np.float32),), ("x",), "x is float32 here."),
            Case((np.linspace(-30.0, 30.0, 13),), ("x",), "Large |x|: GELU(x) is about x or 0."),
            Case((_normal(rng, 2, 3, 4),), ("x",))]


def check_gelu(gelu, hidden: bool = False, backend: str = "auto") -> None:
    """gelu(x) = 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))), elementwise."""
    spec = Spec("gelu", _t.ref_gelu, _gelu_mistakes)
    _run(spec, gelu, _gelu_cases(hidden), backend)


# --- multi-head attention -----------------------------------------------------------------------


def _mha_mistakes(x, w_qkv, b_qkv, w_out, b_out, n_head):
    d_model = x.shape[-1]
    d_head = d_model // n_head
    variant = partial(partial, _mha_variant)
    yield Mistake(
        f"{{name}} divides the scores by sqrt(d_model) = sqrt({d_model}) instead of sqrt(d_head) "
        f"= sqrt({d_head}): each head works in d_head = d_model / n_head dimensions.",
        variant(scale="d_model"))
    yield Mistake(
        f"{{name}} does not scale the scores: divide each head's q @ k^T by sqrt(d_head) = "
        f"sqrt({d_head}).",
        variant(scale="none"))
    yield Mistake(
        "{name} is not causal: it lets a position see the future. A decoder's self-attention "
        "masks keys j > i for query i (causal mask, -inf before the softmax).",
        variant(causal="none"))
    yield Mistake(
        "{name} uses the causal mask transposed, so each position sees the future instead of the "
        "past: query i may attend keys j <= i.",
        variant(causal="transposed"))
    for order in permutations(range(3)):
        if order != (0, 1, 2):
            used = ", ".join("QKV"[i] for i in order)
            yield Mistake(
                f"{{name}} takes q, k, v from the wrong columns of w_qkv (it used [{used}]): the "
                "columns are [Q | K | V], so q = qkv[..., :d_model], k = qkv[..., d_model:"
                "2*d_model], v = qkv[..., 2*d_model:].",
                variant(order=order))
    yield Mistake(
        "{name} splits the heads with a plain reshape to (..., n_head, seq, d_head), which mixes "
        "positions and features. Reshape to (..., seq, n_head, d_head), then swap the seq and "
        "n_head axes.",
        variant(split_ok=False))
    yield Mistake(
        "{name} merges the heads with a plain reshape from (..., n_head, seq, d_head), which mixes "
        "positions. Swap the n_head and seq axes first, then reshape to (..., seq, d_model).",
        variant(merge_ok=False))
    yield Mistake("{name} leaves out the output projection: end with out @ w_out + b_out.",
                  variant(out_proj=False))
    yield Mistake("{name} leaves out the bias b_qkv: qkv = x @ w_qkv + b_qkv.",
                  variant(qkv_bias=False))
    yield Mistake("{name} leaves out the bias b_out: out @ w_out + b_out.",
                  variant(out_bias=False))


def _mha_args(rng, shape, n_head, dtype=np.float64):
    d = shape[-1]
    return (_normal(rng, *shape, dtype=dtype), _normal(rng, d, 3 * d, scale=0.4, dtype=dtype),
            _normal(rng, 3 * d, scale=0.1, dtype=dtype), _normal(rng, d, d, scale=0.3, dtype=dtype),
            _normal(rng, d, scale=0.1, dtype=dtype), n_head)


def _mha_cases(hidden: bool):
    names = ("x", "w_qkv", "b_qkv", "w_out", "b_out", "n_head")
    if not hidden:
        rng = _t.default_rng(6)
        return [Case(_mha_args(rng, (5, 12), 3), names),
                Case(_mha_args(rng, (2, 6, 8), 2), names, "x is (batch, seq, d_model) here.")]
    rng = _t.default_rng(107)
    return [Case(_mha_args(rng, (4, 16), 4), names),
            Case(_mha_args(rng, (3, 8), 1), names, "n_head = 1: one head of size d_model."),
            Case(_mha_args(rng, (2, 5, 12), 3, dtype=np.float32), names, "x is float32 here."),
            Case(_mha_args(rng, (1, 8), 2), names, "seq = 1 here.")]


def check_multi_head_attention(multi_head_attention, hidden: bool = False,
                               backend: str = "auto") -> None:
    """multi_head_attention(x, w_qkv, b_qkv, w_out, b_out, n_head): causal self-attention.

    x (..., seq, d_model); w_qkv (d_model, 3*d_model) with columns [Q | K | V]; b_qkv
    (3*d_model,); w_out (d_model, d_model); b_out (d_model,) -> (..., seq, d_model).
    """
    spec = Spec("multi_head_attention", _t.ref_multi_head_attention, _mha_mistakes,
                tol32="float32_model")
    _run(spec, multi_head_attention, _mha_cases(hidden), backend)


# --- decoder block ------------------------------------------------------------------------------


def _block_mistakes(x, params, n_head):
    variant = partial(partial, _block_variant)
    yield Mistake(
        "{name} is missing the residual connection around the attention: the first half of the "
        "block is x = x + attention(ln_1(x)), adding to x rather than replacing it.",
        variant(attn_residual=False))
    yield Mistake(
        "{name} is missing the residual connection around the MLP: the second half of the block "
        "is x = x + mlp(ln_2(x)), adding to x rather than replacing it.",
        variant(mlp_residual=False))
    yield Mistake(
        "{name} is missing both residual connections: x = x + attention(ln_1(x)), then "
        "x = x + mlp(ln_2(x)).",
        variant(attn_residual=False, mlp_residual=False))
    yield Mistake(
        "{name} is a post-LN block (layer norm after the residual add); this course uses pre-LN, "
        "like GPT-2: x = x + attention(ln_1(x)), then x = x + mlp(ln_2(x)).",
        variant(norm="post"))
    yield Mistake(
        "{name} normalizes the residual stream itself (x = ln_1(x), then x = x + attention(x)). "
        "Only the sublayer's input is normalized: x = x + attention(ln_1(x)).",
        variant(norm="stream"))
    yield Mistake(
        "{name} leaves out the layer norms: x = x + attention(ln_1(x)), then "
        "x = x + mlp(ln_2(x)).",
        variant(norm="none"))
    yield Mistake(
        "{name} swaps the two layer norms: ln_1 (ln1_gamma, ln1_beta) goes before the attention, "
        "ln_2 before the MLP.",
        variant(swap_norms=True))
    yield Mistake(
        "{name} runs the MLP before the attention; the attention comes first.",
        variant(mlp_first=True))
    yield Mistake(
        "{name} does not use a causal mask in the attention, so a position sees the future.",
        variant(causal=False))


def _block_args(rng, shape, n_head, dtype=np.float64):
    d = shape[-1]

    def w(*s, scale=0.2):
        return _normal(rng, *s, scale=scale, dtype=dtype)

    params = dict(ln1_gamma=1.0 + w(d, scale=0.1), ln1_beta=w(d, scale=0.1),
                  w_qkv=w(d, 3 * d, scale=0.3), b_qkv=w(3 * d, scale=0.05),
                  w_out=w(d, d), b_out=w(d, scale=0.05),
                  ln2_gamma=1.0 + w(d, scale=0.1), ln2_beta=w(d, scale=0.1),
                  w_fc=w(d, 4 * d), b_fc=w(4 * d, scale=0.05),
                  w_proj=w(4 * d, d), b_proj=w(d, scale=0.05))
    return (_normal(rng, *shape, dtype=dtype), params, n_head)


def _block_cases(hidden: bool):
    names = ("x", "params", "n_head")
    if not hidden:
        rng = _t.default_rng(7)
        return [Case(_block_args(rng, (5, 8), 2), names),
                Case(_block_args(rng, (2, 4, 12), 3), names, "x is (batch, seq, d_model) here.")]
    rng = _t.default_rng(108)
    return [Case(_block_args(rng, (6, 16), 4, dtype=np.float32), names, "x is float32 here."),
            Case(_block_args(rng, (1, 8), 1), names, "seq = 1 and n_head = 1 here."),
            Case(_block_args(rng, (3, 6, 8), 4), names)]


def check_decoder_block(decoder_block, hidden: bool = False, backend: str = "auto") -> None:
    """decoder_block(x, params, n_head): pre-LN block, x + attn(ln_1(x)) then x + mlp(ln_2(x)).

    params holds ln1_gamma ln1_beta w_qkv b_qkv w_out b_out ln2_gamma ln2_beta w_fc b_fc w_proj
    b_proj (the qkv.np layout); x (..., seq, d_model) -> (..., seq, d_model).
    """
    spec = Spec("decoder_block", _t.ref_decoder_block, _block_mistakes, tol32="float32_model")
    _run(spec, decoder_block, _block_cases(hidden), backend)


# --- next-token targets -------------------------------------------------------------------------


def _reference_shift(ids):
    return ids[:-1], ids[1:]


def _shift_mistakes(ids):
    not_shifted = ("{name}'s targets are not shifted by one: the target at position t is the "
                   "NEXT token, ids[t + 1]. Return inputs = ids[:-1] and targets = ids[1:].")
    yield Mistake(not_shifted, lambda ids: (ids, ids))
    yield Mistake(not_shifted, lambda ids: (ids[:-1], ids[:-1]))
    yield Mistake(not_shifted, lambda ids: (ids[1:], ids[1:]))
    yield Mistake(
        "{name} shifted the wrong way: it predicts the PREVIOUS token. The target at position t "
        "is the next token, ids[t + 1]: inputs = ids[:-1], targets = ids[1:].",
        lambda ids: (ids[1:], ids[:-1]))
    yield Mistake(
        "{name} shifted by two; the targets are shifted by one: inputs = ids[:-1], "
        "targets = ids[1:].",
        lambda ids: (ids[:-2], ids[2:]))
    yield Mistake(
        "{name} uses np.roll, which wraps the first token around to the end as the last target. "
        "Drop the last position instead: inputs = ids[:-1], targets = ids[1:].",
        lambda ids: (ids, np.roll(ids, -1)))
    yield Mistake(
        "{name} is not shifted by one correctly: the inputs are ids[:-1] (every token but the "
        "last), the targets ids[1:] (every token but the first).",
        lambda ids: (ids, ids[1:]))


def _shift_cases(hidden: bool):
    if not hidden:
        rng = _t.default_rng(8)
        return [Case((np.array([5, 2, 7, 1, 9, 3]),), ("ids",)),
                Case((rng.integers(0, 50, size=10),), ("ids",))]
    rng = _t.default_rng(109)
    return [Case((np.array([4, 8]),), ("ids",), "With two tokens there is one (input, target)."),
            Case((rng.integers(0, 65, size=33),), ("ids",)),
            Case((rng.integers(0, 1000, size=12).astype(np.int32),), ("ids",),
                 "ids are int32 here.")]


def check_shift_targets(make_targets, hidden: bool = False, backend: str = "auto") -> None:
    """make_targets(ids) -> (inputs, targets) = (ids[:-1], ids[1:]); ids (seq,) integers."""
    spec = Spec("make_targets", _reference_shift, _shift_mistakes, out="int_pair")
    _run(spec, make_targets, _shift_cases(hidden), backend)


# --- cross-entropy ------------------------------------------------------------------------------


def _log_probs(logits):
    m = np.max(logits, axis=-1, keepdims=True)
    return logits - m - np.log(np.sum(np.exp(logits - m), axis=-1, keepdims=True))


def _picked(logp, targets):
    return np.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]


def _ce_mistakes(logits, targets):
    yield Mistake(
        "{name} sums the losses instead of averaging them: return the mean of -log p(target) "
        "over all positions.",
        lambda l, t: -np.sum(_picked(_log_probs(l), t)))
    yield Mistake(
        "{name} is missing the minus sign: the loss is -log p(target), which is >= 0.",
        lambda l, t: np.mean(_picked(_log_probs(l), t)))
    yield Mistake(
        "{name} uses log base 2; cross-entropy here uses the natural log (np.log).",
        lambda l, t: -np.mean(_picked(_log_probs(l), t)) / math.log(2.0))
    yield Mistake(
        "{name} uses log base 10; cross-entropy here uses the natural log (np.log).",
        lambda l, t: -np.mean(_picked(_log_probs(l), t)) / math.log(10.0))
    yield Mistake(
        "{name} is not numerically stable: for {case} the logits are large, exp overflows and the "
        "loss becomes nan or inf. Use log-sum-exp: -log p[t] = logsumexp(logits) - logits[t], "
        "with the row maximum subtracted inside the exp.",
        lambda l, t: -np.mean(np.log(_picked(_plain_softmax(l, stable=False), t))))
    yield Mistake(
        "{name} takes the log of the softmax: for {case} the logits are large, the target's "
        "probability underflows to 0 and log(0) = -inf. Compute the log-probabilities directly "
        "with log-sum-exp: logits - m - log(sum(exp(logits - m))), m the row maximum.",
        lambda l, t: -np.mean(np.log(_picked(_plain_softmax(l), t))))
    yield Mistake(
        "{name} averages -log p over every vocabulary entry; it should pick only the target's: "
        "-log p[i, targets[i]] for each position i, then the mean.",
        lambda l, t: -np.mean(_log_probs(l)))
    yield Mistake(
        "{name} indexes the log-probabilities with [:, targets], which takes every row's entries "
        "for every target (an (n, n) block). Pick one entry per row: "
        "logp[np.arange(n), targets].",
        lambda l, t: -np.mean(_log_probs(l.reshape(-1, l.shape[-1]))[:, t.reshape(-1)]))
    yield Mistake(
        "{name} uses the raw logit of the target instead of its log-probability: apply "
        "log-softmax first (subtract the log-sum-exp of the row).",
        lambda l, t: -np.mean(_picked(l, t)))
    if logits.ndim == 2:
        yield Mistake(
            "{name} applies the softmax over the wrong axis (the positions); normalize over the "
            "vocabulary, the last axis.",
            lambda l, t: -np.mean(_picked(_log_probs(l.T).T, t)))
    if logits.ndim == 3:
        yield Mistake(
            "{name} sums over the sequence and averages over the batch; average over every "
            "position of every sequence.",
            lambda l, t: -np.mean(np.sum(_picked(_log_probs(l), t), axis=-1)))


def _ce_args(rng, shape, scale=2.0, dtype=np.float64):
    return (_normal(rng, *shape, scale=scale, dtype=dtype),
            rng.integers(0, shape[-1], size=shape[:-1]))


def _ce_cases(hidden: bool):
    names = ("logits", "targets")
    if not hidden:
        rng = _t.default_rng(9)
        return [Case(_ce_args(rng, (6, 10)), names),
                Case(_ce_args(rng, (2, 4, 7)), names,
                     "logits are (batch, seq, vocab) here: average over every position."),
                Case(_ce_args(rng, (3, 5), scale=1000.0), names,
                     "The logits here are large (hundreds to thousands).")]
    rng = _t.default_rng(110)
    return [Case(_ce_args(rng, (8, 12), dtype=np.float32), names, "logits are float32 here."),
            Case(_ce_args(rng, (5, 2)), names, "vocab = 2 here."),
            Case(_ce_args(rng, (1, 4)), names, "A single position here."),
            Case(_ce_args(rng, (3, 5, 11), scale=300.0), names,
                 "Large logits, (batch, seq, vocab)."),
            Case(_ce_args(rng, (4, 9)), names)]


def check_cross_entropy(cross_entropy, hidden: bool = False, backend: str = "auto") -> None:
    """cross_entropy(logits, targets): mean of -log softmax(logits)[target], stable.

    logits (..., vocab) floats; targets (...) integers -> a single number.
    """
    spec = Spec("cross_entropy", _t.ref_cross_entropy, _ce_mistakes, out="scalar")
    _run(spec, cross_entropy, _ce_cases(hidden), backend)
