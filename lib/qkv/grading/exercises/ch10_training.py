"""Chapter 10, training: a batch of windows, one AdamW step, the training loop.

``make_batch`` and ``train_loop`` are judged by properties (any random windows will do, as long
as they are windows of the text with shifted targets drawn from the generator passed in; a loop
is judged by every call it makes, the optimizer state it carries and the loss it reaches);
``adamw_step`` is compared part by part with ``qkv.np.adamw_step``.
"""


import numpy as np

from qkv.np import adamw_step as _ref_adamw_step

from .. import _trusted as _t
from ..engine import (
    Case,
    Mistake,
    Spec,
    _as_array,
    _call,
    _describe,
    _kind_of_object,
    _normal,
    _with_note,
)
from ..exercise import Exercise
from ..kinds import Judged, Parts
from ._training_run import judge_loop, loop_cases

# --- a batch of windows ----------------------------------------------------------------------


class _Rng(np.random.Generator):
    """np.random.default_rng(seed) that reads as such in messages."""

    def __init__(self, seed: int):
        super().__init__(np.random.PCG64(seed))
        self._seed = seed

    def __repr__(self):
        return f"np.random.default_rng({self._seed})"


def _batch_case(n, batch, context, seed, note=""):
    ids = _t.default_rng(1000 + seed).permutation(n)  # distinct ids: a row tells its start
    return Case((ids, batch, context, _Rng(seed)), ("ids", "batch_size", "context", "rng"), note)


def _batch_cases(hidden: bool):
    """The cases, then (last) the one whose many draws must cover every start."""
    if not hidden:
        return [_batch_case(40, 4, 8, 0), _batch_case(100, 8, 16, 1),
                _batch_case(12, 6, 9, 2, "Here only 3 windows fit: starts 0, 1 and 2."),
                _coverage_case(False)]
    return [_batch_case(20, 1, 4, 10, "A batch of one window."),
            _batch_case(65, 12, 32, 11), _batch_case(9, 5, 8, 12,
                                                      "Only one window fits here: start 0."),
            _batch_case(300, 16, 64, 13), _coverage_case(True)]


def _call_batch(learner, case, seed=None):
    """The learner's (x, y) as int ndarrays for ``case`` (with a fresh generator)."""
    ids, batch, context, rng = case.args
    rng = _Rng(rng._seed if seed is None else seed)
    call = Case((ids, batch, context, rng), case.names, case.note)
    spec = Spec("make_batch", None, None, out="int_pair")  # how _call and _as_array name it
    try:
        out = _call(spec, learner, call)
    except AssertionError as exc:
        text = str(exc)
        if "raised IndexError" in text or "raised ValueError" in text:  # a window past the end
            text += (f" (A window needs context + 1 tokens, so the largest start is "
                     f"len(ids) - context - 1 = {len(ids) - context - 1}: draw starts with "
                     f"rng.integers(0, len(ids) - context); its high end is exclusive.)")
        raise AssertionError(text) from None
    if not (_t.type_(out) is tuple or _t.type_(out) is list) or _t.len_(out) != 2:
        raise AssertionError(f"make_batch should return two arrays, (x, y); it returned "
                             f"{_kind_of_object(out)} for {_describe(call)}.")
    x = _as_array(spec, out[0], "x", "int", call)
    y = _as_array(spec, out[1], "y", "int", call)
    for label, arr in (("x", x), ("y", y)):
        if arr.shape != (batch, context):
            swapped = " (the two axes are swapped)" if arr.shape == (context, batch) else ""
            raise AssertionError(
                f"make_batch returned {label} of shape {tuple(arr.shape)} for "
                f"{_describe(call)}; expected (batch_size, context) = ({batch}, {context})"
                f"{swapped}: one row per window.")
    return x, y, call


def _window_problem(x, y, ids, context, call):
    """What is wrong with the rows of (x, y) as windows of ids, or None."""
    n = _t.len_(ids)
    where = {int(v): i for i, v in enumerate(ids.tolist())}
    starts = []
    for b in range(x.shape[0]):
        s = where.get(int(x[b, 0]))
        if s is None or s + context > n or not _t.identical(x[b], ids[s:s + context]):
            return (f"row {b} of x is not {context} consecutive tokens of ids for "
                    f"{_describe(call)}: each row must be a window ids[s : s + context] "
                    f"for some start s.\nGot x[{b}] = {x[b].tolist()}"), None
        if s + context >= n:
            return (f"row {b} of x starts at {s}, the window ids[{s} : {s + context}] for "
                    f"{_describe(call)}: its last target would be ids[{s + context}], past "
                    f"the end of ids (length {n}). The largest start is "
                    f"len(ids) - context - 1 = {n - context - 1}: draw starts with "
                    f"rng.integers(0, len(ids) - context)."), None
        right = ids[s + 1:s + context + 1]
        if not _t.identical(y[b], right):
            return _target_problem(y[b], ids, s, context, b, call), None
        starts.append(s)
    return None, starts


def _target_problem(row, ids, s, context, b, call):
    if _t.identical(row, ids[s:s + context]):
        return ("make_batch's targets are not shifted: y is the same as x. The target at "
                "position t is the NEXT token: y = ids[s + 1 : s + context + 1].")
    if s >= 1 and _t.identical(row, ids[s - 1:s + context - 1]):
        return ("make_batch shifted the targets the wrong way: y[t] must be the token AFTER "
                "x[t], so y = ids[s + 1 : s + context + 1], not ids[s - 1 : s + context - 1].")
    if s + context + 2 <= _t.len_(ids) and _t.identical(row, ids[s + 2:s + context + 2]):
        return ("make_batch shifts the targets by two; shift by one: "
                "y = ids[s + 1 : s + context + 1].")
    n = _t.len_(ids)
    for other in range(n - context):
        if _t.identical(row, ids[other + 1:other + context + 1]):
            return (f"make_batch takes y from a different window than x (row {b}: x starts at "
                    f"{s}, y at {other + 1}): draw the starts ONCE and cut both x and y from "
                    f"each start: x = ids[s : s + context], y = ids[s + 1 : s + context + 1].")
    return (f"row {b} of y is not the targets of row {b} of x for {_describe(call)}: with x[{b}] "
            f"= ids[{s} : {s + context}], y[{b}] must be ids[{s + 1} : {s + context + 1}] = "
            f"{ids[s + 1:s + context + 1].tolist()}; got {row.tolist()}.")


def _judge_batch(ex, learner, cases) -> None:
    """Windows of ids with shifted targets, drawn from rng, covering every start."""
    with _t.pristine():
        for case in cases[:-1]:
            ids, batch, context, rng = case.args
            x, y, call = _call_batch(learner, case)
            problem, _ = _window_problem(x, y, ids, context, call)
            if problem is not None:
                raise AssertionError(_with_note(problem, case))
            x2, y2, _ = _call_batch(learner, case)
            if not (_t.identical(x, x2) and _t.identical(y, y2)):
                raise AssertionError(
                    f"make_batch gave two different batches for {_describe(call)}, called twice "
                    f"with a generator made from the same seed. Draw the random starts from "
                    f"rng, the generator passed in (rng.integers(...)), not from np.random or "
                    f"random: then a seed gives the same batch every time.")
            if _t.len_(ids) - context > 1:
                xs = [_call_batch(learner, case, seed=rng._seed + 100 + k)[0] for k in range(3)]
                if all(_t.identical(xi, x) for xi in xs):
                    raise AssertionError(
                        f"make_batch returned the same windows for generators with different "
                        f"seeds ({_describe(call)}): the starts must be random, drawn from rng.")
        _check_coverage(learner, cases[-1])


def _coverage_case(hidden: bool):
    n, context = (13, 9) if not hidden else (21, 16)
    return _batch_case(n, 64, context, 20 if not hidden else 21,
                       f"There are {n - context} possible starts here.")


def _check_coverage(learner, case) -> None:
    """Every start 0 .. n - context - 1 comes up over many draws; none past it."""
    ids, _, context, _ = case.args
    n = len(ids)
    seen = set()
    for k in range(4):
        x, y, call = _call_batch(learner, case, seed=case.args[3]._seed + k)
        problem, starts = _window_problem(x, y, ids, context, call)
        if problem is not None:
            raise AssertionError(_with_note(problem, case))
        seen.update(starts)
    last = n - context - 1
    if last not in seen:
        raise AssertionError(
            f"make_batch never starts a window at {last} = len(ids) - context - 1 (in 256 "
            f"windows with len(ids) = {n}, context = {context}), the last start that still has "
            f"a target for every position. rng.integers(low, high) never returns high itself: "
            f"use rng.integers(0, len(ids) - context).")
    if 0 not in seen:
        raise AssertionError(
            f"make_batch never starts a window at 0 (in 256 windows with len(ids) = {n}, "
            f"context = {context}): the first token of ids can start a window too.")
    missing = sorted(set(range(last + 1)) - seen)
    if missing:
        raise AssertionError(
            f"make_batch never starts a window at {missing} (in 256 windows with len(ids) = "
            f"{n}, context = {context}): every start from 0 to {last} should be equally likely.")


# --- one AdamW step

_ADAM_LABELS = ("new_params", "new_m", "new_v")


def _reference_adamw(params, grads, m, v, t, lr, beta1, beta2, eps, weight_decay):
    new, state = _ref_adamw_step(params, grads, {"step": t - 1, "m": m, "v": v}, lr,
                                 (beta1, beta2), eps, weight_decay)
    return new, state["m"], state["v"]


def _adamw_variant(params, grads, m, v, t, lr, beta1, beta2, eps, weight_decay, *,
                   correct=True, t_used=None, decay="matrices", l2=False, decay_lr=True,
                   decay_after=False, eps_inside=False, square=True, root=True,
                   moments=True):
    tt = t if t_used is None else t_used
    new_p, new_m, new_v = {}, {}, {}
    for k in params:
        p, g = params[k], grads[k]
        wd = weight_decay if (decay == "all" or decay == "matrices" and p.ndim >= 2) else 0.0
        if l2:
            g = g + wd * p
        mk = beta1 * m[k] + (1 - beta1) * g
        vk = beta2 * v[k] + (1 - beta2) * (g * g if square else g)
        m_hat = mk / (1 - beta1**tt) if correct else mk
        v_hat = vk / (1 - beta2**tt) if correct else vk
        denom = (np.sqrt(v_hat + eps) if eps_inside else np.sqrt(v_hat) + eps) if root \
            else v_hat + eps
        step = lr * m_hat / denom
        shrink = 1 - (lr * wd if decay_lr else wd)
        if l2:
            new = p - step
        elif decay_after:
            new = (p - step) * shrink
        else:
            new = p * shrink - step
        new_p[k] = new
        new_m[k], new_v[k] = (mk, vk) if moments else (m[k], v[k])
    return new_p, new_m, new_v


def _adamw_mistakes(*args):
    def variant(**kw):
        return lambda *a: _adamw_variant(*a, **kw)

    t = args[4]
    yield Mistake(
        "{name} leaves out the bias correction: divide m by (1 - beta1**t) and v by "
        "(1 - beta2**t) before the step. Both start at zero, so without it the first steps are "
        "far too small.", variant(correct=False))
    for t_used, what in ((t - 1, "t - 1"), (t + 1, "t + 1")):
        zero = " (at the first step that is 1 - beta1**0 = 0: a division by zero)" \
            if t_used == 0 else ""
        yield Mistake(
            f"{{name}} uses {what} in the bias correction{zero}; use t itself (this step's "
            f"number, 1 for the first step): m_hat = m / (1 - beta1**t).", variant(t_used=t_used))
    yield Mistake(
        "{name} applies weight decay to every parameter; decay only the matrices (p.ndim >= 2), "
        "never the biases and layer-norm vectors (ndim 1).", variant(decay="all"))
    yield Mistake(
        "{name} never applies weight decay; matrices (p.ndim >= 2) should shrink by "
        "p * (1 - lr * weight_decay) at every step.", variant(decay="none"))
    yield Mistake(
        "{name} adds weight_decay * p to the gradient (L2 regularisation, plain Adam's way); "
        "AdamW decouples it: leave the gradient alone and shrink the weight itself, "
        "p = p * (1 - lr * weight_decay), then take the Adam step.", variant(l2=True))
    yield Mistake(
        "{name} decays by p * (1 - weight_decay); the decay is scaled by the learning rate too: "
        "p * (1 - lr * weight_decay).", variant(decay_lr=False))
    yield Mistake(
        "{name} applies the weight decay after the Adam step; torch decays the OLD weight "
        "first: p = p * (1 - lr * weight_decay), then p = p - lr * m_hat / (sqrt(v_hat) + eps).",
        variant(decay_after=True))
    yield Mistake(
        "{name} puts eps inside the square root; it goes outside: "
        "m_hat / (np.sqrt(v_hat) + eps).", variant(eps_inside=True))
    yield Mistake(
        "{name} updates v with the gradient instead of its square: "
        "v = beta2 * v + (1 - beta2) * g**2.", variant(square=False))
    yield Mistake(
        "{name} divides by v_hat instead of its square root: "
        "m_hat / (np.sqrt(v_hat) + eps).", variant(root=False))
    yield Mistake(
        "{name} returns the old m and v: return the updated moments, so the next step can use "
        "them.", variant(moments=False))


def _adam_state(rng, shapes, t, dtype=np.float64):
    names = ("params", "grads", "m", "v")
    out = {n: {} for n in names}
    for key, shape in shapes.items():
        out["params"][key] = _normal(rng, *shape, dtype=dtype)
        out["grads"][key] = _normal(rng, *shape, scale=0.1, dtype=dtype)
        first = t == 1
        out["m"][key] = np.zeros(shape, dtype) if first else _normal(rng, *shape, scale=0.05,
                                                                      dtype=dtype)
        out["v"][key] = np.zeros(shape, dtype) if first else (
            _normal(rng, *shape, scale=0.05, dtype=dtype) ** 2).astype(dtype)
    return [out[n] for n in names]


_ADAM_NAMES = ("params", "grads", "m", "v", "t", "lr", "beta1", "beta2", "eps", "weight_decay")


def _adam_case(rng, shapes, t, lr=1e-2, betas=(0.9, 0.999), eps=1e-8, wd=0.1, note="",
               dtype=np.float64):
    return Case((*_adam_state(rng, shapes, t, dtype), t, lr, *betas, eps, wd), _ADAM_NAMES,
                note)


def _adamw_cases(hidden: bool):
    if not hidden:
        rng = _t.default_rng(30)
        return [
            _adam_case(rng, {"w": (4, 3), "b": (3,)}, 1,
                       note="This is the first step (t = 1): m and v are still zero."),
            _adam_case(rng, {"w": (4, 3), "b": (3,)}, 5, lr=3e-3, betas=(0.9, 0.99),
                       note="Step t = 5, with m and v from earlier steps."),
            _adam_case(rng, {"emb": (6, 2), "w": (2, 5), "gamma": (5,)}, 2, wd=0.5,
                       note="emb and w are matrices (decayed); gamma is a vector (not)."),
        ]
    rng = _t.default_rng(130)
    return [
        _adam_case(rng, {"w": (3, 3), "b": (3,)}, 1, lr=0.1, eps=1e-3, wd=0.01),
        _adam_case(rng, {"w_qkv": (4, 12), "b_qkv": (12,), "ln_gamma": (4,)}, 10,
                   betas=(0.8, 0.95), wd=0.2),
        _adam_case(rng, {"w": (5, 2)}, 3, wd=0.0, note="weight_decay is 0 here."),
        _adam_case(rng, {"w": (3, 4), "b": (4,)}, 7, dtype=np.float32,
                   note="The arrays are float32 here."),
        _adam_case(rng, {"table": (2, 3, 2), "bias": (2,)}, 100, lr=1e-3,
                   note="table has three axes (ndim 3): it is decayed like a matrix."),
    ]


MAKE_BATCH = Exercise(
    name="make_batch",
    reference=None,
    visible=lambda: _batch_cases(False),
    hidden=lambda: _batch_cases(True),
    output=Judged(_judge_batch, "gives windows of ids with shifted targets, drawn from rng, "
                                "covering every start"),
    backends=("numpy",),
    doc="make_batch(ids, batch_size, context, rng) -> (x, y), each (batch_size, context) ints: "
        "row b of x is ids[s : s + context] from a random start s drawn with rng, row b of y "
        "is ids[s + 1 : s + context + 1]; every start 0 .. len(ids) - context - 1 can come up.",
)

ADAMW_STEP = Exercise(
    name="adamw_step",
    reference=_reference_adamw,
    visible=lambda: _adamw_cases(False),
    hidden=lambda: _adamw_cases(True),
    mistakes=_adamw_mistakes,
    output=Parts(_ADAM_LABELS),
    backends=("numpy",),
    doc="adamw_step(params, grads, m, v, t, lr, beta1, beta2, eps, weight_decay) -> "
        "(new_params, new_m, new_v), dicts of arrays with params' keys: torch.optim.AdamW's "
        "update, weight decay on arrays of ndim >= 2 only, t counted from 1; inputs unchanged.",
)

TRAINING_LOOP = Exercise(
    name="train_loop",
    check="check_training_loop",
    reference=None,
    visible=lambda: loop_cases(False),
    hidden=lambda: loop_cases(True),
    output=Judged(judge_loop, "makes the right calls, carries AdamW's state from step to step "
                              "and reaches the target loss"),
    backends=("numpy",),
    doc="train_loop(loss_and_grads, params, ids, steps, batch_size, context, lr, seed) -> "
        "(params, losses): steps AdamW steps (t = step + 1, moments carried), each on a fresh "
        "batch from one generator; one loss per step; the toy model must reach a target loss.",
)

EXERCISES = [MAKE_BATCH, ADAMW_STEP, TRAINING_LOOP]
