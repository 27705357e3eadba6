"""Chapter 9's exercises: forward/backward pairs (linear, softmax, cross-entropy, layer norm,
causal attention). Mistakes are wrong backwards run with the learner's own (correct) forward."""

import re

import numpy as np
import pytest
import torch
from grading_meta import Declared, meta_tests
from test_checkers import Liar, comparisons_patched_to_true

import qkv.grading.exercises.ch09_backprop as ch09
import qkv.np as qnp
from qkv.grading import (
    check_attention_backward,
    check_cross_entropy_backward,
    check_layer_norm_backward,
    check_linear_backward,
    check_softmax_backward,
)
from qkv.grading.pairs import Pair, _numerical, _relative_error


def softmax(x, axis=-1):
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def linear_forward(x, w, b):
    return x @ w + b, (x, w)


def linear_backward(dout, cache):
    x, w = cache
    x_rows = x.reshape(-1, x.shape[-1])
    dout_rows = dout.reshape(-1, dout.shape[-1])
    return {"dx": dout @ w.T, "dw": x_rows.T @ dout_rows, "db": dout_rows.sum(axis=0)}


def softmax_forward(x):
    p = softmax(x)
    return p, p


def softmax_backward(dout, cache):
    p = cache
    return {"dx": p * (dout - (dout * p).sum(axis=-1, keepdims=True))}


def cross_entropy_forward(logits, targets):
    m = logits.max(axis=-1, keepdims=True)
    log_probs = logits - m - np.log(np.exp(logits - m).sum(axis=-1, keepdims=True))
    loss = -np.take_along_axis(log_probs, targets[..., None], axis=-1).mean()
    return loss, (np.exp(log_probs), targets)


def cross_entropy_backward(dloss, cache):
    probs, targets = cache
    onehot = np.eye(probs.shape[-1])[targets]
    return {"dlogits": (probs - onehot) / targets.size * dloss}


def layer_norm_forward(x, gamma, beta, eps=1e-5):
    mean = x.mean(axis=-1, keepdims=True)
    s = np.sqrt(((x - mean) ** 2).mean(axis=-1, keepdims=True) + eps)
    x_hat = (x - mean) / s
    return x_hat * gamma + beta, (x_hat, s, gamma)


def layer_norm_backward(dout, cache):
    x_hat, s, gamma = cache
    g = dout * gamma
    dx = (g - g.mean(axis=-1, keepdims=True)
          - x_hat * (g * x_hat).mean(axis=-1, keepdims=True)) / s
    lead = tuple(range(dout.ndim - 1))
    return {"dx": dx, "dgamma": (dout * x_hat).sum(axis=lead), "dbeta": dout.sum(axis=lead)}


def attention_forward(q, k, v):
    seq, d_head = q.shape[-2:]
    scores = q @ np.swapaxes(k, -1, -2) / np.sqrt(d_head)
    scores = np.where(np.tril(np.ones((seq, seq), dtype=bool)), scores, -np.inf)
    weights = softmax(scores)
    return weights @ v, (q, k, v, weights)


def attention_backward(dout, cache):
    q, k, v, a = cache
    d_head = q.shape[-1]
    dv = np.swapaxes(a, -1, -2) @ dout
    da = dout @ np.swapaxes(v, -1, -2)
    ds = a * (da - (da * a).sum(axis=-1, keepdims=True))
    dq = ds @ k / np.sqrt(d_head)
    dk = np.swapaxes(ds, -1, -2) @ q / np.sqrt(d_head)
    return {"dq": dq, "dk": dk, "dv": dv}




def cross_entropy_backward_put(dloss, cache):  # a one-hot built with put_along_axis
    probs, targets = cache
    onehot = np.zeros_like(probs)
    np.put_along_axis(onehot, targets[..., None], 1.0, axis=-1)
    return {"dlogits": dloss * (probs - onehot) / targets.size, "extra": None}


def linear_backward_einsum(dout, cache):
    x, w = cache
    lead = tuple(range(x.ndim - 1))
    return {"dx": np.einsum("...o,io->...i", dout, w),
            "dw": np.tensordot(x, dout, axes=(lead, lead)), "db": dout.sum(axis=lead)}


def attention_forward_dict(q, k, v):  # a different cache layout of the learner's choice
    out, (q, k, v, a) = attention_forward(q, k, v)
    return out, {"q": q, "k": k, "v": v, "a": a}


def attention_backward_dict(dout, cache):
    return attention_backward(dout, (cache["q"], cache["k"], cache["v"], cache["a"]))


def softmax_backward_jacobian(dout, cache):  # the full Jacobian, one row at a time
    p = cache
    flat_p, flat_d = p.reshape(-1, p.shape[-1]), dout.reshape(-1, p.shape[-1])
    dx = np.stack([(np.diag(r) - np.outer(r, r)) @ g for r, g in zip(flat_p, flat_d, strict=True)])
    return {"dx": dx.reshape(p.shape)}


def layer_norm_backward_long(dout, cache):  # through the mean and the variance, step by step
    x_hat, s, gamma = cache
    n = x_hat.shape[-1]
    dx_hat = dout * gamma
    dvar = np.sum(dx_hat * x_hat * s, axis=-1, keepdims=True) * -0.5 / s**3
    dmean = -np.sum(dx_hat / s, axis=-1, keepdims=True)
    dx = dx_hat / s + dvar * 2 * x_hat * s / n + dmean / n
    lead = tuple(range(dout.ndim - 1))
    return {"dx": dx, "dgamma": (dout * x_hat).sum(axis=lead), "dbeta": dout.sum(axis=lead)}


def softmax_forward_keep_x(x):  # a cache of the learner's choice: the input, not the output
    return softmax(x), x


def softmax_backward_from_x(dout, x):
    p = softmax(x)
    return {"dx": p * (dout - (dout * p).sum(axis=-1, keepdims=True))}

def _lin_b(dout, cache, *, dw_t=False, db="sum", dx_w=False, batch_dw=False):
    x, w = cache
    if batch_dw:
        dw = np.swapaxes(x, -1, -2) @ dout
    else:
        xr, dr = x.reshape(-1, x.shape[-1]), dout.reshape(-1, dout.shape[-1])
        dw = dr.T @ xr if dw_t else xr.T @ dr
    lead = tuple(range(dout.ndim - 1))
    dbs = {"sum": dout.sum(axis=lead), "none": dout, "mean": dout.mean(axis=lead),
           "axis0": dout.sum(axis=0)}[db]
    return {"dx": dout @ (w if dx_w else w.T), "dw": dw, "db": dbs}


def _soft_b(dout, p, *, rule="right"):
    s = (dout * p).sum(axis=-1, keepdims=True)
    return {"dx": {"right": p * (dout - s), "no sub": p * dout, "diag": p * (1 - p) * dout,
                   "sign": p * (s - dout)}[rule]}


def _ce_b(dloss, cache, *, n="size", use_dloss=True, sign=1.0):
    probs, targets = cache
    onehot = np.eye(probs.shape[-1])[targets]
    div = {"size": targets.size, "none": 1, "first": targets.shape[0],
           "vocab": probs.shape[-1]}[n]
    return {"dlogits": sign * (probs - onehot) / div * (dloss if use_dloss else 1.0)}


def _ln_b(dout, cache, *, terms=("mean", "var"), use_gamma=True, dgamma="x_hat", sum_axes="all"):
    x_hat, s, gamma = cache
    g = dout * gamma if use_gamma else dout
    dx = g
    if "mean" in terms:
        dx = dx - g.mean(axis=-1, keepdims=True)
    if "var" in terms:
        dx = dx - x_hat * (g * x_hat).mean(axis=-1, keepdims=True)
    lead = tuple(range(dout.ndim - 1)) if sum_axes == "all" else 0
    dg = (dout * x_hat).sum(axis=lead) if dgamma == "x_hat" else dout.sum(axis=lead)
    return {"dx": dx / s, "dgamma": dg, "dbeta": dout.sum(axis=lead)}


def _ln_f_no_eps(x, gamma, beta, eps=1e-5):  # the backward then divides by s without eps
    out, (x_hat, s, gamma) = layer_norm_forward(x, gamma, beta, eps)
    return out, (x_hat, np.sqrt(s**2 - eps), gamma)


def _att_b(dout, cache, *, scale_q=True, scale_k=True, dk_t=True, dv_t=True, rule="right",
           unmasked=False):
    q, k, v, a = cache
    d = q.shape[-1]
    if unmasked:
        a = softmax(q @ np.swapaxes(k, -1, -2) / np.sqrt(d))
    sw = lambda t: np.swapaxes(t, -1, -2)  # noqa: E731
    dv = (sw(a) if dv_t else a) @ dout
    da = dout @ sw(v)
    ds = {"right": a * (da - (da * a).sum(-1, keepdims=True)), "no sub": a * da,
          "no A": da - (da * a).sum(-1, keepdims=True)}[rule]
    dq = ds @ k / (np.sqrt(d) if scale_q else 1.0)
    dk = (sw(ds) if dk_t else ds) @ q / (np.sqrt(d) if scale_k else 1.0)
    return {"dq": dq, "dk": dk, "dv": dv}


DECLARED = [
    Declared(
        check_linear_backward,
        reference=(linear_forward, linear_backward),
        mistakes=[
            ((linear_forward, lambda d, c: _lin_b(d, c, dw_t=True)),
             ["dw with shape (3, 5)", "shape of what it belongs to, w: (5, 3)",
              "dw is transposed"]),
            ((linear_forward, lambda d, c: _lin_b(d, c, db="none")),
             ["db with shape", "db is not summed"]),
            ((linear_forward, lambda d, c: _lin_b(d, c, db="mean")),
             ["a wrong db", "relative error", "dx and dw are right", "db averages"]),
            ((linear_forward, lambda d, c: _lin_b(d, c, db="axis0")),
             ["db with shape (3, 6)", "db sums over the first axis only"]),
            ((linear_forward, lambda d, c: _lin_b(d, c, batch_dw=True)),
             ["dw with shape (2, 4, 6)", "dw keeps a batch axis"]),
            ((linear_forward, lambda d, c: _lin_b(d, c, dx_w=True)),
             ["linear_backward raised ValueError: matmul",
              "when called with dout of shape (4, 3)",
              "The cache was what your linear_forward returned for x of shape (4, 5)"]),
        ],
        alternatives=[(linear_forward, linear_backward_einsum),
                      (qnp.linear_forward, qnp.linear_backward)],
    ),
    Declared(
        check_softmax_backward,
        reference=(softmax_forward, softmax_backward),
        mistakes=[
            ((softmax_forward, lambda d, p: _soft_b(d, p, rule="no sub")),
             ["a wrong dx", "relative error", "missing the subtraction term"]),
            ((softmax_forward, lambda d, p: _soft_b(d, p, rule="diag")),
             ["only the diagonal"]),
            ((softmax_forward, lambda d, p: _soft_b(d, p, rule="sign")),
             ["sign of the subtraction"]),
        ],
        alternatives=[(softmax_forward, softmax_backward_jacobian),
                      (softmax_forward_keep_x, softmax_backward_from_x)],
    ),
    Declared(
        check_cross_entropy_backward,
        reference=(cross_entropy_forward, cross_entropy_backward),
        mistakes=[
            ((cross_entropy_forward, lambda d, c: _ce_b(d, c, n="none")),
             ["a wrong dlogits", "forgets the 1/N"]),
            ((cross_entropy_forward, lambda d, c: _ce_b(d, c, n="first")),
             ["divides by logits.shape[0] = 2", "targets.size = 6"]),
            ((cross_entropy_forward, lambda d, c: _ce_b(d, c, use_dloss=False)),
             ["ignores dloss"]),
            ((cross_entropy_forward, lambda d, c: _ce_b(d, c, sign=-1.0)),
             ["sign is flipped"]),
            ((cross_entropy_forward, lambda d, c: _ce_b(d, c, n="vocab")),
             ["vocabulary size V = 7"]),
        ],
        alternatives=[(cross_entropy_forward, cross_entropy_backward_put),
                      (qnp.cross_entropy_forward, qnp.cross_entropy_backward)],
    ),
    Declared(
        check_layer_norm_backward,
        reference=(layer_norm_forward, layer_norm_backward),
        mistakes=[
            ((layer_norm_forward, lambda d, c: _ln_b(d, c, terms=("mean",))),
             ["a wrong dx", "dgamma and dbeta are right", "through the variance"]),
            ((layer_norm_forward, lambda d, c: _ln_b(d, c, terms=("var",))),
             ["through the mean"]),
            ((layer_norm_forward, lambda d, c: _ln_b(d, c, terms=())),
             ["as constants"]),
            ((layer_norm_forward, lambda d, c: _ln_b(d, c, use_gamma=False)),
             ["dx forgets gamma"]),
            ((layer_norm_forward, lambda d, c: _ln_b(d, c, dgamma="dout")),
             ["a wrong dgamma", "dx and dbeta are right", "dgamma is missing x_hat"]),
            ((layer_norm_forward, lambda d, c: _ln_b(d, c, sum_axes="first")),
             ["dgamma with shape (3, 5)", "sums over the first axis only"]),
            ((_ln_f_no_eps, layer_norm_backward),
             ["a wrong dx", "without eps"]),
        ],
        alternatives=[(layer_norm_forward, layer_norm_backward_long),
                      (qnp.layer_norm_forward, qnp.layer_norm_backward)],
    ),
    Declared(
        check_attention_backward,
        reference=(attention_forward, attention_backward),
        mistakes=[
            ((attention_forward, lambda d, c: _att_b(d, c, scale_k=False)),
             ["a wrong dk", "dq and dv are right", "unscaled scores"]),
            ((attention_forward, lambda d, c: _att_b(d, c, scale_k=False, scale_q=False)),
             ["a wrong dq and dk", "(dq)", "(dk)",
              "missing the scale 1/sqrt(d_head) = 1/sqrt(4)"]),
            ((attention_forward, lambda d, c: _att_b(d, c, dk_t=False)),
             ["a wrong dk", "dk uses dS where it needs dS^T"]),
            ((attention_forward, lambda d, c: _att_b(d, c, dv_t=False)),
             ["a wrong dv", "dv uses the weights A where it needs A^T"]),
            ((attention_forward, lambda d, c: _att_b(d, c, rule="no sub")),
             ["a wrong dq and dk", "missing its subtraction term"]),
            ((attention_forward, lambda d, c: _att_b(d, c, rule="no A")),
             ["flows into the masked", "factor A"]),
            ((attention_forward, lambda d, c: _att_b(d, c, unmasked=True)),
             ["a wrong dq, dk and dv", "flows into the masked", "WITHOUT the causal mask"]),
        ],
        alternatives=[(attention_forward_dict, attention_backward_dict),
                      (qnp.attention_forward, qnp.attention_backward)],
    ),
]

globals().update(meta_tests(DECLARED))


def pair_failure(check, forward, backward):
    for hidden in (False, True):
        try:
            check(forward, backward, hidden=hidden)
        except AssertionError as exc:
            return str(exc)
    pytest.fail(f"{check.__name__} passed a wrong backward")


def test_square_weight_mistakes_are_named_in_the_hidden_cases():
    for wrong, phrase in [(lambda d, c: _lin_b(d, c, dx_w=True), "dx multiplies by w instead"),
                          (lambda d, c: _lin_b(d, c, dw_t=True), "dw is transposed")]:
        with pytest.raises(AssertionError, match=re.escape(phrase)):
            check_linear_backward(linear_forward, wrong, hidden=True)


def _untouched(*args):
    raise NotImplementedError()


def _broken(*args):
    raise ValueError("boom")


@pytest.mark.parametrize("d", DECLARED, ids=[d.id for d in DECLARED])
def test_pair_not_implemented_and_exceptions(d):
    check, (forward, backward) = d.check, d.reference
    name = backward.__name__
    assert f"{name} is not implemented yet" in pair_failure(check, forward, _untouched)
    assert f"{forward.__name__} is not implemented yet" in pair_failure(check, _untouched,
                                                                       backward)
    message = pair_failure(check, forward, _broken)
    assert f"{name} raised ValueError: boom" in message and "The cache was what your" in message
    assert "should return two things, (out, cache)" in pair_failure(check, lambda *a: Liar(),
                                                                    backward)
    assert "should return a dict of gradients" in pair_failure(check, forward,
                                                               lambda *a: Liar())
    message = pair_failure(check, forward,
                           lambda d, c: {k: Liar() for k in backward(d, c)})
    assert "as a Liar" in message, message
    message = pair_failure(check, forward, lambda d, c: dict(list(backward(d, c).items())[1:]))
    assert "returned a dict without" in message, message
    with pytest.raises(AssertionError, match="should be a function"):
        check(forward, 42)


def test_pair_message_without_a_known_mistake_still_says_which_and_how_much():
    def noisy(dout, cache):
        grads = layer_norm_backward(dout, cache)
        return {**grads, "dbeta": grads["dbeta"] * 1.001}

    message = pair_failure(check_layer_norm_backward, layer_norm_forward, noisy)
    assert re.search(r"a wrong dbeta .*relative error 0.0005 against centred finite "
                     r"differences", message), message
    assert "dx and dgamma are right" in message, message


def test_backward_changing_dout_in_place_fails():
    def in_place(dout, cache):
        p = cache
        dout -= (dout * p).sum(axis=-1, keepdims=True)
        return {"dx": p * dout}

    message = pair_failure(check_softmax_backward, softmax_forward, in_place)
    assert "softmax_backward changed its input dout in place" in message, message


def test_nan_gradient_is_reported():
    message = pair_failure(check_softmax_backward, softmax_forward,
                           lambda d, p: {"dx": np.full_like(p, np.nan)})
    assert "a wrong dx" in message and "nan" in message, message


def test_allclose_patched_to_true_does_not_pass_a_wrong_answer():
    with comparisons_patched_to_true():
        assert "through the variance" in pair_failure(
            check_layer_norm_backward, layer_norm_forward,
            lambda d, c: _ln_b(d, c, terms=("mean",)))


def test_patched_reference_does_not_help():
    def wrong_backward(dout, cache):
        return _ln_b(dout, cache, terms=("mean",))

    saved = qnp.layer_norm_backward
    try:  # the learner's wrong answer, installed as the "reference" too
        qnp.layer_norm_backward = lambda dout, cache: wrong_backward(dout, cache[:3])
        assert "through the variance" in pair_failure(check_layer_norm_backward,
                                                      layer_norm_forward, wrong_backward)
    finally:
        qnp.layer_norm_backward = saved


def test_reference_gradients_agree_with_finite_differences_and_torch():
    """The checkers' truth: qkv.np's backward on every case matches centred differences of the
    forward, and torch.autograd (so a message about finite differences is about the truth)."""
    pairs = [_pair(ex) for ex in ch09.EXERCISES]
    cases = [ch09._linear_cases, ch09._softmax_cases, ch09._ce_cases, ch09._ln_cases,
             ch09._attention_cases]
    torch_fns = [lambda x, w, b: x @ w + b, lambda x: torch.softmax(x, -1),
                 lambda l, t: torch.nn.functional.cross_entropy(l.reshape(-1, l.shape[-1]),
                                                                t.reshape(-1)),
                 lambda x, g, b: torch.nn.functional.layer_norm(x, x.shape[-1:], g, b, 1e-5),
                 lambda q, k, v: torch.nn.functional.scaled_dot_product_attention(
                     q, k, v, is_causal=True)]
    for pair, make, fn in zip(pairs, cases, torch_fns, strict=True):
        for hidden in (False, True):
            for case, dout in make(hidden):
                out, cache = pair.reference(*case.args)
                grads = pair.ref_backward(dout, cache)
                tensors = [torch.tensor(a, requires_grad=a.dtype.kind == "f") for a in case.args]
                result = fn(*tensors)
                (result * torch.as_tensor(dout)).sum().backward()
                for key, index in pair.grads:
                    numeric = _numerical(pair, case.args, dout, index)
                    assert _relative_error(grads[key], numeric) < 1e-8, key
                    autograd = tensors[index].grad.numpy()
                    assert _relative_error(grads[key], autograd) < 1e-12, key


def _pair(ex):
    kind = ex.output
    return Pair(ex.name, kind.backward, ex.reference, kind.ref_backward, kind.grads, ex.mistakes,
                kind.out)
