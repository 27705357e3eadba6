"""Scaled dot-product attention and multi-head attention.

The path is the one the book teaches: scores = q k^T / sqrt(d_head), blocked positions set to
-inf, softmax over keys, weighted sum of values.
"""

import math

import numpy as np

from qkv._arch import check_kv_heads, check_rope_tables, qkv_width
from qkv._checks import (
    check_attention,
    check_float,
    check_mask,
    check_min_ndim,
    check_n_head,
    check_shape,
    shape_of,
)
from qkv._kv_cache import cached_seq

from .gqa import repeat_kv, repeat_kv_backward
from .linear import linear_backward, linear_forward
from .masking import causal_mask
from .rms_norm import rms_norm_backward, rms_norm_forward
from .rope import rope_backward, rope_forward
from .softmax import softmax_backward, softmax_in_place


def scaled_dot_product_attention(q, k, v, mask=None, causal=False, return_weights=False):
    """softmax(q k^T / sqrt(d_head), blocked -> -inf) @ v.

    q: (..., seq_q, d_head)
    k: (..., seq_k, d_head)
    v: (..., seq_k, d_v)
    mask: bool, broadcastable to (..., seq_q, seq_k); True = may attend. None = all allowed.
    causal: if True, also AND in causal_mask(seq_q, seq_k) (aligned bottom-right).
    returns: out (..., seq_q, d_v), or (out, weights (..., seq_q, seq_k)) if return_weights.

    A query whose row is fully blocked attends to nothing: its weights and its output are
    all zeros (never NaN).
    """
    check_attention("scaled_dot_product_attention", q, k, v, mask)
    seq_q, d_head = q.shape[-2:]
    seq_k = k.shape[-2]
    # Divide by sqrt(d_head): with unit-variance q and k, q·k has variance d_head, and large
    # scores would saturate the softmax into a one-hot with vanishing gradients.
    # Scaling q before the product gives the same scores and multiplies seq_q * d_head numbers
    # instead of seq_q * seq_k.
    q = q * (1.0 / math.sqrt(d_head))
    if causal and mask is None and seq_q > QUERY_BLOCK:
        out, weights = _causal_by_query_blocks(q, k, v, return_weights)
    else:
        if causal:
            c = causal_mask(seq_q, seq_k)  # (seq_q, seq_k)
            mask = c if mask is None else mask & c
        out, weights = _attend(q, k, v, mask)
    return (out, weights) if return_weights else out


QUERY_BLOCK = 128  # queries per step when causal attention skips the blocked keys


def _attend(q, k, v, mask, *, mask_from=0, out=None, weights_out=None):
    """The attention formula on an already scaled q: returns out (..., seq_q, d_v) and
    weights (..., seq_q, seq_k). Shapes as in scaled_dot_product_attention.

    mask_from: every key before this one is allowed for every query, so the mask is applied to
    the keys from here on only. out, weights_out: arrays to write the results into.
    """
    scores = np.matmul(q, np.swapaxes(k, -1, -2), out=weights_out)  # (..., seq_q, seq_k)
    if mask is not None:
        # -inf before the softmax: exp(-inf) = 0, so blocked keys get exactly zero weight.
        full = np.broadcast_shapes(scores.shape, mask.shape)
        if full != scores.shape:  # a mask with more batch dims than q and k
            scores = np.broadcast_to(scores, full).copy()
        np.copyto(scores[..., mask_from:], -np.inf, where=~mask[..., mask_from:])
    # scores is our own temporary, so the softmax may overwrite it (no extra (seq_q, seq_k) arrays).
    weights = softmax_in_place(scores, axis=-1)  # (..., seq_q, seq_k); fully blocked rows are 0
    return np.matmul(weights, v, out=out), weights  # out (..., seq_q, d_v)


def _causal_by_query_blocks(q, k, v, return_weights):
    """Causal attention, QUERY_BLOCK queries at a time, each block only against the keys its
    last query may see. The keys after that are blocked for the whole block, so about half of
    the seq_q x seq_k scores are never computed (torch's fused kernel skips them the same way).

    q (already scaled), k, v and the result as in scaled_dot_product_attention; weights is
    None unless return_weights.
    """
    seq_q, seq_k = q.shape[-2], k.shape[-2]
    lead = np.broadcast_shapes(q.shape[:-2], k.shape[:-2], v.shape[:-2])
    dtype = np.result_type(q, k, v)
    out = np.zeros(lead + (seq_q, v.shape[-1]), dtype=dtype)  # rows that see no key stay 0
    weights = np.zeros(lead + (seq_q, seq_k), dtype=dtype) if return_weights else None
    for start in range(0, seq_q, QUERY_BLOCK):
        stop = min(start + QUERY_BLOCK, seq_q)
        n_keys = stop + seq_k - seq_q  # query i sees keys 0 .. i + seq_k - seq_q
        if n_keys <= 0:
            continue  # (seq_q > seq_k) this whole block of queries sees no key
        # Bottom-right alignment within the block puts each query at its true position, and
        # only the block's last (stop - start) keys can be blocked for any of its queries.
        block_mask = causal_mask(stop - start, n_keys)  # (block, n_keys)
        _attend(q[..., start:stop, :], k[..., :n_keys, :], v[..., :n_keys, :], block_mask,
                mask_from=max(0, n_keys - (stop - start)), out=out[..., start:stop, :],
                weights_out=None if weights is None else weights[..., start:stop, :n_keys])
    return out, weights


def split_heads(x: np.ndarray, n_head: int) -> np.ndarray:
    """(..., seq, d_model) -> (..., n_head, seq, d_head), d_head = d_model // n_head.

    Head h gets columns h*d_head : (h+1)*d_head of the last axis.
    """
    check_min_ndim("split_heads", "x", x, 2, "(..., seq, d_model)")
    *lead, seq, d_model = x.shape
    check_n_head("split_heads", d_model, n_head)
    x = x.reshape(*lead, seq, n_head, d_model // n_head)  # (..., seq, n_head, d_head)
    return np.swapaxes(x, -3, -2)  # (..., n_head, seq, d_head)


def merge_heads(x: np.ndarray) -> np.ndarray:
    """(..., n_head, seq, d_head) -> (..., seq, d_model): the inverse of split_heads."""
    check_min_ndim("merge_heads", "x", x, 3, "(..., n_head, seq, d_head)")
    *lead, n_head, seq, d_head = x.shape
    x = np.swapaxes(x, -3, -2)  # (..., seq, n_head, d_head)
    return x.reshape(*lead, seq, n_head * d_head)  # (..., seq, d_model)


def multi_head_attention(x, w_qkv, b_qkv, w_out, b_out, n_head, mask=None, causal=True,
                         return_weights=False, kv_cache=None, n_kv_head=None, rope=None,
                         qk_norm=None, norm_eps=1e-5):
    """Self-attention with n_head heads, then the output projection.

    x:     (..., seq, d_model)
    w_qkv: (d_model, 3*d_model), columns [Q | K | V];  b_qkv: (3*d_model,) or None
    w_out: (d_model, d_model);                         b_out: (d_model,) or None
    mask:  bool, broadcastable to (..., seq, seq_k), the same for every head; True = may attend
        (seq_k = seq, plus the cached positions with kv_cache).
    causal: AND in the causal mask (default True: a decoder never looks ahead).
    kv_cache: None, or this layer's entry of a KVCache (a dict, {} at first): x's keys and
        values are appended to it (each (..., n_head, seq_k, d_head) afterwards) and x's queries
        attend over all of them; the bottom-right causal mask lets the new query j see the
        cached keys and its own past, exactly what it would see in one full pass.
    n_kv_head: key/value heads (None: n_head). Fewer is grouped-query attention: w_qkv is then
        (d_model, (n_head + 2 * n_kv_head) * d_head), columns [Q | K | V], and query head h
        reads K/V head h // (n_head // n_kv_head) (see repeat_kv); the cache keeps n_kv_head.
    rope: None, or (cos, sin) from rope_table for x's positions, each (seq, d_head // 2):
        q and k are rotated (half-split layout) before the scores; the cache keeps rotated keys.
    qk_norm: None, or (q_gamma, k_gamma), each (d_head,): rms_norm (with norm_eps) on every
        head's q and k, before RoPE.
    returns: (..., seq, d_model), or (out, weights (..., n_head, seq, seq_k)) if return_weights.
    """
    # The steps live in multi_head_attention_forward; its cache holds the weights.
    out, cache = multi_head_attention_forward(x, w_qkv, b_qkv, w_out, b_out, n_head, mask=mask,
                                              causal=causal, keep_cache=return_weights,
                                              kv_cache=kv_cache, n_kv_head=n_kv_head, rope=rope,
                                              qk_norm=qk_norm, norm_eps=norm_eps)
    if return_weights:
        weights = cache["attn"][-1]  # (..., n_head, seq, seq_k): kept by attention_forward
        return out, weights
    return out


# --- forward/backward pairs ------------------------------------------------------------------

def attention_forward(q, k, v, causal=True, mask=None):
    """scaled_dot_product_attention for one head (or a stack of heads), and its cache.

    q: (..., seq_q, d_head), k: (..., seq_k, d_head), v: (..., seq_k, d_v)
    causal, mask: as in scaled_dot_product_attention (causal defaults to True here).
    returns: out (..., seq_q, d_v), cache = (q, k, v, weights (..., seq_q, seq_k))
    """
    out, weights = scaled_dot_product_attention(q, k, v, mask=mask, causal=causal,
                                                return_weights=True)
    return out, (q, k, v, weights)


def attention_backward(dout, cache) -> dict:
    """Gradients of attention from dout (..., seq_q, d_v).

    returns: {"dq": like q, "dk": like k, "dv": like v}

    Backward through out = weights @ v, then the softmax, then scores = q k^T / sqrt(d_head).
    Blocked keys have weight 0, and the softmax gradient is 0 wherever its output is 0, so the
    mask needs no special handling here.
    """
    q, k, v, weights = cache
    scale = 1.0 / math.sqrt(q.shape[-1])
    dv = np.swapaxes(weights, -1, -2) @ dout  # (..., seq_k, d_v)
    dweights = dout @ np.swapaxes(v, -1, -2)  # (..., seq_q, seq_k)
    dscores = softmax_backward(dweights, weights)["dx"]  # softmax's cache is its output
    dq = dscores @ k * scale  # (..., seq_q, d_head)
    dk = np.swapaxes(dscores, -1, -2) @ q * scale  # (..., seq_k, d_head)
    return {"dq": _sum_to_shape(dq, q.shape), "dk": _sum_to_shape(dk, k.shape),
            "dv": _sum_to_shape(dv, v.shape)}


def _sum_to_shape(grad, shape):
    """Undo broadcasting: a (k, v) shared by several batch entries collects all their gradients."""
    grad = grad.sum(axis=tuple(range(grad.ndim - len(shape))))  # leading dims the input lacked
    axes = tuple(i for i, n in enumerate(shape) if n == 1 and grad.shape[i] != 1)
    return grad.sum(axis=axes, keepdims=True)  # dims where the input had size 1


def multi_head_attention_forward(x, w_qkv, b_qkv, w_out, b_out, n_head, mask=None,
                                 causal=True, keep_cache=True, kv_cache=None, n_kv_head=None,
                                 rope=None, qk_norm=None, norm_eps=1e-5):
    """multi_head_attention (without return_weights), and the cache its backward needs.

    Arguments and output as in multi_head_attention; returns out (..., seq, d_model), cache.
    keep_cache=False: only the output is wanted (cache is None), so the attention weights,
    n_head x seq x seq numbers per batch entry, are never stored.
    kv_cache (generation's KV cache, not the backward's): as in multi_head_attention; the
    backward pass does not support it (the cached keys' inputs are gone).
    """
    fn = "multi_head_attention"
    check_float(fn, "x", x)
    check_min_ndim(fn, "x", x, 2, "(..., seq, d_model)")
    seq, d_model = x.shape[-2:]
    check_n_head(fn, d_model, n_head)
    n_kv = n_head if n_kv_head is None else n_kv_head
    check_kv_heads(fn, n_head, n_kv)
    d_head = d_model // n_head
    width = qkv_width(n_head, n_kv, d_head)
    check_shape(fn, "w_qkv", w_qkv, (d_model, width),
                "(d_model, 3*d_model)" if n_kv == n_head else
                "(d_model, (n_head + 2*n_kv_head) * d_head)")
    check_shape(fn, "w_out", w_out, (d_model, d_model), "(d_model, d_model)")
    seq_k = seq + (0 if kv_cache is None else cached_seq(fn, kv_cache))
    if mask is not None:
        check_mask(fn, mask, shape_of(x)[:-1] + (seq_k,), "(..., seq, seq_k)")
        mask = mask[..., None, :, :]  # (..., 1, seq, seq_k): one mask for all heads

    qkv, qkv_cache = linear_forward(x, w_qkv, b_qkv)  # (..., seq, (n_head + 2*n_kv) * d_head)
    q, k, v = np.split(qkv, [n_head * d_head, (n_head + n_kv) * d_head], axis=-1)
    q = split_heads(q, n_head)  # (..., n_head, seq, d_head)
    k, v = split_heads(k, n_kv), split_heads(v, n_kv)  # (..., n_kv_head, seq, d_head) each
    norm_caches = rope_caches = None
    if qk_norm is not None:  # each head's q and k to unit RMS, times a learned scale
        (q, q_cache), (k, k_cache) = (rms_norm_forward(t, g, norm_eps)
                                      for t, g in zip((q, k), qk_norm, strict=True))
        norm_caches = (q_cache, k_cache)
    if rope is not None:  # rotate by position; v is not rotated (it carries content only)
        cos, sin = check_rope_tables(fn, rope, seq, d_head)
        (q, q_cache), (k, k_cache) = rope_forward(q, cos, sin), rope_forward(k, cos, sin)
        rope_caches = (q_cache, k_cache)
    if kv_cache is not None:
        if kv_cache:  # the earlier positions' keys and values go first
            k = np.concatenate([kv_cache["k"], k], axis=-2)  # (..., n_kv_head, seq_k, d_head)
            v = np.concatenate([kv_cache["v"], v], axis=-2)
        kv_cache["k"], kv_cache["v"] = k, v
    n_rep = n_head // n_kv
    k, v = repeat_kv(k, n_rep), repeat_kv(v, n_rep)  # (..., n_head, seq_k, d_head) each
    if keep_cache:
        out, attn_cache = attention_forward(q, k, v, causal=causal, mask=mask)
    else:
        out = scaled_dot_product_attention(q, k, v, mask=mask, causal=causal)
    out = merge_heads(out)  # (..., seq, d_model): heads side by side again
    out, out_cache = linear_forward(out, w_out, b_out)  # (..., seq, d_model): mixes the heads
    if not keep_cache:
        return out, None
    return out, {"qkv": qkv_cache, "attn": attn_cache, "out": out_cache, "n_head": n_head,
                 "n_rep": n_rep, "qk_norm": norm_caches, "rope": rope_caches}


def multi_head_attention_backward(dout, cache) -> dict:
    """Gradients of multi_head_attention from dout (..., seq, d_model).

    returns: {"dx": (..., seq, d_model), "dw_qkv": (d_model, 3*d_model), "db_qkv": (3*d_model,),
              "dw_out": (d_model, d_model), "db_out": (d_model,)}   (db_* None without biases;
             dw_qkv (d_model, (n_head + 2*n_kv_head) * d_head) with GQA; with qk_norm also
             "dq_gamma", "dk_gamma" (d_head,))

    The forward steps in reverse. split_heads and merge_heads only move numbers around, so
    each one's backward is the other.
    """
    g_out = linear_backward(dout, cache["out"])
    dheads = split_heads(g_out["dx"], cache["n_head"])  # (..., n_head, seq, d_head)
    g_attn = attention_backward(dheads, cache["attn"])
    dq = g_attn["dq"]  # (..., n_head, seq, d_head)
    # each K/V head collects the gradients of its group of query heads
    dk, dv = (repeat_kv_backward(g_attn[name], cache["n_rep"]) for name in ("dk", "dv"))
    if cache["rope"] is not None:
        dq, dk = (rope_backward(d, c)["dx"] for d, c in zip((dq, dk), cache["rope"], strict=True))
    dgammas = None
    if cache["qk_norm"] is not None:
        gq, gk = (rms_norm_backward(d, c) for d, c in zip((dq, dk), cache["qk_norm"],
                                                         strict=True))
        dq, dk = gq["dx"], gk["dx"]
        dgammas = (gq["dgamma"], gk["dgamma"])  # summed over every head and position
    # (..., seq, (n_head + 2*n_kv) * d_head): columns [Q | K | V] as in w_qkv
    dqkv = np.concatenate([merge_heads(d) for d in (dq, dk, dv)], axis=-1)
    g_qkv = linear_backward(dqkv, cache["qkv"])
    grads = {"dx": g_qkv["dx"], "dw_qkv": g_qkv["dw"], "db_qkv": g_qkv["db"],
             "dw_out": g_out["dw"], "db_out": g_out["db"]}
    if dgammas is not None:
        grads["dq_gamma"], grads["dk_gamma"] = dgammas
    return grads
