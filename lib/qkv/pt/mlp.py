"""The position-wise feed-forward network of a transformer block."""

import torch

from qkv._checks import check_float, check_min_ndim, check_ndim, check_same

from .gelu import gelu
from .linear import linear


def mlp(x: torch.Tensor, w_fc: torch.Tensor, b_fc: torch.Tensor | None, w_proj: torch.Tensor,
        b_proj: torch.Tensor | None, fused: bool = False) -> torch.Tensor:
    """gelu(x @ w_fc + b_fc) @ w_proj + b_proj, applied to every position independently.

    x: (..., seq, d_model)
    w_fc: (d_model, d_ff), b_fc: (d_ff,) or None    d_ff is usually 4 * d_model
    w_proj: (d_ff, d_model), b_proj: (d_model,) or None
    fused: torch's fused kernels for the linear layers and the GELU.
    returns: (..., seq, d_model)
    """
    fn = "mlp"
    check_float(fn, "x", x)
    check_min_ndim(fn, "x", x, 1, "(..., d_model)")
    check_ndim(fn, "w_fc", w_fc, 2, "(d_model, d_ff)")
    check_ndim(fn, "w_proj", w_proj, 2, "(d_ff, d_model)")
    check_same(fn, "d_model", "x", x, -1, "w_fc", w_fc, 0)
    check_same(fn, "d_ff", "w_fc", w_fc, 1, "w_proj", w_proj, 0)
    h = gelu(linear(x, w_fc, b_fc, fused=fused), fused=fused)  # (..., seq, d_ff)
    return linear(h, w_proj, b_proj, fused=fused)  # (..., seq, d_model)
