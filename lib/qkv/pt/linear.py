"""Affine map x @ w + b, the building block of every projection."""

import torch
import torch.nn.functional as F

from qkv._checks import check_float, check_min_ndim, check_ndim, check_same, check_shape


def linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None,
           fused: bool = False) -> torch.Tensor:
    """x @ w + b over the last axis.

    x: (..., d_in)
    w: (d_in, d_out)   stored input-major, as in the math X·W (and GPT-2's Conv1D);
                       torch.nn.Linear stores the transpose, (d_out, d_in)
    b: (d_out,) or None
    fused: one torch kernel for product and bias (F.linear, which takes the weight as
        (d_out, d_in), so it gets the transposed view w.T: no copy). Same result.
    returns: (..., d_out)
    """
    fn = "linear"
    check_float(fn, "x", x)
    check_float(fn, "w", w)
    check_min_ndim(fn, "x", x, 1, "(..., d_in)")
    check_ndim(fn, "w", w, 2, "(d_in, d_out)")
    check_same(fn, "d_in", "x", x, -1, "w", w, 0)
    if b is not None:
        check_float(fn, "b", b)
        check_shape(fn, "b", b, (w.shape[1],), "(d_out,)")
    if fused:
        return F.linear(x, w.T, b)
    y = x @ w  # (..., d_out)
    return y if b is None else y + b
