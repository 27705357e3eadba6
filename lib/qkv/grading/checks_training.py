"""Checkers for chapters 10 and 11: training (batches, AdamW, the loop) and generation
(temperature, top-k, top-p, greedy decoding with an end token, a KV-cached attention step).

They run on the engine of ``checks`` (``Case``, ``Mistake``, ``Spec``, ``_run``, ``_run_value``,
``_call``): same signature, same silence on a correct answer, same trusted references captured
when ``qkv.grading`` is imported, and ``_trusted.pristine()`` around everything. Three shapes of
exercise are new here:

- answers that return several arrays, or dicts of arrays (``adamw_step``,
  ``cached_attention_step``): ``_run_parts`` compares every part by name and names a mistake only
  when a known-wrong computation gives all of the learner's parts;
- answers judged by properties rather than one reference output (``make_batch``: any random
  windows will do, as long as they are windows of the text, with shifted targets, drawn from the
  generator passed in, covering every start);
- a loop that drives functions the checker hands it (``train_loop`` gets a toy model's
  ``loss_and_grads``, which records every call): judged by what it asked for, what it returned
  and the loss it reached.
"""

import math

import numpy as np

from qkv.np import adamw_step as _ref_adamw_step
from qkv.np import filter_top_k as _ref_top_k
from qkv.np import filter_top_p as _ref_top_p

from . import _trusted as _t
from ._legacy import (
    Case,
    Mistake,
    Spec,
    _arrays,
    _as_array,
    _call,
    _describe,
    _float64,
    _kind_of_object,
    _Learner,
    _matches,
    _mismatch,
    _normal,
    _plain_softmax,
    _run,
    _run_value,
    _with_note,
)


def _quiet():
    return _t.errstate(all="ignore")


def _not_a_function(name: str, fn) -> None:
    if not _t.callable_(fn):
        raise AssertionError(f"{name} should be a function, but it is a "
                             f"{_t.type_(fn).__name__}. Define it with `def {name}(...):`.")


# ==============================================================================================
# Several outputs: a tuple of arrays, or of dicts of arrays
# ==============================================================================================


def _flatten(value, labels) -> dict:
    """A reference or variant output (tuple of arrays or dicts) -> {label: float64 ndarray}."""
    flat = {}
    for label, part in zip(labels, value, strict=True):
        if _t.type_(part) is dict:
            for key, arr in part.items():
                flat[f"{label}[{key!r}]"] = _t.asarray(arr)
        else:
            flat[label] = _t.asarray(part)
    return flat


def _read_parts(spec: Spec, out, case: Case, labels, expected: dict) -> dict:
    """The learner's output as {label: ndarray}, after checking its structure."""
    n = _t.len_(labels)
    if not (_t.type_(out) is tuple or _t.type_(out) is list) or _t.len_(out) != n:
        raise AssertionError(f"{spec.name} should return {n} things, ({', '.join(labels)}); it "
                             f"returned {_kind_of_object(out)} for {_describe(case)}.")
    flat = {}
    for label, part in zip(labels, out, strict=True):
        wanted = {k: v for k, v in expected.items() if k.startswith(label + "[")}
        if wanted:  # a dict of arrays
            if _t.type_(part) is not dict:
                raise AssertionError(f"{spec.name} should return {label} as a dict of arrays "
                                     f"(name -> array); it returned {_kind_of_object(part)} "
                                     f"for {_describe(case)}.")
            got_keys = sorted(repr(k) for k in part)
            want_keys = sorted(k[len(label) + 1:-1] for k in wanted)  # "label['w']" -> "'w'"
            if got_keys != want_keys:
                raise AssertionError(f"{spec.name} returned {label} with the keys "
                                     f"{', '.join(got_keys) or 'none'} for {_describe(case)}; "
                                     f"it should have the keys of params: "
                                     f"{', '.join(want_keys)}.")
            for key, arr in part.items():
                flat[f"{label}[{key!r}]"] = _as_array(spec, arr, f"{label}[{key!r}]", "float",
                                                      case)
        else:
            flat[label] = _as_array(spec, part, label, "float", case)
    return flat


def _run_parts(spec: Spec, fn, cases, labels, backend: str = "numpy") -> None:
    """``checks._run`` for a function returning several arrays (or dicts of arrays)."""
    _not_a_function(spec.name, fn)
    learner = _Learner(fn, backend)
    with _t.pristine():
        for case in cases:
            args = _float64(case.args)
            with _t.catch_warnings(), _quiet():
                _t.simplefilter("ignore")
                expected = _flatten(spec.reference(*args), labels)
            out = _call(spec, learner, case)
            got = _read_parts(spec, out, case, labels, expected)
            single = any(g.dtype.itemsize < 8 for g in got.values()) or any(
                a.dtype == np.float32 for a in _arrays(case.args))
            tol = _t.tolerances[spec.tol32 if single else "float64"]
            for label, e in expected.items():
                problem = _mismatch(Spec(spec.name, None, None), (got[label],), (e,), case, tol)
                if problem is None:
                    continue
                problem = problem.replace(f"{spec.name} returned",
                                          f"{spec.name} returned {label} with", 1)
                said = _diagnose_parts(spec, got, expected, args, case, tol, labels)
                raise AssertionError(said if said is not None else _with_note(problem, case))


def _diagnose_parts(spec, got, expected, args, case, tol, labels):
    for mistake in spec.mistakes(*args):
        try:
            with _t.catch_warnings(), _quiet():
                _t.simplefilter("ignore")
                wrong = _flatten(mistake.fn(*args), labels)
        except Exception:
            continue
        if wrong.keys() != got.keys():
            continue
        same_as_right = all(_matches((wrong[k],), (expected[k],), tol) for k in wrong)
        if same_as_right or not all(_matches((got[k],), (wrong[k],), tol) for k in wrong):
            continue
        return mistake.says.replace("{name}", spec.name).replace("{case}", _describe(case))
    return None


# ==============================================================================================
# Chapter 10: the batch builder
# ==============================================================================================


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
    if not hidden:
        return [_batch_case(40, 4, 8, 0), _batch_case(100, 8, 16, 1),
                _batch_case(12, 6, 9, 2, "Here only 3 windows fit: starts 0, 1 and 2.")]
    return [_batch_case(20, 1, 4, 10, "A batch of one window."),
            _batch_case(65, 12, 32, 11), _batch_case(9, 5, 8, 12,
                                                      "Only one window fits here: start 0."),
            _batch_case(300, 16, 64, 13)]


def _call_batch(learner, case, seed=None):
    """The learner's (x, y) as int ndarrays for ``case`` (with a fresh generator)."""
    ids, batch, context, rng = case.args
    rng = _Rng(rng._seed if seed is None else seed)
    call = Case((ids, batch, context, rng), case.names, case.note)
    spec = Spec("make_batch", None, None, out="int_pair")
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


def check_make_batch(make_batch, hidden: bool = False) -> None:
    """make_batch(ids, batch_size, context, rng) -> (x, y), each (batch_size, context) ints.

    Each row of x is a window ids[s : s + context] from a random start s drawn with ``rng``;
    the same row of y is ids[s + 1 : s + context + 1]. Any way of drawing the starts from
    ``rng`` passes, as long as every start from 0 to len(ids) - context - 1 can come up.
    """
    _not_a_function("make_batch", make_batch)
    learner = _Learner(make_batch, "numpy")
    with _t.pristine():
        for case in _batch_cases(hidden):
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
        _check_coverage(learner, hidden)


def _check_coverage(learner, hidden: bool) -> None:
    """Every start 0 .. n - context - 1 comes up over many draws; none past it."""
    n, context = (13, 9) if not hidden else (21, 16)
    case = _batch_case(n, 64, context, 20 if not hidden else 21,
                       f"There are {n - context} possible starts here.")
    ids = case.args[0]
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


# ==============================================================================================
# Chapter 10: one AdamW step
# ==============================================================================================

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


def check_adamw_step(adamw_step, hidden: bool = False) -> None:
    """adamw_step(params, grads, m, v, t, lr, beta1, beta2, eps, weight_decay)
    -> (new_params, new_m, new_v), dicts of arrays with params' keys.

    torch.optim.AdamW's update (qkv.np.adamw_step, which the tests check against torch), with
    weight decay on arrays of ndim >= 2 only. t is the step's number, from 1. Inputs unchanged.
    """
    spec = Spec("adamw_step", _reference_adamw, _adamw_mistakes)
    _run_parts(spec, adamw_step, _adamw_cases(hidden), _ADAM_LABELS)


# ==============================================================================================
# Chapter 10: the training loop
# ==============================================================================================


def _toy_corpus(hidden: bool) -> str:
    if not hidden:
        return "the cat sat on the mat. the dog sat on the log. " * 12
    return "a bee can see a sea. a cat can see a bee. " * 14


def _toy_problem(hidden: bool):
    """(params, ids, vocab): a bigram model logits = emb[x] @ w + b on a toy corpus."""
    text = _toy_corpus(hidden)
    chars = sorted(set(text))
    ids = np.array([chars.index(c) for c in text])
    vocab, d = len(chars), 8
    rng = _t.default_rng(40 if not hidden else 140)
    params = {"emb": rng.normal(0.0, 0.1, size=(vocab, d)),
              "w": rng.normal(0.0, 0.1, size=(d, vocab)),
              "b": np.zeros(vocab)}
    return params, ids, vocab


def _toy_loss_and_grads(params, x, y):
    """Mean cross-entropy of the toy bigram model and its gradients (float64)."""
    emb, w, b = params["emb"], params["w"], params["b"]
    h = emb[x]  # (batch, seq, d)
    logits = h @ w + b  # (batch, seq, vocab)
    logits = logits - logits.max(axis=-1, keepdims=True)
    probs = np.exp(logits)
    probs = probs / probs.sum(axis=-1, keepdims=True)
    n = y.size
    picked = np.take_along_axis(probs, y[..., None], axis=-1)[..., 0]
    loss = float(-np.mean(np.log(picked)))
    dlogits = probs.copy()
    np.put_along_axis(dlogits, y[..., None], np.take_along_axis(dlogits, y[..., None], -1) - 1,
                      axis=-1)
    dlogits /= n
    d = h.shape[-1]
    dw = h.reshape(-1, d).T @ dlogits.reshape(-1, w.shape[1])
    db = dlogits.reshape(-1, w.shape[1]).sum(axis=0)
    dh = dlogits @ w.T
    demb = np.zeros_like(emb)
    np.add.at(demb, x.reshape(-1), dh.reshape(-1, d))
    return loss, {"emb": demb, "w": dw, "b": db}


def _toy_full_loss(params, ids) -> float:
    x, y = ids[None, :-1], ids[None, 1:]
    return _toy_loss_and_grads(params, x, y)[0]


class _Recorder:
    """The loss_and_grads handed to the learner's loop: the toy model, recording every call."""

    def __init__(self):
        self.calls = []  # (params copy, x, y, loss)
        self.problem = None

    def __call__(self, params, x, y):
        if _t.type_(params) is not dict or sorted(params) != ["b", "emb", "w"]:
            self.problem = (f"loss_and_grads was called with params = "
                            f"{_kind_of_object(params)}; pass the dict of arrays "
                            f"{{'emb', 'w', 'b'}} you are training.")
            raise TypeError(self.problem)
        x, y = np.asarray(x), np.asarray(y)
        copy = {k: np.array(v, dtype=np.float64) for k, v in params.items()}
        loss, grads = _toy_loss_and_grads(copy, x, y)
        self.calls.append((copy, x.copy(), y.copy(), loss))
        return loss, grads

    def __repr__(self):
        return "loss_and_grads (the toy model's)"


def _loop_settings(hidden: bool):
    # (steps, batch_size, context, lr, seed, the loss to reach)
    return (150, 8, 16, 0.05, 0, 0.85) if not hidden else (200, 4, 12, 0.03, 7, 1.0)


def check_training_loop(train_loop, hidden: bool = False) -> None:
    """train_loop(loss_and_grads, params, ids, steps, batch_size, context, lr, seed)
    -> (params, losses).

    The checker hands it a toy model (a bigram model, logits = emb[x] @ w + b) on a toy
    corpus: ``loss_and_grads(params, x, y) -> (loss, grads)``. The loop must take ``steps``
    AdamW steps, each on a fresh batch, return one loss per step (the value loss_and_grads
    gave), and end with params whose loss on the whole corpus is below a target.
    """
    name = "train_loop"
    _not_a_function(name, train_loop)
    steps, batch, context, lr, seed, target = _loop_settings(hidden)
    params, ids, vocab = _toy_problem(hidden)
    start_loss = _toy_full_loss(params, ids)
    record = _Recorder()
    case = Case((record, params, ids, steps, batch, context, lr, seed),
                ("loss_and_grads", "params", "ids", "steps", "batch_size", "context", "lr",
                 "seed"))
    spec = Spec(name, None, None)
    with _t.pristine():
        out = _call(spec, _Learner(train_loop, "numpy"), case)
        if record.problem is not None:
            raise AssertionError(record.problem)
        if not (_t.type_(out) is tuple or _t.type_(out) is list) or _t.len_(out) != 2:
            raise AssertionError(f"{name} should return (params, losses); it returned "
                                 f"{_kind_of_object(out)}.")
        final, losses = out
        _check_loop_calls(record, steps, batch, context)
        _check_loop_losses(record, losses, steps)
        _check_loop_params(final, params, record, ids, start_loss, target, steps)


def _check_loop_calls(record, steps, batch, context):
    calls = record.calls
    if not calls:
        raise AssertionError("train_loop never called loss_and_grads: at every step, call "
                             "loss, grads = loss_and_grads(params, x, y) on a batch.")
    if _t.len_(calls) != steps:
        raise AssertionError(f"train_loop called loss_and_grads {_t.len_(calls)} times for "
                             f"steps = {steps}; call it once per step.")
    for i, (_, x, y, _) in enumerate(calls):
        if x.shape != (batch, context) or y.shape != (batch, context):
            raise AssertionError(
                f"at step {i}, train_loop passed x of shape {tuple(x.shape)} and y of shape "
                f"{tuple(y.shape)}; batches should be (batch_size, context) = ({batch}, "
                f"{context}): make_batch(ids, batch_size, context, rng).")
        if not _t.identical(x[:, 1:], y[:, :-1]):
            raise AssertionError(
                f"at step {i}, y is not x shifted by one (y[:, :-1] should equal x[:, 1:]): "
                f"pass the (x, y) pair that make_batch returns, in that order.")
    if all(_t.identical(calls[0][1], c[1]) for c in calls[1:]):
        raise AssertionError("train_loop used the same batch at every step: draw a new batch "
                             "inside the loop, from one generator made ONCE before it "
                             "(rng = np.random.default_rng(seed)).")
    for i in range(1, _t.len_(calls)):
        before, after = calls[i - 1][0], calls[i][0]
        if all(_t.identical(before[k], after[k]) for k in before):
            raise AssertionError(
                f"the params passed to loss_and_grads at step {i} are the same as at step "
                f"{i - 1}: the update was lost. Keep what adamw_step returns: "
                f"params, m, v = adamw_step(params, grads, m, v, t, lr).")


def _check_loop_losses(record, losses, steps):
    try:
        got = [float(v) for v in losses]
    except Exception:
        raise AssertionError(f"train_loop should return losses as a list of numbers, one per "
                             f"step; it returned {_kind_of_object(losses)}.") from None
    if _t.len_(got) != steps:
        raise AssertionError(f"train_loop returned {_t.len_(got)} losses for steps = {steps}; "
                             f"return one loss per step, in order.")
    want = [c[3] for c in record.calls]
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        if not (abs(g - w) <= 1e-9 * max(1.0, abs(w))):
            raise AssertionError(
                f"train_loop's losses[{i}] is {g:.6g}, but loss_and_grads returned {w:.6g} at "
                f"step {i}: append the loss each call returns (before the update), in order.")


def _check_loop_params(final, params, record, ids, start_loss, target, steps):
    if _t.type_(final) is not dict or sorted(final) != sorted(params):
        raise AssertionError(f"train_loop should return the trained params as a dict with the "
                             f"keys {sorted(params)}; it returned {_kind_of_object(final)}.")
    final = {k: np.array(v, dtype=np.float64) for k, v in final.items()}
    if all(_t.identical(final[k], params[k]) for k in params):
        raise AssertionError("train_loop returned the params it started with: return the "
                             "params after the last update.")
    last_seen = record.calls[-1][0]
    if all(_t.identical(final[k], last_seen[k]) for k in params):
        raise AssertionError("train_loop returned the params from before the last update: "
                             "return them after the last adamw_step.")
    loss = _toy_full_loss(final, ids)
    if not math.isfinite(loss) or loss > target:
        first = record.calls[0][3]
        raise AssertionError(
            f"after {steps} steps the toy model's loss on the whole corpus is {loss:.3f} (it "
            f"started at {start_loss:.3f}; the first batch loss was {first:.3f}); a correct "
            f"loop reaches {target} or less with these settings. Check that every step uses "
            f"adamw_step with t = 1, 2, 3, ... (step + 1) and the lr you were given, and keeps "
            f"m and v from one step to the next (start them at zero ONCE, before the loop).")


# ==============================================================================================
# Chapter 11: temperature, top-k, top-p
# ==============================================================================================


def _reference_temperature_probs(x, temperature):
    if temperature == 0:
        idx = np.argmax(x, axis=-1)
        out = np.zeros_like(x)
        np.put_along_axis(out, idx[..., None], 1.0, axis=-1)
        return out
    return _t.ref_softmax(x / temperature)


def _one_hot_max(x, pick=np.argmax):
    out = np.zeros_like(x)
    np.put_along_axis(out, pick(x, axis=-1)[..., None], 1.0, axis=-1)
    return out


def _temperature_probs_mistakes(x, temperature):
    if temperature == 0:
        yield Mistake(
            "{name} divides by the temperature when it is 0, which gives inf and then nan. Treat "
            "temperature == 0 on its own: all the probability on the largest logit (a one-hot "
            "vector at np.argmax(logits, axis=-1)), which is what a temperature near 0 tends to.",
            lambda x, t: _plain_softmax(x / t))
        yield Mistake(
            "{name} puts the probability on the SMALLEST logit at temperature 0; use np.argmax.",
            lambda x, t: _one_hot_max(x, np.argmin))
        yield Mistake(
            "{name} returns plain softmax(logits) at temperature 0; temperature 0 means greedy: "
            "probability 1 for the largest logit, 0 for every other.",
            lambda x, t: _t.ref_softmax(x))
        return
    yield Mistake(
        "{name} multiplies the logits by the temperature; divide: softmax(logits / temperature).",
        lambda x, t: _t.ref_softmax(x * t))
    yield Mistake(
        "{name} ignores the temperature: it returned softmax(logits). Divide the logits by the "
        "temperature first.", lambda x, t: _t.ref_softmax(x))
    yield Mistake(
        "{name} divides the probabilities by the temperature after the softmax; divide the "
        "logits before it.", lambda x, t: _t.ref_softmax(x) / t)
    yield Mistake(
        "{name} is not numerically stable: for {case}, logits / temperature is large and exp "
        "overflows. Subtract each row's maximum before np.exp.",
        lambda x, t: _plain_softmax(x / t, stable=False))
    yield Mistake(
        "{name} returns the filtered logits / temperature, not probabilities: apply the softmax.",
        lambda x, t: x / t)


def _temperature_probs_cases(hidden: bool):
    names = ("logits", "temperature")
    if not hidden:
        rng = _t.default_rng(50)
        return [Case((_normal(rng, 7, scale=2.0), 0.7), names),
                Case((_normal(rng, 3, 5), 1.5), names,
                     "logits is a batch here, (3, 5): one distribution per row."),
                Case((_normal(rng, 2, 6, scale=2.0), 0), names,
                     "temperature is 0 here: greedy, all probability on each row's maximum."),
                Case((np.array([300.0, 290.0, 310.0]), 0.1), names,
                     "Large logits and a low temperature: exp(3100) overflows.")]
    rng = _t.default_rng(150)
    return [Case((_normal(rng, 9), 1.0), names, "At temperature 1: plain softmax."),
            Case((_normal(rng, 2, 3, 4, scale=3.0), 0.5), names),
            Case((_normal(rng, 5), 0.0), names, "temperature is 0.0 here."),
            Case((_normal(rng, 4, 8, dtype=np.float32), 0.8), names, "logits is float32 here."),
            Case((_normal(rng, 6) + 500.0, 0.01), names, "A very low temperature."),
            Case((_normal(rng, 3, 7), 50.0), names, "A high temperature: nearly uniform.")]


def check_temperature_probs(probs_with_temperature, hidden: bool = False) -> None:
    """probs_with_temperature(logits, temperature): softmax(logits / temperature) over the last
    axis; temperature 0 gives a one-hot vector at each row's argmax (greedy)."""
    spec = Spec("probs_with_temperature", _reference_temperature_probs,
                _temperature_probs_mistakes)
    _run(spec, probs_with_temperature, _temperature_probs_cases(hidden), "numpy")


def _keep_top(x, k, *, largest=True):
    order = np.argsort(-x if largest else x, axis=-1, kind="stable")
    keep = np.zeros(x.shape, dtype=bool)
    np.put_along_axis(keep, order[..., :max(k, 0)], True, axis=-1)
    return keep


def _top_k_mistakes(x, k):
    vocab = x.shape[-1]
    if k + 1 <= vocab:
        yield Mistake(f"{{name}} keeps {k + 1} logits for k = {k}: keep exactly the k largest.",
                      lambda x, k: np.where(_keep_top(x, k + 1), x, -np.inf))
    if k > 1:
        yield Mistake(f"{{name}} keeps {k - 1} logits for k = {k}: keep exactly the k largest.",
                      lambda x, k: np.where(_keep_top(x, k - 1), x, -np.inf))
    yield Mistake("{name} keeps the k SMALLEST logits; keep the k largest (sort in descending "
                  "order, or take the last k of an ascending sort).",
                  lambda x, k: np.where(_keep_top(x, k, largest=False), x, -np.inf))
    yield Mistake("{name} sets the other logits to 0; set them to -np.inf, so that the softmax "
                  "gives them probability exactly 0 (e^0 = 1 is not small).",
                  lambda x, k: np.where(_keep_top(x, k), x, 0.0))
    for fill in (-1e9, -1e10, -1e4, np.finfo(np.float64).min):
        yield Mistake("{name} fills with a large negative number; use -np.inf, so that removed "
                      "tokens get probability exactly 0 and stay recognisable as removed.",
                      lambda x, k, f=fill: np.where(_keep_top(x, k), x, f))
    yield Mistake("{name} returns probabilities; return the filtered LOGITS (the kept ones "
                  "unchanged, the others -inf). The softmax comes later.",
                  lambda x, k: _t.ref_softmax(np.where(_keep_top(x, k), x, -np.inf)))
    if x.ndim > 1:
        yield Mistake("{name} finds the k-th largest value of the whole array; each row (the "
                      "last axis) is its own distribution: keep the k largest of every row "
                      "(np.sort(logits, axis=-1)[..., -k:]).",
                      lambda x, k: np.where(x >= np.sort(x, axis=None)[-k], x, -np.inf))


def _top_k_cases(hidden: bool):
    names = ("logits", "k")
    if not hidden:
        rng = _t.default_rng(51)
        return [Case((_normal(rng, 8, scale=2.0), 3), names),
                Case((_normal(rng, 4, 6), 2), names,
                     "logits is a batch here, (4, 6): keep the k largest of EACH row."),
                Case((_normal(rng, 5), 1), names, "k = 1 keeps only the largest logit.")]
    rng = _t.default_rng(151)
    return [Case((_normal(rng, 6), 6), names, "k equals the vocabulary size: keep everything."),
            Case((_normal(rng, 4), 10), names, "k is larger than the vocabulary: keep everything."),
            Case((_normal(rng, 2, 3, 9, scale=3.0), 4), names),
            Case((_normal(rng, 3, 12, dtype=np.float32), 5), names, "logits is float32 here."),
            Case((-np.abs(_normal(rng, 7)) - 5.0, 2), names, "Every logit is negative here.")]


def check_top_k(top_k_filter, hidden: bool = False) -> None:
    """top_k_filter(logits, k): the k largest logits of each row (last axis) kept, the others
    set to -inf. logits (..., vocab) -> (..., vocab)."""
    spec = Spec("top_k_filter", _ref_top_k, _top_k_mistakes)
    _run_filter(spec, top_k_filter, _top_k_cases(hidden))


# --- a filter's output: which entries are -inf must match exactly ------------------------------
#
# The engine's comparison treats an expected -inf as matching any number (|x - -inf| <= rtol *
# inf), so a filter that writes 0 or -1e9 would pass it. Filters are compared here with the
# removed (-inf) entries first, exactly, then the kept values.


def _strict_matches(a, b, tol) -> bool:
    if a.shape != b.shape:
        return False
    for test in (_t.isnan, np.isposinf, np.isneginf):
        if not _t.identical(test(a), test(b)):
            return False
    finite = _t.isfinite(b)
    return _t.close(np.where(finite, a, 0.0), np.where(finite, b, 0.0), **tol)


def _filter_problem(spec, got, expected, case, tol):
    if got.shape != expected.shape:
        return _mismatch(spec, (got,), (expected,), case, tol)
    kept_wrongly = np.logical_and(np.isneginf(expected), np.logical_not(np.isneginf(got)))
    if kept_wrongly.any():
        idx = tuple(int(i) for i in _t.argwhere(kept_wrongly)[0])
        return (f"{spec.name} returned {float(got[idx]):.6g} at index {idx} for {_describe(case)}, "
                f"where the token should be removed: set removed logits to -np.inf.")
    removed_wrongly = np.logical_and(np.isneginf(got), np.logical_not(np.isneginf(expected)))
    if removed_wrongly.any():
        idx = tuple(int(i) for i in _t.argwhere(removed_wrongly)[0])
        return (f"{spec.name} removed the token at index {idx} (logit "
                f"{float(expected[idx]):.6g}) for {_describe(case)}, but it should be kept.")
    finite = _t.isfinite(expected)
    return _mismatch(spec, (np.where(finite, got, 0.0),), (np.where(finite, expected, 0.0),),
                     case, tol)


def _run_filter(spec: Spec, fn, cases) -> None:
    """``checks._run`` for an output with -inf entries (top-k, top-p), compared strictly."""
    _not_a_function(spec.name, fn)
    learner = _Learner(fn, "numpy")
    with _t.pristine():
        for case in cases:
            args = _float64(case.args)
            with _t.catch_warnings(), _quiet():
                _t.simplefilter("ignore")
                expected = _t.asarray(spec.reference(*args))
            got = _as_array(spec, _call(spec, learner, case), "", "float", case)
            single = got.dtype.itemsize < 8 or args[0].dtype != case.args[0].dtype
            tol = _t.tolerances[spec.tol32 if single else "float64"]
            problem = _filter_problem(spec, got, expected, case, tol)
            if problem is None:
                continue
            said = None
            for mistake in spec.mistakes(*args):
                try:
                    with _t.catch_warnings(), _quiet():
                        _t.simplefilter("ignore")
                        wrong = _t.asarray(mistake.fn(*args))
                except Exception:
                    continue
                if _strict_matches(wrong, expected, tol) or not _strict_matches(got, wrong, tol):
                    continue
                said = mistake.says.replace("{name}", spec.name).replace("{case}",
                                                                          _describe(case))
                break
            raise AssertionError(said if said is not None else _with_note(problem, case))


def _nucleus(x, p, *, rule="before<p", use_logits=False, ascending=False):
    probs = x if use_logits else _t.ref_softmax(x)
    order = np.argsort(probs if ascending else -probs, axis=-1, kind="stable")
    ps = np.take_along_axis(probs, order, axis=-1)
    cum = np.cumsum(ps, axis=-1)
    keep_sorted = {"before<p": cum - ps < p, "cum<=p": cum <= p, "cum<p": cum < p,
                   "before<=p": cum - ps <= p}[rule]
    keep = np.zeros(x.shape, dtype=bool)
    np.put_along_axis(keep, order, keep_sorted, axis=-1)
    return keep


def _top_p_mistakes(x, p):
    yield Mistake(
        "{name} drops the token that takes the running total past p: keep tokens while the "
        "probability of those ranked ABOVE them is < p, i.e. the smallest set whose total "
        "reaches p (so the most likely token is always kept).",
        lambda x, p: np.where(_nucleus(x, p, rule="cum<=p"), x, -np.inf))
    yield Mistake(
        "{name} drops the token that takes the running total past p: the kept set must reach "
        "p, so include the token where the running total first gets to p or beyond.",
        lambda x, p: np.where(_nucleus(x, p, rule="cum<p"), x, -np.inf))
    yield Mistake(
        "{name} adds up the logits; the running total is over probabilities: apply the softmax "
        "first, then sort and cumsum.",
        lambda x, p: np.where(_nucleus(x, p, use_logits=True), x, -np.inf))
    yield Mistake(
        "{name} sorts from least to most likely; sort in descending order of probability.",
        lambda x, p: np.where(_nucleus(x, p, ascending=True), x, -np.inf))
    yield Mistake(
        "{name} sets the other logits to 0; set them to -np.inf (probability exactly 0).",
        lambda x, p: np.where(_nucleus(x, p), x, 0.0))
    for fill in (-1e9, -1e10, np.finfo(np.float64).min):
        yield Mistake("{name} fills with a large negative number; use -np.inf.",
                      lambda x, p, f=fill: np.where(_nucleus(x, p), x, f))
    yield Mistake(
        "{name} returns probabilities; return the filtered LOGITS (kept ones unchanged, the "
        "others -inf).", lambda x, p: _t.ref_softmax(np.where(_nucleus(x, p), x, -np.inf)))
    yield Mistake(
        "{name} returns the logits sorted; put every kept logit back at its own token's "
        "position (np.put_along_axis, or index with the sort order).",
        lambda x, p: np.where(np.take_along_axis(
            _nucleus(x, p), np.argsort(-x, axis=-1, kind="stable"), axis=-1),
            -np.sort(-x, axis=-1), -np.inf))


def _top_p_cases(hidden: bool):
    names = ("logits", "p")
    if not hidden:
        rng = _t.default_rng(52)
        return [Case((_normal(rng, 8, scale=2.0), 0.9), names),
                Case((_normal(rng, 3, 6, scale=1.5), 0.5), names,
                     "logits is a batch here, (3, 6): each row is its own distribution."),
                Case((np.array([4.0, 1.0, 0.5, 0.0, -1.0]), 0.6), names,
                     "The first token alone has probability 0.89 > p: keep only it.")]
    rng = _t.default_rng(152)
    return [Case((_normal(rng, 6), 1.0), names, "p = 1 keeps every token."),
            Case((_normal(rng, 2, 3, 10, scale=2.0), 0.75), names),
            Case((_normal(rng, 4, 9, dtype=np.float32), 0.8), names, "logits is float32 here."),
            Case((np.array([[0.0, 0.0, 0.0, 3.0], [2.0, 1.0, 1.5, -0.5]]), 0.3), names),
            Case((_normal(rng, 12, scale=0.3), 0.95), names,
                 "A flat distribution: most tokens are needed to reach p.")]


def check_top_p(top_p_filter, hidden: bool = False) -> None:
    """top_p_filter(logits, p): keep, in each row, the smallest set of most likely tokens whose
    probabilities add up to at least p (the most likely always kept); the others -inf."""
    spec = Spec("top_p_filter", _ref_top_p, _top_p_mistakes)
    _run_filter(spec, top_p_filter, _top_p_cases(hidden))


# ==============================================================================================
# Chapter 11: greedy decoding with an end token
# ==============================================================================================


class _ToyModel:
    """next_logits(ids) -> (vocab,) logits that depend on the last id, the length and the sum."""

    def __init__(self, vocab: int, seed: int):
        rng = _t.default_rng(seed)
        self.vocab = vocab
        self.by_last = rng.normal(size=(vocab, vocab)) * 3.0
        self.by_length = rng.normal(size=(7, vocab)) * 1.5
        self.by_sum = rng.normal(size=(5, vocab)) * 1.5
        self.seed = seed

    def __call__(self, ids):
        ids = [int(i) for i in np.asarray(ids).reshape(-1)]
        if not ids:
            raise ValueError("next_logits needs at least one token")
        return (self.by_last[ids[-1]] + self.by_length[len(ids) % 7]
                + self.by_sum[sum(ids) % 5])

    def __repr__(self):
        return f"a toy model (vocab {self.vocab})"


def _reference_greedy(next_logits, prompt, max_new, eos_id, *, stop=True, keep_eos=True,
                      extra=0, prompt_out=True, last_only=False):
    ids = list(prompt)
    new = []
    for _ in range(max_new + extra):
        token = int(np.argmax(next_logits(ids[-1:] if last_only else ids)))
        if stop and token == eos_id:
            if keep_eos:
                ids.append(token)
                new.append(token)
            break
        ids.append(token)
        new.append(token)
    return ids if prompt_out else new


def _greedy_mistakes(next_logits, prompt, max_new, eos_id):
    def variant(**kw):
        return lambda *a: _reference_greedy(*a, **kw)

    yield Mistake("{name} does not stop at the end token: when the chosen token is eos_id, "
                  "append it and stop.", variant(stop=False))
    yield Mistake("{name} stops at the end token but leaves it out; append eos_id as the last "
                  "token, then stop.", variant(keep_eos=False))
    yield Mistake("{name} returns only the new tokens; return the prompt followed by them.",
                  variant(prompt_out=False))
    yield Mistake("{name} returns only the new tokens and leaves out the end token; return the "
                  "prompt, then the new tokens, the end token included.",
                  variant(prompt_out=False, keep_eos=False))
    yield Mistake("{name} generates one token too many: at most max_new_tokens new tokens.",
                  variant(extra=1))
    if max_new > 0:
        yield Mistake("{name} generates one token too few: up to max_new_tokens new tokens.",
                      variant(extra=-1))
    yield Mistake("{name} passes only the last token to next_logits; pass every token so far "
                  "(the prompt and what was generated): a transformer looks at all of them.",
                  variant(last_only=True))


def _greedy_case(seed, prompt, max_new, stop_at, note=""):
    """A case whose end token comes out as new token number ``stop_at`` (None: never)."""
    names = ("next_logits", "prompt_ids", "max_new_tokens", "eos_id")
    for attempt in range(50):  # the first toy model whose greedy run allows it
        model = _ToyModel(9, seed + 1000 * attempt)
        new = _reference_greedy(model, prompt, max_new + 1, -1, prompt_out=False)
        if stop_at is None:
            unused = [i for i in range(9) if i not in new[:max_new]]
            if unused:
                return Case((model, list(prompt), max_new, unused[0]), names, note)
        elif new[stop_at - 1] not in new[:stop_at - 1]:
            return Case((model, list(prompt), max_new, new[stop_at - 1]), names, note)
    raise RuntimeError("no toy model fits this case")  # never: 50 tries are plenty


def _greedy_cases(hidden: bool):
    if not hidden:
        return [_greedy_case(60, [1, 2], 10, 4,
                             "Here the end token comes out as the 4th new token."),
                _greedy_case(61, [3], 6, None,
                             "Here the end token never comes: stop after max_new_tokens."),
                _greedy_case(62, [0, 5, 2], 12, 1,
                             "Here the very first new token is the end token.")]
    return [_greedy_case(160, [4], 0, None, "max_new_tokens is 0: return the prompt as it is."),
            _greedy_case(161, [7, 7, 1], 20, 9),
            _greedy_case(162, [2], 1, None, "max_new_tokens is 1."),
            _greedy_case(163, [6, 0], 15, 6,
                         "The end token comes out as the 6th new token."),
            _greedy_case(164, [5], 8, 8, "The end token is the last token allowed.")]


def check_greedy_decode(greedy_decode, hidden: bool = False) -> None:
    """greedy_decode(next_logits, prompt_ids, max_new_tokens, eos_id) -> list of ids: the
    prompt, then up to max_new_tokens argmax tokens, stopping right after eos_id (included).
    next_logits(ids) gives the logits (vocab,) for the token after the list ``ids``."""
    spec = Spec("greedy_decode", _reference_greedy, _greedy_mistakes, out="ids")
    _run_value(spec, greedy_decode, _greedy_cases(hidden))


# ==============================================================================================
# Chapter 11: one step of attention with a KV cache
# ==============================================================================================

_KV_LABELS = ("out", "k_cache", "v_cache")


def _kv_step(x, w_q, w_k, w_v, k_cache, v_cache, *, append="end", attend="all",
             divide_by=None, update=True, causal_softmax=True):
    q, k, v = x @ w_q, x @ w_k, x @ w_v  # (d_head,) each
    if append == "end":
        keys, values = np.concatenate([k_cache, k[None]]), np.concatenate([v_cache, v[None]])
    else:
        keys, values = np.concatenate([k[None], k_cache]), np.concatenate([v[None], v_cache])
    att_k, att_v = (keys, values) if attend == "all" else (k_cache, v_cache)
    scale = math.sqrt(q.shape[-1]) if divide_by is None else divide_by
    scores = att_k @ q / scale  # (t + 1,)
    weights = _t.ref_softmax(scores) if causal_softmax else np.exp(scores)
    out = weights @ att_v
    return (out, keys, values) if update else (out, k_cache, v_cache)


def _reference_kv_step(x, w_q, w_k, w_v, k_cache, v_cache):
    return _kv_step(x, w_q, w_k, w_v, k_cache, v_cache)


def _kv_mistakes(x, w_q, w_k, w_v, k_cache, v_cache):
    d_head = w_q.shape[1]

    def variant(**kw):
        return lambda *a: _kv_step(*a, **kw)

    yield Mistake(
        "{name} attends over the OLD cache only: append the new key and value first, then let "
        "the query attend over all t + 1 of them (a token attends to itself too).",
        variant(attend="cache"))
    yield Mistake(
        "{name} returns the caches it was given; return them with the new key and value "
        "appended, (t + 1, d_head), so the next step can use them.", variant(update=False))
    yield Mistake(
        "{name} puts the new key and value at the FRONT of the cache; append them at the end "
        "(row t), so row i stays position i.", variant(append="front"))
    yield Mistake(
        f"{{name}} does not scale the scores: divide q · k by sqrt(d_head) = sqrt({d_head}).",
        variant(divide_by=1.0))
    yield Mistake(
        f"{{name}} divides the scores by d_head = {d_head}; divide by its square root.",
        variant(divide_by=float(d_head)))
    yield Mistake(
        "{name} forgets to normalise the attention weights: take the softmax of the scores "
        "(they must sum to 1).", variant(causal_softmax=False))


def _kv_args(rng, d_model, d_head, t, dtype=np.float64):
    return (_normal(rng, d_model, dtype=dtype),
            _normal(rng, d_model, d_head, scale=1 / math.sqrt(d_model), dtype=dtype),
            _normal(rng, d_model, d_head, scale=1 / math.sqrt(d_model), dtype=dtype),
            _normal(rng, d_model, d_head, scale=1 / math.sqrt(d_model), dtype=dtype),
            _normal(rng, t, d_head, dtype=dtype), _normal(rng, t, d_head, dtype=dtype))


_KV_NAMES = ("x_new", "w_q", "w_k", "w_v", "k_cache", "v_cache")


def _kv_cases(hidden: bool):
    if not hidden:
        rng = _t.default_rng(70)
        return [Case(_kv_args(rng, 6, 4, 3), _KV_NAMES,
                     "Three positions are cached; the new token is position 3."),
                Case(_kv_args(rng, 8, 4, 0), _KV_NAMES,
                     "The cache is empty here (shape (0, d_head)): the first token attends to "
                     "itself only.")]
    rng = _t.default_rng(170)
    return [Case(_kv_args(rng, 5, 5, 1), _KV_NAMES),
            Case(_kv_args(rng, 12, 3, 9), _KV_NAMES),
            Case(_kv_args(rng, 6, 2, 4, dtype=np.float32), _KV_NAMES, "float32 here.")]


class _Unrolled:
    """The learner's step run over a whole sequence from an empty cache: (seq, d_head) outputs."""

    def __init__(self, fn):
        self.fn = fn
        self.__code__ = getattr(fn, "__code__", None)

    def __call__(self, x, w_q, w_k, w_v):
        d_head = w_q.shape[1]
        k_cache = np.zeros((0, d_head), dtype=x.dtype)
        v_cache = np.zeros((0, d_head), dtype=x.dtype)
        outs = []
        for row in x:
            out, k_cache, v_cache = self.fn(row, w_q, w_k, w_v, k_cache, v_cache)
            outs.append(np.asarray(out))
        return np.stack(outs)


def _reference_full(x, w_q, w_k, w_v):
    seq = x.shape[0]
    return _t.ref_attention(x @ w_q, x @ w_k, x @ w_v, _t.ref_causal_mask(seq))


def _full_mistakes(x, w_q, w_k, w_v):
    yield Mistake(
        "Step by step, {name} does not give full causal attention: row t of the result should "
        "attend over positions 0 .. t. Check that the new key and value are appended before "
        "attending and that the returned caches are the grown ones.",
        lambda x, *w: _t.ref_attention(x @ w[0], x @ w[1], x @ w[2], None))


def check_kv_attention_step(cached_attention_step, hidden: bool = False) -> None:
    """cached_attention_step(x_new, w_q, w_k, w_v, k_cache, v_cache) -> (out, k_cache, v_cache).

    x_new (d_model,); w_q, w_k, w_v (d_model, d_head); caches (t, d_head). The new token's
    query attends over the cached keys AND its own (appended at the end); returns its output
    (d_head,) and the grown caches (t + 1, d_head). Run over a sequence from empty caches, the
    outputs must equal full causal attention.
    """
    spec = Spec("cached_attention_step", _reference_kv_step, _kv_mistakes)
    _run_parts(spec, cached_attention_step, _kv_cases(hidden), _KV_LABELS)
    rng = _t.default_rng(71 if not hidden else 171)
    seq, d_model, d_head = (5, 6, 4) if not hidden else (9, 8, 8)
    full = Case(_kv_args(rng, d_model, d_head, 0)[1:4], ("w_q", "w_k", "w_v"))
    x = _normal(rng, seq, d_model)
    case = Case((x, *full.args), ("x", "w_q", "w_k", "w_v"),
                f"Here your step runs on all {seq} tokens of x, one by one from empty caches; "
                f"its outputs, stacked, must equal causal attention over the whole sequence.")
    _run(Spec("cached_attention_step", _reference_full, _full_mistakes),
         _Unrolled(cached_attention_step), [case], "numpy")
