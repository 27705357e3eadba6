"""Numerically stable softmax."""

import torch

from qkv._checks import check_float


def softmax(x: torch.Tensor, axis: int = -1) -> torch.Tensor:
    """exp(x) / sum(exp(x)) along ``axis``, same shape as ``x``.

    Stable: subtracting the row max first leaves the result unchanged (the factor exp(-max)
    cancels) but keeps exp() from overflowing, so x = 1e4 works.

    A row that is all -inf (a query allowed to attend to nothing) gives all zeros, not NaN.
    """
    check_float("softmax", "x", x)
    m = x.amax(dim=axis, keepdim=True)
    # An all -inf row has max -inf and (-inf) - (-inf) = NaN; shift such rows by 0 instead,
    # so exp gives zeros there.
    m = m.masked_fill(m == float("-inf"), 0.0)
    e = torch.exp(x - m)
    total = e.sum(dim=axis, keepdim=True)  # >= 1 on any row with a finite entry
    return e / total.masked_fill(total == 0, 1.0)  # all -inf rows: 0 / 1 = 0
