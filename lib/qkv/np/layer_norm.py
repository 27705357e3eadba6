"""Layer normalization over the feature axis."""

import numpy as np

from qkv._checks import check_float, check_min_ndim, check_shape


def layer_norm(x: np.ndarray, gamma: np.ndarray, beta: np.ndarray | None,
               eps: float = 1e-5) -> np.ndarray:
    """Normalize each vector to mean 0 / variance 1, then scale by gamma and shift by beta.

    x: (..., d_model);  gamma, beta: (d_model,) (beta may be None: no shift)
    returns: (..., d_model)

    The variance is the biased one (divide by d_model, as GPT-2 and torch.nn.LayerNorm do);
    eps sits inside the square root so a constant vector does not divide by zero.
    """
    out, _ = layer_norm_forward(x, gamma, beta, eps)  # the math lives in layer_norm_forward
    return out


def layer_norm_forward(x: np.ndarray, gamma: np.ndarray, beta: np.ndarray | None,
                       eps: float = 1e-5):
    """layer_norm(x, gamma, beta, eps), and the cache layer_norm_backward needs.

    returns: out (..., d_model), cache = (x_hat (..., d_model), std (..., 1), gamma,
             whether there is a beta)
    """
    fn = "layer_norm"
    check_float(fn, "x", x)
    check_min_ndim(fn, "x", x, 1, "(..., d_model)")
    check_shape(fn, "gamma", gamma, x.shape[-1:], "(d_model,)")
    mean = x.mean(axis=-1, keepdims=True)  # (..., 1)
    var = ((x - mean) ** 2).mean(axis=-1, keepdims=True)  # (..., 1) biased variance
    std = np.sqrt(var + eps)  # (..., 1)
    x_hat = (x - mean) / std  # (..., d_model)
    y = x_hat * gamma
    if beta is not None:
        check_shape(fn, "beta", beta, x.shape[-1:], "(d_model,)")
        y = y + beta
    return y, (x_hat, std, gamma, beta is not None)


def layer_norm_backward(dout: np.ndarray, cache) -> dict:
    """Gradients of layer_norm from dout (..., d_model).

    returns: {"dx": (..., d_model), "dgamma": (d_model,), "dbeta": (d_model,) or None}

    Every x_i moves the mean and the variance, which every output depends on, so dx is not
    just dx_hat / std: with g = dout * gamma (the gradient at x_hat), per vector,
    dx = (g - mean(g) - x_hat * mean(g * x_hat)) / std
    where -mean(g) comes through the mean and -x_hat * mean(g * x_hat) through the variance.
    """
    x_hat, std, gamma, has_beta = cache
    g = dout * gamma  # (..., d_model): gradient at x_hat
    dx = (g - g.mean(axis=-1, keepdims=True)
          - x_hat * (g * x_hat).mean(axis=-1, keepdims=True)) / std  # (..., d_model)
    lead = tuple(range(dout.ndim - 1))  # gamma and beta serve every position: sum over them
    dgamma = (dout * x_hat).sum(axis=lead)  # (d_model,)
    dbeta = dout.sum(axis=lead) if has_beta else None  # (d_model,)
    return {"dx": dx, "dgamma": dgamma, "dbeta": dbeta}
