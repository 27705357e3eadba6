"""Chapter 9, the backward passes the chapter derives but does not show as finished code: GELU,
the MLP (with both bias gradients), the embedding lookup and a whole decoder block, built from the
learner's own pieces. Same gradient-pair kind as ch09_backprop, which lists them; the trusted
references are qkv.np's, captured here at import, before any learner code runs."""

import math

import numpy as np

import qkv.np as _qnp

from .. import _trusted as _t
from ..engine import Case, Mistake, _normal
from ..exercise import Exercise
from ..kinds import GradientPair


def _upstream(rng, shape):
    return rng.normal(size=shape)


def _rows(a):
    return a.reshape(-1, a.shape[-1])


_ref_gelu_forward, _ref_gelu_backward = _qnp.gelu_forward, _qnp.gelu_backward
_ref_mlp_forward, _ref_mlp_backward = _qnp.mlp_forward, _qnp.mlp_backward
_ref_embed_forward, _ref_embed_backward = _qnp.embed_forward, _qnp.embed_backward
_ref_block_forward, _ref_block_backward = _qnp.decoder_block_forward, _qnp.decoder_block_backward
_ref_layer_norm_fwd, _ref_layer_norm_bwd = _qnp.layer_norm_forward, _qnp.layer_norm_backward
_ref_linear_fwd, _ref_linear_bwd = _qnp.linear_forward, _qnp.linear_backward
_ref_attn_fwd, _ref_attn_bwd = _qnp.attention_forward, _qnp.attention_backward
_ref_split, _ref_merge = _qnp.split_heads, _qnp.merge_heads
_SQRT_2_PI = math.sqrt(2.0 / math.pi)


def _gelu_parts(x):
    """u, t and du/dx of GPT-2's tanh GELU at x."""
    u = _SQRT_2_PI * (x + 0.044715 * x**3)
    return u, np.tanh(u), _SQRT_2_PI * (1.0 + 3 * 0.044715 * x**2)


def _gelu_slope(x):
    _, t, du = _gelu_parts(x)
    return 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t**2) * du


def _gelu_slope_variants(x):
    """(message, wrong slope) pairs: the derivation's usual slips."""
    _, t, du = _gelu_parts(x)
    yield ("It treats t = tanh(u) as a constant: GELU = 0.5 x (1 + t) is a product, and t "
           "depends on x too, so the slope has a second term, 0.5 x (1 - t^2) du/dx.",
           0.5 * (1.0 + t))
    yield ("It keeps only the term that comes through tanh; the product rule also gives "
           "0.5 (1 + t), the slope of the first factor times the second.",
           0.5 * x * (1.0 - t**2) * du)
    yield ("It uses 1 - t as the slope of tanh; tanh'(u) = 1 - tanh(u)^2 = 1 - t^2.",
           0.5 * (1.0 + t) + 0.5 * x * (1.0 - t) * du)
    yield ("du/dx is missing the 3 of the power rule: the slope of 0.044715 x^3 is "
           "3 * 0.044715 x^2.",
           0.5 * (1.0 + t) + 0.5 * x * (1.0 - t**2) * _SQRT_2_PI * (1.0 + 0.044715 * x**2))
    yield ("du/dx is missing the factor sqrt(2 / pi): u = sqrt(2 / pi) (x + 0.044715 x^3).",
           0.5 * (1.0 + t) + 0.5 * x * (1.0 - t**2) * (1.0 + 3 * 0.044715 * x**2))
    yield ("It multiplies dout by GELU(x) itself, not by GELU's slope at x.",
           0.5 * x * (1.0 + t))


def _gelu_mistakes(x, dout):
    for says, slope in _gelu_slope_variants(x):
        yield Mistake(says, lambda slope=slope: {"dx": dout * slope})
    yield Mistake(
        "It returns GELU's slope without multiplying by dout: by the chain rule, "
        "dx = dout * GELU'(x).",
        lambda: {"dx": _gelu_slope(x)})


def _gelu_case(rng, shape, scale=2.0, note=""):
    return Case((_normal(rng, *shape, scale=scale),), ("x",), note), _upstream(rng, shape)


def _gelu_cases(hidden: bool):
    if not hidden:
        rng = _t.default_rng(906)
        return [_gelu_case(rng, (3, 5)),
                _gelu_case(rng, (2, 3, 4), note="x is (batch, seq, d_ff) here.")]
    rng = _t.default_rng(9106)
    grid = np.linspace(-5.0, 5.0, 21)
    return [(Case((grid,), ("x",), "x runs from -5 to 5 here."), _upstream(rng, grid.shape)),
            _gelu_case(rng, (1,), note="A single number here."),
            _gelu_case(rng, (2, 2, 3, 3), scale=4.0)]


GELU_BACKWARD = Exercise(
    name="gelu_forward",
    check="check_gelu_backward",
    reference=_ref_gelu_forward,
    visible=lambda: _gelu_cases(False),
    hidden=lambda: _gelu_cases(True),
    mistakes=_gelu_mistakes,
    output=GradientPair("gelu_backward", _ref_gelu_backward, (("dx", 0),)),
    backends=("numpy",),
    doc='gelu_forward(x) -> (out, cache), GPT-2\'s tanh GELU; gelu_backward(dout, cache) -> '
        '{"dx"} = dout * GELU\'(x), elementwise. x (...).',
)


# --- the MLP ------------------------------------------------------------------------------------


def _mlp_mistakes(x, w_fc, b_fc, w_proj, b_proj, dout):
    h = x @ w_fc + b_fc  # (..., d_ff): the GELU's input
    a = _qnp.gelu(h)  # (..., d_ff)
    xr, dr = _rows(x), _rows(dout)
    da = dout @ w_proj.T  # (..., d_ff)
    dh = da * _gelu_slope(h)
    lead = tuple(range(x.ndim - 1))

    def back(dh_):
        return {"dx": dh_ @ w_fc.T, "dw_fc": xr.T @ _rows(dh_), "db_fc": dh_.sum(axis=lead)}

    yield Mistake(
        "The gradient skips the GELU: between the two linear layers, multiply by GELU's slope "
        "at its input h = x @ w_fc + b_fc: dh = da * GELU'(h).",
        lambda: back(da))
    yield Mistake(
        "GELU's slope is taken at its output a = GELU(h); it belongs at its input, "
        "h = x @ w_fc + b_fc (keep h, or what you need from it, in the cache).",
        lambda: back(da * _gelu_slope(a)))
    yield Mistake(
        "It multiplies by GELU(h) itself instead of GELU's slope at h.",
        lambda: back(da * a))
    yield Mistake(
        "db_fc is summed from the gradient BEFORE the GELU's slope: b_fc is added to h, the "
        "GELU's input, so db_fc sums dh = (dout @ w_proj^T) * GELU'(h) over the positions.",
        lambda: {"db_fc": da.sum(axis=lead)})
    yield Mistake(
        "dw_proj uses the GELU's input h; the second layer's input is a = GELU(h), so "
        "dw_proj = a^T @ dout (positions flattened).",
        lambda: {"dw_proj": _rows(h).T @ dr})
    yield Mistake(
        "db_proj is not summed over the positions: b_proj is added to every position, so "
        "db_proj sums dout over every axis but the last.",
        lambda: {"db_proj": dout})
    yield Mistake(
        "dx multiplies by w_fc instead of w_fc^T: dx = dh @ w_fc.T.",
        lambda: {"dx": dh @ w_fc} if w_fc.shape[0] == w_fc.shape[1] else {})
    if x.ndim > 2:
        yield Mistake(
            "db_fc and db_proj sum over the first axis only; with x of shape (batch, seq, "
            "d_model) a bias collects every position of every sequence: sum over every "
            "leading axis.",
            lambda: {"db_fc": dh.sum(axis=0), "db_proj": dout.sum(axis=0)})
        yield Mistake(
            "db_fc sums over the first axis only; sum dh over every leading axis "
            "(dh.reshape(-1, d_ff).sum(axis=0)).",
            lambda: {"db_fc": dh.sum(axis=0)})


def _mlp_case(rng, shape, d_ff, note=""):
    d = shape[-1]
    args = (_normal(rng, *shape), _normal(rng, d, d_ff, scale=0.5), _normal(rng, d_ff),
            _normal(rng, d_ff, d, scale=0.5), _normal(rng, d))
    return Case(args, ("x", "w_fc", "b_fc", "w_proj", "b_proj"), note), _upstream(rng, shape)


def _mlp_cases(hidden: bool):
    if not hidden:
        rng = _t.default_rng(907)
        return [_mlp_case(rng, (5, 8), 32),
                _mlp_case(rng, (2, 3, 6), 24, "x is (batch, seq, d_model) here: each bias "
                          "gradient sums over every leading axis.")]
    rng = _t.default_rng(9107)
    return [_mlp_case(rng, (1, 4), 16, "A single position here."),
            _mlp_case(rng, (4, 6), 10, "d_ff = 10 here, not 4 * d_model."),
            _mlp_case(rng, (2, 2, 3, 4), 8, "x has two batch axes here, (2, 2, 3, 4).")]


MLP_BACKWARD = Exercise(
    name="mlp_forward",
    check="check_mlp_backward",
    reference=_ref_mlp_forward,
    visible=lambda: _mlp_cases(False),
    hidden=lambda: _mlp_cases(True),
    mistakes=_mlp_mistakes,
    output=GradientPair("mlp_backward", _ref_mlp_backward,
                        (("dx", 0), ("dw_fc", 1), ("db_fc", 2), ("dw_proj", 3), ("db_proj", 4))),
    backends=("numpy",),
    doc='mlp_forward(x, w_fc, b_fc, w_proj, b_proj) -> (out, cache); mlp_backward(dout, cache) '
        '-> {"dx", "dw_fc", "db_fc", "dw_proj", "db_proj"}. x (..., d_model).',
)


# --- the embedding lookup -----------------------------------------------------------------------


def _embed_mistakes(token_ids, table, dout):
    V, d = table.shape
    ids = token_ids.reshape(-1)
    rows = dout.reshape(-1, d)

    def fancy():
        g = np.zeros((V, d))
        g[ids] += rows  # NumPy writes each repeated id once: the earlier rows are lost
        return {"dtable": g}

    def mean():
        g = np.zeros((V, d))
        np.add.at(g, ids, rows)
        counts = np.bincount(ids, minlength=V)[:, None]
        return {"dtable": g / np.maximum(counts, 1)}

    yield Mistake(
        "A token that appears at several positions keeps only one of its gradients: "
        "`dtable[ids] += dout` writes each repeated id once, so the other positions' "
        "contributions are lost. A reused row COLLECTS: add every position's gradient into "
        "its row (the one-hot product onehot(ids)^T @ dout, or a loop over the positions).",
        fancy)
    yield Mistake(
        "A repeated token's row averages its positions' gradients; a reused value collects "
        "their SUM.",
        mean)
    yield Mistake(
        "It counts how often each token appears instead of adding up dout: row v of dtable is "
        "the sum of dout over the positions holding token v.",
        lambda: {"dtable": np.broadcast_to(np.bincount(ids, minlength=V)[:, None] * 1.0,
                                           (V, d)).copy()})


def _embed_case(rng, ids, vocab, d_model, note=""):
    ids = np.asarray(ids)
    table = _normal(rng, vocab, d_model)
    return (Case((ids, table), ("token_ids", "table"), note),
            _upstream(rng, ids.shape + (d_model,)))


def _embed_cases(hidden: bool):
    if not hidden:
        rng = _t.default_rng(908)
        return [_embed_case(rng, [2, 0, 2, 4, 2, 1], 6, 3,
                            "Token 2 appears three times here, and tokens 3 and 5 not at all."),
                _embed_case(rng, [[1, 3, 3, 0], [3, 5, 1, 6]], 7, 4,
                            "token_ids is (batch, seq) here; token 3 appears in both sequences.")]
    rng = _t.default_rng(9108)
    return [_embed_case(rng, [4], 5, 2, "A single token here."),
            _embed_case(rng, [[2, 2, 2], [2, 2, 2]], 3, 5, "Every position holds token 2 here."),
            _embed_case(rng, rng.integers(0, 10, size=(2, 2, 3)), 10, 3,
                        "token_ids has two batch axes here, (2, 2, 3).")]


EMBEDDING_BACKWARD = Exercise(
    name="embedding_forward",
    check="check_embedding_backward",
    reference=_ref_embed_forward,
    visible=lambda: _embed_cases(False),
    hidden=lambda: _embed_cases(True),
    mistakes=_embed_mistakes,
    output=GradientPair("embedding_backward", _ref_embed_backward, (("dtable", 1),)),
    backends=("numpy",),
    doc='embedding_forward(token_ids, table) -> (table[token_ids], cache); '
        'embedding_backward(dout, cache) -> {"dtable"}: row v collects dout of every position '
        'holding token v. token_ids (...), table (vocab, d_model).',
)


# --- a whole decoder block ----------------------------------------------------------------------

BLOCK_KEYS = ("ln1_gamma", "ln1_beta", "w_qkv", "b_qkv", "w_out", "b_out",
              "ln2_gamma", "ln2_beta", "w_fc", "b_fc", "w_proj", "b_proj")
_BLOCK_GRADS = (("dx", 0),) + tuple((f"d{key}", i + 1) for i, key in enumerate(BLOCK_KEYS))


def _block_params(args):
    return dict(zip(BLOCK_KEYS, args[1:13], strict=True))


def _ref_block_pair_forward(x, *rest):
    """The learner's signature: x, the twelve arrays in BLOCK_KEYS order, n_head."""
    *arrays, n_head = rest
    return _ref_block_forward(x, dict(zip(BLOCK_KEYS, arrays, strict=True)), n_head)


def _ref_block_pair_backward(dout, cache):
    g = _ref_block_backward(dout, cache)
    return {"dx": g["dx"], **{f"d{k}": g["params"][k] for k in BLOCK_KEYS}}


def _block_grads(args, dout, *, stream2=True, stream1=True, branch2=True, order="qkv"):
    """The block's backward from qkv.np's pieces, with knobs that make the usual slips."""
    x, n_head = args[0], args[13]
    p = _block_params(args)
    d_model = x.shape[-1]
    h1, c_ln1 = _ref_layer_norm_fwd(x, p["ln1_gamma"], p["ln1_beta"])
    qkv, c_qkv = _ref_linear_fwd(h1, p["w_qkv"], p["b_qkv"])
    q, k, v = (_ref_split(t, n_head) for t in np.split(qkv, 3, axis=-1))
    o, c_att = _ref_attn_fwd(q, k, v, causal=True)
    a, c_out = _ref_linear_fwd(_ref_merge(o), p["w_out"], p["b_out"])
    x1 = x + a
    h2, c_ln2 = _ref_layer_norm_fwd(x1, p["ln2_gamma"], p["ln2_beta"])
    _, c_mlp = _ref_mlp_forward(h2, p["w_fc"], p["b_fc"], p["w_proj"], p["b_proj"])
    g_mlp = _ref_mlp_backward(dout, c_mlp)
    g_ln2 = _ref_layer_norm_bwd(g_mlp["dx"], c_ln2)
    dx1 = (dout if stream2 else 0.0) + (g_ln2["dx"] if branch2 else 0.0)
    g_out = _ref_linear_bwd(dx1, c_out)
    g_att = _ref_attn_bwd(_ref_split(g_out["dx"], n_head), c_att)
    parts = {name: _ref_merge(g_att[f"d{name}"]) for name in "qkv"}
    dqkv = np.concatenate([parts[name] for name in order], axis=-1)  # (..., seq, 3 d_model)
    assert dqkv.shape[-1] == 3 * d_model
    g_qkv = _ref_linear_bwd(dqkv, c_qkv)
    g_ln1 = _ref_layer_norm_bwd(g_qkv["dx"], c_ln1)
    dx = (dx1 if stream1 else 0.0) + g_ln1["dx"]
    return {"dx": dx, "dln1_gamma": g_ln1["dgamma"], "dln1_beta": g_ln1["dbeta"],
            "dw_qkv": g_qkv["dw"], "db_qkv": g_qkv["db"], "dw_out": g_out["dw"],
            "db_out": g_out["db"], "dln2_gamma": g_ln2["dgamma"], "dln2_beta": g_ln2["dbeta"],
            "dw_fc": g_mlp["dw_fc"], "db_fc": g_mlp["db_fc"], "dw_proj": g_mlp["dw_proj"],
            "db_proj": g_mlp["db_proj"]}


def _block_mistakes(*args, dout):
    def only(keys, **knobs):
        return lambda: {k: v for k, v in _block_grads(args, dout, **knobs).items() if k in keys}

    upstream_of_x1 = ("dx", "dln1_gamma", "dln1_beta", "dw_qkv", "db_qkv", "dw_out", "db_out")
    yield Mistake(
        "At the second residual sum, out = x1 + mlp(ln2(x1)), the gradient at x1 is missing the "
        "stream's copy: a sum sends dout BOTH into the MLP branch and straight along the "
        "stream, and the two add up at x1 (dx1 = dout + the branch's gradient).",
        only(upstream_of_x1, stream2=False))
    yield Mistake(
        "At x1, the gradient that came back through the MLP branch (and ln2) is not added to "
        "the stream's dout: x1 was used twice, by the stream and by ln2, so it collects both.",
        only(upstream_of_x1, branch2=False))
    yield Mistake(
        "dx is missing the stream's copy at the first residual sum, x1 = x + attention(ln1(x)): "
        "dx = dx1 + the gradient that came back through attention and ln1.",
        only(("dx",), stream1=False))
    for order in ("kqv", "vkq", "qvk"):
        yield Mistake(
            f"The gradients of q, k and v are put side by side as "
            f"[{' | '.join('d' + c for c in order)}]; the fused projection produced "
            "[q | k | v] (np.split into three, in that order), so its gradient must be "
            "[dq | dk | dv] (each merged back from heads first).",
            only(("dx", "dln1_gamma", "dln1_beta", "dw_qkv", "db_qkv"), order=order))


def _block_case(rng, shape, n_head, note=""):
    d = shape[-1]
    n = lambda *s: 0.5 * rng.normal(size=s)  # noqa: E731
    arrays = (1.0 + n(d), n(d), n(d, 3 * d), n(3 * d), n(d, d), n(d),
              1.0 + n(d), n(d), n(d, 4 * d), n(4 * d), n(4 * d, d), n(d))
    args = (_normal(rng, *shape),) + arrays + (n_head,)
    return Case(args, ("x",) + BLOCK_KEYS + ("n_head",), note), _upstream(rng, shape)


def _block_cases(hidden: bool):
    if not hidden:
        rng = _t.default_rng(909)
        return [_block_case(rng, (5, 8), 2),
                _block_case(rng, (2, 4, 12), 3, "x is (batch, seq, d_model) here, with 3 heads.")]
    rng = _t.default_rng(9109)
    return [_block_case(rng, (1, 4), 1, "A single position and a single head here."),
            _block_case(rng, (3, 6, 8), 4, "4 heads of d_head = 2 here."),
            _block_case(rng, (2, 1, 3, 6), 2, "x has two batch axes here, (2, 1, 3, 6).")]


BLOCK_BACKWARD = Exercise(
    name="decoder_block_forward",
    check="check_decoder_block_backward",
    reference=_ref_block_pair_forward,
    visible=lambda: _block_cases(False),
    hidden=lambda: _block_cases(True),
    mistakes=_block_mistakes,
    output=GradientPair("decoder_block_backward", _ref_block_pair_backward, _BLOCK_GRADS),
    backends=("numpy",),
    doc='decoder_block_forward(x, ln1_gamma, ln1_beta, w_qkv, b_qkv, w_out, b_out, ln2_gamma, '
        'ln2_beta, w_fc, b_fc, w_proj, b_proj, n_head) -> (out, cache); '
        'decoder_block_backward(dout, cache) -> {"dx", "dln1_gamma", ..., "db_proj"} '
        '(d + each parameter\'s name). x (..., seq, d_model).',
)


__all__ = ["GELU_BACKWARD", "MLP_BACKWARD", "EMBEDDING_BACKWARD", "BLOCK_BACKWARD"]
