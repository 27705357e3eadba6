"""One pre-LN decoder block (GPT-2)."""

import torch

from qkv._checks import BLOCK_PARAM_KEYS, check_keys

from .attention import multi_head_attention
from .layer_norm import layer_norm
from .mlp import mlp


def decoder_block(x: torch.Tensor, params: dict, n_head: int, mask=None,
                  fused: bool = False, kv_cache: dict | None = None) -> torch.Tensor:
    """x + attention(LN1(x)), then x + MLP(LN2(x)).

    x: (..., seq, d_model)
    params: dict with ln1_gamma ln1_beta w_qkv b_qkv w_out b_out ln2_gamma ln2_beta
            w_fc b_fc w_proj b_proj (shapes as in multi_head_attention, layer_norm and mlp)
    mask: optional bool, broadcastable to (..., seq, seq_k), ANDed with the causal mask.
    fused: torch's fused kernels for attention, layer norm, GELU and the linear layers.
    kv_cache: None, or this block's entry of a KVCache (a dict): attention appends x's keys and
        values to it and attends over all cached positions (see multi_head_attention).
    returns: (..., seq, d_model)

    Pre-LN: each sublayer reads a normalized copy of the residual stream and adds its result
    back, so the stream itself is never normalized and gradients flow straight through the sums.
    """
    p = params
    check_keys("decoder_block", p, BLOCK_PARAM_KEYS)
    h = layer_norm(x, p["ln1_gamma"], p["ln1_beta"], fused=fused)
    x = x + multi_head_attention(h, p["w_qkv"], p["b_qkv"], p["w_out"], p["b_out"], n_head,
                                 mask=mask, causal=True, fused=fused, kv_cache=kv_cache)
    h = layer_norm(x, p["ln2_gamma"], p["ln2_beta"], fused=fused)
    x = x + mlp(h, p["w_fc"], p["b_fc"], p["w_proj"], p["b_proj"], fused=fused)
    return x  # (..., seq, d_model)
