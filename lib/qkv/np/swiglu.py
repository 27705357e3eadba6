"""SiLU and the SwiGLU feed-forward network (Shazeer 2020; Llama's MLP)."""

import numpy as np

from qkv._checks import check_float, check_min_ndim, check_ndim, check_shape

from .linear import linear_backward, linear_forward


def silu(x: np.ndarray) -> np.ndarray:
    """x * sigmoid(x), elementwise; same shape as x (also called swish)."""
    out, _ = silu_forward(x)
    return out


def silu_forward(x: np.ndarray):
    """silu(x), and the cache silu_backward needs: (x, sigmoid(x))."""
    check_float("silu", "x", x)
    # sigmoid written with exp(-|x|) so that neither sign overflows
    e = np.exp(-np.abs(x))
    s = np.where(x >= 0, 1.0 / (1.0 + e), e / (1.0 + e)).astype(x.dtype, copy=False)
    return x * s, (x, s)


def silu_backward(dout: np.ndarray, cache) -> dict:
    """Gradient of silu: d/dx x s(x) = s + x s (1 - s)."""
    x, s = cache
    return {"dx": dout * (s + x * s * (1.0 - s))}


def swiglu(x: np.ndarray, w_fc: np.ndarray, b_fc: np.ndarray | None, w_proj: np.ndarray,
           b_proj: np.ndarray | None) -> np.ndarray:
    """(silu(x @ w_gate) * (x @ w_up)) @ w_proj, applied to every position independently.

    x: (..., seq, d_model)
    w_fc: (d_model, 2 * d_ff), columns [gate | up]: the first d_ff columns are w_gate (through
        SiLU), the last d_ff are w_up (linear). b_fc: (2 * d_ff,) or None.
    w_proj: (d_ff, d_model), b_proj: (d_model,) or None. (Llama: w_fc = [gate_proj.weight.T |
        up_proj.weight.T], w_proj = down_proj.weight.T.)
    returns: (..., seq, d_model)

    Same arguments as mlp, so a block switches between them. Three matrices instead of two:
    d_ff = 8/3 d_model keeps the parameter count of GELU's 4 d_model.
    """
    out, _ = swiglu_forward(x, w_fc, b_fc, w_proj, b_proj)
    return out


def swiglu_forward(x, w_fc, b_fc, w_proj, b_proj):
    """swiglu(x, w_fc, b_fc, w_proj, b_proj), and the cache swiglu_backward needs."""
    fn = "swiglu"
    check_float(fn, "x", x)
    check_min_ndim(fn, "x", x, 1, "(..., d_model)")
    check_ndim(fn, "w_proj", w_proj, 2, "(d_ff, d_model)")
    d_ff = w_proj.shape[0]
    check_shape(fn, "w_fc", w_fc, (x.shape[-1], 2 * d_ff), "(d_model, 2 * d_ff)")
    h, fc_cache = linear_forward(x, w_fc, b_fc)  # (..., seq, 2 * d_ff)
    gate, up = h[..., :d_ff], h[..., d_ff:]  # (..., seq, d_ff) each
    act, silu_cache = silu_forward(gate)
    out, proj_cache = linear_forward(act * up, w_proj, b_proj)  # (..., seq, d_model)
    return out, (fc_cache, silu_cache, act, up, proj_cache)


def swiglu_backward(dout, cache) -> dict:
    """Gradients of swiglu from dout (..., seq, d_model).

    returns: {"dx": (..., seq, d_model), "dw_fc": (d_model, 2 * d_ff), "db_fc": (2 * d_ff,),
              "dw_proj": (d_ff, d_model), "db_proj": (d_model,)}   (db_* None without biases)
    """
    fc_cache, silu_cache, act, up, proj_cache = cache
    g_proj = linear_backward(dout, proj_cache)
    dh = g_proj["dx"]  # (..., seq, d_ff): gradient at act * up
    dgate = silu_backward(dh * up, silu_cache)["dx"]
    g_fc = linear_backward(np.concatenate([dgate, dh * act], axis=-1), fc_cache)
    return {"dx": g_fc["dx"], "dw_fc": g_fc["dw"], "db_fc": g_fc["db"],
            "dw_proj": g_proj["dw"], "db_proj": g_proj["db"]}
