"""qkv.pt against PyTorch's own ops, on the same weights.

PyTorch is the independent reference for the naive path: F.softmax,
F.scaled_dot_product_attention, nn.MultiheadAttention, nn.LayerNorm, F.gelu, F.cross_entropy,
F.embedding, F.linear. The fused path IS some of those calls, so where it is (gelu, layer_norm,
attention without a mask or with the square causal mask, mlp, cross_entropy) both paths are also
held to the formula written out here in float64 NumPy (``ref64``), which shares no code with
torch or qkv. Every test runs on CPU and (when there is a GPU) on CUDA.
"""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import qkv.pt as qpt
from qkv.tolerances import TOL

DTYPES = [torch.float32, torch.float64]
TOL_OF = {torch.float32: TOL["float32_op"], torch.float64: TOL["float64"]}
PATHS = [pytest.param(False, id="naive"), pytest.param(True, id="fused")]


def randn(*shape, device, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=dtype).to(device)


def bottom_right_causal(seq_q, seq_k, device):
    """Written out independently of qkv: query i may see key j iff j <= i + seq_k - seq_q."""
    return torch.ones(seq_q, seq_k, dtype=torch.bool, device=device).tril(diagonal=seq_k - seq_q)


def close(actual, expected, dtype=torch.float32):
    torch.testing.assert_close(actual, expected, **TOL_OF[dtype])


# --- the formulas by hand, in float64 NumPy ------------------------------------------------------

def ref64(formula, *tensors, like):
    """formula on float64 NumPy copies of the tensors, returned as a tensor shaped, typed and
    placed like ``like`` (the float64 result rounded once to like's dtype)."""
    arrays = [None if t is None else t.detach().cpu().to(torch.float64).numpy() for t in tensors]
    return torch.as_tensor(np.asarray(formula(*arrays)), dtype=like.dtype, device=like.device)


def gelu64(x):  # GPT-2's tanh approximation (Hendrycks & Gimpel 2016, eq. 2)
    return 0.5 * x * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (x + 0.044715 * x**3)))


def layer_norm64(x, gamma, beta, eps=1e-5):
    mean = x.mean(axis=-1, keepdims=True)
    var = ((x - mean) ** 2).mean(axis=-1, keepdims=True)  # biased, as layer norm defines it
    return (x - mean) / np.sqrt(var + eps) * gamma + beta


def attention64(q, k, v, allowed=None):
    scores = q @ np.swapaxes(k, -1, -2) / np.sqrt(q.shape[-1])
    if allowed is not None:
        scores = np.where(allowed, scores, -np.inf)
    e = np.exp(scores - scores.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True) @ v


def mlp64(x, w_fc, b_fc, w_proj, b_proj):
    return gelu64(x @ w_fc + b_fc) @ w_proj + b_proj


def cross_entropy64(logits, targets, ignore_index=None):
    m = logits.max(axis=-1, keepdims=True)
    log_z = (m + np.log(np.exp(logits - m).sum(axis=-1, keepdims=True)))[..., 0]
    keep = np.ones(targets.shape, bool) if ignore_index is None else targets != ignore_index
    picked = np.take_along_axis(logits, np.where(keep, targets, 0)[..., None], -1)[..., 0]
    return (log_z - picked)[keep].mean()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("axis", [-1, 0, 1])
def test_softmax(device, dtype, axis):
    x = randn(4, 5, 6, device=device, dtype=dtype) * 3
    x[0, 0, :3] = float("-inf")  # some blocked entries, as after masking
    close(qpt.softmax(x, axis=axis), F.softmax(x, dim=axis), dtype)


@pytest.mark.parametrize("fused", PATHS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_attention_no_mask(device, dtype, fused):
    q = randn(2, 3, 5, 8, device=device, dtype=dtype, seed=1)  # (batch, n_head, seq_q, d_head)
    k = randn(2, 3, 7, 8, device=device, dtype=dtype, seed=2)  # (batch, n_head, seq_k, d_head)
    v = randn(2, 3, 7, 4, device=device, dtype=dtype, seed=3)  # (batch, n_head, seq_k, d_v)
    out = qpt.scaled_dot_product_attention(q, k, v, fused=fused)
    if not fused:  # the fused path is this very call
        close(out, F.scaled_dot_product_attention(q, k, v), dtype)
    close(out, ref64(attention64, q, k, v, like=out), dtype)


@pytest.mark.parametrize("fused", PATHS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_attention_causal_square(device, dtype, fused):
    q, k, v = (randn(2, 3, 6, 8, device=device, dtype=dtype, seed=s) for s in (1, 2, 3))
    out = qpt.scaled_dot_product_attention(q, k, v, causal=True, fused=fused)
    if not fused:  # the fused path is this very call
        close(out, F.scaled_dot_product_attention(q, k, v, is_causal=True), dtype)
    lower = np.tril(np.ones((6, 6), bool))  # query i sees keys 0..i
    close(out, ref64(lambda *a: attention64(*a, lower), q, k, v, like=out), dtype)


@pytest.mark.parametrize("fused", PATHS)
@pytest.mark.parametrize("seq_q, seq_k", [(1, 6), (3, 6), (6, 6)])
def test_attention_causal_bottom_right(device, fused, seq_q, seq_k):
    # torch's is_causal aligns top-left when seq_q != seq_k; qkv aligns bottom-right (KV cache),
    # so the reference gets the bottom-right mask explicitly.
    q = randn(2, seq_q, 8, device=device, seed=1)
    k, v = randn(2, seq_k, 8, device=device, seed=2), randn(2, seq_k, 8, device=device, seed=3)
    expected = F.scaled_dot_product_attention(
        q, k, v, attn_mask=bottom_right_causal(seq_q, seq_k, device))
    close(qpt.scaled_dot_product_attention(q, k, v, causal=True, fused=fused), expected)


@pytest.mark.parametrize("fused", PATHS)
@pytest.mark.parametrize("causal", [False, True])
def test_attention_bool_mask(device, fused, causal):
    q, k, v = (randn(2, 3, 6, 8, device=device, seed=s) for s in (1, 2, 3))
    g = torch.Generator().manual_seed(4)
    mask = (torch.rand(2, 1, 6, 6, generator=g) > 0.4).to(device)  # broadcast over heads
    mask[..., 0] = True  # every query keeps key 0, so no row is fully blocked here
    allowed = mask & bottom_right_causal(6, 6, device) if causal else mask
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)
    close(qpt.scaled_dot_product_attention(q, k, v, mask=mask, causal=causal, fused=fused),
          expected)


def test_attention_weights_match_softmax_of_scores(device):
    q, k, v = (randn(3, 5, 8, device=device, seed=s) for s in (1, 2, 3))
    mask = bottom_right_causal(5, 5, device)
    expected = F.softmax((q @ k.mT / math.sqrt(8)).masked_fill(~mask, float("-inf")), dim=-1)
    _, weights = qpt.scaled_dot_product_attention(q, k, v, causal=True, return_weights=True)
    close(weights, expected)


def torch_mha(x, w_qkv, b_qkv, w_out, b_out, n_head, allowed):
    """nn.MultiheadAttention with qkv's weights copied in (nn stores weights (d_out, d_in))."""
    d_model = x.shape[-1]
    mha = nn.MultiheadAttention(d_model, n_head, batch_first=True, device=x.device,
                                dtype=x.dtype)
    with torch.no_grad():
        mha.in_proj_weight.copy_(w_qkv.T)  # (3*d_model, d_model), rows [Q; K; V]
        mha.in_proj_bias.copy_(b_qkv)
        mha.out_proj.weight.copy_(w_out.T)
        mha.out_proj.bias.copy_(b_out)
    # nn.MultiheadAttention's boolean attn_mask means True = NOT allowed: the opposite of ours.
    return mha(x, x, x, attn_mask=~allowed, need_weights=True, average_attn_weights=False)


def mha_weights(d_model, device, dtype=torch.float32):
    return dict(
        w_qkv=randn(d_model, 3 * d_model, device=device, dtype=dtype, seed=10) / math.sqrt(d_model),
        b_qkv=randn(3 * d_model, device=device, dtype=dtype, seed=11) * 0.1,
        w_out=randn(d_model, d_model, device=device, dtype=dtype, seed=12) / math.sqrt(d_model),
        b_out=randn(d_model, device=device, dtype=dtype, seed=13) * 0.1,
    )


@pytest.mark.parametrize("fused", PATHS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_multi_head_attention_vs_nn(device, dtype, fused):
    batch, seq, d_model, n_head = 2, 7, 16, 4
    x = randn(batch, seq, d_model, device=device, dtype=dtype)
    w = mha_weights(d_model, device, dtype)
    expected, expected_weights = torch_mha(x, *w.values(), n_head,
                                           bottom_right_causal(seq, seq, device))
    out = qpt.multi_head_attention(x, *w.values(), n_head, fused=fused)
    close(out, expected, dtype)
    if not fused:
        _, weights = qpt.multi_head_attention(x, *w.values(), n_head, return_weights=True)
        close(weights, expected_weights, dtype)  # (batch, n_head, seq, seq)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("fused", PATHS)
def test_layer_norm_vs_nn(device, dtype, fused):
    x = randn(3, 5, 16, device=device, dtype=dtype) * 4 + 2
    ln = nn.LayerNorm(16, eps=1e-5, device=device, dtype=dtype)
    with torch.no_grad():
        ln.weight.copy_(randn(16, device=device, dtype=dtype, seed=1))
        ln.bias.copy_(randn(16, device=device, dtype=dtype, seed=2))
    out = qpt.layer_norm(x, ln.weight, ln.bias, fused=fused)
    if not fused:  # the fused path is F.layer_norm, what nn.LayerNorm calls
        close(out, ln(x), dtype)
    close(out, ref64(layer_norm64, x, ln.weight, ln.bias, like=out), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("fused", PATHS)
def test_gelu_vs_torch(device, dtype, fused):
    x = torch.linspace(-8, 8, 401, device=device, dtype=dtype)
    out = qpt.gelu(x, fused=fused)
    if not fused:  # the fused path is this very call
        close(out, F.gelu(x, approximate="tanh"), dtype)
    close(out, ref64(gelu64, x, like=out), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("ignore_index", [None, 0, -1])
@pytest.mark.parametrize("fused", PATHS)
def test_cross_entropy_vs_torch(device, dtype, ignore_index, fused):
    g = torch.Generator().manual_seed(5)
    logits = randn(3, 7, 11, device=device, dtype=dtype) * 3
    targets = torch.randint(0, 11, (3, 7), generator=g).to(device)
    if ignore_index == -1:
        targets[:, -2:] = -1  # padding
    out = qpt.cross_entropy(logits, targets, ignore_index=ignore_index, fused=fused)
    if not fused:  # the fused path is this very call
        expected = F.cross_entropy(logits.reshape(-1, 11), targets.reshape(-1),
                                   ignore_index=-100 if ignore_index is None else ignore_index)
        close(out, expected, dtype)
    hand = ref64(lambda z, t: cross_entropy64(z, t.astype(np.int64), ignore_index), logits,
                 targets, like=out)
    close(out, hand, dtype)


def test_cross_entropy_all_ignored_is_nan_like_torch(device):
    logits, targets = randn(2, 5, device=device), torch.full((2,), -1, device=device)
    assert torch.isnan(F.cross_entropy(logits, targets, ignore_index=-1))
    assert torch.isnan(qpt.cross_entropy(logits, targets, ignore_index=-1))
    assert torch.isnan(qpt.cross_entropy(logits, targets, ignore_index=-1, fused=True))


def test_embed_vs_torch(device):
    table = randn(10, 6, device=device)
    ids = torch.tensor([[0, 3, 9, 3], [1, 1, 2, 8]], device=device)
    close(qpt.embed(ids, table), F.embedding(ids, table))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("fused", PATHS)
def test_linear_vs_torch(device, dtype, fused):
    x = randn(2, 5, 6, device=device, dtype=dtype)
    w = randn(6, 3, device=device, dtype=dtype, seed=1)  # (d_in, d_out)
    b = randn(3, device=device, dtype=dtype, seed=2)
    # einsum, not F.linear: the fused path IS F.linear
    expected = torch.einsum("bsi,io->bso", x, w)
    close(qpt.linear(x, w, b, fused=fused), expected + b, dtype)
    close(qpt.linear(x, w, fused=fused), expected, dtype)


@pytest.mark.parametrize("fused", PATHS)
def test_mlp_vs_torch(device, fused):
    x = randn(2, 5, 8, device=device)
    w_fc, b_fc = randn(8, 32, device=device, seed=1) / 3, randn(32, device=device, seed=2)
    w_proj, b_proj = randn(32, 8, device=device, seed=3) / 6, randn(8, device=device, seed=4)
    out = qpt.mlp(x, w_fc, b_fc, w_proj, b_proj, fused=fused)
    if not fused:  # the fused path is these very calls
        close(out, F.linear(F.gelu(F.linear(x, w_fc.T, b_fc), approximate="tanh"), w_proj.T,
                            b_proj))
    close(out, ref64(mlp64, x, w_fc, b_fc, w_proj, b_proj, like=out))


def test_causal_mask_vs_tril(device):
    for seq_q, seq_k in [(1, 1), (4, 4), (2, 5), (5, 2)]:
        mask = qpt.causal_mask(seq_q, seq_k, device=device)
        assert mask.device.type == device.type
        assert torch.equal(mask, bottom_right_causal(seq_q, seq_k, device))


def torch_block(x, p, n_head):
    """A pre-LN GPT-2 block built only from torch.nn / torch.nn.functional."""
    d = x.shape[-1]
    seq = x.shape[-2]
    h = F.layer_norm(x, (d,), p["ln1_gamma"], p["ln1_beta"], eps=1e-5)
    attn, _ = torch_mha(h, p["w_qkv"], p["b_qkv"], p["w_out"], p["b_out"], n_head,
                        bottom_right_causal(seq, seq, x.device))
    x = x + attn
    h = F.layer_norm(x, (d,), p["ln2_gamma"], p["ln2_beta"], eps=1e-5)
    h = F.gelu(F.linear(h, p["w_fc"].T, p["b_fc"]), approximate="tanh")
    return x + F.linear(h, p["w_proj"].T, p["b_proj"])


@pytest.mark.parametrize("fused", PATHS)
def test_decoder_block_vs_torch(device, fused, block_params, torchify):
    p = torchify(block_params(np.random.default_rng(0), 16), torch.float32, device)
    x = randn(2, 6, 16, device=device)
    close(qpt.decoder_block(x, p, 4, fused=fused), torch_block(x, p, 4))


@pytest.mark.parametrize("fused", PATHS)
def test_gpt_vs_torch_reference(device, fused):
    cfg = qpt.GPTConfig(vocab_size=65, context_length=16, n_layer=2, n_head=4, d_model=32,
                        fused=fused)
    g = torch.Generator().manual_seed(0)
    model = qpt.GPT(cfg, generator=g)
    with torch.no_grad():  # move every parameter off its init (LN scales 1, biases 0)
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    model.to(device)
    ids = torch.randint(0, 65, (2, 16), generator=g).to(device)
    targets = torch.randint(0, 65, (2, 16), generator=g).to(device)

    T = model.transformer
    x = F.embedding(ids, T.wte.weight) + T.wpe.weight[:16]
    for block in T.h:
        x = torch_block(x, block.params(), cfg.n_head)
    x = F.layer_norm(x, (32,), T.ln_f.weight, T.ln_f.bias, eps=1e-5)
    expected = F.linear(x, T.wte.weight)  # tied unembedding

    logits, loss = model(ids, targets)
    torch.testing.assert_close(logits, expected, **TOL["float32_model"])
    torch.testing.assert_close(loss, F.cross_entropy(expected.reshape(-1, 65), targets.reshape(-1)),
                               **TOL["float32_model"])
