"""SiLU and the SwiGLU feed-forward network (Shazeer 2020; Llama's MLP)."""

import torch
import torch.nn.functional as F

from qkv._checks import check_float, check_min_ndim, check_ndim, check_shape

from .linear import linear


def silu(x: torch.Tensor, fused: bool = False) -> torch.Tensor:
    """x * sigmoid(x), elementwise; same shape as x. fused: F.silu (one kernel)."""
    check_float("silu", "x", x)
    return F.silu(x) if fused else x * torch.sigmoid(x)


def swiglu(x: torch.Tensor, w_fc: torch.Tensor, b_fc: torch.Tensor | None, w_proj: torch.Tensor,
           b_proj: torch.Tensor | None, fused: bool = False) -> torch.Tensor:
    """(silu(x @ w_gate) * (x @ w_up)) @ w_proj, applied to every position independently.

    x: (..., seq, d_model)
    w_fc: (d_model, 2 * d_ff), columns [gate | up]: the first d_ff columns are w_gate (through
        SiLU), the last d_ff are w_up (linear). b_fc: (2 * d_ff,) or None.
    w_proj: (d_ff, d_model), b_proj: (d_model,) or None.
    fused: torch's fused kernels for the linear layers and SiLU.
    returns: (..., seq, d_model). Same arguments as mlp, so a block switches between them.
    """
    fn = "swiglu"
    check_float(fn, "x", x)
    check_min_ndim(fn, "x", x, 1, "(..., d_model)")
    check_ndim(fn, "w_proj", w_proj, 2, "(d_ff, d_model)")
    d_ff = w_proj.shape[0]
    check_shape(fn, "w_fc", w_fc, (x.shape[-1], 2 * d_ff), "(d_model, 2 * d_ff)")
    gate, up = linear(x, w_fc, b_fc, fused=fused).split(d_ff, dim=-1)  # (..., seq, d_ff) each
    return linear(silu(gate, fused=fused) * up, w_proj, b_proj, fused=fused)
