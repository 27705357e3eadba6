"""GELU activation, tanh approximation (the one GPT-2 uses)."""

import math

import numpy as np

from qkv._checks import check_float

# math.sqrt, not np.sqrt: a Python float keeps float32 inputs float32 (NumPy 2 promotion).
_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)


def gelu(x: np.ndarray) -> np.ndarray:
    """0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))), elementwise; same shape as x.

    A smooth ReLU: about x for large x, about 0 for very negative x, slightly negative near -0.75.
    """
    out, _ = gelu_forward(x)  # the formula lives in gelu_forward, which also keeps the tanh
    return out


def gelu_forward(x: np.ndarray):
    """gelu(x), and the cache gelu_backward needs: (x, the tanh term), so it is not recomputed.

    x: (...) -> out (...), cache
    """
    check_float("gelu", "x", x)
    # t = tanh(sqrt(2/pi) (x + 0.044715 x^3)), built in one array: each step overwrites it
    # instead of allocating a new x-sized temporary (the MLP's x is the model's largest).
    # x * x * x, not x**3: NumPy's float32 power is a slow general pow (about 30x slower).
    t = x * x
    t *= x
    t *= 0.044715
    t += x
    t *= _SQRT_2_OVER_PI
    np.tanh(t, out=t)
    out = t + 1.0
    out *= x
    out *= 0.5  # 0.5 x (1 + t)
    return out, (x, t)


def gelu_backward(dout: np.ndarray, cache) -> dict:
    """Gradient of gelu: dout (...) -> {"dx": (...)}.

    With u = sqrt(2/pi) (x + 0.044715 x^3) and t = tanh(u), gelu = 0.5 x (1 + t), so
    d gelu/dx = 0.5 (1 + t) + 0.5 x (1 - t^2) du/dx   (tanh' = 1 - tanh^2),
    du/dx = sqrt(2/pi) (1 + 3 * 0.044715 x^2).
    """
    x, t = cache
    du_dx = _SQRT_2_OVER_PI * (1.0 + 3 * 0.044715 * x**2)
    return {"dx": dout * (0.5 * (1.0 + t) + 0.5 * x * (1.0 - t**2) * du_dx)}
