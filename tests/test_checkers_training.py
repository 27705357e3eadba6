"""The checkers of chapters 10 and 11 (training and generation).

Same contract as tests/test_checkers.py: a correct learner-style function passes silently on the
visible and hidden cases (in several correct forms); each known mistake, written the way a learner
would, fails with a message that names it; patching ``np.allclose`` does not help a wrong
answer. The AdamW checker's reference is compared with torch.optim.AdamW itself.
test_checkers.py runs the hostile functions (not implemented, raising, a lying ``__eq__``)
against every checker, and runs the notebooks.
"""

import numpy as np
import pytest
from test_checkers import Liar, comparisons_patched_to_true, failure, silent

import qkv.grading as grading
import qkv.grading.checks_training as ct
import qkv.np as qnp
from qkv.grading import (
    check_greedy_decode,
    check_kv_attention_step,
    check_temperature_probs,
    check_top_k,
    check_top_p,
)

# ------------------------------------------------------------------------------------------------
# Correct answers, written the way a learner would
# ------------------------------------------------------------------------------------------------


def make_batch(ids, batch_size, context, rng):
    starts = rng.integers(0, len(ids) - context, size=batch_size)
    x = np.stack([ids[s:s + context] for s in starts])
    y = np.stack([ids[s + 1:s + context + 1] for s in starts])
    return x, y


def adamw_step(params, grads, m, v, t, lr, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.01):
    new_p, new_m, new_v = {}, {}, {}
    for k, p in params.items():
        g = grads[k]
        new_m[k] = beta1 * m[k] + (1 - beta1) * g
        new_v[k] = beta2 * v[k] + (1 - beta2) * g**2
        m_hat = new_m[k] / (1 - beta1**t)
        v_hat = new_v[k] / (1 - beta2**t)
        if p.ndim >= 2:
            p = p * (1 - lr * weight_decay)
        new_p[k] = p - lr * m_hat / (np.sqrt(v_hat) + eps)
    return new_p, new_m, new_v


def train_loop(loss_and_grads, params, ids, steps, batch_size, context, lr, seed,
               batcher=make_batch, stepper=adamw_step):
    rng = np.random.default_rng(seed)
    m = {k: np.zeros_like(p) for k, p in params.items()}
    v = {k: np.zeros_like(p) for k, p in params.items()}
    losses = []
    for step in range(steps):
        x, y = batcher(ids, batch_size, context, rng)
        loss, grads = loss_and_grads(params, x, y)
        params, m, v = stepper(params, grads, m, v, step + 1, lr)
        losses.append(loss)
    return params, losses


def probs_with_temperature(logits, temperature):
    if temperature == 0:
        out = np.zeros_like(logits)
        np.put_along_axis(out, np.argmax(logits, axis=-1)[..., None], 1.0, axis=-1)
        return out
    z = logits / temperature
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def top_k_filter(logits, k):
    if k >= logits.shape[-1]:
        return logits.copy()
    kth = np.sort(logits, axis=-1)[..., -k][..., None]
    return np.where(logits >= kth, logits, -np.inf)


def _probs(logits):
    e = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def top_p_filter(logits, p):
    probs = _probs(logits)
    order = np.argsort(-probs, axis=-1)
    sorted_probs = np.take_along_axis(probs, order, axis=-1)
    keep = np.zeros(logits.shape, dtype=bool)
    np.put_along_axis(keep, order, np.cumsum(sorted_probs, axis=-1) - sorted_probs < p, axis=-1)
    return np.where(keep, logits, -np.inf)


def greedy_decode(next_logits, prompt_ids, max_new_tokens, eos_id):
    ids = list(prompt_ids)
    for _ in range(max_new_tokens):
        token = int(np.argmax(next_logits(ids)))
        ids.append(token)
        if token == eos_id:
            break
    return ids


def cached_attention_step(x_new, w_q, w_k, w_v, k_cache, v_cache):
    q, k, v = x_new @ w_q, x_new @ w_k, x_new @ w_v
    k_cache = np.concatenate([k_cache, k[None]], axis=0)
    v_cache = np.concatenate([v_cache, v[None]], axis=0)
    w = _probs(k_cache @ q / np.sqrt(len(q)))
    return w @ v_cache, k_cache, v_cache


CORRECT = [
    (check_temperature_probs, probs_with_temperature),
    (check_top_k, top_k_filter),
    (check_top_p, top_p_filter),
    (check_greedy_decode, greedy_decode),
    (check_kv_attention_step, cached_attention_step),
]
CHECKERS = [check for check, _ in CORRECT]


def test_registry_is_complete():
    names = {n for n in grading.__all__
             if getattr(grading, n).__module__ == "qkv.grading.checks_training"}
    assert names == {check.__name__ for check in CHECKERS}


@pytest.mark.parametrize("check, fn", CORRECT, ids=[c.__name__ for c in CHECKERS])
def test_correct_answer_passes_silently(check, fn):
    with silent():
        check(fn)
        check(fn, hidden=True)


def make_batch_fancy(ids, batch_size, context, rng):  # one fancy index, rng.choice for starts
    starts = rng.choice(len(ids) - context, size=batch_size)
    window = ids[starts[:, None] + np.arange(context + 1)]
    return window[:, :-1], window[:, 1:]


def make_batch_torch_style(ids, batch_size, context, rng):  # int32 arrays, a Python loop
    xs, ys = [], []
    for _ in range(batch_size):
        s = int(rng.integers(len(ids) - context))
        xs.append(ids[s:s + context])
        ys.append(ids[s + 1:s + context + 1])
    return np.array(xs, dtype=np.int32), np.array(ys, dtype=np.int32)


def adamw_inplace_copies(params, grads, m, v, t, lr, beta1=0.9, beta2=0.999, eps=1e-8,
                         weight_decay=0.01):  # copies first, then in-place arithmetic
    params = {k: p.copy() for k, p in params.items()}
    m = {k: a.copy() for k, a in m.items()}
    v = {k: a.copy() for k, a in v.items()}
    for k in params:
        m[k] *= beta1
        m[k] += (1 - beta1) * grads[k]
        v[k] *= beta2
        v[k] += (1 - beta2) * grads[k] ** 2
        if params[k].ndim > 1:
            params[k] *= 1 - lr * weight_decay
        params[k] -= lr * (m[k] / (1 - beta1**t)) / (np.sqrt(v[k] / (1 - beta2**t)) + eps)
    return params, m, v


def top_k_argsort(logits, k):
    idx = np.argsort(logits, axis=-1)[..., -k:]
    out = np.full_like(logits, -np.inf)
    np.put_along_axis(out, idx, np.take_along_axis(logits, idx, axis=-1), axis=-1)
    return out


def top_p_loop(logits, p):  # one row at a time, any number of leading axes
    flat = logits.reshape(-1, logits.shape[-1])
    out = np.full_like(flat, -np.inf)
    for r, row in enumerate(flat):
        probs = _probs(row)
        total = 0.0
        for i in np.argsort(-probs):
            out[r, i] = row[i]
            total += probs[i]
            if total >= p:
                break
    return out.reshape(logits.shape)


def greedy_array(next_logits, prompt_ids, max_new_tokens, eos_id):  # returns an array
    ids = np.array(prompt_ids)
    for _ in range(max_new_tokens):
        token = np.argmax(next_logits(ids))
        ids = np.append(ids, token)
        if token == eos_id:
            break
    return ids


def kv_vstack(x_new, w_q, w_k, w_v, k_cache, v_cache):
    q = x_new @ w_q
    keys = np.vstack([k_cache, x_new @ w_k])
    values = np.vstack([v_cache, x_new @ w_v])
    return _probs(keys @ q / np.sqrt(w_q.shape[1])) @ values, keys, values


def loop_with_state_dicts(loss_and_grads, params, ids, steps, batch_size, context, lr, seed):
    rng = np.random.default_rng(seed)
    state = {"m": {k: 0 * p for k, p in params.items()}, "v": {k: 0 * p for k, p in params.items()}}
    history = np.zeros(steps)
    for t in range(1, steps + 1):
        x, y = make_batch_fancy(ids, batch_size, context, rng)
        loss, grads = loss_and_grads(params, x, y)
        params, state["m"], state["v"] = adamw_step(params, grads, state["m"], state["v"], t, lr)
        history[t - 1] = loss
    return params, history


@pytest.mark.parametrize("check, fn", [
    (check_top_k, top_k_argsort),
    (check_top_k, qnp.filter_top_k),
    (check_top_p, top_p_loop),
    (check_top_p, qnp.filter_top_p),
    (check_greedy_decode, greedy_array),
    (check_kv_attention_step, kv_vstack),
], ids=["top-k-argsort", "qkv top-k", "top-p-loop", "qkv top-p", "greedy-array", "kv-vstack"])
def test_other_correct_forms_pass(check, fn):
    with silent():
        check(fn)
        check(fn, hidden=True)


# ------------------------------------------------------------------------------------------------
# Known mistakes, written the way a learner would
# ------------------------------------------------------------------------------------------------


def _batch(shift=1, high=0, same_target=False, separate=False, swap=False, global_rng=False,
           every=False):
    def fn(ids, batch_size, context, rng):
        n = len(ids) - context + high
        if global_rng:
            starts = np.random.randint(0, n, size=batch_size)
        else:
            starts = rng.integers(0, n, size=batch_size)
        y_starts = rng.integers(0, n, size=batch_size) if separate else starts
        x = np.stack([ids[s:s + context] for s in starts])
        if same_target:
            y = x.copy()
        else:
            y = np.stack([ids[s + shift:s + shift + context] for s in y_starts])
        return (x.T, y.T) if swap else (x, y)
    return fn


def _adam(**kw):
    return lambda *a: ct._adamw_variant(*a, **kw)


def _loop(same_batch=False, lose_update=False, return_start=False, bad_losses=False,
          skip_last=False, lr_scale=1.0, new_rng=False, extra=0):
    def fn(loss_and_grads, params, ids, steps, batch_size, context, lr, seed):
        start = params
        rng = np.random.default_rng(seed)
        m = {k: np.zeros_like(p) for k, p in params.items()}
        v = {k: np.zeros_like(p) for k, p in params.items()}
        losses = []
        fixed = make_batch(ids, batch_size, context, np.random.default_rng(seed))
        for step in range(steps + extra):
            if new_rng:
                rng = np.random.default_rng(seed)
            x, y = fixed if same_batch else make_batch(ids, batch_size, context, rng)
            loss, grads = loss_and_grads(params, x, y)
            new, m, v = adamw_step(params, grads, m, v, step + 1, lr * lr_scale)
            if not lose_update and not (skip_last and step == steps - 1):
                params = new
            losses.append(loss * 2 if bad_losses else loss)
        return (start if return_start else params), losses
    return fn


def _temp(x, t):
    return _probs(x / t) if t else _probs(x)


def _topk(k_shift=0, fill=-np.inf, smallest=False, probs=False, flat=False):
    def fn(logits, k):
        k = k + k_shift
        if flat:
            kth = np.sort(logits, axis=None)[-k]
            return np.where(logits >= kth, logits, fill)
        order = np.argsort(logits if smallest else -logits, axis=-1)[..., :k]
        keep = np.zeros(logits.shape, dtype=bool)
        np.put_along_axis(keep, order, True, axis=-1)
        out = np.where(keep, logits, fill)
        return _probs(out) if probs else out
    return fn


def _topp(rule="before", use_logits=False, fill=-np.inf, ascending=False):
    def fn(logits, p):
        probs = logits if use_logits else _probs(logits)
        order = np.argsort(probs if ascending else -probs, axis=-1)
        s = np.take_along_axis(probs, order, axis=-1)
        cum = np.cumsum(s, axis=-1)
        keep_sorted = cum - s < p if rule == "before" else cum <= p
        keep = np.zeros(logits.shape, dtype=bool)
        np.put_along_axis(keep, order, keep_sorted, axis=-1)
        return np.where(keep, logits, fill)
    return fn


def _greedy(include_eos=True, stop=True, only_new=False, extra=0, last_only=False,
            alias=False):
    def fn(next_logits, prompt_ids, max_new_tokens, eos_id):
        ids = prompt_ids if alias else list(prompt_ids)
        new = []
        for _ in range(max_new_tokens + extra):
            token = int(np.argmax(next_logits(ids[-1:] if last_only else ids)))
            if stop and token == eos_id:
                if include_eos:
                    ids.append(token)
                    new.append(token)
                break
            ids.append(token)
            new.append(token)
        return new if only_new else ids
    return fn


def _kv(**kw):
    return lambda *a: ct._kv_step(*a, **kw)


MISTAKES = [
    # probs_with_temperature
    (check_temperature_probs, lambda x, t: _probs(x / t), "divides by the temperature when it"),
    (check_temperature_probs, _temp, "returns plain softmax(logits) at temperature 0"),
    (check_temperature_probs, lambda x, t: _probs(x * t) if t else probs_with_temperature(x, 0),
     "multiplies the logits by the temperature"),
    (check_temperature_probs,
     lambda x, t: probs_with_temperature(-x, 0) if t == 0 else probs_with_temperature(x, t),
     "SMALLEST logit"),
    (check_temperature_probs,
     lambda x, t: np.exp(x / t) / np.exp(x / t).sum(-1, keepdims=True) if t
     else probs_with_temperature(x, 0), "not numerically stable"),
    # top_k_filter
    (check_top_k, _topk(k_shift=1), "keeps 4 logits for k = 3"),
    (check_top_k, _topk(k_shift=-1), "keeps 2 logits for k = 3"),
    (check_top_k, _topk(smallest=True), "k SMALLEST"),
    (check_top_k, _topk(fill=0.0), "sets the other logits to 0"),
    (check_top_k, _topk(fill=-1e9), "large negative number"),
    (check_top_k, _topk(probs=True), "returns probabilities"),
    (check_top_k, _topk(flat=True), "whole array"),
    # top_p_filter
    (check_top_p, _topp(rule="cum"), "drops the token that takes the running total past p"),
    (check_top_p, _topp(use_logits=True), "adds up the logits"),
    (check_top_p, _topp(ascending=True), "least to most likely"),
    (check_top_p, _topp(fill=0.0), "sets the other logits to 0"),
    # greedy_decode
    (check_greedy_decode, _greedy(stop=False), "does not stop at the end token"),
    (check_greedy_decode, _greedy(include_eos=False), "leaves it out"),
    (check_greedy_decode, _greedy(only_new=True), "returns only the new tokens"),
    (check_greedy_decode, _greedy(extra=1), "one token too many"),
    (check_greedy_decode, _greedy(extra=-1), "one token too few"),
    (check_greedy_decode, _greedy(last_only=True), "passes only the last token"),
    (check_greedy_decode, _greedy(alias=True), "changed its input prompt_ids (a list)"),
    # cached_attention_step
    (check_kv_attention_step, _kv(attend="cache"), "attends over the OLD cache only"),
    (check_kv_attention_step, _kv(update=False), "returns the caches it was given"),
    (check_kv_attention_step, _kv(append="front"), "at the FRONT of the cache"),
    (check_kv_attention_step, _kv(divide_by=1.0), "does not scale the scores"),
    (check_kv_attention_step, _kv(causal_softmax=False), "normalise the attention weights"),
]


@pytest.mark.parametrize("check, wrong, phrase", MISTAKES,
                         ids=[f"{c.__name__}-{p}" for c, _, p in MISTAKES])
def test_mistake_fails_and_is_named(check, wrong, phrase):
    message = failure(check, wrong)
    assert phrase in message, message


def test_changing_the_inputs_in_place_fails():
    def top_k_in_place(logits, k):
        logits[logits < np.sort(logits, axis=-1)[..., -k][..., None]] = -np.inf
        return logits

    assert "changed its input logits in place" in failure(check_top_k, top_k_in_place)


def test_the_full_sequence_check_catches_a_step_that_looks_right_alone():
    calls = []

    def forgets_after_the_first(x_new, w_q, w_k, w_v, k_cache, v_cache):
        calls.append(1)
        out, k2, v2 = cached_attention_step(x_new, w_q, w_k, w_v, k_cache, v_cache)
        if len(k_cache) == 0 and len(calls) > 10:  # inside the unrolled run: keep a stale cache
            return out, k2[:0], v2[:0]
        return out, k2, v2

    message = failure(check_kv_attention_step, forgets_after_the_first)
    assert "one by one from empty caches" in message, message


# ------------------------------------------------------------------------------------------------
# Hostile outputs and functions that raise
# ------------------------------------------------------------------------------------------------


def test_lying_parts_fail():
    message = failure(check_kv_attention_step, lambda *a: (Liar(), Liar(), Liar()))
    assert "returned out as a Liar" in message, message


PATCH_PROOF = [m for m in MISTAKES if m[2] in (
    "multiplies the logits by the temperature", "k SMALLEST", "adds up the logits",
    "leaves it out", "does not scale the scores")]


@pytest.mark.parametrize("check, wrong, phrase", PATCH_PROOF,
                         ids=[f"{c.__name__}-{p}" for c, _, p in PATCH_PROOF])
def test_allclose_patched_to_true_does_not_pass_a_wrong_answer(check, wrong, phrase):
    with comparisons_patched_to_true():
        message = failure(check, wrong)
    assert phrase in message, message
