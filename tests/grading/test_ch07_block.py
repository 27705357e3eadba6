"""Chapter 7's exercises: layer norm, GELU, the MLP, "does this block have residuals?", the
decoder block.

Besides the meta-tests: a composite answer whose mistake is not in the catalogue is diagnosed by
parts (issue 12, finding 2): GELU's constants are read back, and the block says which helper or
which sublayer differs.
"""

import math
import re

import numpy as np
import torch
from grading_meta import Declared, meta_tests, run

import qkv.np as qnp
from qkv.grading import (
    check_decoder_block,
    check_gelu,
    check_has_residuals,
    check_layer_norm,
    check_mlp,
)


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


def decoder_block(x, p, n_head):
    h = layer_norm(x, p["ln1_gamma"], p["ln1_beta"])
    x = x + multi_head_attention(h, p["w_qkv"], p["b_qkv"], p["w_out"], p["b_out"], n_head)
    h = layer_norm(x, p["ln2_gamma"], p["ln2_beta"])
    return x + mlp(h, p["w_fc"], p["b_fc"], p["w_proj"], p["b_proj"])


def decoder_block_torch(x, p, n_head):
    """The block with torch's own layer norm and attention (tensors in, a tensor out)."""
    F = torch.nn.functional
    d = x.shape[-1]
    h = F.layer_norm(x, (d,), p["ln1_gamma"], p["ln1_beta"], 1e-5)
    q, k, v = (h @ p["w_qkv"] + p["b_qkv"]).chunk(3, dim=-1)
    q, k, v = (t.unflatten(-1, (n_head, -1)).transpose(-3, -2) for t in (q, k, v))
    a = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(-3, -2).flatten(-2)
    x = x + a @ p["w_out"] + p["b_out"]
    h = F.layer_norm(x, (d,), p["ln2_gamma"], p["ln2_beta"], 1e-5)
    return x + F.gelu(h @ p["w_fc"] + p["b_fc"], approximate="tanh") @ p["w_proj"] + p["b_proj"]


def has_residuals(block, d_model):
    x = np.random.default_rng(0).normal(size=(6, d_model))
    c = 1e6  # layer norm ignores the size of its input; only the "x +" path keeps it
    return bool(np.allclose(block(c * x) / c, x, atol=1e-3))


def has_residuals_by_norm(block, d_model):
    # for a huge input, what the branches add is tiny next to the input itself
    x = np.random.default_rng(1).normal(size=(2, 5, d_model))
    big = 1e5 * x
    return np.linalg.norm(block(big) - big) < 0.01 * np.linalg.norm(big)


def _ln(x, gamma, beta, *, ddof=0, eps_outside=False):
    mean = x.mean(axis=-1, keepdims=True)
    std = np.sqrt(x.var(axis=-1, keepdims=True, ddof=ddof) + (0.0 if eps_outside else 1e-5))
    return (x - mean) / (std + (1e-5 if eps_outside else 0.0)) * gamma + beta


def _mlp(x, w_fc, b_fc, w_proj, b_proj, *, act=gelu, out_act=False, bias_after=False,
         proj_bias=True, residual=False):
    h = act(x @ w_fc) + b_fc if bias_after else act(x @ w_fc + b_fc)
    out = h @ w_proj + (b_proj if proj_bias else 0)
    if out_act:
        out = gelu(out)
    return x + out if residual else out


def _gelu_erf(x):
    return 0.5 * x * (1 + np.vectorize(math.erf)(x / math.sqrt(2)))


def _attn(h, p, n_head):
    return multi_head_attention(h, p["w_qkv"], p["b_qkv"], p["w_out"], p["b_out"], n_head)


def _mlp_p(h, p):
    return mlp(h, p["w_fc"], p["b_fc"], p["w_proj"], p["b_proj"])


def _block(x, p, n_head, *, attn_res=True, mlp_res=True, post=False):
    ln1, ln2 = (p["ln1_gamma"], p["ln1_beta"]), (p["ln2_gamma"], p["ln2_beta"])
    if post:
        x = layer_norm(x + _attn(x, p, n_head), *ln1)
        return layer_norm(x + _mlp_p(x, p), *ln2)
    a = _attn(layer_norm(x, *ln1), p, n_head)
    x = x + a if attn_res else a
    m = _mlp_p(layer_norm(x, *ln2), p)
    return x + m if mlp_res else m


def _correlated(block, d):  # "the output still looks like the input"
    x = np.random.default_rng(1).normal(size=(5, d))
    return bool(np.corrcoef(block(x).ravel(), x.ravel())[0, 1] > 0.3)


def _grows(block, d):  # "residuals make the stream grow"
    x = np.random.default_rng(1).normal(size=(5, d))
    return bool(block(x).std() >= 0.99 * x.std())


DECLARED = [
    Declared(
        check_layer_norm,
        mistakes=[
            (lambda x, g, b: _ln(x, g, b, ddof=1), "unbiased variance"),
            (lambda x, g, b: _ln(x, g, b, eps_outside=True), "outside the square root"),
            (lambda x, g, b: layer_norm(x, g, b, eps=1e-6), "eps = 1e-06"),
            (lambda x, g, b: layer_norm(x, g, b) - b, "forgets to add beta"),
            (lambda x, g, b: layer_norm(x, b, g), "swaps gamma and beta"),
            (lambda x, g, b: x / np.sqrt(x.var(-1, keepdims=True) + 1e-5) * g + b,
             "does not subtract the mean"),
        ],
        alternatives=[layer_norm, qnp.layer_norm,
                      lambda x, g, b: torch.nn.functional.layer_norm(x, x.shape[-1:], g, b, 1e-5),
                      lambda x, g, b: (x - x.mean(-1, keepdims=True))
                      * (1 / np.sqrt(np.mean((x - x.mean(-1, keepdims=True)) ** 2, -1,
                                             keepdims=True) + 1e-5)) * g + b],
    ),
    Declared(
        check_gelu,
        mistakes=[
            (_gelu_erf, "exact GELU"),
            (lambda x: np.maximum(x, 0), "ReLU"),
            (lambda x: x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3))),
             "factor 0.5"),
            (lambda x: 0.5 * x * (1 + np.tanh(np.sqrt(2 * np.pi) * (x + 0.044715 * x**3))),
             "sqrt(2 pi)"),
        ],
        alternatives=[gelu, lambda x: torch.nn.functional.gelu(x, approximate="tanh"),
                      lambda x: x * (0.5 + 0.5 * np.tanh(0.7978845608028654
                                                         * (x + 0.044715 * x * x * x)))],
    ),
    Declared(
        check_mlp,
        mistakes=[
            (lambda *a: _mlp(*a, act=lambda h: np.maximum(h, 0)), "uses a ReLU"),
            (lambda *a: _mlp(*a, act=_gelu_erf), "exact GELU"),
            (lambda *a: _mlp(*a, act=lambda h: h), "no nonlinearity"),
            (lambda *a: _mlp(*a, act=lambda h: h, out_act=True), "to its output"),
            (lambda *a: _mlp(*a, bias_after=True), "adds b_fc after the GELU"),
            (lambda *a: _mlp(*a, proj_bias=False), "leaves out the bias b_proj"),
            (lambda *a: _mlp(*a, residual=True), "belongs to the decoder block"),
        ],
        alternatives=[mlp, qnp.mlp,
                      lambda x, w1, b1, w2, b2: np.einsum(
                          "...f,fd->...d", gelu(np.einsum("...d,df->...f", x, w1) + b1), w2) + b2],
    ),
    Declared(
        check_has_residuals,
        reference=has_residuals,
        mistakes=[
            (lambda block, d: bool(np.allclose(block(np.ones((3, d))), 1, atol=0.5)),
             "HAS residual connections"),
            (lambda block, d: _correlated(block, d), "cannot tell"),
            (lambda block, d: _grows(block, d), "Its weights are large."),
            (lambda block, d: True, "has NO residual connections"),
            (lambda block, d: np.array([True]), "single True or False"),
        ],
        alternatives=[has_residuals, has_residuals_by_norm],
    ),
    Declared(
        check_decoder_block,
        mistakes=[
            (lambda x, p, n: _block(x, p, n, attn_res=False),
             "missing the residual connection around the attention"),
            (lambda x, p, n: _block(x, p, n, mlp_res=False),
             "missing the residual connection around the MLP"),
            (lambda x, p, n: _block(x, p, n, attn_res=False, mlp_res=False),
             "missing both residual connections"),
            (lambda x, p, n: _block(x, p, n, post=True), "post-LN"),
        ],
        alternatives=[decoder_block, qnp.decoder_block, decoder_block_torch],
    ),
]

globals().update(meta_tests(DECLARED))


def test_block_gives_nothing_away():
    seen = []

    def peek(block, d_model):
        seen.append((repr(block), [n for n in dir(block) if not n.startswith("__")]))
        return has_residuals(block, d_model)

    run(check_has_residuals, peek)
    for text, names in seen:
        assert re.fullmatch(r"<decoder block \d, d_model = \d+>", text)
        assert set(names) <= {"_forward", "_text"}


# --- finding 2: composite answers diagnosed by parts --------------------------------------------


def test_finding_2_gelu_constants_are_read_back():
    message, _, _ = run(check_gelu, lambda x: 0.5 * x * (1 + np.tanh(0.79 * (x + 0.044715 * x**3))))
    assert "the constant inside the tanh is 0.79, not sqrt(2/pi) = 0.7978846" in message, message
    message, _, _ = run(check_gelu,
                        lambda x: 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.04 * x**3))))
    assert "the cubic coefficient is 0.04, not 0.044715" in message, message


def test_finding_2_a_wrong_helper_is_named():
    """The learner's block calls its own layer_norm, which uses eps = 1e-3: not a catalogued
    block mistake, so the block is run with the reference layer_norm swapped in."""
    space = {"np": np, "multi_head_attention": multi_head_attention, "mlp": mlp,
             "layer_norm": lambda x, g, b: layer_norm(x, g, b, eps=1e-1)}
    exec(
        "def decoder_block(x, p, n_head):\n"
        "    h = layer_norm(x, p['ln1_gamma'], p['ln1_beta'])\n"
        "    x = x + multi_head_attention(h, p['w_qkv'], p['b_qkv'], p['w_out'], p['b_out'],"
        " n_head)\n"
        "    h = layer_norm(x, p['ln2_gamma'], p['ln2_beta'])\n"
        "    return x + mlp(h, p['w_fc'], p['b_fc'], p['w_proj'], p['b_proj'])\n", space)
    message, _, _ = run(check_decoder_block, space["decoder_block"])
    assert "the part that differs is your layer_norm" in message, message
    assert space["layer_norm"] is not layer_norm  # the learner's own helper is back in place


def test_finding_2_a_wrong_sublayer_is_named():
    def second_residual_from_the_input(x, p, n_head):  # x0 + mlp(ln_2(x1)): not catalogued
        x1 = x + _attn(layer_norm(x, p["ln1_gamma"], p["ln1_beta"]), p, n_head)
        return x1 + 2.0 * _mlp_p(layer_norm(x1, p["ln2_gamma"], p["ln2_beta"]), p)

    message, _, _ = run(check_decoder_block, second_residual_from_the_input)
    assert message.startswith("decoder_block returned wrong values"), message
    assert "ln_2 or the MLP" in message and "is where it differs" in message, message
