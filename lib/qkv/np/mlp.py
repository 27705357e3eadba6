"""The position-wise feed-forward network of a transformer block."""

import numpy as np

from qkv._checks import check_float, check_min_ndim, check_ndim, check_same

from .gelu import gelu_backward, gelu_forward
from .linear import linear_backward, linear_forward


def mlp(x: np.ndarray, w_fc: np.ndarray, b_fc: np.ndarray | None, w_proj: np.ndarray,
        b_proj: np.ndarray | None) -> np.ndarray:
    """gelu(x @ w_fc + b_fc) @ w_proj + b_proj, applied to every position independently.

    x: (..., seq, d_model)
    w_fc: (d_model, d_ff), b_fc: (d_ff,) or None    d_ff is usually 4 * d_model
    w_proj: (d_ff, d_model), b_proj: (d_model,) or None
    returns: (..., seq, d_model)
    """
    out, _ = mlp_forward(x, w_fc, b_fc, w_proj, b_proj)  # the steps live in mlp_forward
    return out


def mlp_forward(x, w_fc, b_fc, w_proj, b_proj):
    """mlp(x, w_fc, b_fc, w_proj, b_proj), and the cache mlp_backward needs.

    returns: out (..., seq, d_model), cache (one cache per step)
    """
    fn = "mlp"
    check_float(fn, "x", x)
    check_min_ndim(fn, "x", x, 1, "(..., d_model)")
    check_ndim(fn, "w_fc", w_fc, 2, "(d_model, d_ff)")
    check_ndim(fn, "w_proj", w_proj, 2, "(d_ff, d_model)")
    check_same(fn, "d_model", "x", x, -1, "w_fc", w_fc, 0)
    check_same(fn, "d_ff", "w_fc", w_fc, 1, "w_proj", w_proj, 0)
    h, fc_cache = linear_forward(x, w_fc, b_fc)  # (..., seq, d_ff)
    h, gelu_cache = gelu_forward(h)  # (..., seq, d_ff)
    out, proj_cache = linear_forward(h, w_proj, b_proj)  # (..., seq, d_model)
    return out, (fc_cache, gelu_cache, proj_cache)


def mlp_backward(dout, cache) -> dict:
    """Gradients of mlp from dout (..., seq, d_model): the three steps in reverse.

    returns: {"dx": (..., seq, d_model), "dw_fc": (d_model, d_ff), "db_fc": (d_ff,),
              "dw_proj": (d_ff, d_model), "db_proj": (d_model,)}   (db_* None without biases)
    """
    fc_cache, gelu_cache, proj_cache = cache
    g_proj = linear_backward(dout, proj_cache)
    dh = gelu_backward(g_proj["dx"], gelu_cache)["dx"]  # (..., seq, d_ff)
    g_fc = linear_backward(dh, fc_cache)
    return {"dx": g_fc["dx"], "dw_fc": g_fc["dw"], "db_fc": g_fc["db"],
            "dw_proj": g_proj["dw"], "db_proj": g_proj["db"]}
