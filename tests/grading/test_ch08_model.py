"""Chapter 8's exercises: the forward pass, the parameter count, next-token probabilities and
GPT-2's initialisation.

Besides the meta-tests: on the visible case, leaving out wpe is no longer mistaken for leaving
out the blocks' layer norms (issue 12, finding 3); no hidden case of init_params asks for
something the task text does not state (finding 6).
"""

import math

import numpy as np
import torch
from grading_meta import Declared, meta_tests, run
from test_ch07_block import layer_norm, mlp, multi_head_attention, softmax
from test_checkers import comparisons_patched_to_true, failure

import qkv.grading.exercises.ch07_block as ch07
import qkv.grading.exercises.ch08_model as ch08
import qkv.np as qnp
from qkv.grading import (
    check_count_parameters,
    check_gpt_forward,
    check_init_params,
    check_next_token_probs,
)


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


def gpt_forward_einsum(token_ids, params, n_head):
    """qkv.np's block, einsum for the unembedding."""
    seq = token_ids.shape[-1]
    x = np.take(params["wte"], token_ids, axis=0) + params["wpe"][np.arange(seq)]
    for block in params["blocks"]:
        x = qnp.decoder_block(x, block, n_head)
    x = qnp.layer_norm(x, params["lnf_gamma"], params["lnf_beta"])
    return np.einsum("...sd,vd->...sv", x, params["wte"])


def count_by_formula(vocab, context, n_layer, d_model):
    return float(12 * n_layer * d_model**2 + 13 * n_layer * d_model
                 + (vocab + context + 2) * d_model)


def count_from_shapes(vocab, context, n_layer, d_model):
    d = d_model
    block = [(d,), (d,), (d, 3 * d), (3 * d,), (d, d), (d,), (d,), (d,), (d, 4 * d), (4 * d,),
             (4 * d, d), (d,)]
    sizes = [(vocab, d), (context, d)] + block * n_layer + [(d,), (d,)]
    return int(sum(np.prod(s) for s in sizes))


def init_in_float32(vocab, context, n_layer, d_model, seed):
    params = init_params(vocab, context, n_layer, d_model, seed)
    params["wte"] = params["wte"].astype(np.float32)
    return params


def init_as_written(vocab, context, n_layer, d_model, seed):
    """The task text, literally: 0.02 / sqrt(2 * n_layer) computed up front (raises for
    n_layer = 0, which the task never asks for)."""
    rng = np.random.default_rng(seed)
    d, small = d_model, 0.02 / math.sqrt(2 * n_layer)
    params = {"wte": rng.normal(0.0, 0.02, size=(vocab, d)),
              "wpe": rng.normal(0.0, 0.02, size=(context, d)), "blocks": []}
    for _ in range(n_layer):
        params["blocks"].append({
            "ln1_gamma": np.ones(d), "ln1_beta": np.zeros(d),
            "w_qkv": rng.normal(0.0, 0.02, size=(d, 3 * d)), "b_qkv": np.zeros(3 * d),
            "w_out": rng.normal(0.0, small, size=(d, d)), "b_out": np.zeros(d),
            "ln2_gamma": np.ones(d), "ln2_beta": np.zeros(d),
            "w_fc": rng.normal(0.0, 0.02, size=(d, 4 * d)), "b_fc": np.zeros(4 * d),
            "w_proj": rng.normal(0.0, small, size=(4 * d, d)), "b_proj": np.zeros(d)})
    params["lnf_gamma"], params["lnf_beta"] = np.ones(d), np.zeros(d)
    return params


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


DECLARED = [
    Declared(check_gpt_forward, mistakes=[
            (lambda *a: _gpt(*a, final_ln=False), "final layer norm"),
            (lambda *a: _gpt(*a, positions="none"), "does not add the position"),
            (lambda *a: _gpt(*a, positions="by id"), "by token id"),
            (lambda *a: _gpt(*a, causal=False), "not causal"),
            (lambda *a: _gpt(*a, unembed="wpe"), "unembeds with wpe"),
            (lambda *a: _gpt(*a, out="probs"), "returns probabilities"),
            (lambda *a: _gpt(*a, out="last"), "only the last position"),
            (lambda *a: _gpt(*a, blocks=lambda b: b[::-1]), "reverse order"),
            (lambda *a: _gpt(*a, blocks=lambda b: b[:1] * len(b)),
     "applies params['blocks'][0] every time"),
            (lambda *a: _gpt(*a, scale=True), "sqrt(d_model)"),
    ], alternatives=[gpt_forward, gpt_forward_einsum, qnp.gpt_forward]),
    Declared(check_count_parameters, mistakes=[
            (lambda *a: _count(*a, lm_head=True), "separate (d_model, vocab)"),
            (lambda *a: _count(*a, biases=False), "leaves out the biases"),
            (lambda *a: _count(*a, lns=False), "leaves out the layer norms"),
            (lambda *a: _count(*a, mlp_w=4), "4 d^2"),
            (lambda *a: _count(*a, qkv=1), "w_qkv as d_model x d_model"),
            (lambda V, C, L, d: 12 * L * d * d, "the estimate"),
            (lambda *a: _count(*a) + 1, "of each block"),
    ], alternatives=[count_parameters, count_by_formula, count_from_shapes]),
    Declared(check_next_token_probs, mistakes=[
            (lambda l: softmax(l[..., 0, :]), "FIRST position"),
            (lambda l: l[..., -1, :], "without the softmax"),
            (lambda l: softmax(l), "every position"),
            (lambda l: softmax(l, axis=-2)[..., -1, :], "over the positions"),
    ], alternatives=[next_token_probs,
                     lambda l: torch.softmax(l[..., -1, :], -1),
                     lambda l: np.exp(l[..., -1, :] - np.logaddexp.reduce(
                         l[..., -1, :], axis=-1, keepdims=True))]),
    Declared(check_init_params, reference=init_params, mistakes=[
            (lambda *a: _init(*a, residual="none"), "start smaller"),
            (lambda *a: _init(*a, residual="L"), "sqrt(n_layer)"),
            (lambda *a: _init(*a, residual="all"), "only w_out and w_proj"),
            (lambda *a: _init(*a, std=1.0, residual="none"), "standard normal"),
            (lambda *a: _init(*a, std=0.02**2), "passes the variance"),
            (lambda *a: _init(*a, shared=True), "[block] * n_layer"),
            (lambda *a: _init(*a, rng_kind="global"), "two calls"),
            (lambda *a: _init(*a, rng_kind="fixed"), "ignores its seed"),
            (lambda *a: _init(*a, draw="uniform"), "not normally distributed"),
            (lambda *a: _init(*a, gamma=0.0), "gamma = 1"),
            (lambda *a: _init(*a, bias=0.01), "every bias"),
            (lambda *a: _init(*a, w_fc_shape=lambda d: (4 * d, d)),
     "expected (d_model, 4 * d_model)"),
            (lambda *a: _init(*a, drop="lnf_beta"), "missing lnf_beta"),
            (lambda *a: {**_init(*a), "blocks": {}}, "should be a list"),
    ], alternatives=[init_params, init_in_float32, init_as_written]),
]

globals().update(meta_tests(DECLARED))


def test_gpt_forward_changing_the_weights_in_place_fails():
    def in_place(token_ids, params, n_head):
        logits = gpt_forward(token_ids, params, n_head)
        for block in params["blocks"]:
            block["w_qkv"] *= 2.0
        return logits

    message = failure(check_gpt_forward, in_place)
    assert "changed params['blocks'][0]['w_qkv'] in place" in message, message


def test_hidden_cases_differ_from_visible_ones():
    assert "124,439,808" not in repr(ch08._count_cases(False))
    for cases in (ch08._gpt_cases, ch07._mlp_cases, ch08._next_cases):
        visible = {tuple(np.shape(a)) for c in cases(False) for a in c.args[:1]}
        hidden = {tuple(np.shape(a)) for c in cases(True) for a in c.args[:1]}
        assert hidden - visible


def test_allclose_patched_to_true_does_not_pass_a_wrong_answer():
    with comparisons_patched_to_true():
        assert "final layer norm" in failure(check_gpt_forward,
                                             lambda *a: _gpt(*a, final_ln=False))
        assert "start smaller" in failure(check_init_params, lambda *a: _init(*a, residual="none"))


def test_patched_reference_does_not_help():
    saved = qnp.gpt_forward
    try:  # the learner's wrong answer, installed as the "reference" too
        qnp.gpt_forward = lambda *a: _gpt(*a, final_ln=False)
        assert "final layer norm" in failure(check_gpt_forward,
                                             lambda *a: _gpt(*a, final_ln=False))
    finally:
        qnp.gpt_forward = saved


def test_finding_3_leaving_out_wpe_is_named_on_the_visible_case():
    """Issue 12, finding 3: at the old visible size (context = 4 n_layer) leaving out wpe gave
    the same count as leaving out the blocks' layer norms, and the message named the latter."""
    def no_wpe(vocab, context, n_layer, d_model):
        return count_parameters(vocab, context, n_layer, d_model) - context * d_model

    message, _, _ = run(check_count_parameters, no_wpe)
    assert "leaves out the position table wpe" in message, message


def test_finding_6_init_params_hidden_cases_follow_the_task_text():
    """Issue 12, finding 6: a hidden case used n_layer = 0, which the task never states (and
    where its 0.02 / sqrt(2 * n_layer) is undefined). The task, written literally, passes."""
    for hidden in (False, True):
        message, _, _ = run(check_init_params, init_as_written, hidden)
        assert message is None, message
