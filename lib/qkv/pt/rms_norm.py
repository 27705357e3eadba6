"""RMS normalization over the feature axis (Zhang & Sennrich 2019; Llama's norm)."""

import torch
import torch.nn.functional as F

from qkv._checks import check_float, check_min_ndim, check_shape


def rms_norm(x: torch.Tensor, gamma: torch.Tensor, eps: float = 1e-5,
             fused: bool = False) -> torch.Tensor:
    """Divide each vector by its root mean square, then scale by gamma.

    x: (..., d_model);  gamma: (d_model,)
    returns: (..., d_model) = x / sqrt(mean(x**2) + eps) * gamma
    fused: torch's one-kernel F.rms_norm. Same result.
    """
    fn = "rms_norm"
    check_float(fn, "x", x)
    check_min_ndim(fn, "x", x, 1, "(..., d_model)")
    check_shape(fn, "gamma", gamma, x.shape[-1:], "(d_model,)")
    if fused:
        return F.rms_norm(x, x.shape[-1:], gamma, eps)
    return x * torch.rsqrt((x * x).mean(dim=-1, keepdim=True) + eps) * gamma
