"""Grouped-query attention's one new step: sharing each key/value head with a group of query
heads (Ainslie et al. 2023; multi-query attention, one K/V head for all, is Shazeer 2019)."""

import numpy as np

from qkv._checks import check_min_ndim


def repeat_kv(x: np.ndarray, n_rep: int) -> np.ndarray:
    """(..., n_kv_head, seq, d_head) -> (..., n_kv_head * n_rep, seq, d_head).

    Query head h uses key/value head h // n_rep: each K/V head is repeated n_rep times in a
    row (kv0 kv0 kv1 kv1 ..., as Hugging Face's repeat_kv), not the whole stack tiled
    (kv0 kv1 kv0 kv1 ...). Only the attention sees the copies; the KV cache keeps n_kv_head.
    """
    check_min_ndim("repeat_kv", "x", x, 3, "(..., n_kv_head, seq, d_head)")
    if isinstance(n_rep, bool) or not isinstance(n_rep, int | np.integer) or n_rep < 1:
        raise ValueError(f"repeat_kv: n_rep must be an int >= 1; got {n_rep!r}")
    return x if n_rep == 1 else np.repeat(x, n_rep, axis=-3)


def repeat_kv_backward(dout: np.ndarray, n_rep: int) -> np.ndarray:
    """Gradient of repeat_kv: (..., n_kv_head * n_rep, seq, d_head) -> (..., n_kv_head, seq,
    d_head); each K/V head collects the gradients of all the query heads it served."""
    if n_rep == 1:
        return dout
    *lead, n_head, seq, d_head = dout.shape
    return dout.reshape(*lead, n_head // n_rep, n_rep, seq, d_head).sum(axis=-3)
