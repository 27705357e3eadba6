"""NumPy building blocks for the known-wrong variants that several chapters' catalogues share.

A variant only ever shapes a message: it is computed on the case's float64 inputs when the
learner's answer is wrong, and compared with that answer to name the mistake.
"""

import math

import numpy as np

from . import _trusted as _t


def plain_softmax(x, axis=-1, stable=True):
    """Softmax without the all -inf row guard (so such rows give nan, as most learners' do)."""
    if stable:
        x = x - np.max(x, axis=axis, keepdims=True)
    e = np.exp(x)
    return e / np.sum(e, axis=axis, keepdims=True)


def qk(q, k, divide_by):
    """q k^T divided by ``divide_by``: (..., seq_q, d) x (..., seq_k, d) -> (..., seq_q, seq_k)."""
    return q @ np.swapaxes(k, -1, -2) / divide_by


def attention_variant(q, k, v, mask=None, *, divide_by=None, masking="-inf", guard=True,
                      stable=True, axis=-1, transpose_scores=False):
    """Scaled dot-product attention with one knob turned to a known mistake."""
    scale = math.sqrt(q.shape[-1]) if divide_by is None else divide_by
    scores = qk(q, k, scale)
    if transpose_scores:
        scores = qk(k, q, scale)  # (..., seq_k, seq_q): rows are keys
    if mask is not None and masking in ("-inf", "zero", "-1e9", "inverted", "transposed"):
        keep = {"inverted": ~mask, "transposed": np.swapaxes(mask, -1, -2)}.get(masking, mask)
        fill = {"zero": 0.0, "-1e9": -1e9}.get(masking, -np.inf)
        scores = np.where(keep, scores, fill)
    if guard and stable and axis == -1:
        weights = _t.ref_softmax(scores)
    else:
        weights = plain_softmax(scores, axis=axis, stable=stable)
        if guard:  # one mistake at a time: fully masked rows stay zero
            weights = np.where(np.isneginf(scores).all(axis=-1, keepdims=True), 0.0, weights)
    if mask is not None and masking == "after":
        weights = np.where(mask, weights, 0.0)
    if mask is not None and masking == "after -inf":
        weights = np.where(mask, weights, -np.inf)
    return weights @ v


def layer_norm_variant(x, gamma, beta, *, ddof=0, eps=1e-5, eps_outside=False, center=True,
                       raw_second_moment=False, axis=-1, use_gamma=True, use_beta=True,
                       swap=False):
    mean = np.mean(x, axis=axis, keepdims=True)
    if raw_second_moment:
        var = np.mean(x**2, axis=axis, keepdims=True)
    else:
        var = np.var(x, axis=axis, keepdims=True, ddof=ddof)
    centered = x - mean if center else x
    x_hat = centered / (np.sqrt(var) + eps) if eps_outside else centered / np.sqrt(var + eps)
    if swap:
        gamma, beta = beta, gamma
    return x_hat * (gamma if use_gamma else 1.0) + (beta if use_beta else 0.0)


def mha_variant(x, w_qkv, b_qkv, w_out, b_out, n_head, *, scale="d_head", causal="causal",
                order=(0, 1, 2), split_ok=True, merge_ok=True, out_proj=True, qkv_bias=True,
                out_bias=True):
    *lead, seq, d_model = x.shape
    d_head = d_model // n_head
    qkv = x @ w_qkv + (b_qkv if qkv_bias else 0.0)  # (..., seq, 3*d_model)
    chunks = np.split(qkv, 3, axis=-1)
    q, k, v = (chunks[i] for i in order)

    def split(t):  # (..., seq, d_model) -> (..., n_head, seq, d_head)
        if split_ok:
            return np.swapaxes(t.reshape(*lead, seq, n_head, d_head), -3, -2)
        return t.reshape(*lead, n_head, seq, d_head)  # wrong: no transpose

    q, k, v = split(q), split(k), split(v)
    divide_by = {"d_head": math.sqrt(d_head), "d_model": math.sqrt(d_model), "none": 1.0}[scale]
    scores = qk(q, k, divide_by)  # (..., n_head, seq, seq)
    if causal != "none":
        mask = _t.ref_causal_mask(seq)
        scores = np.where(mask if causal == "causal" else mask.T, scores, -np.inf)
    out = _t.ref_softmax(scores) @ v  # (..., n_head, seq, d_head)
    if merge_ok:
        out = np.swapaxes(out, -3, -2).reshape(*lead, seq, d_model)
    else:
        out = out.reshape(*lead, seq, d_model)  # wrong: no transpose
    if out_proj:
        out = out @ w_out + (b_out if out_bias else 0.0)
    return out


def block_variant(x, p, n_head, *, attn_residual=True, mlp_residual=True, norm="pre",
                  causal=True, swap_norms=False, mlp_first=False):
    ln1 = (p["ln1_gamma"], p["ln1_beta"])
    ln2 = (p["ln2_gamma"], p["ln2_beta"])
    if swap_norms:
        ln1, ln2 = ln2, ln1

    def attn(h):
        return _t.ref_multi_head_attention(h, p["w_qkv"], p["b_qkv"], p["w_out"], p["b_out"],
                                           n_head, causal=causal)

    def mlp(h):
        return _t.ref_mlp(h, p["w_fc"], p["b_fc"], p["w_proj"], p["b_proj"])

    def sublayer(x, f, ln, residual):
        if norm == "pre":
            y = f(_t.ref_layer_norm(x, *ln))
            return x + y if residual else y
        if norm == "post":
            return _t.ref_layer_norm(x + f(x), *ln)
        if norm == "stream":  # normalizes the residual stream itself
            x = _t.ref_layer_norm(x, *ln)
            return x + f(x)
        return x + f(x)  # "none"

    steps = [(attn, ln1, attn_residual), (mlp, ln2, mlp_residual)]
    if mlp_first:
        steps.reverse()
    for f, ln, residual in steps:
        x = sublayer(x, f, ln, residual)
    return x


def block_args(rng, shape, n_head, dtype=np.float64):
    d = shape[-1]

    def w(*s, scale=0.2):
        return normal(rng, *s, scale=scale, dtype=dtype)

    params = dict(ln1_gamma=1.0 + w(d, scale=0.1), ln1_beta=w(d, scale=0.1),
                  w_qkv=w(d, 3 * d, scale=0.3), b_qkv=w(3 * d, scale=0.05),
                  w_out=w(d, d), b_out=w(d, scale=0.05),
                  ln2_gamma=1.0 + w(d, scale=0.1), ln2_beta=w(d, scale=0.1),
                  w_fc=w(d, 4 * d), b_fc=w(4 * d, scale=0.05),
                  w_proj=w(4 * d, d), b_proj=w(d, scale=0.05))
    return (normal(rng, *shape, dtype=dtype), params, n_head)


def normal(rng, *shape, scale=1.0, dtype=np.float64):
    return (rng.normal(size=shape) * scale).astype(dtype)
