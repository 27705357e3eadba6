"""The checkers of chapters 1, 2, 3 and 6 (tokens, positions, projections, heads).

Same contract as tests/test_checkers.py: a correct learner-style function passes silently on the
visible and hidden cases; the reference library passes; each known mistake, written the way a
learner would, fails with a message that names it; patching ``np.allclose`` does not help a
wrong answer. test_checkers.py runs the hostile functions (not implemented, raising, a lying
``__eq__``) against every checker, and runs the notebooks themselves.
"""


import numpy as np
import pytest
from test_checkers import comparisons_patched_to_true, failure, silent

import qkv.grading as grading
import qkv.np as qnp
from qkv.grading import (
    check_add_positions,
    check_decode,
    check_embed,
    check_encode,
    check_linear,
    check_one_hot,
    check_permutation_equivariance,
    check_positional_encoding,
    check_query_design,
    check_score_table,
    check_similarity_matrix,
    check_soft_lookup,
)

END = "<end>"

# ------------------------------------------------------------------------------------------------
# Correct answers, written the way a learner would
# ------------------------------------------------------------------------------------------------


def encode(text, itos, add_end=False):
    stoi = {s: i for i, s in enumerate(itos)}
    ids = [stoi[ch] for ch in text]
    if add_end:
        ids.append(stoi[END])
    return ids


def decode(ids, itos):
    return "".join(itos[i] for i in ids)


def one_hot(ids, vocab_size):
    return np.eye(vocab_size)[ids]


def embed(token_ids, table):
    return table[token_ids]


def similarity_matrix(table):
    norms = np.linalg.norm(table, axis=1)
    return table @ table.T / np.outer(norms, norms)


def sinusoidal_positional_encoding(seq_len, d_model, base=10000.0):
    p = np.arange(seq_len)[:, None]
    two_i = np.arange(0, d_model, 2)
    angle = p / base ** (two_i / d_model)
    pe = np.zeros((seq_len, d_model))
    pe[:, 0::2] = np.sin(angle)
    pe[:, 1::2] = np.cos(angle)
    return pe


def add_positions(token_ids, table, positions):
    return table[token_ids] + positions[:token_ids.shape[-1]]


def is_permutation_equivariant(f, x, perm):
    return np.allclose(f(x[perm]), f(x)[perm])


def linear(x, w, b=None):
    return x @ w if b is None else x @ w + b


def score_table(x, w_q, w_k):
    return linear(x, w_q) @ np.swapaxes(linear(x, w_k), -1, -2)


def soft_lookup(query, keys, values):
    scores = keys @ query
    e = np.exp(scores - scores.max())
    return (e / e.sum()) @ values


def make_w_q():
    return 3.0 * np.array([[0, 0, 1], [1, 0, 0], [0, 1, 0], [0, 0, 0]])


CORRECT = [
    (check_encode, encode),
    (check_decode, decode),
    (check_one_hot, one_hot),
    (check_embed, embed),
    (check_similarity_matrix, similarity_matrix),
    (check_positional_encoding, sinusoidal_positional_encoding),
    (check_add_positions, add_positions),
    (check_permutation_equivariance, is_permutation_equivariant),
    (check_linear, linear),
    (check_score_table, score_table),
    (check_soft_lookup, soft_lookup),
    (check_query_design, make_w_q),
]
CHECKERS = [check for check, _ in CORRECT]


def test_registry_is_complete():
    # the checkers still in qkv.grading.checks_tokens; migrated chapters test theirs in
    # tests/grading
    names = {check.__name__ for check in CHECKERS}
    modules = ("qkv.grading.checks_tokens",)
    assert {n for n in grading.__all__ if getattr(grading, n).__module__ in modules} == names


@pytest.mark.parametrize("check, fn", CORRECT, ids=[c.__name__ for c in CHECKERS])
def test_correct_answer_passes_silently(check, fn):
    with silent():
        check(fn)
        check(fn, hidden=True)


@pytest.mark.parametrize("check, fn", [
    (check_embed, qnp.embed),
    (check_positional_encoding, qnp.sinusoidal_positional_encoding),
    (check_linear, qnp.linear),
], ids=["embed", "positional_encoding", "linear"])
def test_reference_library_passes(check, fn):
    with silent():
        check(fn)
        check(fn, hidden=True)


def test_other_correct_forms_pass():
    def encode_index(text, itos, add_end=False):  # list.index, an array out
        return np.array([itos.index(c) for c in text] + ([0] if add_end else []), dtype=int)

    def pe_exp(seq_len, d_model, base=10000.0):  # the log-space form many write
        pe = np.empty((seq_len, d_model))
        freq = np.exp(-np.log(base) * np.arange(0, d_model, 2) / d_model)
        pe[:, 0::2] = np.sin(np.arange(seq_len)[:, None] * freq)
        pe[:, 1::2] = np.cos(np.arange(seq_len)[:, None] * freq)
        return pe

    def one_hot_loop(ids, vocab_size):
        out = np.zeros(ids.shape + (vocab_size,))
        for index in np.ndindex(ids.shape):
            out[index + (ids[index],)] = 1.0
        return out

    with silent():
        for check, fn in [(check_encode, encode_index), (check_positional_encoding, pe_exp),
                          (check_one_hot, one_hot_loop),
                          (check_embed, lambda ids, t: one_hot(ids, len(t)) @ t),
                          (check_query_design, lambda: (2 * make_w_q()).tolist()),
                          (check_permutation_equivariance,
                           lambda f, x, p: bool(np.abs(f(x[p]) - f(x)[p]).max() < 1e-9))]:
            check(fn)
            check(fn, hidden=True)


# ------------------------------------------------------------------------------------------------
# Every known mistake fails, and the message names it
# ------------------------------------------------------------------------------------------------


def _encode(text, itos, add_end=False, *, shift=0, end="append", end_id=0, own_vocab=False):
    vocab = [END] + sorted(set(text)) if own_vocab else itos
    ids = [vocab.index(c) + shift for c in text]
    if end == "append" and add_end or end == "always":
        ids.append(end_id)
    if end == "prepend" and add_end:
        ids.insert(0, end_id)
    return ids


def _pe(seq_len, d_model, base=10000.0, *, swap=False, two=2, cos_plus_one=False, start=0,
        ignore_base=False, halves=False, multiply=False):
    base = 10000.0 if ignore_base else base
    i = np.arange(d_model // 2)
    p = np.arange(seq_len)[:, None] + start
    div = base ** (two * i / d_model)
    s = np.sin(p * div if multiply else p / div)
    c = np.cos(p / base ** ((2 * i + 1) / d_model) if cos_plus_one else p * div if multiply
               else p / div)
    if swap:
        s, c = c, s
    if halves:
        return np.concatenate([s, c], axis=1)
    pe = np.zeros((seq_len, d_model))
    pe[:, 0::2], pe[:, 1::2] = s, c
    return pe


def _pe_precedence(seq_len, d_model, base=10000.0):
    i = np.arange(d_model // 2)
    angle = np.arange(seq_len)[:, None] / base ** 2 * i / d_model
    pe = np.zeros((seq_len, d_model))
    pe[:, 0::2], pe[:, 1::2] = np.sin(angle), np.cos(angle)
    return pe


def _soft(q, k, v, *, scale=1.0, hard=False, keys=False):
    if hard:
        return v[np.argmax(k @ q)]
    s = k @ q / scale
    w = np.exp(s) / np.exp(s).sum()
    return w @ (k if keys else v)


MISTAKES = [
    # encode
    (check_encode, lambda t, i, a=False: _encode(t, i, a, shift=-1), "one too small"),
    (check_encode, lambda t, i, a=False: _encode(t, i, a, end="never"),
     "does not append the end token"),
    (check_encode, lambda t, i, a=False: _encode(t, i, a, end="always"), "even when add_end=False"),
    (check_encode, lambda t, i, a=False: _encode(t, i, a, end="prepend"),
     "puts the end token first"),
    (check_encode, lambda t, i, a=False: _encode(t, i, a, end_id=len(i) - 1),
     "gives the end token the id"),
    (check_encode, lambda t, i, a=False: _encode(t, i, a, own_vocab=True),
     "builds its own vocabulary"),
    (check_encode, lambda t, i, a=False: [ord(c) for c in t] + ([0] if a else []), "ord(ch)"),
    (check_encode, lambda t, i, a=False: list(t), "every entry must be a token id"),
    (check_encode, lambda t, i, a=False: None, "forget `return`"),
    # decode
    (check_decode, lambda ids, itos: " ".join(itos[i] for i in ids), "puts a space between"),
    (check_decode, lambda ids, itos: "".join(itos[i] for i in ids if i != 0),
     "drops the end token"),
    (check_decode, lambda ids, itos: "".join(itos[i - 1] for i in ids), "off by one"),
    (check_decode, lambda ids, itos: [itos[i] for i in ids], "join the pieces"),
    # one-hot
    (check_one_hot, lambda ids, v: np.eye(v)[ids].T, "transposed"),
    (check_one_hot, lambda ids, v: np.eye(v, dtype=int)[ids], "floating-point"),
    (check_one_hot, lambda ids, v: np.eye(v)[(ids + 1) % v], "one column too far"),
    # embed
    (check_embed, lambda ids, t: t.T[ids], "picks COLUMNS"),
    (check_embed, lambda ids, t: t[:, ids].T, "picks COLUMNS"),
    (check_embed, lambda ids, t: t[ids - 1], "off by one"),
    # similarity
    (check_similarity_matrix, lambda t: t @ t.T, "without dividing by the lengths"),
    (check_similarity_matrix,
     lambda t: t @ t.T / np.linalg.norm(t, axis=1)[:, None], "by one length only"),
    (check_similarity_matrix,
     lambda t: t @ t.T / np.outer(np.linalg.norm(t, axis=1) ** 2, np.linalg.norm(t, axis=1) ** 2),
     "squared lengths"),
    (check_similarity_matrix, lambda t: np.corrcoef(t), "np.corrcoef"),
    (check_similarity_matrix, lambda t: t.T @ t, "expected shape"),
    # positional encoding
    (check_positional_encoding, lambda s, d, b=10000.0: _pe(s, d, b, swap=True),
     "cosine in the even columns"),
    (check_positional_encoding, lambda s, d, b=10000.0: _pe(s, d, b, two=1),
     "exponent i/d_model"),
    (check_positional_encoding, lambda s, d, b=10000.0: _pe(s, d, b, two=4), "4i/d_model"),
    (check_positional_encoding, lambda s, d, b=10000.0: _pe(s, d, b, cos_plus_one=True),
     "(2i+1)/d_model"),
    (check_positional_encoding, lambda s, d, b=10000.0: _pe(s, d, b, start=1),
     "numbers the positions from 1"),
    (check_positional_encoding, lambda s, d, b=10000.0: _pe(s, d, b, ignore_base=True),
     "ignores its base argument"),
    (check_positional_encoding, lambda s, d, b=10000.0: _pe(s, d, b, halves=True),
     "first half of the columns"),
    (check_positional_encoding, lambda s, d, b=10000.0: _pe(s, d, b, multiply=True),
     "multiplies the position"),
    (check_positional_encoding, _pe_precedence, "operator-precedence"),
    # token + position
    (check_add_positions, lambda ids, t, p: t[ids] + p[ids], "by token id"),
    (check_add_positions, lambda ids, t, p: t[ids], "does not add the position vectors"),
    (check_add_positions, lambda ids, t, p: t[ids] + p[1:ids.shape[-1] + 1],
     "starts the positions at 1"),
    (check_add_positions, lambda ids, t, p: t[ids] + p[:len(ids)], "len(token_ids)"),
    # permutation equivariance
    (check_permutation_equivariance, lambda f, x, p: np.allclose(f(x[p]), f(x)),
     "with f(x) itself"),
    (check_permutation_equivariance, lambda f, x, p: np.allclose(f(x[p]), f(x)[np.argsort(p)]),
     "shuffles the wrong way"),
    (check_permutation_equivariance, lambda f, x, p: np.allclose(f(x[p])[p], f(x)),
     "shuffles the wrong way"),
    (check_permutation_equivariance, lambda f, x, p: bool((f(x[p]) == f(x)[p]).all()),
     "compares the floats exactly"),
    (check_permutation_equivariance, lambda f, x, p: np.isclose(f(x[p]), f(x)[p]),
     "single True or False"),
    (check_permutation_equivariance, lambda f, x, p: True, "expected False"),
    # linear
    (check_linear, lambda x, w, b=None: x @ w.T + (0 if b is None else b), "w transposed"),
    (check_linear, lambda x, w, b=None: x @ w, "leaves out the bias"),
    (check_linear, lambda x, w, b=None: (x + b) @ w if b is not None else x @ w,
     "before multiplying"),
    (check_linear, lambda x, w, b=None: x @ w + b, "b is None here"),
    # score table
    (check_score_table, lambda x, wq, wk: score_table(x, wq, wk) / np.sqrt(wq.shape[1]),
     "chapter 4 adds the scaling"),
    (check_score_table, lambda x, wq, wk: score_table(x, wk, wq), "transposed"),
    (check_score_table, lambda x, wq, wk: x @ np.swapaxes(x, -1, -2), "x @ x^T"),
    (check_score_table, lambda x, wq, wk: (x @ wq) @ (x @ wk).T, "np.swapaxes(K, -1, -2)"),
    # soft lookup
    (check_soft_lookup, lambda q, k, v: _soft(q, k, v, scale=np.sqrt(len(q))), "chapter 4 adds it"),
    (check_soft_lookup, lambda q, k, v: _soft(q, k, v, hard=True), "hard lookup"),
    (check_soft_lookup, lambda q, k, v: (k @ q) @ v, "raw scores"),
    (check_soft_lookup, lambda q, k, v: _soft(q, k, v, keys=True), "blends the keys"),
    (check_soft_lookup, lambda q, k, v: v.mean(axis=0), "averages all the values equally"),
    # hand-picked W_Q
    (check_query_design, lambda: 2.0 * np.array([[1, 0, 0], [0, 1, 0], [0, 0, 1], [0, 0, 0]]),
     "looks mostly at itself"),
    (check_query_design, lambda: 0.25 * make_w_q(), "not enough"),
    (check_query_design, lambda: make_w_q().T, "transposed"),
    (check_query_design, lambda: 3.0 * np.array([[0, 1, 0], [1, 0, 0], [0, 1, 0], [0, 0, 0]]),
     "Row 0 of W_Q (the 'person' feature)"),
    (check_query_design, lambda: 3.0 * np.array([[0, 0, 0], [2, 0, -1], [0, 1, 0], [0, 0, 1]]),
     "'her' (a person) should look at 'welcomes'"),
]


@pytest.mark.parametrize("check, wrong, phrase", MISTAKES,
                         ids=[f"{c.__name__}-{p}" for c, _, p in MISTAKES])
def test_mistake_fails_and_is_named(check, wrong, phrase):
    message = failure(check, wrong)
    assert phrase in message, message


def test_wrong_flag_with_no_named_mistake_explains_the_case():
    message = failure(check_permutation_equivariance, lambda f, x, p: True)
    assert "returned True for f = attention with sinusoidal positions added" in message, message
    assert "symmetry is broken" in message, message


def test_mismatch_messages_show_values():
    message = failure(check_encode, lambda t, i, a=False: encode(t, i, a)[:-1] or [9])
    assert "expected [4, 3, 5, 5, 6]" in message and "ids instead of" in message, message
    message = failure(check_decode, lambda ids, itos: decode(ids, itos).upper())
    assert "returned 'HELLO'" in message and "expected 'hello'" in message, message


def test_input_list_changed_in_place_fails():
    def greedy(text, itos, add_end=False):
        itos.append("?")
        return encode(text, itos[:-1], add_end)

    assert "changed its input itos (a list)" in failure(check_encode, greedy)


# ------------------------------------------------------------------------------------------------
# Hostile outputs and functions that raise
# ------------------------------------------------------------------------------------------------


PATCH_PROOF = [m for m in MISTAKES if m[2] in (
    "one too small", "puts a space between", "cosine in the even columns", "by token id",
    "compares the floats exactly", "w transposed", "hard lookup", "looks mostly at itself",
    )]


@pytest.mark.parametrize("check, wrong, phrase", PATCH_PROOF,
                         ids=[f"{c.__name__}-{p}" for c, _, p in PATCH_PROOF])
def test_allclose_patched_to_true_does_not_pass_a_wrong_answer(check, wrong, phrase):
    with comparisons_patched_to_true():
        message = failure(check, wrong)
    assert phrase in message, message
