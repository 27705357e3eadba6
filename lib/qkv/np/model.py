"""The whole decoder-only model (GPT-2 layout) as one function."""

import numpy as np

from qkv._checks import check_min_ndim, check_token_ids, shape_of

from .block import decoder_block
from .embedding import embed
from .layer_norm import layer_norm


def gpt_forward(token_ids: np.ndarray, params: dict, n_head: int) -> np.ndarray:
    """Token ids -> next-token logits.

    token_ids: (..., seq) integers in [0, vocab), seq <= context
    params: wte (vocab, d_model), wpe (context, d_model), blocks (list of decoder_block
            param dicts), lnf_gamma (d_model,), lnf_beta (d_model,)
    returns: logits (..., seq, vocab); logits[..., t, :] scores the token after position t.

    The unembedding is tied: logits = ln_f(x) @ wte.T, so the same table maps tokens to
    vectors and vectors back to token scores.
    """
    wte, wpe = params["wte"], params["wpe"]
    check_token_ids("gpt_forward", "token_ids", token_ids, vocab=wte.shape[0])
    check_min_ndim("gpt_forward", "token_ids", token_ids, 1, "(..., seq)")
    seq, context = token_ids.shape[-1], wpe.shape[0]
    if seq > context:
        raise ValueError(f"gpt_forward: seq must be <= context {context}; "
                         f"got token_ids {shape_of(token_ids)}")
    x = embed(token_ids, wte) + wpe[:seq]  # (..., seq, d_model): token + learned position
    for block in params["blocks"]:
        x = decoder_block(x, block, n_head)  # (..., seq, d_model)
    x = layer_norm(x, params["lnf_gamma"], params["lnf_beta"])
    return x @ wte.T  # (..., seq, vocab)
