"""Rotary position embedding (RoPE; Su et al. 2021, RoFormer).

Instead of adding a position vector to the token, RoPE rotates q and k: the d_head coordinates
of a head form d_head / 2 pairs, and pair i at position m is turned by the angle
m * theta_i, theta_i = base ** (-2 i / d_head). A rotation keeps lengths, and the dot product of
q rotated by m with k rotated by n depends on m - n only, so attention sees relative offsets.

Two layouts say which coordinates form pair i (both are in use; weights trained with one give
wrong answers with the other):
- "half" (Hugging Face's Llama, GPT-NeoX): coordinates i and i + d_head / 2.
- "interleaved" (the RoFormer paper, Meta's original Llama code): coordinates 2i and 2i + 1.
"""

import numpy as np

from qkv._arch import check_rope_dims
from qkv._checks import check_float, check_min_ndim, check_shape

LAYOUTS = ("half", "interleaved")


def rope_table(seq: int, d_head: int, base: float = 10000.0, start: int = 0):
    """The rotation angles' cos and sin for positions start .. start + seq - 1.

    returns: (cos, sin), each (seq, d_head // 2), float64: row m, column i holds cos/sin of
        (start + m) * base ** (-2 i / d_head). Computed once per forward pass and shared by
        every head and layer; start is where a KV cache's new tokens begin.
    """
    check_rope_dims("rope_table", d_head)
    inv_freq = base ** (-np.arange(0, d_head, 2, dtype=np.float64) / d_head)  # (d_head/2,)
    angles = np.outer(np.arange(start, start + seq, dtype=np.float64), inv_freq)
    return np.cos(angles), np.sin(angles)  # (seq, d_head/2) each


def _pairs(x, layout):
    """x (..., d_head) -> the two coordinates of every pair, each (..., d_head / 2)."""
    if layout == "half":
        half = x.shape[-1] // 2
        return x[..., :half], x[..., half:]
    return x[..., 0::2], x[..., 1::2]


def _unpairs(a, b, layout):
    """The inverse of _pairs: two (..., d_head / 2) arrays -> (..., d_head)."""
    if layout == "half":
        return np.concatenate([a, b], axis=-1)
    return np.stack([a, b], axis=-1).reshape(*a.shape[:-1], 2 * a.shape[-1])


def rope(x: np.ndarray, cos: np.ndarray, sin: np.ndarray, layout: str = "half") -> np.ndarray:
    """Rotate every pair of x's last axis by its position's angle.

    x: (..., seq, d_head), e.g. q or k of shape (batch, n_head, seq, d_head)
    cos, sin: (seq, d_head // 2), from rope_table (the rows of x's positions)
    layout: "half" (pairs i, i + d_head/2: Hugging Face Llama) or "interleaved" (pairs
        2i, 2i + 1: the RoFormer paper).
    returns: (..., seq, d_head); each pair (a, b) becomes (a cos - b sin, a sin + b cos).
    """
    fn = "rope"
    check_float(fn, "x", x)
    check_min_ndim(fn, "x", x, 2, "(..., seq, d_head)")
    if layout not in LAYOUTS:
        raise ValueError(f"{fn}: layout must be one of {LAYOUTS}; got {layout!r}")
    seq, d_head = x.shape[-2:]
    check_rope_dims(fn, d_head)
    for name, t in (("cos", cos), ("sin", sin)):
        check_shape(fn, name, t, (seq, d_head // 2), "(seq, d_head // 2)")
    a, b = _pairs(x, layout)  # (..., seq, d_head/2) each
    return _unpairs(a * cos - b * sin, a * sin + b * cos, layout)


def rope_forward(x, cos, sin, layout="half"):
    """rope(x, cos, sin, layout), and the cache rope_backward needs: (cos, sin, layout)."""
    return rope(x, cos, sin, layout), (cos, sin, layout)


def rope_backward(dout: np.ndarray, cache) -> dict:
    """Gradient of rope: dout (..., seq, d_head) -> {"dx": (..., seq, d_head)}.

    A rotation is linear and its transpose is the rotation by minus the angle, so the gradient
    is dout rotated back: rope with sin negated.
    """
    cos, sin, layout = cache
    return {"dx": rope(dout, cos, -sin, layout)}

