"""Chapter 14's exercises: rms_norm, rope, rotary_attention, swiglu, repeat_kv,
grouped_query_attention, qk_norm_attention. Mistakes are written the way a learner would write
them; the alternatives differ from the references (complex numbers, einsum, loops, torch,
float32)."""

import numpy as np
import torch
import torch.nn.functional as F
from grading_meta import Declared, meta_tests

from qkv.grading import (
    check_grouped_query_attention,
    check_qk_norm_attention,
    check_repeat_kv,
    check_rms_norm,
    check_rope,
    check_rotary_attention,
    check_swiglu,
)

# --- learner-style answers -----------------------------------------------------------------------


def rms_norm(x, gamma, eps=1e-5):
    return x / np.sqrt(np.mean(x**2, axis=-1, keepdims=True) + eps) * gamma


def rope(x, start, base=10000.0, interleaved=False, sign=1.0, exponent=2, swap=False):
    seq, d = x.shape[-2:]
    if exponent == "linspace":  # exponents 0 .. -1 inclusive
        inv = base ** -np.linspace(0, 1, d // 2)
    else:
        inv = base ** (-exponent * np.arange(d // 2) / d)
    ang = np.arange(start, start + seq)[:, None] * inv  # (seq, d/2)
    cos, s = np.cos(ang), sign * np.sin(ang)
    if swap:
        cos, s = s, cos
    if interleaved:
        a, b = x[..., 0::2], x[..., 1::2]
        return np.stack([a * cos - b * s, a * s + b * cos], axis=-1).reshape(x.shape)
    a, b = x[..., : d // 2], x[..., d // 2:]
    return np.concatenate([a * cos - b * s, a * s + b * cos], axis=-1)


def rope_complex(x, start):
    """The half-split pairs as complex numbers, times e^(i p theta)."""
    seq, d = x.shape[-2:]
    z = x[..., : d // 2] + 1j * x[..., d // 2:]
    z = z * np.exp(1j * np.outer(np.arange(start, start + seq), 10000.0 ** (-np.arange(0, d, 2)
                                                                             / d)))
    return np.concatenate([z.real, z.imag], axis=-1)


def rope_rotate_half(x, start):
    """Hugging Face's form: x * cos + rotate_half(x) * sin, angles repeated twice."""
    seq, d = x.shape[-2:]
    ang = np.arange(start, start + seq)[:, None] * 10000.0 ** (-np.arange(0, d, 2) / d)
    ang = np.concatenate([ang, ang], axis=-1)
    rotated = np.concatenate([-x[..., d // 2:], x[..., : d // 2]], axis=-1)
    return x * np.cos(ang) + rotated * np.sin(ang)


def rope_positions_short(x, start):
    """np.arange(start, seq): seq - start positions, too few rows for the table (raises)."""
    seq, d = x.shape[-2:]
    ang = np.outer(np.arange(start, seq), 10000.0 ** (-np.arange(0, d, 2) / d))
    a, b = x[..., : d // 2], x[..., d // 2:]
    return np.concatenate([a * np.cos(ang) - b * np.sin(ang), a * np.sin(ang) + b * np.cos(ang)],
                          axis=-1)


def rope_rotate_half_repeated(x, start):
    """Hugging Face's rotate_half, but the angle table repeated with np.repeat (wrong)."""
    seq, d = x.shape[-2:]
    ang = np.arange(start, start + seq)[:, None] * 10000.0 ** (-np.arange(0, d, 2) / d)
    ang = np.repeat(ang, 2, axis=-1)
    rotated = np.concatenate([-x[..., d // 2:], x[..., : d // 2]], axis=-1)
    return x * np.cos(ang) + rotated * np.sin(ang)


def softmax(s):
    e = np.exp(s - s.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def attention(q, k, v, causal=True, scale=True, diagonal=0, fill=-np.inf, tri=np.tril,
              axis=-1):
    """diagonal=-1: the off-by-one mask that hides each query's own key too (nan in row 0);
    tri=np.triu keeps the future instead of the past; axis=-2 normalises over the queries."""
    s = q @ np.swapaxes(k, -1, -2) / (np.sqrt(q.shape[-1]) if scale is True else scale)
    if causal:
        n = s.shape[-1]
        s = np.where(tri(np.ones((n, n), dtype=bool), k=diagonal), s, fill)
    e = np.exp(s - s.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True) @ v


def rotary_attention(q, k, v, rot_v=False, rot_k=True, causal=True, interleaved=False):
    return attention(rope(q, 0, interleaved=interleaved),
                     rope(k, 0, interleaved=interleaved) if rot_k else k,
                     rope(v, 0) if rot_v else v, causal=causal)


def rotary_attention_k_T(q, k, v):
    """Right for one sequence; k.T of a (batch, n_head, seq, d_head) k reverses every axis."""
    q, k = rope(q, 0), rope(k, 0)
    n = q.shape[-2]
    s = np.where(np.tril(np.ones((n, n), dtype=bool)), q @ k.T / np.sqrt(q.shape[-1]), -np.inf)
    return softmax(s) @ v


def rotary_attention_torch(q, k, v):
    def rot(t):
        seq, d = t.shape[-2:]
        ang = torch.arange(seq, dtype=t.dtype)[:, None] * 10000.0 ** (
            -torch.arange(0, d, 2, dtype=t.dtype) / d)
        a, b = t[..., : d // 2], t[..., d // 2:]
        return torch.cat([a * ang.cos() - b * ang.sin(), a * ang.sin() + b * ang.cos()], -1)

    return F.scaled_dot_product_attention(rot(q), rot(k), v, is_causal=True)


def qk_norm_attention(q, k, v, gq, gk, rope_first=False, norm_v=False, norm_k=True, axis=-1,
                      center=False, **attend):
    def norm(t, g):
        if center:
            t = t - t.mean(axis=axis, keepdims=True)
        return t / np.sqrt(np.mean(t**2, axis=axis, keepdims=True) + 1e-5) * g

    if rope_first:
        q, k = norm(rope(q, 0), gq), norm(rope(k, 0), gk)
    else:
        q, k = rope(norm(q, gq), 0), rope(norm(k, gk) if norm_k else k, 0)
    return attention(q, k, norm(v, gk) if norm_v else v, **attend)


def qk_norm_attention_torch(q, k, v, gq, gk):
    """torch's own RMSNorm and attention around a rotation written with torch ops."""
    def rot(t):
        seq, d = t.shape[-2:]
        ang = torch.arange(seq, dtype=t.dtype)[:, None] * 10000.0 ** (
            -torch.arange(0, d, 2, dtype=t.dtype) / d)
        a, b = t[..., : d // 2], t[..., d // 2:]
        return torch.cat([a * ang.cos() - b * ang.sin(), a * ang.sin() + b * ang.cos()], -1)

    d = q.shape[-1]
    q, k = rot(F.rms_norm(q, (d,), gq, 1e-5)), rot(F.rms_norm(k, (d,), gk, 1e-5))
    return F.scaled_dot_product_attention(q, k, v, is_causal=True)


def silu(z):
    return z / (1 + np.exp(-z))


def gelu(z):
    return 0.5 * z * (1 + np.tanh(np.sqrt(2 / np.pi) * (z + 0.044715 * z**3)))


def swiglu(x, w_gate, w_up, w_down):
    return (silu(x @ w_gate) * (x @ w_up)) @ w_down


def repeat_kv(x, n_rep):
    return np.repeat(x, n_rep, axis=-3)


def repeat_kv_loop(x, n_rep):
    heads = [x[..., h, :, :] for h in range(x.shape[-3]) for _ in range(n_rep)]
    return np.stack(heads, axis=-3)


def gqa(q, k, v, tiled=False, tile_k=None, tile_v=None, rotate=False, **attend):
    n_rep = q.shape[-3] // k.shape[-3]

    def rep(t, tile):
        return np.tile(t, (n_rep, 1, 1)) if tile else np.repeat(t, n_rep, axis=-3)

    k = rep(k, tiled if tile_k is None else tile_k)
    v = rep(v, tiled if tile_v is None else tile_v)
    if rotate:  # the learner reuses part (c)'s rotation where the task has none
        q, k = rope(q, 0), rope(k, 0)
    return attention(q, k, v, **attend)


def gqa_grouped(q, k, v):
    """Without copying: view the query heads as (n_kv_head, n_rep) and broadcast k, v."""
    *lead, n_head, seq, d = q.shape
    n_kv = k.shape[-3]
    qg = q.reshape(*lead, n_kv, n_head // n_kv, seq, d)
    out = attention(qg, k[..., :, None, :, :], v[..., :, None, :, :])
    return out.reshape(*lead, n_head, seq, d)


DECLARED = [
    Declared(
        check_rms_norm,
        mistakes=[
            (lambda x, g: rms_norm(x - x.mean(-1, keepdims=True), g), "subtracts the mean"),
            (lambda x, g: x / (np.sqrt(np.mean(x**2, -1, keepdims=True)) + 1e-5) * g,
             "outside the square root"),
            (lambda x, g: x / np.sqrt(np.sum(x**2, -1, keepdims=True) + 1e-5) * g,
             "sum of x**2"),
            (lambda x, g: rms_norm(x, 1.0), "forgets to scale by gamma"),
            (lambda x, g: rms_norm(x, 1.0) + g, "adds gamma"),
            (lambda x, g: rms_norm(x, g, eps=0.0), "leaves out eps"),
            (lambda x, g: rms_norm(x, g, eps=1e-6), "eps = 1e-6"),
            (lambda x, g: x / (np.mean(x**2, -1, keepdims=True) + 1e-5) * g, "mean square itself"),
            (lambda x, g: x / np.sqrt(np.mean(x**2) + 1e-5) * g, "over the whole array"),
            (lambda x, g: x / np.sqrt(np.var(x, axis=-1, keepdims=True) + 1e-5) * g,
             "standard deviation"),
        ],
        alternatives=[rms_norm,
                      lambda x, g: x / np.sqrt(np.einsum("...d,...d->...", x, x)[..., None]
                                               / x.shape[-1] + 1e-5) * g,
                      lambda x, g: F.rms_norm(x, x.shape[-1:], g, 1e-5)],
    ),
    Declared(
        check_rope,
        mistakes=[
            (lambda x, s: rope(x, s, interleaved=True), "interleaved layout"),
            (lambda x, s: rope(x, s, base=1000.0), "base 1000"),
            (lambda x, s: rope(x, s, base=500000.0), "base 500000"),
            (lambda x, s: rope(x, s, exponent=1), "exponent -i / d_head"),
            (lambda x, s: rope(x, s, exponent=-2), "minus sign"),
            (lambda x, s: rope(x, s, sign=-1.0), "rotates the wrong way"),
            (lambda x, s: rope(x, 0), "ignores start"),
            (lambda x, s: rope(x, s + 1), "start + 1"),
            (lambda x, s: rope(x, s, swap=True), "swaps cos and sin"),
            (lambda x, s: rope(x, s, exponent="linspace"), "np.linspace"),
            (lambda x, s: rope(x, s, exponent=4), "-4 i / d_head"),
            (rope_rotate_half_repeated, "repeats the angles coordinate by coordinate"),
            (rope_positions_short, ["raised ValueError", "np.arange(start, start + seq)"]),
        ],
        alternatives=[rope, rope_complex, rope_rotate_half],
    ),
    Declared(
        check_rotary_attention,
        mistakes=[
            (lambda q, k, v: rotary_attention(q, k, v, rot_v=True), "also rotates the values"),
            (lambda q, k, v: rotary_attention(q, k, v, rot_k=False), "forgets to rotate the keys"),
            (lambda q, k, v: rotary_attention(q, k, v, causal=False), "no causal mask"),
            (lambda q, k, v: rotary_attention(q, k, v, interleaved=True), "(2i, 2i+1)"),
            (lambda q, k, v: attention(rope(q, 0), rope(k, 0), v, scale=1.0), "sqrt(d_head)"),
            (lambda q, k, v: attention(rope(q, 0), rope(k, 0), v, scale=q.shape[-1]),
             "divides the scores by d_head"),
            (lambda q, k, v: attention(q, k, v), "rotates neither q nor k"),
            (lambda q, k, v: attention(rope(q, 0), rope(k, 0), v, diagonal=-1),
             ["returned nan", "also masks the diagonal"]),
            (lambda q, k, v: np.nan_to_num(attention(rope(q, 0), rope(k, 0), v, diagonal=-1)),
             "also masks the diagonal"),
            (lambda q, k, v: attention(rope(q, 0), rope(k, 0), v, diagonal=-1, fill=-1e9),
             "also masks the diagonal"),
            (lambda q, k, v: attention(rope(q, 0), rope(k, 0), v, tri=np.triu),
             "hides the past instead of the future"),
            (lambda q, k, v: attention(rope(q, 0), rope(k, 0), v, axis=-2),
             "softmax over the queries"),
            (rotary_attention_k_T, ["raised ValueError", "t.T reverses every axis"]),
        ],
        alternatives=[rotary_attention, rotary_attention_torch,
                      lambda q, k, v: attention(rope_complex(q, 0), rope_rotate_half(k, 0), v)],
    ),
    Declared(
        check_swiglu,
        mistakes=[
            (lambda x, g, u, d: (silu(x @ u) * (x @ g)) @ d, "gates the wrong branch"),
            (lambda x, g, u, d: (gelu(x @ g) * (x @ u)) @ d, "uses GELU"),
            (lambda x, g, u, d: (np.maximum(x @ g, 0) * (x @ u)) @ d, "gates with ReLU"),
            (lambda x, g, u, d: ((x @ g) / (1 + np.exp(x @ g)) * (x @ u)) @ d,
             "sign in the sigmoid flipped"),
            (lambda x, g, u, d: ((x @ g) * (x @ u)) @ d, "gate's nonlinearity"),
            (lambda x, g, u, d: ((1 / (1 + np.exp(-(x @ g)))) * (x @ u)) @ d, "sigmoid(z)"),
            (lambda x, g, u, d: silu((x @ g) * (x @ u)) @ d, "after the product"),
            (lambda x, g, u, d: (silu(x @ g) + x @ u) @ d, "adds the two branches"),
        ],
        alternatives=[swiglu,
                      lambda x, g, u, d: np.einsum("...f,fd->...d",
                                                   silu(np.einsum("...d,df->...f", x, g))
                                                   * np.einsum("...d,df->...f", x, u), d),
                      lambda x, g, u, d: (F.silu(x @ g) * (x @ u)) @ d],
    ),
    Declared(
        check_repeat_kv,
        mistakes=[
            (lambda x, n: np.tile(x, (n, 1, 1)), "tiles the whole stack"),
            (lambda x, n: np.repeat(x, n, axis=-2), "along the seq axis"),
        ],
        alternatives=[repeat_kv, repeat_kv_loop,
                      lambda x, n: torch.repeat_interleave(x, int(n), dim=-3)],
    ),
    Declared(
        check_grouped_query_attention,
        mistakes=[
            (lambda q, k, v: gqa(q, k, v, tiled=True), "h % n_kv_head"),
            (lambda q, k, v: gqa(q, k, v, causal=False), "no causal mask"),
            (lambda q, k, v: gqa(q, k, v, scale=1.0), "sqrt(d_head)"),
            (lambda q, k, v: gqa(q, k, v, scale=q.shape[-1]), "divides the scores by d_head"),
            (lambda q, k, v: gqa(q, k, v, diagonal=-1), ["returned nan", "masks the diagonal"]),
            (lambda q, k, v: gqa(q, k, v, tile_v=True),
             ["repeats the keys head by head", "tiles the values"]),
            (lambda q, k, v: gqa(q, k, v, tile_k=True),
             ["repeats the values head by head", "tiles the keys"]),
            (lambda q, k, v: gqa(q, k, v, rotate=True), "rotates q and k with RoPE"),
            (lambda q, k, v: attention(q, k, v), ["raised ValueError", "along axis -3"]),
            (lambda q, k, v: gqa(q, k, v, tri=np.triu), "hides the past"),
        ],
        alternatives=[gqa, gqa_grouped,
                      lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                                                     enable_gqa=True)],
    ),
]

DECLARED.append(Declared(
    check_qk_norm_attention,
    mistakes=[
        (lambda *a: qk_norm_attention(*a, rope_first=True), "rotates before it normalises"),
        (lambda q, k, v, gq, gk: attention(rms_norm(q, gq), rms_norm(k, gk), v),
         "leaves out RoPE"),
        (lambda *a: qk_norm_attention(*a, norm_v=True), "also normalises the values"),
        (lambda *a: qk_norm_attention(*a, norm_k=False), "normalises q but not k"),
        (lambda q, k, v, gq, gk: qk_norm_attention(q, k, v, gk, gq), "swaps the scales"),
        (lambda q, k, v, gq, gk: qk_norm_attention(q, k, v, gq, gq), "both q and k by gamma_q"),
        (lambda q, k, v, gq, gk: qk_norm_attention(q, k, v, 1.0, 1.0), "learned scales"),
        (lambda q, k, v, gq, gk: rotary_attention(
            q / np.linalg.norm(q, axis=-1, keepdims=True) * gq,
            k / np.linalg.norm(k, axis=-1, keepdims=True) * gk, v), "the length sqrt(sum"),
        (lambda *a: qk_norm_attention(*a, center=True), "that is layer norm"),
        (lambda *a: qk_norm_attention(*a, axis=-2), "along the seq axis"),
        (lambda *a: qk_norm_attention(*a, causal=False), "no causal mask"),
        (lambda *a: qk_norm_attention(*a, scale=1.0), "sqrt(d_head)"),
        (lambda *a: qk_norm_attention(*a, tri=np.triu), "hides the past"),
        (lambda q, k, v, gq, gk: rotary_attention(rms_norm(q, gq, eps=1e-6),
                                                  rms_norm(k, gk, eps=1e-6), v), "eps = 1e-6"),
    ],
    alternatives=[qk_norm_attention, qk_norm_attention_torch,
                  lambda q, k, v, gq, gk: rotary_attention(rms_norm(q, gq), rms_norm(k, gk), v)],
))

globals().update(meta_tests(DECLARED))
