"""Chapter 14, the modern decoder: RMSNorm, RoPE, attention with RoPE, SwiGLU, repeat_kv,
grouped-query attention and QK-norm.

The references are qkv.np's own functions, captured here at import (before learner code runs).
The catalogues hold the wrong answers the chapter warns about: an RMSNorm that subtracts the
mean, RoPE with the wrong pairs (interleaved instead of half-split), another frequency base,
positions not shifted by ``start`` (a KV cache's offset), cos and sin swapped, rotated values or
unrotated keys, a mask that hides the past, a SwiGLU gate on the wrong branch or a ReLU gate, K/V
heads tiled instead of repeated (for k, v or both), QK-norm after RoPE instead of before it.
"""

import math

import numpy as np

import qkv.np as _qnp

from .. import _trusted as _t
from ..engine import Case, Mistake, _normal
from ..exercise import Exercise
from ..kinds import Array
from ._ch14_variants import (
    _gqa_variant,
    _qk_norm_variant,
    _rms_variant,
    _rope_variant,
    _rotary_variant,
)

_ref_rms_norm = _qnp.rms_norm
_ref_swiglu = _qnp.swiglu
_ref_repeat_kv = _qnp.repeat_kv
_ref_silu = _qnp.silu
_ref_gelu = _qnp.gelu
_concat = np.concatenate
_repeat = np.repeat
# said after an exception on a batched input (the case's note is kept for wrong values)
_LEADING = ("The leading axes are (batch, n_head) here: seq and d_head are the last two axes "
            "(shape[-2:]), transpose with np.swapaxes(t, -1, -2) (t.T reverses every axis), and "
            "a (seq, ...) table broadcasts over the rest.")

# --- RMSNorm -------------------------------------------------------------------------------------


def _rms_mistakes(x, gamma):
    def v(**knobs):
        return lambda x, gamma: _rms_variant(x, gamma, **knobs)

    yield Mistake("{name} subtracts the mean first: that is layer norm. RMSNorm divides x itself "
                  "by its root mean square, x / sqrt(mean(x**2) + eps) * gamma, with no "
                  "centring.", v(center=True))
    yield Mistake("{name} divides by the standard deviation (np.std or np.var subtract the mean "
                  "inside); RMSNorm divides by the root mean square of x itself: "
                  "np.sqrt(np.mean(x**2, axis=-1, keepdims=True) + eps).", v(std=True))
    yield Mistake("{name} puts eps outside the square root; it belongs inside: "
                  "sqrt(mean(x**2) + eps).", v(eps_outside=True))
    yield Mistake("{name} leaves out eps (1e-5 by default, inside the square root).", v(eps=0.0))
    # Hugging Face's Llama configs often say rms_norm_eps=1e-6; a copied constant looks like a
    # float32 rounding problem unless it is named.
    yield Mistake("{name} uses eps = 1e-6; use the eps argument, 1e-5 by default: "
                  "sqrt(mean(x**2) + eps).", v(eps=1e-6))
    yield Mistake("{name} divides by the mean square itself; divide by its square root: "
                  "x / sqrt(mean(x**2) + eps) * gamma.", v(root=False))
    yield Mistake("{name} uses the sum of x**2, not its mean: divide by "
                  "sqrt(mean(x**2, axis=-1) + eps).", v(total=True))
    yield Mistake("{name} forgets to scale by gamma: return x / rms * gamma.", v(use_gamma=False))
    yield Mistake("{name} adds gamma; it is a scale (RMSNorm has no shift): x / rms * gamma.",
                  lambda x, gamma: _rms_variant(x, gamma, use_gamma=False) + gamma)
    for axis in range(-x.ndim, -1):
        yield Mistake(f"{{name}} takes the mean along axis {axis}; each vector x[..., :] (the "
                      "last axis) gets its own root mean square.", v(axis=axis))
    if x.ndim > 1:
        yield Mistake("{name} takes one mean over the whole array; each vector x[..., :] gets "
                      "its own root mean square: np.mean(x**2, axis=-1, keepdims=True).",
                      v(axis=None))


def _rms_args(rng, *shape, scale=2.0, shift=1.0, dtype=np.float64):
    x = _normal(rng, *shape, scale=scale, dtype=dtype) + shift
    return x, (1.0 + 0.3 * rng.normal(size=shape[-1])).astype(dtype)


def _rms_cases(hidden):
    names = ("x", "gamma")
    if not hidden:
        rng = _t.default_rng(1401)
        return [Case(_rms_args(rng, 4, 8), names),
                Case(_rms_args(rng, 2, 3, 6), names, "x is (batch, seq, d_model) here."),
                Case(_rms_args(rng, 3, 8, scale=1e-3, shift=0.0), names,
                     "The rows here are tiny (root mean square about 1e-3), so eps matters.")]
    rng = _t.default_rng(14101)
    zero = _rms_args(rng, 2, 5)
    zero[0][0] = 0.0
    return [Case(zero, names, "x[0] is all zeros: eps keeps the result finite (zeros)."),
            Case(_rms_args(rng, 5, 16, dtype=np.float32), names, "x is float32 here."),
            Case(_rms_args(rng, 2, 2, 3, 8, scale=100.0), names)]


RMS_NORM = Exercise(
    name="rms_norm",
    reference=lambda x, gamma: _ref_rms_norm(x, gamma),
    visible=lambda: _rms_cases(False),
    hidden=lambda: _rms_cases(True),
    mistakes=_rms_mistakes,
    doc="rms_norm(x, gamma) = x / sqrt(mean(x**2, last axis) + 1e-5) * gamma; x (..., d_model), "
        "gamma (d_model,).",
)

# --- RoPE ----------------------------------------------------------------------------------------


def _ref_rope_ex(x, start):
    return _rope_variant(x, int(start))


def _rope_mistakes(x, start):
    start = int(start)

    def v(**knobs):
        return lambda x, start: _rope_variant(x, int(start), **knobs)

    yield Mistake("{name} pairs neighbouring coordinates (2i, 2i+1), the interleaved layout of "
                  "the RoFormer paper. This task (like Hugging Face's Llama) pairs coordinate i "
                  "with i + d_head/2: the first half holds every pair's first coordinate.",
                  v(layout="interleaved"))
    yield Mistake("{name} pairs i with i + d_head/2, as asked, but repeats the angles coordinate "
                  "by coordinate (np.repeat: theta_0, theta_0, theta_1, ...: the interleaved "
                  "layout's table). Both halves take the same (seq, d_head/2) angles "
                  "(np.concatenate([angles, angles], axis=-1)).", v(layout="half-repeat"))
    yield Mistake("{name} rotates neighbouring coordinates (2i, 2i+1) with the half-split "
                  "table; pair i here is (i, i + d_head/2).", v(layout="interleaved-concat"))
    for base in (1000.0, 100000.0, 500000.0):
        yield Mistake(f"{{name}} uses the frequency base {base:g}; this task uses 10,000: "
                      "theta_i = 10000 ** (-2 i / d_head).", v(base=base))
    yield Mistake("{name} uses the exponent -i / d_head; the frequencies are "
                  "theta_i = 10000 ** (-2 i / d_head), i = 0 .. d_head/2 - 1.", v(step=1))
    yield Mistake("{name} drops the minus sign of the exponent: its frequencies grow with i. "
                  "They fall from 1 towards 1/10000: theta_i = 10000 ** (-2 i / d_head).",
                  v(step=-2))
    yield Mistake("{name} rotates the wrong way: pair (a, b) becomes "
                  "(a cos - b sin, a sin + b cos).", v(sign=-1.0))
    yield Mistake("{name} swaps cos and sin: pair (a, b) becomes (a cos - b sin, a sin + b cos); "
                  "at position 0 (angle 0) a row comes out unchanged.", v(swap=True))
    yield Mistake("{name} spreads the exponents from 0 to -1 inclusive, as np.linspace(0, 1, "
                  "d_head // 2) does; they stop one step short: -2 i / d_head, i = 0 .. "
                  "d_head/2 - 1.", v(step="linspace"))
    yield Mistake("{name} uses the exponent -4 i / d_head (np.arange(0, d_head, 2) divided by "
                  "d_head / 2); it is -2 i / d_head = -np.arange(0, d_head, 2) / d_head.",
                  v(step=4))
    if start:
        yield Mistake("{name} ignores start: the rows of x sit at positions start .. start + "
                      "seq - 1 (with a KV cache the new token is at the cache's position, not "
                      "0).", lambda x, s: _rope_variant(x, 0))
    yield Mistake("{name} is off by one: the first row of x sits at position start, not "
                  "start + 1.", v(shift=1))
    if start:
        yield Mistake("{name} is off by one: the first row of x sits at position start, not "
                      "start - 1.", v(shift=-1))


def _rope_cases(hidden):
    names = ("x", "start")
    if not hidden:
        rng = _t.default_rng(1402)
        return [Case((_normal(rng, 6, 8), 3), names, "start = 3: the rows sit at positions 3..8.",
                     "The angle table is (seq, d_head // 2) = (6, 4): positions "
                     "np.arange(start, start + seq), one per row of x."),
                Case((_normal(rng, 2, 3, 5, 16), 0), names,
                     "x is (batch, n_head, seq, d_head) here, start = 0.", _LEADING)]
    rng = _t.default_rng(14102)
    return [Case((_normal(rng, 1, 8), 40), names, "One row at position 40, as when generating "
                                                  "with a KV cache."),
            Case((_normal(rng, 4, 7, 32, dtype=np.float32), 2), names, "x is float32 here."),
            Case((_normal(rng, 3, 2), 5), names, "d_head = 2: a single pair.")]


ROPE = Exercise(
    name="rope",
    reference=_ref_rope_ex,
    visible=lambda: _rope_cases(False),
    hidden=lambda: _rope_cases(True),
    mistakes=_rope_mistakes,
    doc="rope(x, start): rotate pair i = (x[..., i], x[..., i + d_head/2]) of the row at position "
        "p = start + row by p * 10000 ** (-2i / d_head); x (..., seq, d_head) -> same shape.",
)

# --- attention with RoPE -------------------------------------------------------------------------


def _attention_mistakes(var):
    """The mistakes of the attention around RoPE or GQA, each made by ``var(**knobs)``."""
    yield Mistake("{name} has no causal mask: position t may only attend to positions <= t.",
                  var(causal=False))
    for diagonal in ("nan", "zero", "mean"):
        yield Mistake("{name} also masks the diagonal: a position attends to itself and the "
                      "past (key j <= query i), so only the keys after it (j > i) are hidden.",
                      var(diagonal=diagonal))
    yield Mistake("{name} does not divide the scores by sqrt(d_head).", var(scale="none"))
    yield Mistake("{name} divides the scores by d_head; the scale is 1 / sqrt(d_head).",
                  var(scale="d"))
    yield Mistake("{name} hides the past instead of the future (np.tril and np.triu mixed up, "
                  "or the mask transposed): query i may attend keys j <= i, so the -inf goes "
                  "above the diagonal, where j > i.", var(future=True))
    yield Mistake("{name} takes the softmax over the queries (axis -2); each query's weights "
                  "over the keys, the last axis, must sum to 1: softmax along axis=-1.",
                  var(softmax_axis=-2))


def _rotary_mistakes(q, k, v):
    def var(**knobs):
        return lambda q, k, v: _rotary_variant(q, k, v, **knobs)

    yield Mistake("{name} also rotates the values. RoPE rotates q and k only: positions decide "
                  "where to look, and v carries the content that is moved.", var(rot_v=True))
    yield Mistake("{name} forgets to rotate the keys: rotate both q and k, each row by its own "
                  "position.", var(rot_k=False))
    yield Mistake("{name} forgets to rotate the queries: rotate both q and k.", var(rot_q=False))
    yield Mistake("{name} rotates the keys but also the values, not the queries: rotate q and k.",
                  var(rot_q=False, rot_v=True))
    yield Mistake("{name} rotates neither q nor k: that is plain causal attention. Rotate both, "
                  "rope(q, 0) and rope(k, 0), before the scores.", var(rot_q=False, rot_k=False))
    yield from _attention_mistakes(var)
    yield Mistake("{name} rotates neighbouring coordinates (2i, 2i+1); pair i here is "
                  "(i, i + d_head/2), the half-split layout.", var(layout="interleaved"))


def _rotary_args(rng, *lead, seq, d_head, dtype=np.float64):
    return tuple(_normal(rng, *lead, seq, d_head, dtype=dtype) for _ in range(3))


def _rotary_cases(hidden):
    names = ("q", "k", "v")
    if not hidden:
        rng = _t.default_rng(1403)
        return [Case(_rotary_args(rng, seq=5, d_head=8), names),
                Case(_rotary_args(rng, 2, 3, seq=4, d_head=16), names,
                     "q, k, v are (batch, n_head, seq, d_head) here.", _LEADING)]
    rng = _t.default_rng(14103)
    return [Case(_rotary_args(rng, 2, seq=7, d_head=4, dtype=np.float32), names,
                 "float32 here."),
            Case(_rotary_args(rng, seq=1, d_head=8), names, "seq = 1 here."),
            Case(_rotary_args(rng, 3, seq=12, d_head=32), names)]


ROTARY_ATTENTION = Exercise(
    name="rotary_attention",
    reference=lambda q, k, v: _rotary_variant(q, k, v),
    visible=lambda: _rotary_cases(False),
    hidden=lambda: _rotary_cases(True),
    mistakes=_rotary_mistakes,
    doc="rotary_attention(q, k, v): causal softmax(rope(q) rope(k)^T / sqrt(d_head)) v, rows at "
        "positions 0..seq-1 (half-split RoPE, base 10,000); q, k, v (..., seq, d_head).",
)

# --- SwiGLU --------------------------------------------------------------------------------------


def _swiglu_ref(x, w_gate, w_up, w_down):
    return _ref_swiglu(x, _concat([w_gate, w_up], axis=1), None, w_down, None)


def _swiglu_mistakes(x, w_gate, w_up, w_down):
    def sig(z):
        return 1.0 / (1.0 + np.exp(-z))

    yield Mistake("{name} gates the wrong branch: SiLU goes on x @ w_gate, and x @ w_up stays "
                  "linear: (silu(x @ w_gate) * (x @ w_up)) @ w_down.",
                  lambda x, g, u, d: _swiglu_ref(x, u, g, d))
    yield Mistake("{name} gates with ReLU, max(z, 0); SwiGLU's gate is SiLU, z * sigmoid(z), "
                  "which is smooth and slightly negative for z < 0.",
                  lambda x, g, u, d: (np.maximum(x @ g, 0.0) * (x @ u)) @ d)
    yield Mistake("{name} has the sign in the sigmoid flipped: sigmoid(z) = 1 / (1 + exp(-z)), "
                  "so silu(z) = z / (1 + exp(-z)).",
                  lambda x, g, u, d: ((x @ g) * sig(-(x @ g)) * (x @ u)) @ d)
    yield Mistake("{name} leaves out the gate's nonlinearity: (x @ w_gate) * (x @ w_up) is "
                  "bilinear; SiLU goes on the gate branch: silu(x @ w_gate) * (x @ w_up).",
                  lambda x, g, u, d: ((x @ g) * (x @ u)) @ d)
    yield Mistake("{name} uses GELU as the gate; SwiGLU's gate is SiLU, z * sigmoid(z).",
                  lambda x, g, u, d: (_ref_gelu(x @ g) * (x @ u)) @ d)
    yield Mistake("{name} gates with sigmoid(z) (the original GLU); SwiGLU uses "
                  "silu(z) = z * sigmoid(z).", lambda x, g, u, d: (sig(x @ g) * (x @ u)) @ d)
    yield Mistake("{name} applies SiLU to both branches; x @ w_up stays linear.",
                  lambda x, g, u, d: (_ref_silu(x @ g) * _ref_silu(x @ u)) @ d)
    yield Mistake("{name} applies SiLU after the product: silu goes on x @ w_gate alone.",
                  lambda x, g, u, d: _ref_silu((x @ g) * (x @ u)) @ d)
    yield Mistake("{name} adds the two branches; they are multiplied: "
                  "(silu(x @ w_gate) * (x @ w_up)) @ w_down.",
                  lambda x, g, u, d: (_ref_silu(x @ g) + (x @ u)) @ d)
    yield Mistake("{name} leaves out the up branch: (silu(x @ w_gate) * (x @ w_up)) @ w_down.",
                  lambda x, g, u, d: _ref_silu(x @ g) @ d)


def _swiglu_args(rng, shape, d_ff, dtype=np.float64):
    d = shape[-1]
    return (_normal(rng, *shape, dtype=dtype),
            _normal(rng, d, d_ff, scale=1.0 / math.sqrt(d), dtype=dtype),
            _normal(rng, d, d_ff, scale=1.0 / math.sqrt(d), dtype=dtype),
            _normal(rng, d_ff, d, scale=1.0 / math.sqrt(d_ff), dtype=dtype))


def _swiglu_cases(hidden):
    names = ("x", "w_gate", "w_up", "w_down")
    if not hidden:
        rng = _t.default_rng(1404)
        return [Case(_swiglu_args(rng, (5, 6), 16), names),
                Case(_swiglu_args(rng, (2, 3, 12), 32), names, "x is (batch, seq, d_model) here.")]
    rng = _t.default_rng(14104)
    return [Case(_swiglu_args(rng, (4, 8), 21, dtype=np.float32), names, "x is float32 here."),
            Case(_swiglu_args(rng, (2, 2, 3, 8), 8), names)]


# --- QK-norm -------------------------------------------------------------------------------------


def _qk_norm_mistakes(q, k, v, gamma_q, gamma_k):
    def var(**knobs):
        return lambda q, k, v, gq, gk: _qk_norm_variant(q, k, v, gq, gk, **knobs)

    yield Mistake("{name} rotates before it normalises: RMSNorm (with gamma) comes first, then "
                  "RoPE, as in rotary_attention(rms_norm(q, gamma_q), rms_norm(k, gamma_k), v).",
                  var(order="rope-norm"))
    yield Mistake("{name} leaves out RoPE: after the norm, q and k are rotated by position.",
                  var(order="norm"))
    yield Mistake("{name} also normalises the values; QK-norm touches q and k only (v carries "
                  "the content, and its size is not a logit).", var(norm_v=True))
    yield Mistake("{name} normalises q but not k: both get RMSNorm.", var(norm_k=False))
    yield Mistake("{name} normalises k but not q: both get RMSNorm.", var(norm_q=False))
    yield Mistake("{name} swaps the scales: gamma_q goes with q and gamma_k with k.",
                  var(gammas="kq"))
    for one in ("q", "k"):
        yield Mistake(f"{{name}} scales both q and k by gamma_{one}; each has its own: "
                      "gamma_q for q, gamma_k for k.", var(gammas=one + one))
    yield Mistake("{name} leaves out the learned scales: multiply the normalised q by gamma_q "
                  "and k by gamma_k.", var(use_gamma=False))
    yield Mistake("{name} uses eps = 1e-6 (Hugging Face Llama configs often do); this task's "
                  "RMSNorm uses eps = 1e-5.", var(eps=1e-6))
    yield Mistake("{name} divides by the length sqrt(sum(x**2)); RMSNorm divides by the root "
                  "mean square, sqrt(mean(x**2) + eps), sqrt(d_head) times smaller.",
                  var(total=True))
    yield Mistake("{name} subtracts the mean: that is layer norm. QK-norm here is RMSNorm, "
                  "x / sqrt(mean(x**2) + eps) * gamma.", var(center=True))
    yield Mistake("{name} normalises along the seq axis; each row of q and k (its d_head "
                  "numbers, the last axis) gets its own root mean square.", var(axis=-2))
    yield from _attention_mistakes(var)


def _qk_norm_args(rng, *lead, seq, d_head, scale=1.0, dtype=np.float64):
    q, k, v = (_normal(rng, *lead, seq, d_head, scale=s, dtype=dtype) for s in (scale, scale, 1.0))
    gammas = (1.0 + 0.3 * rng.normal(size=(2, d_head))).astype(dtype)
    return q, k, v, gammas[0], gammas[1]


def _qk_norm_cases(hidden):
    names = ("q", "k", "v", "gamma_q", "gamma_k")
    if not hidden:
        rng = _t.default_rng(1407)
        return [Case(_qk_norm_args(rng, seq=5, d_head=8), names),
                Case(_qk_norm_args(rng, 2, 3, seq=6, d_head=16, scale=50.0), names,
                     "q and k are 50 times larger than usual here, and (batch, n_head, seq, "
                     "d_head).", _LEADING)]
    rng = _t.default_rng(14107)
    return [Case(_qk_norm_args(rng, 2, seq=7, d_head=4, dtype=np.float32), names,
                 "float32 here."),
            Case(_qk_norm_args(rng, seq=1, d_head=8), names, "seq = 1 here."),
            Case(_qk_norm_args(rng, 3, seq=9, d_head=32, scale=1e-3), names,
                 "q and k are tiny here (root mean square about 1e-3), so eps matters.")]


QK_NORM_ATTENTION = Exercise(
    name="qk_norm_attention",
    reference=lambda q, k, v, gq, gk: _qk_norm_variant(q, k, v, gq, gk),
    visible=lambda: _qk_norm_cases(False),
    hidden=lambda: _qk_norm_cases(True),
    mistakes=_qk_norm_mistakes,
    doc="qk_norm_attention(q, k, v, gamma_q, gamma_k): causal attention of rope(rms_norm(q, "
        "gamma_q)), rope(rms_norm(k, gamma_k)) and v (rows at positions 0..seq-1, eps 1e-5); "
        "q, k, v (..., seq, d_head), gamma_q and gamma_k (d_head,).",
)

SWIGLU = Exercise(
    name="swiglu",
    reference=_swiglu_ref,
    visible=lambda: _swiglu_cases(False),
    hidden=lambda: _swiglu_cases(True),
    mistakes=_swiglu_mistakes,
    output=Array(tol32="float32_model"),
    doc="swiglu(x, w_gate, w_up, w_down) = (silu(x @ w_gate) * (x @ w_up)) @ w_down; x (..., "
        "d_model), w_gate and w_up (d_model, d_ff), w_down (d_ff, d_model).",
)

# --- grouped-query attention ---------------------------------------------------------------------


def _repeat_kv_mistakes(x, n_rep):
    n_rep = int(n_rep)
    yield Mistake("{name} tiles the whole stack of heads (kv0 kv1 kv0 kv1 ...); repeat each head "
                  "next to itself (kv0 kv0 kv1 kv1 ...), so that query head h reads K/V head "
                  "h // n_rep: np.repeat(x, n_rep, axis=-3).",
                  lambda x, n: _concat([x] * n_rep, axis=-3))
    yield Mistake("{name} repeats along the seq axis; the heads axis is -3 of (..., n_kv_head, "
                  "seq, d_head).", lambda x, n: _repeat(x, n_rep, axis=-2))


def _kv_cases(hidden):
    names = ("x", "n_rep")
    if not hidden:
        rng = _t.default_rng(1405)
        return [Case((_normal(rng, 2, 3, 4), 2), names, "x is (n_kv_head, seq, d_head) here."),
                Case((_normal(rng, 2, 2, 5, 3), 3), names,
                     "x is (batch, n_kv_head, seq, d_head) here.")]
    rng = _t.default_rng(14105)
    return [Case((_normal(rng, 1, 4, 2), 4), names, "n_kv_head = 1: multi-query."),
            Case((_normal(rng, 3, 2, 2), 1), names, "n_rep = 1: nothing to repeat."),
            Case((_normal(rng, 2, 4, 3, 2, dtype=np.float32), 2), names, "float32 here.")]


REPEAT_KV = Exercise(
    name="repeat_kv",
    reference=lambda x, n_rep: _ref_repeat_kv(x, int(n_rep)),
    visible=lambda: _kv_cases(False),
    hidden=lambda: _kv_cases(True),
    mistakes=_repeat_kv_mistakes,
    doc="repeat_kv(x, n_rep): (..., n_kv_head, seq, d_head) -> (..., n_kv_head * n_rep, seq, "
        "d_head), head h of the result = head h // n_rep of x.",
)


def _gqa_mistakes(q, k, v):
    yield Mistake("{name} pairs query head h with K/V head h % n_kv_head (the K/V stack tiled); "
                  "it belongs to group h // (n_head // n_kv_head): repeat each K/V head next "
                  "to itself (np.repeat, not np.tile).",
                  lambda q, k, v: _gqa_variant(q, k, v, tiled_k=True, tiled_v=True))
    for tiled, repeated in (("values", "keys"), ("keys", "values")):
        yield Mistake(f"{{name}} repeats the {repeated} head by head (kv0 kv0 kv1 kv1) but tiles "
                      f"the {tiled} (kv0 kv1 kv0 kv1), so a query head reads the keys of one "
                      "K/V head and the values of another. Group both the same way: "
                      "np.repeat(..., n_rep, axis=-3) for k and for v.",
                      lambda q, k, v, t=tiled: _gqa_variant(q, k, v, tiled_k=t == "keys",
                                                            tiled_v=t == "values"))
    yield Mistake("{name} rotates q and k with RoPE; this task has none (the heads come as they "
                  "are): softmax(q k^T / sqrt(d_head) + M) v, query head h with K/V head "
                  "h // n_rep.", lambda q, k, v: _gqa_variant(q, k, v, rope=True))
    yield from _attention_mistakes(
        lambda **knobs: lambda q, k, v: _gqa_variant(q, k, v, **knobs))
    yield Mistake("{name} tiles the K/V heads and has no causal mask.",
                  lambda q, k, v: _gqa_variant(q, k, v, tiled_k=True, tiled_v=True,
                                                causal=False))


def _gqa_args(rng, *lead, n_head, n_kv, seq, d_head, dtype=np.float64):
    return (_normal(rng, *lead, n_head, seq, d_head, dtype=dtype),
            _normal(rng, *lead, n_kv, seq, d_head, dtype=dtype),
            _normal(rng, *lead, n_kv, seq, d_head, dtype=dtype))


_GROUPS = ("The heads are axis -3 (q has n_head of them, k and v n_kv_head): repeat k and v "
           "n_head // n_kv_head times along axis -3 before the scores.")


def _gqa_cases(hidden):
    names = ("q", "k", "v")
    if not hidden:
        rng = _t.default_rng(1406)
        return [Case(_gqa_args(rng, n_head=4, n_kv=2, seq=5, d_head=8), names,
                     "4 query heads share 2 K/V heads: heads 0, 1 read K/V head 0.", _GROUPS),
                Case(_gqa_args(rng, 2, n_head=6, n_kv=3, seq=4, d_head=4), names,
                     "batch 2, 6 query heads, 3 K/V heads.", _GROUPS)]
    rng = _t.default_rng(14106)
    return [Case(_gqa_args(rng, n_head=4, n_kv=1, seq=6, d_head=8), names,
                 "n_kv_head = 1: multi-query attention."),
            Case(_gqa_args(rng, n_head=3, n_kv=3, seq=5, d_head=4), names,
                 "n_kv_head = n_head: ordinary multi-head attention."),
            Case(_gqa_args(rng, 2, n_head=8, n_kv=2, seq=7, d_head=4, dtype=np.float32), names,
                 "float32 here.")]


GROUPED_QUERY_ATTENTION = Exercise(
    name="grouped_query_attention",
    reference=lambda q, k, v: _gqa_variant(q, k, v),
    visible=lambda: _gqa_cases(False),
    hidden=lambda: _gqa_cases(True),
    mistakes=_gqa_mistakes,
    doc="grouped_query_attention(q, k, v): causal attention where query head h reads K/V head "
        "h // (n_head // n_kv_head); q (..., n_head, seq, d_head), k and v (..., n_kv_head, seq, "
        "d_head) -> (..., n_head, seq, d_head).",
)

EXERCISES = [RMS_NORM, ROPE, ROTARY_ATTENTION, SWIGLU, REPEAT_KV, GROUPED_QUERY_ATTENTION,
             QK_NORM_ATTENTION]
