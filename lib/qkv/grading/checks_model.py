"""Checkers for chapters 7, 8 and 9: the decoder block's pieces, the whole model, and
backpropagation by hand.

They run on the engine of ``checks`` (``Case``, ``Mistake``, ``Spec``, ``_run``, ``_run_value``,
``_call``): same signature, same steps, same silence on a correct answer, same trusted references
(``_trusted``, captured when ``qkv.grading`` is imported) and ``_trusted.pristine()`` around all
of it. Three shapes of exercise are new here, each a thin layer over the engine's pieces:

- ``check_has_residuals``: a True/False answer about a block the checker hands the learner
  (``_run_value`` with ``whole_run``); the block's repr says nothing about the answer.
- ``check_init_params``: a dict of random weights, judged by its structure, its exact zeros and
  ones, the statistics of each matrix, its seeding, and the loss of the untrained model (about
  ln V). ``_init_problem`` says what is off.
- the backward checkers (``check_linear_backward`` and four more): a forward/backward pair.
  ``_run_pair`` calls the learner's forward (compared with ``qkv.np``), then the backward on a
  seeded upstream gradient and the learner's OWN cache, and compares every named gradient with
  qkv.np's (relative error at most TOL["float64_gradcheck"]). A failure names the gradient(s)
  that are wrong, the relative error against centred finite differences of the forward pass,
  and, when the learner's numbers match a known-wrong derivation, that mistake.
"""

import math
from dataclasses import dataclass

import numpy as np

from . import _trusted as _t
from ._legacy import (
    Case,
    Mistake,
    Spec,
    _as_array,
    _attempt,
    _block_variant,
    _call,
    _describe,
    _float64,
    _kind_of_object,
    _Learner,
    _mismatch,
    _normal,
    _plain_softmax,
    _raised,
    _run,
    _run_value,
    _shape,
    _with_note,
)
from .checks_attention import (
    _block_args,
)

_GRAD_TOL = _t.tolerances["float64_gradcheck"]["rel_err"]
_BLOCK_KEYS = ("ln1_gamma", "ln1_beta", "w_qkv", "b_qkv", "w_out", "b_out",
               "ln2_gamma", "ln2_beta", "w_fc", "b_fc", "w_proj", "b_proj")


def _quiet():
    """A context that silences numpy's floating-point warnings while trusted code runs."""
    return _t.errstate(all="ignore")


# ==============================================================================================
# Chapter 7: the MLP, and "does this block have residual connections?"
# ==============================================================================================


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


def check_mlp(mlp, hidden: bool = False, backend: str = "auto") -> None:
    """mlp(x, w_fc, b_fc, w_proj, b_proj) = gelu(x @ w_fc + b_fc) @ w_proj + b_proj.

    x (..., d_model), w_fc (d_model, d_ff), b_fc (d_ff,), w_proj (d_ff, d_model),
    b_proj (d_model,) -> (..., d_model); GELU in its tanh form.
    """
    spec = Spec("mlp", _t.ref_mlp, _mlp_mistakes, tol32="float32_model")
    _run(spec, mlp, _mlp_cases(hidden), backend)


# --- does this block have residual connections? --------------------------------------------------


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
        return _block_variant(x, params, n_head, attn_residual=residual, mlp_residual=residual)

    block = _Block(f"<decoder block {number}, d_model = {d}>", forward)
    kind = ("This block HAS residual connections: x + attention(ln_1(x)), then "
            "x + mlp(ln_2(x))." if residual else
            "This block has NO residual connections: each sublayer's output replaces the stream, "
            "x = attention(ln_1(x)), then x = mlp(ln_2(x)).")
    return Case((block, d), ("block", "d_model"), f"{kind} {note}".strip()), residual


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


def check_has_residuals(has_residuals, hidden: bool = False, backend: str = "auto") -> None:
    """has_residuals(block, d_model) -> True when the pre-LN block adds its sublayers' outputs
    to the stream (x + f(ln(x))), False when they replace it (f(ln(x))).

    block: a function from (..., seq, d_model) arrays to arrays of the same shape.
    """
    cases = _residual_cases(hidden)
    truth = {id(case.args[0]): residual for case, residual in cases}
    spec = Spec("has_residuals", lambda block, d_model: truth[id(block)], lambda *a: (),
                out="flag")
    _run_value(spec, has_residuals, [case for case, _ in cases], whole_run=True)


# ==============================================================================================
# Chapter 8: the whole model
# ==============================================================================================


def _params64(params):
    """A gpt params dict (blocks: a list of dicts) with every float array in float64."""
    def up(a):
        if _t.type_(a) is _t.ndarray and a.dtype.kind == "f":
            return _t.asarray(a, dtype=_t.float64)
        return a
    out = {k: up(v) for k, v in params.items() if k != "blocks"}
    out["blocks"] = [{k: up(v) for k, v in b.items()} for b in params["blocks"]]
    return out


class _OwnBlocks:
    """The learner's function, called with its own copy of ``params["blocks"]`` (a list, which
    the engine's copying leaves alone); remembers the first array it changed in place."""

    def __init__(self, fn, position: int):
        self.fn = fn
        self.position = position
        self.__code__ = getattr(fn, "__code__", None)  # "not implemented yet" keeps working
        self.changed = None

    def __call__(self, *args):
        args = list(args)
        params = dict(args[self.position])
        original = params["blocks"]
        params["blocks"] = [{k: v.copy() for k, v in b.items()} for b in original]
        args[self.position] = params
        try:
            return self.fn(*args)
        finally:
            for i, (before, after) in enumerate(zip(original, params["blocks"], strict=False)):
                for key, value in before.items():
                    now = after.get(key) if _t.type_(after) is dict else None
                    if self.changed is None and not (_t.type_(now) is _t.ndarray
                                                     and _t.identical(now, value)):
                        self.changed = f"params['blocks'][{i}][{key!r}]"


def _run_own_blocks(spec: Spec, fn, cases, position: int) -> None:
    if not _t.callable_(fn):
        _run(spec, fn, cases, "numpy")  # says "should be a function"
    learner = _OwnBlocks(fn, position)
    _run(spec, learner, cases, "numpy")
    if learner.changed is not None:
        raise AssertionError(
            f"{spec.name} changed {learner.changed} in place (for example with `+=` or "
            f"`[...] =`). Leave the weights alone and build new arrays instead.")


def _reference_gpt(token_ids, params, n_head):
    return _t.ref_gpt_forward(token_ids, _params64(params), n_head)


def _gpt_variant(ids, params, n_head, *, positions="add", causal=True, final_ln=True,
                 unembed="wte", blocks="all", scale_tokens=False, out="logits"):
    p = _params64(params)
    wte, wpe = p["wte"], p["wpe"]
    seq = ids.shape[-1]
    x = wte[ids]
    if scale_tokens:
        x = x * math.sqrt(wte.shape[1])
    if positions == "add":
        x = x + wpe[:seq]
    elif positions == "by id":
        x = x + wpe[ids]
    elif positions == "from 1":
        x = x + wpe[1:seq + 1]
    stack = p["blocks"]
    stack = {"all": stack, "reversed": stack[::-1], "first": stack[:1] * len(stack),
             "only first": stack[:1], "only last": stack[-1:], "none": []}[blocks]
    for block in stack:
        x = _block_variant(x, block, n_head, causal=causal)
    if final_ln:
        x = _t.ref_layer_norm(x, p["lnf_gamma"], p["lnf_beta"])
    logits = x @ (wte if unembed == "wte" else wpe).T
    if out == "probs":
        return _t.ref_softmax(logits)
    if out == "last":
        return logits[..., -1, :]
    return logits


def _gpt_mistakes(token_ids, params, n_head):
    def variant(**knobs):
        return lambda *a: _gpt_variant(*a, **knobs)

    yield Mistake(
        "{name} leaves out the final layer norm: after the last block, "
        "H = layer_norm(x, params['lnf_gamma'], params['lnf_beta']), and the logits are "
        "H @ params['wte'].T.",
        variant(final_ln=False))
    yield Mistake(
        "{name} does not add the position embeddings: X(0) = wte[token_ids] + wpe[:seq], so "
        "that the model knows where each token is.",
        variant(positions="none"))
    yield Mistake(
        "{name} looks the position vectors up by token id (wpe[token_ids]). Row p of wpe "
        "belongs to POSITION p: add wpe[:seq], the same rows for every sequence.",
        variant(positions="by id"))
    yield Mistake(
        "{name} starts the positions at 1 (wpe[1:seq + 1]); the first token sits at position "
        "0: add wpe[:seq].",
        variant(positions="from 1"))
    yield Mistake(
        "{name} lets each position see the future: the attention inside your decoder_block is "
        "not causal. Query i may attend keys j <= i only (the causal mask, -inf before the "
        "softmax); check your decoder_block with check_decoder_block.",
        variant(causal=False))
    yield Mistake(
        "{name} unembeds with wpe, the position table. The unembedding is tied to the TOKEN "
        "table: logits = H @ params['wte'].T, one score per vocabulary entry, shape "
        "(..., seq, vocab).",
        variant(unembed="wpe"))
    yield Mistake(
        "{name} returns probabilities (a softmax of the logits); return the logits "
        "H @ params['wte'].T themselves. The softmax comes later (in the loss, or in "
        "next_token_probs).",
        variant(out="probs"))
    yield Mistake(
        "{name} returns only the last position's logits. Return the logits of every position, "
        "shape (..., seq, vocab): row t scores the token that comes after position t.",
        variant(out="last"))
    yield Mistake(
        "{name} runs the blocks in reverse order; params['blocks'][0] is the first block the "
        "embeddings go through.",
        variant(blocks="reversed"))
    yield Mistake(
        "{name} applies params['blocks'][0] every time; each block has its own weights: "
        "`for block in params['blocks']: x = decoder_block(x, block, n_head)`.",
        variant(blocks="first"))
    yield Mistake("{name} applies only the first block; run them all, in order.",
                  variant(blocks="only first"))
    yield Mistake("{name} applies only the last block; run them all, in order.",
                  variant(blocks="only last"))
    yield Mistake("{name} skips the decoder blocks; run x through every one of "
                  "params['blocks'], in order.", variant(blocks="none"))
    yield Mistake(
        "{name} multiplies the token embeddings by sqrt(d_model), as the 2017 Transformer did; "
        "GPT-2 adds wte[token_ids] and wpe[:seq] as they are.",
        variant(scale_tokens=True))


def _gpt_params(rng, vocab, context, n_layer, d_model, n_head, dtype=np.float64):
    blocks = [_block_args(rng, (1, d_model), n_head, dtype=dtype)[1] for _ in range(n_layer)]
    return dict(wte=_normal(rng, vocab, d_model, scale=0.5, dtype=dtype),
                wpe=_normal(rng, context, d_model, scale=0.5, dtype=dtype),
                blocks=blocks,
                lnf_gamma=(1.0 + 0.2 * rng.normal(size=d_model)).astype(dtype),
                lnf_beta=(0.2 * rng.normal(size=d_model)).astype(dtype))


def _gpt_case(rng, ids_shape, vocab, context, n_layer, d_model, n_head, note="",
              dtype=np.float64):
    params = _gpt_params(rng, vocab, context, n_layer, d_model, n_head, dtype)
    ids = rng.integers(0, vocab, size=ids_shape)
    return Case((ids, params, n_head), ("token_ids", "params", "n_head"), note)


def _gpt_cases(hidden: bool):
    if not hidden:
        rng = _t.default_rng(801)
        return [_gpt_case(rng, (6,), 8, 10, 2, 8, 2, "2 blocks, vocab = 8, context = 10."),
                _gpt_case(rng, (2, 5), 13, 7, 1, 12, 3,
                          "token_ids is a batch of 2 sequences here, shape (2, 5).")]
    rng = _t.default_rng(8101)
    return [_gpt_case(rng, (3, 6), 10, 6, 2, 8, 2, "float32 weights, and seq = context here.",
                      dtype=np.float32),
            _gpt_case(rng, (1,), 5, 4, 3, 16, 4, "A single token here (seq = 1)."),
            _gpt_case(rng, (7,), 9, 12, 0, 8, 2,
                      "params['blocks'] is empty here: embeddings, final layer norm, unembedding."),
            _gpt_case(rng, (2, 4), 20, 8, 3, 8, 1, "3 blocks with one head each.")]


def check_gpt_forward(gpt_forward, hidden: bool = False, backend: str = "numpy") -> None:
    """gpt_forward(token_ids, params, n_head) -> logits (..., seq, vocab).

    token_ids (..., seq) integers; params: wte (vocab, d_model), wpe (context, d_model), blocks
    (a list of decoder-block dicts), lnf_gamma, lnf_beta. Embed + positions, the blocks, the
    final layer norm, and the tied unembedding H @ wte.T. NumPy only.
    """
    spec = Spec("gpt_forward", _reference_gpt, _gpt_mistakes, tol32="float32_model")
    _run_own_blocks(spec, gpt_forward, _gpt_cases(hidden), position=1)


# --- counting the parameters ----------------------------------------------------------------------


def _reference_count(vocab, context, n_layer, d_model):
    return 12 * n_layer * d_model**2 + 13 * n_layer * d_model + (vocab + context + 2) * d_model


def _count_mistakes(vocab, context, n_layer, d_model):
    V, C, L, d = vocab, context, n_layer, d_model
    right = _reference_count(V, C, L, d)
    yield Mistake(
        "{name} counts the unembedding as a separate (d_model, vocab) matrix. It is tied: the "
        "logits are H @ wte.T, so the token table is counted once.",
        lambda *a: right + V * d)
    yield Mistake(
        "{name} leaves out the biases: per block b_qkv (3 d), b_out (d), b_fc (4 d) and "
        "b_proj (d), 9 d in all.",
        lambda *a: right - 9 * L * d)
    yield Mistake(
        "{name} leaves out the layer norms: two per block and the final one, each with a gamma "
        "and a beta of d_model numbers.",
        lambda *a: right - 4 * L * d - 2 * d)
    yield Mistake(
        "{name} leaves out the final layer norm (lnf_gamma and lnf_beta, 2 d_model numbers).",
        lambda *a: right - 2 * d)
    yield Mistake(
        "{name} leaves out the blocks' layer norms: ln_1 and ln_2, a gamma and a beta each, "
        "4 d_model numbers per block.",
        lambda *a: right - 4 * L * d)
    yield Mistake(
        "{name} counts each layer norm as d_model numbers; it has two vectors, gamma and beta.",
        lambda *a: right - 2 * L * d - d)
    yield Mistake(
        "{name} counts the MLP's weights as 4 d^2. It has two matrices, w_fc (d, 4d) and "
        "w_proj (4d, d): 8 d^2.",
        lambda *a: right - 4 * L * d * d)
    yield Mistake(
        "{name} counts the MLP as d_model wide inside; it widens to d_ff = 4 d_model: "
        "w_fc (d, 4d), b_fc (4d), w_proj (4d, d).",
        lambda *a: right - 6 * L * d * d - 3 * L * d)
    yield Mistake(
        "{name} counts w_qkv as d_model x d_model; it holds W_Q, W_K and W_V side by side: "
        "(d_model, 3 d_model), with 3 d_model biases.",
        lambda *a: right - 2 * L * d * d - 2 * L * d)
    yield Mistake("{name} leaves out the attention's output projection, w_out (d, d) and "
                  "b_out (d).", lambda *a: right - L * (d * d + d))
    yield Mistake("{name} leaves out the position table wpe (context x d_model).",
                  lambda *a: right - C * d)
    yield Mistake("{name} leaves out the token table wte (vocab x d_model).",
                  lambda *a: right - V * d)
    yield Mistake("{name} leaves out the embeddings wte and wpe: count (vocab + context) "
                  "x d_model for them.", lambda *a: right - (V + C) * d)
    yield Mistake(
        "{name} returns the estimate 12 n_layer d_model^2; the exact count also has the biases, "
        "the layer norms and the embeddings: 12 L d^2 + 13 L d + (V + C + 2) d.",
        lambda *a: 12 * L * d * d)


def _count_cases(hidden: bool):
    names = ("vocab", "context", "n_layer", "d_model")
    if not hidden:
        return [Case((10, 8, 2, 16), names),
                Case((65, 256, 6, 384), names, "These are the sizes of the chapter's check-"
                     "yourself question 1.")]
    return [Case((50257, 1024, 12, 768), names, "These are the sizes of GPT-2 small: "
                 "124,439,808 parameters."),
            Case((50257, 1024, 48, 1600), names, "These are the sizes of GPT-2 XL."),
            Case((7, 5, 0, 4), names, "n_layer = 0 here: embeddings and the final layer norm."),
            Case((1000, 64, 3, 1), names, "d_model = 1 here.")]


def check_count_parameters(count_parameters, hidden: bool = False,
                           backend: str = "auto") -> None:
    """count_parameters(vocab, context, n_layer, d_model) -> the exact number of parameters of a
    GPT-2-style model with biases and a tied unembedding: 12 L d^2 + 13 L d + (V + C + 2) d."""
    spec = Spec("count_parameters", _reference_count, _count_mistakes, out="count")
    try:
        _run_value(spec, count_parameters, _count_cases(hidden))
    except AssertionError as exc:  # the engine's generic count message speaks of one layer
        raise AssertionError(str(exc).replace(
            "Count every weight matrix and bias vector of the layer.",
            "Count the embeddings, every matrix, bias and layer norm of each block, and the "
            "final layer norm.")) from None


# --- next-token probabilities --------------------------------------------------------------------


def _reference_next(logits):
    return _t.ref_softmax(logits[..., -1, :])


def _next_mistakes(logits):
    yield Mistake(
        "{name} uses the FIRST position's logits; the next token after the sequence is "
        "predicted by the last row: softmax(logits[..., -1, :]).",
        lambda l: _t.ref_softmax(l[..., 0, :]))
    yield Mistake(
        "{name} returns the logits of the last position without the softmax; probabilities are "
        "softmax(logits[..., -1, :]), in [0, 1] and summing to 1.",
        lambda l: l[..., -1, :])
    yield Mistake(
        "{name} returns the probabilities of every position; only the last row predicts the "
        "next token: shape (..., vocab), softmax(logits[..., -1, :]).",
        lambda l: _t.ref_softmax(l))
    yield Mistake(
        "{name} applies the softmax over the positions (axis -2) instead of over the "
        "vocabulary (the last axis).",
        lambda l: _plain_softmax(l, axis=-2)[..., -1, :])
    yield Mistake(
        "{name} returns log-probabilities; return the probabilities, softmax(logits[..., -1, "
        ":]).",
        lambda l: np.log(_t.ref_softmax(l[..., -1, :])))
    yield Mistake(
        "{name} is not numerically stable: for {case} the logits are large and exp overflows. "
        "Subtract the row maximum before exponentiating.",
        lambda l: _plain_softmax(l[..., -1, :], stable=False))


def _next_cases(hidden: bool):
    if not hidden:
        rng = _t.default_rng(802)
        return [Case((_normal(rng, 5, 7, scale=2.0),), ("logits",)),
                Case((_normal(rng, 2, 4, 6, scale=2.0),), ("logits",),
                     "logits is (batch, seq, vocab) here: one distribution per sequence.")]
    rng = _t.default_rng(8102)
    return [Case((_normal(rng, 1, 10),), ("logits",), "seq = 1 here."),
            Case((_normal(rng, 3, 8, scale=500.0),), ("logits",), "The logits are large here."),
            Case((_normal(rng, 3, 2, 5, 4),), ("logits",), "Two batch axes here."),
            Case((_normal(rng, 4, 9, dtype=np.float32),), ("logits",), "float32 logits here.")]


def check_next_token_probs(next_token_probs, hidden: bool = False,
                           backend: str = "auto") -> None:
    """next_token_probs(logits) = softmax(logits[..., -1, :]): (..., seq, vocab) -> (..., vocab)."""
    spec = Spec("next_token_probs", _reference_next, _next_mistakes)
    _run(spec, next_token_probs, _next_cases(hidden), backend)


# --- GPT-2's initialisation -----------------------------------------------------------------------


_INIT_STD = 0.02
_GPT_KEYS = ("wte", "wpe", "blocks", "lnf_gamma", "lnf_beta")


def _init_shapes(vocab, context, n_layer, d_model):
    d = d_model
    top = {"wte": ((vocab, d), "(vocab, d_model)"), "wpe": ((context, d), "(context, d_model)"),
           "lnf_gamma": ((d,), "(d_model,)"), "lnf_beta": ((d,), "(d_model,)")}
    block = {"ln1_gamma": ((d,), "(d_model,)"), "ln1_beta": ((d,), "(d_model,)"),
             "w_qkv": ((d, 3 * d), "(d_model, 3 * d_model)"), "b_qkv": ((3 * d,), "(3 * d_model,)"),
             "w_out": ((d, d), "(d_model, d_model)"), "b_out": ((d,), "(d_model,)"),
             "ln2_gamma": ((d,), "(d_model,)"), "ln2_beta": ((d,), "(d_model,)"),
             "w_fc": ((d, 4 * d), "(d_model, 4 * d_model)"), "b_fc": ((4 * d,), "(4 * d_model,)"),
             "w_proj": ((4 * d, d), "(4 * d_model, d_model)"), "b_proj": ((d,), "(d_model,)")}
    return top, block


def _init_read(name, out, case):
    """The learner's params as {label: ndarray} (labels like "params['blocks'][1]['w_fc']"),
    after checking the structure; AssertionError saying what is missing or misshapen."""
    vocab, context, n_layer, d_model, _ = case.args
    top, block = _init_shapes(vocab, context, n_layer, d_model)
    where = _describe(case)
    if _t.type_(out) is not dict:
        raise AssertionError(f"{name} returned {_kind_of_object(out)} for {where}; it should "
                             f"return a dict with the keys {', '.join(_GPT_KEYS)}.")
    keys = [k for k in out if _t.type_(k) is str]
    if _t.len_(keys) != _t.len_(out) or set(keys) != set(_GPT_KEYS):
        missing = [k for k in _GPT_KEYS if k not in keys]
        extra = [repr(k) for k in out if not (_t.type_(k) is str and k in _GPT_KEYS)]
        raise AssertionError(
            f"{name} returned a dict with the wrong keys for {where}"
            + (f": missing {', '.join(missing)}" if missing else "")
            + (f"; unexpected {', '.join(extra)}" if extra else "")
            + f". The params dict of gpt_forward has exactly {', '.join(_GPT_KEYS)}.")
    blocks = out["blocks"]
    if not (_t.type_(blocks) is list or _t.type_(blocks) is tuple):
        raise AssertionError(f"{name} returned params['blocks'] as {_kind_of_object(blocks)} for "
                             f"{where}; it should be a list of n_layer = {n_layer} dicts.")
    if _t.len_(blocks) != n_layer:
        raise AssertionError(f"{name} returned {_t.len_(blocks)} blocks for {where}; there should "
                             f"be n_layer = {n_layer}.")
    arrays = {}
    for key, (shape, text) in top.items():
        arrays[f"params[{key!r}]"] = (out[key], shape, text)
    for i, b in enumerate(blocks):
        if _t.type_(b) is not dict:
            raise AssertionError(f"{name} returned params['blocks'][{i}] as {_kind_of_object(b)} "
                                 f"for {where}; each block is a dict of 12 arrays.")
        bkeys = [k for k in b if _t.type_(k) is str]
        if _t.len_(bkeys) != _t.len_(b) or set(bkeys) != set(_BLOCK_KEYS):
            missing = [k for k in _BLOCK_KEYS if k not in bkeys]
            raise AssertionError(
                f"{name} returned params['blocks'][{i}] with the wrong keys for {where}"
                + (f" (missing {', '.join(missing)})" if missing else "")
                + f"; a block has exactly {', '.join(_BLOCK_KEYS)}.")
        for key, (shape, text) in block.items():
            arrays[f"params['blocks'][{i}][{key!r}]"] = (b[key], shape, text)
    spec = Spec(name, None, None)
    result = {}
    for label, (value, shape, text) in arrays.items():
        arr = _as_array(spec, value, label, "float", case)
        if arr.shape != shape:
            raise AssertionError(f"{name} returned {label} with shape {_shape(arr)} for {where}; "
                                 f"expected {text} = {shape}.")
        result[label] = arr
    return result


def _init_target(label: str, n_layer: int):
    """(the intended standard deviation, how the matrix is described) of a weight matrix."""
    if label.endswith("['w_out']") or label.endswith("['w_proj']"):
        return _INIT_STD / math.sqrt(2 * n_layer), "0.02 / sqrt(2 * n_layer)"
    return _INIT_STD, "0.02"


def _init_problem(name, arrays, case):
    """What is wrong with a structurally sound params dict, in words; None if nothing is."""
    vocab, context, n_layer, d_model, seed = case.args
    where = _describe(case)
    # exact ones and zeros
    for label, a in arrays.items():
        key = label.rsplit("[", 1)[-1].strip("]'")
        if key.endswith("gamma") and not _t.equal(a, 1.0).all():
            return (f"{name} returned {label} with values other than 1 for {where}; every layer "
                    f"norm starts with gamma = 1 (np.ones(d_model)), so it starts as a plain "
                    f"normalisation.")
        if (key.endswith("beta") or key.startswith("b_")) and not _t.equal(a, 0.0).all():
            return (f"{name} returned {label} with values other than 0 for {where}; GPT-2 starts "
                    f"every bias and every layer-norm beta at 0 (np.zeros(...)).")
    # one block's arrays reused for another
    matrices = {label: a for label, a in arrays.items()
                if a.ndim == 2}
    seen = {}
    for label, a in matrices.items():
        for other, b in seen.items():
            if a.shape == b.shape and (a is b or _t.identical(a, b)):
                return (f"{name} returned the same numbers in {other} and {label} for {where}. "
                        f"Every matrix needs its own random draw: build a new dict for each "
                        f"block ([block] * n_layer, or reusing one dict, repeats the same arrays).")
        seen[label] = a
    # the statistics of each matrix
    for label, a in matrices.items():
        target, formula = _init_target(label, n_layer)
        n = a.size
        mean = float(a.mean())
        std = float(a.std())
        residual = formula != "0.02"
        if residual and abs(std / _INIT_STD - 1.0) < 0.12 and n_layer > 0:
            return (f"{name} returned {label} with standard deviation {std:.4f} for {where}; the "
                    f"two matrices that write into the residual stream, w_out and w_proj, start "
                    f"smaller: 0.02 / sqrt(2 * n_layer) = {target:.4f} here, so that the 2 * "
                    f"n_layer branches added to the stream do not make it grow with depth.")
        if residual and abs(std / (_INIT_STD / math.sqrt(n_layer)) - 1.0) < 0.12 and n_layer > 1:
            return (f"{name} returned {label} with standard deviation {std:.4f} for {where}: it "
                    f"divides 0.02 by sqrt(n_layer); divide by sqrt(2 * n_layer) (two residual "
                    f"branches per block), giving {target:.4f} here.")
        if not residual and n_layer > 0 and \
                abs(std / (_INIT_STD / math.sqrt(2 * n_layer)) - 1.0) < 0.12:
            return (f"{name} returned {label} with standard deviation {std:.4f} for {where}; only "
                    f"w_out and w_proj are scaled by 1 / sqrt(2 * n_layer). This matrix starts at "
                    f"0.02.")
        if abs(std - 1.0) < 0.12:
            return (f"{name} returned {label} with standard deviation {std:.3f} for {where}: a "
                    f"standard normal. GPT-2 draws its weights with standard deviation 0.02: "
                    f"rng.normal(0.0, {formula}, size=...).")
        if abs(std / target**2 - 1.0) < 0.12:
            return (f"{name} returned {label} with standard deviation {std:.2g} for {where}: it "
                    f"passes the variance ({target:.4g}**2) where rng.normal wants the standard "
                    f"deviation, scale={formula}.")
        if abs(mean) > 6.0 * target / math.sqrt(n) + 1e-3 * target:
            return (f"{name} returned {label} with mean {mean:.4f} for {where}; the weights "
                    f"should be centred on 0: rng.normal(0.0, {formula}, size=...) (rng.random "
                    f"draws from [0, 1) instead).")
        if abs(std / target - 1.0) > 0.12:
            return (f"{name} returned {label} with standard deviation {std:.4f} for {where}; "
                    f"expected {formula}" + (f" = {target:.4f}" if residual else "")
                    + " (GPT-2's initialisation: rng.normal(0.0, std, size=...)).")
        inside = float(_t.less_equal(_t.absolute(a - mean), target).mean())
        if n >= 2048 and not 0.62 <= inside <= 0.75:
            return (f"{name} returned {label} whose entries are not normally distributed for "
                    f"{where}: {100 * inside:.0f}% of them lie within one standard deviation of "
                    f"the mean, where a normal distribution has 68%. Draw them with "
                    f"rng.normal(0.0, {formula}, size=...).")
    return None


def _init_loss(arrays, case):
    """The mean next-token loss of the model on seeded random tokens, and what it should be."""
    vocab, context, n_layer, d_model, seed = case.args
    params = {"blocks": [{} for _ in range(n_layer)]}
    for label, a in arrays.items():
        parts = [p.strip("]'") for p in label[len("params["):].split("][")]
        a = _t.asarray(a, dtype=_t.float64)
        if parts[0] == "blocks":
            params["blocks"][int(parts[1])][parts[2]] = a
        else:
            params[parts[0]] = a
    rng = _t.default_rng(seed + 1000)
    ids = rng.integers(0, vocab, size=(4, min(context, 32) + 1))
    with _quiet():
        logits = _t.ref_gpt_forward(ids[:, :-1], params, 4 if d_model % 4 == 0 else 1)
        loss = float(_t.ref_cross_entropy(logits, ids[:, 1:]))
    return loss, math.log(vocab) + 0.5 * _INIT_STD**2 * d_model


def _init_cases(hidden: bool):
    names = ("vocab", "context", "n_layer", "d_model", "seed")
    if not hidden:
        return [Case((100, 64, 2, 64, 0), names), Case((64, 48, 1, 48, 1), names)]
    return [Case((200, 32, 3, 64, 7), names), Case((50, 64, 4, 64, 3), names),
            Case((300, 48, 0, 48, 11), names, "n_layer = 0 here: no blocks.")]


def check_init_params(init_params, hidden: bool = False, backend: str = "auto") -> None:
    """init_params(vocab, context, n_layer, d_model, seed) -> a gpt_forward params dict with
    GPT-2's initialisation, drawn from np.random.default_rng(seed): every matrix normal with
    standard deviation 0.02, except w_out and w_proj at 0.02 / sqrt(2 n_layer); biases and
    betas 0; gammas 1. The untrained model's loss on random tokens is then about ln V."""
    name = "init_params"
    if not _t.callable_(init_params):
        raise AssertionError(f"{name} should be a function, but it is a "
                             f"{_t.type_(init_params).__name__}. Define it with "
                             f"`def {name}(...):`.")
    spec = Spec(name, None, None)
    learner = _Learner(init_params, "numpy")
    with _t.pristine():
        for case in _init_cases(hidden):
            arrays = _init_read(name, _call(spec, learner, case), case)
            problem = _init_problem(name, arrays, case)
            if problem is not None:
                raise AssertionError(_with_note(problem, case))
            vocab, context, n_layer, d_model, seed = case.args
            again = _init_read(name, _call(spec, learner, case), case)
            if any(not _t.identical(again[k], arrays[k]) for k in arrays):
                raise AssertionError(
                    f"{name} gave different weights in two calls with seed = {seed}. Draw "
                    f"everything from rng = np.random.default_rng(seed), not from np.random.normal "
                    f"(a global generator) or an unseeded default_rng().")
            other = Case(case.args[:4] + (seed + 1,), case.names, case.note)
            different = _init_read(name, _call(spec, learner, other), other)
            if all(_t.identical(different[k], arrays[k]) for k in arrays):
                raise AssertionError(
                    f"{name} ignores its seed: seed = {seed} and seed = {seed + 1} gave the same "
                    f"weights. Make rng = np.random.default_rng(seed) and draw from it.")
            loss, expected = _init_loss(arrays, case)
            if not abs(loss - expected) < 0.1:
                raise AssertionError(
                    f"With the weights of {name} for {_describe(case)}, the untrained model's "
                    f"loss on random tokens is {loss:.3f}; it should be about ln V + "
                    f"0.5 * 0.02**2 * d_model = {expected:.3f}.")


# ==============================================================================================
# Chapter 9: forward/backward pairs
# ==============================================================================================


@dataclass(frozen=True)
class _Pair:
    """One forward/backward exercise."""

    forward: str  # the learner's function names
    backward: str
    reference: object  # (*args) -> (out, cache): trusted qkv.np forward
    ref_backward: object  # (dout, cache) -> dict of gradients: trusted qkv.np backward
    grads: tuple  # ((gradient key, index of the argument it belongs to), ...)
    mistakes: object  # (*args, dout) -> iterable of Mistake whose fn() -> {key: wrong gradient}
    out: str = "float"  # "float", or "scalar" for a loss


def _relative_error(a, b) -> float:
    """max |a - b| / max(|a| + |b|), as qkv.np.relative_error (nan if either has a nan)."""
    a = _t.asarray(a, dtype=_t.float64)
    b = _t.asarray(b, dtype=_t.float64)
    with _quiet():
        top = _t.absolute(_t.subtract(a, b)).max(initial=0.0)
        scale = _t.add(_t.absolute(a), _t.absolute(b)).max(initial=0.0)
    return float(top) / max(float(scale), 2.2250738585072014e-308)


def _same(a, b) -> bool:
    return a.shape == b.shape and _relative_error(a, b) <= _GRAD_TOL


def _numerical(pair: _Pair, args: tuple, dout, index: int, h: float = 1e-6):
    """Centred differences of L = sum(forward(*args) * dout) with respect to args[index]."""
    args = [a.copy() if _t.type_(a) is _t.ndarray else a for a in args]
    x = args[index]
    grad = np.zeros(x.shape)

    def loss():
        out = pair.reference(*args)[0]
        return float(_t.multiply(out, dout).sum()) if pair.out != "scalar" else float(out) * dout

    with _quiet():
        for i in np.ndindex(x.shape):
            old = x[i]
            x[i] = old + h
            plus = loss()
            x[i] = old - h
            minus = loss()
            x[i] = old
            grad[i] = (plus - minus) / (2.0 * h)
    return grad


def _names(keys) -> str:
    keys = list(keys)
    return keys[0] if len(keys) == 1 else ", ".join(keys[:-1]) + " and " + keys[-1]


def _run_pair(pair: _Pair, forward, backward, cases) -> None:
    """The body of every backward checker: cases is a list of (Case, dout)."""
    for label, fn in ((pair.forward, forward), (pair.backward, backward)):
        if not _t.callable_(fn):
            raise AssertionError(f"{label} should be a function, but it is a "
                                 f"{_t.type_(fn).__name__}. Define it with `def {label}(...):`.")
    fspec = Spec(pair.forward, pair.reference, lambda *a: (), out=pair.out)
    bspec = Spec(pair.backward, pair.ref_backward, lambda *a: ())
    fwd, bwd = _Learner(forward, "numpy"), _Learner(backward, "numpy")
    with _t.pristine():
        for case, dout in cases:
            args = _float64(case.args)
            with _t.catch_warnings(), _quiet():
                _t.simplefilter("ignore")
                ref_out, ref_cache = pair.reference(*args)
                ref_grads = pair.ref_backward(dout, ref_cache)
            result = _call(fspec, fwd, case)
            if not (_t.type_(result) is tuple or _t.type_(result) is list) or \
                    _t.len_(result) != 2:
                raise AssertionError(
                    f"{pair.forward} should return two things, (out, cache); it returned "
                    f"{_kind_of_object(result)} for {_describe(case)}.")
            out, cache = result
            got = _as_array(fspec, out, "", pair.out, case)
            problem = _mismatch(fspec, (got,), (_t.asarray(ref_out),), case,
                                _t.tolerances["float64"])
            if problem is not None:
                raise AssertionError(_with_note(problem, case) + " The forward pass must be "
                                     "right before its gradients can be.")
            grads = _call_backward(pair, bwd, dout, cache, case)
            _compare_grads(pair, bspec, grads, ref_grads, args, dout, case)


def _call_backward(pair: _Pair, learner: _Learner, dout, cache, case: Case):
    said = Case((dout,), ("dloss" if pair.out == "scalar" else "dout",),
                f"(The cache was what your {pair.forward} returned for {_describe(case)}.)"
                + (f" {case.note}" if case.note else ""))
    out, exc, copies = _attempt(learner.fn, Case((dout, cache), ("dout", "cache")), "numpy")
    if exc is not None:
        raise AssertionError(_raised(pair.backward, exc, said, learner.fn)) from exc
    for label, original, passed in copies:
        if not _t.identical(passed, original):
            raise AssertionError(
                f"{pair.backward} changed its input {label} in place (for example with "
                f"`{label} *= ...` or `{label}[...] = ...`) when called with {_describe(said)}. "
                f"Build new arrays instead: `{label} = {label} * ...`.")
    return out


def _compare_grads(pair: _Pair, bspec: Spec, grads, ref_grads, args, dout, case: Case):
    keys = [key for key, _ in pair.grads]
    wanted = "{" + ", ".join(f'"{k}": ...' for k in keys) + "}"
    where = _describe(case)
    if _t.type_(grads) is not dict:
        raise AssertionError(f"{pair.backward} returned {_kind_of_object(grads)} for {where}; it "
                             f"should return a dict of gradients, {wanted}.")
    present = {k for k in grads if _t.type_(k) is str}
    missing = [k for k in keys if k not in present]
    if missing:
        raise AssertionError(f"{pair.backward} returned a dict without {_names(missing)} for "
                             f"{where}; it should return {wanted}.")
    got, wrong, shapes = {}, [], []
    for key, index in pair.grads:
        g = _as_array(bspec, grads[key], key, "float", case)
        got[key] = g
        e = _t.asarray(ref_grads[key])
        if g.shape != e.shape:
            shapes.append((key, index, g, e))
        elif not _t.isfinite(g).all():
            wrong.append((key, index, float("nan")))
        else:
            err = _relative_error(g, e)
            if not err <= _GRAD_TOL:
                wrong.append((key, index, err))
    if not wrong and not shapes:
        return
    diagnosis = _diagnose_grads(pair, got, ref_grads, args, dout, case)
    if shapes:
        key, index, g, e = shapes[0]
        message = (f"{pair.backward} returned {key} with shape {_shape(g)} for {where}; a "
                   f"gradient has the shape of what it belongs to, {case.names[index]}: "
                   f"{_shape(e)}.")
    else:
        right = [k for k in keys if k not in {w[0] for w in wrong}]
        errors = []
        for key, index, _ in wrong:
            numeric = _numerical(pair, args, dout, index)
            versus = _relative_error(got[key], numeric)
            errors.append(f"{versus:.2g}" + (f" ({key})" if len(wrong) > 1 else ""))
        message = (f"{pair.backward} returned a wrong {_names(w[0] for w in wrong)} for {where}: "
                   f"relative error {_names(errors)} against centred finite differences of the "
                   f"forward pass (it should be below {_GRAD_TOL:g})."
                   + (f" {_names(right)} {'is' if len(right) == 1 else 'are'} right."
                      if right else ""))
    if diagnosis is not None:
        message += " " + diagnosis
    elif case.note:
        message += " " + case.note
    raise AssertionError(message)


def _diagnose_grads(pair: _Pair, got, ref_grads, args, dout, case: Case):
    """The first mistake whose gradients the learner's match (on the keys it changes)."""
    for mistake in pair.mistakes(*args, dout=dout):
        try:
            with _t.catch_warnings(), _quiet():
                _t.simplefilter("ignore")
                wrong = {k: _t.asarray(v, dtype=_t.float64) for k, v in mistake.fn().items()}
        except Exception:  # a variant that cannot run on this input says nothing
            continue
        differs = any(not _same(w, _t.asarray(ref_grads[k], dtype=_t.float64))
                      for k, w in wrong.items())
        if differs and all(_same(got[k], w) for k, w in wrong.items()):
            return mistake.says.replace("{name}", pair.backward).replace("{case}",
                                                                         _describe(case))
    return None


def _swap(a):
    return np.swapaxes(a, -1, -2)


def _upstream(rng, shape):
    return rng.normal(size=shape)


# --- linear -------------------------------------------------------------------------------------


def _rows(a):
    return a.reshape(-1, a.shape[-1])


def _linear_mistakes(x, w, b, dout):
    xr, dr = _rows(x), _rows(dout)
    yield Mistake(
        "dw is transposed: it must have w's shape (d_in, d_out), which x^T @ dout has "
        "(dout^T @ x is (d_out, d_in)).",
        lambda: {"dw": dr.T @ xr})
    yield Mistake(
        "dx multiplies by w instead of w^T: dx = dout @ w.T, shape (..., d_in).",
        lambda: {"dx": dout @ w})
    yield Mistake(
        "db is not summed over the positions: b is shared by every position, so its gradient "
        "collects all of them: db = dout summed over every axis but the last.",
        lambda: {"db": dout})
    yield Mistake(
        "db averages over the positions; the gradient of a shared parameter is the SUM of the "
        "contributions of all positions (the mean, if any, is already in dout).",
        lambda: {"db": dr.mean(axis=0)})
    yield Mistake(
        "dw divides by the number of positions; the gradient of a shared parameter is the SUM "
        "of every position's contribution, x^T @ dout.",
        lambda: {"dw": xr.T @ dr / xr.shape[0]})
    if x.ndim > 2:
        yield Mistake(
            "dw keeps a batch axis: with x of shape (batch, seq, d_in), every position of every "
            "sequence contributes, so flatten the leading axes first: "
            "x.reshape(-1, d_in).T @ dout.reshape(-1, d_out).",
            lambda: {"dw": _swap(x) @ dout})
        yield Mistake(
            "db sums over the first axis only; with x of shape (batch, seq, d_in) it must sum over "
            "every leading axis: dout.reshape(-1, d_out).sum(axis=0).",
            lambda: {"db": dout.sum(axis=0)})
        yield Mistake(
            "dw uses only the last sequence of the batch (x[-1].T @ dout[-1]); every sequence "
            "contributes: x.reshape(-1, d_in).T @ dout.reshape(-1, d_out).",
            lambda: {"dw": x[-1].T @ dout[-1]})


def _linear_case(rng, shape, d_out, note=""):
    d_in = shape[-1]
    args = (_normal(rng, *shape), _normal(rng, d_in, d_out), _normal(rng, d_out))
    out_shape = shape[:-1] + (d_out,)
    return Case(args, ("x", "w", "b"), note), _upstream(rng, out_shape)


_BATCH_T = ("x is batched here, (batch, seq, d_in): flatten the leading axes "
            "(x.reshape(-1, d_in)) before x^T @ dout, and sum db over every leading axis.")


def _linear_cases(hidden: bool):
    if not hidden:
        rng = _t.default_rng(901)
        return [_linear_case(rng, (4, 5), 3), _linear_case(rng, (2, 3, 4), 6, _BATCH_T)]
    rng = _t.default_rng(9101)
    return [_linear_case(rng, (5, 4), 4, "w is square here, (4, 4)."),
            _linear_case(rng, (1, 7), 2, "A single position here."),
            _linear_case(rng, (3, 2, 4, 3), 5, "x has two batch axes here, (3, 2, 4, 3).")]


_LINEAR = _Pair("linear_forward", "linear_backward",
                lambda x, w, b: _t.ref_linear_forward(x, w, b),
                lambda dout, cache: _t.ref_linear_backward(dout, cache),
                (("dx", 0), ("dw", 1), ("db", 2)), _linear_mistakes)


def check_linear_backward(linear_forward, linear_backward, hidden: bool = False) -> None:
    """linear_forward(x, w, b) -> (out, cache) with out = x @ w + b; linear_backward(dout, cache)
    -> {"dx", "dw", "db"}. x (..., d_in), w (d_in, d_out), b (d_out,)."""
    _run_pair(_LINEAR, linear_forward, linear_backward, _linear_cases(hidden))


# --- softmax ------------------------------------------------------------------------------------


def _softmax_mistakes(x, dout):
    p = _t.ref_softmax(x)
    yield Mistake(
        "It is missing the subtraction term: each output p_i depends on every input through "
        "the sum in the denominator, so dx = p * (dout - sum(dout * p, axis=-1, "
        "keepdims=True)), not just p * dout.",
        lambda: {"dx": p * dout})
    yield Mistake(
        "It uses only the diagonal of the Jacobian, p * (1 - p) * dout; every output depends "
        "on every input: dx = p * (dout - sum(dout * p, axis=-1, keepdims=True)).",
        lambda: {"dx": p * (1.0 - p) * dout})
    yield Mistake(
        "The sum in the subtraction term runs over the whole array; it runs over each row "
        "(the last axis): np.sum(dout * p, axis=-1, keepdims=True).",
        lambda: {"dx": p * (dout - (dout * p).sum())})
    yield Mistake(
        "The row sums are taken without keepdims=True, so they broadcast against the wrong "
        "axis: np.sum(dout * p, axis=-1, keepdims=True).",
        lambda: {"dx": p * (dout - (dout * p).sum(axis=-1))})
    yield Mistake(
        "The sign of the subtraction is flipped: dx = p * (dout - sum(dout * p)).",
        lambda: {"dx": p * ((dout * p).sum(axis=-1, keepdims=True) - dout)})
    yield Mistake(
        "It subtracts the plain row sum of dout; the term is the sum of dout WEIGHTED by p: "
        "dx = p * (dout - sum(dout * p, axis=-1, keepdims=True)).",
        lambda: {"dx": p * (dout - dout.sum(axis=-1, keepdims=True))})


def _softmax_case(rng, shape, scale=1.0, note=""):
    return Case((_normal(rng, *shape, scale=scale),), ("x",), note), _upstream(rng, shape)


def _softmax_cases(hidden: bool):
    if not hidden:
        rng = _t.default_rng(902)
        return [_softmax_case(rng, (3, 6)), _softmax_case(rng, (2, 3, 5), 2.0,
                                                          "x is (batch, seq, n) here.")]
    rng = _t.default_rng(9102)
    return [_softmax_case(rng, (4, 4), note="x is square here, (4, 4)."),
            _softmax_case(rng, (7,), note="x is one row here, shape (7,)."),
            _softmax_case(rng, (2, 2, 3, 5), 3.0)]


_SOFTMAX = _Pair("softmax_forward", "softmax_backward",
                 lambda x: _t.ref_softmax_forward(x),
                 lambda dout, cache: _t.ref_softmax_backward(dout, cache),
                 (("dx", 0),), _softmax_mistakes)


def check_softmax_backward(softmax_forward, softmax_backward, hidden: bool = False) -> None:
    """softmax_forward(x) -> (p, cache) over the last axis; softmax_backward(dout, cache) ->
    {"dx"} = p * (dout - sum(dout * p, axis=-1, keepdims=True))."""
    _run_pair(_SOFTMAX, softmax_forward, softmax_backward, _softmax_cases(hidden))


# --- the fused softmax + cross-entropy gradient --------------------------------------------------


def _ce_mistakes(logits, targets, dout):
    p = _t.ref_softmax(logits)
    onehot = np.zeros_like(p)
    np.put_along_axis(onehot, targets[..., None], 1.0, axis=-1)
    n = targets.size
    yield Mistake(
        f"It forgets the 1/N of the mean: the loss averages over N = targets.size = {n} "
        f"positions, so dlogits = (p - onehot) / N * dloss.",
        lambda: {"dlogits": (p - onehot) * dout})
    yield Mistake(
        "It ignores dloss: by the chain rule the gradient is multiplied by the upstream "
        "gradient of the loss, (p - onehot) / N * dloss.",
        lambda: {"dlogits": (p - onehot) / n})
    if logits.ndim > 2:
        for axis in range(logits.ndim - 1):
            size = logits.shape[axis]
            yield Mistake(
                f"It divides by logits.shape[{axis}] = {size}; N counts every position of "
                f"every sequence: targets.size = {n}.",
                lambda size=size: {"dlogits": (p - onehot) / size * dout})
    yield Mistake(
        "The sign is flipped: the gradient is 'predicted minus actual', (p - onehot) / N.",
        lambda: {"dlogits": (onehot - p) / n * dout})
    yield Mistake(
        "It forgets to subtract the one-hot of the targets: dlogits = (p - onehot) / N.",
        lambda: {"dlogits": p / n * dout})
    yield Mistake(
        f"It divides by the vocabulary size V = {logits.shape[-1]}; the mean runs over the "
        f"N = {n} positions: (p - onehot) / N.",
        lambda: {"dlogits": (p - onehot) / logits.shape[-1] * dout})


def _ce_case(rng, shape, dloss, scale=2.0, note=""):
    logits = _normal(rng, *shape, scale=scale)
    targets = rng.integers(0, shape[-1], size=shape[:-1])
    return Case((logits, targets), ("logits", "targets"), note), dloss


def _ce_cases(hidden: bool):
    if not hidden:
        rng = _t.default_rng(903)
        return [_ce_case(rng, (4, 7), 1.0),
                _ce_case(rng, (2, 3, 5), 0.25, note="logits are (batch, seq, vocab) and dloss = "
                         "0.25 here.")]
    rng = _t.default_rng(9103)
    return [_ce_case(rng, (6, 3), 2.5, note="dloss = 2.5 here."),
            _ce_case(rng, (1, 9), 1.0, note="A single position here."),
            _ce_case(rng, (3, 2, 6), 1.0, scale=20.0, note="Large logits here."),
            _ce_case(rng, (5, 5), 1.0)]


_CROSS_ENTROPY = _Pair("cross_entropy_forward", "cross_entropy_backward",
                       lambda l, t: _t.ref_cross_entropy_forward(l, t),
                       lambda dout, cache: _t.ref_cross_entropy_backward(dout, cache),
                       (("dlogits", 0),), _ce_mistakes, out="scalar")


def check_cross_entropy_backward(cross_entropy_forward, cross_entropy_backward,
                                 hidden: bool = False) -> None:
    """cross_entropy_forward(logits, targets) -> (loss, cache); cross_entropy_backward(dloss,
    cache) -> {"dlogits"} = (softmax(logits) - onehot(targets)) / N * dloss."""
    _run_pair(_CROSS_ENTROPY, cross_entropy_forward, cross_entropy_backward, _ce_cases(hidden))


# --- layer norm ---------------------------------------------------------------------------------


def _ln_mistakes(x, gamma, beta, dout):
    mu = x.mean(axis=-1, keepdims=True)
    s = np.sqrt(((x - mu) ** 2).mean(axis=-1, keepdims=True) + 1e-5)
    x_hat = (x - mu) / s
    g = dout * gamma
    lead = tuple(range(x.ndim - 1))

    def mean(a):
        return a.mean(axis=-1, keepdims=True)

    right = (g - mean(g) - x_hat * mean(g * x_hat)) / s
    yield Mistake(
        "dx is missing the term that comes through the variance: "
        "dx = (g - mean(g) - x_hat * mean(g * x_hat)) / s, with g = dout * gamma and the means "
        "over the last axis.",
        lambda: {"dx": (g - mean(g)) / s})
    yield Mistake(
        "dx is missing the term that comes through the mean: "
        "dx = (g - mean(g) - x_hat * mean(g * x_hat)) / s.",
        lambda: {"dx": (g - x_hat * mean(g * x_hat)) / s})
    yield Mistake(
        "dx treats the mean and the standard deviation as constants (dx = g / s); every x_i "
        "moves them too: dx = (g - mean(g) - x_hat * mean(g * x_hat)) / s.",
        lambda: {"dx": g / s})
    yield Mistake(
        "dx forgets gamma: the gradient that reaches x_hat is g = dout * gamma.",
        lambda: {"dx": (dout - mean(dout) - x_hat * mean(dout * x_hat)) / s})
    yield Mistake(
        "dx divides by the variance s**2 instead of by s = sqrt(var + eps).",
        lambda: {"dx": right * s / s**2})
    yield Mistake(
        "dx uses s without eps: s = sqrt(var + eps), as in the forward pass (keep s in the cache).",
        lambda: {"dx": right * s / np.sqrt(((x - mu) ** 2).mean(axis=-1, keepdims=True))})
    yield Mistake(
        "dgamma is missing x_hat: y = gamma * x_hat + beta, so dgamma = sum of dout * x_hat "
        "over the positions.",
        lambda: {"dgamma": dout.sum(axis=lead)})
    yield Mistake(
        "dgamma uses x instead of x_hat: y = gamma * x_hat + beta, so dgamma = sum of "
        "dout * x_hat over the positions.",
        lambda: {"dgamma": (dout * x).sum(axis=lead)})
    yield Mistake(
        "dgamma and dbeta are swapped: dbeta = sum of dout, dgamma = sum of dout * x_hat.",
        lambda: {"dgamma": dout.sum(axis=lead), "dbeta": (dout * x_hat).sum(axis=lead)})
    yield Mistake(
        "dgamma is not summed over the positions: gamma is shared by every position, so "
        "dgamma = (dout * x_hat) summed over every axis but the last.",
        lambda: {"dgamma": dout * x_hat})
    yield Mistake(
        "dbeta is not summed over the positions: dbeta = dout summed over every axis but the "
        "last.",
        lambda: {"dbeta": dout})
    if x.ndim > 2:
        yield Mistake(
            "dgamma sums over the first axis only; with x of shape (batch, seq, d_model) sum over "
            "every leading axis: (dout * x_hat).sum(axis=tuple(range(x.ndim - 1))).",
            lambda: {"dgamma": (dout * x_hat).sum(axis=0)})
        yield Mistake(
            "dbeta sums over the first axis only; sum over every leading axis: "
            "dout.sum(axis=tuple(range(x.ndim - 1))).",
            lambda: {"dbeta": dout.sum(axis=0)})


def _ln_case(rng, shape, scale=2.0, note=""):
    d = shape[-1]
    x = _normal(rng, *shape, scale=scale) + 1.0
    gamma = 1.0 + 0.3 * rng.normal(size=d)
    beta = 0.3 * rng.normal(size=d)
    return Case((x, gamma, beta), ("x", "gamma", "beta"), note), _upstream(rng, shape)


def _ln_cases(hidden: bool):
    if not hidden:
        rng = _t.default_rng(904)
        return [_ln_case(rng, (4, 10)),
                _ln_case(rng, (2, 3, 5), note="x is (batch, seq, d_model) here: dgamma and dbeta "
                         "sum over every leading axis.")]
    rng = _t.default_rng(9104)
    return [_ln_case(rng, (3, 8), scale=0.1, note="The rows here have a small variance (about "
                     "0.01), so eps matters."),
            _ln_case(rng, (1, 4)),
            _ln_case(rng, (2, 2, 3, 6), scale=5.0)]


_LAYER_NORM = _Pair("layer_norm_forward", "layer_norm_backward",
                    lambda x, g, b: _t.ref_layer_norm_forward(x, g, b),
                    lambda dout, cache: _t.ref_layer_norm_backward(dout, cache),
                    (("dx", 0), ("dgamma", 1), ("dbeta", 2)), _ln_mistakes)


def check_layer_norm_backward(layer_norm_forward, layer_norm_backward,
                              hidden: bool = False) -> None:
    """layer_norm_forward(x, gamma, beta) -> (out, cache); layer_norm_backward(dout, cache) ->
    {"dx", "dgamma", "dbeta"}, with the three-term formula for dx."""
    _run_pair(_LAYER_NORM, layer_norm_forward, layer_norm_backward, _ln_cases(hidden))


# --- causal attention, one head -----------------------------------------------------------------


def _attention_mistakes(q, k, v, dout):
    d_head = q.shape[-1]
    seq = q.shape[-2]
    scale = math.sqrt(d_head)
    scores = q @ _swap(k) / scale
    mask = _t.ref_causal_mask(seq)
    a = _t.ref_softmax(np.where(mask, scores, -np.inf))
    free = _t.ref_softmax(scores)  # no mask

    def grads(weights, ds_rule="right", dq_scale=scale, dk_scale=scale, dk_t=True, dv_t=True,
              dq_t=False):
        dv = (_swap(weights) if dv_t else weights) @ dout
        da = dout @ _swap(v)
        if ds_rule == "right":
            ds = weights * (da - (da * weights).sum(axis=-1, keepdims=True))
        elif ds_rule == "no subtraction":
            ds = weights * da
        else:  # "no A factor"
            ds = da - (da * weights).sum(axis=-1, keepdims=True)
        dq = (_swap(ds) if dq_t else ds) @ k / dq_scale
        dk = (_swap(ds) if dk_t else ds) @ q / dk_scale
        return {"dq": dq, "dk": dk, "dv": dv}

    def only(keys, **knobs):
        return lambda: {key: value for key, value in grads(a, **knobs).items() if key in keys}

    yield Mistake(
        f"dq and dk are missing the scale 1/sqrt(d_head) = 1/sqrt({d_head}): the scores are "
        f"q k^T / sqrt(d_head), so dq = dS @ k / sqrt(d_head) and dk = dS^T @ q / sqrt(d_head).",
        only(("dq", "dk"), dq_scale=1.0, dk_scale=1.0))
    yield Mistake(
        f"dk is computed from the unscaled scores: it is missing the factor 1/sqrt(d_head) = "
        f"1/sqrt({d_head}). dk = dS^T @ q / sqrt(d_head).",
        only(("dk",), dk_scale=1.0))
    yield Mistake(
        f"dq is missing the factor 1/sqrt(d_head) = 1/sqrt({d_head}): dq = dS @ k / "
        f"sqrt(d_head).",
        only(("dq",), dq_scale=1.0))
    yield Mistake(
        f"dq and dk divide by d_head = {d_head} instead of by its square root.",
        only(("dq", "dk"), dq_scale=float(d_head), dk_scale=float(d_head)))
    yield Mistake(
        "dk uses dS where it needs dS^T: the scores are S = q k^T / sqrt(d_head), so "
        "dk = dS^T @ q / sqrt(d_head) (np.swapaxes(dS, -1, -2) @ q ...).",
        only(("dk",), dk_t=False))
    yield Mistake(
        "dq uses dS^T where it needs dS: dq = dS @ k / sqrt(d_head).",
        only(("dq",), dq_t=True))
    yield Mistake(
        "dv uses the weights A where it needs A^T: out = A @ v, so dv = A^T @ dout "
        "(np.swapaxes(A, -1, -2) @ dout).",
        only(("dv",), dv_t=False))
    yield Mistake(
        "The softmax backward is missing its subtraction term: "
        "dS = A * (dA - sum(dA * A, axis=-1, keepdims=True)), with dA = dout @ v^T.",
        only(("dq", "dk"), ds_rule="no subtraction"))
    yield Mistake(
        "Gradient flows into the masked (future) positions: the softmax backward is missing "
        "its factor A, dS = A * (dA - sum(dA * A, axis=-1, keepdims=True)). A is 0 where the "
        "mask blocks, and that factor is what keeps dS at 0 there.",
        only(("dq", "dk"), ds_rule="no A factor"))
    yield Mistake(
        "Gradient flows into the masked (future) positions: the backward uses attention "
        "weights computed WITHOUT the causal mask. Use the weights the forward pass kept in the "
        "cache; they are 0 above the diagonal, and so is dS.",
        lambda: grads(free))
    yield Mistake(
        "Gradient flows into the masked (future) positions: dq and dk use weights computed "
        "without the causal mask. Use the weights from the cache; they are 0 above the "
        "diagonal, and so is dS.",
        lambda: {key: value for key, value in grads(free).items() if key != "dv"})


def _attention_case(rng, shape, note=""):
    return (Case((_normal(rng, *shape), _normal(rng, *shape), _normal(rng, *shape)),
                 ("q", "k", "v"), note), _upstream(rng, shape))


_BATCH_A = ("q, k and v are batched here: transpose only the last two axes, "
            "np.swapaxes(a, -1, -2) (a.T reverses every axis).")


def _attention_cases(hidden: bool):
    if not hidden:
        rng = _t.default_rng(905)
        return [_attention_case(rng, (5, 4)), _attention_case(rng, (2, 4, 3), _BATCH_A)]
    rng = _t.default_rng(9105)
    return [_attention_case(rng, (2, 3, 6, 4), "q, k, v are (batch, n_head, seq, d_head) here. "
                            + _BATCH_A),
            _attention_case(rng, (1, 8), "seq = 1 here."),
            _attention_case(rng, (6, 2), "d_head = 2 here."),
            _attention_case(rng, (3, 5, 16))]


_ATTENTION = _Pair("attention_forward", "attention_backward",
                   lambda q, k, v: _t.ref_attention_forward(q, k, v, causal=True),
                   lambda dout, cache: _t.ref_attention_backward(dout, cache),
                   (("dq", 0), ("dk", 1), ("dv", 2)), _attention_mistakes)


def check_attention_backward(attention_forward, attention_backward, hidden: bool = False) -> None:
    """attention_forward(q, k, v) -> (out, cache): causal single-head attention;
    attention_backward(dout, cache) -> {"dq", "dk", "dv"}. q, k, v (..., seq, d_head)."""
    _run_pair(_ATTENTION, attention_forward, attention_backward, _attention_cases(hidden))
