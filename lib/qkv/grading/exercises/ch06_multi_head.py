"""Chapter 6, multi-head attention: splitting and merging heads, counting the parameters of
one attention layer, and multi-head causal self-attention in NumPy and in PyTorch (the torch
version must keep its inputs' autograd graph and device)."""

from functools import partial
from itertools import permutations

import numpy as np

from .. import _trusted as _t
from ..engine import Case, Mistake, _normal
from ..exercise import Exercise
from ..kinds import Array, Value
from ..variants import mha_variant

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
        return [Case((_normal(rng, 5, 12), 3), names, _NO_BATCH, on_error=_NO_BATCH),
                Case((_normal(rng, 2, 4, 8), 2), names, "x is (batch, seq, d_model) here."),
                Case((_normal(rng, 2, 3, 6), 3), names)]
    rng = _t.default_rng(161)
    return [Case((_normal(rng, 1, 8), 1), names, "seq = 1 and n_head = 1 here."),
            Case((_normal(rng, 2, 2, 5, 12), 4), names, "x has two leading axes here."),
            Case((_normal(rng, 3, 6, 8, dtype=np.float32), 8), names,
                 "x is float32 and d_head = 1 here."),
            Case((_normal(rng, 4, 16), 4), names, _NO_BATCH, on_error=_NO_BATCH)]


def _merge_cases(hidden: bool):
    names = ("x",)
    if not hidden:
        rng = _t.default_rng(62)
        return [Case((_normal(rng, 3, 5, 4),), names, _NO_BATCH, on_error=_NO_BATCH),
                Case((_normal(rng, 2, 2, 4, 4),), names,
                     "x is (batch, n_head, seq, d_head) here."),
                Case((_normal(rng, 2, 3, 3, 2),), names)]
    rng = _t.default_rng(162)
    return [Case((_normal(rng, 1, 6, 8),), names, "n_head = 1 here."),
            Case((_normal(rng, 2, 2, 4, 5, 3),), names, "x has two leading axes here."),
            Case((_normal(rng, 8, 3, 1, dtype=np.float32),), names,
                 "x is float32 and d_head = 1 here."),
            Case((_normal(rng, 4, 1, 4),), names, "seq = 1 here.")]


SPLIT_HEADS = Exercise(
    name="split_heads",
    reference=_t.ref_split_heads,
    visible=lambda: _split_cases(False),
    hidden=lambda: _split_cases(True),
    mistakes=_split_mistakes,
    doc='split_heads(x, n_head): (..., seq, d_model) -> (..., n_head, seq, d_head).',
)


MERGE_HEADS = Exercise(
    name="merge_heads",
    reference=_t.ref_merge_heads,
    visible=lambda: _merge_cases(False),
    hidden=lambda: _merge_cases(True),
    mistakes=_merge_mistakes,
    doc='merge_heads(x): (..., n_head, seq, d_head) -> (..., seq, n_head * d_head).',
)


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


MHA_PARAM_COUNT = Exercise(
    name="mha_param_count",
    reference=_reference_mha_count,
    visible=lambda: _mha_count_cases(False),
    hidden=lambda: _mha_count_cases(True),
    mistakes=_mha_count_mistakes,
    output=Value("count"),
    backends=("numpy",),
    doc='mha_param_count(d_model, n_head, bias) -> parameters of one multi-head attention '
        'layer: w_qkv (d_model, 3 d_model), w_out (d_model, d_model), plus b_qkv and b_out if '
        'bias.',
)




# --- multi-head attention -----------------------------------------------------------------------


def _mha_mistakes(x, w_qkv, b_qkv, w_out, b_out, n_head):
    d_model = x.shape[-1]
    d_head = d_model // n_head
    variant = partial(partial, mha_variant)
    yield Mistake(
        f"{{name}} divides the scores by sqrt(d_model) = sqrt({d_model}) instead of sqrt(d_head) "
        f"= sqrt({d_head}): each head works in d_head = d_model / n_head dimensions.",
        variant(scale="d_model"))
    yield Mistake(
        f"{{name}} does not scale the scores: divide each head's q @ k^T by sqrt(d_head) = "
        f"sqrt({d_head}).",
        variant(scale="none"))
    yield Mistake(
        "{name} is not causal: it lets a position see the future. A decoder's self-attention "
        "masks keys j > i for query i (causal mask, -inf before the softmax).",
        variant(causal="none"))
    yield Mistake(
        "{name} uses the causal mask transposed, so each position sees the future instead of the "
        "past: query i may attend keys j <= i.",
        variant(causal="transposed"))
    for order in permutations(range(3)):
        if order != (0, 1, 2):
            used = ", ".join("QKV"[i] for i in order)
            yield Mistake(
                f"{{name}} takes q, k, v from the wrong columns of w_qkv (it used [{used}]): the "
                "columns are [Q | K | V], so q = qkv[..., :d_model], k = qkv[..., d_model:"
                "2*d_model], v = qkv[..., 2*d_model:].",
                variant(order=order))
    yield Mistake(
        "{name} splits the heads with a plain reshape to (..., n_head, seq, d_head), which mixes "
        "positions and features. Reshape to (..., seq, n_head, d_head), then swap the seq and "
        "n_head axes.",
        variant(split_ok=False))
    yield Mistake(
        "{name} merges the heads with a plain reshape from (..., n_head, seq, d_head), which mixes "
        "positions. Swap the n_head and seq axes first, then reshape to (..., seq, d_model).",
        variant(merge_ok=False))
    yield Mistake("{name} leaves out the output projection: end with out @ w_out + b_out.",
                  variant(out_proj=False))
    yield Mistake("{name} leaves out the bias b_qkv: qkv = x @ w_qkv + b_qkv.",
                  variant(qkv_bias=False))
    yield Mistake("{name} leaves out the bias b_out: out @ w_out + b_out.",
                  variant(out_bias=False))


def _mha_args(rng, shape, n_head, dtype=np.float64):
    d = shape[-1]
    return (_normal(rng, *shape, dtype=dtype), _normal(rng, d, 3 * d, scale=0.4, dtype=dtype),
            _normal(rng, 3 * d, scale=0.1, dtype=dtype), _normal(rng, d, d, scale=0.3, dtype=dtype),
            _normal(rng, d, scale=0.1, dtype=dtype), n_head)


def _mha_cases(hidden: bool):
    names = ("x", "w_qkv", "b_qkv", "w_out", "b_out", "n_head")
    if not hidden:
        rng = _t.default_rng(6)
        return [Case(_mha_args(rng, (5, 12), 3), names),
                Case(_mha_args(rng, (2, 6, 8), 2), names, "x is (batch, seq, d_model) here.")]
    rng = _t.default_rng(107)
    return [Case(_mha_args(rng, (4, 16), 4), names),
            Case(_mha_args(rng, (3, 8), 1), names, "n_head = 1: one head of size d_model."),
            Case(_mha_args(rng, (2, 5, 12), 3, dtype=np.float32), names, "x is float32 here."),
            Case(_mha_args(rng, (1, 8), 2), names, "seq = 1 here.")]


MULTI_HEAD_ATTENTION = Exercise(
    name="multi_head_attention",
    reference=_t.ref_multi_head_attention,
    visible=lambda: _mha_cases(False),
    hidden=lambda: _mha_cases(True),
    mistakes=_mha_mistakes,
    output=Array(tol32="float32_model"),
    doc='multi_head_attention(x, w_qkv, b_qkv, w_out, b_out, n_head): causal self-attention. x '
        '(..., seq, d_model); w_qkv (d_model, 3*d_model) with columns [Q | K | V]; b_qkv '
        '(3*d_model,); w_out (d_model, d_model); b_out (d_model,) -> (..., seq, d_model).',
)


# --- multi-head attention in PyTorch, on the GPU when there is one ------------------------------


class _OnDevice:
    """The learner's torch function, called with its float inputs on ``device`` and
    ``requires_grad=True``: the result must be a tensor on that device that keeps the autograd
    graph (a round trip through NumPy loses both). Keeps the learner's ``__code__`` so that an
    untouched exercise is still reported as "not implemented yet"."""

    def __init__(self, fn):
        torch = _t.load_torch()
        self.fn = fn
        self.device = torch.module.device("cuda" if torch.module.cuda.is_available() else "cpu")
        self.__code__ = getattr(fn, "__code__", None)
        self.returned = []

    def __call__(self, *args):
        torch = _t.torch_refs()
        moved = []
        for a in args:
            if _t.type_(a) is torch.Tensor:
                a = a.to(self.device)
                if a.dtype.is_floating_point:
                    a = a.detach().requires_grad_(True)
            moved.append(a)
        out = self.fn(*moved)
        is_tensor = _t.type_(out) is torch.Tensor
        self.returned.append((_t.type_(out), out.device if is_tensor else None,
                              bool(out.requires_grad) if is_tensor else False))
        return out

    def problem(self):
        torch = _t.torch_refs()
        name = "multi_head_attention_torch"
        for kind, on, graph in self.returned:
            if kind is not torch.Tensor:
                what = "a NumPy array" if kind is _t.ndarray else f"a {kind.__name__}"
                return (f"{name} returned {what}; this part is about PyTorch: compute with torch "
                        f"operations and return a tensor.")
            if on.type != self.device.type:
                return (f"{name} returned a tensor on {on}, but its inputs were on "
                        f"{self.device}: results stay on the inputs' device (no .cpu() or "
                        f".cuda() inside).")
            if not graph:
                return (f"{name} returned a tensor without an autograd graph, although its "
                        f"inputs had requires_grad=True: somewhere the computation left torch "
                        f"(.numpy(), .detach(), .item(), torch.tensor(...) of a result), so no "
                        f"gradient could flow back to the weights. Keep every step a torch "
                        f"operation on the tensors you were given.")
        return None


def _torch_cases(hidden: bool):
    hint = ("The inputs are torch tensors with requires_grad=True on the GPU if there is one, "
            "else the CPU: make every new tensor (a mask, say) on x.device, e.g. "
            "torch.ones(seq, seq, dtype=torch.bool, device=x.device).")
    return [Case(c.args, c.names, f"{c.note} {hint}" if c.note else hint)
            for c in _mha_cases(hidden)]


MULTI_HEAD_ATTENTION_TORCH = Exercise(
    name="multi_head_attention_torch",
    reference=_t.ref_multi_head_attention,
    visible=lambda: _torch_cases(False),
    hidden=lambda: _torch_cases(True),
    mistakes=_mha_mistakes,
    output=Array(tol32="float32_model"),
    backends=("torch",),
    wrap=_OnDevice,
    doc="multi_head_attention_torch(x, w_qkv, b_qkv, w_out, b_out, n_head) written with torch "
        "tensors: the same task as multi_head_attention; inputs are tensors on the GPU when "
        "there is one (requires_grad=True), and the result must be a tensor on that device "
        "that keeps the autograd graph.",
)


EXERCISES = [SPLIT_HEADS, MERGE_HEADS, MULTI_HEAD_ATTENTION, MHA_PARAM_COUNT,
             MULTI_HEAD_ATTENTION_TORCH]

# A checkpoint's layout (GPT-NeoX's per-head q/k/v to [Q | K | V]), declared in its own file.
from ._neox_layout import NEOX_TO_GPT2  # noqa: E402

EXERCISES.append(NEOX_TO_GPT2)
