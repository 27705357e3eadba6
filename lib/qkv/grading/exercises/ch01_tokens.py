"""Chapter 1, tokens and embeddings: encode and decode with a character vocabulary, one-hot
vectors, the embedding lookup, and the cosine-similarity matrix of an embedding table."""

from functools import partial

import numpy as np

from .. import _trusted as _t
from ..engine import Case, Mistake, _normal
from ..exercise import Exercise
from ..kinds import Value
from ..parts import explain_similarity

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


ENCODE = Exercise(
    name="encode",
    reference=_reference_encode,
    visible=lambda: _encode_cases(False),
    hidden=lambda: _encode_cases(True),
    mistakes=_encode_mistakes,
    output=Value("ids"),
    backends=("numpy",),
    doc='encode(text, itos, add_end=False) -> list of ids, itos[id] == the character. itos: the '
        "vocabulary, a list with itos[0] == '<end>'; add_end appends the end token's id (0).",
)


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
                Case((_reference_encode("lord", hw, True) + _reference_encode(" hello", hw),
                      hw), names, "There is an end token (id 0) in the middle here."),
                Case((_reference_encode("the sea is cold.\n", book), book), names)]
    rng = _t.default_rng(112)
    middle = _reference_encode("we swim", book, True) + _reference_encode("at noon", book, True)
    return [Case(([], hw), names, "ids is empty here: the text is ''."),
            Case((middle, book), names, "There is an end token in the middle here."),
            Case((rng.integers(1, len(book), size=12), book), names,
                 "ids is a NumPy array here."),
            Case(([0], hw), names)]


DECODE = Exercise(
    name="decode",
    reference=_reference_decode,
    visible=lambda: _decode_cases(False),
    hidden=lambda: _decode_cases(True),
    mistakes=_decode_mistakes,
    output=Value("text"),
    backends=("numpy",),
    doc="decode(ids, itos) -> text: ''.join(itos[i] for i in ids), the end token shown as "
        '<end>.',
)


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


ONE_HOT = Exercise(
    name="one_hot",
    reference=_reference_one_hot,
    visible=lambda: _one_hot_cases(False),
    hidden=lambda: _one_hot_cases(True),
    mistakes=_one_hot_mistakes,
    doc='one_hot(ids, vocab_size) -> float (..., seq, vocab_size) with a single 1 per row.',
)


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


EMBED = Exercise(
    name="embed",
    reference=_t.ref_embed,
    visible=lambda: _embed_cases(False),
    hidden=lambda: _embed_cases(True),
    mistakes=_embed_mistakes,
    doc='embed(token_ids, table) -> table[token_ids]: (..., seq) ids, (vocab, d_model) table.',
)


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


SIMILARITY_MATRIX = Exercise(
    name="similarity_matrix",
    reference=_reference_similarity,
    visible=lambda: _similarity_cases(False),
    hidden=lambda: _similarity_cases(True),
    mistakes=_similarity_mistakes,
    explain=explain_similarity,
    doc="similarity_matrix(table) -> (vocab, vocab) cosine similarities of the table's rows.",
)


EXERCISES = [ENCODE, DECODE, ONE_HOT, EMBED, SIMILARITY_MATRIX]
