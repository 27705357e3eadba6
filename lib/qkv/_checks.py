"""Input checks shared by ``qkv.np`` and ``qkv.pt``.

Written once for both backends: they only touch ``.shape``, ``.ndim`` and ``.dtype``, which NumPy
arrays and torch tensors both have. Every message starts with the name of the public function
that was called, then says what was expected and what arrived, e.g.

    scaled_dot_product_attention: q and k must share d_head; got q (2, 5, 8) and k (2, 5, 16)
"""

import re
from math import prod
from numbers import Integral

# The parameters of one decoder block, as ``decoder_block`` expects them (both backends).
BLOCK_PARAM_KEYS = (
    "ln1_gamma", "ln1_beta", "w_qkv", "b_qkv", "w_out", "b_out",
    "ln2_gamma", "ln2_beta", "w_fc", "b_fc", "w_proj", "b_proj",
)
# QK-norm's two extra parameters, (d_head,) each, with Arch(qk_norm=True).
QK_NORM_KEYS = ("q_norm_gamma", "k_norm_gamma")

# Where Hugging Face's GPT-2 (GPT2LMHeadModel) keeps each of those, under transformer.h.{i}.
# Its Conv1D layers store weights (d_in, d_out) like qkv, so they load without transposing.
GPT2_BLOCK_KEYS = {
    "ln1_gamma": "ln_1.weight", "ln1_beta": "ln_1.bias",
    "w_qkv": "attn.c_attn.weight", "b_qkv": "attn.c_attn.bias",
    "w_out": "attn.c_proj.weight", "b_out": "attn.c_proj.bias",
    "ln2_gamma": "ln_2.weight", "ln2_beta": "ln_2.bias",
    "w_fc": "mlp.c_fc.weight", "b_fc": "mlp.c_fc.bias",
    "w_proj": "mlp.c_proj.weight", "b_proj": "mlp.c_proj.bias",
}
GPT2_TOP_KEYS = ("transformer.wte.weight", "transformer.wpe.weight",
                 "transformer.ln_f.weight", "transformer.ln_f.bias")
# Per-block buffers (the causal mask) that some transformers versions save: not weights.
GPT2_BLOCK_BUFFERS = ("attn.bias", "attn.masked_bias")


def shape_of(x) -> tuple[int, ...]:
    """The shape as a plain tuple of ints, so it prints the same for arrays and tensors."""
    return tuple(int(n) for n in x.shape)


def dtype_kind(x) -> str:
    """NumPy's one-letter dtype kind, also for torch tensors.

    'f' float, 'i' signed int, 'u' unsigned int, 'b' bool, 'c' complex.
    """
    dtype = x.dtype
    if hasattr(dtype, "kind"):  # NumPy dtype
        return dtype.kind
    if dtype.is_floating_point:  # torch dtype from here on
        return "f"
    if dtype.is_complex:
        return "c"
    if str(dtype) == "torch.bool":
        return "b"
    return "i" if dtype.is_signed else "u"


def _noun(x) -> str:
    return "array" if hasattr(x.dtype, "kind") else "tensor"


def _require_array(fn: str, name: str, x) -> None:
    if not (hasattr(x, "shape") and hasattr(x, "dtype")):
        raise TypeError(f"{fn}: {name} must be an array or tensor; got {type(x).__name__}")


def check_float(fn: str, name: str, x) -> None:
    """TypeError unless ``x`` holds floats."""
    _require_array(fn, name, x)
    if dtype_kind(x) != "f":
        raise TypeError(f"{fn}: {name} must be a float {_noun(x)}; got dtype {x.dtype}")


def check_bool(fn: str, name: str, x) -> None:
    """TypeError unless ``x`` holds booleans (masks: True = may attend)."""
    _require_array(fn, name, x)
    if dtype_kind(x) != "b":
        raise TypeError(f"{fn}: {name} must be a bool {_noun(x)} (True = may attend); "
                        f"got dtype {x.dtype}")


def check_ndim(fn: str, name: str, x, ndim: int, layout: str) -> None:
    """ValueError unless ``x`` has exactly ``ndim`` dims; ``layout`` names them."""
    if x.ndim != ndim:
        raise ValueError(f"{fn}: {name} must have shape {layout}; got {name} {shape_of(x)}")


def check_min_ndim(fn: str, name: str, x, min_ndim: int, layout: str) -> None:
    """ValueError unless ``x`` has at least ``min_ndim`` dims (``layout`` starts with ...)."""
    if x.ndim < min_ndim:
        raise ValueError(f"{fn}: {name} must have shape {layout}; got {name} {shape_of(x)}")


def check_same(fn: str, what: str, a_name: str, a, a_axis: int, b_name: str, b, b_axis: int):
    """ValueError unless ``a.shape[a_axis] == b.shape[b_axis]`` (a dimension they must share)."""
    if a.shape[a_axis] != b.shape[b_axis]:
        raise ValueError(f"{fn}: {a_name} and {b_name} must share {what}; "
                         f"got {a_name} {shape_of(a)} and {b_name} {shape_of(b)}")


def check_shape(fn: str, name: str, x, expected: tuple[int, ...], layout: str) -> None:
    """ValueError unless ``x`` has exactly the shape ``expected`` (``layout`` names the dims)."""
    if shape_of(x) != tuple(expected):
        raise ValueError(f"{fn}: {name} must have shape {layout} = {tuple(expected)}; "
                         f"got {name} {shape_of(x)}")


def broadcast_shape(a: tuple[int, ...], b: tuple[int, ...]) -> tuple[int, ...] | None:
    """NumPy/torch broadcasting of two shapes; None when they do not broadcast."""
    a, b = tuple(a), tuple(b)
    n = max(len(a), len(b))
    a, b = (1,) * (n - len(a)) + a, (1,) * (n - len(b)) + b
    out = []
    for m, k in zip(a, b, strict=True):
        if m != k and 1 not in (m, k):
            return None
        out.append(k if m == 1 else m)
    return tuple(out)


def check_mask(fn: str, mask, target: tuple[int, ...], layout: str) -> None:
    """TypeError unless ``mask`` is bool; ValueError unless it broadcasts to ``target`` exactly."""
    check_bool(fn, "mask", mask)
    if mask.ndim > len(target) or broadcast_shape(shape_of(mask), target) != tuple(target):
        raise ValueError(f"{fn}: mask must broadcast to {layout} = {tuple(target)}; "
                         f"got mask {shape_of(mask)}")


def check_n_head(fn: str, d_model: int, n_head: int) -> None:
    """ValueError unless the heads split d_model evenly (d_head = d_model / n_head)."""
    if not isinstance(n_head, Integral) or n_head <= 0 or d_model % n_head != 0:
        raise ValueError(f"{fn}: n_head must be a positive int dividing d_model; "
                         f"got d_model {d_model} and n_head {n_head}")


def check_token_ids(fn: str, name: str, ids, vocab: int, ignore_index: int | None = None):
    """TypeError unless ``ids`` are integers; ValueError if one lies outside [0, vocab).

    Positions equal to ``ignore_index`` (cross-entropy padding) are not range-checked.
    """
    _require_array(fn, name, ids)
    if dtype_kind(ids) not in "iu":
        raise TypeError(f"{fn}: {name} must be an integer {_noun(ids)} of token ids; "
                        f"got dtype {ids.dtype}")
    if ignore_index is not None:
        ids = ids[ids != ignore_index]
    if prod(shape_of(ids)) == 0:
        return
    lo, hi = int(ids.min()), int(ids.max())
    if lo < 0 or hi >= vocab:
        bad = lo if lo < 0 else hi
        raise ValueError(f"{fn}: {name} must lie in [0, vocab) with vocab {vocab}; "
                         f"got id {bad}")


def check_keys(fn: str, params: dict, keys) -> None:
    """KeyError naming every missing parameter."""
    missing = [k for k in keys if k not in params]
    if missing:
        raise KeyError(f"{fn}: params is missing {missing}")


def check_attention(fn: str, q, k, v, mask) -> None:
    """All input checks of scaled_dot_product_attention, shared by both backends.

    q (..., seq_q, d_head), k (..., seq_k, d_head), v (..., seq_k, d_v),
    mask None or bool broadcastable to (..., seq_q, seq_k).
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_float(fn, name, t)
    check_min_ndim(fn, "q", q, 2, "(..., seq_q, d_head)")
    check_min_ndim(fn, "k", k, 2, "(..., seq_k, d_head)")
    check_min_ndim(fn, "v", v, 2, "(..., seq_k, d_v)")
    check_same(fn, "d_head", "q", q, -1, "k", k, -1)
    check_same(fn, "seq_k", "k", k, -2, "v", v, -2)
    batch = broadcast_shape(shape_of(q)[:-2], shape_of(k)[:-2])
    if batch is None or broadcast_shape(batch, shape_of(v)[:-2]) is None:
        raise ValueError(f"{fn}: the leading (batch) dims of q, k and v must broadcast; "
                         f"got q {shape_of(q)}, k {shape_of(k)} and v {shape_of(v)}")
    if mask is not None:
        target = broadcast_shape(batch, shape_of(v)[:-2]) + (q.shape[-2], k.shape[-2])
        check_mask(fn, mask, target, "(..., seq_q, seq_k)")


def check_gpt2_state_dict(fn: str, state_dict) -> int:
    """Check the keys of a GPT-2 (GPT2LMHeadModel) state dict; return its n_layer.

    KeyError listing every missing and every unexpected key. The per-block buffers in
    GPT2_BLOCK_BUFFERS are ignored; lm_head.weight may be absent (tied to wte), but if present
    it must equal transformer.wte.weight (ValueError otherwise: qkv always ties them).
    """
    keys = set(state_dict)
    layers = {int(m.group(1)) for key in keys if (m := re.match(r"transformer\.h\.(\d+)\.", key))}
    n_layer = max(layers) + 1 if layers else 0
    blocks = [f"transformer.h.{i}." for i in range(n_layer)]
    expected = set(GPT2_TOP_KEYS) | {b + k for b in blocks for k in GPT2_BLOCK_KEYS.values()}
    allowed = expected | {"lm_head.weight"} | {b + k for b in blocks for k in GPT2_BLOCK_BUFFERS}
    missing, unexpected = sorted(expected - keys), sorted(keys - allowed)
    if missing or unexpected:
        raise KeyError(f"{fn}: not a GPT-2 (GPT2LMHeadModel) state dict; "
                       f"missing keys {missing}, unexpected keys {unexpected}")
    wte = state_dict["transformer.wte.weight"]
    check_ndim(fn, "transformer.wte.weight", wte, 2, "(vocab, d_model)")
    check_ndim(fn, "transformer.wpe.weight", state_dict["transformer.wpe.weight"], 2,
               "(context, d_model)")
    head = state_dict.get("lm_head.weight")
    if head is not None and (shape_of(head) != shape_of(wte) or bool((head != wte).any())):
        raise ValueError(f"{fn}: lm_head.weight must equal transformer.wte.weight "
                         f"(qkv ties the unembedding to the embedding); got a different "
                         f"lm_head.weight {shape_of(head)}")
    return n_layer
