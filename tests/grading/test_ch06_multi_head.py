"""Chapter 6's exercises: split and merge heads, multi-head attention (NumPy and torch), the
parameter count of one attention layer.

Besides the meta-tests: the torch exercise takes inputs with requires_grad=True on the GPU when
there is one, and fails an answer that loses the autograd graph (issue 12, finding 5).
"""

import math

import numpy as np
import pytest
import torch
from grading_meta import Declared, meta_tests, run
from test_checkers import comparisons_patched_to_true, failure

import qkv.np as qnp
import qkv.pt as qpt
from qkv.grading import (
    check_merge_heads,
    check_mha_param_count,
    check_multi_head_attention,
    check_multi_head_attention_torch,
    check_split_heads,
)


def softmax(x):
    e = np.exp(x - np.max(x, axis=-1, keepdims=True))
    return e / np.sum(e, axis=-1, keepdims=True)


def split_heads(x, n_head):
    *lead, seq, d_model = x.shape
    return np.swapaxes(x.reshape(*lead, seq, n_head, d_model // n_head), -3, -2)


def merge_heads(x):
    *lead, n_head, seq, d_head = x.shape
    return np.swapaxes(x, -3, -2).reshape(*lead, seq, n_head * d_head)


def _mha(x, w_qkv, b_qkv, w_out, b_out, n_head, *, scale=None, causal=True, out_proj=True,
         merge_transpose=True):
    *lead, seq, d_model = x.shape
    d_head = d_model // n_head
    q, k, v = np.split(x @ w_qkv + b_qkv, 3, axis=-1)

    def heads(t):
        return np.swapaxes(t.reshape(*lead, seq, n_head, d_head), -3, -2)

    q, k, v = heads(q), heads(k), heads(v)
    scores = q @ np.swapaxes(k, -1, -2) / np.sqrt(d_head if scale is None else scale(d_model))
    if causal:
        scores = np.where(np.tril(np.ones((seq, seq), dtype=bool)), scores, -np.inf)
    out = softmax(scores) @ v
    if merge_transpose:
        out = np.swapaxes(out, -3, -2)
    out = out.reshape(*lead, seq, d_model)
    return out @ w_out + b_out if out_proj else out


def multi_head_attention(x, w_qkv, b_qkv, w_out, b_out, n_head):
    return _mha(x, w_qkv, b_qkv, w_out, b_out, n_head)


def mha_head_loop(x, w_qkv, b_qkv, w_out, b_out, n_head):
    """One head at a time with einsum, a large negative number for the mask, float32 kept."""
    d_model = x.shape[-1]
    d_head = d_model // n_head
    seq = x.shape[-2]
    qkv = x @ w_qkv + b_qkv
    outs = []
    for h in range(n_head):
        cols = slice(h * d_head, (h + 1) * d_head)
        q = qkv[..., :d_model][..., cols]
        k = qkv[..., d_model:2 * d_model][..., cols]
        v = qkv[..., 2 * d_model:][..., cols]
        s = np.einsum("...qd,...kd->...qk", q, k) / math.sqrt(d_head)
        s = np.where(np.tri(seq, dtype=bool), s, -1e30)
        outs.append(softmax(s) @ v)
    return np.concatenate(outs, axis=-1) @ w_out + b_out


def mha_param_count(d_model, n_head, bias=True):
    weights = d_model * 3 * d_model + d_model * d_model
    return weights + (3 * d_model + d_model if bias else 0)


def _count(d, h, bias=True, *, per_head=False, no_out=False, no_bias=False):
    if per_head:
        dh = d // h
        return h * 4 * dh * dh + (4 * d if bias else 0)
    n = (3 if no_out else 4) * d * d
    return n + (0 if no_bias or not bias else (3 if no_out else 4) * d)


def _mha_torch(x, w_qkv, b_qkv, w_out, b_out, n_head, *, merge_transpose=True, mask_device=None,
               numpy_out=False, numpy_round_trip=False):
    *lead, seq, d_model = x.shape
    d_head = d_model // n_head
    q, k, v = (x @ w_qkv + b_qkv).split(d_model, dim=-1)

    def heads(t):
        return t.reshape(*lead, seq, n_head, d_head).transpose(-3, -2)

    q, k, v = heads(q), heads(k), heads(v)
    scores = q @ k.transpose(-2, -1) / math.sqrt(d_head)
    mask = torch.ones(seq, seq, dtype=torch.bool, device=mask_device or x.device).tril()
    weights = torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1)
    out = weights @ v
    out = (out.transpose(-3, -2) if merge_transpose else out).reshape(*lead, seq, d_model)
    out = out @ w_out + b_out
    if numpy_round_trip:  # the right numbers, but through NumPy: no graph, not on the GPU
        return torch.from_numpy(out.detach().cpu().numpy()).to(x.device)
    return out.detach().cpu().numpy() if numpy_out else out


def multi_head_attention_torch(x, w_qkv, b_qkv, w_out, b_out, n_head):
    return _mha_torch(x, w_qkv, b_qkv, w_out, b_out, n_head)


def sdpa_torch(x, w_qkv, b_qkv, w_out, b_out, n_head):
    q, k, v = (x @ w_qkv + b_qkv).chunk(3, dim=-1)
    q, k, v = (t.unflatten(-1, (n_head, -1)).transpose(-3, -2) for t in (q, k, v))
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    return out.transpose(-3, -2).flatten(-2) @ w_out + b_out


DECLARED = [
    Declared(
        check_split_heads,
        mistakes=[
            (lambda x, n: x.reshape(*x.shape[:-2], n, x.shape[-2], -1), "reshapes straight"),
            (lambda x, n: np.moveaxis(x.reshape(*x.shape[:-1], -1, n), -1, -3), "one at a time"),
            (lambda x, n: x.reshape(*x.shape[:-1], n, -1), "stops at"),
            (lambda x, n: np.transpose(x.reshape(*x.shape[:-1], n, -1), (0, 2, 1, 3)),
             "no batch axis"),
        ],
        alternatives=[split_heads, qnp.split_heads,
                      lambda x, n: x.unflatten(-1, (n, -1)).transpose(-3, -2),
                      lambda x, n: np.stack(np.split(x, n, axis=-1), axis=-3)],
    ),
    Declared(
        check_merge_heads,
        mistakes=[
            (lambda x: x.reshape(*x.shape[:-3], x.shape[-2], -1), "reshapes straight"),
            (lambda x: np.moveaxis(x, -3, -1).reshape(*x.shape[:-3], x.shape[-2], -1),
             "interleaves"),
        ],
        alternatives=[merge_heads, qnp.merge_heads,
                      lambda x: np.concatenate([x[..., h, :, :] for h in range(x.shape[-3])],
                                               axis=-1)],
    ),
    Declared(
        check_multi_head_attention,
        mistakes=[
            (lambda *a: _mha(*a, scale=lambda d_model: d_model), "sqrt(d_model)"),
            (lambda *a: _mha(*a, scale=lambda d_model: 1.0), "does not scale"),
            (lambda *a: _mha(*a, causal=False), "see the future"),
            (lambda *a: _mha(*a, out_proj=False), "output projection"),
            (lambda *a: _mha(*a, merge_transpose=False), "merges the heads"),
        ],
        alternatives=[multi_head_attention, mha_head_loop, qnp.multi_head_attention],
    ),
    Declared(
        check_mha_param_count,
        mistakes=[
            (lambda d, h, b=True: h * _count(d, h, b), "multiplies by n_head"),
            (lambda d, h, b=True: _count(d, h, b, per_head=True), "d_head x d_head"),
            (lambda d, h, b=True: _count(d, h, b, no_out=True), "output projection"),
            (lambda d, h, b=True: _count(d, h, b, no_bias=True), "leaves out the biases"),
            (lambda d, h, b=True: _count(d, h, True), "although bias=False"),
            (lambda d, h, b=True: _count(d, h, b) + 0.5, "not a whole number"),
        ],
        alternatives=[mha_param_count, lambda d, h, b: float(mha_param_count(d, h, b)),
                      lambda d, h, b: np.int64(4 * d * (d + 1) if b else 4 * d * d)],
    ),
    Declared(
        check_multi_head_attention_torch,
        reference=multi_head_attention_torch,
        mistakes=[
            (lambda *a: _mha_torch(*a, merge_transpose=False), "merges the heads"),
            (lambda *a: _mha_torch(*a, numpy_out=True), "return a tensor"),
            (lambda x, *a: _mha_torch(x.numpy(), *a), "raised"),
            (lambda *a: _mha_torch(*a, numpy_round_trip=True), "without an autograd graph"),
        ],
        alternatives=[multi_head_attention_torch, sdpa_torch, qpt.multi_head_attention],
    ),
]

globals().update(meta_tests(DECLARED))


def test_mismatch_messages_say_what_a_count_is():
    message = failure(check_mha_param_count, lambda d, h, b=True: mha_param_count(d, h, b) + 7)
    assert "not the right count" in message and "624" not in message, message


def test_finding_5_torch_answer_must_keep_its_graph():
    """Issue 12, finding 5: an answer that round-trips through NumPy used to pass."""
    message, _, _ = run(check_multi_head_attention_torch,
                        lambda *a: _mha_torch(*a, numpy_round_trip=True))
    assert message is not None and "without an autograd graph" in message, message


def test_torch_exercise_takes_no_numpy_backend():
    with pytest.raises(ValueError, match="written with torch"):
        check_multi_head_attention_torch(multi_head_attention_torch, backend="numpy")


@pytest.mark.cuda
def test_torch_result_left_on_the_wrong_device_fails():
    def to_cpu(*args):
        return multi_head_attention_torch(*args).cpu()

    assert "returned a tensor on cpu" in failure(check_multi_head_attention_torch, to_cpu)
    message = failure(check_multi_head_attention_torch,
                      lambda *a: _mha_torch(*a, mask_device="cpu"))
    assert "device=x.device" in message, message


def test_allclose_patched_to_true_does_not_pass_a_wrong_answer():
    for check, wrong, phrase in [
            (check_split_heads, lambda x, n: x.reshape(*x.shape[:-2], n, x.shape[-2], -1),
             "reshapes straight"),
            (check_mha_param_count, lambda d, h, b=True: h * _count(d, h, b),
             "multiplies by n_head"),
            (check_multi_head_attention_torch, lambda *a: _mha_torch(*a, merge_transpose=False),
             "merges the heads")]:
        with comparisons_patched_to_true():
            message = failure(check, wrong)
        assert phrase in message, message
