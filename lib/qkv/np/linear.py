"""Affine map x @ w + b, the building block of every projection."""

import numpy as np

from qkv._checks import check_float, check_min_ndim, check_ndim, check_same, check_shape


def linear(x: np.ndarray, w: np.ndarray, b: np.ndarray | None = None) -> np.ndarray:
    """x @ w + b over the last axis.

    x: (..., d_in)
    w: (d_in, d_out)   stored input-major, as in the math X·W (and GPT-2's Conv1D)
    b: (d_out,) or None
    returns: (..., d_out)
    """
    fn = "linear"
    check_float(fn, "x", x)
    check_float(fn, "w", w)
    check_min_ndim(fn, "x", x, 1, "(..., d_in)")
    check_ndim(fn, "w", w, 2, "(d_in, d_out)")
    check_same(fn, "d_in", "x", x, -1, "w", w, 0)
    y = x @ w  # (..., d_out)
    if b is not None:
        check_float(fn, "b", b)
        check_shape(fn, "b", b, (w.shape[1],), "(d_out,)")
        y = y + b
    return y


def linear_forward(x: np.ndarray, w: np.ndarray, b: np.ndarray | None = None):
    """linear(x, w, b) and the cache linear_backward needs.

    returns: out (..., d_out), cache = (x, w, whether there is a bias)
    """
    return linear(x, w, b), (x, w, b is not None)


def linear_backward(dout: np.ndarray, cache) -> dict:
    """Gradients of linear from the upstream gradient dout (..., d_out).

    returns: {"dx": (..., d_in), "dw": (d_in, d_out), "db": (d_out,) or None if there was no b}

    y = x @ w + b, so dx = dout @ w^T. The same w and b serve every position, so their
    gradients add up the contributions of all positions in the batch.
    """
    x, w, has_b = cache
    dx = dout @ w.T  # (..., d_in)
    x_rows = x.reshape(-1, x.shape[-1])  # (positions, d_in): every leading dim flattened
    dout_rows = dout.reshape(-1, dout.shape[-1])  # (positions, d_out)
    dw = x_rows.T @ dout_rows  # (d_in, d_out): sum over positions of outer(x, dout)
    db = dout_rows.sum(axis=0) if has_b else None  # (d_out,)
    return {"dx": dx, "dw": dw, "db": db}
