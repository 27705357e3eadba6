"""qkv.pt.interp: the activation cache equals a forward built independently from qkv.np's
functions, patching nothing changes nothing, ablating a head equals deleting its rows of the
output projection, and transformers' GPT2Model reports the same residual stream and attention
weights (output_hidden_states / output_attentions) for the same GPT-2-format weights."""

import copy

import numpy as np
import pytest
import torch

import qkv.np as qnp
from qkv.pt import GPT, GPTConfig
from qkv.pt.interp import (
    activation_names,
    head_ablation,
    induction_scores,
    previous_token_scores,
    repeated_tokens,
    run_with_cache,
    unembed_lens,
)
from qkv.tolerances import TOL

CFG = dict(vocab_size=23, context_length=12, n_layer=2, n_head=4, d_model=16)


def nudged_model(dtype=torch.float64, fused=False, seed=0):
    """A seeded GPT with every weight moved off its init (zero biases and unit layer-norm
    scales would hide a bias or scale read from the wrong place)."""
    model = GPT(GPTConfig(**CFG, fused=fused), generator=torch.Generator().manual_seed(seed))
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=g))
    return model.to(dtype).eval()


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, CFG["vocab_size"], (3, 10), generator=torch.Generator().manual_seed(5))


def manual_forward(params, ids, n_head):
    """Every activation, computed with qkv.np's functions in float64 (no qkv.pt code)."""
    acts = {}
    seq = ids.shape[-1]
    x = params["wte"][ids] + params["wpe"][:seq]
    for i, p in enumerate(params["blocks"]):
        pre = f"blocks.{i}."
        acts[pre + "resid_pre"] = x
        h = qnp.layer_norm(x, p["ln1_gamma"], p["ln1_beta"])
        acts[pre + "ln_1"] = h
        attn, weights = qnp.multi_head_attention(h, p["w_qkv"], p["b_qkv"], p["w_out"],
                                                 p["b_out"], n_head, return_weights=True)
        acts[pre + "attn.pattern"] = weights
        acts[pre + "attn.out"] = attn
        v = qnp.split_heads(qnp.linear(h, p["w_qkv"], p["b_qkv"])[..., 2 * x.shape[-1]:], n_head)
        z = weights @ v
        acts[pre + "attn.z"] = z
        d_head = z.shape[-1]
        acts[pre + "attn.head_out"] = np.stack(
            [z[:, hd] @ p["w_out"][hd * d_head:(hd + 1) * d_head] for hd in range(n_head)], 1)
        acts[pre + "resid_mid"] = x + attn
        acts[pre + "mlp.out"] = qnp.mlp(qnp.layer_norm(x + attn, p["ln2_gamma"], p["ln2_beta"]),
                                        p["w_fc"], p["b_fc"], p["w_proj"], p["b_proj"])
        x = qnp.decoder_block(x, p, n_head)  # the block as one function: resid_post
        acts[pre + "resid_post"] = x
    acts["ln_final"] = qnp.layer_norm(x, params["lnf_gamma"], params["lnf_beta"])
    acts["logits"] = qnp.gpt_forward(ids, params, n_head)
    return acts


def test_cache_equals_a_manual_numpy_forward(ids):
    model = nudged_model()
    logits, cache = model.run_with_cache(ids)
    assert list(cache) == activation_names(CFG["n_layer"])  # every name, in forward order
    expected = manual_forward(model.numpy_params(), ids.numpy(), CFG["n_head"])
    for name, value in expected.items():
        np.testing.assert_allclose(cache[name].numpy(), value, **TOL["float64"], err_msg=name)
    np.testing.assert_allclose(logits.detach().numpy(), expected["logits"], **TOL["float64"])
    for i in range(CFG["n_layer"]):  # the pattern's rows are distributions over the past
        pattern = cache[f"blocks.{i}.attn.pattern"]
        assert torch.all(pattern.triu(1) == 0)
        np.testing.assert_allclose(pattern.sum(-1).numpy(), 1.0, **TOL["float64"])


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "naive"])
def test_float32_logits_equal_the_models_own_forward(ids, fused):
    model = nudged_model(torch.float32, fused=fused)
    with torch.no_grad():
        expected = model(ids)
        logits, _ = model.run_with_cache(ids, names=[])
    torch.testing.assert_close(logits, expected, **TOL["float32_model"])


def test_patching_nothing_changes_nothing(ids):
    model = nudged_model(torch.float32)
    plain, cache = run_with_cache(model, ids)
    identity = {name: (lambda v: v) for name in activation_names(CFG["n_layer"])}
    same_tensor = {name: cache[name] for name in ("blocks.0.attn.pattern", "blocks.1.resid_mid")}
    for patches in ({}, identity, same_tensor):
        logits, again = run_with_cache(model, ids, patches=patches)
        assert torch.equal(logits, plain)
        assert all(torch.equal(again[n], cache[n]) for n in cache)


@pytest.mark.parametrize("layer, heads", [(0, 2), (1, 0), (1, [1, 3])])
def test_zero_ablation_equals_deleting_the_heads_rows_of_c_proj(ids, layer, heads):
    # z_h only reaches the stream through rows h*d_head:(h+1)*d_head of c_proj's weight, so
    # zeroing those rows in a copy of the model and running its ordinary (fused) forward is
    # an independent way to remove the head.
    model = nudged_model()
    d_head = CFG["d_model"] // CFG["n_head"]
    edited = copy.deepcopy(model)
    edited.config.fused = True  # the copy's blocks share its one config
    with torch.no_grad():
        for h in [heads] if isinstance(heads, int) else heads:
            edited.transformer.h[layer].attn.c_proj.weight[h * d_head:(h + 1) * d_head] = 0
        expected = edited(ids)
    got = model.run_with_patches(ids, head_ablation(layer, heads))
    torch.testing.assert_close(got, expected, **TOL["float64"])
    assert not torch.allclose(got, model(ids).detach())  # the ablation did something


def test_mean_ablation(ids):
    model = nudged_model()
    same = ids[:1].expand(4, -1)  # one sequence four times: its mean over the batch is itself
    torch.testing.assert_close(model.run_with_patches(same, head_ablation(1, 2, "mean")),
                               model(same).detach(), **TOL["float64"])
    _, cache = model.run_with_cache(ids)
    mean = cache["blocks.1.attn.z"].mean(0)  # (n_head, seq, d_head)
    got = model.run_with_patches(ids, head_ablation(1, 2, "mean"))
    z = cache["blocks.1.attn.z"].clone()
    z[:, 2] = mean[2]  # the same replacement, given as a tensor
    torch.testing.assert_close(got, model.run_with_patches(ids, {"blocks.1.attn.z": z}),
                               **TOL["float64"])
    torch.testing.assert_close(got, model.run_with_patches(ids, head_ablation(1, 2, "mean", mean)),
                               **TOL["float64"])


def test_patching_the_stream_transplants_a_run(ids):
    # Activation patching: the whole residual stream of run B entering block 0 turns run A
    # into run B; a later stream only changes what comes after it.
    model = nudged_model()
    a, b = ids[:1], ids[1:2]
    _, cache_b = model.run_with_cache(b)
    got = model.run_with_patches(a, {"blocks.0.resid_pre": cache_b["blocks.0.resid_pre"]})
    torch.testing.assert_close(got, model(b).detach(), **TOL["float64"])
    patch = {"blocks.1.resid_pre": cache_b["blocks.0.resid_post"]}
    logits, cache = model.run_with_cache(a, patches=patch)
    torch.testing.assert_close(logits, model(b).detach(), **TOL["float64"])
    before = model.run_with_cache(a)[1]["blocks.0.resid_post"]
    assert torch.equal(cache["blocks.0.resid_post"], before)  # block 0 still ran on run A


def test_logit_lens_on_the_last_block_is_the_logits(ids):
    model = nudged_model()
    logits, cache = model.run_with_cache(ids)
    torch.testing.assert_close(unembed_lens(model, cache["blocks.1.resid_post"]), logits,
                               **TOL["float64"])


def test_scores_on_hand_made_patterns():
    seq, half = 8, 4
    prev = torch.zeros(2, 3, seq, seq)  # (batch, n_head, seq, seq)
    prev[..., 0, 0] = 1
    prev[..., torch.arange(1, seq), torch.arange(seq - 1)] = 1  # head attends to t-1
    uniform = torch.tril(torch.ones(seq, seq)) / torch.arange(1, seq + 1)[:, None]
    prev[:, 1] = uniform
    np.testing.assert_allclose(previous_token_scores(prev).numpy(),
                               [1.0, np.mean([1 / (t + 1) for t in range(1, seq)]), 1.0],
                               **TOL["float32_op"])
    ind = uniform.repeat(1, 2, 1, 1).clone()
    for t in range(half, seq):
        ind[0, 0, t] = 0
        ind[0, 0, t, t - half + 1] = 1
    np.testing.assert_allclose(induction_scores(ind, half).numpy(),
                               [1.0, np.mean([1 / (t + 1) for t in range(half, seq)])],
                               **TOL["float32_op"])


def test_induction_scores_equal_a_loop():
    g = torch.Generator().manual_seed(0)
    pattern = torch.rand(2, 3, 5, 10, 10, generator=g, dtype=torch.float64)
    for half in (1, 3, 5, 9):
        loop = [np.mean([pattern[b, c, h, t, t - half + 1].item() for b in range(2)
                         for c in range(3) for t in range(half, 10)]) for h in range(5)]
        np.testing.assert_allclose(induction_scores(pattern, half).numpy(), loop,
                                   **TOL["float64"])
    ids = repeated_tokens(4, 6, 50, g)
    assert ids.shape == (4, 12) and torch.equal(ids[:, :6], ids[:, 6:])


def test_bad_input_names_what_is_valid(ids):
    model = nudged_model()
    with pytest.raises(KeyError, match=r"blocks\.7\.attn\.pattern.*valid names: embed, pos_embed"):
        model.run_with_cache(ids, names=["blocks.7.attn.pattern"])
    with pytest.raises(KeyError, match="unknown activation name.*in patches"):
        model.run_with_patches(ids, {"blocks.0.attn.weights": lambda v: v})
    with pytest.raises(IndexError, match=r"head\(s\) \[4\] out of range; block 1 has heads 0\.\.3"):
        model.run_with_patches(ids, head_ablation(1, 4))
    with pytest.raises(ValueError, match=r"must give a tensor of shape \(3, 10, 16\)"):
        model.run_with_patches(ids, {"blocks.0.resid_pre": torch.zeros(3, 16)})
    with pytest.raises(ValueError, match="half must be in 1..seq-1"):
        induction_scores(torch.rand(2, 6, 6), 6)


def test_transformers_reports_the_same_stream_and_patterns(ids):
    from transformers import GPT2Config, GPT2LMHeadModel

    model = nudged_model()
    hf = GPT2LMHeadModel(GPT2Config(vocab_size=CFG["vocab_size"],
                                    n_positions=CFG["context_length"], n_embd=CFG["d_model"],
                                    n_layer=CFG["n_layer"], n_head=CFG["n_head"],
                                    bos_token_id=0, eos_token_id=0,
                                    attn_implementation="eager")).to(torch.float64).eval()
    hf.load_state_dict(model.to_gpt2_state_dict())
    with torch.no_grad():
        out = hf(ids, output_hidden_states=True, output_attentions=True)
    logits, cache = model.run_with_cache(ids)
    # hidden_states: the stream entering each block, then the final layer norm's output
    names = [f"blocks.{i}.resid_pre" for i in range(CFG["n_layer"])] + ["ln_final"]
    assert len(out.hidden_states) == len(names)
    for name, hidden in zip(names, out.hidden_states, strict=True):
        torch.testing.assert_close(cache[name], hidden, **TOL["float64"], msg=name)
    for i, attn in enumerate(out.attentions):
        torch.testing.assert_close(cache[f"blocks.{i}.attn.pattern"], attn, **TOL["float64"])
    torch.testing.assert_close(logits, out.logits, **TOL["float64"])


def test_attention_only_model_has_no_mlp_and_keeps_it_off():
    from qkv.pt.induction import attention_only, split_losses, train_induction

    cfg = GPTConfig(vocab_size=16, context_length=12, n_layer=2, n_head=2, d_model=8)
    model, history = train_induction(cfg, steps=3, batch_size=4, halves=(3, 6), eval_half=5,
                                     eval_every=1, progress=False)
    assert history["step"] == [0, 1, 2, 3]
    ids = repeated_tokens(2, 5, 16, torch.Generator().manual_seed(0))
    logits, cache = model.run_with_cache(ids)
    for i in range(2):  # the frozen zero MLP adds exactly nothing, even after training
        assert torch.equal(cache[f"blocks.{i}.mlp.out"], torch.zeros(2, 10, 8))
    fresh = attention_only(cfg, torch.Generator().manual_seed(0))
    assert all(not p.requires_grad for b in fresh.transformer.h for p in b.mlp.parameters())
    # split_losses: first half predicts tokens 1..4, the copy tokens 6..9 (by hand)
    lp = torch.log_softmax(logits.detach(), -1)
    first = -torch.stack([lp[:, t].gather(-1, ids[:, t + 1, None])[:, 0]
                          for t in range(0, 4)]).mean()
    rep = -torch.stack([lp[:, t].gather(-1, ids[:, t + 1, None])[:, 0] for t in range(5, 9)]).mean()
    got = split_losses(logits.detach(), ids, 5)
    assert abs(got["first"] - first.item()) < 1e-5 and abs(got["repeated"] - rep.item()) < 1e-5
