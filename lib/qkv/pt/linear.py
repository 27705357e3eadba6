"""Affine map x @ w + b, the building block of every projection."""

import torch

from qkv._checks import check_float, check_min_ndim, check_ndim, check_same, check_shape


def linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    """x @ w + b over the last axis.

    x: (..., d_in)
    w: (d_in, d_out)   stored input-major, as in the math X·W (and GPT-2's Conv1D);
                       torch.nn.Linear stores the transpose, (d_out, d_in)
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
