"""qkv.pt.flash_attention, the Triton kernels, against PyTorch on the CPU through Triton's
interpreter.

Not collected by the main test run (no test_ prefix): tests/test_flash_pt.py runs this file in
its own pytest process with TRITON_INTERPRET=1 set from the start, because triton must be
imported with that variable and other tests (transformers, torch._dynamo) import triton without
it. Tiny shapes: the interpreter runs each kernel program in NumPy.

References: F.scaled_dot_product_attention and qkv.pt's naive path (for the bottom-right causal
alignment when seq_q != seq_k), values and gradients by autograd. float32 is compared at
TOL["float32_op"]; float16 and bfloat16 against the float32 computation on the same (rounded)
inputs at TOL["bfloat16"].
"""

import pytest
import torch
import torch.nn.functional as F

import qkv.pt as qpt
from qkv.tolerances import TOL


def _qkv(shape_q, seq_k, dtype, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    *lead, seq_q, d_head = shape_q

    def rand(*shape):
        return torch.randn(*shape, generator=g).to(device=device, dtype=dtype)

    return (rand(*lead, seq_q, d_head), rand(*lead, seq_k, d_head), rand(*lead, seq_k, d_head),
            rand(*lead, seq_q, d_head))


def _grads(fn, q, k, v, dout):
    """fn's output and the gradients of sum(out * dout) with respect to q, k and v."""
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out = fn(q, k, v)
    out.backward(dout)
    return [out.detach(), q.grad, k.grad, v.grad]


def _reference(q, k, v, dout, causal):
    """Float32 values and gradients of qkv's attention (bottom-right causal) by autograd."""
    def attend(q, k, v):
        if q.shape[-2] == k.shape[-2]:  # square: torch's own kernel, is_causal is the same rule
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        return qpt.scaled_dot_product_attention(q, k, v, causal=causal)

    return _grads(attend, *(t.float() for t in (q, k, v, dout)))


def _compare(got, want, tol):
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, want, strict=True):
        assert a.dtype == got[0].dtype and a.shape == b.shape, name
        torch.testing.assert_close(a.float(), b, **tol, msg=lambda m, n=name: f"{n}: {m}")


# (lead, seq_q, seq_k, d_head): seq not a multiple of the 16-row tile; more keys than queries
# and fewer (causal: the first queries then see no key at all).
CPU_CASES = [((1, 2), 20, 20, 16), ((2,), 9, 37, 64), ((1, 1), 37, 9, 16), ((1,), 24, 24, 128)]


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("lead,seq_q,seq_k,d_head", CPU_CASES)
def test_flash_float32_matches_torch(lead, seq_q, seq_k, d_head, causal):
    q, k, v, dout = _qkv((*lead, seq_q, d_head), seq_k, torch.float32)
    got = _grads(lambda q, k, v: qpt.flash_attention(q, k, v, causal=causal, block_q=16,
                                                     block_k=16), q, k, v, dout)
    _compare(got, _reference(q, k, v, dout, causal), TOL["float32_op"])
    if seq_q > seq_k and causal:
        assert torch.all(got[0][..., : seq_q - seq_k, :] == 0)  # rows that see no key


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("d_head", [64, 128])
def test_flash_half_precision_matches_float32(dtype, causal, d_head):
    q, k, v, dout = _qkv((1, 2, 24, d_head), 24, dtype, seed=1)
    got = _grads(lambda q, k, v: qpt.flash_attention(q, k, v, causal=causal, block_q=16,
                                                     block_k=16), q, k, v, dout)
    assert all(t.dtype == dtype for t in got)
    _compare(got, _reference(q, k, v, dout, causal), TOL["bfloat16"])


def test_flash_default_tiles():
    q, k, v, dout = _qkv((1, 1, 70, 32), 70, torch.float32, seed=2)  # 2 tiles of 64, ragged
    got = _grads(lambda q, k, v: qpt.flash_attention(q, k, v, causal=True), q, k, v, dout)
    _compare(got, _reference(q, k, v, dout, True), TOL["float32_op"])


def test_gpt_config_attention_flash_matches_the_fused_model():
    torch.manual_seed(0)
    config = qpt.GPTConfig(vocab_size=50, context_length=24, n_layer=2, n_head=2, d_model=32)
    flash_config = qpt.GPTConfig(**{**config.__dict__, "attention": "flash"})
    model, flash = qpt.GPT(config), qpt.GPT(flash_config)
    flash.load_state_dict(model.state_dict())
    ids = torch.randint(0, 50, (2, 21), generator=torch.Generator().manual_seed(1))
    logits, loss = model(ids, ids)
    f_logits, f_loss = flash(ids, ids)
    torch.testing.assert_close(f_logits, logits, **TOL["float32_model"])
    loss.backward()
    f_loss.backward()
    for (name, p), fp in zip(model.named_parameters(), flash.parameters(), strict=True):
        torch.testing.assert_close(fp.grad, p.grad, **TOL["float32_model"], msg=name)


def test_gpt_config_rejects_unknown_attention():
    with pytest.raises(ValueError, match='GPTConfig: attention must be None or "flash"'):
        qpt.GPTConfig(vocab_size=5, context_length=4, n_layer=1, n_head=1, d_model=16,
                      attention="fast")


def test_flash_rejects_bad_input():
    q, k, v, _ = _qkv((1, 2, 8, 16), 8, torch.float32)
    fa = qpt.flash_attention
    with pytest.raises(ValueError, match=r"^flash_attention: q and k must share d_head"):
        fa(q, k[..., :8], v)
    with pytest.raises(ValueError, match=r"^flash_attention: k and v must share d_head"):
        fa(q, k, v[..., :8])
    for bad in (0, -16, 24, 8, True, 16.0):
        with pytest.raises(ValueError, match=r"^flash_attention: block_q must be a power of two"):
            fa(q, k, v, block_q=bad)
        with pytest.raises(ValueError, match=r"^flash_attention: block_k must be a power of two"):
            fa(q, k, v, block_k=bad)
    with pytest.raises(ValueError, match=r"^flash_attention: q must be float32, float16 or "
                                         r"bfloat16 .*got dtype torch.float64"):
        fa(q.double(), k.double(), v.double())
    with pytest.raises(ValueError, match=r"^flash_attention: d_head must be one of"):
        fa(q[..., :12], k[..., :12], v[..., :12])
    with pytest.raises(ValueError, match=r"^flash_attention: q, k and v must have the same "
                                         r"leading"):
        fa(q, k[:, :1], v[:, :1])
    with pytest.raises(ValueError, match=r"^flash_attention: q, k and v must share one dtype"):
        fa(q, k.half(), v)
    with pytest.raises(TypeError, match=r"^flash_attention: q must be a float tensor"):
        fa(q.long(), k, v)
    with pytest.raises(ValueError, match=r'fused="flash" takes no mask'):
        qpt.scaled_dot_product_attention(q, k, v, mask=torch.ones(8, 8, dtype=torch.bool),
                                         fused="flash")


def test_gpu_benchmark_code_runs_in_the_interpreter():
    # The flash-gpu rows need CUDA to mean anything; their measuring code still runs here.
    from benchmarks import flash

    rows = flash.measure_gpu(torch.device("cpu"), torch.bfloat16, d_heads=(16,), seqs=(32,),
                             tokens=64, d_model=32, repeat=1)
    assert [(r["T"], r["pass_"], r["batch"], r["n_head"]) for r in rows] == [
        (32, "fwd", 2, 2), (32, "fwd+bwd", 2, 2)]
    for row in rows:
        assert row["status"] == "ok" and row["triton_tflops"] > 0 and row["sdpa_tflops"] > 0
        assert row["max_abs_diff"] <= TOL["bfloat16"]["atol"] * 4  # same attention, in bf16


@pytest.mark.parametrize("causal", [False, True])
def test_flash_matches_qkv_np_flash(causal):
    # The same tiles on both backends: NumPy's tiled forward and backward against the kernels.
    import numpy as np

    import qkv.np as qnp

    q, k, v, dout = _qkv((2, 3, 21, 16), 27, torch.float32, seed=4)
    got = _grads(lambda q, k, v: qpt.flash_attention(q, k, v, causal=causal, block_q=16,
                                                     block_k=16), q, k, v, dout)
    out, cache = qnp.flash_attention_forward(*(t.numpy() for t in (q, k, v)), causal=causal,
                                             block_q=16, block_k=16)
    grads = qnp.flash_attention_backward(dout.numpy(), cache)
    want = [out, grads["dq"], grads["dk"], grads["dv"]]
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, want, strict=True):
        assert b.dtype == np.float32, name
        np.testing.assert_allclose(a.numpy(), b, **TOL["float32_op"], err_msg=name)


def test_flash_takes_the_same_parameters_as_qkv_np():
    """The shared-signature rule of test_np_vs_pt.py, here because qkv.pt.flash_attention only
    loads in a process that imported triton for its interpreter."""
    import inspect

    import qkv.np as qnp

    def params(fn):
        return [(p.name, p.kind, p.default) for p in inspect.signature(fn).parameters.values()]

    assert params(qpt.flash_attention) == params(qnp.flash_attention)
