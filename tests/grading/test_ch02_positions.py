"""Chapter 2's exercises: the sinusoidal table, token plus position vectors, permutation
equivariance."""

import numpy as np
from grading_meta import Declared, meta_tests
from test_checkers import comparisons_patched_to_true, failure

import qkv.np as qnp
from qkv.grading import (
    check_add_positions,
    check_permutation_equivariance,
    check_positional_encoding,
)


def sinusoidal_positional_encoding(seq_len, d_model, base=10000.0):
    p = np.arange(seq_len)[:, None]
    two_i = np.arange(0, d_model, 2)
    angle = p / base ** (two_i / d_model)
    pe = np.zeros((seq_len, d_model))
    pe[:, 0::2] = np.sin(angle)
    pe[:, 1::2] = np.cos(angle)
    return pe


def pe_exp(seq_len, d_model, base=10000.0):  # the log-space form many write
    pe = np.empty((seq_len, d_model))
    freq = np.exp(-np.log(base) * np.arange(0, d_model, 2) / d_model)
    pe[:, 0::2] = np.sin(np.arange(seq_len)[:, None] * freq)
    pe[:, 1::2] = np.cos(np.arange(seq_len)[:, None] * freq)
    return pe


def pe_loops(seq_len, d_model, base=10000.0):
    pe = np.zeros((seq_len, d_model))
    for pos in range(seq_len):
        for i in range(0, d_model, 2):
            pe[pos, i] = np.sin(pos / base ** (i / d_model))
            pe[pos, i + 1] = np.cos(pos / base ** (i / d_model))
    return pe


def add_positions(token_ids, table, positions):
    return table[token_ids] + positions[:token_ids.shape[-1]]


def is_permutation_equivariant(f, x, perm):
    return np.allclose(f(x[perm]), f(x)[perm])


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


DECLARED = [
    Declared(check_positional_encoding, mistakes=[
            (lambda s, d, b=10000.0: _pe(s, d, b, swap=True),
     "cosine in the even columns"),
            (lambda s, d, b=10000.0: _pe(s, d, b, two=1),
     "exponent i/d_model"),
            (lambda s, d, b=10000.0: _pe(s, d, b, two=4), "4i/d_model"),
            (lambda s, d, b=10000.0: _pe(s, d, b, cos_plus_one=True),
     "(2i+1)/d_model"),
            (lambda s, d, b=10000.0: _pe(s, d, b, start=1),
     "numbers the positions from 1"),
            (lambda s, d, b=10000.0: _pe(s, d, b, ignore_base=True),
     "ignores its base argument"),
            (lambda s, d, b=10000.0: _pe(s, d, b, halves=True),
     "first half of the columns"),
            (lambda s, d, b=10000.0: _pe(s, d, b, multiply=True),
     "multiplies the position"),
            (_pe_precedence, "operator-precedence"),
    ], alternatives=[sinusoidal_positional_encoding, pe_exp, pe_loops,
                     qnp.sinusoidal_positional_encoding]),
    Declared(check_add_positions, mistakes=[
            (lambda ids, t, p: t[ids] + p[ids], "by token id"),
            (lambda ids, t, p: t[ids], "does not add the position vectors"),
            (lambda ids, t, p: t[ids] + p[1:ids.shape[-1] + 1],
     "starts the positions at 1"),
            (lambda ids, t, p: t[ids] + p[:len(ids)], "len(token_ids)"),
    ], alternatives=[add_positions,
                     lambda ids, t, p: np.take(t, ids, axis=0) + p[np.arange(ids.shape[-1])],
                     lambda ids, t, p: np.eye(len(t))[ids] @ t + p[:ids.shape[-1]]]),
    Declared(check_permutation_equivariance, mistakes=[
            (lambda f, x, p: np.allclose(f(x[p]), f(x)),
     "with f(x) itself"),
            (lambda f, x, p: np.allclose(f(x[p]), f(x)[np.argsort(p)]),
     "shuffles the wrong way"),
            (lambda f, x, p: np.allclose(f(x[p])[p], f(x)),
     "shuffles the wrong way"),
            (lambda f, x, p: bool((f(x[p]) == f(x)[p]).all()),
     "compares the floats exactly"),
            (lambda f, x, p: np.isclose(f(x[p]), f(x)[p]),
     "single True or False"),
            (lambda f, x, p: True, "expected False"),
    ], alternatives=[is_permutation_equivariant,
                     lambda f, x, p: bool(np.abs(f(x[p]) - f(x)[p]).max() < 1e-9),
                     lambda f, x, p: np.allclose(f(x[p])[np.argsort(p)], f(x))]),
]

globals().update(meta_tests(DECLARED))


def test_wrong_flag_with_no_named_mistake_explains_the_case():
    message = failure(check_permutation_equivariance, lambda f, x, p: True)
    assert "returned True for f = attention with sinusoidal positions added" in message, message
    assert "symmetry is broken" in message, message


def test_allclose_patched_to_true_does_not_pass_a_wrong_answer():
    with comparisons_patched_to_true():
        assert "cosine in the even columns" in failure(
            check_positional_encoding, lambda s, d, b=10000.0: _pe(s, d, b, swap=True))
        assert "by token id" in failure(check_add_positions, lambda ids, t, p: t[ids] + p[ids])
        assert "compares the floats exactly" in failure(
            check_permutation_equivariance, lambda f, x, p: bool((f(x[p]) == f(x)[p]).all()))
