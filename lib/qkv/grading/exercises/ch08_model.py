"""Chapter 8, the whole model: the forward pass, the parameter count, next-token probabilities
and GPT-2's initialisation (judged in ``_gpt2_init.py``)."""

import math

import numpy as np

from .. import _trusted as _t
from ..engine import Case, Mistake, _normal
from ..exercise import Exercise
from ..kinds import Array, Judged, Value
from ..variants import block_args, block_variant, plain_softmax
from ._gpt2_init import init_cases, judge_init


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

    def __init__(self, fn, position: int = 1):
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

    def problem(self):
        if self.changed is not None:
            return (f"gpt_forward changed {self.changed} in place (for example with `+=` or "
                    f"`[...] =`). Leave the weights alone and build new arrays instead.")
        return None


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
        x = block_variant(x, block, n_head, causal=causal)
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
    blocks = [block_args(rng, (1, d_model), n_head, dtype=dtype)[1] for _ in range(n_layer)]
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


GPT_FORWARD = Exercise(
    name="gpt_forward",
    reference=_reference_gpt,
    visible=lambda: _gpt_cases(False),
    hidden=lambda: _gpt_cases(True),
    mistakes=_gpt_mistakes,
    output=Array(tol32="float32_model"),
    backends=("numpy",),
    wrap=_OwnBlocks,
    doc="gpt_forward(token_ids, params, n_head) -> logits (..., seq, vocab): token_ids (..., seq) "
        "integers; params: wte (vocab, d_model), wpe (context, d_model), blocks (a list of "
        "decoder-block dicts), lnf_gamma, lnf_beta. Embed + positions, the blocks, the final "
        "layer norm, and the tied unembedding H @ wte.T. NumPy only.",
)


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
        # Sizes where every catalogued count differs: leaving out wpe (C d) and leaving out
        # the blocks' layer norms (4 L d) used to coincide here (issue 12, finding 3).
        return [Case((11, 12, 2, 16), names),
                Case((65, 256, 6, 384), names, "These are the sizes of the chapter's check-"
                     "yourself question 1.")]
    return [Case((50257, 1024, 12, 768), names, "These are the sizes of GPT-2 small: "
                 "124,439,808 parameters."),
            Case((50257, 1024, 48, 1600), names, "These are the sizes of GPT-2 XL."),
            Case((7, 5, 0, 4), names, "n_layer = 0 here: embeddings and the final layer norm."),
            Case((1000, 64, 3, 1), names, "d_model = 1 here.")]


COUNT_PARAMETERS = Exercise(
    name="count_parameters",
    reference=_reference_count,
    visible=lambda: _count_cases(False),
    hidden=lambda: _count_cases(True),
    mistakes=_count_mistakes,
    output=Value("count", hint="Count the embeddings, every matrix, bias and layer norm of each "
                               "block, and the final layer norm."),
    backends=("numpy",),
    doc="count_parameters(vocab, context, n_layer, d_model) -> the exact number of parameters "
        "of a GPT-2-style model with biases and a tied unembedding: 12 L d^2 + 13 L d + "
        "(V + C + 2) d.",
)


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
        lambda l: plain_softmax(l, axis=-2)[..., -1, :])
    yield Mistake(
        "{name} returns log-probabilities; return the probabilities, softmax(logits[..., -1, "
        ":]).",
        lambda l: np.log(_t.ref_softmax(l[..., -1, :])))
    yield Mistake(
        "{name} is not numerically stable: for {case} the logits are large and exp overflows. "
        "Subtract the row maximum before exponentiating.",
        lambda l: plain_softmax(l[..., -1, :], stable=False))


def _next_cases(hidden: bool):
    if not hidden:
        rng = _t.default_rng(802)
        return [Case((_normal(rng, 5, 7, scale=2.0),), ("logits",)),
                Case((_normal(rng, 2, 4, 6, scale=2.0),), ("logits",),
                     "logits is (batch, seq, vocab) here: one distribution per sequence."),
                Case((_normal(rng, 3, 6, scale=500.0),), ("logits",),
                     "The logits are large here (hundreds): subtract the row maximum before "
                     "exp, as chapter 4's softmax does.")]
    rng = _t.default_rng(8102)
    return [Case((_normal(rng, 1, 10),), ("logits",), "seq = 1 here."),
            Case((_normal(rng, 3, 8, scale=500.0),), ("logits",), "The logits are large here."),
            Case((_normal(rng, 3, 2, 5, 4),), ("logits",), "Two batch axes here."),
            Case((_normal(rng, 4, 9, dtype=np.float32),), ("logits",), "float32 logits here.")]


NEXT_TOKEN_PROBS = Exercise(
    name="next_token_probs",
    reference=_reference_next,
    visible=lambda: _next_cases(False),
    hidden=lambda: _next_cases(True),
    mistakes=_next_mistakes,
    doc='next_token_probs(logits) = softmax(logits[..., -1, :]): (..., seq, vocab) -> (..., '
        'vocab).',
)


INIT_PARAMS = Exercise(
    name="init_params",
    reference=None,
    visible=lambda: init_cases(False),
    hidden=lambda: init_cases(True),
    output=Judged(judge_init, "has GPT-2's shapes, zeros, ones, statistics, seeding and "
                              "starting loss"),
    backends=("numpy",),
    doc="init_params(vocab, context, n_layer, d_model, seed) -> a gpt_forward params dict with "
        "GPT-2's initialisation, drawn from np.random.default_rng(seed): every matrix normal "
        "with standard deviation 0.02, except w_out and w_proj at 0.02 / sqrt(2 n_layer); biases "
        "and betas 0; gammas 1. The untrained model's loss on random tokens is about ln V.",
)

EXERCISES = [GPT_FORWARD, COUNT_PARAMETERS, NEXT_TOKEN_PROBS, INIT_PARAMS]
