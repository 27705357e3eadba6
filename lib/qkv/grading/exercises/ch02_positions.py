"""Chapter 2, positional encoding: the sinusoidal table, token vectors plus position vectors,
and whether a function is permutation-equivariant (why attention alone loses the order)."""

import math
from functools import partial

import numpy as np

from .. import _trusted as _t
from ..engine import Case, Mistake, _normal
from ..exercise import Exercise
from ..kinds import Value
from ..values import Shown

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


SINUSOIDAL_POSITIONAL_ENCODING = Exercise(
    name="sinusoidal_positional_encoding",
    check="check_positional_encoding",
    reference=_t.ref_positional_encoding,
    visible=lambda: _pe_cases(False),
    hidden=lambda: _pe_cases(True),
    mistakes=_pe_mistakes,
    doc='sinusoidal_positional_encoding(seq_len, d_model, base) -> (seq_len, d_model), float. '
        'PE[p, 2i] = sin(p / base^(2i/d_model)), PE[p, 2i+1] = cos(p / base^(2i/d_model)).',
)


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


ADD_POSITIONS = Exercise(
    name="add_positions",
    reference=_reference_add_positions,
    visible=lambda: _add_positions_cases(False),
    hidden=lambda: _add_positions_cases(True),
    mistakes=_add_positions_mistakes,
    doc='add_positions(token_ids, table, positions) = table[token_ids] + positions[:seq]. '
        'token_ids (..., seq); table (vocab, d_model); positions (context, d_model) -> (..., '
        'seq, d_model).',
)


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
        "plain": Shown("attention without positions (queries = keys = values = x @ W)", attend),
        "sinusoid": Shown("attention with sinusoidal positions added (attention(x + PE))",
                           lambda x: attend(x + sinusoid[:x.shape[0]])),
        "learned": Shown("attention with learned positions added (attention(x + P))",
                          lambda x: attend(x + learned[:x.shape[0]])),
        "causal": Shown("causal attention without positions", partial(attend, causal=True)),
        "mlp": Shown("a feed-forward layer applied to each row (gelu(x @ W1) @ W2)",
                      lambda x: _t.ref_gelu(x @ w1) @ w2),
        "layer_norm": Shown("layer norm of each row",
                             lambda x: _t.ref_layer_norm(x, ones, 0.0 * ones)),
        "running_mean": Shown("a running mean over the rows (row i = mean of rows 0..i)",
                               lambda x: np.cumsum(x, axis=0)
                               / np.arange(1, x.shape[0] + 1)[:, None]),
        "reverse": Shown("reversing the order of the rows", lambda x: x[::-1]),
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


PERMUTATION_EQUIVARIANCE = Exercise(
    name="is_permutation_equivariant",
    check="check_permutation_equivariance",
    reference=_reference_equivariant,
    visible=lambda: _equivariance_cases(False),
    hidden=lambda: _equivariance_cases(True),
    mistakes=_equivariance_mistakes,
    output=Value("flag", whole_run=True),
    backends=("numpy",),
    doc="is_permutation_equivariant(f, x, perm) -> np.allclose(f(x[perm]), f(x)[perm]): f maps "
        "(seq, d_model) to (seq, d_model); perm is a permutation of range(seq).",
)


EXERCISES = [SINUSOIDAL_POSITIONAL_ENCODING, ADD_POSITIONS, PERMUTATION_EQUIVARIANCE]
