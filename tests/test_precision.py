"""--dtype bfloat16: autocast runs the matmuls in bfloat16 while the loss stays float32, and a
short run tracks the float32 run.

Tolerance: TOL["bfloat16"] (rtol 1.6e-2, i.e. about two bfloat16 ulps at eps = 2^-7, atol
1e-2) on every one of 50 per-step losses. A loss is a mean over 8 x 32 tokens, so its own
rounding is far below one ulp; what grows is the weights' drift, because every update is
computed from bfloat16 activations. AdamW's normalised steps keep that drift small while the
learning rate is modest; measured on this config: largest |difference| 4.3e-3 (relative
4.4e-3). A bigger, faster-learning config drifts further: there the right comparison is the
loss curve's trend, not step-by-step (the chapter shows it)."""

import pytest
import torch

from qkv.precision import autocast_for, resolve_dtype
from qkv.pt import GPT, GPTConfig
from qkv.tolerances import TOL
from qkv.train import ConfigError, make_config, train

CORPUS = "the cat sat on the mat. the dog sat on the log.\n" * 40


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_autocast_runs_matmuls_in_bfloat16_and_the_loss_in_float32():
    cpu = torch.device("cpu")
    assert resolve_dtype("auto", cpu) == torch.float32
    assert resolve_dtype("auto", torch.device("cuda")) == torch.bfloat16
    model = GPT(GPTConfig(vocab_size=11, context_length=8, n_layer=1, n_head=2, d_model=16),
                generator=torch.Generator().manual_seed(0))
    x = torch.randint(11, (2, 8), generator=torch.Generator().manual_seed(1))
    with autocast_for(cpu, torch.bfloat16)():
        logits = model(x)
    assert logits.dtype == torch.bfloat16
    assert model.transformer.wte.weight.dtype == torch.float32  # weights stay float32
    exact = model(x)
    torch.testing.assert_close(logits.float(), exact, **TOL["bfloat16"])
    assert not torch.equal(logits.float(), exact)  # it really ran in bfloat16
    with pytest.raises(ValueError, match="dtype must be auto, float32 or bfloat16"):
        resolve_dtype("float8", cpu)


def test_fifty_bfloat16_steps_track_float32(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(CORPUS)
    losses = {}
    for dtype in ["float32", "bfloat16"]:
        cfg = make_config("cpu-small", data=str(corpus), out_dir=str(tmp_path / dtype),
                          n_layer=2, n_head=2, d_model=16, context_length=32, batch_size=8,
                          max_steps=50, lr=1e-2, min_lr=1e-3, warmup_steps=5,
                          eval_interval=50, eval_iters=2, sample_tokens=0, device="cpu",
                          dtype=dtype)
        h = train(cfg, progress=False, plot=False, log=lambda *a: None)
        losses[dtype] = torch.tensor(h["train_loss"])
    assert losses["float32"][-1] < losses["float32"][0] - 1.0  # it learned something
    torch.testing.assert_close(losses["bfloat16"], losses["float32"], **TOL["bfloat16"])
    assert not torch.equal(losses["bfloat16"], losses["float32"])
    with pytest.raises(ConfigError, match="dtype must be"):
        train(make_config(data=str(corpus), dtype="half", device="cpu"), progress=False)
