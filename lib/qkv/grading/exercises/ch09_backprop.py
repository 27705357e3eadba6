"""Chapter 9, backpropagation by hand: forward/backward pairs for linear, softmax, the fused
softmax + cross-entropy, layer norm and causal attention (the gradient-pair kind: the forward is
compared first, then every named gradient, on the learner's own cache)."""

import math

import numpy as np

from .. import _trusted as _t
from ..engine import Case, Mistake, _normal
from ..exercise import Exercise
from ..kinds import GradientPair


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
    return Case(args, ("x", "w", "b"), note, on_error=note), _upstream(rng, out_shape)


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


LINEAR = Exercise(
    name="linear_forward",
    check="check_linear_backward",
    reference=_t.ref_linear_forward,
    visible=lambda: _linear_cases(False),
    hidden=lambda: _linear_cases(True),
    mistakes=_linear_mistakes,
    output=GradientPair("linear_backward", _t.ref_linear_backward,
                        (("dx", 0), ("dw", 1), ("db", 2))),
    backends=("numpy",),
    doc='linear_forward(x, w, b) -> (out, cache) with out = x @ w + b; linear_backward(dout, '
        'cache) -> {"dx", "dw", "db"}. x (..., d_in), w (d_in, d_out), b (d_out,).',
)


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


SOFTMAX = Exercise(
    name="softmax_forward",
    check="check_softmax_backward",
    reference=_t.ref_softmax_forward,
    visible=lambda: _softmax_cases(False),
    hidden=lambda: _softmax_cases(True),
    mistakes=_softmax_mistakes,
    output=GradientPair("softmax_backward", _t.ref_softmax_backward,
                        (("dx", 0),)),
    backends=("numpy",),
    doc='softmax_forward(x) -> (p, cache) over the last axis; softmax_backward(dout, cache) -> '
        '{"dx"} = p * (dout - sum(dout * p, axis=-1, keepdims=True)).',
)


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


CROSS_ENTROPY = Exercise(
    name="cross_entropy_forward",
    check="check_cross_entropy_backward",
    reference=_t.ref_cross_entropy_forward,
    visible=lambda: _ce_cases(False),
    hidden=lambda: _ce_cases(True),
    mistakes=_ce_mistakes,
    output=GradientPair("cross_entropy_backward", _t.ref_cross_entropy_backward,
                        (("dlogits", 0),), out="scalar"),
    backends=("numpy",),
    doc='cross_entropy_forward(logits, targets) -> (loss, cache); cross_entropy_backward(dloss, '
        'cache) -> {"dlogits"} = (softmax(logits) - onehot(targets)) / N * dloss.',
)


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


LAYER_NORM = Exercise(
    name="layer_norm_forward",
    check="check_layer_norm_backward",
    reference=_t.ref_layer_norm_forward,
    visible=lambda: _ln_cases(False),
    hidden=lambda: _ln_cases(True),
    mistakes=_ln_mistakes,
    output=GradientPair("layer_norm_backward", _t.ref_layer_norm_backward,
                        (("dx", 0), ("dgamma", 1), ("dbeta", 2))),
    backends=("numpy",),
    doc='layer_norm_forward(x, gamma, beta) -> (out, cache); layer_norm_backward(dout, cache) -> '
        '{"dx", "dgamma", "dbeta"}, with the three-term formula for dx.',
)


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
                 ("q", "k", "v"), note, on_error=note), _upstream(rng, shape))


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


ATTENTION = Exercise(
    name="attention_forward",
    check="check_attention_backward",
    reference=lambda q, k, v: _t.ref_attention_forward(q, k, v, causal=True),
    visible=lambda: _attention_cases(False),
    hidden=lambda: _attention_cases(True),
    mistakes=_attention_mistakes,
    output=GradientPair("attention_backward", _t.ref_attention_backward,
                        (("dq", 0), ("dk", 1), ("dv", 2))),
    backends=("numpy",),
    doc='attention_forward(q, k, v) -> (out, cache): causal single-head attention; '
        'attention_backward(dout, cache) -> {"dq", "dk", "dv"}. q, k, v (..., seq, d_head).',
)


EXERCISES = [LINEAR, SOFTMAX, CROSS_ENTROPY, LAYER_NORM, ATTENTION]
