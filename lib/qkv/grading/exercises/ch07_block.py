"""Chapter 7, residuals, layer norm and the feed-forward layer: layer_norm, gelu, mlp, whether a
block has residual connections, and the pre-LN decoder block.

Composite answers are diagnosed by parts when no catalogued mistake matches: GELU's constants
are read back from the learner's output, and the block is run with the reference's helpers
swapped in one at a time, then with one half switched off (see ``parts.py``).
"""

import math
from functools import partial

import numpy as np

from .. import _trusted as _t
from ..engine import Case, Mistake, _normal
from ..exercise import Exercise
from ..kinds import Array, Value
from ..parts import explain_block, explain_gelu
from ..variants import block_args, block_variant, layer_norm_variant

# --- layer norm ---------------------------------------------------------------------------------


def _layer_norm_mistakes(x, gamma, beta):
    variant = partial(partial, layer_norm_variant)
    yield Mistake(
        "{name} uses the unbiased variance (dividing by d_model - 1, like np.var(..., ddof=1) or "
        "torch.var's default). Layer norm divides by d_model: np.var(x, axis=-1, keepdims=True) "
        "(torch: unbiased=False).",
        variant(ddof=1))
    yield Mistake(
        "{name} puts eps outside the square root: (x - mean) / (sqrt(var) + eps). It belongs "
        "inside: (x - mean) / sqrt(var + eps).",
        variant(eps_outside=True))
    for eps in (0.0, 1e-12):  # told apart from each other only by a variance near 1e-12
        yield Mistake(
            "{name} leaves eps out (or uses one far below 1e-5, like 1e-12); use the eps "
            "argument, 1e-5 by default, inside the square root: sqrt(var + eps).",
            variant(eps=eps))
    for eps in (1e-8, 1e-6, 1e-3):
        yield Mistake(
            f"{{name}} uses eps = {eps:g}; use the eps argument, 1e-5 by default, inside the "
            "square root: sqrt(var + eps).",
            variant(eps=eps))
    yield Mistake(
        "{name} does not subtract the mean: x_hat = (x - mean) / sqrt(var + eps).",
        variant(center=False))
    yield Mistake(
        "{name} uses the mean of x**2 as the variance; the variance is the mean of "
        "(x - mean)**2.",
        variant(raw_second_moment=True))
    for axis in range(-x.ndim, -1):
        yield Mistake(
            f"{{name}} normalizes along axis {axis} instead of the last axis: each vector "
            "x[..., :] (one position's d_model features) gets its own mean and variance. Use "
            "axis=-1, keepdims=True.",
            variant(axis=axis))
    yield Mistake(
        "{name} forgets to scale by gamma: return x_hat * gamma + beta.",
        variant(use_gamma=False))
    yield Mistake(
        "{name} forgets to add beta: return x_hat * gamma + beta.",
        variant(use_beta=False))
    yield Mistake(
        "{name} swaps gamma and beta: gamma scales, beta shifts (x_hat * gamma + beta).",
        variant(swap=True))


def _ln_args(rng, *shape, scale=2.0, shift=1.0, dtype=np.float64):
    d = shape[-1]
    x = _normal(rng, *shape, scale=scale, dtype=dtype) + shift
    gamma = (1.0 + 0.3 * rng.normal(size=d)).astype(dtype)
    beta = (0.5 * rng.normal(size=d)).astype(dtype)
    return x, gamma, beta


def _layer_norm_cases(hidden: bool):
    names = ("x", "gamma", "beta")
    if not hidden:
        rng = _t.default_rng(4)
        return [
            Case(_ln_args(rng, 4, 8), names),
            Case(_ln_args(rng, 2, 3, 6), names, "x is (batch, seq, d_model) = (2, 3, 6) here."),
            Case(_ln_args(rng, 3, 8, scale=1e-3, shift=0.0), names,
                 "The rows here have a tiny variance (about 1e-6), so where eps goes matters."),
        ]
    rng = _t.default_rng(105)
    constant = _ln_args(rng, 2, 5)
    constant[0][0] = 3.0  # first row constant: variance 0
    return [
        Case(constant, names, "x[0] is constant: its variance is 0 and eps keeps it finite."),
        Case(_ln_args(rng, 5, 16, dtype=np.float32), names, "x is float32 here."),
        Case(_ln_args(rng, 3, 2), names),
        Case(_ln_args(rng, 4, 10, scale=1e3, shift=-50.0), names),
        Case(_ln_args(rng, 2, 2, 3, 8), names),
    ]


LAYER_NORM = Exercise(
    name="layer_norm",
    reference=_t.ref_layer_norm,
    visible=lambda: _layer_norm_cases(False),
    hidden=lambda: _layer_norm_cases(True),
    mistakes=_layer_norm_mistakes,
    doc='layer_norm(x, gamma, beta) over the last axis, biased variance, eps=1e-5 inside the '
        'sqrt; x (..., d_model), gamma and beta (d_model,).',
)


# --- GELU ---------------------------------------------------------------------------------------


_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)


def _gelu_tanh(x, c=0.044715, k=_SQRT_2_OVER_PI, half=0.5, power=3):
    return half * x * (1.0 + np.tanh(k * (x + c * x**power)))


def _gelu_mistakes(x):
    exact = np.frompyfunc(lambda z: 0.5 * z * (1.0 + _t.erf(z / math.sqrt(2.0))), 1, 1)
    yield Mistake(
        "{name} computes the exact GELU, x * Phi(x) with erf; the course (like GPT-2) uses the "
        "tanh approximation 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))).",
        lambda x: exact(x).astype(np.float64))
    yield Mistake(
        "{name} computes a ReLU, max(x, 0); GELU is 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 "
        "x^3))), smooth and slightly negative for small negative x.",
        lambda x: np.maximum(x, 0.0))
    yield Mistake(
        "{name} uses the sigmoid approximation x * sigmoid(1.702 x); use the tanh form "
        "0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))).",
        lambda x: x / (1.0 + np.exp(-1.702 * x)))
    yield Mistake("{name} is missing the factor 0.5 in front: 0.5 x (1 + tanh(...)).",
                  partial(_gelu_tanh, half=1.0))
    yield Mistake("{name} uses sqrt(2 pi); the constant is sqrt(2 / pi) (about 0.7979).",
                  partial(_gelu_tanh, k=math.sqrt(2.0 * math.pi)))
    yield Mistake("{name} leaves out the cubic term: tanh(sqrt(2/pi) (x + 0.044715 x^3)).",
                  partial(_gelu_tanh, c=0.0))
    yield Mistake("{name} uses x^2 in the cubic term; it is 0.044715 x^3.",
                  partial(_gelu_tanh, power=2))
    for c in (0.44715, 0.0044715):
        yield Mistake(f"{{name}} uses the coefficient {c}; it is 0.044715.",
                      partial(_gelu_tanh, c=c))


def _gelu_cases(hidden: bool):
    if not hidden:
        rng = _t.default_rng(5)
        return [Case((np.linspace(-5.0, 5.0, 21),), ("x",)),
                Case((_normal(rng, 3, 7, scale=2.0),), ("x",))]
    rng = _t.default_rng(106)
    return [Case((_normal(rng, 4, 5, scale=3.0, dtype=np.float32),), ("x",), "x is float32 here."),
            Case((np.linspace(-30.0, 30.0, 13),), ("x",), "Large |x|: GELU(x) is about x or 0."),
            Case((_normal(rng, 2, 3, 4),), ("x",))]


GELU = Exercise(
    name="gelu",
    reference=_t.ref_gelu,
    visible=lambda: _gelu_cases(False),
    hidden=lambda: _gelu_cases(True),
    mistakes=_gelu_mistakes,
    explain=explain_gelu,
    doc='gelu(x) = 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))), elementwise.',
)



# --- the MLP --------------------------------------------------------------------------------


def _mlp_variant(x, w_fc, b_fc, w_proj, b_proj, *, act=None, fc_bias=True, proj_bias=True,
                 bias_after_act=False, act_on_output=False, act_twice=False, residual=False):
    act = _t.ref_gelu if act is None else act
    h = x @ w_fc
    if bias_after_act:
        h = act(h) + b_fc
    elif act_on_output:
        h = h + b_fc
    else:
        h = act(h + (b_fc if fc_bias else 0.0))
    out = h @ w_proj + (b_proj if proj_bias else 0.0)
    if act_on_output or act_twice:
        out = act(out)
    return x + out if residual else out


def _gelu_exact(h):
    exact = np.frompyfunc(lambda z: 0.5 * z * (1.0 + _t.erf(z / math.sqrt(2.0))), 1, 1)
    return exact(h).astype(np.float64)


def _mlp_mistakes(x, w_fc, b_fc, w_proj, b_proj):
    def variant(**knobs):
        return lambda *a: _mlp_variant(*a, **knobs)

    yield Mistake(
        "{name} uses a ReLU, max(0, h), as its nonlinearity; the MLP of GPT-2 uses GELU (tanh "
        "form): gelu(x @ w_fc + b_fc) @ w_proj + b_proj.",
        variant(act=lambda h: np.maximum(h, 0.0)))
    yield Mistake(
        "{name} uses the exact GELU, h * Phi(h) with erf; the course (like GPT-2) uses the tanh "
        "approximation 0.5 h (1 + tanh(sqrt(2/pi) (h + 0.044715 h^3))).",
        variant(act=_gelu_exact))
    yield Mistake(
        "{name} has no nonlinearity between its two matrices, so they act as one matrix "
        "(w_fc @ w_proj) in disguise. Apply GELU to the hidden layer: "
        "gelu(x @ w_fc + b_fc) @ w_proj + b_proj.",
        variant(act=lambda h: h))
    yield Mistake(
        "{name} applies GELU to its output instead of to the hidden layer: the bend goes "
        "between the two matrices, gelu(x @ w_fc + b_fc) @ w_proj + b_proj, and nothing comes "
        "after b_proj.",
        variant(act_on_output=True))
    yield Mistake(
        "{name} applies GELU twice, also to its output; only the hidden layer is bent: "
        "gelu(x @ w_fc + b_fc) @ w_proj + b_proj.",
        variant(act_twice=True))
    yield Mistake(
        "{name} adds b_fc after the GELU; the bias goes inside: gelu(x @ w_fc + b_fc).",
        variant(bias_after_act=True))
    yield Mistake("{name} leaves out the bias b_fc: gelu(x @ w_fc + b_fc).",
                  variant(fc_bias=False))
    yield Mistake("{name} leaves out the bias b_proj: ... @ w_proj + b_proj.",
                  variant(proj_bias=False))
    yield Mistake(
        "{name} adds x to its output. The residual connection belongs to the decoder block "
        "(x + mlp(ln_2(x))), not to the MLP: return gelu(x @ w_fc + b_fc) @ w_proj + b_proj.",
        variant(residual=True))
    yield Mistake(
        "{name} uses the sigmoid approximation h * sigmoid(1.702 h); use the tanh form "
        "0.5 h (1 + tanh(sqrt(2/pi) (h + 0.044715 h^3))).",
        variant(act=lambda h: h / (1.0 + np.exp(-1.702 * h))))


def _mlp_args(rng, shape, d_ff, dtype=np.float64):
    d = shape[-1]
    return (_normal(rng, *shape, dtype=dtype),
            _normal(rng, d, d_ff, scale=1.0 / math.sqrt(d), dtype=dtype),
            _normal(rng, d_ff, scale=0.5, dtype=dtype),
            _normal(rng, d_ff, d, scale=1.0 / math.sqrt(d_ff), dtype=dtype),
            _normal(rng, d, scale=0.5, dtype=dtype))


def _mlp_cases(hidden: bool):
    names = ("x", "w_fc", "b_fc", "w_proj", "b_proj")
    if not hidden:
        rng = _t.default_rng(701)
        return [Case(_mlp_args(rng, (5, 8), 32), names),
                Case(_mlp_args(rng, (2, 3, 6), 24), names, "x is (batch, seq, d_model) here.")]
    rng = _t.default_rng(7101)
    return [Case(_mlp_args(rng, (4, 8), 32, dtype=np.float32), names, "x is float32 here."),
            Case(_mlp_args(rng, (3, 4), 10), names,
                 "d_ff = 10 here, not 4 * d_model: take the sizes from the weights."),
            Case(_mlp_args(rng, (1, 16), 64), names, "seq = 1 here."),
            Case(_mlp_args(rng, (2, 2, 3, 8), 16), names)]


MLP = Exercise(
    name="mlp",
    reference=_t.ref_mlp,
    visible=lambda: _mlp_cases(False),
    hidden=lambda: _mlp_cases(True),
    mistakes=_mlp_mistakes,
    output=Array(tol32="float32_model"),
    doc='mlp(x, w_fc, b_fc, w_proj, b_proj) = gelu(x @ w_fc + b_fc) @ w_proj + b_proj. x (..., '
        'd_model), w_fc (d_model, d_ff), b_fc (d_ff,), w_proj (d_ff, d_model), b_proj '
        '(d_model,) -> (..., d_model); GELU in its tanh form.',
)


# --- does this block have residual connections? --------------------------------------------------


def _residual_truth(block, d_model):
    return _ANSWERS[block]


class _Block:
    """A decoder block handed to the learner: call it on (..., seq, d_model) arrays.

    Its repr names it without giving the answer away; the answer stays with the checker.
    """

    __slots__ = ("_forward", "_text")

    def __init__(self, text: str, forward):
        self._text = text
        self._forward = forward

    def __call__(self, x):
        return self._forward(_t.asarray(x, dtype=_t.float64))

    def __repr__(self):
        return self._text


def _random_block(rng, d: int, scale: float) -> dict:
    """One block's weights; ``scale`` sets how large the two branches' outputs are."""
    def w(*shape, sd):
        return rng.normal(size=shape) * sd

    return dict(ln1_gamma=1.0 + w(d, sd=0.1), ln1_beta=w(d, sd=0.1),
                w_qkv=w(d, 3 * d, sd=scale / math.sqrt(d)), b_qkv=w(3 * d, sd=0.1 * scale),
                w_out=w(d, d, sd=scale / math.sqrt(d)), b_out=w(d, sd=0.1 * scale),
                ln2_gamma=1.0 + w(d, sd=0.1), ln2_beta=w(d, sd=0.1),
                w_fc=w(d, 4 * d, sd=scale / math.sqrt(d)), b_fc=w(4 * d, sd=0.1 * scale),
                w_proj=w(4 * d, d, sd=scale / math.sqrt(4 * d)), b_proj=w(d, sd=0.1 * scale))


def _block_case(rng, number: int, d: int, n_head: int, scale: float, residual: bool, note: str):
    params = _random_block(rng, d, scale)

    def forward(x):
        return block_variant(x, params, n_head, attn_residual=residual, mlp_residual=residual)

    block = _Block(f"<decoder block {number}, d_model = {d}>", forward)
    _ANSWERS[block] = residual
    kind = ("This block HAS residual connections: x + attention(ln_1(x)), then "
            "x + mlp(ln_2(x))." if residual else
            "This block has NO residual connections: each sublayer's output replaces the stream, "
            "x = attention(ln_1(x)), then x = mlp(ln_2(x)).")
    return Case((block, d), ("block", "d_model"), f"{kind} {note}".strip()), residual


_ANSWERS = {}  # block -> whether it has residual connections (the answer stays here)
_BIG = ("Its weights are large, so its branches add far more than x itself: block(x) is far from "
        "x, and 'is the output close to the input?' cannot tell.")
_SMALL = "Its weights are tiny, so its branches add almost nothing."


def _residual_cases(hidden: bool):
    """[(Case, whether its block has residual connections), ...]"""
    if not hidden:
        rng = _t.default_rng(702)
        return [_block_case(rng, 1, 8, 2, 1.0, True, ""),
                _block_case(rng, 2, 8, 2, 1.0, False, ""),
                _block_case(rng, 3, 16, 4, 4.0, True, _BIG),
                _block_case(rng, 4, 12, 3, 0.01, False, _SMALL + " Its output is small."),
                _block_case(rng, 5, 12, 3, 0.01, True, _SMALL + " Its output is close to x.")]
    rng = _t.default_rng(7102)
    return [_block_case(rng, 1, 16, 4, 4.0, False, "Its weights are large."),
            _block_case(rng, 2, 4, 1, 1.0, True, "It has a single head."),
            _block_case(rng, 3, 24, 4, 8.0, True, _BIG),
            _block_case(rng, 4, 8, 2, 0.0, True, "Its weights are all zero, so each branch adds "
                                                 "only a constant."),
            _block_case(rng, 5, 8, 2, 0.0, False, "Its weights are all zero: it outputs a "
                                                  "constant."),
            _block_case(rng, 6, 32, 8, 2.0, False, ""),
            _block_case(rng, 7, 20, 5, 0.3, True, "")]


HAS_RESIDUALS = Exercise(
    name="has_residuals",
    reference=_residual_truth,
    visible=lambda: [case for case, _ in _residual_cases(False)],
    hidden=lambda: [case for case, _ in _residual_cases(True)],
    output=Value("flag", whole_run=True),
    backends=("numpy",),
    doc="has_residuals(block, d_model) -> True when the pre-LN block adds its sublayers' outputs "
        "to the stream (x + f(ln(x))), False when they replace it (f(ln(x))). block: a function "
        "from (..., seq, d_model) arrays to arrays of the same shape.",
)


# --- decoder block ------------------------------------------------------------------------------


def _block_mistakes(x, params, n_head):
    variant = partial(partial, block_variant)
    yield Mistake(
        "{name} is missing the residual connection around the attention: the first half of the "
        "block is x = x + attention(ln_1(x)), adding to x rather than replacing it.",
        variant(attn_residual=False))
    yield Mistake(
        "{name} is missing the residual connection around the MLP: the second half of the block "
        "is x = x + mlp(ln_2(x)), adding to x rather than replacing it.",
        variant(mlp_residual=False))
    yield Mistake(
        "{name} is missing both residual connections: x = x + attention(ln_1(x)), then "
        "x = x + mlp(ln_2(x)).",
        variant(attn_residual=False, mlp_residual=False))
    yield Mistake(
        "{name} is a post-LN block (layer norm after the residual add); this course uses pre-LN, "
        "like GPT-2: x = x + attention(ln_1(x)), then x = x + mlp(ln_2(x)).",
        variant(norm="post"))
    yield Mistake(
        "{name} normalizes the residual stream itself (x = ln_1(x), then x = x + attention(x)). "
        "Only the sublayer's input is normalized: x = x + attention(ln_1(x)).",
        variant(norm="stream"))
    yield Mistake(
        "{name} leaves out the layer norms: x = x + attention(ln_1(x)), then "
        "x = x + mlp(ln_2(x)).",
        variant(norm="none"))
    yield Mistake(
        "{name} swaps the two layer norms: ln_1 (ln1_gamma, ln1_beta) goes before the attention, "
        "ln_2 before the MLP.",
        variant(swap_norms=True))
    yield Mistake(
        "{name} runs the MLP before the attention; the attention comes first.",
        variant(mlp_first=True))
    yield Mistake(
        "{name} does not use a causal mask in the attention, so a position sees the future.",
        variant(causal=False))


def _block_cases(hidden: bool):
    names = ("x", "params", "n_head")
    if not hidden:
        rng = _t.default_rng(7)
        return [Case(block_args(rng, (5, 8), 2), names),
                Case(block_args(rng, (2, 4, 12), 3), names, "x is (batch, seq, d_model) here.")]
    rng = _t.default_rng(108)
    return [Case(block_args(rng, (6, 16), 4, dtype=np.float32), names, "x is float32 here."),
            Case(block_args(rng, (1, 8), 1), names, "seq = 1 and n_head = 1 here."),
            Case(block_args(rng, (3, 6, 8), 4), names)]


DECODER_BLOCK = Exercise(
    name="decoder_block",
    reference=_t.ref_decoder_block,
    visible=lambda: _block_cases(False),
    hidden=lambda: _block_cases(True),
    mistakes=_block_mistakes,
    output=Array(tol32="float32_model"),
    explain=explain_block,
    doc='decoder_block(x, params, n_head): pre-LN block, x + attn(ln_1(x)) then x + '
        'mlp(ln_2(x)). params holds ln1_gamma ln1_beta w_qkv b_qkv w_out b_out ln2_gamma '
        'ln2_beta w_fc b_fc w_proj b_proj (the qkv.np layout); x (..., seq, d_model) -> (..., '
        'seq, d_model).',
)


EXERCISES = [LAYER_NORM, GELU, MLP, HAS_RESIDUALS, DECODER_BLOCK]
