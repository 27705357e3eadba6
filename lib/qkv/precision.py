"""Mixed precision: which number format the matmuls run in, chosen by name.

Under ``torch.autocast(device, dtype=torch.bfloat16)`` matmuls and attention run in bfloat16
(half the bytes, and on GPUs the tensor cores' fastest path) while the weights, their gradients
and the optimizer state stay float32, and ops that need range or accuracy (softmax, layer norm,
the loss) run in float32 (Micikevicius et al. 2018). bfloat16 has float32's 8 exponent bits, so
its range is float32's and gradients need no loss scaling; float16 (5 exponent bits) would
underflow small gradients without it, which is why qkv.train offers bfloat16 only.
"""

from contextlib import nullcontext

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """``auto``: bfloat16 on CUDA (fast and safe there), float32 on the CPU (exact, and CPU
    bfloat16 matmuls are slower than float32 on most cores); otherwise the named format."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if name not in DTYPES:
        raise ValueError(f"dtype must be auto, {' or '.join(DTYPES)}; got {name!r}")
    return DTYPES[name]


def autocast_for(device: torch.device, dtype: torch.dtype):
    """A callable that opens the autocast context for ``dtype`` (nothing for float32)."""
    if dtype == torch.float32:
        return nullcontext
    return lambda: torch.autocast(device.type, dtype=dtype)
