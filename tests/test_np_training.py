"""The NumPy training path (qkv.np.train) against PyTorch: same weights, same batches, same
optimizer groups -> the same losses, step after step (float64)."""

import numpy as np
import pytest
import torch

import qkv.np as qnp
from qkv.data import get_batch
from qkv.pt import GPT, GPTConfig
from qkv.train import TrainConfig, make_optimizer

STEPS = 20


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_model(seed=0):
    cfg = GPTConfig(vocab_size=13, context_length=8, n_layer=2, n_head=2, d_model=16, dropout=0.0)
    return GPT(cfg, generator=torch.Generator().manual_seed(seed)).double()


def batches(n, seed=0, batch=4, context=8):
    # A learnable sequence: mostly +5 (mod 13), with a few random tokens mixed in.
    rng = np.random.default_rng(seed)
    ids = np.where(rng.random(300) < 0.1, rng.integers(0, 13, size=300), np.arange(300) * 5 % 13)
    rng = np.random.default_rng(seed + 1)  # the batch sampler
    return [get_batch(ids, batch, context, rng) for _ in range(n)]


def torch_losses(model, data, lr, weight_decay, grad_clip, betas=(0.9, 0.99)):
    cfg = TrainConfig(lr=lr(0) if callable(lr) else lr, weight_decay=weight_decay,
                      beta1=betas[0], beta2=betas[1])
    opt = make_optimizer(model, cfg)  # qkv.train's own param groups
    losses = []
    for step, (x, y) in enumerate(data):
        for group in opt.param_groups:
            group["lr"] = lr(step) if callable(lr) else lr
        _, loss = model(torch.from_numpy(x), torch.from_numpy(y))
        opt.zero_grad()
        loss.backward()
        if grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        opt.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("grad_clip", [0.0, 0.5], ids=["no-clip", "clip"])
def test_first_20_losses_match_pytorch(grad_clip):
    model = tiny_model()
    params = model.numpy_params()
    data = batches(STEPS)
    schedule = lambda step: 1e-2 * (step + 1) / 5 if step < 5 else 1e-2  # noqa: E731 - warm-up
    trained, np_losses = qnp.train_numpy(params, 2, data, schedule, betas=(0.9, 0.99),
                                         weight_decay=0.1, grad_clip=grad_clip)
    pt_losses = torch_losses(model, data, schedule, 0.1, grad_clip)
    assert len(np_losses) == len(pt_losses) == STEPS
    np.testing.assert_allclose(np_losses, pt_losses, rtol=0, atol=1e-6)
    print(f"max |numpy - torch| over {STEPS} losses: "
          f"{np.max(np.abs(np.subtract(np_losses, pt_losses))):.2e}")
    assert np_losses[-1] < np_losses[0] - 0.1  # and it learned something
    # The weights themselves end up the same too.
    final = model.numpy_params()
    np.testing.assert_allclose(trained["wte"], final["wte"], atol=1e-6)
    np.testing.assert_allclose(trained["blocks"][1]["w_fc"], final["blocks"][1]["w_fc"],
                               atol=1e-6)


def test_adamw_step_equals_torch_on_a_nested_tree():
    rng = np.random.default_rng(3)
    params = {"w": rng.normal(size=(4, 3)), "b": rng.normal(size=3),
              "blocks": [{"g": rng.normal(size=5), "m": rng.normal(size=(2, 5))}], "none": None}
    tensors = {"w": params["w"], "b": params["b"], "g": params["blocks"][0]["g"],
               "m": params["blocks"][0]["m"]}
    tensors = {k: torch.tensor(v, requires_grad=True) for k, v in tensors.items()}
    opt = torch.optim.AdamW(
        [{"params": [tensors["w"], tensors["m"]], "weight_decay": 0.3},
         {"params": [tensors["b"], tensors["g"]], "weight_decay": 0.0}],
        lr=0.05, betas=(0.8, 0.95), eps=1e-6)
    state = None
    for _ in range(3):
        grads = {"w": rng.normal(size=(4, 3)), "b": rng.normal(size=3),
                 "blocks": [{"g": rng.normal(size=5), "m": rng.normal(size=(2, 5))}],
                 "none": None}
        before = {k: v.copy() for k, v in params.items() if isinstance(v, np.ndarray)}
        params, state = qnp.adamw_step(params, grads, state, 0.05, (0.8, 0.95), 1e-6, 0.3)
        for k, v in before.items():
            assert params[k] is not v  # new arrays, the old ones untouched
        for name, g in (("w", grads["w"]), ("b", grads["b"]), ("g", grads["blocks"][0]["g"]),
                        ("m", grads["blocks"][0]["m"])):
            tensors[name].grad = torch.tensor(g)
        opt.step()
    assert state["step"] == 3 and params["none"] is None
    for name, got in (("w", params["w"]), ("b", params["b"]), ("g", params["blocks"][0]["g"]),
                      ("m", params["blocks"][0]["m"])):
        np.testing.assert_allclose(got, tensors[name].detach().numpy(), rtol=1e-12, atol=1e-14)


def test_clip_grad_norm_equals_torch():
    rng = np.random.default_rng(4)
    grads = {"a": rng.normal(size=(3, 4)), "b": [rng.normal(size=5)]}
    clipped, norm = qnp.clip_grad_norm(grads, 1.0)
    ts = [torch.zeros(3, 4, dtype=torch.float64, requires_grad=True),
          torch.zeros(5, dtype=torch.float64, requires_grad=True)]
    ts[0].grad, ts[1].grad = torch.tensor(grads["a"]), torch.tensor(grads["b"][0])
    total = torch.nn.utils.clip_grad_norm_(ts, 1.0)
    assert norm == pytest.approx(total.item())
    np.testing.assert_allclose(clipped["a"], ts[0].grad.numpy())
    small, _ = qnp.clip_grad_norm(grads, 1e6)  # under the limit: unchanged
    np.testing.assert_array_equal(small["a"], grads["a"])
