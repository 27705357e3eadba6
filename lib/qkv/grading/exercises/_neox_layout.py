"""Chapter 6 (listed by ch06_multi_head), a checkpoint's layout: GPT-NeoX stores its fused
query/key/value projection interleaved per head (head 0's q, k, v, then head 1's ...); GPT-2
and this course store [Q | K | V]. The learner converts one to the other, which the chapter
explains (a figure and the column formulas) but does not show as code."""

import numpy as np

from .. import _trusted as _t
from ..engine import Case, Mistake, _normal
from ..exercise import Exercise
from ..kinds import Parts

_LABELS = ("w_qkv", "b_qkv")


def _blocks(a, n_head, order):
    """Reorder the last axis, 3 * d_model = blocks of d_head, from one block order to another.

    order "neox->gpt2": the axis holds (n_head, 3, d_head) and becomes (3, n_head, d_head)."""
    *lead, width = a.shape
    d_head = width // (3 * n_head)
    if order == "neox->gpt2":
        grid = a.reshape(*lead, n_head, 3, d_head)
    else:  # "gpt2->neox": the other direction
        grid = a.reshape(*lead, 3, n_head, d_head)
    return np.swapaxes(grid, -3, -2).reshape(*lead, width)


def _reference(w, b, n_head):
    # No qkv.np function converts layouts; this is the chapter's description, as code.
    return _blocks(w, n_head, "neox->gpt2"), _blocks(b, n_head, "neox->gpt2")


def _mistakes(w, b, n_head):
    d_head = w.shape[-1] // (3 * n_head)
    yield Mistake(
        "{name} converts the wrong way: it treats the input as [Q | K | V] and interleaves it. "
        "The input is NeoX's layout, head by head (q0 k0 v0 q1 k1 v1 ...): view its columns as "
        "(n_head, 3, d_head) and bring the 3 kinds to the front, (3, n_head, d_head).",
        lambda w, b, h: (_blocks(w, h, "gpt2->neox"), _blocks(b, h, "gpt2->neox")))
    yield Mistake(
        "{name} returns the columns in their original order: a reshape alone moves nothing. "
        "After viewing the columns as (n_head, 3, d_head), swap the first two of those axes "
        "before flattening them again.",
        lambda w, b, h: (w.copy(), b.copy()))
    yield Mistake(
        "{name} converts the weights but leaves the bias in NeoX's order; b_qkv's 3 * d_model "
        "entries are laid out like w's columns and need the same reordering.",
        lambda w, b, h: (_blocks(w, h, "neox->gpt2"), b.copy()))
    yield Mistake(
        "{name} reads each head's block as q, k, v interleaved column by column "
        "(q k v q k v ...); inside a head's block of 3 * d_head columns the query comes first "
        "(d_head columns), then the key, then the value: view the columns as "
        "(n_head, 3, d_head), not (n_head, d_head, 3).",
        lambda w, b, h: tuple(
            np.moveaxis(a.reshape(*a.shape[:-1], h, d_head, 3), -1, -3).reshape(a.shape)
            for a in (w, b)))
    yield Mistake(
        "{name} swaps the roles of n_head and d_head: it views the columns as "
        "(d_head, 3, n_head). Head h owns the block of 3 * d_head columns that starts at "
        "3 * h * d_head.",
        lambda w, b, h: tuple(_blocks(a, d_head, "neox->gpt2") for a in (w, b)))


def _case(rng, d_model, n_head, note=""):
    w = _normal(rng, d_model, 3 * d_model)
    b = _normal(rng, 3 * d_model)
    return Case((w, b, n_head), ("w", "b", "n_head"), note)


def _cases(hidden: bool):
    if not hidden:
        rng = _t.default_rng(61)
        return [_case(rng, 4, 2, "d_model = 4 with 2 heads of d_head = 2 here."),
                _case(rng, 12, 4, "d_model = 12 with 4 heads of d_head = 3 here.")]
    rng = _t.default_rng(6101)
    return [_case(rng, 6, 1, "A single head here: both layouts are the same."),
            _case(rng, 16, 2),
            _case(rng, 12, 3, "3 heads here."),
            _case(rng, 8, 8, "d_head = 1 here.")]


NEOX_TO_GPT2 = Exercise(
    name="neox_to_gpt2_layout",
    reference=_reference,
    visible=lambda: _cases(False),
    hidden=lambda: _cases(True),
    mistakes=_mistakes,
    output=Parts(_LABELS),
    doc="neox_to_gpt2_layout(w, b, n_head) -> (w_qkv, b_qkv): a fused projection stored "
        "interleaved per head (GPT-NeoX) reordered to [Q | K | V] (GPT-2). w (d_model, "
        "3 * d_model), b (3 * d_model,).",
)


__all__ = ["NEOX_TO_GPT2"]
