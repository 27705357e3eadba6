"""Chapter 15's exercises: one online-softmax step, the streaming softmax, tiled attention.

The mistakes are written the way a learner writes them (loops, in-place updates), not with the
catalogue's own helpers; the alternatives are correct answers written differently.
"""

import math

import numpy as np
from grading_meta import Declared, meta_tests, run

from qkv.grading import check_flash_attention, check_online_step, check_streaming_softmax

# --- (a) online_step --------------------------------------------------------------------------


def online_step(m, l, s):
    m_new = np.maximum(m, s.max(axis=-1))
    shift = np.where(m_new == -np.inf, 0.0, m_new)
    return m_new, l * np.exp(m - shift) + np.exp(s - shift[..., None]).sum(axis=-1)


def online_step_loops(m, l, s):
    """Row by row, with math.exp and an explicit first-block case."""
    m_new, l_new = np.empty_like(m), np.empty_like(l)
    for i in np.ndindex(m.shape):
        row_max = max(float(m[i]), float(s[i].max()))
        m_new[i] = row_max
        if row_max == -math.inf:
            l_new[i] = 0.0
            continue
        old = 0.0 if m[i] == -math.inf else l[i] * math.exp(m[i] - row_max)
        l_new[i] = old + sum(math.exp(x - row_max) for x in s[i])
    return m_new, l_new


def online_step_logaddexp(m, l, s):
    """Through log-sum-exp: log(l_new) + m_new = logaddexp(log(l) + m, logsumexp(s))."""
    m_new = np.maximum(m, s.max(axis=-1))
    with np.errstate(divide="ignore"):
        lse = np.logaddexp(np.log(l) + m, np.logaddexp.reduce(s, axis=-1))
    shift = np.where(np.isneginf(m_new), 0.0, m_new)
    return m_new, np.where(np.isneginf(lse), 0.0, np.exp(lse - shift))


def _step_no_rescale(m, l, s):
    m_new = np.maximum(m, s.max(axis=-1))
    shift = np.where(m_new == -np.inf, 0.0, m_new)
    return m_new, l + np.exp(s - shift[..., None]).sum(axis=-1)


def _step_inverted(m, l, s):
    m_new = np.maximum(m, s.max(axis=-1))
    shift = np.where(m_new == -np.inf, 0.0, m_new)
    return m_new, l * np.exp(shift - m) + np.exp(s - shift[..., None]).sum(axis=-1)


def _step_raw_exp(m, l, s):
    """exp(s - m_new) rewritten as exp(s) * exp(-m_new): equal on paper, inf * 0 in floats."""
    m_new = np.maximum(m, s.max(axis=-1))
    shift = np.where(m_new == -np.inf, 0.0, m_new)
    return m_new, l * np.exp(m - shift) + np.exp(s).sum(axis=-1) * np.exp(-shift)


def _step_unguarded(m, l, s):
    m_new = np.maximum(m, s.max(axis=-1))
    return m_new, l * np.exp(m - m_new) + np.exp(s - m_new[..., None]).sum(axis=-1)


# --- (b) streaming_softmax ----------------------------------------------------------------------


def streaming_softmax(x, block):
    m = np.full(x.shape[:-1], -np.inf)
    l = np.zeros(x.shape[:-1])
    for start in range(0, x.shape[-1], block):
        m, l = online_step(m, l, x[..., start:start + block])
    shift = np.where(np.isneginf(m), 0.0, m)[..., None]
    total = np.where(l == 0, 1.0, l)[..., None]
    return np.concatenate([np.exp(x[..., i:i + block] - shift) / total
                           for i in range(0, x.shape[-1], block)], axis=-1)


def streaming_softmax_rows(x, block):
    """One row at a time with Python floats, writing into a float32/float64 output like x."""
    out = np.zeros_like(x)
    for i in np.ndindex(x.shape[:-1]):
        m, l = -math.inf, 0.0
        for start in range(0, x.shape[-1], block):
            chunk = x[i][start:start + block]
            new = max(m, float(chunk.max()))
            if new == -math.inf:
                continue
            l = (l * math.exp(m - new) if m > -math.inf else 0.0) + float(np.exp(chunk - new).sum())
            m = new
        if l > 0:
            out[i] = np.exp(x[i] - m) / l
    return out


def _streaming_one_pass(x, block):
    out = np.zeros_like(x)
    m = np.full(x.shape[:-1], -np.inf)
    l = np.zeros(x.shape[:-1])
    for start in range(0, x.shape[-1], block):
        m, l = online_step(m, l, x[..., start:start + block])
        out[..., start:start + block] = np.exp(x[..., start:start + block] - m[..., None]) / l[
            ..., None]
    return out


def _streaming_no_rescale(x, block):
    m = np.full(x.shape[:-1], -np.inf)
    l = np.zeros(x.shape[:-1])
    for start in range(0, x.shape[-1], block):
        m, l = _step_no_rescale(m, l, x[..., start:start + block])
    return np.exp(x - m[..., None]) / l[..., None]


def _streaming_kept_exps(x, block):
    """Keeps the first pass's exps (against the max so far), divides them by the final sum."""
    m = np.full(x.shape[:-1], -np.inf)
    l = np.zeros(x.shape[:-1])
    parts = []
    for start in range(0, x.shape[-1], block):
        m, l = online_step(m, l, x[..., start:start + block])
        shift = np.where(np.isneginf(m), 0, m)[..., None]
        parts.append(np.exp(x[..., start:start + block] - shift))
    return np.concatenate(parts, axis=-1) / np.where(l == 0, 1.0, l)[..., None]


def _streaming_unguarded(x, block):
    m = np.full(x.shape[:-1], -np.inf)
    l = np.zeros(x.shape[:-1])
    for start in range(0, x.shape[-1], block):
        m, l = online_step(m, l, x[..., start:start + block])
    return np.exp(x - m[..., None]) / l[..., None]


def _softmax_no_max(x, block):
    e = np.exp(x)
    return e / e.sum(axis=-1, keepdims=True)


def _softmax_each_block(x, block):
    parts = []
    for start in range(0, x.shape[-1], block):
        e = np.exp(x[..., start:start + block] - x[..., start:start + block].max(-1, keepdims=True))
        parts.append(e / e.sum(-1, keepdims=True))
    return np.concatenate(parts, axis=-1)


# --- (c) flash_attention ------------------------------------------------------------------------


def flash_attention(q, k, v, causal, block_q, block_k, *, rescale_l=True, rescale_acc=True,
                    divide_once=True, stop=0, mask=True, local=False, diagonal=False,
                    keep_max=True, use_max=True, walk="position", aligned_only=False,
                    inverted=False, scale="sqrt"):
    """A learner's tiled forward; the keywords switch on one mistake each."""
    seq, d = q.shape[-2:]
    out = np.zeros(np.broadcast_shapes(q.shape, v.shape))
    for qs in range(0, seq, block_q):
        qe = min(qs + block_q, seq)
        scores_q = q[..., qs:qe, :] / (np.sqrt(d) if scale == "sqrt" else d)
        m = np.full(scores_q.shape[:-1], -np.inf)
        l = np.zeros(scores_q.shape[:-1])
        acc = np.zeros(scores_q.shape[:-1] + (v.shape[-1],))
        last = {"position": qe + stop, "before": qs}.get(walk) if causal else seq
        if walk == "tile index" and causal:  # key tiles 0..i for query tile i
            starts = [j * block_k for j in range(qs // block_q + 1) if j * block_k < seq]
        else:
            starts = range(0, last, block_k)
        for ks in starts:
            ke = min(ks + block_k, seq)
            s = scores_q @ np.swapaxes(k[..., ks:ke, :], -1, -2)
            if causal and mask and (ks == qs or not aligned_only):
                rows, cols = (np.arange(qe - qs), np.arange(ke - ks)) if local else (
                    np.arange(qs, qe), np.arange(ks, ke))
                allowed = (cols[None, :] < rows[:, None] if diagonal
                           else cols[None, :] >= rows[:, None] if inverted
                           else cols[None, :] <= rows[:, None])
                s = np.where(allowed, s, -np.inf)
            m_new = np.maximum(m, s.max(-1)) if use_max else np.zeros_like(m)
            alpha = np.exp(m - m_new)  # every row here sees key 0, so m_new is finite
            p = np.exp(s - m_new[..., None])
            l = (alpha if rescale_l else 1.0) * l + p.sum(-1)
            if rescale_acc:
                acc = acc * alpha[..., None]
            acc = acc + (p @ v[..., ks:ke, :]) / (1.0 if divide_once else l[..., None])
            if keep_max:
                m = m_new
        out[..., qs:qe, :] = acc / l[..., None] if divide_once else acc
    return out


def _flash_softmax_per_tile(q, k, v, causal, block_q, block_k):
    """Each tile of keys gets its own softmax; the tiles' outputs are added."""
    seq, d = q.shape[-2:]
    out = np.zeros(np.broadcast_shapes(q.shape, v.shape))
    for qs in range(0, seq, block_q):
        qe = min(qs + block_q, seq)
        for ks in range(0, qe if causal else seq, block_k):
            ke = min(ks + block_k, seq)
            s = q[..., qs:qe, :] @ np.swapaxes(k[..., ks:ke, :], -1, -2) / np.sqrt(d)
            if causal:
                s = np.where(np.arange(ks, ke)[None, :] <= np.arange(qs, qe)[:, None], s, -np.inf)
            e = np.exp(s - s.max(-1, keepdims=True))
            out[..., qs:qe, :] += e / e.sum(-1, keepdims=True) @ v[..., ks:ke, :]
    return out


def flash_attention_einsum(q, k, v, causal, block_q, block_k):
    """einsum, keys walked with a while loop, the causal mask as a large negative number
    outside the allowed region (every row keeps at least key 0)."""
    seq, d = q.shape[-2:]
    out = np.empty(np.broadcast_shapes(q.shape, v.shape), dtype=q.dtype)
    qs = 0
    while qs < seq:
        qe = min(qs + block_q, seq)
        qb = q[..., qs:qe, :]
        m = np.full(qb.shape[:-1], -np.inf, dtype=q.dtype)
        l = np.zeros(qb.shape[:-1], dtype=q.dtype)
        acc = np.zeros(qb.shape[:-1] + (v.shape[-1],), dtype=q.dtype)
        ks = 0
        while ks < (qe if causal else seq):
            ke = min(ks + block_k, seq)
            s = np.einsum("...qd,...kd->...qk", qb, k[..., ks:ke, :]) / math.sqrt(d)
            if causal:
                s = s + np.where(np.arange(ks, ke) > np.arange(qs, qe)[:, None], -1e30, 0.0)
            m_new = np.maximum(m, s.max(-1))
            p = np.exp(s - m_new[..., None])
            alpha = np.exp(m - m_new)
            l = alpha * l + p.sum(-1)
            acc = alpha[..., None] * acc + np.einsum("...qk,...kd->...qd", p, v[..., ks:ke, :])
            m = m_new
            ks = ke
        out[..., qs:qe, :] = acc / l[..., None]
        qs = qe
    return out


def attention_whole(q, k, v, causal, block_q, block_k):
    """Not tiled at all: the task asks for tiles, but the values are the same (and only the
    values are checked)."""
    s = q @ np.swapaxes(k, -1, -2) / np.sqrt(q.shape[-1])
    if causal:
        s = np.where(np.tril(np.ones(s.shape[-2:], dtype=bool)), s, -np.inf)
    e = np.exp(s - s.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True) @ v


DECLARED = [
    Declared(
        check_online_step,
        mistakes=[(_step_no_rescale, "does not rescale the running sum"),
                  (_step_inverted, "exp(m_new - m)"),
                  (_step_unguarded, "seen only -inf"),
                  (_step_raw_exp, "exp of the raw scores"),
                  (lambda m, l, s: online_step(m, l, s)[1], "should return 2 things"),
                  (lambda m, l, s: online_step(m, l, s)[::-1], "the wrong way round"),
                  (lambda m, l, s: (np.maximum(m, s.max(-1)),
                                    np.exp(s - np.maximum(m, s.max(-1))[..., None]).sum(-1)),
                   "drops the old sum")],
        alternatives=[online_step, online_step_loops, online_step_logaddexp],
    ),
    Declared(
        check_streaming_softmax,
        mistakes=[(_streaming_one_pass, "divides each block by the running sum"),
                  (_streaming_no_rescale, "does not rescale the running sum"),
                  (_softmax_each_block, "separate softmax of each block"),
                  (_streaming_kept_exps, "keeps each block's exp(x - m) from the first pass"),
                  (_streaming_unguarded, "a row that is all -inf"),
                  (_softmax_no_max, "exp of the raw scores")],
        alternatives=[streaming_softmax, streaming_softmax_rows],
    ),
    Declared(
        check_flash_attention,
        mistakes=[
            (lambda *a: flash_attention(*a, rescale_l=False), "does not rescale the running sum"),
            (lambda *a: flash_attention(*a, rescale_acc=False),
             "does not rescale the output accumulator"),
            (lambda *a: flash_attention(*a, divide_once=False), "divides by the running sum"),
            (lambda *a: flash_attention(*a, stop=-1), "stops one key too early"),
            (lambda *a: flash_attention(*a, walk="before"), "stops before the diagonal"),
            (lambda *a: flash_attention(*a, walk="tile index"), "counts key tiles like query"),
            (lambda *a: flash_attention(*a, aligned_only=True), "masks only the key tile"),
            (lambda *a: flash_attention(*a, inverted=True), "blocks the past"),
            (lambda *a: flash_attention(*a, scale="d"), "divides q @ k^T by d_head"),
            (lambda *a: flash_attention(*a, mask=False), "does not mask inside"),
            (lambda *a: flash_attention(*a, local=True), "positions inside the tile"),
            (lambda *a: flash_attention(*a, diagonal=True), "blocks the diagonal too"),
            (lambda *a: flash_attention(*a, keep_max=False), "does not keep the new max"),
            (lambda *a: flash_attention(*a, use_max=False), "exp of the raw scores"),
            (_flash_softmax_per_tile, "separate softmax of each tile of keys"),
        ],
        alternatives=[flash_attention, flash_attention_einsum, attention_whole],
    ),
]

globals().update(meta_tests(DECLARED))


def test_hand_worked_step():
    """The chapter's three blocks by hand: x = (1, 3 | 2, 5 | 4, 0), l = 1.13534, 1.20344,
    1.57806 after each block, and log-sum-exp 5.4562 at the end."""
    m, l = np.array([-np.inf]), np.array([0.0])
    seen = []
    for block in ([1.0, 3.0], [2.0, 5.0], [4.0, 0.0]):
        m, l = check_online_step.exercise.reference(m, l, np.array([block]))
        seen.append(round(float(l[0]), 5))
    assert seen == [1.13534, 1.20344, 1.57806]
    assert round(float(m[0] + np.log(l[0])), 4) == 5.4562


def test_off_by_one_is_caught_on_the_visible_case():
    message, _, _ = run(check_flash_attention, lambda *a: flash_attention(*a, stop=-1))
    assert message is not None and "one key too early" in message, message


def test_every_catalogued_mistake_shows_on_a_visible_case():
    """A catalogued mistake that matches the reference on every visible case (or cannot run on
    any of them) could never be named to a learner running the visible tests."""
    from grading_meta import _key, _wrong_on_visible

    for check in (check_online_step, check_streaming_softmax, check_flash_attention):
        ex = check.exercise
        _, found = _wrong_on_visible(ex)
        shown = {_key(mistake.says) for _, mistake, _ in found}
        listed = {_key(mistake.says) for case in ex.visible()
                  for mistake in ex.mistakes(*case.args)}
        assert listed == shown, f"{ex.name}: never shown on a visible case: {listed - shown}"
