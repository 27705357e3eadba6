"""Chapter 1's exercises: encode, decode, one-hot, embed, the similarity matrix.

Besides the meta-tests: a similarity matrix whose mistake is not catalogued is diagnosed by
parts, dot products or lengths (issue 12, finding 2).
"""

import numpy as np
import torch
from grading_meta import Declared, meta_tests, run
from test_checkers import comparisons_patched_to_true, failure

import qkv.np as qnp
from qkv.grading import (
    check_decode,
    check_embed,
    check_encode,
    check_one_hot,
    check_similarity_matrix,
)

END = "<end>"


def encode(text, itos, add_end=False):
    stoi = {s: i for i, s in enumerate(itos)}
    ids = [stoi[ch] for ch in text]
    if add_end:
        ids.append(stoi[END])
    return ids


def encode_index(text, itos, add_end=False):  # list.index, an array out
    return np.array([itos.index(c) for c in text] + ([0] if add_end else []), dtype=int)


def decode(ids, itos):
    return "".join(itos[i] for i in ids)


def decode_loop(ids, itos):
    text = ""
    for i in np.asarray(ids).tolist():
        text += itos[i]
    return text


def one_hot(ids, vocab_size):
    return np.eye(vocab_size)[ids]


def one_hot_loop(ids, vocab_size):
    out = np.zeros(ids.shape + (vocab_size,))
    for index in np.ndindex(ids.shape):
        out[index + (ids[index],)] = 1.0
    return out


def embed(token_ids, table):
    return table[token_ids]


def similarity_matrix(table):
    norms = np.linalg.norm(table, axis=1)
    return table @ table.T / np.outer(norms, norms)


def similarity_normalise_first(table):
    unit = table / np.sqrt(np.einsum("vd,vd->v", table, table))[:, None]
    return np.einsum("ud,vd->uv", unit, unit)


def _encode(text, itos, add_end=False, *, shift=0, end="append", end_id=0, own_vocab=False):
    vocab = [END] + sorted(set(text)) if own_vocab else itos
    ids = [vocab.index(c) + shift for c in text]
    if end == "append" and add_end or end == "always":
        ids.append(end_id)
    if end == "prepend" and add_end:
        ids.insert(0, end_id)
    return ids


DECLARED = [
    Declared(check_encode, mistakes=[
            (lambda t, i, a=False: _encode(t, i, a, shift=-1), "one too small"),
            (lambda t, i, a=False: _encode(t, i, a, end="never"),
     "does not append the end token"),
            (lambda t, i, a=False: _encode(t, i, a, end="always"), "even when add_end=False"),
            (lambda t, i, a=False: _encode(t, i, a, end="prepend"),
     "puts the end token first"),
            (lambda t, i, a=False: _encode(t, i, a, end_id=len(i) - 1),
     "gives the end token the id"),
            (lambda t, i, a=False: _encode(t, i, a, own_vocab=True),
     "builds its own vocabulary"),
            (lambda t, i, a=False: [ord(c) for c in t] + ([0] if a else []), "ord(ch)"),
            (lambda t, i, a=False: list(t), "every entry must be a token id"),
            (lambda t, i, a=False: None, "forget `return`"),
    ], alternatives=[encode, encode_index,
                     lambda t, i, a=False: list(map({s: n for n, s in enumerate(i)}.get, t))
                     + ([i.index(END)] if a else [])]),
    Declared(check_decode, mistakes=[
            (lambda ids, itos: " ".join(itos[i] for i in ids), "puts a space between"),
            (lambda ids, itos: "".join(itos[i] for i in ids if i != 0),
     "drops the end token"),
            (lambda ids, itos: "".join(itos[i - 1] for i in ids), "off by one"),
            (lambda ids, itos: [itos[i] for i in ids], "join the pieces"),
    ], alternatives=[decode, decode_loop]),
    Declared(check_one_hot, mistakes=[
            (lambda ids, v: np.eye(v)[ids].T, "transposed"),
            (lambda ids, v: np.eye(v, dtype=int)[ids], "floating-point"),
            (lambda ids, v: np.eye(v)[(ids + 1) % v], "one column too far"),
    ], alternatives=[one_hot, one_hot_loop,
                     lambda ids, v: (ids[..., None] == np.arange(v)).astype(np.float64),
                     lambda ids, v: torch.nn.functional.one_hot(ids.long(), v).double()]),
    Declared(check_embed, mistakes=[
            (lambda ids, t: t.T[ids], "picks COLUMNS"),
            (lambda ids, t: t[:, ids].T, "picks COLUMNS"),
            (lambda ids, t: t[ids - 1], "off by one"),
    ], alternatives=[embed, qnp.embed, lambda ids, t: one_hot(ids, len(t)) @ t,
                     lambda ids, t: np.take(t, ids, axis=0)]),
    Declared(check_similarity_matrix, mistakes=[
            (lambda t: t @ t.T, "without dividing by the lengths"),
            (lambda t: np.corrcoef(t), "np.corrcoef"),
            (lambda t: t.T @ t, "expected shape"),
    ], alternatives=[similarity_matrix, similarity_normalise_first,
                     lambda t: torch.nn.functional.cosine_similarity(
                         t[:, None, :], t[None, :, :], dim=-1)]),
]

globals().update(meta_tests(DECLARED))


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


def test_allclose_patched_to_true_does_not_pass_a_wrong_answer():
    with comparisons_patched_to_true():
        assert "one too small" in failure(check_encode,
                                          lambda t, i, a=False: _encode(t, i, a, shift=-1))
        assert "puts a space between" in failure(
            check_decode, lambda ids, itos: " ".join(itos[i] for i in ids))


def test_finding_2_similarity_is_diagnosed_by_parts():
    """Not catalogued: the right dot products, divided by the largest squared length."""
    def by_the_largest_length(table):
        return table @ table.T / np.max(np.sum(table * table, axis=1))

    message, _, _ = run(check_similarity_matrix, by_the_largest_length)
    assert "right dot products" in message and "other than the two lengths" in message, message
