"""qkv.np and qkv.pt agree on the same inputs and weights: every public function, then the
whole model (gpt_forward on GPT.numpy_params() vs GPT itself).

float64: tight (TOL["float64"]); float32: one op at TOL["float32_op"], the model at
TOL["float32_model"]. Functions with a fused path in qkv.pt run through it too.
"""

import inspect

import numpy as np
import pytest
import torch

import qkv.np as qnp
import qkv.pt as qpt
from qkv.tolerances import TOL

DTYPES = {"float64": (np.float64, torch.float64), "float32": (np.float32, torch.float32)}
OP_TOL = {"float64": TOL["float64"], "float32": TOL["float32_op"]}
MODEL_TOL = {"float64": TOL["float64"], "float32": TOL["float32_model"]}


def cases():
    """(function name, positional args, keyword args, has a fused path) on NumPy inputs."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 5, 8))
    q, k, v = rng.normal(size=(2, 3, 4, 8)), rng.normal(size=(2, 3, 6, 8)), rng.normal(size=(6, 5))
    mask = rng.random((4, 6)) > 0.5
    mask[:, 0] = True
    d = 8
    mha_w = (rng.normal(size=(d, 3 * d)) / 3, rng.normal(size=3 * d) / 10,
             rng.normal(size=(d, d)) / 3, rng.normal(size=d) / 10)
    block = dict(ln1_gamma=1 + rng.normal(size=d) / 10, ln1_beta=rng.normal(size=d) / 10,
                 w_qkv=mha_w[0], b_qkv=mha_w[1], w_out=mha_w[2], b_out=mha_w[3],
                 ln2_gamma=1 + rng.normal(size=d) / 10, ln2_beta=rng.normal(size=d) / 10,
                 w_fc=rng.normal(size=(d, 32)) / 3, b_fc=rng.normal(size=32) / 10,
                 w_proj=rng.normal(size=(32, d)) / 6, b_proj=rng.normal(size=d) / 10)
    # Longer than qkv.np's QUERY_BLOCK (128): causal attention then runs block by block.
    long_q = rng.normal(size=(2, 300, 8))
    long_kv = {n: (rng.normal(size=(2, n, 8)), rng.normal(size=(n, 5))) for n in (300, 340, 150)}
    ids = rng.integers(0, 11, size=(2, 5))
    logits = rng.normal(size=(2, 5, 11)) * 3
    return [
        ("embed", (ids, rng.normal(size=(11, d))), {}, False),
        ("linear", (x, rng.normal(size=(8, 3)), rng.normal(size=3)), {}, True),
        ("linear", (x, rng.normal(size=(8, 3))), {}, True),
        ("softmax", (x * 5,), {}, False),
        ("softmax", (x * 5,), {"axis": 1}, False),
        ("scaled_dot_product_attention", (q, k, v[None, None]), {}, True),
        ("scaled_dot_product_attention", (q, k, v), {"causal": True}, True),
        ("scaled_dot_product_attention", (q, k, v), {"mask": mask}, True),
        ("scaled_dot_product_attention", (q, k, v), {"mask": mask, "causal": True}, True),
        ("scaled_dot_product_attention", (q, k, v), {"causal": True, "return_weights": True},
         False),
        ("scaled_dot_product_attention", (long_q, *long_kv[300]), {"causal": True}, True),
        ("scaled_dot_product_attention", (long_q, *long_kv[340]), {"causal": True}, True),
        # seq_q > seq_k: the first 150 queries see no key at all (zeros)
        ("scaled_dot_product_attention", (long_q, *long_kv[150]), {"causal": True}, True),
        ("scaled_dot_product_attention", (long_q, *long_kv[340]),
         {"causal": True, "return_weights": True}, False),
        ("split_heads", (x, 2), {}, False),
        ("merge_heads", (q,), {}, False),
        ("multi_head_attention", (x, *mha_w, 2), {}, True),
        ("multi_head_attention", (x, *mha_w, 4), {"causal": False}, True),
        ("multi_head_attention", (x, *mha_w, 2), {"mask": rng.random((2, 5, 5)) > 0.3}, True),
        ("multi_head_attention", (x, *mha_w, 2), {"return_weights": True}, False),
        ("layer_norm", (x * 3 + 1, 1 + rng.normal(size=8), rng.normal(size=8)), {}, True),
        ("layer_norm", (x, 1 + rng.normal(size=8), None), {"eps": 1e-3}, True),
        ("gelu", (x * 3,), {}, True),
        ("mlp", (x, block["w_fc"], block["b_fc"], block["w_proj"], block["b_proj"]), {}, True),
        ("decoder_block", (x, block, 2), {}, True),
        ("decoder_block", (x, block, 2), {"mask": rng.random((5, 5)) > 0.3}, True),
        ("cross_entropy", (logits, ids), {}, True),
        ("cross_entropy", (logits, np.where(ids > 7, -1, ids)), {"ignore_index": -1}, True),
        *modern_cases(rng, x, block),
    ]


def modern_cases(rng, x, block):
    """Chapter 14's pieces: RMSNorm, RoPE (both layouts), SiLU, SwiGLU, GQA, QK-norm."""
    cos, sin = qnp.rope_table(5, 4, 100.0, start=2)
    gqa_w = (rng.normal(size=(8, 16)) / 3, None, rng.normal(size=(8, 8)) / 3, None)
    gammas = (1 + rng.normal(size=4) / 10, 1 + rng.normal(size=4) / 10)
    modern = dict(block, ln1_beta=None, ln2_beta=None, w_qkv=gqa_w[0], b_qkv=None, b_fc=None,
                  w_fc=rng.normal(size=(8, 12)) / 3, w_proj=rng.normal(size=(6, 8)) / 3,
                  q_norm_gamma=gammas[0], k_norm_gamma=gammas[1])
    arch = qnp.Arch(norm="rms", position="rope", mlp="swiglu", n_kv_head=1, qk_norm=True)
    return [
        ("rms_norm", (x * 3 + 1, 1 + rng.normal(size=8)), {}, True),
        ("rope", (x[..., :4], cos, sin), {}, False),
        ("rope", (x[..., :4], cos, sin), {"layout": "interleaved"}, False),
        ("silu", (x * 3,), {}, True),
        ("swiglu", (x, modern["w_fc"], rng.normal(size=12), modern["w_proj"], None), {}, True),
        ("repeat_kv", (x[:, None], 3), {}, False),
        ("multi_head_attention", (x, *gqa_w, 2), {"n_kv_head": 1, "rope": (cos, sin),
                                                 "qk_norm": gammas}, True),
        ("decoder_block", (x, modern, 2), {"arch": arch, "rope": (cos, sin)}, True),
    ]


# One run per case on the naive path, and one more on the fused path where there is one.
CASES = [pytest.param(name, args, kwargs, fused, id=f"{name}-{i}-{path}")
         for i, (name, args, kwargs, has_fused) in enumerate(cases())
         for fused, path in [(False, "naive"), (True, "fused")] if has_fused or not fused]


def as_np(a, np_dtype):
    """Float arrays (also inside dicts/tuples) cast to np_dtype; ints, bools and scalars as is."""
    if isinstance(a, dict):
        return {key: as_np(val, np_dtype) for key, val in a.items()}
    if isinstance(a, tuple):
        return tuple(as_np(val, np_dtype) for val in a)
    if isinstance(a, np.ndarray) and a.dtype.kind == "f":
        return a.astype(np_dtype)
    return a


def as_pt(a):
    if isinstance(a, dict):
        return {key: as_pt(val) for key, val in a.items()}
    if isinstance(a, tuple):
        return tuple(as_pt(val) for val in a)
    return torch.from_numpy(a) if isinstance(a, np.ndarray) else a


def compare(np_out, pt_out, tol, dtype=None):
    if isinstance(np_out, tuple):  # (out, weights)
        assert isinstance(pt_out, tuple) and len(pt_out) == len(np_out)
        for a, b in zip(np_out, pt_out, strict=True):
            compare(a, b, tol, dtype)
        return
    pt_out = pt_out.cpu().numpy()
    assert np.asarray(np_out).dtype == pt_out.dtype == dtype
    np.testing.assert_allclose(np_out, pt_out, **tol)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name, args, kwargs, fused", CASES)
def test_function(name, args, kwargs, fused, dtype):
    np_dtype, _ = DTYPES[dtype]
    np_args, np_kwargs = as_np(args, np_dtype), as_np(kwargs, np_dtype)
    np_out = getattr(qnp, name)(*np_args, **np_kwargs)
    pt_kwargs = as_pt(np_kwargs) | ({"fused": True} if fused else {})
    pt_out = getattr(qpt, name)(*(as_pt(a) for a in np_args), **pt_kwargs)
    compare(np_out, pt_out, OP_TOL[dtype], np_dtype)


def test_every_function_is_compared():
    """Every function both backends export appears in the table above (GPT is tested below)."""
    compared = {c[0] for c in cases()}
    shared = set(qnp.__all__) & set(qpt.__all__)
    # The mask and the table take sizes, not arrays (tested by hand in test_hand_worked.py);
    # generation, its filters and the KV cache (one class for both) are compared across
    # backends in test_generate.py; qkv.pt's flash_attention (Triton) needs its interpreter's
    # own process, so it is compared with qkv.np's in tests/_flash_interpreter_cases.py.
    assert shared - compared == {"causal_mask", "sinusoidal_positional_encoding", "generate",
                                 "filter_top_k", "filter_top_p", "KVCache", "flash_attention",
                                 "rope_table", "Arch"}  # rope_table: tests/test_modern.py


# qkv.pt may add these: `fused`, and where a function builds a tensor from sizes alone (no input
# to take them from), keyword-only `device` and `dtype`.
PT_ONLY = {"fused", "device", "dtype"}


def _parameters(fn, skip=()):
    return [(p.name, p.kind, p.default) for p in inspect.signature(fn).parameters.values()
            if p.name not in skip]


# flash_attention's qkv.pt side loads only in a process that imported triton for its
# interpreter: tests/_flash_interpreter_cases.py compares its parameters there.
@pytest.mark.parametrize("name", sorted(set(qnp.__all__) & set(qpt.__all__) - {"flash_attention"}))
def test_shared_names_take_the_same_parameters(name):
    """Same parameter names, order, kinds and defaults in both backends (except PT_ONLY)."""
    ours, theirs = getattr(qnp, name), getattr(qpt, name)
    extra = [p for p in inspect.signature(theirs).parameters.values()
             if p.name in PT_ONLY - {"fused"}]
    assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in extra), name
    assert _parameters(ours) == _parameters(theirs, skip=PT_ONLY), (
        f"{name}: qkv.np{inspect.signature(ours)} vs qkv.pt{inspect.signature(theirs)}")


@pytest.mark.parametrize("seq_q, seq_k", [(1, 1), (3, 3), (2, 5), (5, 2), (0, 3)])
def test_causal_mask(seq_q, seq_k):
    np.testing.assert_array_equal(qnp.causal_mask(seq_q, seq_k),
                                  qpt.causal_mask(seq_q, seq_k).numpy())


@pytest.mark.parametrize("seq_len, d_model, base", [(7, 16, 10000.0), (50, 8, 100.0)])
def test_sinusoidal_positional_encoding(seq_len, d_model, base):
    expected = qnp.sinusoidal_positional_encoding(seq_len, d_model, base)
    got64 = qpt.sinusoidal_positional_encoding(seq_len, d_model, base, dtype=torch.float64)
    np.testing.assert_allclose(got64.numpy(), expected, **TOL["float64"])
    got32 = qpt.sinusoidal_positional_encoding(seq_len, d_model, base)
    assert got32.dtype == torch.float32
    np.testing.assert_allclose(got32.numpy(), expected, **TOL["float32_op"])


def random_gpt(fused, seed=0, bias=True):
    """The small test model, every parameter nudged off its init (LN scales 1, biases 0)."""
    cfg = qpt.GPTConfig(vocab_size=65, context_length=16, n_layer=2, n_head=4, d_model=32,
                        bias=bias, fused=fused)
    g = torch.Generator().manual_seed(seed)
    model = qpt.GPT(cfg, generator=g)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("fused", [False, True], ids=["naive", "fused"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_gpt_forward_vs_GPT(dtype, fused, bias):
    model = random_gpt(fused, bias=bias).to(DTYPES[dtype][1])
    ids = torch.randint(0, 65, (3, 16), generator=torch.Generator().manual_seed(1))
    params = model.numpy_params()  # float64
    if dtype == "float32":
        params = {**as_np({k: v for k, v in params.items() if k != "blocks"}, np.float32),
                  "blocks": [as_np(b, np.float32) for b in params["blocks"]]}
    np_logits = qnp.gpt_forward(ids.numpy(), params, n_head=4)
    with torch.no_grad():
        pt_logits = model(ids)
    assert np_logits.shape == (3, 16, 65)
    compare(np_logits, pt_logits, MODEL_TOL[dtype], DTYPES[dtype][0])


def test_gpt_loss_vs_np_cross_entropy():
    model = random_gpt(fused=True).double()
    g = torch.Generator().manual_seed(2)
    ids, targets = torch.randint(0, 65, (2, 10), generator=g), torch.randint(0, 65, (2, 10),
                                                                             generator=g)
    targets[0, :3] = -1  # ignored
    with torch.no_grad():
        logits, loss = model(ids, targets)
    expected = qnp.cross_entropy(logits.numpy(), targets.numpy(), ignore_index=-1)
    np.testing.assert_allclose(loss.item(), expected, **TOL["float64"])
