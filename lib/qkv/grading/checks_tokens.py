"""Checkers of chapters 1, 2, 3 and 6: tokens, positions, projections, heads, parameter counts,
and the torch version of multi-head attention.

Same signature and steps as every checker (see ``engine``); the exercises that return a value
rather than an array (text, token ids, True/False, a count) go through ``engine._run_value``.
"""

import math
from functools import partial

import numpy as np

from . import _trusted as _t
from ._legacy import (
    Case,
    Mistake,
    Spec,
    _attempt,
    _kind_of_object,
    _normal,
    _raised,
    _run,
    _run_value,
    _shape,
    _Shown,
)
from .checks_attention import (
    _mha_cases,
    _mha_mistakes,
)

# --- chapter 1: encode ---------------------------------------------------------------------------

_END = "<end>"


def _vocab(text: str) -> list:
    return [_END] + sorted(set(text))


def _reference_encode(text, itos, add_end=False):
    stoi = {s: i for i, s in enumerate(itos)}
    return [stoi[ch] for ch in text] + ([stoi[_END]] if add_end else [])


def _encode_variant(text, itos, add_end, *, shift=0, end="append", end_id=None, vocab=None,
                    use_ord=False):
    table = vocab if vocab is not None else itos
    stoi = {s: i for i, s in enumerate(table)}
    ids = [ord(ch) if use_ord else stoi[ch] + shift for ch in text]
    eid = stoi[_END] + shift if end_id is None else end_id
    if end == "append" and add_end or end == "always":
        ids = ids + [eid]
    if end == "prepend" and add_end:
        ids = [eid] + ids
    return ids


def _encode_mistakes(text, itos, add_end):
    variant = partial(partial, _encode_variant)
    for shift, word in ((-1, "small"), (1, "large")):
        says = (f"{{name}}'s ids are one too {word}: the id of a character is its position in "
                "itos, and itos[0] is '<end>', so the first character has id 1. Build "
                "stoi = {s: i for i, s in enumerate(itos)} and use stoi[ch].")
        for end_id in (None, 0, len(itos) - 1, len(itos), -1):
            yield Mistake(says, variant(shift=shift, end_id=end_id))
    yield Mistake(
        "{name} does not append the end token when add_end=True: end the list with the id of "
        "'<end>', which is 0.", variant(end="never"))
    yield Mistake(
        "{name} appends the end token even when add_end=False; only add it when add_end is True.",
        variant(end="always"))
    yield Mistake(
        "{name} puts the end token first; it marks the END of the text, so append it.",
        variant(end="prepend"))
    for end_id in (len(itos) - 1, len(itos), -1, 1):
        yield Mistake(
            f"{{name}} gives the end token the id {end_id}; its id is its position in itos, 0.",
            variant(end_id=end_id))
    yield Mistake(
        "{name} builds its own vocabulary from the text it encodes ([<end>] + sorted(set(text))). "
        "Use the itos it is given: ids must mean the same token whatever the text.",
        variant(vocab=_vocab(text)))
    yield Mistake(
        "{name} uses ord(ch), the character's Unicode number; a token id is the character's "
        "position in itos.", variant(use_ord=True))


_HELLO = "hello world"
_BOOK_CORPUS = "the sun is warm.\nthe sea is cold.\nwe swim in the sea at noon.\n"


def _encode_cases(hidden: bool):
    names = ("text", "itos", "add_end")
    if not hidden:
        return [Case(("hello", _vocab(_HELLO), False), names),
                Case(("world", _vocab(_HELLO), True), names,
                     "add_end is True here: the ids end with the end token's id."),
                Case(("we swim.", _vocab(_BOOK_CORPUS), True), names)]
    rng = _t.default_rng(111)
    corpus = "a quick brown fox jumps over the lazy dog!\n"
    shuffled = [_END] + [str(c) for c in rng.permutation(sorted(set(corpus)))]
    return [Case(("", _vocab(_HELLO), True), names, "The text is empty here."),
            Case(("", _vocab(_HELLO), False), names, "The text is empty here."),
            Case(("the lazy fox!\n", shuffled, True), names,
                 "itos is not sorted here: use it as it is given."),
            Case(("dog", shuffled, False), names),
            Case(("sea at noon.\nwe swim", _vocab(_BOOK_CORPUS), False), names)]


def check_encode(encode, hidden: bool = False, backend: str = "auto") -> None:
    """encode(text, itos, add_end=False) -> list of ids, itos[id] == the character.

    itos: the vocabulary, a list with itos[0] == '<end>'; add_end appends the end token's id (0).
    """
    spec = Spec("encode", _reference_encode, _encode_mistakes, out="ids")
    _run_value(spec, encode, _encode_cases(hidden))


# --- chapter 1: decode ---------------------------------------------------------------------------


def _reference_decode(ids, itos):
    return "".join(itos[i] for i in ids)


def _decode_mistakes(ids, itos):
    yield Mistake("{name} puts a space between the tokens: join them with ''.join(...), since "
                  "the spaces are tokens of their own.",
                  lambda ids, itos: " ".join(itos[int(i)] for i in ids))
    yield Mistake("{name} drops the end token; show it as '<end>' (itos[0]) like any other token.",
                  lambda ids, itos: "".join(itos[int(i)] for i in ids if int(i) != 0))
    yield Mistake("{name} stops at the first end token; decode every id, the end token "
                  "included (as '<end>').",
                  lambda ids, itos: "".join(itos[int(i)] for i in ids[:_first_end(ids)]))
    for shift in (-1, 1):
        yield Mistake(f"{{name}} is off by one: it uses itos[id {'-' if shift < 0 else '+'} 1]. "
                      "The string of token id is itos[id].",
                      partial(lambda ids, itos, s: "".join(itos[int(i) + s] for i in ids),
                              s=shift))


def _first_end(ids) -> int:
    ids = [int(i) for i in ids]
    return ids.index(0) if 0 in ids else len(ids)


def _decode_cases(hidden: bool):
    names = ("ids", "itos")
    hw, book = _vocab(_HELLO), _vocab(_BOOK_CORPUS)
    if not hidden:
        return [Case(([4, 3, 5, 5, 6], hw), names),
                Case((_reference_encode("lord hello", hw, True), hw), names,
                     "The last id is the end token."),
                Case((_reference_encode("the sea is cold.\n", book), book), names)]
    rng = _t.default_rng(112)
    middle = _reference_encode("we swim", book, True) + _reference_encode("at noon", book, True)
    return [Case(([], hw), names, "ids is empty here: the text is ''."),
            Case((middle, book), names, "There is an end token in the middle here."),
            Case((rng.integers(1, len(book), size=12), book), names,
                 "ids is a NumPy array here."),
            Case(([0], hw), names)]


def check_decode(decode, hidden: bool = False, backend: str = "auto") -> None:
    """decode(ids, itos) -> text: ''.join(itos[i] for i in ids), the end token shown as <end>."""
    spec = Spec("decode", _reference_decode, _decode_mistakes, out="text")
    _run_value(spec, decode, _decode_cases(hidden))


# --- chapter 1: one-hot ---------------------------------------------------------------------------


def _reference_one_hot(ids, vocab_size):
    return np.eye(vocab_size)[ids]


def _one_hot_mistakes(ids, vocab_size):
    eye = partial(np.eye, vocab_size)
    yield Mistake(
        "{name} is transposed: it should have one ROW per token, shape (..., seq, vocab_size), "
        "with the 1 of token t in column t.",
        lambda ids, v: np.swapaxes(np.eye(v)[ids], -1, -2))
    for shift in (-1, 1):
        yield Mistake(
            f"{{name}} puts the 1 one column too far {'left' if shift < 0 else 'right'}: the row "
            "of token id t has its 1 in column t (counting from 0).",
            partial(lambda ids, v, s: eye()[(ids + s) % v], s=shift))
    yield Mistake("{name} sets every entry to 1; only column ids[i] of row i is 1.",
                  lambda ids, v: np.ones(ids.shape + (v,)))


def _one_hot_cases(hidden: bool):
    names = ("ids", "vocab_size")
    if not hidden:
        rng = _t.default_rng(13)
        return [Case((np.array([4, 3, 5, 5, 6]), 9), names,
                     "vocab_size = 9 is larger than the largest id here: the result has "
                     "vocab_size columns."),
                Case((rng.integers(0, 6, size=6), 6), names),
                Case((rng.integers(0, 7, size=(2, 4)), 7), names,
                     "ids is a batch here, (batch, seq) = (2, 4): the result is "
                     "(batch, seq, vocab_size). np.eye(vocab_size)[ids] works for any shape.")]
    rng = _t.default_rng(113)
    return [Case((np.array([0]), 1), names, "A vocabulary of one token."),
            Case((rng.integers(0, 5, size=(3, 2, 4)).astype(np.int32), 5), names,
                 "ids has shape (3, 2, 4) here (and dtype int32)."),
            Case((np.array([2, 2, 2, 0]), 3), names),
            Case((rng.integers(0, 65, size=20), 65), names)]


def check_one_hot(one_hot, hidden: bool = False, backend: str = "auto") -> None:
    """one_hot(ids, vocab_size) -> float (..., seq, vocab_size) with a single 1 per row."""
    spec = Spec("one_hot", _reference_one_hot, _one_hot_mistakes)
    _run(spec, one_hot, _one_hot_cases(hidden), backend)


# --- chapter 1: embed -----------------------------------------------------------------------------


def _embed_mistakes(token_ids, table):
    yield Mistake(
        "{name} picks COLUMNS of the table (table[:, ids] or table.T[ids]): in this course the "
        "table is (vocab, d_model) and token t is ROW t, table[t].",
        lambda ids, t: t.T[ids])
    yield Mistake("{name} returns the result transposed: (seq, d_model), one row per token.",
                  lambda ids, t: np.swapaxes(t[ids], -1, -2))
    for shift in (-1, 1):
        yield Mistake(f"{{name}} is off by one: it uses row id {'-' if shift < 0 else '+'} 1; "
                      "token t is row t of the table.",
                      partial(lambda ids, t, s: t[(ids + s) % t.shape[0]], s=shift))


def _embed_cases(hidden: bool):
    names = ("token_ids", "table")
    if not hidden:
        rng = _t.default_rng(14)
        return [Case((rng.integers(0, 6, size=4), _normal(rng, 6, 6)), names,
                     "vocab = d_model = 6 here, so a transposed table gives no shape error."),
                Case((np.array([4, 3, 5, 5, 6]), _normal(rng, 9, 4)), names,
                     "The table is (vocab, d_model) = (9, 4): token t is row t."),
                Case((rng.integers(0, 7, size=(2, 3)), _normal(rng, 7, 5)), names,
                     "token_ids is a batch here, (batch, seq) = (2, 3): the result is "
                     "(batch, seq, d_model).")]
    rng = _t.default_rng(114)
    return [Case((np.array([0]), _normal(rng, 3, 2)), names),
            Case((rng.integers(0, 11, size=(2, 2, 3)).astype(np.int32),
                  _normal(rng, 11, 4, dtype=np.float32)), names,
                 "The table is float32 and token_ids int32, of shape (2, 2, 3), here."),
            Case((rng.integers(0, 8, size=8), _normal(rng, 8, 8)), names),
            Case((np.array([2, 2, 1, 2]), _normal(rng, 3, 5)), names)]


def check_embed(embed, hidden: bool = False, backend: str = "auto") -> None:
    """embed(token_ids, table) -> table[token_ids]: (..., seq) ids, (vocab, d_model) table."""
    spec = Spec("embed", _t.ref_embed, _embed_mistakes)
    _run(spec, embed, _embed_cases(hidden), backend)


# --- chapter 1: similarity matrix -----------------------------------------------------------------


def _row_norms(t):
    return np.sqrt(np.sum(t * t, axis=-1))


def _reference_similarity(table):
    n = _row_norms(table)
    return (table @ table.T) / (n[:, None] * n[None, :])


def _similarity_mistakes(table):
    yield Mistake(
        "{name} returns the dot products table @ table.T without dividing by the lengths: the "
        "cosine similarity is a . b / (|a| |b|), so divide entry (u, v) by |E[u]| |E[v]|.",
        lambda t: t @ t.T)
    yield Mistake(
        "{name} divides each row of the dot products by one length only; entry (u, v) is "
        "divided by BOTH lengths, |E[u]| |E[v]| (np.outer(norms, norms)).",
        lambda t: (t @ t.T) / _row_norms(t)[:, None])
    yield Mistake(
        "{name} divides each column of the dot products by one length only; entry (u, v) is "
        "divided by BOTH lengths, |E[u]| |E[v]| (np.outer(norms, norms)).",
        lambda t: (t @ t.T) / _row_norms(t)[None, :])
    yield Mistake(
        "{name} divides by the squared lengths; the length is |a| = sqrt(a . a), e.g. "
        "np.linalg.norm(table, axis=1).",
        lambda t: (t @ t.T) / np.outer(_row_norms(t) ** 2, _row_norms(t) ** 2))
    yield Mistake(
        "{name} uses the lengths of the COLUMNS (axis=0); each token is a row, so take the norm "
        "of every row: np.linalg.norm(table, axis=1).",
        lambda t: (t @ t.T) / np.outer(_row_norms(t.T), _row_norms(t.T)))
    yield Mistake(
        "{name} subtracts each row's mean first (that is the correlation, np.corrcoef); the "
        "cosine similarity uses the vectors as they are.",
        lambda t: _reference_similarity(t - np.mean(t, axis=-1, keepdims=True)))


_TOY_TABLE = np.array([[0.9, 0.0, 0.0, 0.1], [0.9, 0.6, 0.0, 0.1], [1.0, 0.0, 0.1, 0.0],
                       [1.0, 0.6, 0.1, 0.0], [0.0, 0.0, 1.0, 0.0], [0.0, 0.6, 1.0, 0.0],
                       [0.1, 0.0, 0.0, 1.0]])


def _similarity_cases(hidden: bool):
    names = ("table",)
    if not hidden:
        rng = _t.default_rng(15)
        return [Case((_TOY_TABLE.copy(),), names,
                     "This is the chapter's hand-made table (cat, cats, dog, dogs, car, cars, "
                     "pear)."),
                Case((_normal(rng, 5, 8),), names),
                Case((_normal(rng, 4, 4, scale=3.0),), names)]
    rng = _t.default_rng(115)
    scaled = _normal(rng, 6, 3) * np.array([[1.0], [10.0], [0.1], [2.0], [5.0], [1.0]])
    return [Case((_normal(rng, 1, 3),), names, "A vocabulary of one token."),
            Case((scaled,), names, "The rows here have very different lengths."),
            Case((_normal(rng, 6, 6, dtype=np.float32),), names, "The table is float32 here."),
            Case((_normal(rng, 10, 16),), names)]


def check_similarity_matrix(similarity_matrix, hidden: bool = False,
                            backend: str = "auto") -> None:
    """similarity_matrix(table) -> (vocab, vocab) cosine similarities of the table's rows."""
    spec = Spec("similarity_matrix", _reference_similarity, _similarity_mistakes)
    _run(spec, similarity_matrix, _similarity_cases(hidden), backend)


# --- chapter 2: sinusoidal positional encoding ----------------------------------------------------


def _pe_table(angle_sin, angle_cos, *, swap=False, halves=False):
    s, c = np.sin(angle_sin), np.cos(angle_cos)
    if swap:
        s, c = c, s
    if halves:
        return np.concatenate([s, c], axis=-1)
    pe = np.empty((s.shape[0], 2 * s.shape[1]))
    pe[:, 0::2], pe[:, 1::2] = s, c
    return pe


def _pe_variant(seq_len, d_model, base, *, exponent="2i", start=0, base_used=None,
                multiply=False, precedence=None, swap=False, halves=False, transpose=False):
    """The sinusoidal table with one knob turned to a known mistake."""
    p = np.arange(seq_len, dtype=np.float64)[:, None] + start  # (seq_len, 1)
    i = np.arange(d_model // 2, dtype=np.float64)[None, :]  # (1, d_model/2): the pair index
    b = base if base_used is None else base_used
    e_sin = {"2i": 2 * i / d_model, "i": i / d_model, "2j": 4 * i / d_model}.get(exponent)
    e_cos = e_sin
    if exponent == "j+1":  # column index for each column: 2i for the sine, 2i+1 for the cosine
        e_sin, e_cos = 2 * i / d_model, (2 * i + 1) / d_model
    if precedence == "base ** 2*i":
        a_sin = a_cos = p / b**2 * i / d_model
    elif precedence == "base ** two_i":
        a_sin = a_cos = p / b ** (2 * i) / d_model
    elif multiply:
        a_sin, a_cos = p * b**e_sin, p * b**e_cos
    else:
        a_sin, a_cos = p / b**e_sin, p / b**e_cos
    pe = _pe_table(a_sin, a_cos, swap=swap, halves=halves)
    return pe.T if transpose else pe


def _pe_mistakes(seq_len, d_model, base):
    variant = partial(partial, _pe_variant)
    yield Mistake(
        "{name} puts the cosine in the even columns and the sine in the odd ones: "
        "PE[p, 2i] = sin(p / base^(2i/d_model)) and PE[p, 2i+1] = cos(the same angle). "
        "(Row 0 must read 0, 1, 0, 1, ...)",
        variant(swap=True))
    yield Mistake(
        "{name} uses the exponent i/d_model with i the pair index; it is 2i/d_model, so the "
        "frequencies run from 1 (i = 0) down to about 1/base (the last pair).",
        variant(exponent="i"))
    yield Mistake(
        "{name} gives each cosine column 2i+1 the exponent (2i+1)/d_model; a sine and its cosine "
        "share one frequency: both columns 2i and 2i+1 use base^(2i/d_model).",
        variant(exponent="j+1"))
    yield Mistake(
        "{name} uses 2j/d_model with j the column index (0, 2, 4, ...). In 2i/d_model, i counts "
        "column PAIRS (0, 1, 2, ...), so column 2i has the exponent 2i/d_model, not 4i/d_model.",
        variant(exponent="2j"))
    yield Mistake(
        "{name} multiplies the position by base^(2i/d_model); divide it: the angle is "
        "p / base^(2i/d_model), so later column pairs turn more slowly.",
        variant(multiply=True))
    yield Mistake(
        "{name} has an operator-precedence slip: base ** 2*i / d_model means "
        "(base ** 2) * i / d_model. Put the exponent in parentheses: base ** (2*i / d_model).",
        variant(precedence="base ** 2*i"))
    yield Mistake(
        "{name} has an operator-precedence slip: base ** two_i / d_model means "
        "(base ** two_i) / d_model. Put the exponent in parentheses: base ** (two_i / d_model).",
        variant(precedence="base ** two_i"))
    if base != 10000.0:
        yield Mistake(
            f"{{name}} ignores its base argument (here base = {base:g}) and uses 10000; "
            "10000.0 is only the default, use base.",
            variant(base_used=10000.0))
    yield Mistake(
        "{name} puts all the sines in the first half of the columns and all the cosines in the "
        "second half; they alternate: even columns sin, odd columns cos "
        "(pe[:, 0::2] = sin(...), pe[:, 1::2] = cos(...)).",
        variant(halves=True))
    yield Mistake(
        "{name} numbers the positions from 1; the first position is p = 0 (row 0 is "
        "0, 1, 0, 1, ...).",
        variant(start=1))
    yield Mistake(
        "{name} returns the table transposed: the shape is (seq_len, d_model), one row per "
        "position.",
        variant(transpose=True))


def _pe_cases(hidden: bool):
    names = ("seq_len", "d_model", "base")
    if not hidden:
        return [Case((6, 8, 10000.0), names),
                Case((50, 16, 10000.0), names),
                Case((5, 4, 500.0), names, "base = 500 here, not 10000.")]
    return [Case((1, 2, 10000.0), names, "One position and one column pair: [[0, 1]]."),
            Case((128, 64, 10000.0), names),
            Case((8, 8, 10000.0), names),
            Case((10, 6, 10.0), names, "base = 10 here.")]


def check_positional_encoding(sinusoidal_positional_encoding, hidden: bool = False,
                              backend: str = "auto") -> None:
    """sinusoidal_positional_encoding(seq_len, d_model, base) -> (seq_len, d_model), float.

    PE[p, 2i] = sin(p / base^(2i/d_model)), PE[p, 2i+1] = cos(p / base^(2i/d_model)).
    """
    spec = Spec("sinusoidal_positional_encoding", _t.ref_positional_encoding, _pe_mistakes)
    _run(spec, sinusoidal_positional_encoding, _pe_cases(hidden), backend)


# --- chapter 2: token vectors plus position vectors -----------------------------------------------


def _reference_add_positions(token_ids, table, positions):
    return _t.ref_embed(token_ids, table) + positions[:token_ids.shape[-1]]


def _add_positions_mistakes(token_ids, table, positions):
    seq = token_ids.shape[-1]
    yield Mistake(
        "{name} looks the position vectors up by token id (positions[token_ids]); they belong "
        "to the positions 0, 1, ..., seq-1: add positions[:seq] (row p to the token at "
        "position p).",
        lambda ids, t, pos: t[ids] + pos[ids])
    yield Mistake("{name} does not add the position vectors: return table[token_ids] + "
                  "positions[:seq].",
                  lambda ids, t, pos: t[ids])
    yield Mistake("{name} starts the positions at 1 (positions[1:seq+1]); the first token is at "
                  "position 0: positions[:seq].",
                  lambda ids, t, pos: t[ids] + pos[1:seq + 1])
    if token_ids.ndim > 1:
        yield Mistake(
            "{name} takes len(token_ids) positions, which for a batch (batch, seq) is the batch "
            "size; the number of positions is seq = token_ids.shape[-1].",
            lambda ids, t, pos: t[ids] + pos[:len(ids)])
    yield Mistake("{name} subtracts the position vectors; add them: table[token_ids] + "
                  "positions[:seq].",
                  lambda ids, t, pos: t[ids] - pos[:seq])


def _add_positions_cases(hidden: bool):
    names = ("token_ids", "table", "positions")
    note = ("positions has one row per position up to the context length (here {n}), more "
            "than this sequence needs: use its first seq rows.")
    if not hidden:
        rng = _t.default_rng(21)
        return [Case((np.array([2, 0, 1, 2]), _normal(rng, 3, 4),
                      _t.ref_positional_encoding(16, 4)), names, note.format(n=16)),
                Case((rng.integers(0, 7, size=(2, 5)), _normal(rng, 7, 8), _normal(rng, 10, 8)),
                     names, "token_ids is a batch here, (batch, seq) = (2, 5), and positions "
                     "a learned table: every sequence gets positions[:seq], with "
                     "seq = token_ids.shape[-1] (len(token_ids) is the batch size).",
                     on_error="token_ids is a batch here, (batch, seq) = (2, 5): take "
                     "seq = token_ids.shape[-1] positions (len(token_ids) is the batch size).")]
    rng = _t.default_rng(121)
    return [Case((rng.integers(0, 5, size=6), _normal(rng, 5, 6), _normal(rng, 6, 6)), names,
                 "Here seq equals the context length."),
            Case((rng.integers(0, 9, size=(3, 1)).astype(np.int32),
                  _normal(rng, 9, 4, dtype=np.float32),
                  _t.ref_positional_encoding(8, 4).astype(np.float32)), names,
                 "float32 tables and int32 ids of shape (3, 1) here."),
            Case((rng.integers(0, 4, size=(4, 3)), _normal(rng, 4, 2), _normal(rng, 12, 2)),
                 names, "A batch of 4 sequences of 3 tokens.")]


def check_add_positions(add_positions, hidden: bool = False, backend: str = "auto") -> None:
    """add_positions(token_ids, table, positions) = table[token_ids] + positions[:seq].

    token_ids (..., seq); table (vocab, d_model); positions (context, d_model) -> (..., seq,
    d_model).
    """
    spec = Spec("add_positions", _reference_add_positions, _add_positions_mistakes)
    _run(spec, add_positions, _add_positions_cases(hidden), backend)


# --- chapter 2: permutation equivariance ----------------------------------------------------------


def _reference_equivariant(f, x, perm):
    return _t.close(_t.asarray(f(x[perm])), _t.asarray(f(x)[perm]), rtol=1e-5, atol=1e-8)


def _equivariance_mistakes(f, x, perm):
    def close(a, b):
        return _t.close(_t.asarray(a), _t.asarray(b), rtol=1e-5, atol=1e-8)

    yield Mistake(
        "{name} compares f(x[perm]) with f(x) itself. Shuffling the input of an equivariant f "
        "shuffles its output the same way, so compare with the shuffled output: "
        "np.allclose(f(x[perm]), f(x)[perm]).",
        lambda f, x, perm: close(f(x[perm]), f(x)))
    wrong_way = (
        "{name} shuffles the wrong way (it compares f(x[perm]) with f(x)[np.argsort(perm)], or "
        "f(x[perm])[perm] with f(x)): that only works when perm undoes itself, as a swap of two "
        "rows does. Row i of x[perm] is row perm[i] of x, so row i of f(x[perm]) must be row "
        "perm[i] of f(x): compare f(x[perm]) with f(x)[perm].")
    yield Mistake(wrong_way, lambda f, x, perm: close(f(x[perm]), f(x)[np.argsort(perm)]))
    yield Mistake(wrong_way, lambda f, x, perm: close(f(x[perm])[perm], f(x)))
    yield Mistake(
        "{name} compares the floats exactly (== or np.array_equal). Reordering the rows changes "
        "the order of the additions inside f, so equal results can differ in the last digits: "
        "use np.allclose(f(x[perm]), f(x)[perm]).",
        lambda f, x, perm: bool(_t.identical(_t.asarray(f(x[perm])), _t.asarray(f(x)[perm]))))


def _equivariance_functions(rng, d_model: int, seq: int):
    """Functions of x (seq, d_model) built from trusted pieces, each with a plain description."""
    w = _normal(rng, d_model, d_model, scale=1.0 / math.sqrt(d_model))
    w1 = _normal(rng, d_model, 2 * d_model, scale=1.0 / math.sqrt(d_model))
    w2 = _normal(rng, 2 * d_model, d_model, scale=1.0 / math.sqrt(2 * d_model))
    learned = _normal(rng, seq, d_model)
    sinusoid = _t.ref_positional_encoding(seq, d_model)

    def attend(x, causal=False):
        h = x @ w
        return _t.ref_attention(h, h, h, causal=causal)

    ones = np.ones(d_model)
    return {
        "plain": _Shown("attention without positions (queries = keys = values = x @ W)", attend),
        "sinusoid": _Shown("attention with sinusoidal positions added (attention(x + PE))",
                           lambda x: attend(x + sinusoid[:x.shape[0]])),
        "learned": _Shown("attention with learned positions added (attention(x + P))",
                          lambda x: attend(x + learned[:x.shape[0]])),
        "causal": _Shown("causal attention without positions", partial(attend, causal=True)),
        "mlp": _Shown("a feed-forward layer applied to each row (gelu(x @ W1) @ W2)",
                      lambda x: _t.ref_gelu(x @ w1) @ w2),
        "layer_norm": _Shown("layer norm of each row",
                             lambda x: _t.ref_layer_norm(x, ones, 0.0 * ones)),
        "running_mean": _Shown("a running mean over the rows (row i = mean of rows 0..i)",
                               lambda x: np.cumsum(x, axis=0)
                               / np.arange(1, x.shape[0] + 1)[:, None]),
        "reverse": _Shown("reversing the order of the rows", lambda x: x[::-1]),
    }


def _equivariance_cases(hidden: bool):
    names = ("f", "x", "perm")
    if not hidden:
        rng = _t.default_rng(22)
        fs = _equivariance_functions(rng, 8, 6)
        x = _normal(rng, 6, 8)
        perm = np.array([2, 0, 5, 1, 3, 4])
        return [Case((fs["plain"], x, np.arange(6)[::-1].copy()), names,
                     "perm reverses the rows here (like \"dog bites man\" -> \"man bites dog\"); "
                     "attention with no positions and no mask is permutation-equivariant."),
                Case((fs["plain"], x, perm), names,
                     "Attention with no positions and no mask is permutation-equivariant."),
                Case((fs["sinusoid"], x, perm), names,
                     "Once positions are added, shuffling the tokens changes what each one "
                     "sees: the symmetry is broken."),
                Case((fs["mlp"], x, perm), names,
                     "A function that treats every row on its own is equivariant."),
                Case((fs["causal"], x, perm), names,
                     "The causal mask depends on the row numbers, so it breaks the symmetry.")]
    rng = _t.default_rng(122)
    fs = _equivariance_functions(rng, 6, 7)
    x = _normal(rng, 7, 6)
    cycle = np.array([1, 2, 3, 4, 5, 6, 0])
    other = np.array([3, 6, 0, 5, 2, 1, 4])
    return [Case((fs["running_mean"], x, other), names),
            Case((fs["layer_norm"], x, cycle), names),
            Case((fs["learned"], x, other), names),
            Case((fs["plain"], x, cycle), names),
            Case((fs["reverse"], x, other), names),
            Case((fs["plain"], x, other), names),
            Case((fs["sinusoid"], x, cycle), names)]


def check_permutation_equivariance(is_permutation_equivariant, hidden: bool = False,
                                   backend: str = "auto") -> None:
    """is_permutation_equivariant(f, x, perm) -> np.allclose(f(x[perm]), f(x)[perm]).

    f maps (seq, d_model) to (seq, d_model); perm is a permutation of range(seq).
    """
    spec = Spec("is_permutation_equivariant", _reference_equivariant, _equivariance_mistakes,
                out="flag")
    _run_value(spec, is_permutation_equivariant, _equivariance_cases(hidden), whole_run=True)


# --- chapter 3: linear ----------------------------------------------------------------------------


def _linear_mistakes(x, w, b):
    bias = 0.0 if b is None else b
    yield Mistake(
        "{name} applies w transposed (x @ w.T). The weight is stored (d_in, d_out), as in the "
        "math X W, so the product is x @ w.",
        lambda x, w, b: x @ w.T + bias)
    yield Mistake("{name} multiplies in the wrong order (w @ x); the input comes first: x @ w.",
                  lambda x, w, b: w @ x + bias)
    if b is not None:
        yield Mistake("{name} leaves out the bias: return x @ w + b.", lambda x, w, b: x @ w)
        yield Mistake("{name} adds the bias before multiplying ((x + b) @ w); add it to the "
                      "product: x @ w + b.", lambda x, w, b: (x + b) @ w)
        yield Mistake("{name} subtracts the bias; add it: x @ w + b.", lambda x, w, b: x @ w - b)


def _linear_cases(hidden: bool):
    names = ("x", "w", "b")
    if not hidden:
        rng = _t.default_rng(31)
        return [Case((_normal(rng, 4, 4), _normal(rng, 4, 4), _normal(rng, 4)), names),
                Case((_normal(rng, 5, 6), _normal(rng, 6, 3), _normal(rng, 3)), names,
                     "w is stored (d_in, d_out) = (6, 3): the product is x @ w."),
                Case((_normal(rng, 2, 3, 6), _normal(rng, 6, 2), None), names,
                     "b is None here: no bias. x is (batch, seq, d_in) = (2, 3, 6).",
                     on_error="b is None here: no bias, so add nothing (check `if b is None`).")]
    rng = _t.default_rng(131)
    return [Case((_normal(rng, 6), _normal(rng, 6, 4), _normal(rng, 4)), names,
                 "x is a single vector of shape (d_in,) = (6,) here."),
            Case((_normal(rng, 3, 5, dtype=np.float32), _normal(rng, 5, 5, dtype=np.float32),
                  None), names, "x and w are float32 and b is None here.",
                 on_error="b is None here: no bias, so add nothing (check `if b is None`)."),
            Case((_normal(rng, 1, 1), _normal(rng, 1, 1), _normal(rng, 1)), names),
            Case((_normal(rng, 2, 2, 3, 8), _normal(rng, 8, 8), _normal(rng, 8)), names)]


def check_linear(linear, hidden: bool = False, backend: str = "auto") -> None:
    """linear(x, w, b=None) = x @ w + b: x (..., d_in), w (d_in, d_out), b (d_out,) or None."""
    spec = Spec("linear", _t.ref_linear, _linear_mistakes)
    _run(spec, linear, _linear_cases(hidden), backend)


# --- chapter 3: the score table Q K^T -------------------------------------------------------------


def _reference_score_table(x, w_q, w_k):
    return (x @ w_q) @ np.swapaxes(x @ w_k, -1, -2)


def _score_table_mistakes(x, w_q, w_k):
    d_head = w_q.shape[-1]

    def table(a, b):
        return a @ np.swapaxes(b, -1, -2)

    yield Mistake(
        f"{{name}} divides by sqrt(d_head) = sqrt({d_head}). In this chapter the score is the "
        "plain dot product q_i . k_j; chapter 4 adds the scaling.",
        lambda x, wq, wk: table(x @ wq, x @ wk) / math.sqrt(d_head))
    yield Mistake(
        "{name} is transposed (K Q^T, or w_q and w_k swapped): row i belongs to query i, "
        "scores[i, j] = q_i . k_j, so compute Q @ K^T with Q = x @ w_q and K = x @ w_k.",
        lambda x, wq, wk: table(x @ wk, x @ wq))
    yield Mistake(
        "{name} compares the rows of x directly (x @ x^T); project them first: Q = x @ w_q, "
        "K = x @ w_k, then Q @ K^T.",
        lambda x, wq, wk: table(x, x))
    yield Mistake("{name} uses w_q for the keys too (Q @ Q^T); the keys are K = x @ w_k.",
                  lambda x, wq, wk: table(x @ wq, x @ wq))
    yield Mistake("{name} uses w_k for the queries too (K @ K^T); the queries are Q = x @ w_q.",
                  lambda x, wq, wk: table(x @ wk, x @ wk))


def _score_table_cases(hidden: bool):
    names = ("x", "w_q", "w_k")
    batched = ("x is a batch here, (batch, seq, d_model): transpose only the last two axes of K, "
               "with np.swapaxes(K, -1, -2) (K.T reverses every axis).")
    if not hidden:
        rng = _t.default_rng(32)
        return [Case((_normal(rng, 5, 6), _normal(rng, 6, 3), _normal(rng, 6, 3)), names),
                Case((_normal(rng, 2, 4, 6), _normal(rng, 6, 2), _normal(rng, 6, 2)), names,
                     batched, on_error=batched)]
    rng = _t.default_rng(132)
    return [Case((_normal(rng, 1, 3), _normal(rng, 3, 1), _normal(rng, 3, 1)), names),
            Case((_normal(rng, 6, 8, dtype=np.float32), _normal(rng, 8, 4, dtype=np.float32),
                  _normal(rng, 8, 4, dtype=np.float32)), names, "Everything is float32 here."),
            Case((_normal(rng, 3, 5, 4), _normal(rng, 4, 4), _normal(rng, 4, 4)), names, batched,
                 on_error=batched),
            Case((_normal(rng, 7, 8), _normal(rng, 8, 8), _normal(rng, 8, 8)), names)]


def check_score_table(score_table, hidden: bool = False, backend: str = "auto") -> None:
    """score_table(x, w_q, w_k) = (x @ w_q) @ (x @ w_k)^T, unscaled: (..., seq, seq)."""
    spec = Spec("score_table", _reference_score_table, _score_table_mistakes)
    _run(spec, score_table, _score_table_cases(hidden), backend)


# --- chapter 3: one query, a soft lookup ----------------------------------------------------------


def _reference_soft_lookup(query, keys, values):
    return _t.ref_softmax(keys @ query) @ values


def _soft_lookup_mistakes(query, keys, values):
    d_head = query.shape[-1]
    yield Mistake(
        f"{{name}} divides the scores by sqrt(d_head) = sqrt({d_head}); in this chapter the "
        "weights are softmax(keys @ query), with no scaling (chapter 4 adds it).",
        lambda q, k, v: _t.ref_softmax(k @ q / math.sqrt(d_head)) @ v)
    yield Mistake(
        "{name} returns the value of the best-matching key only, like a dictionary (a hard "
        "lookup). Attention blends ALL the values: weights = softmax(keys @ query), then "
        "weights @ values.",
        lambda q, k, v: v[np.argmax(k @ q)])
    yield Mistake(
        "{name} uses the raw scores as weights; turn them into weights with a softmax first, so "
        "they are positive and sum to 1.",
        lambda q, k, v: (k @ q) @ v)
    yield Mistake(
        "{name} divides the scores by their sum without exponentiating; the weights are "
        "exp(s) / sum(exp(s)).",
        lambda q, k, v: ((k @ q) / np.sum(k @ q)) @ v)
    yield Mistake(
        "{name} blends the keys; the answer is a blend of the VALUES: weights @ values.",
        lambda q, k, v: _t.ref_softmax(k @ q) @ k)
    yield Mistake(
        "{name} returns the weights; return the blend of the values they give: weights @ values.",
        lambda q, k, v: _t.ref_softmax(k @ q))
    yield Mistake(
        "{name} averages all the values equally; weight each value by softmax(keys @ query).",
        lambda q, k, v: np.mean(v, axis=0))


def _soft_lookup_cases(hidden: bool):
    names = ("query", "keys", "values")
    if not hidden:
        rng = _t.default_rng(33)
        keys = np.array([[2.0, 0.0], [1.4, 1.4], [0.0, 2.0], [-2.0, 0.0]])
        return [Case((np.array([2.0, 0.6]), keys, np.array([[100.0], [200.0], [300.0],
                                                             [400.0]])), names,
                     "This is the chapter's example: one query, four keys, one number per value."),
                Case((_normal(rng, 4), _normal(rng, 6, 4), _normal(rng, 6, 3)), names),
                Case((_normal(rng, 3), _normal(rng, 5, 3), _normal(rng, 5, 3)), names)]
    rng = _t.default_rng(133)
    return [Case((_normal(rng, 4), _normal(rng, 1, 4), _normal(rng, 1, 2)), names,
                 "A single key: all the weight goes to it."),
            Case((_normal(rng, 8, dtype=np.float32), _normal(rng, 7, 8, dtype=np.float32),
                  _normal(rng, 7, 8, dtype=np.float32)), names, "Everything is float32 here."),
            Case((_normal(rng, 4, scale=3.0), _normal(rng, 9, 4, scale=3.0), _normal(rng, 9, 5)),
                 names, "The scores here are larger (up to about 40)."),
            Case((_normal(rng, 2), _normal(rng, 3, 2), _normal(rng, 3, 1)), names)]


def check_soft_lookup(soft_lookup, hidden: bool = False, backend: str = "auto") -> None:
    """soft_lookup(query, keys, values) = softmax(keys @ query) @ values (no scaling).

    query (d_head,), keys (seq_k, d_head), values (seq_k, d_v) -> (d_v,).
    """
    spec = Spec("soft_lookup", _reference_soft_lookup, _soft_lookup_mistakes)
    _run(spec, soft_lookup, _soft_lookup_cases(hidden), backend)


# --- chapter 3: a hand-picked W_Q -----------------------------------------------------------------

# The chapter's features and key matrix: a key says what a token IS (person, place, action).
QUERY_FEATURES = ("person", "place", "action", "name")
QUERY_W_K = 2.0 * np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [0.0, 0.0, 0.0]])
QUERY_GOAL = {"person": "action", "action": "place", "place": "person"}  # who looks for what
QUERY_MIN_WEIGHT = 0.9

_ROLE = {"person": (1, 0, 0), "place": (0, 1, 0), "action": (0, 0, 1)}
_QUERY_SENTENCES = {  # word: (role, has a name)
    False: [[("jane", "person", 1), ("visits", "action", 0), ("africa", "place", 1)]],
    True: [[("the city", "place", 0), ("welcomes", "action", 0), ("her", "person", 0)],
           [("africa", "place", 1), ("greets", "action", 0), ("bob", "person", 1)],
           [("she", "person", 0), ("visits", "action", 0), ("peru", "place", 1)],
           [("lima", "place", 1), ("tom", "person", 1), ("runs", "action", 0)]],
}


def _sentence_x(sentence) -> np.ndarray:
    return np.array([list(_ROLE[role]) + [float(named)] for _, role, named in sentence],
                    dtype=np.float64)


def _query_weights(w_q, sentence) -> np.ndarray:
    x = _sentence_x(sentence)
    return _t.ref_softmax((x @ w_q) @ (x @ QUERY_W_K).T)  # (T, T): row i = word i's weights


def _read_w_q(name: str, out) -> np.ndarray:
    torch = _t.torch_refs()
    if torch is not None and _t.type_(out) is torch.Tensor:
        out = torch.numpy(torch.cpu(torch.detach(out)))
    if _t.type_(out) is list:
        try:
            out = _t.asarray(out)
        except Exception:
            raise AssertionError(f"{name} returned a list that is not a table of numbers; return "
                                 f"a NumPy array of shape (4, 3).") from None
    if _t.type_(out) is not _t.ndarray:
        raise AssertionError(f"{name} returned {_kind_of_object(out)}; it should return W_Q, a "
                             f"NumPy array of shape (d_model, d_head) = (4, 3).")
    if _t.kind_of(out) not in "iuf":
        raise AssertionError(f"{name} returned an array of dtype {out.dtype}; W_Q holds numbers.")
    if out.shape == (3, 4):
        raise AssertionError(
            f"{name} returned an array of shape (3, 4), W_Q transposed: it is (d_model, d_head) = "
            f"(4, 3), one ROW per feature ({', '.join(QUERY_FEATURES)}) and one column per key "
            f"feature (person, place, action).")
    if out.shape != (4, 3):
        raise AssertionError(f"{name} returned an array of shape {_shape(out)}; W_Q has shape "
                             f"(d_model, d_head) = (4, 3).")
    w_q = _t.asarray(out, dtype=_t.float64)
    if not _t.isfinite(w_q).all():
        raise AssertionError(f"{name} returned a W_Q with inf or nan in it; use ordinary numbers.")
    return w_q


def _query_problem(name: str, w_q, sentence):
    """What is wrong with ``w_q`` on ``sentence``, in words, or None if every word attends well."""
    words = [word for word, _, _ in sentence]
    roles = [role for _, role, _ in sentence]
    weights = _query_weights(w_q, sentence)
    text = " ".join(words)
    self_pick = all(int(np.argmax(weights[i])) == i for i in range(len(words)))
    for i, role in enumerate(roles):
        target = roles.index(QUERY_GOAL[role])
        got = float(weights[i, target])
        if got >= QUERY_MIN_WEIGHT:
            continue
        shown = ", ".join(f"{w} {p:.2f}" for w, p in zip(words, weights[i], strict=True))
        head = (f"In \"{text}\", '{words[i]}' (a {role}) should look at '{words[target]}' (the "
                f"{QUERY_GOAL[role]}) with weight at least {QUERY_MIN_WEIGHT}, but its weights "
                f"are: {shown}.")
        if self_pick:
            return (head + " Every word looks mostly at itself: your W_Q asks for what a word IS "
                    "(like W_K). Row f of W_Q says what a word with feature f LOOKS FOR.")
        if int(np.argmax(weights[i])) == target:
            return (head + " The right word gets the most weight, but not enough: make the "
                    "matching entries of W_Q larger (the softmax picks a clearer winner when "
                    "the scores are further apart).")
        row = QUERY_FEATURES.index(role)
        column = ("person", "place", "action").index(QUERY_GOAL[role])
        named = " (its 'name' feature is 1 too, so row 3 adds to its query)" \
            if sentence[i][2] else ""
        return (head + f" Row {row} of W_Q (the '{role}' feature) decides what a {role} looks "
                f"for{named}; key column {column} means '{QUERY_GOAL[role]}'.")
    return None


def check_query_design(make_w_q, hidden: bool = False, backend: str = "auto") -> None:
    """make_w_q() -> W_Q (4, 3) such that, with the chapter's W_K and no mask, every person looks
    at the action, every action at the place and every place at the person (weight >= 0.9).

    Weights: softmax((X W_Q)(X W_K)^T) over each row, no scaling. X rows: person, place, action,
    name features of each word.
    """
    name = "make_w_q"
    if not _t.callable_(make_w_q):
        raise AssertionError(f"{name} should be a function, but it is a "
                             f"{_t.type_(make_w_q).__name__}. Define it with `def {name}():`.")
    case = Case((), ())
    with _t.pristine():
        out, exc, _ = _attempt(make_w_q, case, "numpy")
        if exc is not None:
            if _t.isinstance_(exc, NotImplementedError):
                raise AssertionError(_raised(name, exc, case, make_w_q)) from exc
            try:
                text = str(exc)
            except Exception:
                text = ""
            raise AssertionError(f"{name} raised {_t.type_(exc).__name__}"
                                 + (f": {text}" if text else "") + ".") from exc
        w_q = _read_w_q(name, out)
        for sentence in _QUERY_SENTENCES[bool(hidden)]:
            problem = _query_problem(name, w_q, sentence)
            if problem is not None:
                raise AssertionError(problem)


# --- chapter 6: split_heads and merge_heads -------------------------------------------------------


def _split_mistakes(x, n_head):
    *lead, seq, d_model = x.shape
    d_head = d_model // n_head
    yield Mistake(
        "{name} reshapes straight to (..., n_head, seq, d_head), which mixes positions and "
        "features. Reshape to (..., seq, n_head, d_head) first, then swap the seq and n_head "
        "axes: np.swapaxes(x, -3, -2).",
        lambda x, n: x.reshape(*lead, n, seq, d_head))
    yield Mistake(
        "{name} deals the columns out one at a time (head h gets columns h, h + n_head, ...). "
        "Head h gets the BLOCK of columns h*d_head to (h+1)*d_head - 1: reshape to "
        "(..., seq, n_head, d_head), then swap the seq and n_head axes.",
        lambda x, n: np.moveaxis(x.reshape(*lead, seq, d_head, n), -1, -3))
    yield Mistake(
        "{name} stops at (..., seq, n_head, d_head); swap the seq and n_head axes to get "
        "(..., n_head, seq, d_head): np.swapaxes(x, -3, -2).",
        lambda x, n: x.reshape(*lead, seq, n, d_head))


def _merge_mistakes(x):
    *lead, n_head, seq, d_head = x.shape
    yield Mistake(
        "{name} reshapes straight from (..., n_head, seq, d_head) to (..., seq, d_model), which "
        "mixes positions. Swap the n_head and seq axes first (np.swapaxes(x, -3, -2)), then "
        "reshape.",
        lambda x: x.reshape(*lead, seq, n_head * d_head))
    yield Mistake(
        "{name} interleaves the heads' columns (head h lands in columns h, h + n_head, ...). "
        "Put them side by side: swap the n_head and seq axes to get (..., seq, n_head, d_head), "
        "then reshape to (..., seq, n_head * d_head).",
        lambda x: np.moveaxis(x, -3, -1).reshape(*lead, seq, n_head * d_head))
    yield Mistake(
        "{name} stops at (..., seq, n_head, d_head); reshape that to (..., seq, n_head * d_head).",
        lambda x: np.swapaxes(x, -3, -2))


_NO_BATCH = ("x has no batch axis here: use np.swapaxes(x, -3, -2), which works for any number "
             "of leading axes (a fixed np.transpose(x, (0, 2, 1, 3)) does not).")


def _split_cases(hidden: bool):
    names = ("x", "n_head")
    if not hidden:
        rng = _t.default_rng(61)
        return [Case((_normal(rng, 5, 12), 3), names, _NO_BATCH),
                Case((_normal(rng, 2, 4, 8), 2), names, "x is (batch, seq, d_model) here."),
                Case((_normal(rng, 2, 3, 6), 3), names)]
    rng = _t.default_rng(161)
    return [Case((_normal(rng, 1, 8), 1), names, "seq = 1 and n_head = 1 here."),
            Case((_normal(rng, 2, 2, 5, 12), 4), names, "x has two leading axes here."),
            Case((_normal(rng, 3, 6, 8, dtype=np.float32), 8), names,
                 "x is float32 and d_head = 1 here."),
            Case((_normal(rng, 4, 16), 4), names, _NO_BATCH)]


def _merge_cases(hidden: bool):
    names = ("x",)
    if not hidden:
        rng = _t.default_rng(62)
        return [Case((_normal(rng, 3, 5, 4),), names, _NO_BATCH),
                Case((_normal(rng, 2, 2, 4, 4),), names,
                     "x is (batch, n_head, seq, d_head) here."),
                Case((_normal(rng, 2, 3, 3, 2),), names)]
    rng = _t.default_rng(162)
    return [Case((_normal(rng, 1, 6, 8),), names, "n_head = 1 here."),
            Case((_normal(rng, 2, 2, 4, 5, 3),), names, "x has two leading axes here."),
            Case((_normal(rng, 8, 3, 1, dtype=np.float32),), names,
                 "x is float32 and d_head = 1 here."),
            Case((_normal(rng, 4, 1, 4),), names, "seq = 1 here.")]


def check_split_heads(split_heads, hidden: bool = False, backend: str = "auto") -> None:
    """split_heads(x, n_head): (..., seq, d_model) -> (..., n_head, seq, d_head)."""
    spec = Spec("split_heads", _t.ref_split_heads, _split_mistakes)
    _run(spec, split_heads, _split_cases(hidden), backend)


def check_merge_heads(merge_heads, hidden: bool = False, backend: str = "auto") -> None:
    """merge_heads(x): (..., n_head, seq, d_head) -> (..., seq, n_head * d_head)."""
    spec = Spec("merge_heads", _t.ref_merge_heads, _merge_mistakes)
    _run(spec, merge_heads, _merge_cases(hidden), backend)


# --- chapter 6: counting the parameters of multi-head attention -----------------------------------


def _reference_mha_count(d_model, n_head, bias):
    return 4 * d_model * d_model + (4 * d_model if bias else 0)


def _mha_count_mistakes(d_model, n_head, bias):
    d, h = d_model, n_head
    d_head = d // h
    b = 4 * d if bias else 0
    yield Mistake(
        "{name} multiplies by n_head. The heads SHARE the d_model columns of W_Q, W_K and W_V "
        "(each head gets d_head = d_model / n_head of them), so the count does not depend on "
        "n_head.",
        lambda *a: h * (4 * d * d + b))
    yield Mistake(
        "{name} multiplies the weight matrices by n_head. The heads SHARE the d_model columns "
        "(d_head = d_model / n_head each), so the count does not depend on n_head.",
        lambda *a: h * 4 * d * d + b)
    yield Mistake(
        "{name} counts each head's matrices as d_head x d_head; head h's W_Q^(h) is "
        "(d_model, d_head), and side by side the heads make one (d_model, d_model) matrix.",
        lambda *a: h * 4 * d_head * d_head + b)
    yield Mistake(
        "{name} leaves out the output projection: w_out is (d_model, d_model)"
        + (" and b_out has d_model entries." if bias else "."),
        lambda *a: 3 * d * d + (3 * d if bias else 0))
    if bias:
        yield Mistake("{name} leaves out the biases: b_qkv has 3*d_model entries and b_out "
                      "d_model.", lambda *a: 4 * d * d)
        yield Mistake("{name} counts b_qkv as d_model numbers; it has one bias per column of "
                      "w_qkv, 3*d_model.", lambda *a: 4 * d * d + 2 * d)
        yield Mistake("{name} leaves out b_out (d_model entries).", lambda *a: 4 * d * d + 3 * d)
        yield Mistake("{name} leaves out b_qkv (3*d_model entries).", lambda *a: 4 * d * d + d)
    else:
        yield Mistake("{name} counts biases although bias=False; then there are only the weight "
                      "matrices.", lambda *a: 4 * d * d + 4 * d)
    yield Mistake(
        "{name} counts w_qkv as d_model x d_model; it holds W_Q, W_K and W_V side by side: "
        "(d_model, 3*d_model).",
        lambda *a: 2 * d * d + b)


def _mha_count_cases(hidden: bool):
    names = ("d_model", "n_head", "bias")
    if not hidden:
        return [Case((12, 3, True), names),
                Case((768, 12, True), names, "These are the sizes of GPT-2 small."),
                Case((768, 12, False), names, "bias = False here: no bias vectors.")]
    return [Case((6144, 64, True), names, "These are the sizes of GPT-NeoX-20B."),
            Case((6144, 64, False), names, "bias = False here."),
            Case((8, 8, True), names, "d_head = 1 here."),
            Case((64, 1, False), names, "A single head here."),
            Case((512, 8, True), names)]


def check_mha_param_count(mha_param_count, hidden: bool = False, backend: str = "auto") -> None:
    """mha_param_count(d_model, n_head, bias) -> parameters of one multi-head attention layer:
    w_qkv (d_model, 3 d_model), w_out (d_model, d_model), plus b_qkv and b_out if bias."""
    spec = Spec("mha_param_count", _reference_mha_count, _mha_count_mistakes, out="count")
    _run_value(spec, mha_param_count, _mha_count_cases(hidden))


# --- chapter 6: multi-head attention in PyTorch, on the GPU when there is one ---------------------


class _OnDevice:
    """The learner's torch function, called with its tensor inputs moved to ``device``.

    Keeps the learner's ``__code__`` so that an untouched exercise is still reported as "not
    implemented yet", and remembers the type and device of every output.
    """

    def __init__(self, fn, device):
        self.fn = fn
        self.device = device
        self.__code__ = getattr(fn, "__code__", None)
        self.returned = []

    def __call__(self, *args):
        torch = _t.torch_refs()
        moved = tuple(a.to(self.device) if _t.type_(a) is torch.Tensor else a for a in args)
        out = self.fn(*moved)
        self.returned.append((_t.type_(out), getattr(out, "device", None)
                              if _t.type_(out) is torch.Tensor else None))
        return out


def check_multi_head_attention_torch(multi_head_attention, hidden: bool = False,
                                     device=None) -> None:
    """multi_head_attention(x, w_qkv, b_qkv, w_out, b_out, n_head) written with torch tensors.

    Same task and mistakes as ``check_multi_head_attention``; the inputs are torch tensors on
    ``device`` (default: "cuda" when torch sees a GPU, else "cpu"), and the result must be a
    tensor on that same device.
    """
    name = getattr(multi_head_attention, "__name__", "")
    name = name if _t.type_(name) is str and name.isidentifier() else "multi_head_attention"
    if not _t.callable_(multi_head_attention):
        raise AssertionError(f"{name} should be a function, but it is a "
                             f"{_t.type_(multi_head_attention).__name__}. Define it with "
                             f"`def {name}(...):`.")
    torch = _t.load_torch()
    if device is None:
        device = "cuda" if torch.module.cuda.is_available() else "cpu"
    device = torch.module.device(device)
    where = f"The inputs are torch tensors on {device} here"
    hint = (f"{where}: make every new tensor (a mask, say) on x.device, e.g. "
            f"torch.ones(seq, seq, dtype=torch.bool, device=x.device).")
    cases = [Case(c.args, c.names, f"{c.note} {hint}" if c.note else hint)
             for c in _mha_cases(hidden)]
    learner = _OnDevice(multi_head_attention, device)
    spec = Spec(name, _t.ref_multi_head_attention, _mha_mistakes, tol32="float32_model")
    _run(spec, learner, cases, backend="torch")
    for kind, on in learner.returned:
        if kind is not torch.Tensor:
            what = "a NumPy array" if kind is _t.ndarray else f"a {kind.__name__}"
            raise AssertionError(f"{name} returned {what}; this part is about PyTorch: compute "
                                 f"with torch operations and return a tensor.")
        if on.type != device.type or (device.index is not None and on.index != device.index):
            raise AssertionError(f"{name} returned a tensor on {on}, but its inputs were on "
                                 f"{device}: results stay on the inputs' device (no .cpu() or "
                                 f".cuda() inside).")
