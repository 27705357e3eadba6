"""The whole decoder-only model (GPT-2 layout) as one function, its loss and its backward pass."""

import numpy as np

from qkv._checks import (
    GPT2_BLOCK_KEYS,
    check_gpt2_state_dict,
    check_min_ndim,
    check_token_ids,
    shape_of,
)
from qkv._kv_cache import KVCache, check_model_cache

from .block import decoder_block_backward, decoder_block_forward
from .embedding import embed_backward, embed_forward
from .layer_norm import layer_norm_backward, layer_norm_forward
from .linear import linear_backward, linear_forward
from .loss import cross_entropy_backward, cross_entropy_forward


def gpt_forward(token_ids: np.ndarray, params: dict, n_head: int,
                kv_cache: KVCache | None = None) -> np.ndarray:
    """Token ids -> next-token logits.

    token_ids: (..., seq) integers in [0, vocab), seq <= context
    params: wte (vocab, d_model), wpe (context, d_model), blocks (list of decoder_block
            param dicts), lnf_gamma (d_model,), lnf_beta (d_model,)
    kv_cache: None, or a KVCache(n_layer) holding the keys and values of the kv_cache.pos
            tokens before these: token_ids then sit at positions pos .. pos + seq - 1, each
            block adds their keys and values to its entry, and pos advances by seq.
    returns: logits (..., seq, vocab); logits[..., t, :] scores the token after position t.

    The unembedding is tied: logits = ln_f(x) @ wte.T, so the same table maps tokens to
    vectors and vectors back to token scores.
    """
    # the steps live there; nothing is kept for a backward pass
    logits, _ = _logits_forward(token_ids, params, n_head, keep_cache=False, kv_cache=kv_cache)
    return logits


def _logits_forward(token_ids, params, n_head, keep_cache=True, kv_cache=None):
    """gpt_forward's steps, each keeping its cache: returns logits (..., seq, vocab), cache
    (None if not keep_cache)."""
    wte, wpe = params["wte"], params["wpe"]
    check_token_ids("gpt_forward", "token_ids", token_ids, vocab=wte.shape[0])
    check_min_ndim("gpt_forward", "token_ids", token_ids, 1, "(..., seq)")
    seq, context = token_ids.shape[-1], wpe.shape[0]
    if seq > context:
        raise ValueError(f"gpt_forward: seq must be <= context {context}; "
                         f"got token_ids {shape_of(token_ids)}")
    start = 0 if kv_cache is None else check_model_cache(
        "gpt_forward", kv_cache, len(params["blocks"]), seq, context)
    x, embed_cache = embed_forward(token_ids, wte)  # (..., seq, d_model)
    x = x + wpe[start:start + seq]  # (..., seq, d_model): token + learned position
    block_caches = []
    for i, block in enumerate(params["blocks"]):
        layer = None if kv_cache is None else kv_cache.layers[i]
        # (..., seq, d_model)
        x, cache = decoder_block_forward(x, block, n_head, keep_cache=keep_cache, kv_cache=layer)
        block_caches.append(cache)
    if kv_cache is not None:
        kv_cache.pos += seq
    x, lnf_cache = layer_norm_forward(x, params["lnf_gamma"], params["lnf_beta"])
    # Tied unembedding: a linear layer whose weight is wte.T, (d_model, vocab).
    logits, unembed_cache = linear_forward(x, wte.T)  # (..., seq, vocab)
    if not keep_cache:
        return logits, None
    return logits, (embed_cache, wpe.shape, block_caches, lnf_cache, unembed_cache)


def _logits_backward(dlogits, cache) -> dict:
    """_logits_forward in reverse: dlogits (..., seq, vocab) -> gradients shaped like params."""
    embed_cache, wpe_shape, block_caches, lnf_cache, unembed_cache = cache
    g_unembed = linear_backward(dlogits, unembed_cache)
    g_lnf = layer_norm_backward(g_unembed["dx"], lnf_cache)
    dx = g_lnf["dx"]  # (..., seq, d_model)
    dblocks = []
    for block_cache in reversed(block_caches):
        g_block = decoder_block_backward(dx, block_cache)
        dx = g_block["dx"]  # (..., seq, d_model)
        dblocks.append(g_block["params"])
    seq, d_model = dx.shape[-2:]
    dwpe = np.zeros(wpe_shape, dtype=dx.dtype)  # (context, d_model): rows past seq unused
    dwpe[:seq] = dx.reshape(-1, seq, d_model).sum(axis=0)  # every sequence used the same rows
    # wte is used twice, to embed the tokens and (transposed) to unembed: the gradients add.
    dwte = embed_backward(dx, embed_cache)["dtable"] + g_unembed["dw"].T  # (vocab, d_model)
    return dict(wte=dwte, wpe=dwpe, blocks=dblocks[::-1],
                lnf_gamma=g_lnf["dgamma"], lnf_beta=g_lnf["dbeta"])


def gpt_loss_forward(token_ids: np.ndarray, targets: np.ndarray, params: dict, n_head: int):
    """The mean next-token cross-entropy of gpt_forward's logits, and the cache for backward.

    token_ids: (..., seq) integers in [0, vocab);  targets: (..., seq), usually token_ids
               shifted left by one; -1 marks a position to ignore (as GPT.forward does).
    params, n_head: as in gpt_forward.
    returns: loss (a NumPy scalar), cache
    """
    logits, logits_cache = _logits_forward(token_ids, params, n_head)  # (..., seq, vocab)
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
        t = state_dict[key]
        if hasattr(t, "detach"):  # a torch tensor (qkv.np does not import torch)
            t = t.detach().cpu().numpy()
        return np.array(t)  # a copy: training these params must not change the checkpoint

    return dict(
        wte=array("transformer.wte.weight"),
        wpe=array("transformer.wpe.weight"),
        blocks=[{name: array(f"transformer.h.{i}.{key}") for name, key in GPT2_BLOCK_KEYS.items()}
                for i in range(n_layer)],
        lnf_gamma=array("transformer.ln_f.weight"),
        lnf_beta=array("transformer.ln_f.bias"),
    )
