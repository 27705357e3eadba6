"""Scaled dot-product attention and multi-head attention.

Two paths behind one switch, ``fused``:
- naive (default): the one the book teaches. scores = q k^T / sqrt(d_head), blocked positions
  set to -inf, softmax over keys, weighted sum of values. Can return the weights.
- fused: torch.nn.functional.scaled_dot_product_attention, which picks a fast kernel
  (flash / memory-efficient on CUDA) and never materialises the (seq_q, seq_k) weights.
Both follow the same rules: bottom-right causal alignment, and zeros for a fully blocked row.
"""

import math

import torch
import torch.nn.functional as F

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

from .gqa import repeat_kv
from .linear import linear
from .masking import causal_mask
from .rms_norm import rms_norm
from .rope import rope as rotate
from .softmax import softmax


def scaled_dot_product_attention(q, k, v, mask=None, causal=False, return_weights=False,
                                 fused=False):
    """softmax(q k^T / sqrt(d_head), blocked -> -inf) @ v.

    q: (..., seq_q, d_head)
    k: (..., seq_k, d_head)
    v: (..., seq_k, d_v)
    mask: bool, broadcastable to (..., seq_q, seq_k); True = may attend. None = all allowed.
    causal: if True, also AND in causal_mask(seq_q, seq_k) (aligned bottom-right).
    return_weights: also return the attention weights (naive path only: fused=True with
        return_weights=True raises ValueError, because the fused kernel never forms them).
    fused: use torch.nn.functional.scaled_dot_product_attention; "flash": use
        qkv.pt.flash_attention, the Triton kernel of chapter 15 (no mask, no weights).
    returns: out (..., seq_q, d_v), or (out, weights (..., seq_q, seq_k)) if return_weights.

    A query whose row is fully blocked attends to nothing: its weights and its output are
    all zeros (never NaN), on both paths.
    """
    fn = "scaled_dot_product_attention"
    check_attention(fn, q, k, v, mask)
    seq_q, d_head = q.shape[-2:]
    seq_k = k.shape[-2]
    if fused == "flash":
        if mask is not None or return_weights:
            raise ValueError(f'{fn}: fused="flash" takes no mask and returns no weights; '
                             f"use fused=True or False for those")
        from .flash import flash_attention  # imports triton: only when asked for

        return flash_attention(q, k, v, causal=causal)
    if fused:
        if return_weights:
            raise ValueError(f"{fn}: fused=True cannot return weights (the fused kernel never "
                             "forms them); use fused=False")
        if mask is None and (not causal or seq_q == seq_k):
            # No mask, or the square causal mask: the kernel's is_causal (aligned top-left)
            # is then the same as ours, and lets it skip the blocked half entirely.
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    if causal:
        c = causal_mask(seq_q, seq_k, device=q.device)  # (seq_q, seq_k)
        mask = c if mask is None else mask & c
    if fused:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (..., seq_q, d_v)
        # Kernels may give NaN for a query with no allowed key; the rule is zeros.
        return out.masked_fill(~mask.any(dim=-1, keepdim=True), 0.0)

    # Divide by sqrt(d_head): with unit-variance q and k, q·k has variance d_head, and large
    # scores would saturate the softmax into a one-hot with vanishing gradients.
    scores = q @ k.transpose(-2, -1) / math.sqrt(d_head)  # (..., seq_q, seq_k)
    if mask is not None:
        # -inf before the softmax: exp(-inf) = 0, so blocked keys get exactly zero weight.
        scores = scores.masked_fill(~mask, float("-inf"))
    weights = softmax(scores, axis=-1)  # (..., seq_q, seq_k); fully blocked rows are 0
    out = weights @ v  # (..., seq_q, d_v)
    return (out, weights) if return_weights else out


def split_heads(x: torch.Tensor, n_head: int) -> torch.Tensor:
    """(..., seq, d_model) -> (..., n_head, seq, d_head), d_head = d_model // n_head.

    Head h gets columns h*d_head : (h+1)*d_head of the last axis.
    """
    check_min_ndim("split_heads", "x", x, 2, "(..., seq, d_model)")
    *lead, seq, d_model = x.shape
    check_n_head("split_heads", d_model, n_head)
    x = x.reshape(*lead, seq, n_head, d_model // n_head)  # (..., seq, n_head, d_head)
    return x.transpose(-3, -2)  # (..., n_head, seq, d_head)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """(..., n_head, seq, d_head) -> (..., seq, d_model): the inverse of split_heads."""
    check_min_ndim("merge_heads", "x", x, 3, "(..., n_head, seq, d_head)")
    *lead, n_head, seq, d_head = x.shape
    x = x.transpose(-3, -2)  # (..., seq, n_head, d_head)
    return x.reshape(*lead, seq, n_head * d_head)  # (..., seq, d_model)


def multi_head_attention(x, w_qkv, b_qkv, w_out, b_out, n_head, mask=None, causal=True,
                         return_weights=False, fused=False, kv_cache=None, n_kv_head=None,
                         rope=None, qk_norm=None, norm_eps=1e-5):
    """Self-attention with n_head heads, then the output projection.

    x:     (..., seq, d_model)
    w_qkv: (d_model, 3*d_model), columns [Q | K | V];  b_qkv: (3*d_model,) or None
    w_out: (d_model, d_model);                         b_out: (d_model,) or None
    mask:  bool, broadcastable to (..., seq, seq_k), the same for every head; True = may attend
        (seq_k = seq, plus the cached positions with kv_cache).
    causal: AND in the causal mask (default True: a decoder never looks ahead).
    fused: run the heads through torch's fused kernel (no weights then), and the projections
        through F.linear.
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

    torch.nn.MultiheadAttention computes the same thing with in_proj_weight = w_qkv.T and
    out_proj.weight = w_out.T (nn layers store weights (d_out, d_in)).
    """
    fn = "multi_head_attention"
    check_float(fn, "x", x)
    check_min_ndim(fn, "x", x, 2, "(..., seq, d_model)")
    seq, d_model = x.shape[-2:]
    check_n_head(fn, d_model, n_head)
    n_kv = n_head if n_kv_head is None else n_kv_head
    check_kv_heads(fn, n_head, n_kv)
    d_head = d_model // n_head
    check_shape(fn, "w_qkv", w_qkv, (d_model, qkv_width(n_head, n_kv, d_head)),
                "(d_model, 3*d_model)" if n_kv == n_head else
                "(d_model, (n_head + 2*n_kv_head) * d_head)")
    check_shape(fn, "w_out", w_out, (d_model, d_model), "(d_model, d_model)")
    seq_k = seq + (0 if kv_cache is None else cached_seq(fn, kv_cache))
    if mask is not None:
        check_mask(fn, mask, shape_of(x)[:-1] + (seq_k,), "(..., seq, seq_k)")
        mask = mask[..., None, :, :]  # (..., 1, seq, seq_k): one mask for all heads

    qkv = linear(x, w_qkv, b_qkv, fused=fused)  # (..., seq, (n_head + 2*n_kv) * d_head)
    q, k, v = qkv.split([n_head * d_head, n_kv * d_head, n_kv * d_head], dim=-1)
    q = split_heads(q, n_head)  # (..., n_head, seq, d_head)
    k, v = split_heads(k, n_kv), split_heads(v, n_kv)  # (..., n_kv_head, seq, d_head) each
    if qk_norm is not None:  # each head's q and k to unit RMS, times a learned scale
        q, k = (rms_norm(t, g, norm_eps, fused=fused) for t, g in zip((q, k), qk_norm,
                                                                      strict=True))
    if rope is not None:  # rotate by position; v is not rotated (it carries content only)
        cos, sin = check_rope_tables(fn, rope, seq, d_head)
        q, k = rotate(q, cos, sin), rotate(k, cos, sin)
    if kv_cache is not None:
        if kv_cache:  # the earlier positions' keys and values go first
            k = torch.cat([kv_cache["k"], k], dim=-2)  # (..., n_kv_head, seq_k, d_head)
            v = torch.cat([kv_cache["v"], v], dim=-2)
        kv_cache["k"], kv_cache["v"] = k, v
    # (..., n_head, seq_k, d_head) each: query head h reads K/V head h // n_rep
    k, v = repeat_kv(k, n_head // n_kv), repeat_kv(v, n_head // n_kv)
    result = scaled_dot_product_attention(q, k, v, mask=mask, causal=causal,
                                          return_weights=return_weights, fused=fused)
    out, weights = result if return_weights else (result, None)  # out (..., n_head, seq, d_head)
    out = merge_heads(out)  # (..., seq, d_model): heads side by side again
    out = linear(out, w_out, b_out, fused=fused)  # (..., seq, d_model): mixes the heads' finds
    return (out, weights) if return_weights else out
