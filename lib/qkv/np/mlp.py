"""The position-wise feed-forward network of a transformer block."""

import numpy as np

from qkv._checks import check_float, check_min_ndim, check_ndim, check_same

from .gelu import gelu
from .linear import linear


def mlp(x: np.ndarray, w_fc: np.ndarray, b_fc: np.ndarray | None, w_proj: np.ndarray,
        b_proj: np.ndarray | None) -> np.ndarray:
    """gelu(x @ w_fc + b_fc) @ w_proj + b_proj, applied to every position independently.

    x: (..., seq, d_model)
    w_fc: (d_model, d_ff), b_fc: (d_ff,) or None    d_ff is usually 4 * d_model
    w_proj: (d_ff, d_model), b_proj: (d_model,) or None
    returns: (..., seq, d_model)
    """
    fn = "mlp"
    check_float(fn, "x", x)
    check_min_ndim(fn, "x", x, 1, "(..., d_model)")
    check_ndim(fn, "w_fc", w_fc, 2, "(d_model, d_ff)")
    check_ndim(fn, "w_proj", w_proj, 2, "(d_ff, d_model)")
    check_same(fn, "d_model", "x", x, -1, "w_fc", w_fc, 0)
    check_same(fn, "d_ff", "w_fc", w_fc, 1, "w_proj", w_proj, 0)
    h = gelu(linear(x, w_fc, b_fc))  # (..., seq, d_ff)
    return linear(h, w_proj, b_proj)  # (..., seq, d_model)
