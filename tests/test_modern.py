"""Chapter 14's pieces: RoPE, RMSNorm, SiLU/SwiGLU, grouped-query attention and QK-norm in
qkv.np and qkv.pt, and the GPT switches that use them.

References, never the code under test: Hugging Face's Llama functions (apply_rotary_pos_emb,
LlamaRMSNorm, repeat_kv), torch's own ops (F.rms_norm, F.silu, scaled_dot_product_attention
with enable_gqa), complex multiplication for the interleaved layout (the RoFormer paper's form),
finite differences and torch.autograd for every NumPy backward.
"""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers.models.llama import modeling_llama as hf_llama

import qkv.np as qnp
import qkv.pt as qpt
from qkv.np.gradcheck import numerical_gradient, relative_error
from qkv.tolerances import TOL

REL_ERR = TOL["float64_gradcheck"]["rel_err"]
MODERN = dict(norm="rms", position="rope", mlp="swiglu", n_kv_head=2, qk_norm=True, bias=False)


def t64(a):
    return torch.tensor(a, dtype=torch.float64)


# --- RoPE --------------------------------------------------------------------------------------

def test_rope_half_matches_hugging_face_llama():
    rng = np.random.default_rng(0)
    q, k = rng.normal(size=(2, 3, 7, 8)), rng.normal(size=(2, 3, 7, 8))
    cos, sin = qnp.rope_table(7, 8, 10000.0)
    # Hugging Face's cos/sin repeat the d_head/2 angles twice (half-split layout)
    hf_cos, hf_sin = (t64(np.concatenate([c, c], -1))[None] for c in (cos, sin))
    hq, hk = hf_llama.apply_rotary_pos_emb(t64(q), t64(k), hf_cos, hf_sin)
    for ours, theirs in ((qnp.rope(q, cos, sin), hq), (qnp.rope(k, cos, sin), hk)):
        np.testing.assert_allclose(ours, theirs.numpy(), **TOL["float64"])
    got = qpt.rope(t64(q), *qpt.rope_table(7, 8, dtype=torch.float64))
    np.testing.assert_allclose(got.numpy(), hq.numpy(), **TOL["float64"])


def test_rope_interleaved_is_complex_multiplication():
    """RoFormer's form: pair (x_2i, x_2i+1) as the complex number x_2i + i x_2i+1, times
    e^(i m theta_i)."""
    rng = np.random.default_rng(1)
    x = rng.normal(size=(3, 6, 10))
    base, start = 500.0, 4
    theta = base ** (-np.arange(0, 10, 2) / 10)
    z = (x[..., 0::2] + 1j * x[..., 1::2]) * np.exp(1j * np.outer(np.arange(start, start + 6),
                                                                theta))
    expected = np.stack([z.real, z.imag], axis=-1).reshape(x.shape)
    cos, sin = qnp.rope_table(6, 10, base, start=start)
    np.testing.assert_allclose(qnp.rope(x, cos, sin, layout="interleaved"), expected,
                               **TOL["float64"])
    pcos, psin = qpt.rope_table(6, 10, base, start=start, dtype=torch.float64)
    np.testing.assert_allclose(qpt.rope(t64(x), pcos, psin, layout="interleaved").numpy(),
                               expected, **TOL["float64"])
    # the two layouts are different functions: weights trained with one fail with the other
    assert not np.allclose(qnp.rope(x, cos, sin), expected, **TOL["float64"])


@pytest.mark.parametrize("layout", ["half", "interleaved"])
def test_rope_scores_depend_only_on_the_offset(layout):
    rng = np.random.default_rng(2)
    q, k = rng.normal(size=16), rng.normal(size=16)
    cos, sin = qnp.rope_table(40, 16)

    def score(m, n):  # q at position m against k at position n
        rq = qnp.rope(q[None], cos[m:m + 1], sin[m:m + 1], layout)
        rk = qnp.rope(k[None], cos[n:n + 1], sin[n:n + 1], layout)
        return float((rq @ rk.T)[0, 0])

    for m, n in [(5, 2), (9, 9), (3, 7)]:
        for shift in (1, 17, 30):
            np.testing.assert_allclose(score(m + shift, n + shift), score(m, n),
                                       **TOL["float64"])
    assert abs(score(5, 2) - score(6, 2)) > 1e-3  # but it does depend on the offset


def test_rope_bad_input():
    with pytest.raises(ValueError, match="d_head must be even"):
        qnp.rope_table(4, 7)
    with pytest.raises(ValueError, match="d_head must be even"):
        qpt.rope_table(4, 7)
    cos, sin = qnp.rope_table(4, 8)
    with pytest.raises(ValueError, match="layout"):
        qnp.rope(np.zeros((4, 8)), cos, sin, layout="pairs")
    with pytest.raises(ValueError, match=r"cos must have shape \(seq, d_head // 2\)"):
        qnp.rope(np.zeros((5, 8)), cos, sin)


# --- RMSNorm, SiLU, SwiGLU -----------------------------------------------------------------------

def test_rms_norm_matches_torch_and_hugging_face():
    rng = np.random.default_rng(3)
    x, g = rng.normal(size=(2, 5, 12)) * 3 + 1, 1 + rng.normal(size=12) / 5
    expected = F.rms_norm(t64(x), (12,), t64(g), 1e-6).numpy()
    np.testing.assert_allclose(qnp.rms_norm(x, g, 1e-6), expected, **TOL["float64"])
    for fused in (False, True):
        np.testing.assert_allclose(qpt.rms_norm(t64(x), t64(g), 1e-6, fused=fused).numpy(),
                                   expected, **TOL["float64"])
    hf = hf_llama.LlamaRMSNorm(12, eps=1e-6)  # computes in float32 whatever the input
    with torch.no_grad():
        hf.weight.copy_(torch.tensor(g))
    x32, g32 = x.astype(np.float32), g.astype(np.float32)
    np.testing.assert_allclose(qnp.rms_norm(x32, g32, 1e-6),
                               hf(torch.tensor(x32)).detach().numpy(), **TOL["float32_op"])


def test_silu_and_swiglu_match_torch():
    rng = np.random.default_rng(4)
    x = rng.normal(size=(2, 5, 8))
    np.testing.assert_allclose(qnp.silu(x * 30), F.silu(t64(x * 30)).numpy(), **TOL["float64"])
    w_gate, w_up, w_down = rng.normal(size=(8, 6)), rng.normal(size=(8, 6)), rng.normal(size=(6, 8))
    b_fc, b_proj = rng.normal(size=12), rng.normal(size=8)
    X = t64(x)
    expected = ((F.silu(X @ t64(w_gate) + t64(b_fc[:6])) * (X @ t64(w_up) + t64(b_fc[6:])))
                @ t64(w_down) + t64(b_proj)).numpy()
    w_fc = np.concatenate([w_gate, w_up], axis=1)  # [gate | up]
    np.testing.assert_allclose(qnp.swiglu(x, w_fc, b_fc, w_down, b_proj), expected,
                               **TOL["float64"])
    for fused in (False, True):
        got = qpt.swiglu(X, t64(w_fc), t64(b_fc), t64(w_down), t64(b_proj), fused=fused)
        np.testing.assert_allclose(got.numpy(), expected, **TOL["float64"])


# --- grouped-query attention ---------------------------------------------------------------------

def test_repeat_kv_matches_hugging_face():
    x = np.random.default_rng(5).normal(size=(2, 3, 4, 5))
    expected = hf_llama.repeat_kv(t64(x), 4).numpy()  # (batch, n_kv_head, seq, d_head) -> x4
    np.testing.assert_array_equal(qnp.repeat_kv(x, 4), expected)
    np.testing.assert_array_equal(qpt.repeat_kv(t64(x), 4).numpy(), expected)


@pytest.mark.parametrize("n_kv_head", [4, 2, 1])
def test_grouped_query_attention_matches_torch_sdpa(n_kv_head):
    """w_qkv's columns [Q | K | V] split by hand, then torch's kernel with enable_gqa."""
    rng = np.random.default_rng(6)
    n_head, d_model, seq = 4, 16, 6
    d_head = d_model // n_head
    width = (n_head + 2 * n_kv_head) * d_head
    x, w_qkv, w_out = (rng.normal(size=(2, seq, d_model)), rng.normal(size=(d_model, width)) / 4,
                       rng.normal(size=(d_model, d_model)) / 4)
    qkv = t64(x) @ t64(w_qkv)
    q, k, v = qkv.split([n_head * d_head, n_kv_head * d_head, n_kv_head * d_head], dim=-1)
    q = q.view(2, seq, n_head, d_head).transpose(1, 2)
    k, v = (t.view(2, seq, n_kv_head, d_head).transpose(1, 2) for t in (k, v))
    a = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    expected = (a.transpose(1, 2).reshape(2, seq, d_model) @ t64(w_out)).numpy()
    got = qnp.multi_head_attention(x, w_qkv, None, w_out, None, n_head, n_kv_head=n_kv_head)
    np.testing.assert_allclose(got, expected, **TOL["float64"])
    for fused in (False, True):
        got = qpt.multi_head_attention(t64(x), t64(w_qkv), None, t64(w_out), None, n_head,
                                       n_kv_head=n_kv_head, fused=fused)
        np.testing.assert_allclose(got.numpy(), expected, **TOL["float64"])


def test_bad_kv_heads():
    x = np.zeros((3, 16))
    with pytest.raises(ValueError, match="n_kv_head must be a positive int dividing n_head"):
        qnp.multi_head_attention(x, np.zeros((16, 48)), None, np.zeros((16, 16)), None, 4,
                                 n_kv_head=3)
    with pytest.raises(ValueError, match="n_kv_head must be a positive int dividing n_head"):
        qpt.GPTConfig(vocab_size=5, context_length=4, n_layer=1, n_head=4, d_model=16,
                      n_kv_head=3)
    with pytest.raises(ValueError, match="d_head must be even"):
        qpt.GPTConfig(vocab_size=5, context_length=4, n_layer=1, n_head=4, d_model=12,
                      position="rope")
    with pytest.raises(ValueError, match="norm must be one of"):
        qnp.Arch(norm="batch")


# --- forward/backward pairs ----------------------------------------------------------------------

def _check_pair(forward, backward, args, grad_names, torch_fn, seed=0):
    """sum(out * dout): the analytic gradients against finite differences and autograd."""
    out, cache = forward(*args)
    dout = np.random.default_rng(seed).normal(size=out.shape)
    grads = backward(dout, cache)
    tensors = [t64(a).requires_grad_() if isinstance(a, np.ndarray) else a for a in args]
    (torch_fn(*tensors) * t64(dout)).sum().backward()
    for i, name in grad_names.items():
        num = numerical_gradient(lambda _: float((forward(*args)[0] * dout).sum()), args[i])
        assert relative_error(grads[name], num) < REL_ERR, name
        np.testing.assert_allclose(grads[name], tensors[i].grad.numpy(), **TOL["float64"])


def test_rms_norm_backward():
    rng = np.random.default_rng(7)
    args = [rng.normal(size=(3, 4, 6)), 1 + rng.normal(size=6) / 5, 1e-5]
    _check_pair(qnp.rms_norm_forward, qnp.rms_norm_backward, args, {0: "dx", 1: "dgamma"},
                lambda x, g, eps: F.rms_norm(x, (6,), g, eps))


@pytest.mark.parametrize("layout", ["half", "interleaved"])
def test_rope_backward(layout):
    cos, sin = qnp.rope_table(5, 8, 100.0, start=3)
    x = np.random.default_rng(8).normal(size=(2, 5, 8))
    _check_pair(qnp.rope_forward, qnp.rope_backward, [x, cos, sin, layout], {0: "dx"},
                qpt.rope)


def test_silu_and_swiglu_backward():
    rng = np.random.default_rng(9)
    _check_pair(qnp.silu_forward, qnp.silu_backward, [rng.normal(size=(4, 5)) * 3], {0: "dx"},
                F.silu)
    args = [rng.normal(size=(2, 3, 6)), rng.normal(size=(6, 10)) / 2, rng.normal(size=10) / 5,
            rng.normal(size=(5, 6)) / 2, rng.normal(size=6) / 5]
    _check_pair(qnp.swiglu_forward, qnp.swiglu_backward, args,
                {0: "dx", 1: "dw_fc", 2: "db_fc", 3: "dw_proj", 4: "db_proj"}, qpt.swiglu)


def test_attention_backward_with_gqa_rope_and_qk_norm():
    rng = np.random.default_rng(10)
    n_head, n_kv, d_model, seq = 4, 2, 16, 5
    width = (n_head + 2 * n_kv) * 4
    cos, sin = qnp.rope_table(seq, 4)
    gq, gk = 1 + rng.normal(size=4) / 5, 1 + rng.normal(size=4) / 5
    args = [rng.normal(size=(2, seq, d_model)), rng.normal(size=(d_model, width)) / 3,
            rng.normal(size=width) / 5, rng.normal(size=(d_model, d_model)) / 3,
            rng.normal(size=d_model) / 5, gq, gk]

    def forward(x, w_qkv, b_qkv, w_out, b_out, gq, gk):
        return qnp.multi_head_attention_forward(x, w_qkv, b_qkv, w_out, b_out, n_head,
                                                n_kv_head=n_kv, rope=(cos, sin),
                                                qk_norm=(gq, gk))

    def torch_fn(x, w_qkv, b_qkv, w_out, b_out, gq, gk):
        return qpt.multi_head_attention(x, w_qkv, b_qkv, w_out, b_out, n_head, n_kv_head=n_kv,
                                        rope=(t64(cos), t64(sin)), qk_norm=(gq, gk))

    _check_pair(forward, qnp.multi_head_attention_backward, args,
                {0: "dx", 1: "dw_qkv", 2: "db_qkv", 3: "dw_out", 4: "db_out", 5: "dq_gamma",
                 6: "dk_gamma"}, torch_fn)


# --- the model with switches ---------------------------------------------------------------------

SWITCHES = [dict(position="rope"), dict(norm="rms"), dict(mlp="swiglu"), dict(qk_norm=True),
            dict(n_kv_head=1), MODERN, dict(MODERN, tie_embeddings=False, n_kv_head=4)]


def small_gpt(seed=0, **switches):
    cfg = qpt.GPTConfig(vocab_size=23, context_length=12, n_layer=2, n_head=4, d_model=16,
                        fused=False, **switches)
    model = qpt.GPT(cfg, generator=torch.Generator().manual_seed(seed)).double()
    with torch.no_grad():  # every parameter off its init, so each one matters
        g = torch.Generator().manual_seed(seed + 1)
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return model


@pytest.mark.parametrize("switches", SWITCHES, ids=lambda s: "-".join(map(str, s.values())))
def test_model_loss_gradients_match_autograd(switches):
    """gpt_loss_backward on every modern switch against autograd of qkv.pt.GPT."""
    model = small_gpt(**switches)
    ids = torch.randint(0, 23, (2, 9), generator=torch.Generator().manual_seed(3))
    targets = torch.roll(ids, -1, dims=-1)
    _, loss = model(ids, targets)
    loss.backward()
    params, arch = model.numpy_params(), model.config.arch
    np_loss, cache = qnp.gpt_loss_forward(ids.numpy(), targets.numpy(), params, 4, arch)
    grads = qnp.gpt_loss_backward(cache)
    np.testing.assert_allclose(np_loss, loss.item(), **TOL["float64"])
    ours = {"wte": grads["wte"], "lnf_gamma": grads["lnf_gamma"],
            **{f"{i}.{k}": v for i, b in enumerate(grads["blocks"]) for k, v in b.items()
               if v is not None}}
    T = model.transformer
    theirs = {"wte": T.wte.weight.grad, "lnf_gamma": T.ln_f.weight.grad,
              **{f"{i}.{k}": v.grad for i, blk in enumerate(T.h) for k, v in blk.params().items()
                 if v is not None}}
    if "wpe" in T:
        ours["wpe"], theirs["wpe"] = grads["wpe"], T.wpe.weight.grad
    if not model.config.tie_embeddings:
        ours["w_unembed"], theirs["w_unembed"] = grads["w_unembed"], model.lm_head.weight.grad.T
    assert ours.keys() == theirs.keys()
    for key in ours:
        np.testing.assert_allclose(ours[key], theirs[key].numpy(), **TOL["float64"],
                                   err_msg=key)


def test_numpy_training_matches_torch_on_the_modern_model():
    """Three AdamW steps of train_numpy against torch.optim.AdamW on the same batches."""
    model = small_gpt(seed=4, **MODERN)
    gen = torch.Generator().manual_seed(5)
    batches = [(x, torch.roll(x, -1, dims=-1))
               for x in (torch.randint(0, 23, (3, 8), generator=gen) for _ in range(3))]
    params, losses = qnp.train_numpy(model.numpy_params(), 4,
                                     [(x.numpy(), y.numpy()) for x, y in batches], lr=1e-2,
                                     weight_decay=0.1, arch=model.config.arch)
    decay = [p for p in model.parameters() if p.ndim >= 2]
    other = [p for p in model.parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1},
                             {"params": other, "weight_decay": 0.0}], lr=1e-2)
    torch_losses = []
    for x, y in batches:
        _, loss = model(x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        torch_losses.append(loss.item())
    np.testing.assert_allclose(losses, torch_losses, **TOL["float64"])
    np.testing.assert_allclose(params["blocks"][1]["w_qkv"],
                               model.transformer.h[1].attn.c_attn.weight.detach().numpy(),
                               **TOL["float64"])


@pytest.mark.parametrize("switches", [dict(position="rope", n_kv_head=2), MODERN],
                         ids=["rope-gqa", "modern"])
def test_kv_cache_with_rope_and_gqa_equals_recomputation(switches):
    """Logits of a prompt then one token at a time through the cache equal one full pass, in
    both backends; the cache holds n_kv_head heads of rotated keys."""
    model = small_gpt(seed=6, **switches)
    ids = torch.randint(0, 23, (2, 10), generator=torch.Generator().manual_seed(7))
    full = model(ids).detach().numpy()
    cache = qpt.KVCache(2)
    steps = [model(ids[:, :4], kv_cache=cache)]
    steps += [model(ids[:, t:t + 1], kv_cache=cache) for t in range(4, 10)]
    np.testing.assert_allclose(torch.cat(steps, dim=1).detach().numpy(), full, **TOL["float64"])
    assert tuple(cache.layers[0]["k"].shape) == (2, 2, 10, 4)
    params, arch = model.numpy_params(), model.config.arch
    np_cache = qnp.KVCache(2)
    np_steps = [qnp.gpt_forward(ids[:, :7].numpy(), params, 4, kv_cache=np_cache, arch=arch)]
    np_steps += [qnp.gpt_forward(ids[:, t:t + 1].numpy(), params, 4, kv_cache=np_cache,
                                 arch=arch) for t in range(7, 10)]
    np.testing.assert_allclose(np.concatenate(np_steps, axis=1), full, **TOL["float64"])


def test_generation_with_cache_equals_without_on_the_modern_model():
    model = small_gpt(seed=8, **MODERN).float()
    prompt = [1, 5, 2]
    cached = qpt.generate(model, prompt, 9, temperature=0)  # the window slides past 12
    plain = qpt.generate(model, prompt, 9, temperature=0, use_cache=False)
    assert cached.tolist() == plain.tolist()
    np_model = (model.numpy_params(), 4, model.config.arch)
    assert qnp.generate(np_model, prompt, 6, temperature=0).tolist() == cached[:9].tolist()
