"""The exercise checkers in qkv.grading.

For every checker: a correct learner-style function passes, printing one line on a visible test;
each known mistake, written the way a learner would write it, fails with a message that names
it; a function returning an object with a lying ``__eq__`` fails; a function that raises gets
"not implemented yet" or the exception's name; rebinding ``np.allclose`` (and friends) after
``qkv.grading`` is imported does not make a wrong function pass. Then the two source notebooks
run top to bottom in-process: the solutions pass every test cell with nothing on stderr, and
with the solution regions replaced by ``raise NotImplementedError()`` every test cell fails.
"""

import contextlib
import inspect
import io
import math
import re
import warnings
from pathlib import Path

import nbformat
import numpy as np
import pytest
import torch  # conftest imports it before qkv.grading, as a torch exercise's setup cell does

import qkv.grading as grading
import qkv.np as qnp
from qkv.grading import (
    check_attention,
    check_attention_scores,
    check_causal_mask,
    check_cross_entropy,
    check_decoder_block,
    check_gelu,
    check_layer_norm,
    check_multi_head_attention,
    check_query_design,
    check_shift_targets,
    check_softmax,
    check_softmax_temperature,
)

ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------------
# Correct answers, written the way a learner would (not by calling qkv.np)
# ------------------------------------------------------------------------------------------------


def softmax(x):
    e = np.exp(x - np.max(x, axis=-1, keepdims=True))
    return e / np.sum(e, axis=-1, keepdims=True)


def attention_scores(q, k):
    return q @ np.swapaxes(k, -1, -2) / np.sqrt(q.shape[-1])


def softmax_with_temperature(x, temperature):
    return softmax(x / temperature)


def causal_mask(seq):
    return np.tril(np.ones((seq, seq), dtype=bool))


def attention(q, k, v, mask=None):
    scores = attention_scores(q, k)
    if mask is not None:
        scores = np.where(mask, scores, -np.inf)
    row_max = np.max(scores, axis=-1, keepdims=True)
    e = np.exp(scores - np.where(np.isneginf(row_max), 0.0, row_max))
    total = np.sum(e, axis=-1, keepdims=True)
    return e / np.where(total == 0, 1.0, total) @ v


def attention_torch(q, k, v, mask=None):
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    weights = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # fully masked rows: nan -> 0
    return weights @ v


def layer_norm(x, gamma, beta, eps=1e-5):
    mean = x.mean(axis=-1, keepdims=True)
    var = ((x - mean) ** 2).mean(axis=-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * gamma + beta


def gelu(x):
    return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)))


def _mha(x, w_qkv, b_qkv, w_out, b_out, n_head, *, scale=None, causal=True, out_proj=True,
         merge_transpose=True):
    *lead, seq, d_model = x.shape
    d_head = d_model // n_head
    q, k, v = np.split(x @ w_qkv + b_qkv, 3, axis=-1)

    def heads(t):
        return np.swapaxes(t.reshape(*lead, seq, n_head, d_head), -3, -2)

    q, k, v = heads(q), heads(k), heads(v)
    scores = q @ np.swapaxes(k, -1, -2) / np.sqrt(d_head if scale is None else scale(d_model))
    if causal:
        scores = np.where(causal_mask(seq), scores, -np.inf)
    out = softmax(scores) @ v
    if merge_transpose:
        out = np.swapaxes(out, -3, -2)
    out = out.reshape(*lead, seq, d_model)
    return out @ w_out + b_out if out_proj else out


def multi_head_attention(x, w_qkv, b_qkv, w_out, b_out, n_head):
    return _mha(x, w_qkv, b_qkv, w_out, b_out, n_head)


def _mlp(h, p):
    return gelu(h @ p["w_fc"] + p["b_fc"]) @ p["w_proj"] + p["b_proj"]


def _attn(h, p, n_head):
    return multi_head_attention(h, p["w_qkv"], p["b_qkv"], p["w_out"], p["b_out"], n_head)


def decoder_block(x, params, n_head):
    p = params
    x = x + _attn(layer_norm(x, p["ln1_gamma"], p["ln1_beta"]), p, n_head)
    return x + _mlp(layer_norm(x, p["ln2_gamma"], p["ln2_beta"]), p)


def make_targets(ids):
    return ids[:-1], ids[1:]


def cross_entropy(logits, targets):
    m = logits.max(axis=-1, keepdims=True)
    logp = logits - m - np.log(np.exp(logits - m).sum(axis=-1, keepdims=True))
    return -np.take_along_axis(logp, targets[..., None], axis=-1).mean()


CORRECT = [
    (check_softmax, softmax),
    (check_attention_scores, attention_scores),
    (check_softmax_temperature, softmax_with_temperature),
    (check_causal_mask, causal_mask),
    (check_attention, attention),
    (check_layer_norm, layer_norm),
    (check_gelu, gelu),
    (check_multi_head_attention, multi_head_attention),
    (check_decoder_block, decoder_block),
    (check_shift_targets, make_targets),
    (check_cross_entropy, cross_entropy),
]
CHECKERS = [check for check, _ in CORRECT]


def failure(check, fn, **kwargs):
    """The AssertionError message of ``check`` on ``fn`` (visible, then hidden cases)."""
    for hidden in (False, True):
        try:
            check(fn, hidden=hidden, **kwargs)
        except AssertionError as exc:
            return str(exc)
    pytest.fail(f"{check.__name__} passed a wrong function")


@contextlib.contextmanager
def silent():
    """Fails if anything reaches stdout, stderr or the warnings machinery."""
    out, err = io.StringIO(), io.StringIO()
    with warnings.catch_warnings(record=True) as caught, contextlib.redirect_stdout(out), \
            contextlib.redirect_stderr(err):
        warnings.simplefilter("always")
        yield
    # A passing visible test prints one line to stdout (issue 12, finding 7); nothing else.
    assert all(line.startswith("\u2713 ") for line in out.getvalue().splitlines()), out.getvalue()
    assert err.getvalue() == "" and caught == []


# ------------------------------------------------------------------------------------------------
# Correct answers pass, silently
# ------------------------------------------------------------------------------------------------


def test_checker_registry_is_complete():
    # every checker is declared and meta-tested in tests/grading (test_registry.py checks the
    # whole of qkv.grading.__all__); these are the ones this file also runs by name
    assert {check.__name__ for check in CHECKERS} <= set(grading.__all__)


@pytest.mark.parametrize("check, fn", CORRECT, ids=[c.__name__ for c in CHECKERS])
def test_correct_answer_passes_silently(check, fn):
    with silent():
        check(fn)
        check(fn, hidden=True)


@pytest.mark.parametrize("check, fn", [
    (check_softmax, qnp.softmax),
    (check_causal_mask, qnp.causal_mask),
    (check_attention, qnp.scaled_dot_product_attention),
    (check_layer_norm, qnp.layer_norm),
    (check_gelu, qnp.gelu),
    (check_multi_head_attention, qnp.multi_head_attention),
    (check_decoder_block, qnp.decoder_block),
    (check_cross_entropy, qnp.cross_entropy),
], ids=lambda v: getattr(v, "__name__", ""))
def test_reference_library_passes(check, fn):
    with silent():
        check(fn)
        check(fn, hidden=True)


def test_noisy_but_correct_answer_passes_silently():
    def chatty_softmax(x):
        print("debugging", x.shape)
        warnings.warn("a harmless warning", UserWarning, stacklevel=1)
        np.log(np.zeros(1))  # RuntimeWarning: divide by zero
        return softmax(x)

    with silent():
        check_softmax(chatty_softmax)
        check_softmax(chatty_softmax, hidden=True)


def test_torch_answers_are_accepted():
    with silent():
        for backend in ("auto", "torch"):
            check_attention(attention_torch, backend=backend)
            check_attention(attention_torch, hidden=True, backend=backend)
        check_softmax(lambda x: torch.softmax(torch.from_numpy(x), dim=-1))  # returns a tensor
        check_gelu(lambda x: torch.nn.functional.gelu(torch.as_tensor(x), approximate="tanh"),
                   hidden=True)


def test_float32_result_uses_the_float32_tolerance():
    with silent():
        check_gelu(lambda x: gelu(x.astype(np.float32)).astype(np.float32))
        check_gelu(lambda x: gelu(x.astype(np.float32)).astype(np.float32), hidden=True)
    assert "float16" in failure(check_gelu, lambda x: gelu(x).astype(np.float16))
    # float64 out, but computed from float32-rounded inputs: close, yet not float64-accurate
    message = failure(check_gelu, lambda x: gelu(x.astype(np.float32)).astype(np.float64))
    assert "run in float32" in message, message


def test_hidden_cases_differ_from_visible_ones():
    seen = set()

    def memorizer(x):
        seen.add(x.shape)
        return softmax(x)

    check_softmax(memorizer)
    visible = set(seen)

    def only_visible(x):
        return softmax(x) if x.shape in visible else np.zeros_like(x)

    check_softmax(only_visible)
    with pytest.raises(AssertionError):
        check_softmax(only_visible, hidden=True)


# ------------------------------------------------------------------------------------------------
# Every known mistake fails, and the message names it
# ------------------------------------------------------------------------------------------------


def _unstable_softmax(x):
    e = np.exp(x)
    return e / e.sum(axis=-1, keepdims=True)


def _scores(q, k, divide_by):
    return q @ np.swapaxes(k, -1, -2) / divide_by


def _attention_with(q, k, v, mask=None, *, scale=None, how="before", guard=True, stable=True):
    scores = _scores(q, k, np.sqrt(q.shape[-1]) if scale is None else scale)
    if mask is not None and how == "before":
        scores = np.where(mask, scores, -np.inf)
    if mask is not None and how == "transposed":
        scores = np.where(np.swapaxes(mask, -1, -2), scores, -np.inf)
    if mask is not None and how == "-1e9":
        scores = np.where(mask, scores, -1e9)
    if guard:
        weights = qnp.softmax(scores)
    elif stable:
        weights = softmax(scores)
    else:
        weights = _unstable_softmax(scores)
    if mask is not None and how == "after":
        weights = weights * mask
    return weights @ v


def _ln(x, gamma, beta, *, ddof=0, eps_outside=False):
    mean = x.mean(axis=-1, keepdims=True)
    std = np.sqrt(x.var(axis=-1, keepdims=True, ddof=ddof) + (0.0 if eps_outside else 1e-5))
    return (x - mean) / (std + (1e-5 if eps_outside else 0.0)) * gamma + beta


def _block(x, p, n_head, *, attn_res=True, mlp_res=True, post=False):
    ln1, ln2 = (p["ln1_gamma"], p["ln1_beta"]), (p["ln2_gamma"], p["ln2_beta"])
    if post:
        x = layer_norm(x + _attn(x, p, n_head), *ln1)
        return layer_norm(x + _mlp(x, p), *ln2)
    a = _attn(layer_norm(x, *ln1), p, n_head)
    x = x + a if attn_res else a
    m = _mlp(layer_norm(x, *ln2), p)
    return x + m if mlp_res else m


def _ce(logits, targets, *, stable=True, reduce=np.mean, sign=-1.0):
    p = softmax(logits) if stable else _unstable_softmax(logits)
    return sign * reduce(np.log(np.take_along_axis(p, targets[..., None], axis=-1)))


MISTAKES = [
    # softmax
    (check_softmax, _unstable_softmax, "not numerically stable"),
    (check_softmax, lambda x: qnp.softmax(x, axis=0), "instead of the last axis"),
    (check_softmax, lambda x: np.exp(x - x.max()) / np.exp(x - x.max()).sum(), "whole array"),
    (check_softmax, lambda x: np.exp(x - x.max()) / np.exp(x - x.max()).sum(-1, keepdims=True),
     "maximum of the whole array"),
    (check_softmax, lambda x: x / x.sum(-1, keepdims=True), "forgot the exponential"),
    (check_softmax, lambda x: np.log(softmax(x)), "log-probabilities"),
    # attention scores
    (check_attention_scores, lambda q, k: _scores(q, k, 1.0), "does not scale"),
    (check_attention_scores, lambda q, k: _scores(q, k, q.shape[-1]), "instead of by its square"),
    (check_attention_scores, lambda q, k: _scores(q, k, np.sqrt(len(q))), "len(q)"),
    (check_attention_scores,
     lambda q, k: _scores(q, k, np.sqrt(q.shape[-1] * (q.shape[-3] if q.ndim == 4 else 1))),
     "sqrt(d_model)"),
    (check_attention_scores, lambda q, k: k @ np.swapaxes(q, -1, -2) / np.sqrt(q.shape[-1]),
     "k q^T"),
    # temperature
    (check_softmax_temperature, lambda x, t: softmax(x * t), "multiplies the logits"),
    (check_softmax_temperature, lambda x, t: softmax(x), "ignores the temperature"),
    (check_softmax_temperature, lambda x, t: softmax(x) / t, "after the softmax"),
    (check_softmax_temperature, lambda x, t: _unstable_softmax(x / t), "not numerically stable"),
    # causal mask
    (check_causal_mask, lambda s: np.triu(np.ones((s, s), dtype=bool)), "see the future"),
    (check_causal_mask, lambda s: np.tril(np.ones((s, s), dtype=bool), 1),
     "one step into the future"),
    (check_causal_mask, lambda s: ~np.tril(np.ones((s, s), dtype=bool)), "blocked positions"),
    (check_causal_mask, lambda s: np.tril(np.ones((s, s), dtype=bool), -1), "blocks the diagonal"),
    (check_causal_mask, lambda s: np.tril(np.ones((s, s))), "must be boolean"),
    # masked attention
    (check_attention, lambda q, k, v, m=None: _attention_with(q, k, v, m, scale=1.0),
     "does not scale"),
    (check_attention, lambda q, k, v, m=None: _attention_with(q, k, v, m, how="after"),
     "masks after the softmax"),
    (check_attention, lambda q, k, v, m=None: _attention_with(q, k, v, m, how="transposed"),
     "mask transposed"),
    (check_attention, lambda q, k, v, m=None: _attention_with(q, k, v, m, how="ignored"),
     "ignores the mask"),
    (check_attention, lambda q, k, v, m=None: _attention_with(q, k, v, m, guard=False),
     "fully masked row"),
    (check_attention, lambda q, k, v, m=None: _attention_with(q, k, v, m, how="-1e9"),
     "average of all values"),
    (check_attention, lambda q, k, v, m=None: _attention_with(
        q, k, v, None if m is None else ~m), "treats True in the mask as 'blocked'"),
    # layer norm
    (check_layer_norm, lambda x, g, b: _ln(x, g, b, ddof=1), "unbiased variance"),
    (check_layer_norm, lambda x, g, b: _ln(x, g, b, eps_outside=True), "outside the square root"),
    (check_layer_norm, lambda x, g, b: layer_norm(x, g, b, eps=1e-6), "eps = 1e-06"),
    (check_layer_norm, lambda x, g, b: layer_norm(x, g, b) - b, "forgets to add beta"),
    (check_layer_norm, lambda x, g, b: layer_norm(x, b, g), "swaps gamma and beta"),
    (check_layer_norm, lambda x, g, b: x / np.sqrt(x.var(-1, keepdims=True) + 1e-5) * g + b,
     "does not subtract the mean"),
    # GELU
    (check_gelu, lambda x: x * 0.5 * (1 + np.vectorize(math.erf)(x / np.sqrt(2))), "exact GELU"),
    (check_gelu, lambda x: np.maximum(x, 0), "ReLU"),
    (check_gelu, lambda x: x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3))),
     "factor 0.5"),
    (check_gelu, lambda x: 0.5 * x * (1 + np.tanh(np.sqrt(2 * np.pi) * (x + 0.044715 * x**3))),
     "sqrt(2 pi)"),
    # multi-head attention
    (check_multi_head_attention, lambda *a: _mha(*a, scale=lambda d_model: d_model),
     "sqrt(d_model)"),
    (check_multi_head_attention, lambda *a: _mha(*a, scale=lambda d_model: 1.0),
     "does not scale"),
    (check_multi_head_attention, lambda *a: _mha(*a, causal=False), "see the future"),
    (check_multi_head_attention, lambda *a: _mha(*a, out_proj=False), "output projection"),
    (check_multi_head_attention, lambda *a: _mha(*a, merge_transpose=False), "merges the heads"),
    # decoder block
    (check_decoder_block, lambda x, p, n: _block(x, p, n, attn_res=False),
     "missing the residual connection around the attention"),
    (check_decoder_block, lambda x, p, n: _block(x, p, n, mlp_res=False),
     "missing the residual connection around the MLP"),
    (check_decoder_block, lambda x, p, n: _block(x, p, n, attn_res=False, mlp_res=False),
     "missing both residual connections"),
    (check_decoder_block, lambda x, p, n: _block(x, p, n, post=True), "post-LN"),
    # targets
    (check_shift_targets, lambda ids: (ids, ids), "not shifted by one"),
    (check_shift_targets, lambda ids: (ids[:-1], ids[:-1]), "not shifted by one"),
    (check_shift_targets, lambda ids: (ids[1:], ids[:-1]), "shifted the wrong way"),
    (check_shift_targets, lambda ids: (ids, np.roll(ids, -1)), "np.roll"),
    (check_shift_targets, lambda ids: (ids[:-1].astype(float), ids[1:].astype(float)),
     "must stay integers"),
    (check_shift_targets, lambda ids: ids[1:], "should return two arrays"),
    # cross-entropy
    (check_cross_entropy, lambda l, t: _ce(l, t, stable=False), "not numerically stable"),
    (check_cross_entropy, lambda l, t: _ce(l, t), "takes the log of the softmax"),
    (check_cross_entropy, lambda l, t: _ce(l, t, reduce=np.sum), "sums the losses"),
    (check_cross_entropy, lambda l, t: _ce(l, t, sign=1.0), "minus sign"),
    (check_cross_entropy, lambda l, t: -np.mean(np.log(softmax(l))), "every vocabulary entry"),
    (check_cross_entropy, lambda l, t: _ce(l, t) / np.log(2), "log base 2"),
]


@pytest.mark.parametrize("check, wrong, phrase", MISTAKES,
                         ids=[f"{c.__name__}-{p}" for c, _, p in MISTAKES])
def test_mistake_fails_and_is_named(check, wrong, phrase):
    message = failure(check, wrong)
    assert phrase in message, message


def test_torch_mistake_is_named():
    def after_softmax(q, k, v, mask=None):
        weights = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1]), dim=-1)
        return (weights if mask is None else weights * mask) @ v

    assert "masks after the softmax" in failure(check_attention, after_softmax)


def test_input_changed_in_place_fails():
    def in_place(x):
        x -= np.max(x, axis=-1, keepdims=True)
        np.exp(x, out=x)
        x /= x.sum(axis=-1, keepdims=True)
        return x

    assert "changed its input x in place" in failure(check_softmax, in_place)


def test_shape_mismatch_names_expected_and_got():
    message = failure(check_softmax, lambda x: softmax(x)[..., :1])
    assert re.search(r"shape \(4, 1\) .* expected shape \(4, 7\)", message), message


def test_nan_output_is_reported():
    message = failure(check_gelu, lambda x: np.where(x > 4, np.nan, gelu(x)))
    assert "nan" in message and "expected value" in message, message


# ------------------------------------------------------------------------------------------------
# Hostile or broken outputs, and learner functions that raise
# ------------------------------------------------------------------------------------------------


class Liar:
    """Says it equals anything."""

    def __eq__(self, other):
        return True

    def __ne__(self, other):
        return False

    __hash__ = object.__hash__


class LyingArray(np.ndarray):
    def __eq__(self, other):
        return np.ones(np.shape(self), dtype=bool)


def _takes_one_function(check) -> bool:
    required = [p for p in inspect.signature(check).parameters.values() if p.default is p.empty]
    return len(required) == 1


# Every checker of every chapter that takes one function; the forward/backward pair checkers
# get the same treatment in tests/grading/test_ch09_backprop.py.
ONE_FUNCTION = [getattr(grading, name) for name in grading.__all__
                if _takes_one_function(getattr(grading, name))]
ONE_FUNCTION_IDS = [c.__name__ for c in ONE_FUNCTION]


@pytest.mark.parametrize("check", ONE_FUNCTION, ids=ONE_FUNCTION_IDS)
def test_lying_eq_fails(check):
    message = failure(check, lambda *args: Liar())
    assert "Liar" in message and "return" in message, message
    if check not in CHECKERS:
        return  # chapters 7-11: the checkers' own modules test their tuples and arrays
    message = failure(check, lambda *args: (Liar(), Liar()))
    assert "tuple" in message or "Liar" in message, message
    lying = np.zeros((4, 7)).view(LyingArray)
    message = failure(check, lambda *args: lying)
    assert "subclass" in message or "two arrays" in message, message


def test_lying_array_elements_fail():
    assert "dtype object" in failure(check_softmax, lambda x: np.array([Liar()] * x.size,
                                                                        dtype=object))


@pytest.mark.parametrize("check", ONE_FUNCTION, ids=ONE_FUNCTION_IDS)
def test_not_implemented(check):
    def untouched(*args):
        raise NotImplementedError()

    assert "is not implemented yet" in failure(check, untouched)


@pytest.mark.parametrize("check", ONE_FUNCTION, ids=ONE_FUNCTION_IDS)
def test_exception_is_named_with_its_input(check):
    def broken(*args):
        raise ValueError("boom")

    message = failure(check, broken)
    assert "raised ValueError: boom" in message, message
    if check is not check_query_design:  # make_w_q() takes no input
        assert "when called with" in message, message
    if check in CHECKERS and check is not check_causal_mask:  # array inputs: shapes shown
        assert "shape" in message or "= [" in message, message


@pytest.mark.parametrize("check", ONE_FUNCTION, ids=ONE_FUNCTION_IDS)
def test_not_a_function(check):
    with pytest.raises(AssertionError, match="should be a function"):
        check(42)


def test_not_implemented_helper_is_named():
    def unfinished_softmax(x):
        raise NotImplementedError()

    message = failure(check_softmax_temperature, lambda x, t: unfinished_softmax(x / t))
    assert "it calls unfinished_softmax, which raised NotImplementedError" in message, message


def test_forced_backend():
    message = failure(check_attention, attention_torch, backend="numpy")
    assert "attention raised" in message and "when called with q of shape" in message, message
    with silent():
        check_attention(attention_torch, backend="torch")


def test_exception_message_example():
    message = failure(check_softmax, lambda x: x.reshape(3, -1))
    assert message.startswith("softmax raised ValueError: cannot reshape"), message
    assert "x of shape (4, 7)" in message


def test_none_and_non_function():
    assert "forget `return`" in failure(check_softmax, lambda x: None)
    with pytest.raises(AssertionError, match="should be a function"):
        check_softmax(42)
    # a name left None (a cell that stopped early): says so, not "define it with def"
    with pytest.raises(AssertionError, match="softmax is None: the cell that should make it"):
        check_softmax(None)


def test_pass_line_mentions_hidden_tests_only_when_there_are_some():
    from qkv.grading import check_gpt_target_1
    from qkv.grading.exercise import passed_line

    assert passed_line(check_softmax.exercise, 3).endswith("(The hidden tests try other inputs.)")
    target = check_gpt_target_1.exercise  # judged on the learner's own trained model only
    assert not list(target.hidden())
    assert "hidden" not in passed_line(target, 1)


def test_bfloat16_tensor_fails():
    message = failure(check_softmax,
                      lambda x: torch.softmax(torch.from_numpy(x), -1).to(torch.bfloat16))
    assert "bfloat16" in message, message


# ------------------------------------------------------------------------------------------------
# Rebinding numeric functions after import does not turn a wrong answer into a pass
# ------------------------------------------------------------------------------------------------


def test_patched_numpy_and_reference_do_not_help_a_wrong_answer():
    saved = dict(allclose=np.allclose, isclose=np.isclose, exp=np.exp, array_equal=np.array_equal,
                 testing=np.testing.assert_allclose, ref=qnp.softmax)
    try:
        np.allclose = lambda *a, **k: True
        np.isclose = lambda a, b, **k: np.ones(np.broadcast(a, b).shape, dtype=bool)
        np.array_equal = lambda *a, **k: True
        np.testing.assert_allclose = lambda *a, **k: None
        np.exp = lambda x: x  # the learner's "softmax" is then the identity, and so would the
        qnp.softmax = lambda x, axis=-1: x  # reference's be, were it not computed pristine
        with pytest.raises(AssertionError, match="softmax returned wrong values"):
            check_softmax(lambda x: x)
        with pytest.raises(AssertionError, match="not shifted by one"):
            check_shift_targets(lambda ids: (ids[:-1], ids[:-1]))
        with pytest.raises(AssertionError, match="should return"):
            check_layer_norm(lambda *a: Liar())
        # ... and the learner's bindings are handed back once the checker is done
        assert np.exp(3.0) == 3.0 and qnp.softmax(5) == 5
    finally:
        np.allclose, np.isclose, np.exp = saved["allclose"], saved["isclose"], saved["exp"]
        np.array_equal, np.testing.assert_allclose = saved["array_equal"], saved["testing"]
        qnp.softmax = saved["ref"]
    check_softmax(softmax)


FIRST_MISTAKE = {}
for _check, _wrong, _phrase in MISTAKES:
    FIRST_MISTAKE.setdefault(_check, (_wrong, _phrase))


@contextlib.contextmanager
def comparisons_patched_to_true():
    """NumPy's comparisons rebound to always say "equal", as a learner's notebook could do after
    importing qkv.grading; restored afterwards."""
    saved = np.allclose, np.isclose, np.array_equal, np.testing.assert_allclose
    np.allclose = lambda *a, **k: True
    np.isclose = lambda a, b, **k: np.ones(np.broadcast(a, b).shape, dtype=bool)
    np.array_equal = lambda *a, **k: True
    np.testing.assert_allclose = lambda *a, **k: None
    try:
        yield
    finally:
        np.allclose, np.isclose, np.array_equal, np.testing.assert_allclose = saved


@pytest.mark.parametrize("check", CHECKERS, ids=[c.__name__ for c in CHECKERS])
def test_allclose_patched_to_true_does_not_pass_a_wrong_answer(check):
    wrong, phrase = FIRST_MISTAKE[check]
    with comparisons_patched_to_true():
        message = failure(check, wrong)
    assert phrase in message, message


def test_patched_builtins_do_not_help_a_wrong_answer():
    import builtins

    saved = builtins.isinstance, builtins.type
    builtins.isinstance = lambda *a: True
    builtins.type = lambda *a: np.ndarray if len(a) == 1 else saved[1](*a)
    try:  # no pytest machinery while builtins are rebound
        check_softmax(lambda x: Liar())
        outcome = None
    except AssertionError as exc:
        outcome = str(exc)
    finally:
        builtins.isinstance, builtins.type = saved
    assert outcome is not None and "returned a Liar" in outcome, outcome


def test_patching_inside_the_learner_function_does_not_help():
    def sneaky(x):
        np.allclose = lambda *a, **k: True  # noqa: F841 - a local, as learners often get wrong
        import numpy

        numpy.allclose = lambda *a, **k: True
        return x

    saved = np.allclose
    try:
        with pytest.raises(AssertionError, match="wrong values"):
            check_softmax(sneaky)
    finally:
        np.allclose = saved


# ------------------------------------------------------------------------------------------------
# The source notebooks, top to bottom in-process: solutions pass, stubs fail every test cell
# ------------------------------------------------------------------------------------------------

NOTEBOOKS = sorted((ROOT / "solutions").glob("*/*.ipynb"))
SOLUTION = re.compile(r"^([ \t]*)### BEGIN SOLUTION\n.*?^[ \t]*### END SOLUTION\n?",
                      re.MULTILINE | re.DOTALL)


def stub(source):
    """What nbgrader's release puts in place of a solution region."""
    return SOLUTION.sub(lambda m: f"{m.group(1)}# YOUR CODE HERE\n"
                                  f"{m.group(1)}raise NotImplementedError()\n", source)


def run_cells(path, transform=lambda s: s):
    """Execute the notebook's code cells in one namespace; {grade_id: exception or None}."""
    nb = nbformat.read(path, as_version=4)
    namespace = {"__name__": "__main__"}
    results = {}
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        meta = cell.metadata.get("nbgrader", {})
        err = io.StringIO()
        try:
            with contextlib.redirect_stderr(err), warnings.catch_warnings():
                warnings.simplefilter("error")  # a warning would reach stderr in a kernel
                exec(compile(transform(cell.source), f"{path.name}:{meta.get('grade_id')}",
                             "exec"), namespace)
            outcome = None
        except Exception as exc:
            outcome = exc
        assert err.getvalue() == "", f"{meta.get('grade_id')} wrote to stderr: {err.getvalue()}"
        if meta.get("grade"):
            results[meta["grade_id"]] = outcome
    return nb, results


def test_there_are_source_notebooks():
    names = {p.relative_to(ROOT / "solutions").as_posix() for p in NOTEBOOKS}
    assert {"04-scores-and-softmax/softmax.ipynb", "05-masking/masked_attention.ipynb"} <= names


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_metadata(path):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    assert nb.metadata.kernelspec.name == "python3"
    first = nb.cells[0]
    assert first.cell_type == "code" and "from qkv.grading import" in first.source
    assert first.metadata.nbgrader["locked"] and not first.metadata.nbgrader["grade"]
    ids = []
    for cell in nb.cells:
        meta = cell.metadata.get("nbgrader")
        if meta is None:  # a plain cell (e.g. settings the learner edits): no answer, no test
            assert "### BEGIN" not in cell.source and "check_" not in cell.source
            continue
        ids.append(meta["grade_id"])
        assert meta["schema_version"] == 3 and meta["task"] is False
        assert cell.get("outputs", []) == [] and cell.get("execution_count") is None
        if meta["solution"]:
            assert not meta["grade"] and not meta["locked"] and "points" not in meta
            assert "### BEGIN SOLUTION" in cell.source and "### END SOLUTION" in cell.source
        if meta["grade"]:
            assert meta["locked"] and meta["points"] > 0 and not meta["solution"]
            if "check_gpt_target" in cell.source:  # judges the trained model: nothing to hide
                continue
            assert "### BEGIN HIDDEN TESTS" in cell.source and "hidden=True" in cell.source
            assert "check_" in cell.source.split("### BEGIN HIDDEN TESTS")[0]
    assert len(ids) == len(set(ids))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_solution_notebook_passes_every_test_cell(path):
    _, results = run_cells(path)
    assert results and all(outcome is None for outcome in results.values()), results


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_untouched_notebook_fails_every_test_cell(path):
    nb, results = run_cells(path, stub)
    assert results
    for grade_id, outcome in results.items():
        assert isinstance(outcome, AssertionError), (grade_id, outcome)
        assert "not implemented yet" in str(outcome), (grade_id, outcome)


def test_notebook_points():
    points = {}
    for path in NOTEBOOKS:
        nb = nbformat.read(path, as_version=4)
        for cell in nb.cells:
            meta = cell.metadata.get("nbgrader", {})
            if meta.get("grade"):
                points[(path.stem, meta["grade_id"])] = meta["points"]
    assert points == {
        ("softmax", "softmax-tests"): 3, ("softmax", "scores-tests"): 2,
        ("softmax", "temperature-tests"): 1, ("masked_attention", "mask-tests"): 2,
        ("masked_attention", "attention-tests"): 4, ("masked_attention", "targets-tests"): 1,
        ("softmax", "jacobian-tests"): 2, ("masked_attention", "window-tests"): 2,
        ("tokens_and_embeddings", "encode-tests"): 2, ("tokens_and_embeddings", "decode-tests"): 1,
        ("tokens_and_embeddings", "one-hot-tests"): 2, ("tokens_and_embeddings", "embed-tests"): 1,
        ("tokens_and_embeddings", "similarity-tests"): 2,
        ("positional_encoding", "pe-tests"): 3, ("positional_encoding", "add-tests"): 2,
        ("positional_encoding", "equivariance-tests"): 2,
        ("queries_keys_values", "linear-tests"): 2, ("queries_keys_values", "scores-tests"): 2,
        ("queries_keys_values", "lookup-tests"): 2, ("queries_keys_values", "design-tests"): 2,
        ("multi_head_attention", "split-tests"): 2, ("multi_head_attention", "merge-tests"): 1,
        ("multi_head_attention", "mha-tests"): 3, ("multi_head_attention", "count-tests"): 2,
        ("multi_head_attention", "torch-tests"): 3, ("multi_head_attention", "neox-tests"): 2,
        ("decoder_block", "ln-tests"): 2, ("decoder_block", "gelu-tests"): 1,
        ("decoder_block", "mlp-tests"): 2, ("decoder_block", "block-tests"): 3,
        ("decoder_block", "residual-tests"): 2,
        ("gpt_forward", "forward-tests"): 4, ("gpt_forward", "count-tests"): 2,
        ("gpt_forward", "next-tests"): 1, ("gpt_forward", "init-tests"): 3,
        ("backward", "linear-tests"): 2, ("backward", "softmax-tests"): 2,
        ("backward", "ce-tests"): 2, ("backward", "ln-tests"): 3,
        ("backward", "attention-tests"): 3,
        ("backward", "gelu-tests"): 2, ("backward", "mlp-tests"): 2,
        ("backward", "embedding-tests"): 2, ("backward", "block-tests"): 4,
        ("training", "batch-tests"): 2, ("training", "adamw-tests"): 3,
        ("training", "loop-tests"): 3,
        ("generation", "temperature-tests"): 1, ("generation", "top-k-tests"): 2,
        ("generation", "top-p-tests"): 2, ("generation", "greedy-tests"): 2,
        ("generation", "kv-tests"): 3,
        ("bpe", "count-tests"): 2, ("bpe", "merge-tests"): 2, ("bpe", "encode-tests"): 3,
        ("bpe", "decode-tests"): 2,
        ("fast_attention", "step-tests"): 2, ("fast_attention", "streaming-tests"): 2,
        ("fast_attention", "tiled-tests"): 4,
        ("training", "clip-tests"): 2, ("generation", "sample-tests"): 3,
        ("your_gpt", "gpt-tests"): 4, ("your_gpt", "lr-tests"): 1, ("your_gpt", "eval-tests"): 1,
        ("your_gpt", "loop-tests"): 3, ("your_gpt", "trained-tests-1"): 2,
        ("your_gpt", "trained-tests-2"): 2, ("your_gpt", "trained-tests-3"): 2,
        ("your_gpt", "sample-tests"): 2, ("your_gpt", "np-grads-tests"): 3,
        ("your_gpt", "np-train-tests"): 3,
        ("modern_decoder", "rms-tests"): 2, ("modern_decoder", "rope-tests"): 3,
        ("modern_decoder", "rotary-tests"): 2, ("modern_decoder", "swiglu-tests"): 2,
        ("modern_decoder", "repeat-tests"): 1, ("modern_decoder", "gqa-tests"): 2,
        ("modern_decoder", "qknorm-tests"): 1,
        ("training_at_scale", "flops-tests"): 2, ("training_at_scale", "memory-tests"): 3,
        ("training_at_scale", "allreduce-tests"): 3, ("training_at_scale", "accum-tests"): 2,
        ("inside_a_model", "prev-tests"): 2, ("inside_a_model", "ind-tests"): 2,
        ("inside_a_model", "ablate-tests"): 2, ("inside_a_model", "lens-tests"): 2,
    }


def test_a_long_list_input_is_summarised_in_messages():
    """40 hidden merges are not printed in full: the first two, the last, and how many."""
    from qkv.grading.engine import Case, _describe

    merges = [(i, i + 1) for i in range(40)]
    text = _describe(Case(("abc", merges), ("text", "merges")))
    assert text == ("text = 'abc' and merges = [(0, 1), (1, 2), ... 37 more ..., (39, 40)] "
                    "(40 items)"), text
    assert _describe(Case(([1, 2, 3],), ("ids",))) == "ids = [1, 2, 3]"
