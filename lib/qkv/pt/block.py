"""One pre-norm decoder block (GPT-2's by default; the modern pieces through ``arch``)."""

import torch

from qkv._arch import GPT2, Arch
from qkv._checks import BLOCK_PARAM_KEYS, QK_NORM_KEYS, check_keys

from .attention import multi_head_attention
from .layer_norm import layer_norm
from .mlp import mlp
from .rms_norm import rms_norm
from .swiglu import swiglu


def norm(x, gamma, beta, arch: Arch, fused: bool = False):
    """arch's norm: layer_norm, or rms_norm (which has no beta)."""
    if arch.norm == "rms":
        return rms_norm(x, gamma, arch.norm_eps, fused=fused)
    return layer_norm(x, gamma, beta, arch.norm_eps, fused=fused)


def decoder_block(x: torch.Tensor, params: dict, n_head: int, mask=None,
                  fused: bool = False, kv_cache: dict | None = None, arch: Arch | None = None,
                  rope=None) -> torch.Tensor:
    """x + attention(LN1(x)), then x + MLP(LN2(x)).

    x: (..., seq, d_model)
    params: dict with ln1_gamma ln1_beta w_qkv b_qkv w_out b_out ln2_gamma ln2_beta
            w_fc b_fc w_proj b_proj (shapes as in multi_head_attention, layer_norm and mlp)
    mask: optional bool, broadcastable to (..., seq, seq_k), ANDed with the causal mask.
    fused: torch's fused kernels for attention, layer norm, GELU and the linear layers.
    kv_cache: None, or this block's entry of a KVCache (a dict): attention appends x's keys and
        values to it and attends over all cached positions (see multi_head_attention).
    arch: the pieces (qkv.Arch; None: GPT-2): norm "rms" uses ln*_gamma only (ln*_beta None),
        mlp "swiglu" reads w_fc as [gate | up], n_kv_head shapes w_qkv, and qk_norm adds
        q_norm_gamma and k_norm_gamma (d_head,) to params.
    rope: None, or (cos, sin) for x's positions (rope_table), with arch.position "rope".
    returns: (..., seq, d_model)

    Pre-LN: each sublayer reads a normalized copy of the residual stream and adds its result
    back, so the stream itself is never normalized and gradients flow straight through the sums.
    """
    p, arch = params, arch or GPT2
    check_keys("decoder_block", p, BLOCK_PARAM_KEYS + (QK_NORM_KEYS if arch.qk_norm else ()))
    qk_norm = (p["q_norm_gamma"], p["k_norm_gamma"]) if arch.qk_norm else None
    h = norm(x, p["ln1_gamma"], p["ln1_beta"], arch, fused=fused)
    x = x + multi_head_attention(h, p["w_qkv"], p["b_qkv"], p["w_out"], p["b_out"], n_head,
                                 mask=mask, causal=True, fused=fused, kv_cache=kv_cache,
                                 n_kv_head=arch.n_kv_head, rope=rope, qk_norm=qk_norm,
                                 norm_eps=arch.norm_eps)
    h = norm(x, p["ln2_gamma"], p["ln2_beta"], arch, fused=fused)
    feed_forward = swiglu if arch.mlp == "swiglu" else mlp
    x = x + feed_forward(h, p["w_fc"], p["b_fc"], p["w_proj"], p["b_proj"], fused=fused)
    return x  # (..., seq, d_model)
