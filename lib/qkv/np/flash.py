"""Fast attention in NumPy: softmax over blocks (online softmax) and tiled (flash) attention.

Attention never needs the whole (seq_q, seq_k) score matrix at once. Keep, for every row, a
running max m and a running sum l = sum(exp(s - m)) over the blocks seen so far; when a new
block raises the max to m', everything accumulated so far is multiplied by exp(m - m') before
the block's own terms are added (Milakov & Gimelshein 2018). Tiled attention does the same
with the output accumulator too, so it holds only (block_q, block_k) scores at a time and its
memory grows linearly in seq instead of quadratically (Dao et al. 2022; Dao 2023).

The backward pass keeps no (seq_q, seq_k) weights either: it recomputes each block of scores
from q, k and the saved logsumexp of every row, lse = m + log(l).
"""

import math
from numbers import Integral

import numpy as np

from qkv._checks import check_attention, check_float, check_min_ndim

from .attention import _sum_to_shape


def check_block(fn: str, name: str, block) -> None:
    """ValueError unless ``block`` is a positive int (a number of rows or keys per tile)."""
    if isinstance(block, bool) or not isinstance(block, Integral) or block <= 0:
        raise ValueError(f"{fn}: {name} must be a positive int; got {block!r}")


def online_update(m, l, s):
    """Fold one block of scores into a row's running max and sum.

    m: (...,) running max so far (-inf before the first block)
    l: (...,) running sum of exp(score - m) so far
    s: (..., block) this block's scores (-inf where blocked)
    returns: m_new (...,), l_new (...,), alpha (...,), p (..., block) where
        alpha = exp(m - m_new) rescales everything accumulated against the old max and
        p = exp(s - m_new) are this block's terms against the new one.

    A row that has seen only -inf so far keeps m = -inf, l = 0, and gets alpha = p = 0 (never
    NaN from (-inf) - (-inf)).
    """
    m_new = np.maximum(m, s.max(axis=-1))
    shift = np.where(np.isneginf(m_new), 0.0, m_new)  # rows with no key yet: subtract 0
    alpha = np.exp(m - shift)  # exp(-inf) = 0 on the first block
    p = np.exp(s - shift[..., None])
    return m_new, alpha * l + p.sum(axis=-1), alpha, p


def streaming_logsumexp(x: np.ndarray, block: int = 64) -> np.ndarray:
    """log(sum(exp(x))) over the last axis, reading x one block of columns at a time.

    x: (..., n) -> (...,).  Only the running max and sum of each row are kept between blocks.
    A row of all -inf gives -inf.
    """
    return _streaming_logsumexp("streaming_logsumexp", x, block)


def _streaming_logsumexp(fn, x, block):
    check_float(fn, "x", x)
    check_min_ndim(fn, "x", x, 1, "(..., n)")
    check_block(fn, "block", block)
    m = np.full(x.shape[:-1], -np.inf, dtype=x.dtype)
    l = np.zeros(x.shape[:-1], dtype=x.dtype)
    for start in range(0, x.shape[-1], block):
        m, l, _, _ = online_update(m, l, x[..., start:start + block])
    with np.errstate(divide="ignore"):  # log(0) = -inf for rows with nothing allowed
        return m + np.log(l)


def streaming_softmax(x: np.ndarray, block: int = 64) -> np.ndarray:
    """softmax over the last axis in two passes over blocks of columns: the first finds each
    row's logsumexp with the running max and sum, the second writes exp(x - lse) block by block.

    x: (..., n) -> (..., n).  A row of all -inf gives zeros, as qkv.np.softmax does.
    """
    lse = _streaming_logsumexp("streaming_softmax", x, block)  # checks x and block
    lse = np.where(np.isneginf(lse), np.inf, lse)[..., None]  # exp(-inf - inf) = 0, not NaN
    out = np.empty_like(x)
    for start in range(0, x.shape[-1], block):
        out[..., start:start + block] = np.exp(x[..., start:start + block] - lse)
    return out


def key_blocks(q_start, q_stop, seq_q, seq_k, block_k, causal):
    """The key blocks that query rows q_start .. q_stop - 1 must visit: yields (start, stop,
    needs_mask).

    Causal (aligned bottom-right, as causal_mask): query i sees keys 0 .. i + seq_k - seq_q.
    Blocks after the last key of the tile's LAST query are skipped whole; blocks whose every
    key is visible to the tile's FIRST query need no mask; only the ones between are masked.
    """
    offset = seq_k - seq_q
    end = min(seq_k, q_stop + offset) if causal else seq_k  # keys < end; q_stop - 1 + offset is
    for start in range(0, max(end, 0), block_k):           # the last key the last query sees
        stop = min(start + block_k, seq_k)
        yield start, stop, causal and stop - 1 > q_start + offset


def _block_scores(q_blk, k_blk, q_start, k_start, seq_q, seq_k, needs_mask):
    """Scores (..., bq, bk) of a scaled q tile against a k tile, -inf where causally blocked."""
    s = q_blk @ np.swapaxes(k_blk, -1, -2)  # (..., bq, bk)
    if needs_mask:
        rows = np.arange(q_start, q_start + s.shape[-2])[:, None] + (seq_k - seq_q)
        cols = np.arange(k_start, k_start + s.shape[-1])[None, :]
        s = np.where(cols <= rows, s, -np.inf)
    return s


def flash_attention_forward(q, k, v, causal=False, block_q=64, block_k=64):
    """Tiled attention, equal to scaled_dot_product_attention(q, k, v, causal=causal), and
    the cache flash_attention_backward needs.

    q: (..., seq_q, d_head), k: (..., seq_k, d_head), v: (..., seq_k, d_v)
    causal: bottom-right aligned, as in scaled_dot_product_attention
    block_q, block_k: rows of q and of k/v per tile (any positive int; seq need not be a
        multiple of it)
    returns: out (..., seq_q, d_v), cache = (q, k, v, out, lse (..., seq_q), causal, block_q,
        block_k)

    Memory: besides q, k, v and out, one (..., block_q, block_k) tile of scores and per-row
    running statistics, never a (seq_q, seq_k) matrix. A query that sees no key gets zeros.
    """
    fn = "flash_attention"
    check_attention(fn, q, k, v, None)
    check_block(fn, "block_q", block_q)
    check_block(fn, "block_k", block_k)
    seq_q, d_head = q.shape[-2:]
    seq_k = k.shape[-2]
    lead = np.broadcast_shapes(q.shape[:-2], k.shape[:-2], v.shape[:-2])
    dtype = np.result_type(q, k, v)
    scale = 1.0 / math.sqrt(d_head)
    out = np.zeros(lead + (seq_q, v.shape[-1]), dtype=dtype)
    lse = np.full(lead + (seq_q,), -np.inf, dtype=dtype)
    for qs in range(0, seq_q, block_q):
        qe = min(qs + block_q, seq_q)
        q_blk = q[..., qs:qe, :] * scale  # (..., bq, d_head)
        m = np.full(lead + (qe - qs,), -np.inf, dtype=dtype)  # running max per row
        l = np.zeros(lead + (qe - qs,), dtype=dtype)  # running sum of exp(s - m)
        acc = np.zeros(lead + (qe - qs, v.shape[-1]), dtype=dtype)  # running sum of p @ v
        for ks, ke, needs_mask in key_blocks(qs, qe, seq_q, seq_k, block_k, causal):
            s = _block_scores(q_blk, k[..., ks:ke, :], qs, ks, seq_q, seq_k, needs_mask)
            m, l, alpha, p = online_update(m, l, s)
            # The old acc was summed against the old max: rescale it, then add this block.
            acc = alpha[..., None] * acc + p @ v[..., ks:ke, :]  # (..., bq, d_v)
        seen = l > 0  # rows with at least one visible key
        # Divide once, at the end: every block's terms share the final max by now.
        out[..., qs:qe, :] = np.where(seen[..., None], acc / np.where(seen, l, 1.0)[..., None],
                                      0.0)
        with np.errstate(divide="ignore"):
            lse[..., qs:qe] = m + np.log(l)  # -inf for rows with no key
    return out, (q, k, v, out, lse, causal, block_q, block_k)


def flash_attention(q, k, v, causal=False, block_q=64, block_k=64):
    """softmax(q k^T / sqrt(d_head)) @ v computed tile by tile (see flash_attention_forward).

    q: (..., seq_q, d_head), k: (..., seq_k, d_head), v: (..., seq_k, d_v)
    returns: out (..., seq_q, d_v)
    """
    return flash_attention_forward(q, k, v, causal, block_q, block_k)[0]


def flash_attention_backward(dout, cache) -> dict:
    """Gradients of flash_attention from dout (..., seq_q, d_v), tile by tile.

    returns: {"dq": like q, "dk": like k, "dv": like v}

    Each tile of weights is recomputed as p = exp(s - lse) from the saved logsumexp (no max or
    sum to redo). The softmax backward ds = p * (dp - rowsum(dp * p)) needs a row sum over ALL
    keys, which one tile cannot see; but rowsum(dp * p) = rowsum(dout * out) =: D, computed
    once from the output (Dao et al. 2022, appendix B).
    """
    q, k, v, out, lse, causal, block_q, block_k = cache
    seq_q, d_head = q.shape[-2:]
    seq_k = k.shape[-2]
    scale = 1.0 / math.sqrt(d_head)
    lead = out.shape[:-2]
    dq = np.zeros(lead + q.shape[-2:], dtype=out.dtype)
    dk = np.zeros(lead + k.shape[-2:], dtype=out.dtype)
    dv = np.zeros(lead + v.shape[-2:], dtype=out.dtype)
    D = np.sum(dout * out, axis=-1)  # (..., seq_q)
    # Rows with no key have lse = -inf and p = 0: shift them by +inf so exp gives 0, not NaN.
    lse = np.where(np.isneginf(lse), np.inf, lse)
    for qs in range(0, seq_q, block_q):
        qe = min(qs + block_q, seq_q)
        q_blk = q[..., qs:qe, :] * scale  # (..., bq, d_head)
        do_blk = dout[..., qs:qe, :]  # (..., bq, d_v)
        for ks, ke, needs_mask in key_blocks(qs, qe, seq_q, seq_k, block_k, causal):
            k_blk, v_blk = k[..., ks:ke, :], v[..., ks:ke, :]
            s = _block_scores(q_blk, k_blk, qs, ks, seq_q, seq_k, needs_mask)
            p = np.exp(s - lse[..., qs:qe, None])  # (..., bq, bk): the weights, recomputed
            dv[..., ks:ke, :] += np.swapaxes(p, -1, -2) @ do_blk  # (..., bk, d_v)
            dp = do_blk @ np.swapaxes(v_blk, -1, -2)  # (..., bq, bk)
            ds = p * (dp - D[..., qs:qe, None])  # gradient of the scaled scores
            dq[..., qs:qe, :] += ds @ k_blk * scale  # (..., bq, d_head)
            dk[..., ks:ke, :] += np.swapaxes(ds, -1, -2) @ q_blk  # q_blk carries the scale
    return {"dq": _sum_to_shape(dq, q.shape), "dk": _sum_to_shape(dk, k.shape),
            "dv": _sum_to_shape(dv, v.shape)}
