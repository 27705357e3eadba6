"""One pre-norm decoder block (GPT-2's by default; the modern pieces through ``arch``)."""

import numpy as np

from qkv._arch import GPT2, Arch
from qkv._checks import BLOCK_PARAM_KEYS, QK_NORM_KEYS, check_keys

from .attention import multi_head_attention_backward, multi_head_attention_forward
from .layer_norm import layer_norm_backward, layer_norm_forward
from .mlp import mlp_backward, mlp_forward
from .rms_norm import rms_norm_backward, rms_norm_forward
from .swiglu import swiglu_backward, swiglu_forward


def norm_forward(x, gamma, beta, arch: Arch):
    """arch's norm (layer_norm, or rms_norm, which has no beta) and a cache for norm_backward."""
    if arch.norm == "rms":
        out, cache = rms_norm_forward(x, gamma, arch.norm_eps)
    else:
        out, cache = layer_norm_forward(x, gamma, beta, arch.norm_eps)
    return out, (arch.norm, cache)


def norm_backward(dout, cache) -> dict:
    """{"dx", "dgamma", "dbeta"} of norm_forward (dbeta None for rms_norm)."""
    kind, cache = cache
    if kind == "rms":
        return {**rms_norm_backward(dout, cache), "dbeta": None}
    return layer_norm_backward(dout, cache)


def decoder_block(x: np.ndarray, params: dict, n_head: int, mask=None,
                  kv_cache: dict | None = None, arch: Arch | None = None,
                  rope=None) -> np.ndarray:
    """x + attention(LN1(x)), then x + MLP(LN2(x)).

    x: (..., seq, d_model)
    params: dict with ln1_gamma ln1_beta w_qkv b_qkv w_out b_out ln2_gamma ln2_beta
            w_fc b_fc w_proj b_proj (shapes as in multi_head_attention, layer_norm and mlp)
    mask: optional bool, broadcastable to (..., seq, seq_k), ANDed with the causal mask.
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
    # the wiring lives there; nothing is kept for a backward pass
    out, _ = decoder_block_forward(x, params, n_head, mask=mask, keep_cache=False,
                                   kv_cache=kv_cache, arch=arch, rope=rope)
    return out


def decoder_block_forward(x: np.ndarray, params: dict, n_head: int, mask=None,
                          keep_cache=True, kv_cache=None, arch=None, rope=None):
    """decoder_block(x, params, n_head, mask, kv_cache, arch, rope), and the cache
    decoder_block_backward needs.

    returns: out (..., seq, d_model), cache (one cache per sublayer; None if not keep_cache,
    and then attention never stores its weights)
    """
    p, arch = params, arch or GPT2
    check_keys("decoder_block", p, BLOCK_PARAM_KEYS + (QK_NORM_KEYS if arch.qk_norm else ()))
    qk_norm = (p["q_norm_gamma"], p["k_norm_gamma"]) if arch.qk_norm else None
    mlp_forward_fn = swiglu_forward if arch.mlp == "swiglu" else mlp_forward
    h, ln1_cache = norm_forward(x, p["ln1_gamma"], p["ln1_beta"], arch)
    a, attn_cache = multi_head_attention_forward(h, p["w_qkv"], p["b_qkv"], p["w_out"],
                                                 p["b_out"], n_head, mask=mask, causal=True,
                                                 keep_cache=keep_cache, kv_cache=kv_cache,
                                                 n_kv_head=arch.n_kv_head, rope=rope,
                                                 qk_norm=qk_norm, norm_eps=arch.norm_eps)
    x = x + a  # (..., seq, d_model)
    h, ln2_cache = norm_forward(x, p["ln2_gamma"], p["ln2_beta"], arch)
    m, mlp_cache = mlp_forward_fn(h, p["w_fc"], p["b_fc"], p["w_proj"], p["b_proj"])
    x = x + m  # (..., seq, d_model)
    if not keep_cache:
        return x, None
    return x, (ln1_cache, attn_cache, ln2_cache, (arch.mlp, mlp_cache))


def decoder_block_backward(dout: np.ndarray, cache) -> dict:
    """Gradients of decoder_block from dout (..., seq, d_model).

    returns: {"dx": (..., seq, d_model), "params": {"ln1_gamma": ..., "w_qkv": ..., ...}}
             with one gradient per parameter, under the same keys and shapes as params.

    A residual x + f(x) sends its gradient two ways: unchanged along the stream, and through
    f; the two add up at x. That untouched path is why deep pre-LN stacks still train.
    """
    ln1_cache, attn_cache, ln2_cache, (mlp_kind, mlp_cache) = cache
    g_mlp = (swiglu_backward if mlp_kind == "swiglu" else mlp_backward)(dout, mlp_cache)
    g_ln2 = norm_backward(g_mlp["dx"], ln2_cache)
    dx = dout + g_ln2["dx"]  # (..., seq, d_model): the stream between the two sublayers
    g_attn = multi_head_attention_backward(dx, attn_cache)
    g_ln1 = norm_backward(g_attn["dx"], ln1_cache)
    dx = dx + g_ln1["dx"]  # (..., seq, d_model): the block's input
    grads = dict(
        ln1_gamma=g_ln1["dgamma"], ln1_beta=g_ln1["dbeta"],
        w_qkv=g_attn["dw_qkv"], b_qkv=g_attn["db_qkv"],
        w_out=g_attn["dw_out"], b_out=g_attn["db_out"],
        ln2_gamma=g_ln2["dgamma"], ln2_beta=g_ln2["dbeta"],
        w_fc=g_mlp["dw_fc"], b_fc=g_mlp["db_fc"],
        w_proj=g_mlp["dw_proj"], b_proj=g_mlp["db_proj"],
    )
    if "dq_gamma" in g_attn:  # QK-norm's scales
        grads["q_norm_gamma"], grads["k_norm_gamma"] = g_attn["dq_gamma"], g_attn["dk_gamma"]
    return {"dx": dx, "params": grads}
