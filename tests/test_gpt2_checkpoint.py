"""qkv runs Hugging Face GPT-2 weights: a transformers.GPT2LMHeadModel built here from a small
GPT2Config (randomly initialised; nothing is downloaded, from_pretrained is never called), its
state dict loaded by qkv.pt.GPT.from_gpt2_state_dict and qkv.np.params_from_gpt2_state_dict.
The logits match transformers' (float32 and float64), to_gpt2_state_dict goes back into
GPT2LMHeadModel, and bad state dicts fail with a message naming the key.
"""

import copy
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import GPT2Config, GPT2LMHeadModel
from transformers.activations import ACT2FN

import qkv.np as qnp
import qkv.pt as qpt
from qkv.tolerances import TOL

N_HEAD = 4


def hf_config():
    return GPT2Config(vocab_size=65, n_positions=16, n_embd=32, n_layer=2, n_head=N_HEAD,
                      resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                      bos_token_id=0, eos_token_id=0)  # ids inside the small vocab


@pytest.fixture(scope="module")
def hf_model():
    """A seeded GPT2LMHeadModel with every weight nudged off its init (GPT-2 starts biases at 0
    and layer-norm scales at 1, which would hide a bias or a scale loaded into the wrong place)."""
    torch.manual_seed(0)
    model = GPT2LMHeadModel(hf_config()).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():  # the tied lm_head is wte: nudged once
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    return model


@pytest.fixture(scope="module")
def token_ids():
    return torch.randint(0, 65, (3, 16), generator=torch.Generator().manual_seed(2))


def hf_logits(model, ids):
    with torch.no_grad():
        return model(ids).logits.numpy()


def test_gpt2_uses_the_tanh_gelu(hf_model):
    # GPT2Config's default activation_function is "gelu_new": Hugging Face's name for the tanh
    # approximation 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))) that GPT-2 was trained with
    # and qkv's gelu computes ("gelu" would be the exact erf form, slightly different).
    assert hf_model.config.activation_function == "gelu_new"
    x = torch.linspace(-6, 6, 101, dtype=torch.float64)
    act = ACT2FN[hf_model.config.activation_function]
    np.testing.assert_allclose(act(x).numpy(), F.gelu(x, approximate="tanh").numpy(),
                               **TOL["float64"])
    np.testing.assert_allclose(act(x).numpy(), qnp.gelu(x.numpy()), **TOL["float64"])
    assert np.abs(act(x).numpy() - F.gelu(x).numpy()).max() > 1e-4  # not the erf form
    # The other choices qkv hard-wires: layer-norm eps 1e-5, d_ff = 4 * d_model, 1/sqrt(d_head).
    cfg = hf_model.config
    assert cfg.layer_norm_epsilon == 1e-5 and cfg.n_inner is None and cfg.scale_attn_weights
    assert not cfg.scale_attn_by_inverse_layer_idx and cfg.tie_word_embeddings


# float32: single-op tolerance (TOL["float32_op"], atol 1e-5) for the whole model, since both
# sides run the same ops in nearly the same order (measured max difference ~1e-6 on |logits| ~2).
@pytest.mark.parametrize("dtype, tol", [(torch.float32, TOL["float32_op"]),
                                        (torch.float64, TOL["float64"])],
                         ids=["float32", "float64"])
@pytest.mark.parametrize("impl", ["pt-fused", "pt-naive", "np"])
def test_logits_match_transformers(hf_model, token_ids, impl, dtype, tol):
    hf = copy.deepcopy(hf_model).to(dtype)
    expected = hf_logits(hf, token_ids)
    state = hf.state_dict()
    if impl == "np":
        params = qnp.params_from_gpt2_state_dict(state)  # keeps the state dict's dtype
        assert params["wte"].dtype == expected.dtype
        got = qnp.gpt_forward(token_ids.numpy(), params, n_head=N_HEAD)
    else:
        model = qpt.GPT.from_gpt2_state_dict(state, n_head=N_HEAD)
        model.config.fused = impl == "pt-fused"
        assert model.transformer.wte.weight.dtype == dtype
        with torch.no_grad():
            got = model(token_ids).numpy()
    assert got.dtype == expected.dtype and got.shape == (3, 16, 65)
    np.testing.assert_allclose(got, expected, **tol)


def nudged_gpt(bias):
    """A qkv.pt.GPT of the same sizes, initialised by qkv (not from a GPT-2 checkpoint)."""
    cfg = qpt.GPTConfig(vocab_size=65, context_length=16, n_layer=2, n_head=N_HEAD, d_model=32,
                        bias=bias)
    g = torch.Generator().manual_seed(5)
    model = qpt.GPT(cfg, generator=g)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    return model


@pytest.mark.parametrize("bias", [True, False])
def test_to_gpt2_state_dict_loads_into_transformers(token_ids, bias):
    ours = nudged_gpt(bias)
    state = ours.to_gpt2_state_dict()
    torch.manual_seed(7)
    hf = GPT2LMHeadModel(hf_config()).eval()  # different random weights until loaded
    hf.load_state_dict(state)  # strict: every key present, none unexpected
    with torch.no_grad():
        expected = ours(token_ids).numpy()
    np.testing.assert_allclose(hf_logits(hf, token_ids), expected, **TOL["float32_op"])


def test_state_dict_round_trip(hf_model):
    state = hf_model.state_dict()
    back = qpt.GPT.from_gpt2_state_dict(state, n_head=N_HEAD).to_gpt2_state_dict()
    assert set(back) == set(state)
    for key, value in state.items():
        assert torch.equal(back[key], value), key


def test_missing_or_unexpected_key_is_named(hf_model):
    state = dict(hf_model.state_dict())
    del state["transformer.h.1.mlp.c_fc.bias"]
    state["transformer.h.0.attn.q_proj.weight"] = torch.zeros(3)
    for fn_name, load in [("GPT.from_gpt2_state_dict",
                           lambda s: qpt.GPT.from_gpt2_state_dict(s, n_head=N_HEAD)),
                          ("params_from_gpt2_state_dict", qnp.params_from_gpt2_state_dict)]:
        with pytest.raises(KeyError) as info:
            load(state)
        msg = str(info.value)
        assert msg.strip("'\"").startswith(fn_name + ":"), msg
        assert "transformer.h.1.mlp.c_fc.bias" in msg and "transformer.h.0.attn.q_proj" in msg


def test_buffers_ignored_and_lm_head_optional(hf_model, token_ids):
    """Older transformers save each block's causal mask (attn.bias, attn.masked_bias); a state
    dict may leave out lm_head.weight, which is wte again."""
    state = {k: v for k, v in hf_model.state_dict().items() if k != "lm_head.weight"}
    for i in range(2):
        state[f"transformer.h.{i}.attn.bias"] = torch.tril(torch.ones(1, 1, 16, 16, dtype=bool))
        state[f"transformer.h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    expected = hf_logits(hf_model, token_ids)
    with torch.no_grad():
        got = qpt.GPT.from_gpt2_state_dict(state, n_head=N_HEAD)(token_ids).numpy()
    np.testing.assert_allclose(got, expected, **TOL["float32_op"])
    params = qnp.params_from_gpt2_state_dict({k: v.numpy() for k, v in state.items()})
    np.testing.assert_allclose(qnp.gpt_forward(token_ids.numpy(), params, N_HEAD), expected,
                               **TOL["float32_op"])


def test_untied_lm_head_is_refused(hf_model):
    state = dict(hf_model.state_dict())
    state["lm_head.weight"] = state["lm_head.weight"] + 1.0
    with pytest.raises(ValueError, match="lm_head.weight must equal transformer.wte.weight"):
        qnp.params_from_gpt2_state_dict(state)
    with pytest.raises(ValueError, match="lm_head.weight must equal transformer.wte.weight"):
        qpt.GPT.from_gpt2_state_dict(state, n_head=N_HEAD)


def test_config_and_n_head(hf_model):
    state = hf_model.state_dict()
    with pytest.raises(ValueError, match="n_head"):  # not in the shapes: must be given
        qpt.GPT.from_gpt2_state_dict(state)
    cfg = qpt.GPTConfig(vocab_size=65, context_length=16, n_layer=2, n_head=N_HEAD, d_model=32,
                        fused=False)
    model = qpt.GPT.from_gpt2_state_dict(state, cfg)
    assert model.config is cfg
    wrong = qpt.GPTConfig(vocab_size=65, context_length=32, n_layer=2, n_head=N_HEAD, d_model=32)
    with pytest.raises(ValueError, match=re.escape("'context_length': 16")):
        qpt.GPT.from_gpt2_state_dict(state, wrong)


def test_loading_copies_and_leaves_global_rng_alone(hf_model):
    state = hf_model.state_dict()
    before = torch.get_rng_state()
    model = qpt.GPT.from_gpt2_state_dict(state, n_head=N_HEAD)
    assert torch.equal(torch.get_rng_state(), before)
    params = qnp.params_from_gpt2_state_dict(state)
    params["wte"] += 1.0  # e.g. a NumPy training step
    assert torch.equal(model.transformer.wte.weight, state["transformer.wte.weight"])
