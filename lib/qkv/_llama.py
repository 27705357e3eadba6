"""Hugging Face Llama (LlamaForCausalLM) state dicts: the names, shared by ``qkv.np`` and
``qkv.pt``, and the check that a state dict has them.

Llama's nn.Linear layers store weights (d_out, d_in); qkv stores (d_in, d_out), so every
matrix is transposed on the way in. Its q, k and v projections are three matrices; qkv's w_qkv
is their columns side by side, [Q | K | V], as GPT-2's c_attn; gate_proj and up_proj become
w_fc's [gate | up]. Hugging Face's Llama rotates with the half-split RoPE layout, which is
qkv's model layout, so q_proj and k_proj load as they are (Meta's original checkpoints use the
interleaved layout; Hugging Face's conversion script permutes their rows).
"""

import re

from qkv._checks import check_ndim, shape_of

# Where LlamaForCausalLM keeps each block's weights, under model.layers.{i}.
LLAMA_BLOCK_KEYS = {
    "ln1": "input_layernorm.weight",
    "q": "self_attn.q_proj.weight", "k": "self_attn.k_proj.weight",
    "v": "self_attn.v_proj.weight", "o": "self_attn.o_proj.weight",
    "ln2": "post_attention_layernorm.weight",
    "gate": "mlp.gate_proj.weight", "up": "mlp.up_proj.weight", "down": "mlp.down_proj.weight",
}
LLAMA_TOP_KEYS = ("model.embed_tokens.weight", "model.norm.weight")
EMBED, FINAL_NORM, HEAD = "model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"


def check_llama_state_dict(fn: str, state_dict) -> tuple[int, bool]:
    """Check the keys of a Llama state dict; return (n_layer, tied).

    KeyError listing every missing and every unexpected key (biases included: qkv loads the
    bias-free Llama); saved rotary buffers (``...rotary_emb.inv_freq``) are ignored, since qkv
    computes its own tables. tied: lm_head.weight is absent or equals the embedding.
    """
    keys = set(state_dict)
    layers = {int(m.group(1)) for key in keys if (m := re.match(r"model\.layers\.(\d+)\.", key))}
    n_layer = max(layers) + 1 if layers else 0
    expected = set(LLAMA_TOP_KEYS) | {f"model.layers.{i}.{k}" for i in range(n_layer)
                                      for k in LLAMA_BLOCK_KEYS.values()}
    allowed = expected | {HEAD}
    missing = sorted(expected - keys)
    unexpected = sorted(k for k in keys - allowed if not k.endswith("rotary_emb.inv_freq"))
    if missing or unexpected or n_layer == 0:
        raise KeyError(f"{fn}: not a Llama (LlamaForCausalLM) state dict; "
                       f"missing keys {missing}, unexpected keys {unexpected}")
    wte = state_dict[EMBED]
    check_ndim(fn, EMBED, wte, 2, "(vocab, d_model)")
    head = state_dict.get(HEAD)
    tied = head is None or (shape_of(head) == shape_of(wte) and not bool((head != wte).any()))
    return n_layer, tied


def block_key(i: int, part: str) -> str:
    """The state-dict name of block i's ``part`` (a key of LLAMA_BLOCK_KEYS)."""
    return f"model.layers.{i}.{LLAMA_BLOCK_KEYS[part]}"
