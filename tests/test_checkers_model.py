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
from test_checkers import comparisons_patched_to_true, failure, silent

import qkv.grading as grading
import qkv.np as qnp
from qkv.grading import (
    check_count_parameters,
    check_gpt_forward,
    check_has_residuals,
    check_init_params,
    check_mlp,
    check_next_token_probs,
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


CORRECT = [
    (check_mlp, mlp),
    (check_has_residuals, has_residuals),
    (check_gpt_forward, gpt_forward),
    (check_count_parameters, count_parameters),
    (check_next_token_probs, next_token_probs),
    (check_init_params, init_params),
]
CHECKERS = [check for check, _ in CORRECT]
def test_registry_is_complete():
    here = {check.__name__ for check in CHECKERS}
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

    with silent():
        for check, fn in [(check_mlp, mlp_torch),
                          (check_has_residuals, has_residuals_by_norm),
                          (check_count_parameters, count_by_formula),
                          (check_init_params, init_in_float32),
                          (check_next_token_probs,
                           lambda l: torch.softmax(torch.as_tensor(l)[..., -1, :], -1))]:
            check(fn)
            check(fn, hidden=True)
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


# ------------------------------------------------------------------------------------------------
# Hostile outputs, functions that raise or change their inputs, patched numpy
# ------------------------------------------------------------------------------------------------


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
        assert "start smaller" in failure(check_init_params, lambda *a: _init(*a, residual="none"))
