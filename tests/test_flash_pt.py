"""qkv.pt.flash_attention, the Triton kernels, against PyTorch.

Without a GPU: tests/_flash_interpreter_cases.py runs in its own pytest process with
TRITON_INTERPRET=1 set before anything imports triton (this process may already have imported
triton for compiling, through transformers or torch._dynamo, and Triton decides at import time);
and one small process checks that qkv.pt.flash, imported first, switches the interpreter on for
its own kernels only. With a GPU: the same comparisons on CUDA at real sizes, in this process.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from qkv.tolerances import TOL

pytest.importorskip("triton")

HERE = Path(__file__).resolve().parent
CUDA = torch.cuda.is_available()
no_gpu_only = pytest.mark.skipif(CUDA, reason="with a GPU the kernels run compiled: see the "
                                              "cuda tests")


def _run(args, env_extra):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(env_extra)
    return subprocess.run([sys.executable, *args], cwd=HERE.parent, env=env, capture_output=True,
                          text=True, timeout=600)


@pytest.mark.slow
@no_gpu_only
def test_triton_kernels_in_the_interpreter():
    proc = _run(["-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", "addopts=",
                 str(HERE / "_flash_interpreter_cases.py")],
                {"TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-2000:]
    assert " passed" in proc.stdout and "failed" not in proc.stdout


@no_gpu_only
def test_interpreter_is_switched_on_for_the_kernels_only():
    # No TRITON_INTERPRET in the environment: qkv.pt.flash sets it around its own import of
    # triton, its kernel definitions and launches, and removes it again.
    script = """
import os, torch, torch.nn.functional as F
import qkv.pt as qpt
g = torch.Generator().manual_seed(0)
q, k, v = (torch.randn(2, 20, 16, generator=g) for _ in range(3))
out = qpt.flash_attention(q, k, v, causal=True, block_q=16, block_k=16)
torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, is_causal=True), **TOL)
assert "TRITON_INTERPRET" not in os.environ, os.environ["TRITON_INTERPRET"]
print("ok")
"""
    proc = _run(["-c", f"TOL = {TOL['float32_op']!r}\n" + script], {"OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-3000:]
    assert proc.stderr == "", proc.stderr[-3000:]  # no warning either


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("d_head", [64, 128])
@pytest.mark.parametrize("seq", [1000, 2048])
def test_flash_cuda_matches_torch(dtype, causal, d_head, seq):
    from _flash_interpreter_cases import _compare, _grads, _qkv, _reference

    import qkv.pt as qpt

    q, k, v, dout = _qkv((2, 4, seq, d_head), seq, dtype, device="cuda", seed=3)
    got = _grads(lambda q, k, v: qpt.flash_attention(q, k, v, causal=causal), q, k, v, dout)
    tol = TOL["float32_model"] if dtype == torch.float32 else TOL["bfloat16"]
    _compare(got, _reference(q, k, v, dout, causal), tol)


@pytest.mark.cuda
def test_gpt_flash_on_cuda_matches_fused():
    import qkv.pt as qpt

    torch.manual_seed(0)
    config = qpt.GPTConfig(vocab_size=100, context_length=256, n_layer=2, n_head=4, d_model=256)
    model = qpt.GPT(config).cuda()
    flash = qpt.GPT(qpt.GPTConfig(**{**config.__dict__, "attention": "flash"})).cuda()
    flash.load_state_dict(model.state_dict())
    ids = torch.randint(0, 100, (2, 256), device="cuda")
    torch.testing.assert_close(flash(ids), model(ids), **TOL["float32_model"])
