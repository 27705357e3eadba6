"""qkv.pt: the PyTorch reference, mirroring qkv.np function for function.

Same names, argument order and keywords as ``qkv.np``; the functions torch has a fused kernel
for (linear, layer_norm, gelu, mlp, cross_entropy, the attention functions, decoder_block) add
one keyword, ``fused``: the same math through that kernel instead of the naive path. Results
follow the device and dtype of the inputs (CPU or CUDA; float32, float64, bfloat16).
``GPTConfig`` and ``GPT`` wrap the pure functions in GPT-2's module layout.
"""

from qkv._arch import Arch
from qkv._kv_cache import KVCache

from .attention import merge_heads, multi_head_attention, scaled_dot_product_attention, split_heads
from .block import decoder_block
from .embedding import embed
from .gelu import gelu
from .generate import filter_top_k, filter_top_p, generate
from .gqa import repeat_kv
from .layer_norm import layer_norm
from .linear import linear
from .loss import cross_entropy
from .masking import causal_mask
from .mlp import mlp
from .model import GPT, GPTConfig, load_gpt2_weights
from .positional import sinusoidal_positional_encoding
from .rms_norm import rms_norm
from .rope import rope, rope_table
from .softmax import softmax
from .swiglu import silu, swiglu

__all__ = [
    "Arch",
    "KVCache",
    "GPT",
    "GPTConfig",
    "causal_mask",
    "cross_entropy",
    "decoder_block",
    "embed",
    "filter_top_k",
    "filter_top_p",
    "flash_attention",
    "gelu",
    "generate",
    "layer_norm",
    "linear",
    "load_gpt2_weights",
    "merge_heads",
    "mlp",
    "multi_head_attention",
    "repeat_kv",
    "rms_norm",
    "rope",
    "rope_table",
    "scaled_dot_product_attention",
    "silu",
    "sinusoidal_positional_encoding",
    "softmax",
    "split_heads",
    "swiglu",
]


def __getattr__(name):
    # flash_attention imports triton (seconds, and its interpreter without a GPU): load it on
    # first use of qkv.pt.flash_attention, not on every import of qkv.pt.
    if name == "flash_attention":
        from .flash import flash_attention

        return flash_attention
    raise AttributeError(f"module 'qkv.pt' has no attribute {name!r}")
