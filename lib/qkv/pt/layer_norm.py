"""Layer normalization over the feature axis."""

import torch
import torch.nn.functional as F

from qkv._checks import check_float, check_min_ndim, check_shape


def layer_norm(x: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor | None,
               eps: float = 1e-5, fused: bool = False) -> torch.Tensor:
    """Normalize each vector to mean 0 / variance 1, then scale by gamma and shift by beta.

    x: (..., d_model);  gamma, beta: (d_model,) (beta may be None: no shift)
    returns: (..., d_model)

    The variance is the biased one (divide by d_model, as GPT-2 and torch.nn.LayerNorm do);
    eps sits inside the square root so a constant vector does not divide by zero.
    fused: torch's one-kernel F.layer_norm (one pass over x instead of five). Same result.
    """
    fn = "layer_norm"
    check_float(fn, "x", x)
    check_min_ndim(fn, "x", x, 1, "(..., d_model)")
    check_shape(fn, "gamma", gamma, x.shape[-1:], "(d_model,)")
    if beta is not None:
        check_shape(fn, "beta", beta, x.shape[-1:], "(d_model,)")
    if fused:
        return F.layer_norm(x, x.shape[-1:], gamma, beta, eps)
    mean = x.mean(dim=-1, keepdim=True)  # (..., 1)
    var = ((x - mean) ** 2).mean(dim=-1, keepdim=True)  # (..., 1) biased variance
    x_hat = (x - mean) / torch.sqrt(var + eps)  # (..., d_model)
    y = x_hat * gamma
    return y if beta is None else y + beta
