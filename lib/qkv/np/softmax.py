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
    m = np.max(x, axis=axis, keepdims=True)
    # An all -inf row has max -inf and (-inf) - (-inf) = NaN; shift such rows by 0 instead,
    # so exp gives zeros there.
    m = np.where(m == -np.inf, 0.0, m)
    e = np.exp(x - m)
    total = np.sum(e, axis=axis, keepdims=True)  # >= 1 on any row with a finite entry
    return e / np.where(total == 0, 1.0, total)  # all -inf rows: 0 / 1 = 0


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
