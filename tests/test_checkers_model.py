"""The checkers of chapters 7, 8 and 9 (the decoder block, the whole model, backpropagation).

Same contract as tests/test_checkers.py: a correct learner-style function passes silently on the
visible and hidden cases; the reference library passes; each known mistake, written the way a
learner would, fails with a message that names it (for the backward checkers: which gradient,
and by how much); patching ``np.allclose`` does not help a wrong answer. Hostile functions
(not implemented, raising, a lying ``__eq__``) are run here against the forward/backward pair
checkers, and by test_checkers.py against every other checker, which also runs the notebooks.
"""

import math
import re

import numpy as np
import pytest
import torch
from test_checkers import Liar, comparisons_patched_to_true, failure, silent

import qkv.grading as grading
import qkv.np as qnp
from qkv.grading import (
    check_attention_backward,
    check_count_parameters,
    check_cross_entropy_backward,
    check_gpt_forward,
    check_has_residuals,
    check_init_params,
    check_layer_norm_backward,
    check_linear_backward,
    check_mlp,
    check_next_token_probs,
    check_softmax_backward,
    checks_model,
)

# ------------------------------------------------------------------------------------------------
# Correct answers, written the way a learner would (not by calling qkv.np)
# ------------------------------------------------------------------------------------------------


def softmax(x, axis=-1):
    e = np.exp(x - np.max(x, axis=axis, keepdims=True))
    return e / np.sum(e, axis=axis, keepdims=True)


def layer_norm(x, gamma, beta, eps=1e-5):
    mean = x.mean(axis=-1, keepdims=True)
    var = ((x - mean) ** 2).mean(axis=-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * gamma + beta


def gelu(x):
    return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)))


def mlp(x, w_fc, b_fc, w_proj, b_proj):
    return gelu(x @ w_fc + b_fc) @ w_proj + b_proj


def multi_head_attention(x, w_qkv, b_qkv, w_out, b_out, n_head, causal=True):
    *lead, seq, d_model = x.shape
    d_head = d_model // n_head
    q, k, v = np.split(x @ w_qkv + b_qkv, 3, axis=-1)

    def heads(t):
        return np.swapaxes(t.reshape(*lead, seq, n_head, d_head), -3, -2)

    q, k, v = heads(q), heads(k), heads(v)
    scores = q @ np.swapaxes(k, -1, -2) / np.sqrt(d_head)
    if causal:
        scores = np.where(np.tril(np.ones((seq, seq), dtype=bool)), scores, -np.inf)
    out = np.swapaxes(softmax(scores) @ v, -3, -2).reshape(*lead, seq, d_model)
    return out @ w_out + b_out


def decoder_block(x, p, n_head, causal=True):
    h = layer_norm(x, p["ln1_gamma"], p["ln1_beta"])
    x = x + multi_head_attention(h, p["w_qkv"], p["b_qkv"], p["w_out"], p["b_out"], n_head,
                                 causal)
    h = layer_norm(x, p["ln2_gamma"], p["ln2_beta"])
    return x + mlp(h, p["w_fc"], p["b_fc"], p["w_proj"], p["b_proj"])


def has_residuals(block, d_model):
    x = np.random.default_rng(0).normal(size=(6, d_model))
    c = 1e6  # layer norm ignores the size of its input; only the "x +" path keeps it
    return bool(np.allclose(block(c * x) / c, x, atol=1e-3))


def gpt_forward(token_ids, params, n_head):
    seq = token_ids.shape[-1]
    x = params["wte"][token_ids] + params["wpe"][:seq]
    for block in params["blocks"]:
        x = decoder_block(x, block, n_head)
    x = layer_norm(x, params["lnf_gamma"], params["lnf_beta"])
    return x @ params["wte"].T


def count_parameters(vocab, context, n_layer, d_model):
    d = d_model
    block = (d * 3 * d + 3 * d) + (d * d + d) + (d * 4 * d + 4 * d) + (4 * d * d + d) + 4 * d
    return vocab * d + context * d + n_layer * block + 2 * d


def next_token_probs(logits):
    return softmax(logits[..., -1, :])


def init_params(vocab, context, n_layer, d_model, seed):
    rng = np.random.default_rng(seed)
    d, std = d_model, 0.02
    small = std / np.sqrt(2 * n_layer) if n_layer else std

    def block():
        return dict(ln1_gamma=np.ones(d), ln1_beta=np.zeros(d),
                    w_qkv=rng.normal(0, std, (d, 3 * d)), b_qkv=np.zeros(3 * d),
                    w_out=rng.normal(0, small, (d, d)), b_out=np.zeros(d),
                    ln2_gamma=np.ones(d), ln2_beta=np.zeros(d),
                    w_fc=rng.normal(0, std, (d, 4 * d)), b_fc=np.zeros(4 * d),
                    w_proj=rng.normal(0, small, (4 * d, d)), b_proj=np.zeros(d))

    return dict(wte=rng.normal(0, std, (vocab, d)), wpe=rng.normal(0, std, (context, d)),
                blocks=[block() for _ in range(n_layer)],
                lnf_gamma=np.ones(d), lnf_beta=np.zeros(d))


# --- chapter 9: the forwards as the notebook gives them, and the backwards ----------------------


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


CORRECT = [
    (check_mlp, mlp),
    (check_has_residuals, has_residuals),
    (check_gpt_forward, gpt_forward),
    (check_count_parameters, count_parameters),
    (check_next_token_probs, next_token_probs),
    (check_init_params, init_params),
]
CHECKERS = [check for check, _ in CORRECT]
PAIRS = [
    (check_linear_backward, linear_forward, linear_backward),
    (check_softmax_backward, softmax_forward, softmax_backward),
    (check_cross_entropy_backward, cross_entropy_forward, cross_entropy_backward),
    (check_layer_norm_backward, layer_norm_forward, layer_norm_backward),
    (check_attention_backward, attention_forward, attention_backward),
]
PAIR_CHECKERS = [check for check, _, _ in PAIRS]


def test_registry_is_complete():
    here = {check.__name__ for check in CHECKERS + PAIR_CHECKERS}
    ours = {name for name in grading.__all__
            if getattr(grading, name).__module__ == checks_model.__name__}
    assert here == ours


# ------------------------------------------------------------------------------------------------
# Correct answers pass, silently
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("check, fn", CORRECT, ids=[c.__name__ for c in CHECKERS])
def test_correct_answer_passes_silently(check, fn):
    with silent():
        check(fn)
        check(fn, hidden=True)


@pytest.mark.parametrize("check, forward, backward", PAIRS, ids=[c.__name__ for c in PAIR_CHECKERS])
def test_correct_pair_passes_silently(check, forward, backward):
    with silent():
        check(forward, backward)
        check(forward, backward, hidden=True)


@pytest.mark.parametrize("check, forward, backward", [
    (check_linear_backward, qnp.linear_forward, qnp.linear_backward),
    (check_softmax_backward, qnp.softmax_forward, qnp.softmax_backward),
    (check_cross_entropy_backward, qnp.cross_entropy_forward, qnp.cross_entropy_backward),
    (check_layer_norm_backward, qnp.layer_norm_forward, qnp.layer_norm_backward),
    (check_attention_backward, qnp.attention_forward, qnp.attention_backward),
], ids=lambda v: getattr(v, "__name__", ""))
def test_reference_pairs_pass(check, forward, backward):
    with silent():
        check(forward, backward)
        check(forward, backward, hidden=True)


def test_reference_library_passes():
    with silent():
        for check, fn in [(check_mlp, qnp.mlp), (check_gpt_forward, qnp.gpt_forward)]:
            check(fn)
            check(fn, hidden=True)


def test_other_correct_forms_pass():
    def mlp_torch(x, w_fc, b_fc, w_proj, b_proj):
        h = torch.nn.functional.gelu(torch.as_tensor(x @ w_fc + b_fc), approximate="tanh")
        return h.numpy() @ w_proj + b_proj

    def has_residuals_by_norm(block, d_model):
        # for a huge input, what the branches add is tiny next to the input itself
        x = np.random.default_rng(1).normal(size=(2, 5, d_model))
        big = 1e5 * x
        return np.linalg.norm(block(big) - big) < 0.01 * np.linalg.norm(big)

    def count_by_formula(vocab, context, n_layer, d_model):
        return float(12 * n_layer * d_model**2 + 13 * n_layer * d_model
                     + (vocab + context + 2) * d_model)

    def init_in_float32(vocab, context, n_layer, d_model, seed):
        params = init_params(vocab, context, n_layer, d_model, seed)
        params["wte"] = params["wte"].astype(np.float32)
        return params

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

    with silent():
        for check, fn in [(check_mlp, mlp_torch),
                          (check_has_residuals, has_residuals_by_norm),
                          (check_count_parameters, count_by_formula),
                          (check_init_params, init_in_float32),
                          (check_next_token_probs,
                           lambda l: torch.softmax(torch.as_tensor(l)[..., -1, :], -1))]:
            check(fn)
            check(fn, hidden=True)
        for check, f, b in [
                (check_cross_entropy_backward, cross_entropy_forward, cross_entropy_backward_put),
                (check_linear_backward, linear_forward, linear_backward_einsum),
                (check_attention_backward, attention_forward_dict, attention_backward_dict)]:
            check(f, b)
            check(f, b, hidden=True)


# ------------------------------------------------------------------------------------------------
# Every known mistake fails, and the message names it
# ------------------------------------------------------------------------------------------------


def _mlp(x, w_fc, b_fc, w_proj, b_proj, *, act=gelu, out_act=False, bias_after=False,
         proj_bias=True, residual=False):
    h = act(x @ w_fc) + b_fc if bias_after else act(x @ w_fc + b_fc)
    out = h @ w_proj + (b_proj if proj_bias else 0)
    if out_act:
        out = gelu(out)
    return x + out if residual else out


def _gelu_erf(x):
    return 0.5 * x * (1 + np.vectorize(math.erf)(x / math.sqrt(2)))


def _gpt(ids, params, n_head, *, positions="add", final_ln=True, causal=True, unembed="wte",
         blocks=lambda b: b, out="logits", scale=False):
    seq = ids.shape[-1]
    x = params["wte"][ids] * (math.sqrt(params["wte"].shape[1]) if scale else 1.0)
    x = x + {"add": params["wpe"][:seq], "none": 0.0,
             "by id": params["wpe"][ids % len(params["wpe"])]}[positions]
    for block in blocks(params["blocks"]):
        x = decoder_block(x, block, n_head, causal)
    if final_ln:
        x = layer_norm(x, params["lnf_gamma"], params["lnf_beta"])
    logits = x @ params[unembed].T
    return {"logits": logits, "probs": softmax(logits), "last": logits[..., -1, :]}[out]


def _count(V, C, L, d, *, lm_head=False, biases=True, lns=True, mlp_w=8, qkv=3):
    n = V * d + C * d + L * ((qkv + 1 + mlp_w) * d * d) + (V * d if lm_head else 0)
    n += L * (qkv + 1 + 4 + 1) * d if biases else 0
    n += (4 * L + 2) * d if lns else 0
    return n


def _init(V, C, L, d, seed, *, std=0.02, residual="2L", shared=False, rng_kind="seeded",
          draw="normal", gamma=1.0, bias=0.0, w_fc_shape=None, drop=None):
    rng = {"seeded": np.random.default_rng(seed), "fixed": np.random.default_rng(0),
           "global": np.random}[rng_kind]
    small = {"2L": std / math.sqrt(2 * L), "L": std / math.sqrt(L), "none": std,
             "all": std / math.sqrt(2 * L)}[residual] if L else std
    big = small if residual == "all" else std

    def w(shape, sd):
        if draw == "uniform":
            a = sd * math.sqrt(3)
            return rng.uniform(-a, a, size=shape)
        return rng.normal(0, sd, size=shape)

    def block():
        return dict(ln1_gamma=np.full(d, gamma), ln1_beta=np.zeros(d),
                    w_qkv=w((d, 3 * d), big), b_qkv=np.full(3 * d, bias),
                    w_out=w((d, d), small), b_out=np.zeros(d),
                    ln2_gamma=np.ones(d), ln2_beta=np.zeros(d),
                    w_fc=w(w_fc_shape(d) if w_fc_shape else (d, 4 * d), big), b_fc=np.zeros(4 * d),
                    w_proj=w((4 * d, d), small), b_proj=np.zeros(d))

    one = block()
    params = dict(wte=w((V, d), big), wpe=w((C, d), big),
                  blocks=[one] * L if shared else [block() for _ in range(L)],
                  lnf_gamma=np.ones(d), lnf_beta=np.zeros(d))
    if drop:
        del params[drop]
    return params


def _init_flagged(*a):
    return _init(*a, std=0.02)


def _correlated(block, d):  # "the output still looks like the input"
    x = np.random.default_rng(1).normal(size=(5, d))
    return bool(np.corrcoef(block(x).ravel(), x.ravel())[0, 1] > 0.3)


def _grows(block, d):  # "residuals make the stream grow"
    x = np.random.default_rng(1).normal(size=(5, d))
    return bool(block(x).std() >= 0.99 * x.std())


MISTAKES = [
    # the MLP
    (check_mlp, lambda *a: _mlp(*a, act=lambda h: np.maximum(h, 0)), "uses a ReLU"),
    (check_mlp, lambda *a: _mlp(*a, act=_gelu_erf), "exact GELU"),
    (check_mlp, lambda *a: _mlp(*a, act=lambda h: h), "no nonlinearity"),
    (check_mlp, lambda *a: _mlp(*a, act=lambda h: h, out_act=True), "to its output"),
    (check_mlp, lambda *a: _mlp(*a, bias_after=True), "adds b_fc after the GELU"),
    (check_mlp, lambda *a: _mlp(*a, proj_bias=False), "leaves out the bias b_proj"),
    (check_mlp, lambda *a: _mlp(*a, residual=True), "belongs to the decoder block"),
    # residuals or not
    (check_has_residuals, lambda block, d: bool(np.allclose(block(np.ones((3, d))), 1, atol=0.5)),
     "HAS residual connections"),
    (check_has_residuals, lambda block, d: _correlated(block, d), "cannot tell"),
    (check_has_residuals, lambda block, d: _grows(block, d), "Its weights are large."),
    (check_has_residuals, lambda block, d: True, "has NO residual connections"),
    (check_has_residuals, lambda block, d: np.array([True]), "single True or False"),
    # the whole model
    (check_gpt_forward, lambda *a: _gpt(*a, final_ln=False), "final layer norm"),
    (check_gpt_forward, lambda *a: _gpt(*a, positions="none"), "does not add the position"),
    (check_gpt_forward, lambda *a: _gpt(*a, positions="by id"), "by token id"),
    (check_gpt_forward, lambda *a: _gpt(*a, causal=False), "not causal"),
    (check_gpt_forward, lambda *a: _gpt(*a, unembed="wpe"), "unembeds with wpe"),
    (check_gpt_forward, lambda *a: _gpt(*a, out="probs"), "returns probabilities"),
    (check_gpt_forward, lambda *a: _gpt(*a, out="last"), "only the last position"),
    (check_gpt_forward, lambda *a: _gpt(*a, blocks=lambda b: b[::-1]), "reverse order"),
    (check_gpt_forward, lambda *a: _gpt(*a, blocks=lambda b: b[:1] * len(b)),
     "applies params['blocks'][0] every time"),
    (check_gpt_forward, lambda *a: _gpt(*a, scale=True), "sqrt(d_model)"),
    # counting
    (check_count_parameters, lambda *a: _count(*a, lm_head=True), "separate (d_model, vocab)"),
    (check_count_parameters, lambda *a: _count(*a, biases=False), "leaves out the biases"),
    (check_count_parameters, lambda *a: _count(*a, lns=False), "leaves out the layer norms"),
    (check_count_parameters, lambda *a: _count(*a, mlp_w=4), "4 d^2"),
    (check_count_parameters, lambda *a: _count(*a, qkv=1), "w_qkv as d_model x d_model"),
    (check_count_parameters, lambda V, C, L, d: 12 * L * d * d, "the estimate"),
    (check_count_parameters, lambda *a: _count(*a) + 1, "of each block"),
    # next-token probabilities
    (check_next_token_probs, lambda l: softmax(l[..., 0, :]), "FIRST position"),
    (check_next_token_probs, lambda l: l[..., -1, :], "without the softmax"),
    (check_next_token_probs, lambda l: softmax(l), "every position"),
    (check_next_token_probs, lambda l: softmax(l, axis=-2)[..., -1, :], "over the positions"),
    # GPT-2's initialisation
    (check_init_params, lambda *a: _init(*a, residual="none"), "start smaller"),
    (check_init_params, lambda *a: _init(*a, residual="L"), "sqrt(n_layer)"),
    (check_init_params, lambda *a: _init(*a, residual="all"), "only w_out and w_proj"),
    (check_init_params, lambda *a: _init(*a, std=1.0, residual="none"), "standard normal"),
    (check_init_params, lambda *a: _init(*a, std=0.02**2), "passes the variance"),
    (check_init_params, lambda *a: _init(*a, shared=True), "[block] * n_layer"),
    (check_init_params, lambda *a: _init(*a, rng_kind="global"), "two calls"),
    (check_init_params, lambda *a: _init(*a, rng_kind="fixed"), "ignores its seed"),
    (check_init_params, lambda *a: _init(*a, draw="uniform"), "not normally distributed"),
    (check_init_params, lambda *a: _init(*a, gamma=0.0), "gamma = 1"),
    (check_init_params, lambda *a: _init(*a, bias=0.01), "every bias"),
    (check_init_params, lambda *a: _init(*a, w_fc_shape=lambda d: (4 * d, d)),
     "expected (d_model, 4 * d_model)"),
    (check_init_params, lambda *a: _init(*a, drop="lnf_beta"), "missing lnf_beta"),
    (check_init_params, lambda *a: {**_init(*a), "blocks": {}}, "should be a list"),
]


@pytest.mark.parametrize("check, wrong, phrase", MISTAKES,
                         ids=[f"{c.__name__}-{p}" for c, _, p in MISTAKES])
def test_mistake_fails_and_is_named(check, wrong, phrase):
    message = failure(check, wrong)
    assert phrase in message, message


# --- chapter 9: wrong backward passes, each with the learner's own (correct) forward ------------


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


PAIR_MISTAKES = [
    # (check, forward, wrong backward, phrases that must all appear)
    (check_linear_backward, linear_forward, lambda d, c: _lin_b(d, c, dw_t=True),
     ["dw with shape (3, 5)", "shape of what it belongs to, w: (5, 3)", "dw is transposed"]),
    (check_linear_backward, linear_forward, lambda d, c: _lin_b(d, c, db="none"),
     ["db with shape", "db is not summed"]),
    (check_linear_backward, linear_forward, lambda d, c: _lin_b(d, c, db="mean"),
     ["a wrong db", "relative error", "dx and dw are right", "db averages"]),
    (check_linear_backward, linear_forward, lambda d, c: _lin_b(d, c, db="axis0"),
     ["db with shape (3, 6)", "db sums over the first axis only"]),
    (check_linear_backward, linear_forward, lambda d, c: _lin_b(d, c, batch_dw=True),
     ["dw with shape (2, 4, 6)", "dw keeps a batch axis"]),
    (check_linear_backward, linear_forward, lambda d, c: _lin_b(d, c, dx_w=True),
     ["linear_backward raised ValueError: matmul", "when called with dout of shape (4, 3)",
      "The cache was what your linear_forward returned for x of shape (4, 5)"]),
    (check_softmax_backward, softmax_forward, lambda d, p: _soft_b(d, p, rule="no sub"),
     ["a wrong dx", "relative error", "missing the subtraction term"]),
    (check_softmax_backward, softmax_forward, lambda d, p: _soft_b(d, p, rule="diag"),
     ["only the diagonal"]),
    (check_softmax_backward, softmax_forward, lambda d, p: _soft_b(d, p, rule="sign"),
     ["sign of the subtraction"]),
    (check_cross_entropy_backward, cross_entropy_forward, lambda d, c: _ce_b(d, c, n="none"),
     ["a wrong dlogits", "forgets the 1/N"]),
    (check_cross_entropy_backward, cross_entropy_forward, lambda d, c: _ce_b(d, c, n="first"),
     ["divides by logits.shape[0] = 2", "targets.size = 6"]),
    (check_cross_entropy_backward, cross_entropy_forward,
     lambda d, c: _ce_b(d, c, use_dloss=False), ["ignores dloss"]),
    (check_cross_entropy_backward, cross_entropy_forward, lambda d, c: _ce_b(d, c, sign=-1.0),
     ["sign is flipped"]),
    (check_cross_entropy_backward, cross_entropy_forward, lambda d, c: _ce_b(d, c, n="vocab"),
     ["vocabulary size V = 7"]),
    (check_layer_norm_backward, layer_norm_forward, lambda d, c: _ln_b(d, c, terms=("mean",)),
     ["a wrong dx", "dgamma and dbeta are right", "through the variance"]),
    (check_layer_norm_backward, layer_norm_forward, lambda d, c: _ln_b(d, c, terms=("var",)),
     ["through the mean"]),
    (check_layer_norm_backward, layer_norm_forward, lambda d, c: _ln_b(d, c, terms=()),
     ["as constants"]),
    (check_layer_norm_backward, layer_norm_forward, lambda d, c: _ln_b(d, c, use_gamma=False),
     ["dx forgets gamma"]),
    (check_layer_norm_backward, layer_norm_forward, lambda d, c: _ln_b(d, c, dgamma="dout"),
     ["a wrong dgamma", "dx and dbeta are right", "dgamma is missing x_hat"]),
    (check_layer_norm_backward, layer_norm_forward, lambda d, c: _ln_b(d, c, sum_axes="first"),
     ["dgamma with shape (3, 5)", "sums over the first axis only"]),
    (check_layer_norm_backward, _ln_f_no_eps, layer_norm_backward,
     ["a wrong dx", "without eps"]),
    (check_attention_backward, attention_forward, lambda d, c: _att_b(d, c, scale_k=False),
     ["a wrong dk", "dq and dv are right", "unscaled scores"]),
    (check_attention_backward, attention_forward,
     lambda d, c: _att_b(d, c, scale_k=False, scale_q=False),
     ["a wrong dq and dk", "(dq)", "(dk)", "missing the scale 1/sqrt(d_head) = 1/sqrt(4)"]),
    (check_attention_backward, attention_forward, lambda d, c: _att_b(d, c, dk_t=False),
     ["a wrong dk", "dk uses dS where it needs dS^T"]),
    (check_attention_backward, attention_forward, lambda d, c: _att_b(d, c, dv_t=False),
     ["a wrong dv", "dv uses the weights A where it needs A^T"]),
    (check_attention_backward, attention_forward, lambda d, c: _att_b(d, c, rule="no sub"),
     ["a wrong dq and dk", "missing its subtraction term"]),
    (check_attention_backward, attention_forward, lambda d, c: _att_b(d, c, rule="no A"),
     ["flows into the masked", "factor A"]),
    (check_attention_backward, attention_forward, lambda d, c: _att_b(d, c, unmasked=True),
     ["a wrong dq, dk and dv", "flows into the masked", "WITHOUT the causal mask"]),
]


def pair_failure(check, forward, backward):
    for hidden in (False, True):
        try:
            check(forward, backward, hidden=hidden)
        except AssertionError as exc:
            return str(exc)
    pytest.fail(f"{check.__name__} passed a wrong backward")


@pytest.mark.parametrize("check, forward, backward, phrases", PAIR_MISTAKES,
                         ids=[f"{c.__name__}-{p[-1]}" for c, _, _, p in PAIR_MISTAKES])
def test_backward_mistake_names_the_gradient_and_the_mistake(check, forward, backward, phrases):
    message = pair_failure(check, forward, backward)
    for phrase in phrases:
        assert phrase in message, message


def test_square_weight_mistakes_are_named_in_the_hidden_cases():
    for wrong, phrase in [(lambda d, c: _lin_b(d, c, dx_w=True), "dx multiplies by w instead"),
                          (lambda d, c: _lin_b(d, c, dw_t=True), "dw is transposed")]:
        with pytest.raises(AssertionError, match=re.escape(phrase)):
            check_linear_backward(linear_forward, wrong, hidden=True)


# ------------------------------------------------------------------------------------------------
# Hostile outputs, functions that raise or change their inputs, patched numpy
# ------------------------------------------------------------------------------------------------


def _untouched(*args):
    raise NotImplementedError()


def _broken(*args):
    raise ValueError("boom")


@pytest.mark.parametrize("check, forward, backward", PAIRS, ids=[c.__name__ for c in PAIR_CHECKERS])
def test_pair_not_implemented_and_exceptions(check, forward, backward):
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


def test_gpt_forward_changing_the_weights_in_place_fails():
    def in_place(token_ids, params, n_head):
        logits = gpt_forward(token_ids, params, n_head)
        for block in params["blocks"]:
            block["w_qkv"] *= 2.0
        return logits

    message = failure(check_gpt_forward, in_place)
    assert "changed params['blocks'][0]['w_qkv'] in place" in message, message


def test_block_gives_nothing_away():
    seen = []

    def peek(block, d_model):
        seen.append((repr(block), [n for n in dir(block) if not n.startswith("__")]))
        return has_residuals(block, d_model)

    check_has_residuals(peek)
    for text, names in seen:
        assert re.fullmatch(r"<decoder block \d, d_model = \d+>", text)
        assert set(names) <= {"_forward", "_text"}


def test_hidden_cases_differ_from_visible_ones():
    assert "124,439,808" not in repr(checks_model._count_cases(False))
    for cases in (checks_model._gpt_cases, checks_model._mlp_cases, checks_model._next_cases):
        visible = {tuple(np.shape(a)) for c in cases(False) for a in c.args[:1]}
        hidden = {tuple(np.shape(a)) for c in cases(True) for a in c.args[:1]}
        assert hidden - visible


def test_allclose_patched_to_true_does_not_pass_a_wrong_answer():
    with comparisons_patched_to_true():
        assert "final layer norm" in failure(check_gpt_forward,
                                             lambda *a: _gpt(*a, final_ln=False))
        assert "through the variance" in pair_failure(
            check_layer_norm_backward, layer_norm_forward,
            lambda d, c: _ln_b(d, c, terms=("mean",)))
        assert "start smaller" in failure(check_init_params, lambda *a: _init(*a, residual="none"))


def test_patched_reference_does_not_help():
    def wrong_backward(dout, cache):
        return _ln_b(dout, cache, terms=("mean",))

    saved = qnp.layer_norm_backward, qnp.gpt_forward
    try:  # the learner's wrong answers, installed as the "reference" too
        qnp.layer_norm_backward = lambda dout, cache: wrong_backward(dout, cache[:3])
        qnp.gpt_forward = lambda *a: _gpt(*a, final_ln=False)
        assert "final layer norm" in failure(check_gpt_forward,
                                             lambda *a: _gpt(*a, final_ln=False))
        assert "through the variance" in pair_failure(check_layer_norm_backward,
                                                      layer_norm_forward, wrong_backward)
    finally:
        qnp.layer_norm_backward, qnp.gpt_forward = saved


def test_reference_gradients_agree_with_finite_differences_and_torch():
    """The checkers' truth: qkv.np's backward on every case matches centred differences of the
    forward, and torch.autograd (so a message about finite differences is about the truth)."""
    pairs = [checks_model._LINEAR, checks_model._SOFTMAX, checks_model._CROSS_ENTROPY,
             checks_model._LAYER_NORM, checks_model._ATTENTION]
    cases = [checks_model._linear_cases, checks_model._softmax_cases, checks_model._ce_cases,
             checks_model._ln_cases, checks_model._attention_cases]
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
                    numeric = checks_model._numerical(pair, case.args, dout, index)
                    assert checks_model._relative_error(grads[key], numeric) < 1e-8, key
                    autograd = tensors[index].grad.numpy()
                    assert checks_model._relative_error(grads[key], autograd) < 1e-12, key
