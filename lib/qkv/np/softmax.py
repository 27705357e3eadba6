"""Numerically stable softmax."""

import numpy as np

from qkv._checks import check_float


def softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    """exp(x) / sum(exp(x)) along ``axis``, same shape as ``x``.

    Stable: subtracting the row max first leaves the result unchanged (the factor exp(-max)
    cancels) but keeps exp() from overflowing, so x = 1e4 works.

    A row that is all -inf (a query allowed to attend to nothing) gives all zeros, not NaN.
    """
    check_float("softmax", "x", x)
    return softmax_in_place(np.array(x, copy=True), axis)  # the caller's x stays untouched


def softmax_in_place(x: np.ndarray, axis: int = -1) -> np.ndarray:
    """softmax(x) written into x's own memory, and returned.

    For callers that own a large temporary, like the (..., seq_q, seq_k) scores of attention:
    every step below reuses x instead of allocating another array of the same size.
    """
    m = np.max(x, axis=axis, keepdims=True)
    # An all -inf row has max -inf and (-inf) - (-inf) = NaN; shift such rows by 0 instead,
    # so exp gives zeros there.
    m[m == -np.inf] = 0.0
    x -= m
    np.exp(x, out=x)
    total = np.sum(x, axis=axis, keepdims=True)  # >= 1 on any row with a finite entry
    total[total == 0] = 1.0  # all -inf rows: 0 / 1 = 0
    x /= total
    return x


def softmax_forward(x: np.ndarray):
    """softmax(x) over the last axis, and the cache softmax_backward needs (the output itself).

    x: (..., n) -> out (..., n), cache = out
    """
    out = softmax(x, axis=-1)
    return out, out


def softmax_backward(dout: np.ndarray, cache) -> dict:
    """Gradient of softmax over the last axis: dout (..., n) -> {"dx": (..., n)}.

    With y = softmax(x), dy_i/dx_j = y_i (delta_ij - y_j), so
    dx = y * (dout - sum(dout * y)): only the output is needed, not x. Entries with y = 0
    (blocked by a -inf, or a fully blocked row) get gradient 0.
    """
    y = cache  # (..., n)
    return {"dx": y * (dout - (dout * y).sum(axis=-1, keepdims=True))}  # (..., n)
