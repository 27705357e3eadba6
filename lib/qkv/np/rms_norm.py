"""RMS normalization over the feature axis (Zhang & Sennrich 2019; Llama's norm)."""

import numpy as np

from qkv._checks import check_float, check_min_ndim, check_shape


def rms_norm(x: np.ndarray, gamma: np.ndarray, eps: float = 1e-5) -> np.ndarray:
    """Divide each vector by its root mean square, then scale by gamma.

    x: (..., d_model);  gamma: (d_model,)
    returns: (..., d_model) = x / sqrt(mean(x**2) + eps) * gamma

    Unlike layer_norm there is no mean to subtract and no shift: the vector keeps its
    direction (up to gamma) and only its size is fixed. One reduction instead of two.
    """
    out, _ = rms_norm_forward(x, gamma, eps)  # the math lives in rms_norm_forward
    return out


def rms_norm_forward(x: np.ndarray, gamma: np.ndarray, eps: float = 1e-5):
    """rms_norm(x, gamma, eps), and the cache rms_norm_backward needs.

    returns: out (..., d_model), cache = (x_hat (..., d_model), rms (..., 1), gamma)
    """
    fn = "rms_norm"
    check_float(fn, "x", x)
    check_min_ndim(fn, "x", x, 1, "(..., d_model)")
    check_shape(fn, "gamma", gamma, x.shape[-1:], "(d_model,)")
    rms = np.sqrt((x * x).mean(axis=-1, keepdims=True) + eps)  # (..., 1)
    x_hat = x / rms  # (..., d_model)
    return x_hat * gamma, (x_hat, rms, gamma)


def rms_norm_backward(dout: np.ndarray, cache) -> dict:
    """Gradients of rms_norm from dout (..., d_model).

    returns: {"dx": (..., d_model), "dgamma": (d_model,)}

    With g = dout * gamma (the gradient at x_hat), per vector:
    dx = (g - x_hat * mean(g * x_hat)) / rms
    layer_norm's formula without the -mean(g) term, since no mean was subtracted.
    """
    x_hat, rms, gamma = cache
    g = dout * gamma  # (..., d_model)
    dx = (g - x_hat * (g * x_hat).mean(axis=-1, keepdims=True)) / rms
    dgamma = (dout * x_hat).sum(axis=tuple(range(dout.ndim - 1)))  # (d_model,)
    return {"dx": dx, "dgamma": dgamma}
