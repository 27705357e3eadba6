"""Rotary position embedding (RoPE; Su et al. 2021, RoFormer), as ``qkv.np.rope``.

Pair i of a head's d_head coordinates at position m is turned by the angle
m * theta_i, theta_i = base ** (-2 i / d_head); q rotated by m dotted with k rotated by n
depends on m - n only. Layouts: "half" pairs i and i + d_head / 2 (Hugging Face's Llama,
GPT-NeoX); "interleaved" pairs 2i and 2i + 1 (the RoFormer paper, Meta's original Llama code).
"""

import torch

from qkv._arch import check_rope_dims
from qkv._checks import check_float, check_min_ndim, check_shape

LAYOUTS = ("half", "interleaved")


def rope_table(seq: int, d_head: int, base: float = 10000.0, start: int = 0, *,
               dtype: torch.dtype = torch.float32, device=None):
    """The rotation angles' cos and sin for positions start .. start + seq - 1.

    returns: (cos, sin), each (seq, d_head // 2) in ``dtype`` on ``device``: row m, column i
        holds cos/sin of (start + m) * base ** (-2 i / d_head). The angles are computed in
        float64 and rounded once, so a long context loses nothing inside them.
    """
    check_rope_dims("rope_table", d_head)
    f64 = dict(dtype=torch.float64, device=device)
    inv_freq = base ** (-torch.arange(0, d_head, 2, **f64) / d_head)  # (d_head/2,)
    angles = torch.outer(torch.arange(start, start + seq, **f64), inv_freq)  # (seq, d_head/2)
    return torch.cos(angles).to(dtype), torch.sin(angles).to(dtype)


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
         layout: str = "half") -> torch.Tensor:
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
    if layout == "half":
        a, b = x.chunk(2, dim=-1)  # (..., seq, d_head/2) each
        return torch.cat([a * cos - b * sin, a * sin + b * cos], dim=-1)
    a, b = x[..., 0::2], x[..., 1::2]
    return torch.stack([a * cos - b * sin, a * sin + b * cos], dim=-1).flatten(-2)
