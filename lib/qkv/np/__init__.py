"""qkv.np: the NumPy reference, one module per concept.

Same names, argument order and keywords as ``qkv.pt``. Weights are explicit arguments,
stored (d_in, d_out) and applied as ``x @ w + b``. Shapes use the vocabulary
batch seq d_model n_head d_head vocab ("..." = any leading dims).
"""

from .attention import merge_heads, multi_head_attention, scaled_dot_product_attention, split_heads
from .block import decoder_block
from .embedding import embed
from .gelu import gelu
from .layer_norm import layer_norm
from .linear import linear
from .loss import cross_entropy
from .masking import causal_mask
from .mlp import mlp
from .model import gpt_forward
from .positional import sinusoidal_positional_encoding
from .softmax import softmax

__all__ = [
    "causal_mask",
    "cross_entropy",
    "decoder_block",
    "embed",
    "gelu",
    "gpt_forward",
    "layer_norm",
    "linear",
    "merge_heads",
    "mlp",
    "multi_head_attention",
    "scaled_dot_product_attention",
    "sinusoidal_positional_encoding",
    "softmax",
    "split_heads",
]
