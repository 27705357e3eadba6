"""Chapter 14's functions with a switch for each known mistake (the wrong answers the
catalogues in ``ch14_modern`` are made of): RMSNorm, the RoPE table and rotation, causal
attention, attention with RoPE, QK-norm and grouped-query attention. Every switch off gives the
right answer."""

import math

import numpy as np

import qkv.np as _qnp

_ref_rope = _qnp.rope
_ref_attention = _qnp.scaled_dot_product_attention
_concat = np.concatenate
_repeat = np.repeat
BASE = 10000.0


def _rms_variant(x, gamma, *, eps=1e-5, center=False, eps_outside=False, use_gamma=True,
                 total=False, axis=-1, root=True, std=False):
    if center:
        x = x - x.mean(axis=axis, keepdims=True)
    ms = (x * x).sum(axis=axis, keepdims=True) if total else (x * x).mean(axis=axis, keepdims=True)
    if std:  # np.std / np.var: the spread around the mean, while x itself stays uncentred
        ms = x.var(axis=axis, keepdims=True)
    if not root:
        return x / (ms + eps) * gamma
    rms = np.sqrt(ms) + eps if eps_outside else np.sqrt(ms + eps)
    return x / rms * (gamma if use_gamma else 1.0)


def _table(seq, d_head, start=0, base=BASE, step=2):
    """cos, sin (seq, d_head/2); step=1: the exponent i / d_head instead of 2i / d_head;
    step="linspace": exponents 0 .. -1 inclusive, as np.linspace(0, 1, d_head // 2) spreads them."""
    i = np.arange(d_head // 2, dtype=np.float64)
    exponents = (np.linspace(0.0, 1.0, d_head // 2) if step == "linspace"
                 else step * i / d_head)
    angles = np.outer(np.arange(start, start + seq, dtype=np.float64), base ** (-exponents))
    return np.cos(angles), np.sin(angles)


def _rope_variant(x, start, *, base=BASE, layout="half", shift=0, step=2, sign=1.0,
                  swap=False):
    cos, sin = _table(x.shape[-2], x.shape[-1], start + shift, base, step)
    if swap:
        cos, sin = sin, cos
    cos, sin = cos.astype(x.dtype), (sign * sin).astype(x.dtype)
    if layout in ("half", "interleaved"):
        return _ref_rope(x, cos, sin, layout)
    # one layout's pairs with the other's angle per coordinate: "half-repeat" (np.repeat'ed
    # angles) or "interleaved-concat" (concatenated angles)
    half = x.shape[-1] // 2
    if layout == "half-repeat":
        cos, sin = _repeat(cos, 2, axis=-1), _repeat(sin, 2, axis=-1)
        rotated = _concat([-x[..., half:], x[..., :half]], axis=-1)
    else:
        cos, sin = _concat([cos, cos], axis=-1), _concat([sin, sin], axis=-1)
        rotated = np.stack([-x[..., 1::2], x[..., 0::2]], axis=-1).reshape(x.shape)
    return x * cos + rotated * sin


def _attend(q, k, v, *, causal=True, scale="sqrt", diagonal=True, future=False,
            softmax_axis=-1):
    """Causal attention, or a wrong variant: scale "sqrt" | "none" | "d" (divides by d_head);
    diagonal "nan", "zero" or "mean" also masks each query's own key (np.triu(..., k=0)), so
    query 0 sees nothing: nan from a plain softmax, zeros from a guarded one, the mean of v from
    -1e9; future=True keeps keys j >= i (tril and triu mixed up); softmax_axis=-2."""
    d_head = q.shape[-1]
    seq = q.shape[-2]
    if scale == "none":
        q = q * math.sqrt(d_head)  # undoes the reference's 1/sqrt(d_head)
    elif scale == "d":
        q = q / math.sqrt(d_head)
    if future:
        return _ref_attention(q, k, v, mask=np.tri(seq, seq, dtype=bool).T)
    if softmax_axis != -1:
        scores = q @ np.swapaxes(k, -1, -2) / math.sqrt(d_head)  # (..., seq, seq)
        scores = np.where(np.tri(seq, seq, dtype=bool), scores, -np.inf)
        weights = np.exp(scores - scores.max(axis=softmax_axis, keepdims=True))
        return weights / weights.sum(axis=softmax_axis, keepdims=True) @ v
    if diagonal is True:
        return _ref_attention(q, k, v, causal=causal)
    out = _ref_attention(q, k, v, mask=np.tri(seq, seq, -1, dtype=bool))  # row 0: zeros
    if diagonal == "nan":
        out[..., 0, :] = np.nan
    elif diagonal == "mean":
        out[..., 0, :] = v.mean(axis=-2)
    return out


def _rotary_variant(q, k, v, *, rot_q=True, rot_k=True, rot_v=False, layout="half", **attend):
    def r(t, on):
        return _rope_variant(t, 0, layout=layout) if on else t

    return _attend(r(q, rot_q), r(k, rot_k), r(v, rot_v), **attend)


def _qk_norm_variant(q, k, v, gamma_q, gamma_k, *, order="norm-rope", norm_v=False,
                     norm_q=True, norm_k=True, gammas="qk", center=False, axis=-1, total=False,
                     use_gamma=True, eps=1e-5, **attend):
    """RMSNorm on q and k (each with its own gamma), then RoPE, then causal attention; the
    knobs make the wrong versions (order "rope-norm" rotates first; gammas "kq" swaps the
    scales, "qq" and "kk" use one of them for both)."""
    named = {"q": gamma_q, "k": gamma_k}
    gamma_q, gamma_k = named[gammas[0]], named[gammas[1]]

    def norm(t, g, on):
        # the length, np.linalg.norm, comes without an eps
        return _rms_variant(t, g, center=center, axis=axis, total=total, use_gamma=use_gamma,
                            eps=0.0 if total else eps) if on else t

    if order == "rope-norm":
        q, k = _rope_variant(q, 0), _rope_variant(k, 0)
    q, k = norm(q, gamma_q, norm_q), norm(k, gamma_k, norm_k)
    if order == "norm-rope":
        q, k = _rope_variant(q, 0), _rope_variant(k, 0)
    return _attend(q, k, norm(v, gamma_k, norm_v), **attend)


def _gqa_variant(q, k, v, *, tiled_k=False, tiled_v=False, rope=False, **attend):
    n_rep = q.shape[-3] // k.shape[-3]

    def rep(t, tile):  # tiled: kv0 kv1 kv0 kv1 (wrong); repeated: kv0 kv0 kv1 kv1
        return _concat([t] * n_rep, axis=-3) if tile else _repeat(t, n_rep, axis=-3)

    k, v = rep(k, tiled_k), rep(v, tiled_v)
    if rope:
        q, k = _rope_variant(q, 0), _rope_variant(k, 0)
    return _attend(q, k, v, **attend)
