"""The whole decoder-only model (GPT-2 layout, or a modern one through ``arch``) as one
function, its loss and its backward pass."""

import numpy as np

from qkv._arch import GPT2, Arch
from qkv._checks import (
    GPT2_BLOCK_KEYS,
    check_gpt2_state_dict,
    check_min_ndim,
    check_token_ids,
    shape_of,
)
from qkv._kv_cache import KVCache, check_model_cache
from qkv._llama import EMBED, FINAL_NORM, HEAD, block_key, check_llama_state_dict

from .block import decoder_block_backward, decoder_block_forward, norm_backward, norm_forward
from .embedding import embed_backward, embed_forward
from .linear import linear_backward, linear_forward
from .loss import cross_entropy_backward, cross_entropy_forward
from .rope import rope_table


def gpt_forward(token_ids: np.ndarray, params: dict, n_head: int,
                kv_cache: KVCache | None = None, arch: Arch | None = None) -> np.ndarray:
    """Token ids -> next-token logits.

    token_ids: (..., seq) integers in [0, vocab), seq <= context
    params: wte (vocab, d_model), wpe (context, d_model), blocks (list of decoder_block
            param dicts), lnf_gamma (d_model,), lnf_beta (d_model,)
    kv_cache: None, or a KVCache(n_layer) holding the keys and values of the kv_cache.pos
            tokens before these: token_ids then sit at positions pos .. pos + seq - 1, each
            block adds their keys and values to its entry, and pos advances by seq.
    arch: the pieces (qkv.Arch; None: GPT-2). With position "rope" there is no wpe: q and k
            are rotated by rope_table(seq, d_head, arch.rope_theta, start=pos) in every block,
            and any seq is accepted (RoPE has no table of positions to run out of).
    returns: logits (..., seq, vocab); logits[..., t, :] scores the token after position t.

    The unembedding is tied: logits = ln_f(x) @ wte.T, so the same table maps tokens to
    vectors and vectors back to token scores; unless params has w_unembed (d_model, vocab),
    an untied head (as in most Llama models), then logits = ln_f(x) @ w_unembed.
    """
    # the steps live there; nothing is kept for a backward pass
    logits, _ = _logits_forward(token_ids, params, n_head, keep_cache=False, kv_cache=kv_cache,
                                arch=arch)
    return logits


def _logits_forward(token_ids, params, n_head, keep_cache=True, kv_cache=None, arch=None):
    """gpt_forward's steps, each keeping its cache: returns logits (..., seq, vocab), cache
    (None if not keep_cache)."""
    arch = arch or GPT2
    wte = params["wte"]
    check_token_ids("gpt_forward", "token_ids", token_ids, vocab=wte.shape[0])
    check_min_ndim("gpt_forward", "token_ids", token_ids, 1, "(..., seq)")
    learned = arch.position == "learned"
    if learned and "wpe" not in params:
        raise KeyError("gpt_forward: params has no wpe; pass arch=Arch(position='rope', ...) "
                       "for a model with rotary positions")
    seq = token_ids.shape[-1]
    context = params["wpe"].shape[0] if learned else float("inf")
    if seq > context:
        raise ValueError(f"gpt_forward: seq must be <= context {context}; "
                         f"got token_ids {shape_of(token_ids)}")
    start = 0 if kv_cache is None else check_model_cache(
        "gpt_forward", kv_cache, len(params["blocks"]), seq, context)
    x, embed_cache = embed_forward(token_ids, wte)  # (..., seq, d_model)
    rope = None
    if learned:
        x = x + params["wpe"][start:start + seq]  # (..., seq, d_model): token + learned position
    else:  # the positions enter inside attention, as rotations of q and k
        cos, sin = rope_table(seq, wte.shape[1] // n_head, arch.rope_theta, start)
        rope = (cos.astype(x.dtype), sin.astype(x.dtype))  # (seq, d_head/2) each
    block_caches = []
    for i, block in enumerate(params["blocks"]):
        layer = None if kv_cache is None else kv_cache.layers[i]
        # (..., seq, d_model)
        x, cache = decoder_block_forward(x, block, n_head, keep_cache=keep_cache, kv_cache=layer,
                                         arch=arch, rope=rope)
        block_caches.append(cache)
    if kv_cache is not None:
        kv_cache.pos += seq
    x, lnf_cache = norm_forward(x, params["lnf_gamma"], params.get("lnf_beta"), arch)
    # Tied unembedding: a linear layer whose weight is wte.T, (d_model, vocab).
    w_unembed = params.get("w_unembed")
    logits, unembed_cache = linear_forward(x, wte.T if w_unembed is None else w_unembed)
    if not keep_cache:
        return logits, None
    wpe_shape = params["wpe"].shape if learned else None
    return logits, (embed_cache, wpe_shape, block_caches, lnf_cache, unembed_cache,
                    w_unembed is not None)


def _logits_backward(dlogits, cache) -> dict:
    """_logits_forward in reverse: dlogits (..., seq, vocab) -> gradients shaped like params."""
    embed_cache, wpe_shape, block_caches, lnf_cache, unembed_cache, untied = cache
    g_unembed = linear_backward(dlogits, unembed_cache)
    g_lnf = norm_backward(g_unembed["dx"], lnf_cache)
    dx = g_lnf["dx"]  # (..., seq, d_model)
    dblocks = []
    for block_cache in reversed(block_caches):
        g_block = decoder_block_backward(dx, block_cache)
        dx = g_block["dx"]  # (..., seq, d_model)
        dblocks.append(g_block["params"])
    seq, d_model = dx.shape[-2:]
    dwte = embed_backward(dx, embed_cache)["dtable"]  # (vocab, d_model)
    grads = dict(wte=dwte, blocks=dblocks[::-1], lnf_gamma=g_lnf["dgamma"],
                 lnf_beta=g_lnf["dbeta"])
    if untied:
        grads["w_unembed"] = g_unembed["dw"]  # (d_model, vocab)
    else:  # wte is used twice, to embed and (transposed) to unembed: the gradients add.
        grads["wte"] = dwte + g_unembed["dw"].T
    if wpe_shape is not None:
        dwpe = np.zeros(wpe_shape, dtype=dx.dtype)  # (context, d_model): rows past seq unused
        dwpe[:seq] = dx.reshape(-1, seq, d_model).sum(axis=0)  # every sequence, the same rows
        grads["wpe"] = dwpe
    return grads


def gpt_loss_forward(token_ids: np.ndarray, targets: np.ndarray, params: dict, n_head: int,
                     arch: Arch | None = None):
    """The mean next-token cross-entropy of gpt_forward's logits, and the cache for backward.

    token_ids: (..., seq) integers in [0, vocab);  targets: (..., seq), usually token_ids
               shifted left by one; -1 marks a position to ignore (as GPT.forward does).
    params, n_head, arch: as in gpt_forward.
    returns: loss (a NumPy scalar), cache
    """
    logits, logits_cache = _logits_forward(token_ids, params, n_head, arch=arch)
    loss, loss_cache = cross_entropy_forward(logits, targets, ignore_index=-1)
    return loss, (logits_cache, loss_cache)


def gpt_loss_backward(cache) -> dict:
    """The gradient of gpt_loss_forward's loss with respect to every parameter.

    returns: a dict with the structure of params: wte (vocab, d_model), wpe (context, d_model),
             blocks (list of dicts, keys as in decoder_block), lnf_gamma, lnf_beta (d_model,).
    wte's gradient holds both of its uses: the embedding (rows of the tokens that occur) and
    the tied unembedding (every row).
    """
    logits_cache, loss_cache = cache
    dlogits = cross_entropy_backward(1.0, loss_cache)["dlogits"]  # (..., seq, vocab)
    return _logits_backward(dlogits, logits_cache)


def params_from_gpt2_state_dict(state_dict) -> dict:
    """gpt_forward's params from a Hugging Face GPT-2 state dict (GPT2LMHeadModel.state_dict()).

    state_dict: name -> torch tensor or NumPy array, under GPT-2's names: transformer.wte.weight,
        transformer.wpe.weight, transformer.h.{i}.ln_1.weight, ....attn.c_attn.weight, ...,
        transformer.ln_f.{weight,bias}; lm_head.weight may be absent (it is wte, tied).
    returns: params for gpt_forward and gpt_loss_forward, as NumPy copies in the state dict's
        dtype. n_head is not in the weights: take it from the model's config (GPT2Config.n_head).

    Missing or unexpected keys raise a KeyError listing them. GPT-2's Conv1D layers store
    weights (d_in, d_out), as qkv does, so nothing is transposed.
    """
    n_layer = check_gpt2_state_dict("params_from_gpt2_state_dict", state_dict)

    def array(key):
        return _array(state_dict[key])

    return dict(
        wte=array("transformer.wte.weight"),
        wpe=array("transformer.wpe.weight"),
        blocks=[{name: array(f"transformer.h.{i}.{key}") for name, key in GPT2_BLOCK_KEYS.items()}
                for i in range(n_layer)],
        lnf_gamma=array("transformer.ln_f.weight"),
        lnf_beta=array("transformer.ln_f.bias"),
    )


def _array(t) -> np.ndarray:
    if hasattr(t, "detach"):  # a torch tensor (qkv.np does not import torch)
        t = t.detach().cpu().numpy()
    return np.array(t)  # a copy: training these params must not change the checkpoint


def params_from_llama_state_dict(state_dict) -> dict:
    """gpt_forward's params from a Hugging Face Llama state dict (LlamaForCausalLM.state_dict()).

    state_dict: name -> torch tensor or NumPy array under Llama's names: model.embed_tokens,
        model.layers.{i}.input_layernorm / self_attn.{q,k,v,o}_proj / post_attention_layernorm
        / mlp.{gate,up,down}_proj, model.norm, and lm_head (absent or equal to the embedding
        when tied).
    returns: params for gpt_forward with arch=Arch(norm="rms", position="rope", mlp="swiglu",
        n_kv_head=..., rope_theta=..., norm_eps=...): the weights cannot tell n_head,
        n_kv_head, rope_theta or norm_eps, so take them from the model's LlamaConfig. No wpe
        (RoPE), no biases or norm shifts (None); w_unembed (d_model, vocab) when the head is
        untied.

    KeyError for missing or unexpected keys (e.g. a GPT-2 state dict, or attention biases).
    Matrices are transposed to qkv's (d_in, d_out); q, k, v side by side form w_qkv.
    """
    n_layer, tied = check_llama_state_dict("params_from_llama_state_dict", state_dict)

    def t(key):  # (d_out, d_in) -> (d_in, d_out)
        return _array(state_dict[key]).T.copy()

    def block(i):
        part = {name: t(block_key(i, name)) for name in ("q", "k", "v", "o", "gate", "up",
                                                         "down")}
        return dict(
            ln1_gamma=_array(state_dict[block_key(i, "ln1")]), ln1_beta=None,
            w_qkv=np.concatenate([part["q"], part["k"], part["v"]], axis=1), b_qkv=None,
            w_out=part["o"], b_out=None,
            ln2_gamma=_array(state_dict[block_key(i, "ln2")]), ln2_beta=None,
            w_fc=np.concatenate([part["gate"], part["up"]], axis=1), b_fc=None,
            w_proj=part["down"], b_proj=None,
        )

    params = dict(wte=_array(state_dict[EMBED]), blocks=[block(i) for i in range(n_layer)],
                  lnf_gamma=_array(state_dict[FINAL_NORM]), lnf_beta=None)
    if not tied:
        params["w_unembed"] = t(HEAD)  # (d_model, vocab)
    return params
