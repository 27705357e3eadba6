"""qkv.np's backward passes: every *_backward against centred finite differences (float64,
relative error <= TOL["float64_gradcheck"]["rel_err"]) and against torch.autograd on the same
inputs (TOL["float64"]); the fused softmax + cross-entropy gradient by hand; then the whole
model: gpt_loss_backward numerically, against autograd of qkv.pt.GPT, and one NumPy SGD step.

Each check uses a random upstream gradient dout and differentiates sum(out * dout), so every
entry of the output counts with its own weight (a plain sum would hide some mistakes, e.g. a
softmax gradient, which is 0 for dout = ones).
"""

from dataclasses import dataclass, field

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import qkv.np as qnp
import qkv.pt as qpt
from qkv.np.gradcheck import numerical_gradient, relative_error
from qkv.tolerances import TOL

REL_ERR = TOL["float64_gradcheck"]["rel_err"]


@dataclass
class Pair:
    """One forward/backward pair, its inputs and the same function in torch.

    args: the forward's positional arguments by name (a dict argument holds named arrays, as
    decoder_block's params do). The gradient of argument "w" is grads["dw"]; of params["w_fc"],
    grads["params"]["w_fc"]. torch_fn takes the same arguments as tensors.
    """

    name: str
    plain: str  # the qkv.np function the forward pair must agree with
    args: dict
    torch_fn: object
    kwargs: dict = field(default_factory=dict)

    @property
    def forward(self):
        return getattr(qnp, f"{self.name}_forward")

    @property
    def backward(self):
        return getattr(qnp, f"{self.name}_backward")

    def run(self, args=None):
        return self.forward(*(args or self.args).values(), **self.kwargs)

    def inputs(self):
        """(label, array, where its gradient is) for every float input."""
        for name, a in self.args.items():
            if isinstance(a, dict):
                for key, p in a.items():
                    yield f"{name}.{key}", p, (name, key)
            elif isinstance(a, np.ndarray) and a.dtype.kind == "f":
                yield name, a, (f"d{name}",)

    def __repr__(self):
        return self.name


def grad_at(grads, path):
    for key in path:
        grads = grads[key]
    return grads


def pairs():
    rng = np.random.default_rng(0)

    def r(*shape, scale=1.0):
        return scale * rng.normal(size=shape)

    x = r(2, 3, 4)
    softmax_x = r(2, 3, 5, scale=3.0)
    softmax_x[0, 1, [0, 3]] = -np.inf  # blocked entries: weight 0, gradient 0
    logits = r(2, 3, 7, scale=2.0)
    targets = rng.integers(0, 7, size=(2, 3))
    ignored = targets.copy()
    ignored[0, :2] = -1
    mask = rng.random((2, 5)) > 0.4
    mask[:, -1] = True  # every query keeps at least one key
    d, d_ff = 8, 16
    block = dict(ln1_gamma=1 + r(d, scale=0.2), ln1_beta=r(d, scale=0.2),
                 w_qkv=r(d, 3 * d, scale=0.5), b_qkv=r(3 * d, scale=0.2),
                 w_out=r(d, d, scale=0.4), b_out=r(d, scale=0.2),
                 ln2_gamma=1 + r(d, scale=0.2), ln2_beta=r(d, scale=0.2),
                 w_fc=r(d, d_ff, scale=0.5), b_fc=r(d_ff, scale=0.2),
                 w_proj=r(d_ff, d, scale=0.3), b_proj=r(d, scale=0.2))
    mha = {k: block[k] for k in ("w_qkv", "b_qkv", "w_out", "b_out")}
    x8 = r(2, 5, d)

    def torch_ce(logits, targets, ignore_index=None):
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                               ignore_index=-100 if ignore_index is None else ignore_index)

    return [
        # Single ops against torch's own kernels.
        Pair("linear", "linear", dict(x=x, w=r(4, 5), b=r(5)),
             lambda x, w, b: F.linear(x, w.T, b)),
        Pair("linear", "linear", dict(x=r(3, 4), w=r(4, 2)), lambda x, w: x @ w),
        Pair("softmax", "softmax", dict(x=softmax_x), lambda x: torch.softmax(x, dim=-1)),
        Pair("cross_entropy", "cross_entropy", dict(logits=logits, targets=targets), torch_ce),
        Pair("cross_entropy", "cross_entropy", dict(logits=logits, targets=ignored), torch_ce,
             dict(ignore_index=-1)),
        Pair("layer_norm", "layer_norm",
             dict(x=r(2, 3, 6, scale=2.0) + 1, gamma=1 + r(6, scale=0.3), beta=r(6)),
             lambda x, g, b: F.layer_norm(x, g.shape, g, b, eps=1e-5)),
        Pair("layer_norm", "layer_norm", dict(x=r(4, 6), gamma=1 + r(6, scale=0.3), beta=None),
             lambda x, g, b, eps: F.layer_norm(x, g.shape, g, None, eps=eps), dict(eps=1e-3)),
        Pair("gelu", "gelu", dict(x=r(3, 5, scale=3.0)),
             lambda x: F.gelu(x, approximate="tanh")),
        Pair("embed", "embed", dict(token_ids=np.array([[1, 3, 1], [0, 1, 4]]), table=r(6, 3)),
             F.embedding),
        # Attention and the composites against autograd through qkv.pt (naive path).
        Pair("attention", "scaled_dot_product_attention", dict(q=r(2, 4, 3), k=r(2, 4, 3),
                                                              v=r(2, 4, 5)),
             qpt.scaled_dot_product_attention, dict(causal=True)),
        Pair("attention", "scaled_dot_product_attention", dict(q=r(2, 3, 4), k=r(2, 3, 4),
                                                              v=r(2, 3, 2)),
             qpt.scaled_dot_product_attention, dict(causal=False)),
        # KV-cache shape (2 queries, 5 keys, bottom-right causal) with a mask on top.
        Pair("attention", "scaled_dot_product_attention", dict(q=r(3, 2, 4), k=r(3, 5, 4),
                                                              v=r(3, 5, 3)),
             qpt.scaled_dot_product_attention, dict(causal=True, mask=mask)),
        # k and v shared across a batch by broadcasting: their gradients must add up.
        Pair("attention", "scaled_dot_product_attention", dict(q=r(2, 2, 4, 3), k=r(1, 4, 3),
                                                              v=r(4, 2)),
             qpt.scaled_dot_product_attention, dict(causal=True)),
        # Longer than qkv.np's QUERY_BLOCK: the forward runs block by block, 190 queries on
        # 200 keys (the weights cache must still hold every row).
        Pair("attention", "scaled_dot_product_attention", dict(q=r(190, 2), k=r(200, 2),
                                                              v=r(200, 2)),
             qpt.scaled_dot_product_attention, dict(causal=True)),
        Pair("multi_head_attention", "multi_head_attention", dict(x=x8, **mha, n_head=2),
             qpt.multi_head_attention),
        Pair("multi_head_attention", "multi_head_attention", dict(x=x8, **mha, n_head=4),
             qpt.multi_head_attention,
             dict(causal=False, mask=np.tril(rng.random((2, 5, 5)) > 0.3) | np.eye(5, dtype=bool))),
        Pair("mlp", "mlp", dict(x=x8, **{k: block[k] for k in ("w_fc", "b_fc", "w_proj",
                                                                 "b_proj")}), qpt.mlp),
        Pair("decoder_block", "decoder_block", dict(x=x8, params=block, n_head=2),
             qpt.decoder_block),
        Pair("decoder_block", "decoder_block", dict(x=x8, params=block, n_head=2),
             qpt.decoder_block, dict(mask=rng.random((5, 5)) > 0.5)),
    ]


PAIRS = [pytest.param(p, id=f"{p.name}-{i}") for i, p in enumerate(pairs())]


def upstream(out, seed=1):
    """A random dout shaped like out (a plain float for a scalar loss)."""
    dout = np.random.default_rng(seed).normal(size=np.shape(out))
    return float(dout) if np.ndim(out) == 0 else dout


@pytest.mark.parametrize("pair", PAIRS)
def test_backward_vs_finite_differences(pair):
    out, cache = pair.run()
    dout = upstream(out)
    grads = pair.backward(dout, cache)
    checked = 0
    for label, a, path in pair.inputs():
        # f reads a through pair.args: numerical_gradient nudges a in place.
        numeric = numerical_gradient(lambda _: np.sum(pair.run()[0] * dout), a)
        analytic = grad_at(grads, path)
        assert analytic.shape == a.shape, label
        err = relative_error(analytic, numeric)
        assert err <= REL_ERR, f"{pair.name}: d{label} relative error {err:.2e}"
        checked += 1
    assert checked >= 1


def as_torch(a, requires_grad):
    if isinstance(a, dict):
        return {k: as_torch(v, requires_grad) for k, v in a.items()}
    if isinstance(a, np.ndarray):
        t = torch.from_numpy(a)
        return t.requires_grad_() if requires_grad and a.dtype.kind == "f" else t
    return a


@pytest.mark.parametrize("pair", PAIRS)
def test_backward_vs_torch_autograd(pair):
    out, cache = pair.run()
    dout = upstream(out)
    grads = pair.backward(dout, cache)
    targs = {k: as_torch(v, requires_grad=True) for k, v in pair.args.items()}
    tout = pair.torch_fn(*targs.values(), **as_torch(pair.kwargs, requires_grad=False))
    np.testing.assert_allclose(out, tout.detach().numpy(), **TOL["float64"])
    (tout * torch.as_tensor(dout, dtype=torch.float64)).sum().backward()
    for label, _, path in pair.inputs():
        t = targs[path[0][1:]] if len(path) == 1 else targs[path[0]][path[1]]
        expected = torch.zeros_like(t) if t.grad is None else t.grad  # unused input: grad None
        np.testing.assert_allclose(grad_at(grads, path), expected.numpy(), **TOL["float64"],
                                   err_msg=f"{pair.name}: d{label}")


@pytest.mark.parametrize("pair", PAIRS)
def test_forward_matches_plain_function(pair):
    """*_forward's output is the plain function's (the math is written once)."""
    plain = getattr(qnp, pair.plain)(*pair.args.values(), **pair.kwargs)
    np.testing.assert_array_equal(pair.run()[0], plain)


@pytest.mark.parametrize("pair", PAIRS)
def test_float32_in_float32_out(pair):
    """A float32 forward gets float32 gradients (no silent promotion to float64)."""
    def f32(a):
        if isinstance(a, dict):
            return {k: f32(v) for k, v in a.items()}
        return a.astype(np.float32) if isinstance(a, np.ndarray) and a.dtype.kind == "f" else a

    args = {k: f32(v) for k, v in pair.args.items()}
    out, cache = pair.run(args)
    dout = upstream(out)
    grads = pair.backward(dout if np.ndim(out) == 0 else dout.astype(np.float32), cache)
    for label, _, path in pair.inputs():
        assert grad_at(grads, path).dtype == np.float32, label


def test_missing_bias_gets_no_gradient():
    x, w = np.ones((2, 3)), np.ones((3, 4))
    _, cache = qnp.linear_forward(x, w)
    assert qnp.linear_backward(np.ones((2, 4)), cache)["db"] is None
    _, cache = qnp.layer_norm_forward(x, np.ones(3), None)
    assert qnp.layer_norm_backward(np.ones((2, 3)), cache)["dbeta"] is None


# --- the gradient-check helpers --------------------------------------------------------------

def test_numerical_gradient_of_a_known_function():
    x = np.array([[1.0, -2.0], [0.5, 3.0]])
    # d/dx sum(x^3) = 3 x^2; the centred difference is exact up to eps^2 and rounding.
    got = numerical_gradient(lambda x: np.sum(x**3), x)
    np.testing.assert_allclose(got, 3 * x**2, rtol=1e-8)
    np.testing.assert_array_equal(x, [[1.0, -2.0], [0.5, 3.0]])  # restored
    picked = numerical_gradient(lambda x: np.sum(x**3), x, indices=[(1, 1), (0, 1)])
    np.testing.assert_allclose(picked, [27.0, 12.0], rtol=1e-8)
    with pytest.raises(TypeError, match="float64"):
        numerical_gradient(lambda x: np.sum(x), x.astype(np.float32))


def test_relative_error():
    assert relative_error(np.zeros(3), np.zeros(3)) == 0.0
    assert relative_error([1.0, 2.0], [1.0, 2.0]) == 0.0
    # max |a - b| = 0.5 over max(|a| + |b|) = 4 + 4.5
    assert relative_error([1.0, 4.0], [1.0, 4.5]) == pytest.approx(0.5 / 8.5)


# --- by hand ---------------------------------------------------------------------------------

def test_cross_entropy_gradient_by_hand():
    # logits [0, ln 2, ln 3]: p = [1, 2, 3] / 6. Target 2: loss = -ln(3/6) = ln 2 and
    # dloss/dlogits = p - onehot(2) = [1/6, 2/6, 3/6 - 1] (N = 1 row).
    logits = np.array([[0.0, np.log(2), np.log(3)]])
    loss, cache = qnp.cross_entropy_forward(logits, np.array([2]))
    np.testing.assert_allclose(loss, np.log(2), **TOL["float64"])
    dlogits = qnp.cross_entropy_backward(1.0, cache)["dlogits"]
    np.testing.assert_allclose(dlogits, [[1 / 6, 1 / 3, -1 / 2]], **TOL["float64"])


def test_cross_entropy_gradient_divides_by_counted_rows():
    # Two rows, targets 2 and 0: each row's p - onehot, divided by N = 2 (the mean).
    logits = np.array([[0.0, np.log(2), np.log(3)]] * 2)
    _, cache = qnp.cross_entropy_forward(logits, np.array([2, 0]))
    np.testing.assert_allclose(qnp.cross_entropy_backward(1.0, cache)["dlogits"],
                               [[1 / 12, 1 / 6, -1 / 4], [-5 / 12, 1 / 6, 1 / 4]],
                               **TOL["float64"])
    # The second row ignored: N = 1, and the ignored row gets no gradient at all.
    _, cache = qnp.cross_entropy_forward(logits, np.array([2, -1]), ignore_index=-1)
    np.testing.assert_allclose(qnp.cross_entropy_backward(2.0, cache)["dlogits"],
                               [[2 / 6, 2 / 3, -1], [0, 0, 0]], **TOL["float64"])


# --- the whole model -------------------------------------------------------------------------

N_HEAD = 2


def tiny_gpt(seed=0):
    """vocab 11, context 6, 2 layers, 2 heads, d_model 8, float64, every weight well off its
    init (biases and layer-norm parameters included), naive attention."""
    cfg = qpt.GPTConfig(vocab_size=11, context_length=6, n_layer=2, n_head=N_HEAD, d_model=8,
                        fused=False)
    g = torch.Generator().manual_seed(seed)
    model = qpt.GPT(cfg, generator=g).double()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return model


def tiny_batch():
    rng = np.random.default_rng(3)
    ids = rng.integers(0, 11, size=(2, 6))
    targets = np.concatenate([ids[:, 1:], rng.integers(0, 11, size=(2, 1))], axis=1)
    targets[1, :2] = -1  # ignored, as GPT.forward ignores -1
    return ids, targets


def leaves(tree, name=""):
    """(name, array) for every array in a params-shaped dict, e.g. ("blocks[1].w_fc", ...)."""
    if isinstance(tree, dict):
        for key, value in tree.items():
            yield from leaves(value, f"{name}.{key}" if name else key)
    elif isinstance(tree, list):
        for i, value in enumerate(tree):
            yield from leaves(value, f"{name}[{i}]")
    else:
        yield name, tree


def torch_grads(model):
    """The .grad of every GPT parameter in the layout of GPT.numpy_params()."""
    T = model.transformer
    return dict(wte=T.wte.weight.grad.numpy(), wpe=T.wpe.weight.grad.numpy(),
                blocks=[{k: v.grad.numpy() for k, v in b.params().items()} for b in T.h],
                lnf_gamma=T.ln_f.weight.grad.numpy(), lnf_beta=T.ln_f.bias.grad.numpy())


def test_gpt_loss_backward_vs_finite_differences():
    params = tiny_gpt().numpy_params()
    ids, targets = tiny_batch()
    _, cache = qnp.gpt_loss_forward(ids, targets, params, N_HEAD)
    grads = dict(leaves(qnp.gpt_loss_backward(cache)))
    assert {k: v.shape for k, v in leaves(params)} == {k: v.shape for k, v in grads.items()}
    rng = np.random.default_rng(4)
    for name, p in leaves(params):
        # 20 entries per parameter (all of the smaller ones): two forward passes per entry.
        picks = rng.choice(p.size, size=min(20, p.size), replace=False)
        idx = [np.unravel_index(i, p.shape) for i in picks]
        numeric = numerical_gradient(
            lambda _: qnp.gpt_loss_forward(ids, targets, params, N_HEAD)[0], p, indices=idx)
        analytic = np.array([grads[name][i] for i in idx])
        err = relative_error(analytic, numeric)
        assert err <= REL_ERR, f"d{name}: relative error {err:.2e}"


def test_numpy_training_step():
    """gpt_loss_backward's gradients are autograd's for qkv.pt.GPT's loss on the same weights,
    and plain SGD on them lowers the loss of a tiny batch."""
    model = tiny_gpt()
    params = model.numpy_params()
    ids, targets = tiny_batch()
    loss, cache = qnp.gpt_loss_forward(ids, targets, params, N_HEAD)
    grads = qnp.gpt_loss_backward(cache)

    _, pt_loss = model(torch.from_numpy(ids), torch.from_numpy(targets))
    pt_loss.backward()
    np.testing.assert_allclose(loss, pt_loss.item(), **TOL["float64"])
    expected = dict(leaves(torch_grads(model)))
    for name, g in leaves(grads):
        # wte's gradient holds the embedding's and the tied unembedding's share, as in torch.
        np.testing.assert_allclose(g, expected[name], **TOL["float64"], err_msg=name)

    losses = [loss]
    for _ in range(5):
        grads = dict(leaves(grads))
        for name, p in leaves(params):
            p -= 0.5 * grads[name]  # in place: params holds the same arrays
        loss, cache = qnp.gpt_loss_forward(ids, targets, params, N_HEAD)
        grads = qnp.gpt_loss_backward(cache)
        losses.append(loss)
    assert np.all(np.diff(losses) < 0), losses
    assert losses[-1] < 0.8 * losses[0], losses
