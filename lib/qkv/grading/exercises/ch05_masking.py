"""Chapter 5, masking: the causal mask, masked scaled dot-product attention, next-token targets
and the cross-entropy over every position (why one masked sequence trains T predictions at
once)."""

import math
from functools import partial

import numpy as np

from .. import _trusted as _t
from ..engine import Case, Mistake, _normal
from ..exercise import Exercise
from ..kinds import Array
from ..variants import attention_variant, plain_softmax

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


CAUSAL_MASK = Exercise(
    name="causal_mask",
    reference=_t.ref_causal_mask,
    visible=lambda: _mask_cases(False),
    hidden=lambda: _mask_cases(True),
    mistakes=_mask_mistakes,
    output=Array("bool"),
    doc='causal_mask(seq) -> bool (seq, seq), True where query i may attend key j (j <= i).',
)


# --- masked scaled dot-product attention --------------------------------------------------------


def _reference_attention(q, k, v, mask=None):
    return _t.ref_attention(q, k, v, mask=mask)


def _attention_mistakes(q, k, v, mask=None):
    d_head = q.shape[-1]
    variant = partial(partial, attention_variant)  # variant(**knobs) -> fn(q, k, v, mask)
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
            # chapter 4's stable softmax matters here too: caught now, not by the hidden tests
            Case((_normal(rng, 4, 8, scale=30.0), _normal(rng, 4, 8, scale=30.0),
                  _normal(rng, 4, 6), _t.ref_causal_mask(4)), ("q", "k", "v", "mask"),
                 "The scores here are large (hundreds): subtract each row's max before exp."),
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


ATTENTION = Exercise(
    name="attention",
    reference=_reference_attention,
    visible=lambda: _attention_cases(False),
    hidden=lambda: _attention_cases(True),
    mistakes=_attention_mistakes,
    doc='attention(q, k, v, mask=None): masked scaled dot-product attention. q (..., seq_q, '
        'd_head), k (..., seq_k, d_head), v (..., seq_k, d_v), mask bool broadcastable to (..., '
        'seq_q, seq_k) (True = may attend) -> (..., seq_q, d_v); fully masked rows give zeros. '
        'Called as attention(q, k, v) without a mask and attention(q, k, v, mask) with one. '
        'NumPy or torch functions are both accepted.',
)


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


MAKE_TARGETS = Exercise(
    name="make_targets",
    check="check_shift_targets",
    reference=_reference_shift,
    visible=lambda: _shift_cases(False),
    hidden=lambda: _shift_cases(True),
    mistakes=_shift_mistakes,
    output=Array("int_pair"),
    doc='make_targets(ids) -> (inputs, targets) = (ids[:-1], ids[1:]); ids (seq,) integers.',
)


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
        lambda l, t: -np.mean(np.log(_picked(plain_softmax(l, stable=False), t))))
    yield Mistake(
        "{name} takes the log of the softmax: for {case} the logits are large, the target's "
        "probability underflows to 0 and log(0) = -inf. Compute the log-probabilities directly "
        "with log-sum-exp: logits - m - log(sum(exp(logits - m))), m the row maximum.",
        lambda l, t: -np.mean(np.log(_picked(plain_softmax(l), t))))
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


CROSS_ENTROPY = Exercise(
    name="cross_entropy",
    reference=_t.ref_cross_entropy,
    visible=lambda: _ce_cases(False),
    hidden=lambda: _ce_cases(True),
    mistakes=_ce_mistakes,
    output=Array("scalar"),
    doc='cross_entropy(logits, targets): mean of -log softmax(logits)[target], stable. logits '
        '(..., vocab) floats; targets (...) integers -> a single number.',
)


EXERCISES = [CAUSAL_MASK, ATTENTION, MAKE_TARGETS, CROSS_ENTROPY]


# --- a sliding-window mask (derived from the chapter's rule; no finished code in the book) -----


def _reference_window(seq, window):
    # No qkv.np function builds it; the chapter's rule: j <= i and i - j < window.
    return _tri(seq, lambda i, j: (j <= i) & (i - j < window))


def _window_mistakes(seq, window):
    yield Mistake(
        "{name} is off by one: for {case} it lets each query see window + 1 keys. Query i may "
        "see keys i - window + 1, ..., i (i - j < window, not i - j <= window).",
        lambda s, w: _tri(s, lambda i, j: (j <= i) & (i - j <= w)))
    yield Mistake(
        "{name} is off by one: for {case} it lets each query see only window - 1 keys. The "
        "window counts the query itself: keys i - window + 1, ..., i (i - j < window).",
        lambda s, w: _tri(s, lambda i, j: (j <= i) & (i - j < w - 1)))
    yield Mistake(
        "{name} looks into the future: for {case} it allows keys after the query. A sliding "
        "window is still causal: j <= i AND i - j < window.",
        lambda s, w: _tri(s, lambda i, j: abs(i - j) < w))
    yield Mistake(
        "{name} ignores the window: for {case} it returned the plain causal mask. Also block "
        "keys too far back: i - j < window.",
        lambda s, w: _tri(s, lambda i, j: j <= i))
    yield Mistake(
        "{name} is transposed: for {case} the band sits above the diagonal. Row i is query i; "
        "it may attend keys j with j <= i and i - j < window.",
        lambda s, w: _tri(s, lambda i, j: (j >= i) & (j - i < w)))
    yield Mistake(
        "{name} marks the blocked positions with True; in this course True means 'may attend'.",
        lambda s, w: ~_tri(s, lambda i, j: (j <= i) & (i - j < w)))


def _window_cases(hidden: bool):
    pairs = ((1, 1), (8, 2), (7, 10), (10, 4), (6, 6)) if hidden else ((5, 3), (4, 1), (7, 4))
    return [Case((s, w), ("seq", "window"),
                 "window >= seq here: nothing is too far back." if w >= s else
                 "window = 1 here: each query sees only itself." if w == 1 else "")
            for s, w in pairs]


SLIDING_WINDOW_MASK = Exercise(
    name="sliding_window_mask",
    reference=_reference_window,
    visible=lambda: _window_cases(False),
    hidden=lambda: _window_cases(True),
    mistakes=_window_mistakes,
    output=Array("bool"),
    doc="sliding_window_mask(seq, window) -> bool (seq, seq), True where query i may attend key "
        "j: j <= i and i - j < window.",
)

EXERCISES.append(SLIDING_WINDOW_MASK)
