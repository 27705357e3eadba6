"""Llama-format weights: GPT.from_llama_state_dict and qkv.np.params_from_llama_state_dict
against transformers' own LlamaForCausalLM (a small random config, no download), float32
logits within TOL["float32_model"], with grouped-query attention (n_kv_head < n_head), a
rope_theta and an rms_norm_eps other than the defaults, tied and untied heads."""

import numpy as np
import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

import qkv.np as qnp
import qkv.pt as qpt
from qkv.tolerances import TOL


def hf_llama(tied: bool, seed: int = 0):
    cfg = LlamaConfig(vocab_size=61, hidden_size=32, intermediate_size=88, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      rope_theta=500.0, rms_norm_eps=1e-6, tie_word_embeddings=tied,
                      initializer_range=0.25, attn_implementation="eager")
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # norms off 1 so that every weight matters
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.2 * torch.randn(p.shape))
    return model


def llama_kwargs():
    return dict(n_head=4, n_kv_head=2, rope_theta=500.0, norm_eps=1e-6)


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_both_backends_match_transformers_llama(tied):
    hf = hf_llama(tied)
    ids = torch.randint(0, 61, (2, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = hf(ids).logits.numpy()
    state = hf.state_dict()
    for fused in (False, True):
        model = qpt.GPT.from_llama_state_dict(state, **llama_kwargs(), fused=fused)
        assert model.config.tie_embeddings is tied and model.config.hidden == 88
        with torch.no_grad():
            got = model(ids).numpy()
        np.testing.assert_allclose(got, expected, **TOL["float32_model"])
    params = qnp.params_from_llama_state_dict(state)
    arch = qnp.Arch(norm="rms", position="rope", mlp="swiglu", n_kv_head=2, rope_theta=500.0,
                    norm_eps=1e-6)
    got = qnp.gpt_forward(ids.numpy(), params, 4, arch=arch)
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, expected, **TOL["float32_model"])
    assert ("w_unembed" in params) is not tied


def test_cached_generation_matches_transformers_greedy():
    hf = hf_llama(tied=False, seed=2)
    model = qpt.GPT.from_llama_state_dict(hf.state_dict(), **llama_kwargs())
    prompt = torch.tensor([[3, 14, 15, 9, 2]])
    with torch.no_grad():
        theirs = hf.generate(prompt, max_new_tokens=12, do_sample=False, pad_token_id=0)[0]
    ours = qpt.generate(model, prompt[0].tolist(), 12, temperature=0)
    assert ours.tolist() == theirs.tolist()


def test_bad_state_dicts():
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=11, n_positions=8, n_embd=16, n_layer=1,
                                      n_head=2)).state_dict()
    with pytest.raises(KeyError, match="not a Llama"):
        qpt.GPT.from_llama_state_dict(gpt2, n_head=2)
    with pytest.raises(KeyError, match="not a Llama"):
        qnp.params_from_llama_state_dict(gpt2)
    state = hf_llama(tied=False).state_dict()
    with pytest.raises(ValueError, match="k_proj has 16 rows"):
        qpt.GPT.from_llama_state_dict(state, n_head=4)  # n_kv_head is 2, not 4
    with pytest.raises(ValueError, match="n_kv_head must be a positive int dividing n_head"):
        qpt.GPT.from_llama_state_dict(state, n_head=4, n_kv_head=3)
    with pytest.raises(KeyError, match=r"missing keys \['model.norm.weight'\]"):
        qnp.params_from_llama_state_dict({k: v for k, v in state.items()
                                          if k != "model.norm.weight"})
