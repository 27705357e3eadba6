"""Chapter 5's exercises: the causal mask, masked attention, next-token targets, cross-entropy.

Besides the meta-tests: an exception in the learner's code is reported with its own message and
the input shapes, and nothing unrelated (issue 12, finding 8).
"""

import math

import numpy as np
import torch
from grading_meta import Declared, meta_tests, run

import qkv.np as qnp
from qkv.grading import check_attention, check_causal_mask, check_cross_entropy, check_shift_targets


def softmax(x):
    e = np.exp(x - np.max(x, axis=-1, keepdims=True))
    return e / np.sum(e, axis=-1, keepdims=True)


def _unstable_softmax(x):
    e = np.exp(x)
    return e / e.sum(axis=-1, keepdims=True)


def causal_mask(seq):
    return np.tril(np.ones((seq, seq), dtype=bool))


def causal_mask_loops(seq):
    mask = np.zeros((seq, seq), dtype=bool)
    for i in range(seq):
        for j in range(i + 1):
            mask[i, j] = True
    return mask


def attention(q, k, v, mask=None):
    scores = q @ np.swapaxes(k, -1, -2) / np.sqrt(q.shape[-1])
    if mask is not None:
        scores = np.where(mask, scores, -np.inf)
    row_max = np.max(scores, axis=-1, keepdims=True)
    e = np.exp(scores - np.where(np.isneginf(row_max), 0.0, row_max))
    total = np.sum(e, axis=-1, keepdims=True)
    return e / np.where(total == 0, 1.0, total) @ v


def attention_einsum_masked_assignment(q, k, v, mask=None):
    """einsum, a large negative number written by masked assignment, rows fully masked zeroed."""
    scores = np.einsum("...qd,...kd->...qk", q, k) / math.sqrt(q.shape[-1])
    if mask is not None:
        mask = np.broadcast_to(mask, scores.shape)
        scores = scores.copy()
        scores[~mask] = -1e30
    weights = softmax(scores)
    if mask is not None:
        weights = np.where(mask.any(axis=-1, keepdims=True), weights, 0.0)
    return np.einsum("...qk,...kd->...qd", weights, v)


def attention_torch(q, k, v, mask=None):
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    weights = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # fully masked rows: nan -> 0
    return weights @ v


def _attention_with(q, k, v, mask=None, *, scale=None, how="before", guard=True):
    scores = q @ np.swapaxes(k, -1, -2) / (np.sqrt(q.shape[-1]) if scale is None else scale)
    if mask is not None and how == "before":
        scores = np.where(mask, scores, -np.inf)
    if mask is not None and how == "transposed":
        scores = np.where(np.swapaxes(mask, -1, -2), scores, -np.inf)
    if mask is not None and how == "-1e9":
        scores = np.where(mask, scores, -1e9)
    weights = qnp.softmax(scores) if guard else softmax(scores)
    if mask is not None and how == "after":
        weights = weights * mask
    return weights @ v


def make_targets(ids):
    return ids[:-1], ids[1:]


def cross_entropy(logits, targets):
    m = logits.max(axis=-1, keepdims=True)
    logp = logits - m - np.log(np.exp(logits - m).sum(axis=-1, keepdims=True))
    return -np.take_along_axis(logp, targets[..., None], axis=-1).mean()


def cross_entropy_rows(logits, targets):
    """Flatten the leading axes, index one entry per row, float32 kept."""
    flat, t = logits.reshape(-1, logits.shape[-1]), targets.reshape(-1)
    lse = np.logaddexp.reduce(flat, axis=-1)
    return np.mean(lse - flat[np.arange(len(t)), t])


def _ce(logits, targets, *, stable=True, reduce=np.mean, sign=-1.0):
    p = softmax(logits) if stable else _unstable_softmax(logits)
    return sign * reduce(np.log(np.take_along_axis(p, targets[..., None], axis=-1)))


DECLARED = [
    Declared(
        check_causal_mask,
        mistakes=[
            (lambda s: np.triu(np.ones((s, s), dtype=bool)), "see the future"),
            (lambda s: np.tril(np.ones((s, s), dtype=bool), 1), "one step into the future"),
            (lambda s: ~np.tril(np.ones((s, s), dtype=bool)), "blocked positions"),
            (lambda s: np.tril(np.ones((s, s), dtype=bool), -1), "blocks the diagonal"),
            (lambda s: np.tril(np.ones((s, s))), "must be boolean"),
        ],
        alternatives=[causal_mask, causal_mask_loops,
                      lambda s: np.arange(s)[None, :] <= np.arange(s)[:, None],
                      lambda s: torch.ones(s, s, dtype=torch.bool).tril()],
    ),
    Declared(
        check_attention,
        mistakes=[
            (lambda q, k, v, m=None: _attention_with(q, k, v, m, scale=1.0), "does not scale"),
            (lambda q, k, v, m=None: _attention_with(q, k, v, m, how="after"),
             "masks after the softmax"),
            (lambda q, k, v, m=None: _attention_with(q, k, v, m, how="transposed"),
             "mask transposed"),
            (lambda q, k, v, m=None: _attention_with(q, k, v, m, how="ignored"),
             "ignores the mask"),
            (lambda q, k, v, m=None: _attention_with(q, k, v, m, guard=False),
             "fully masked row"),
            (lambda q, k, v, m=None: _attention_with(q, k, v, m, how="-1e9"),
             "average of all values"),
            (lambda q, k, v, m=None: _attention_with(q, k, v, None if m is None else ~m),
             "treats True in the mask as 'blocked'"),
        ],
        alternatives=[attention, attention_einsum_masked_assignment, attention_torch],
    ),
    Declared(
        check_shift_targets,
        mistakes=[
            (lambda ids: (ids, ids), "not shifted by one"),
            (lambda ids: (ids[:-1], ids[:-1]), "not shifted by one"),
            (lambda ids: (ids[1:], ids[:-1]), "shifted the wrong way"),
            (lambda ids: (ids, np.roll(ids, -1)), "np.roll"),
            (lambda ids: (ids[:-1].astype(float), ids[1:].astype(float)), "must stay integers"),
            (lambda ids: ids[1:], "should return two arrays"),
        ],
        alternatives=[make_targets, lambda ids: (ids[:len(ids) - 1].copy(), ids[1:].copy()),
                      lambda ids: (np.array([ids[i] for i in range(len(ids) - 1)]),
                                   np.array([ids[i + 1] for i in range(len(ids) - 1)]))],
    ),
    Declared(
        check_cross_entropy,
        mistakes=[
            (lambda l, t: _ce(l, t, stable=False), "not numerically stable"),
            (lambda l, t: _ce(l, t), "takes the log of the softmax"),
            (lambda l, t: _ce(l, t, reduce=np.sum), "sums the losses"),
            (lambda l, t: _ce(l, t, sign=1.0), "minus sign"),
            (lambda l, t: -np.mean(np.log(softmax(l))), "every vocabulary entry"),
            (lambda l, t: _ce(l, t) / np.log(2), "log base 2"),
        ],
        alternatives=[cross_entropy, cross_entropy_rows,
                      lambda l, t: torch.nn.functional.cross_entropy(
                          l.reshape(-1, l.shape[-1]), t.reshape(-1))],
    ),
]

globals().update(meta_tests(DECLARED))


def test_finding_8_an_exception_says_only_what_happened():
    """Issue 12, finding 8: `k.T` on batched arrays raises; the message gives the exception and
    the input shapes, not the case's note about fully masked rows."""
    def attention_k_t(q, k, v, mask=None):
        scores = q @ k.T / np.sqrt(q.shape[-1])
        if mask is not None:
            scores = np.where(mask, scores, -np.inf)
        return qnp.softmax(scores) @ v

    message, _, _ = run(check_attention, attention_k_t, backend="numpy")
    assert message.startswith("attention raised ValueError"), message
    assert "q of shape (2, 4, 8)" in message, message
    assert "mask[0, 1]" not in message and "zeros" not in message, message


def test_finding_2_nan_is_named_before_anything_else():
    """Issue 12 (NaN or inf first): an unguarded softmax on a fully masked row gives nan; the
    message says so first, then names the mistake."""
    message, _, _ = run(check_attention, lambda q, k, v, m=None: _attention_with(
        q, k, v, m, guard=False))
    assert message.startswith("attention returned nan at index"), message
    assert "fully masked row" in message, message
