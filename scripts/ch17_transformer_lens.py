"""Cross-check qkv.pt.interp against TransformerLens (Nanda and Bloom, 2022) on the same weights.

TransformerLens is not a course dependency (it pulls ~80 packages, pandas, pyarrow, datasets and
wandb among them), so this runs by hand in a separate environment that has it beside the pinned
torch and transformers:

    python -m venv /tmp/tl && /tmp/tl/bin/pip install torch==2.13.0 transformers==5.23.0 \\
        numpy==2.4.6 transformer-lens==4.3.0
    HF_HUB_OFFLINE=1 PYTHONPATH=lib /tmp/tl/bin/python scripts/ch17_transformer_lens.py

A seeded qkv GPT (weights nudged off their init) goes into transformers' GPT2LMHeadModel through
to_gpt2_state_dict; TransformerLens wraps that model (TransformerBridge, eager attention) with no
download; the residual stream entering every block, every head's attention pattern, each head's
z and the logits are compared with GPT.run_with_cache in float64. Prints the largest difference.
"""

import torch
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from transformer_lens.model_bridge import TransformerBridge
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

from qkv.pt import GPT, GPTConfig

CFG = dict(vocab_size=50, context_length=24, n_layer=3, n_head=4, d_model=32)


def main():
    model = GPT(GPTConfig(**CFG), generator=torch.Generator().manual_seed(0)).double().eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    hf = GPT2LMHeadModel(GPT2Config(vocab_size=CFG["vocab_size"], n_positions=CFG["context_length"],
                                    n_embd=CFG["d_model"], n_layer=CFG["n_layer"],
                                    n_head=CFG["n_head"], bos_token_id=0, eos_token_id=0,
                                    attn_implementation="eager")).double().eval()
    hf.load_state_dict(model.to_gpt2_state_dict())
    vocab = {f"t{i}": i for i in range(CFG["vocab_size"])}
    # No BOS token: TransformerLens would reload a tokenizer by name to add one (a download).
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(WordLevel(vocab, unk_token="t0")),
                                  unk_token="t0", eos_token="t0", pad_token="t0")
    bridge = TransformerBridge.boot_transformers("gpt2", hf_model=hf, tokenizer=tok,
                                                 dtype=torch.float64)
    ids = torch.randint(0, CFG["vocab_size"], (3, 20), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        tl_logits, tl_cache = bridge.run_with_cache(ids)
        logits, cache = model.run_with_cache(ids)
    worst = {"logits": (tl_logits - logits).abs().max().item()}
    for i in range(CFG["n_layer"]):
        pairs = {f"blocks.{i}.resid_pre": f"blocks.{i}.hook_resid_pre",
                 f"blocks.{i}.attn.pattern": f"blocks.{i}.attn.hook_pattern",
                 f"blocks.{i}.attn.z": f"blocks.{i}.attn.hook_z",
                 f"blocks.{i}.resid_post": f"blocks.{i}.hook_resid_post"}
        for ours, theirs in pairs.items():
            a, b = cache[ours], tl_cache[theirs]
            if ours.endswith(".z"):  # TransformerLens keeps z as (batch, seq, n_head, d_head)
                b = b.transpose(-3, -2)
            worst[ours] = (a - b.to(a.dtype)).abs().max().item()
    for name, diff in worst.items():
        print(f"{name:28s} max |qkv - TransformerLens| = {diff:.2e}")
    print(f"largest: {max(worst.values()):.2e} (float64)")


if __name__ == "__main__":
    main()
