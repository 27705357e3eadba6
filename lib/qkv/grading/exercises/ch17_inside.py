"""Chapter 17, inside a trained model: the previous-token score, the induction score, a head
ablation and the logit lens, each on NumPy arrays (torch tensors are accepted too)."""

import numpy as np

from .. import _trusted as _t
from ..engine import Case, Mistake, _normal
from ..exercise import Exercise

# --- inputs: causal attention patterns ---------------------------------------------------------


def _patterns(rng, *lead, seq, dtype=np.float64):
    """Random causal attention weights (..., seq, seq): rows are distributions over keys <= t."""
    scores = _normal(rng, *lead, seq, seq, scale=2.0)
    scores = np.where(np.tril(np.ones((seq, seq), dtype=bool)), scores, -np.inf)
    e = np.exp(scores - scores.max(axis=-1, keepdims=True))
    return (e / e.sum(axis=-1, keepdims=True)).astype(dtype)


def _diagonal_mean(pattern, offset, first_query, divide_by=None):
    """Mean over the batch axes and the queries t >= first_query of pattern[..., t, t + offset]
    -> (n_head,); divide_by replaces the number of queries in the mean."""
    n_head, seq = pattern.shape[-3], pattern.shape[-1]
    t = np.arange(max(first_query, -offset, 0), min(seq, seq - offset))
    picked = pattern[..., t, t + offset].reshape(-1, n_head, len(t))  # (batch, n_head, queries)
    total = picked.sum(axis=(0, 2))
    return total / (picked.shape[0] * (len(t) if divide_by is None else divide_by))


def _drop_last_query(pattern, offset, first_query):
    """_diagonal_mean without the last query t = seq - 1 (a range that stops one short)."""
    n_head, seq = pattern.shape[-3], pattern.shape[-1]
    t = np.arange(first_query, seq - 1)
    return pattern[..., t, t + offset].reshape(-1, n_head, len(t)).mean(axis=(0, 2))


# --- previous-token score ----------------------------------------------------------------------


def _prev_reference(pattern):
    return _diagonal_mean(pattern, -1, 1)


def _prev_mistakes(pattern):
    seq = pattern.shape[-1]
    yield Mistake(
        "{name} reads the main diagonal (key t, the query's own token); a previous-token head "
        "looks at key t - 1: the diagonal just below, pattern[..., t, t - 1].",
        lambda p: _diagonal_mean(p, 0, 0))
    yield Mistake(
        "{name} reads the main diagonal (key t, the query's own token); a previous-token head "
        "looks at key t - 1: the diagonal just below, pattern[..., t, t - 1].",
        lambda p: _diagonal_mean(p, 0, 1))
    yield Mistake(
        "{name} sums the diagonal over the queries instead of averaging it: a perfect "
        "previous-token head must score 1, so divide by the seq - 1 queries (and the batch).",
        lambda p: _diagonal_mean(p, -1, 1, divide_by=1))
    yield Mistake(
        "{name} reads the diagonal above the main one (key t + 1): the causal mask makes it 0. "
        "The previous token is key t - 1, the diagonal BELOW: np.diagonal(p, offset=-1, "
        "axis1=-2, axis2=-1).",
        lambda p: np.zeros(p.shape[-3]))
    yield Mistake(
        "{name} reads key t - 2, two tokens back; the previous token is key t - 1.",
        lambda p: _diagonal_mean(p, -2, 2))
    yield Mistake(
        f"{{name}} divides by seq = {seq} instead of the seq - 1 = {seq - 1} queries that have a "
        "previous token (query 0 has none): average over t = 1..seq-1.",
        lambda p: _diagonal_mean(p, -1, 1, divide_by=seq))
    yield Mistake(
        "{name} leaves out the last query, t = seq - 1 (range(1, seq - 1) stops one short). "
        "Average over every t = 1..seq-1.",
        lambda p: _drop_last_query(p, -1, 1))


def _prev_cases(hidden: bool):
    names = ("pattern",)
    if not hidden:
        rng = _t.default_rng(17)
        return [Case((_patterns(rng, 3, 4, seq=7),), names,
                     "pattern is (batch, n_head, seq, seq) = (3, 4, 7, 7)."),
                Case((_patterns(rng, 2, seq=5),), names,
                     "pattern is (n_head, seq, seq) = (2, 5, 5): no batch axis."),
                Case((_patterns(rng, 2, 3, 4, seq=6),), names,
                     "pattern has two batch axes here: (2, 3, n_head=4, 6, 6). Average over "
                     "all of them, e.g. after reshape(-1, n_head, ...).")]
    rng = _t.default_rng(117)
    return [Case((_patterns(rng, 2, 3, 6, seq=9),), names,
                 "pattern has two batch axes here: (2, 3, n_head=6, 9, 9)."),
            Case((_patterns(rng, 1, 1, seq=2),), names, "seq = 2: one query has a previous token."),
            Case((_patterns(rng, 4, 2, seq=12, dtype=np.float32),), names,
                 "pattern is float32 here.")]


PREVIOUS_TOKEN_SCORE = Exercise(
    name="previous_token_score",
    reference=_prev_reference,
    visible=lambda: _prev_cases(False),
    hidden=lambda: _prev_cases(True),
    mistakes=_prev_mistakes,
    doc="previous_token_score(pattern): pattern (..., n_head, seq, seq) attention weights -> "
        "(n_head,) the mean of pattern[..., t, t - 1] over t = 1..seq-1 and every batch axis.",
)


# --- induction score ---------------------------------------------------------------------------


def _ind_reference(pattern, half):
    return _diagonal_mean(pattern, 1 - half, half)




def _ind_mistakes(pattern, half):
    seq = pattern.shape[-1]
    yield Mistake(
        "{name} is off by one: it reads key t - half, the earlier copy of the query's own token "
        "(a duplicate-token head). An induction head looks at the token AFTER that copy: key "
        "t - half + 1.",
        lambda p, n: _diagonal_mean(p, -n, n))
    yield Mistake(
        "{name} is off by one the other way: it reads key t - half + 2. The token after the "
        "earlier copy of x_t is at t - half + 1.",
        lambda p, n: _diagonal_mean(p, 2 - n, n))
    yield Mistake(
        "{name} takes the score over first-half queries too: query half - 1 has no earlier copy "
        "of its token. Average over the second half only, t = half..seq-1.",
        lambda p, n: _diagonal_mean(p, 1 - n, n - 1))
    yield Mistake(
        "{name} averages over queries from t = 1, as the previous-token score does, instead of "
        "the second half only: for t < half - 1 the key t - half + 1 is negative, NumPy wraps "
        "it to the end of the row (a masked 0), and first-half queries have no earlier copy "
        "anyway. Average over t = half..seq-1.",
        lambda p, n: _diagonal_mean(p, 1 - n, 1, divide_by=p.shape[-1] - 1))
    yield Mistake(
        "{name} averages over every query t = 0..seq-1 instead of the second half only: for "
        "t < half - 1 the key t - half + 1 is negative, NumPy wraps it to the end of the row "
        "(a masked 0), and first-half queries have no earlier copy anyway. Average over "
        "t = half..seq-1.",
        lambda p, n: _diagonal_mean(p, 1 - n, 0, divide_by=p.shape[-1]))
    yield Mistake(
        "{name} starts at query half + 1 and leaves out t = half, the first token of the "
        "repeat: its earlier copy is key 0, and the token after that copy is key 1. Average "
        "over every t = half..seq-1.",
        lambda p, n: _diagonal_mean(p, 1 - n, n + 1))
    yield Mistake(
        "{name} leaves out the last query, t = seq - 1. Its token's earlier copy is at half - 1 "
        "and the token after that copy is key half, the first token of the repeat: a key like "
        "any other. Average over every t = half..seq-1.",
        lambda p, n: _drop_last_query(p, 1 - n, n))
    yield Mistake(
        f"{{name}} divides by seq = {seq}, as if every query counted; only the seq - half "
        f"second-half queries t = half..seq-1 do.",
        lambda p, n: _diagonal_mean(p, 1 - n, n, divide_by=p.shape[-1]))
    yield Mistake(
        "{name} reads above the diagonal (offset +(half - 1), keys in the future), which the "
        "causal mask makes 0. The token after the earlier copy lies in the past: key "
        "t - half + 1, np.diagonal(p, offset=1 - half, axis1=-2, axis2=-1).",
        lambda p, n: np.zeros(p.shape[-3]))


def _ind_cases(hidden: bool):
    names = ("pattern", "half")
    if not hidden:
        rng = _t.default_rng(18)
        return [Case((_patterns(rng, 3, 4, seq=10), 5), names,
                     "pattern is (batch, n_head, seq, seq) = (3, 4, 10, 10), half = 5."),
                Case((_patterns(rng, 2, seq=12), 6), names,
                     "pattern is (n_head, seq, seq) = (2, 12, 12): no batch axis; half = 6."),
                Case((_patterns(rng, 2, 2, 3, seq=8), 4), names,
                     "pattern has two batch axes here: (2, 2, n_head=3, 8, 8); half = 4. "
                     "Average over all of them, e.g. after reshape(-1, n_head, ...).")]
    rng = _t.default_rng(118)
    return [Case((_patterns(rng, 2, 2, 3, seq=16), 8), names,
                 "pattern has two batch axes here: (2, 2, n_head=3, 16, 16); half = 8."),
            Case((_patterns(rng, 5, 1, seq=4), 2), names, "half = 2: the shortest repeat."),
            Case((_patterns(rng, 2, 4, seq=14, dtype=np.float32), 7), names,
                 "pattern is float32 here.")]


INDUCTION_SCORE = Exercise(
    name="induction_score",
    reference=_ind_reference,
    visible=lambda: _ind_cases(False),
    hidden=lambda: _ind_cases(True),
    mistakes=_ind_mistakes,
    doc="induction_score(pattern, half): pattern (..., n_head, seq, seq) on sequences whose "
        "second half repeats the first (seq = 2 * half) -> (n_head,) the mean of "
        "pattern[..., t, t - half + 1] over t = half..seq-1 and every batch axis.",
)


# --- head ablation -----------------------------------------------------------------------------


def _ablate(z, head, axis):
    out = np.array(z, copy=True)
    index = [slice(None)] * out.ndim
    index[axis] = head
    out[tuple(index)] = 0
    return out


def _mean_ablate(z, head, axes):
    out = np.array(z, copy=True)
    out[..., head, :, :] = z[..., head, :, :].mean(axis=axes, keepdims=True)
    return out


def _ablate_mistakes(z, head):
    mean_ablation = ("{name} replaces head `head` by its mean: that is mean ablation (the "
                     "chapter's head_ablation(layer, h, how=\"mean\")). This exercise asks for "
                     "zero ablation: every entry of z[..., head, :, :] becomes 0.")
    yield Mistake(mean_ablation, lambda z, h: _mean_ablate(z, h, tuple(range(z.ndim - 3))))
    yield Mistake(mean_ablation, lambda z, h: _mean_ablate(z, h, None))
    yield Mistake(
        "{name} zeroes z[:, head], axis 1: that is the head axis only when z has exactly one "
        "batch axis. Count from the end instead, where the layout is fixed: z is "
        "(..., n_head, seq, d_head), so head h is z[..., h, :, :].",
        lambda z, h: _ablate(z, h, 1))
    yield Mistake(
        "{name} zeroes position `head` of the sequence (z[..., head, :]), the wrong axis: z is "
        "(..., n_head, seq, d_head), so head h is z[..., h, :, :].",
        lambda z, h: _ablate(z, h, -2))
    yield Mistake(
        "{name} zeroes entry `head` of d_head (z[..., head]), the wrong axis: head h is "
        "z[..., h, :, :] of z (..., n_head, seq, d_head).",
        lambda z, h: _ablate(z, h, -1))
    yield Mistake(
        "{name} zeroes sequence `head` of the batch (z[head]), the wrong axis: head h is "
        "z[..., h, :, :] of z (..., n_head, seq, d_head).",
        lambda z, h: _ablate(z, h, 0))
    yield Mistake(
        "{name} keeps only head `head` and zeroes all the others; ablation removes that one "
        "head and keeps the rest.",
        lambda z, h: z - _ablate(z, h, -3))


def _ablate_cases(hidden: bool):
    names = ("z", "head")
    if not hidden:
        rng = _t.default_rng(19)
        return [Case((_normal(rng, 4, 3, 5, 6), 2), names,
                     "z is (batch, n_head, seq, d_head) = (4, 3, 5, 6); head = 2."),
                Case((_normal(rng, 2, 3, 7, 4, 5), 1), names,
                     "z has two batch axes here: (2, 3, n_head=7, seq=4, d_head=5); head = 1.")]
    rng = _t.default_rng(119)
    return [Case((_normal(rng, 2, 2, 4, 6, 3), 3), names,
                 "z has two batch axes here: (2, 2, n_head=4, 6, 3); head = 3."),
            Case((_normal(rng, 5, 9, 4), 0), names, "z has no batch axis: (n_head=5, 9, 4)."),
            Case((_normal(rng, 3, 6, 8, 4, dtype=np.float32), 5), names, "z is float32 here.")]


ABLATE_HEAD = Exercise(
    name="ablate_head",
    reference=lambda z, head: _ablate(z, head, -3),
    visible=lambda: _ablate_cases(False),
    hidden=lambda: _ablate_cases(True),
    mistakes=_ablate_mistakes,
    doc="ablate_head(z, head): z (..., n_head, seq, d_head), each head's weighted values -> a "
        "copy with head `head` set to zero (z itself unchanged).",
)


# --- logit lens --------------------------------------------------------------------------------


def _lens(resid, gamma, beta, wte, *, norm=True, affine=True, ddof=0, axis=-1, center=True,
          eps_inside=True):
    x = resid
    if norm:
        mean = x.mean(axis=axis, keepdims=True) if center else 0.0
        var = ((x - mean) ** 2).mean(axis=axis, keepdims=True) * (
            x.shape[axis] / (x.shape[axis] - ddof))
        x = (x - mean) / (np.sqrt(var + 1e-5) if eps_inside else np.sqrt(var) + 1e-5)
        if affine:
            x = x * gamma + beta
    return x @ np.swapaxes(wte, -1, -2)


def _softmax(logits):
    e = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def _lens_mistakes(resid, gamma, beta, wte):
    yield Mistake(
        "{name} reads the stream without the final layer norm: resid @ wte.T. The model's own "
        "readout is layer_norm(resid, gamma, beta) @ wte.T, and the lens must use the same.",
        lambda r, g, b, w: _lens(r, g, b, w, norm=False))
    yield Mistake(
        "{name} normalises but leaves out the final layer norm's gamma and beta: "
        "(x_hat * gamma + beta) @ wte.T.",
        lambda r, g, b, w: _lens(r, g, b, w, affine=False))
    yield Mistake(
        "{name} scales by gamma but leaves out beta: the final layer norm is "
        "x_hat * gamma + beta.",
        lambda r, g, b, w: _lens(r, g, np.zeros_like(b), w))
    yield Mistake(
        "{name} adds beta but leaves out gamma: the final layer norm is x_hat * gamma + beta.",
        lambda r, g, b, w: _lens(r, np.ones_like(g), b, w))
    yield Mistake(
        "{name} uses the unbiased variance (ddof=1); layer norm divides by d_model (ddof=0).",
        lambda r, g, b, w: _lens(r, g, b, w, ddof=1))
    yield Mistake(
        "{name} adds eps outside the square root, sqrt(var) + eps; layer norm divides by "
        "sqrt(var + eps).",
        lambda r, g, b, w: _lens(r, g, b, w, eps_inside=False))
    yield Mistake(
        "{name} does not subtract the mean: that is RMS norm (chapter 14). The final layer "
        "norm of this model centres each vector first: (x - mean) / sqrt(var + eps).",
        lambda r, g, b, w: _lens(r, g, b, w, center=False))
    yield Mistake(
        "{name} returns probabilities (a softmax over the vocabulary); the lens returns "
        "logits, layer_norm(resid, gamma, beta) @ wte.T, as the model's forward does.",
        lambda r, g, b, w: _softmax(_lens(r, g, b, w)))
    yield Mistake(
        "{name} returns log-probabilities (a log-softmax over the vocabulary); the lens "
        "returns logits, layer_norm(resid, gamma, beta) @ wte.T, as the model's forward does.",
        lambda r, g, b, w: np.log(_softmax(_lens(r, g, b, w))))
    if resid.ndim >= 2 and resid.shape[-2] > 1:
        yield Mistake(
            "{name} normalises over the sequence axis; layer norm works on each position's "
            "vector: mean and variance over the last axis (d_model), axis=-1. (A fixed number "
            "such as axis=2 is d_model only when exactly one batch axis comes first.)",
            lambda r, g, b, w: _lens(r, g, b, w, axis=-2))


def _lens_args(rng, *lead, d_model, vocab, dtype=np.float64):
    return (_normal(rng, *lead, d_model, scale=3.0, dtype=dtype) + 1.5,
            1.0 + 0.3 * _normal(rng, d_model, dtype=dtype),
            0.3 * _normal(rng, d_model, dtype=dtype),
            0.5 * _normal(rng, vocab, d_model, dtype=dtype))


def _lens_cases(hidden: bool):
    names = ("resid", "gamma", "beta", "wte")
    if not hidden:
        rng = _t.default_rng(20)
        return [Case(_lens_args(rng, 2, 5, d_model=12, vocab=9), names,
                     "resid is (batch, seq, d_model) = (2, 5, 12); wte is (vocab, d_model) = "
                     "(9, 12)."),
                Case(_lens_args(rng, 2, 2, 3, d_model=8, vocab=7), names,
                     "resid has two batch axes here: (2, 2, seq=3, d_model=8). Count axes "
                     "from the end: d_model is axis -1 whatever comes in front.")]
    rng = _t.default_rng(120)
    return [Case(_lens_args(rng, 7, d_model=6, vocab=9), names, "resid is (seq, d_model) here."),
            Case(_lens_args(rng, 2, 3, 4, d_model=16, vocab=5), names,
                 "resid has two batch axes here."),
            Case(_lens_args(rng, 3, 6, d_model=12, vocab=20, dtype=np.float32), names,
                 "every input is float32 here.")]


LOGIT_LENS = Exercise(
    name="logit_lens",
    reference=_lens,
    visible=lambda: _lens_cases(False),
    hidden=lambda: _lens_cases(True),
    mistakes=_lens_mistakes,
    doc="logit_lens(resid, gamma, beta, wte): resid (..., seq, d_model) a residual stream, "
        "gamma and beta (d_model,) the final layer norm's, wte (vocab, d_model) the tied "
        "embedding -> (..., seq, vocab) = layer_norm(resid, gamma, beta) @ wte.T (eps 1e-5).",
)


EXERCISES = [PREVIOUS_TOKEN_SCORE, INDUCTION_SCORE, ABLATE_HEAD, LOGIT_LENS]
