"""GELU activation, tanh approximation (the one GPT-2 uses)."""

import math

import torch
import torch.nn.functional as F

from qkv._checks import check_float


def gelu(x: torch.Tensor, fused: bool = False) -> torch.Tensor:
    """0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))), elementwise; same shape as x.

    A smooth ReLU: about x for large x, about 0 for very negative x, slightly negative near -0.75.
    Same as torch.nn.functional.gelu(x, approximate="tanh"), which fused=True calls (one
    kernel instead of seven).
    """
    check_float("gelu", "x", x)
    if fused:
        return F.gelu(x, approximate="tanh")
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))
