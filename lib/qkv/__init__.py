"""qkv: reference implementations for a course on decoder-only transformers.

Two mirrored backends with the same function names and arguments:

- ``qkv.np``: NumPy, for reading and for the by-hand chapters.
- ``qkv.pt``: PyTorch, runs on CPU or CUDA and follows the dtype of its inputs; adds
  ``GPTConfig`` and ``GPT``.

Import the backend you need (``from qkv import np as qnp`` or ``import qkv.pt as qpt``);
importing ``qkv`` itself does not import torch.
"""

__version__ = "0.1.0"
