"""Properties that must hold whatever the numbers: stability, causality, fully masked rows,
any number of leading batch dims, and qkv.pt following the dtype of its inputs.

``impl`` runs a test on qkv.np, on qkv.pt's naive path and on qkv.pt's fused path.
"""

import math

import numpy as np
import pytest
import torch

import qkv.np as qnp
import qkv.pt as qpt
from qkv.tolerances import TOL


def rng(seed=0):
    return np.random.default_rng(seed)


@pytest.fixture(scope="module")
def small_gpt():
    """The small float64 test model as {fused: GPT} (same weights) and its NumPy parameters."""
    models = {}
    for fused in (False, True):
        cfg = qpt.GPTConfig(vocab_size=65, context_length=16, n_layer=2, n_head=4, d_model=32,
                            fused=fused)
        models[fused] = qpt.GPT(cfg, generator=torch.Generator().manual_seed(0)).double()
    return models, models[False].numpy_params()


def run_gpt(impl, ids, small_gpt):
    """Logits of the small test model for NumPy ids (..., seq), in impl's backend and path."""
    models, params = small_gpt
    if impl.name == "np":
        return qnp.gpt_forward(ids, params, n_head=4)
    with torch.no_grad():
        return models[impl.fused](torch.from_numpy(ids))


# ---------------------------------------------------------------- numerical stability

def test_softmax_at_plus_minus_1e4(impl):
    x = impl.array([[1e4, 1e4 + math.log(2)],
                    [-1e4, -1e4 + math.log(3)]])
    np.testing.assert_allclose(impl.numpy(impl.lib.softmax(x)), [[1 / 3, 2 / 3], [1 / 4, 3 / 4]],
                               **TOL["float64"])
    y = impl.numpy(impl.lib.softmax(impl.array(np.array([1e4, -1e4, 0.0], np.float32))))
    assert y.dtype == np.float32 and np.isfinite(y).all()
    np.testing.assert_array_equal(y, [1, 0, 0])


def test_cross_entropy_at_large_logits(impl):
    logits = impl.array([[1e4, 0.0, -1e4]])
    targets = impl.array(np.array([1]))
    loss = float(impl.lib.cross_entropy(logits, targets))
    np.testing.assert_allclose(loss, 1e4, **TOL["float64"])  # -log(e^0 / e^1e4) = 1e4


# ---------------------------------------------------------------- causality

SEQ, T = 8, 3  # change everything after position T; positions 0..T must not notice


def future_changed(x, seed=1):
    x = x.copy()
    x[..., T + 1:, :] = rng(seed).normal(size=x[..., T + 1:, :].shape)
    return x


def assert_causal(before, after):
    np.testing.assert_allclose(after[..., :T + 1, :], before[..., :T + 1, :], **TOL["float64"])
    assert not np.allclose(after[..., T + 1:, :], before[..., T + 1:, :])  # the change was seen


def test_attention_is_causal(impl):
    q, k, v = (rng(s).normal(size=(2, SEQ, 4)) for s in (0, 1, 2))
    def run(q, k, v):
        return impl.numpy(impl.lib.scaled_dot_product_attention(
            impl.array(q), impl.array(k), impl.array(v), causal=True, **impl.kw))
    assert_causal(run(q, k, v), run(future_changed(q, 3), future_changed(k, 4),
                                    future_changed(v, 5)))


def test_multi_head_attention_is_causal(impl, block_params):
    p = block_params(rng(), 16)
    x = rng(1).normal(size=(2, SEQ, 16))
    def run(x):
        w = [impl.array(p[n]) for n in ("w_qkv", "b_qkv", "w_out", "b_out")]
        return impl.numpy(impl.lib.multi_head_attention(impl.array(x), *w, 4, **impl.kw))
    assert_causal(run(x), run(future_changed(x)))


def test_decoder_block_is_causal(impl, block_params):
    p = block_params(rng(), 16)
    x = rng(1).normal(size=(2, SEQ, 16))
    def run(x):
        params = {name: impl.array(val) for name, val in p.items()}
        return impl.numpy(impl.lib.decoder_block(impl.array(x), params, 4, **impl.kw))
    assert_causal(run(x), run(future_changed(x)))


def test_model_is_causal(impl, small_gpt):
    ids = rng(2).integers(0, 65, size=(2, 12))
    changed = ids.copy()
    changed[:, T + 1:] = (ids[:, T + 1:] + 1 + rng(3).integers(0, 63, size=(2, 8))) % 65
    assert (changed[:, T + 1:] != ids[:, T + 1:]).all()
    assert_causal(impl.numpy(run_gpt(impl, ids, small_gpt)),
                  impl.numpy(run_gpt(impl, changed, small_gpt)))


# ---------------------------------------------------------------- fully masked rows

def test_fully_masked_row_gives_zeros(impl):
    q, k, v = (impl.array(rng(s).normal(size=(2, 4, 3))) for s in (0, 1, 2))
    mask = np.ones((4, 4), dtype=bool)
    mask[1] = False  # query 1 may attend to nothing
    out = impl.lib.scaled_dot_product_attention(q, k, v, mask=impl.array(mask), **impl.kw)
    out = impl.numpy(out)
    assert np.isfinite(out).all()
    np.testing.assert_array_equal(out[:, 1], 0.0)
    assert (np.abs(out[:, [0, 2, 3]]) > 0).any()
    if not impl.fused:
        _, w = impl.lib.scaled_dot_product_attention(q, k, v, mask=impl.array(mask),
                                                     return_weights=True)
        w = impl.numpy(w)
        np.testing.assert_array_equal(w[:, 1], 0.0)
        np.testing.assert_allclose(w[:, [0, 2, 3]].sum(-1), 1.0, **TOL["float64"])


def test_more_queries_than_keys_causal(impl):
    # seq_q 3 > seq_k 2, bottom-right: query 0 comes before every key and sees none.
    q = impl.array(rng(0).normal(size=(3, 4)))
    k, v = impl.array(rng(1).normal(size=(2, 4))), impl.array(rng(2).normal(size=(2, 5)))
    out = impl.numpy(impl.lib.scaled_dot_product_attention(q, k, v, causal=True, **impl.kw))
    assert np.isfinite(out).all()
    np.testing.assert_array_equal(out[0], 0.0)
    np.testing.assert_allclose(out[1], impl.numpy(v)[0], **TOL["float64"])  # sees key 0 only


def test_fully_masked_row_in_multi_head_attention(impl, block_params):
    p = block_params(rng(), 8)
    x = rng(1).normal(size=(2, 5, 8))
    mask = np.ones((2, 5, 5), dtype=bool)
    mask[0, 2] = False  # batch 0, query 2: nothing to attend to -> attention adds only b_out
    w = [impl.array(p[n]) for n in ("w_qkv", "b_qkv", "w_out", "b_out")]
    out = impl.numpy(impl.lib.multi_head_attention(impl.array(x), *w, 2, mask=impl.array(mask),
                                                   **impl.kw))
    assert np.isfinite(out).all()
    np.testing.assert_allclose(out[0, 2], p["b_out"], **TOL["float64"])


@pytest.mark.parametrize("fused", [False, True], ids=["naive", "fused"])
def test_fully_masked_row_has_finite_gradients(fused):
    q, k, v = (torch.randn(4, 3, dtype=torch.float64, requires_grad=True) for _ in range(3))
    mask = torch.ones(4, 4, dtype=torch.bool)
    mask[2] = False
    qpt.scaled_dot_product_attention(q, k, v, mask=mask, fused=fused).square().sum().backward()
    for t in (q, k, v):
        assert torch.isfinite(t.grad).all()
    assert torch.equal(q.grad[2], torch.zeros(3, dtype=torch.float64))


def test_fused_zeroes_fully_masked_rows_whatever_the_kernel_gives(monkeypatch):
    """Some fused kernels (and older torch versions) return NaN for a query with no allowed
    key; torch 2.13's CPU kernel returns zeros. Simulate the NaN kernel: qkv must still
    give zeros."""
    real_kernel = torch.nn.functional.scaled_dot_product_attention

    def nan_kernel(q, k, v, attn_mask=None, **kwargs):
        out = real_kernel(q, k, v, attn_mask=attn_mask, **kwargs)
        if attn_mask is not None:
            out = out.masked_fill(~attn_mask.any(dim=-1, keepdim=True), float("nan"))
        return out

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", nan_kernel)
    q, k, v = (torch.randn(2, 4, 3) for _ in range(3))
    mask = torch.ones(4, 4, dtype=torch.bool)
    mask[1] = False
    out = qpt.scaled_dot_product_attention(q, k, v, mask=mask, fused=True)
    assert torch.isfinite(out).all()
    assert torch.equal(out[:, 1], torch.zeros(2, 3))
    out = qpt.scaled_dot_product_attention(q[:, :3], k[:, :2], v[:, :2], causal=True, fused=True)
    assert torch.equal(out[:, 0], torch.zeros(2, 3))  # query 0 comes before both keys


# ---------------------------------------------------------------- leading batch dims

@pytest.mark.parametrize("lead", [(), (3,), (2, 3)], ids=["none", "one", "two"])
def test_any_leading_dims(impl, lead, block_params, small_gpt):
    """Each batched result equals the unbatched function applied to each slice."""
    p = block_params(rng(), 8)
    x = rng(1).normal(size=(*lead, 5, 8))
    ids = rng(2).integers(0, 65, size=(*lead, 6))
    a = impl.array
    calls = {
        "attention": lambda x: impl.lib.scaled_dot_product_attention(a(x), a(x), a(x),
                                                                     causal=True, **impl.kw),
        "mha": lambda x: impl.lib.multi_head_attention(
            a(x), a(p["w_qkv"]), a(p["b_qkv"]), a(p["w_out"]), a(p["b_out"]), 2, **impl.kw),
        "layer_norm": lambda x: impl.lib.layer_norm(a(x), a(p["ln1_gamma"]), a(p["ln1_beta"])),
        "block": lambda x: impl.lib.decoder_block(a(x), {n: a(t) for n, t in p.items()}, 2,
                                                  **impl.kw),
        "gpt": lambda ids: run_gpt(impl, ids, small_gpt),
    }
    for name, f in calls.items():
        inp = ids if name == "gpt" else x
        batched = impl.numpy(f(inp))
        assert batched.shape[:len(lead)] == lead, name
        for idx in np.ndindex(*lead):
            np.testing.assert_allclose(batched[idx], impl.numpy(f(inp[idx])), **TOL["float64"],
                                       err_msg=name)


# ---------------------------------------------------------------- pt follows dtype and device

def pt_calls(device):
    """name -> function of a dtype giving qkv.pt's output, on inputs rounded to bfloat16 first.

    Single ops only: bfloat16 rounding adds up over a whole block (the residual sums reach
    magnitudes where one bfloat16 step is 0.016), which the GPT test below covers end to end.
    """
    g = torch.Generator().manual_seed(0)

    def r(*shape, scale=1.0):
        # Round to bfloat16 once, so float32 and bfloat16 runs see exactly the same numbers.
        return (torch.randn(*shape, generator=g) * scale).to(torch.bfloat16).to(device)

    x, w, b = r(2, 6, 16), r(16, 48, scale=0.25), r(48, scale=0.1)
    w_out, b_out = r(16, 16, scale=0.25), r(16, scale=0.1)
    gamma, beta = 1 + r(16, scale=0.1), r(16, scale=0.1)
    w_fc, w_proj = r(16, 64, scale=0.25), r(64, 16, scale=0.125)
    ids = torch.randint(0, 48, (2, 6), generator=g).to(device)
    q, k, v = r(2, 2, 6, 8), r(2, 2, 6, 8), r(2, 2, 6, 8)
    return {
        "softmax": lambda dt: qpt.softmax(x.to(dt) * 3),
        "linear": lambda dt: qpt.linear(x.to(dt), w.to(dt), b.to(dt)),
        "layer_norm": lambda dt: qpt.layer_norm(x.to(dt), gamma.to(dt), beta.to(dt)),
        "gelu": lambda dt: qpt.gelu(x.to(dt) * 3),
        "mlp": lambda dt: qpt.mlp(x.to(dt), w_fc.to(dt), None, w_proj.to(dt), None),
        "embed": lambda dt: qpt.embed(ids, w.T.to(dt)),
        "attention-naive": lambda dt: qpt.scaled_dot_product_attention(
            q.to(dt), k.to(dt), v.to(dt), causal=True),
        "attention-fused": lambda dt: qpt.scaled_dot_product_attention(
            q.to(dt), k.to(dt), v.to(dt), causal=True, fused=True),
        "mha-naive": lambda dt: qpt.multi_head_attention(
            x.to(dt), w.to(dt), b.to(dt), w_out.to(dt), b_out.to(dt), 4),
        "mha-fused": lambda dt: qpt.multi_head_attention(
            x.to(dt), w.to(dt), b.to(dt), w_out.to(dt), b_out.to(dt), 4, fused=True),
        "cross_entropy": lambda dt: qpt.cross_entropy(x.to(dt) * 3, ids % 16),
        "positional": lambda dt: qpt.sinusoidal_positional_encoding(6, 16, dtype=dt,
                                                                    device=device),
        "causal_mask": lambda dt: qpt.causal_mask(6, device=device),
    }


PT_CALLS = list(pt_calls("cpu"))


@pytest.mark.parametrize("name", PT_CALLS)
def test_pt_follows_dtype_and_device(device, name):
    f = pt_calls(device)[name]
    ref = f(torch.float32)
    out64, out16 = f(torch.float64), f(torch.bfloat16)
    for out in (ref, out64, out16):
        assert out.device.type == device.type
    if name == "causal_mask":
        assert ref.dtype == out16.dtype == torch.bool
        return
    assert (ref.dtype, out64.dtype, out16.dtype) == (torch.float32, torch.float64,
                                                     torch.bfloat16)
    torch.testing.assert_close(out64, ref.double(), **TOL["float32_op"])
    torch.testing.assert_close(out16.float(), ref, **TOL["bfloat16"])


@pytest.mark.parametrize("fused", [False, True], ids=["naive", "fused"])
def test_gpt_follows_dtype_and_device(device, fused):
    cfg = qpt.GPTConfig(vocab_size=65, context_length=16, n_layer=2, n_head=4, d_model=32,
                        fused=fused)
    model = qpt.GPT(cfg, generator=torch.Generator().manual_seed(0)).to(device)
    with torch.no_grad():  # round the weights to bfloat16 once, so all three runs share them
        for p in model.parameters():
            p.copy_(p.to(torch.bfloat16))
    ids = torch.randint(0, 65, (2, 16), generator=torch.Generator().manual_seed(1)).to(device)
    with torch.no_grad():
        ref = model(ids)
        out64 = model.double()(ids)
        out16 = model.to(torch.bfloat16)(ids)
    assert (ref.dtype, out64.dtype, out16.dtype) == (torch.float32, torch.float64,
                                                     torch.bfloat16)
    assert out16.device.type == device.type
    torch.testing.assert_close(out64.float(), ref, **TOL["float32_model"])
    torch.testing.assert_close(out16.float(), ref, **TOL["bfloat16"])


# ---------------------------------------------------------------- the GPT module itself

def test_gpt_layout_init_and_tying():
    cfg = qpt.GPTConfig(vocab_size=500, context_length=64, n_layer=8, n_head=4, d_model=64)
    model = qpt.GPT(cfg, generator=torch.Generator().manual_seed(0))
    T = model.transformer
    assert model.lm_head.weight is T.wte.weight  # tied: one parameter
    block = T.h[0]
    shapes = {name: tuple(t.shape) for name, t in block.state_dict().items()}
    assert shapes == {
        "ln_1.weight": (64,), "ln_1.bias": (64,),
        "attn.c_attn.weight": (64, 192), "attn.c_attn.bias": (192,),  # (d_in, d_out)
        "attn.c_proj.weight": (64, 64), "attn.c_proj.bias": (64,),
        "ln_2.weight": (64,), "ln_2.bias": (64,),
        "mlp.c_fc.weight": (64, 256), "mlp.c_fc.bias": (256,),
        "mlp.c_proj.weight": (256, 64), "mlp.c_proj.bias": (64,),
    }
    assert {k for k in model.state_dict() if not k.startswith("transformer.h.")} == {
        "transformer.wte.weight", "transformer.wpe.weight", "transformer.ln_f.weight",
        "transformer.ln_f.bias", "lm_head.weight"}
    # GPT-2 init: std 0.02, residual projections 0.02 / sqrt(2 * n_layer) = 0.005 here
    assert abs(T.wte.weight.std().item() - 0.02) < 1e-3
    assert abs(block.mlp.c_fc.weight.std().item() - 0.02) < 1e-3
    c_proj = torch.cat([b.mlp.c_proj.weight.flatten() for b in T.h])
    assert abs(c_proj.std().item() - 0.005) < 2.5e-4
    assert torch.equal(block.attn.c_attn.bias, torch.zeros(192))
    assert torch.equal(block.ln_1.weight, torch.ones(64))


def test_gpt_seeding_and_bias_off():
    cfg = qpt.GPTConfig(vocab_size=20, context_length=8, n_layer=1, n_head=2, d_model=8,
                        bias=False)
    a = qpt.GPT(cfg, generator=torch.Generator().manual_seed(3))
    b = qpt.GPT(cfg, generator=torch.Generator().manual_seed(3))
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(pa, pb), name
    assert all(not name.endswith("bias") for name in a.state_dict())
    assert a.numpy_params()["blocks"][0]["b_qkv"] is None


def test_gpt_dropout_only_in_training():
    cfg = qpt.GPTConfig(vocab_size=20, context_length=8, n_layer=1, n_head=2, d_model=8,
                        dropout=0.5)
    model = qpt.GPT(cfg, generator=torch.Generator().manual_seed(0))
    ids = torch.arange(8)[None]
    model.eval()
    torch.testing.assert_close(model(ids), model(ids), rtol=0, atol=0)
    model.train()
    torch.manual_seed(0)
    assert not torch.equal(model(ids), model(ids))


def test_gpt_config_fused_switches_the_path(monkeypatch):
    calls = []
    real_kernel = torch.nn.functional.scaled_dot_product_attention

    def counting_kernel(*args, **kwargs):
        calls.append(1)
        return real_kernel(*args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", counting_kernel)
    cfg = qpt.GPTConfig(vocab_size=20, context_length=8, n_layer=3, n_head=2, d_model=8)
    model = qpt.GPT(cfg)
    ids = torch.arange(8)[None]
    fused = model(ids)
    assert len(calls) == 3  # fused by default: one kernel call per block
    model.config.fused = False
    naive = model(ids)
    assert len(calls) == 3  # the naive path never calls the kernel
    torch.testing.assert_close(naive, fused, **TOL["float32_model"])
