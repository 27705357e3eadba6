"""qkv.np: the NumPy reference, one module per concept.

Same names, argument order and keywords as ``qkv.pt``. Weights are explicit arguments,
stored (d_in, d_out) and applied as ``x @ w + b``. Shapes use the vocabulary
batch seq d_model n_head d_head vocab ("..." = any leading dims).

Backpropagation by hand: next to each function sits a pair ``*_forward(...) -> (out, cache)``
and ``*_backward(dout, cache) -> dict of gradients`` (shaped like the inputs they belong to).
The math is written once: where backward needs only the inputs and the output (linear,
softmax, attention), ``*_forward`` calls the plain function and keeps them; where it needs
intermediate values (layer norm's x_hat, gelu's tanh, the loss's softmax), the plain function
calls ``*_forward`` and drops the cache. ``qkv.np.gradcheck`` checks a backward numerically.
"""

from qkv._arch import Arch
from qkv._kv_cache import KVCache

from .attention import (
    attention_backward,
    attention_forward,
    merge_heads,
    multi_head_attention,
    multi_head_attention_backward,
    multi_head_attention_forward,
    scaled_dot_product_attention,
    split_heads,
)
from .block import decoder_block, decoder_block_backward, decoder_block_forward
from .embedding import embed, embed_backward, embed_forward
from .flash import (
    flash_attention,
    flash_attention_backward,
    flash_attention_forward,
    streaming_logsumexp,
    streaming_softmax,
)
from .gelu import gelu, gelu_backward, gelu_forward
from .generate import filter_top_k, filter_top_p, generate
from .gqa import repeat_kv, repeat_kv_backward
from .gradcheck import numerical_gradient, relative_error
from .layer_norm import layer_norm, layer_norm_backward, layer_norm_forward
from .linear import linear, linear_backward, linear_forward
from .loss import cross_entropy, cross_entropy_backward, cross_entropy_forward
from .masking import causal_mask
from .mlp import mlp, mlp_backward, mlp_forward
from .model import (
    gpt_forward,
    gpt_loss_backward,
    gpt_loss_forward,
    params_from_gpt2_state_dict,
    params_from_llama_state_dict,
)
from .positional import sinusoidal_positional_encoding
from .rms_norm import rms_norm, rms_norm_backward, rms_norm_forward
from .rope import rope, rope_backward, rope_forward, rope_table
from .softmax import softmax, softmax_backward, softmax_forward
from .swiglu import silu, silu_backward, silu_forward, swiglu, swiglu_backward, swiglu_forward
from .train import (
    adamw_init,
    adamw_step,
    clip_grad_norm,
    flatten_params,
    train_numpy,
    unflatten_params,
)

__all__ = [
    "Arch",
    "KVCache",
    "adamw_init",
    "adamw_step",
    "attention_backward",
    "attention_forward",
    "causal_mask",
    "clip_grad_norm",
    "cross_entropy",
    "cross_entropy_backward",
    "cross_entropy_forward",
    "decoder_block",
    "decoder_block_backward",
    "decoder_block_forward",
    "embed",
    "embed_backward",
    "embed_forward",
    "flash_attention",
    "flash_attention_backward",
    "flash_attention_forward",
    "flatten_params",
    "gelu",
    "gelu_backward",
    "gelu_forward",
    "generate",
    "filter_top_k",
    "filter_top_p",
    "gpt_forward",
    "gpt_loss_backward",
    "gpt_loss_forward",
    "layer_norm",
    "layer_norm_backward",
    "layer_norm_forward",
    "linear",
    "linear_backward",
    "linear_forward",
    "merge_heads",
    "mlp",
    "mlp_backward",
    "mlp_forward",
    "multi_head_attention",
    "multi_head_attention_backward",
    "multi_head_attention_forward",
    "numerical_gradient",
    "params_from_gpt2_state_dict",
    "params_from_llama_state_dict",
    "relative_error",
    "repeat_kv",
    "repeat_kv_backward",
    "rms_norm",
    "rms_norm_backward",
    "rms_norm_forward",
    "rope",
    "rope_backward",
    "rope_forward",
    "rope_table",
    "scaled_dot_product_attention",
    "silu",
    "silu_backward",
    "silu_forward",
    "sinusoidal_positional_encoding",
    "softmax",
    "softmax_backward",
    "softmax_forward",
    "split_heads",
    "streaming_logsumexp",
    "streaming_softmax",
    "swiglu",
    "swiglu_backward",
    "swiglu_forward",
    "train_numpy",
    "unflatten_params",
]
