"""The architecture switches of a decoder, shared by ``qkv.np`` and ``qkv.pt``.

GPT-2 (2019) and the decoders after it (Llama, Mistral, Qwen, OLMo) share one skeleton: embed,
a stack of pre-norm blocks (attention, then an MLP, each added to the residual stream), a final
norm, unembed. What changed is which piece fills each slot. ``Arch`` names the choice for every
slot; ``Arch()`` is GPT-2. ``qkv.pt.GPTConfig`` holds the same fields and hands its ``arch`` to
the pure functions, which take it as ``arch=``.
"""

from dataclasses import dataclass
from numbers import Integral

from qkv._checks import shape_of

NORMS = ("layer", "rms")
POSITIONS = ("learned", "rope")
MLPS = ("gelu", "swiglu")


@dataclass(frozen=True)
class Arch:
    """Which piece fills each slot of the decoder.

    norm: "layer" (LayerNorm: centre, scale, shift; GPT-2) or "rms" (RMSNorm: scale only; Llama).
    position: "learned" (a wpe row added to each token; GPT-2) or "rope" (rotary: q and k
        rotated by an angle proportional to the position, inside attention; Llama).
    mlp: "gelu" (GELU between two linear maps; GPT-2) or "swiglu" (a SiLU-gated product;
        Llama); see ``swiglu`` for the weight layout.
    n_kv_head: key/value heads (None: as many as query heads). Fewer is grouped-query
        attention (each K/V head serves n_head / n_kv_head query heads); 1 is multi-query.
    qk_norm: RMS-normalise each head's q and k (with learned (d_head,) scales) before RoPE and
        the dot product, which keeps attention logits bounded.
    rope_theta: RoPE's frequency base (10,000 in the RoFormer paper and Llama 1/2).
    norm_eps: the epsilon inside every norm's square root.
    """

    norm: str = "layer"
    position: str = "learned"
    mlp: str = "gelu"
    n_kv_head: int | None = None
    qk_norm: bool = False
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5

    def __post_init__(self):
        for name, allowed in (("norm", NORMS), ("position", POSITIONS), ("mlp", MLPS)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"Arch: {name} must be one of {allowed}; "
                                 f"got {getattr(self, name)!r}")
        n_kv = self.n_kv_head
        if n_kv is not None and (isinstance(n_kv, bool) or not isinstance(n_kv, Integral)
                                 or n_kv < 1):
            raise ValueError(f"Arch: n_kv_head must be None or an int >= 1; got {n_kv!r}")
        if not self.rope_theta > 0:
            raise ValueError(f"Arch: rope_theta must be > 0; got {self.rope_theta!r}")

    def kv_heads(self, fn: str, n_head: int) -> int:
        """n_kv_head (n_head when None); ValueError unless it divides n_head."""
        n_kv = n_head if self.n_kv_head is None else self.n_kv_head
        check_kv_heads(fn, n_head, n_kv)
        return n_kv


GPT2 = Arch()


def check_kv_heads(fn: str, n_head: int, n_kv_head: int) -> None:
    """ValueError unless n_kv_head is a positive int dividing n_head (each K/V head serves a
    whole group of n_head // n_kv_head query heads)."""
    if (isinstance(n_kv_head, bool) or not isinstance(n_kv_head, Integral) or n_kv_head < 1
            or n_head % n_kv_head != 0):
        raise ValueError(f"{fn}: n_kv_head must be a positive int dividing n_head; "
                         f"got n_head {n_head} and n_kv_head {n_kv_head!r}")


def check_rope_dims(fn: str, d_head: int) -> None:
    """ValueError unless d_head is even (RoPE rotates pairs of coordinates)."""
    if d_head % 2 != 0:
        raise ValueError(f"{fn}: RoPE rotates pairs of coordinates, so d_head must be even; "
                         f"got d_head {d_head}")


def qkv_width(n_head: int, n_kv_head: int, d_head: int) -> int:
    """Columns of w_qkv: n_head query heads, then n_kv_head key and n_kv_head value heads."""
    return (n_head + 2 * n_kv_head) * d_head


def check_rope_tables(fn: str, rope_tables, seq: int, d_head: int):
    """(cos, sin) from attention's ``rope=`` argument, checked against x's seq and d_head."""
    if not (isinstance(rope_tables, tuple) and len(rope_tables) == 2):
        raise TypeError(f"{fn}: rope must be None or the pair (cos, sin) from rope_table; "
                        f"got {type(rope_tables).__name__}")
    check_rope_dims(fn, d_head)
    cos, sin = rope_tables
    for name, t in (("cos", cos), ("sin", sin)):
        if shape_of(t) != (seq, d_head // 2):
            raise ValueError(f"{fn}: rope tables must be (seq, d_head // 2) = "
                             f"{(seq, d_head // 2)}; got {name} {shape_of(t)}")
    return cos, sin
