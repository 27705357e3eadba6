"""GELU activation, tanh approximation (the one GPT-2 uses)."""

import math

import numpy as np

from qkv._checks import check_float


def gelu(x: np.ndarray) -> np.ndarray:
    """0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))), elementwise; same shape as x.

    A smooth ReLU: about x for large x, about 0 for very negative x, slightly negative near -0.75.
    """
    check_float("gelu", "x", x)
    # math.sqrt, not np.sqrt: a Python float keeps float32 inputs float32 (NumPy 2 promotion).
    return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))
