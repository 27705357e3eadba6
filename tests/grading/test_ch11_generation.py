"""Chapter 11's exercises: temperature, top-k, top-p, greedy decoding, a KV-cached step."""

import numpy as np
from grading_meta import Declared, meta_tests
from test_checkers import Liar, comparisons_patched_to_true, failure

import qkv.grading.exercises.ch11_generation as ch11
import qkv.np as qnp
from qkv.grading import (
    check_greedy_decode,
    check_kv_attention_step,
    check_temperature_probs,
    check_top_k,
    check_top_p,
)


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



def probs_with_temperature_where(logits, temperature):
    """np.where instead of an if, float32 kept; a large negative row max guard."""
    if temperature == 0:
        return (logits == logits.max(axis=-1, keepdims=True)).astype(logits.dtype)
    z = logits / temperature
    z = z - np.where(np.isfinite(z), z, -1e30).max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def greedy_while(next_logits, prompt_ids, max_new_tokens, eos_id):
    ids, new = list(prompt_ids), 0
    while new < max_new_tokens:
        ids = ids + [int(next_logits(np.array(ids)).argmax())]
        new += 1
        if ids[-1] == eos_id:
            return ids
    return ids


def kv_einsum(x_new, w_q, w_k, w_v, k_cache, v_cache):
    q = np.einsum("d,dh->h", x_new, w_q)
    keys = np.concatenate([k_cache, np.einsum("d,dh->h", x_new, w_k)[None]])
    values = np.concatenate([v_cache, np.einsum("d,dh->h", x_new, w_v)[None]])
    s = np.einsum("th,h->t", keys, q) / np.sqrt(q.shape[0])
    w = np.exp(s - s.max())
    return np.einsum("t,th->h", w / w.sum(), values), keys, values


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
    return lambda *a: ch11._kv_step(*a, **kw)


DECLARED = [
    Declared(check_temperature_probs, mistakes=[
            (lambda x, t: _probs(x / t), "divides by the temperature when it"),
            (_temp, "returns plain softmax(logits) at temperature 0"),
            (lambda x, t: _probs(x * t) if t else probs_with_temperature(x, 0),
             "multiplies the logits by the temperature"),
            (lambda x, t: probs_with_temperature(-x, 0) if t == 0
             else probs_with_temperature(x, t),
             "SMALLEST logit"),
            (lambda x, t: np.exp(x / t) / np.exp(x / t).sum(-1, keepdims=True) if t
             else probs_with_temperature(x, 0), "not numerically stable"),
    ], alternatives=[probs_with_temperature, probs_with_temperature_where]),
    Declared(check_top_k, mistakes=[
            (_topk(k_shift=1), "keeps 4 logits for k = 3"),
            (_topk(k_shift=-1), "keeps 2 logits for k = 3"),
            (_topk(smallest=True), "k SMALLEST"),
            (_topk(fill=0.0), "sets the other logits to 0"),
            (_topk(fill=-1e9), "large negative number"),
            (_topk(probs=True), "returns probabilities"),
            (_topk(flat=True), "whole array"),
    ], alternatives=[top_k_filter, top_k_argsort, qnp.filter_top_k]),
    Declared(check_top_p, mistakes=[
            (_topp(rule="cum"), "drops the token that takes the running total past p"),
            (_topp(use_logits=True), "adds up the logits"),
            (_topp(ascending=True), "least to most likely"),
            (_topp(fill=0.0), "sets the other logits to 0"),
    ], alternatives=[top_p_filter, top_p_loop, qnp.filter_top_p]),
    Declared(check_greedy_decode, mistakes=[
            (_greedy(stop=False), "does not stop at the end token"),
            (_greedy(include_eos=False), "leaves it out"),
            (_greedy(only_new=True), "returns only the new tokens"),
            (_greedy(extra=1), "one token too many"),
            (_greedy(extra=-1), "one token too few"),
            (_greedy(last_only=True), "passes only the last token"),
            (_greedy(alias=True), "changed its input prompt_ids (a list)"),
    ], alternatives=[greedy_decode, greedy_array, greedy_while]),
    Declared(check_kv_attention_step, mistakes=[
            (_kv(attend="cache"), "attends over the OLD cache only"),
            (_kv(update=False), "returns the caches it was given"),
            (_kv(append="front"), "at the FRONT of the cache"),
            (_kv(divide_by=1.0), "does not scale the scores"),
            (_kv(causal_softmax=False), "normalise the attention weights"),
    ], alternatives=[cached_attention_step, kv_vstack, kv_einsum]),
]

globals().update(meta_tests(DECLARED))


def test_changing_the_logits_in_place_fails():
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



def test_lying_parts_fail():
    message = failure(check_kv_attention_step, lambda *a: (Liar(), Liar(), Liar()))
    assert "returned out as a Liar" in message, message


def test_allclose_patched_to_true_does_not_pass_a_wrong_answer():
    for check, wrong, phrase in [
            (check_temperature_probs,
             lambda x, t: np.exp(x * t) / np.exp(x * t).sum(-1, keepdims=True) if t
             else probs_with_temperature(x, 0), "multiplies the logits by the temperature"),
            (check_top_k, _topk(smallest=True), "k SMALLEST"),
            (check_top_p, _topp(use_logits=True), "adds up the logits"),
            (check_greedy_decode, _greedy(include_eos=False), "leaves it out"),
            (check_kv_attention_step, _kv(divide_by=1.0), "does not scale the scores")]:
        with comparisons_patched_to_true():
            message = failure(check, wrong)
        assert phrase in message, message
