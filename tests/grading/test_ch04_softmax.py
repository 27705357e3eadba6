"""Chapter 4's exercises: softmax, attention scores, softmax with a temperature."""

import numpy as np
import torch
from grading_meta import Declared, meta_tests

import qkv.np as qnp
from qkv.grading import check_attention_scores, check_softmax, check_softmax_temperature


def softmax(x):
    e = np.exp(x - np.max(x, axis=-1, keepdims=True))
    return e / np.sum(e, axis=-1, keepdims=True)


def softmax_loops(x):
    """Row by row with Python loops over every leading axis, float32 kept as float32."""
    out = np.empty_like(x)
    for idx in np.ndindex(x.shape[:-1]):
        row = x[idx]
        e = np.exp(row - row.max())
        out[idx] = e / e.sum()
    return out


def softmax_torch(x):
    return torch.softmax(x, dim=-1)


def _unstable(x):
    e = np.exp(x)
    return e / e.sum(axis=-1, keepdims=True)


def _scores(q, k, divide_by):
    return q @ np.swapaxes(k, -1, -2) / divide_by


DECLARED = [
    Declared(
        check_softmax,
        mistakes=[
            (_unstable, "not numerically stable"),
            (lambda x: qnp.softmax(x, axis=0), "instead of the last axis"),
            (lambda x: np.exp(x - x.max()) / np.exp(x - x.max()).sum(), "whole array"),
            (lambda x: np.exp(x - x.max()) / np.exp(x - x.max()).sum(-1, keepdims=True),
             "maximum of the whole array"),
            (lambda x: x / x.sum(-1, keepdims=True), "forgot the exponential"),
            (lambda x: np.log(softmax(x)), "log-probabilities"),
        ],
        alternatives=[softmax, softmax_loops, softmax_torch,
                      lambda x: np.exp(x - np.logaddexp.reduce(x, axis=-1, keepdims=True))],
    ),
    Declared(
        check_attention_scores,
        mistakes=[
            (lambda q, k: _scores(q, k, 1.0), "does not scale"),
            (lambda q, k: _scores(q, k, q.shape[-1]), "instead of by its square"),
            (lambda q, k: _scores(q, k, np.sqrt(len(q))), "len(q)"),
            (lambda q, k: _scores(q, k, np.sqrt(q.shape[-1] * (q.shape[-3] if q.ndim == 4
                                                               else 1))), "sqrt(d_model)"),
            (lambda q, k: k @ np.swapaxes(q, -1, -2) / np.sqrt(q.shape[-1]), "k q^T"),
        ],
        alternatives=[
            lambda q, k: np.einsum("...qd,...kd->...qk", q, k) / np.sqrt(q.shape[-1]),
            lambda q, k: np.matmul(q / np.sqrt(q.shape[-1]), np.swapaxes(k, -1, -2)),
            lambda q, k: q @ k.transpose(-2, -1) / q.shape[-1] ** 0.5,  # torch tensors
        ],
    ),
    Declared(
        check_softmax_temperature,
        mistakes=[
            (lambda x, t: softmax(x * t), "multiplies the logits"),
            (lambda x, t: softmax(x), "ignores the temperature"),
            (lambda x, t: softmax(x) / t, "after the softmax"),
            (lambda x, t: _unstable(x / t), "not numerically stable"),
        ],
        alternatives=[lambda x, t: softmax(x / t), lambda x, t: softmax_loops(x * (1.0 / t)),
                      lambda x, t: torch.softmax(x / t, dim=-1)],
    ),
]

globals().update(meta_tests(DECLARED))
