"""The training-run kind of chapter 10's loop: a toy model handed to the learner's loop (a bigram
model, logits = emb[x] @ w + b, on a toy corpus) whose ``loss_and_grads`` records every call,
and the judge of the run: the calls it made, the optimizer state it carried from step to step
(replayed with the reference AdamW: moments kept, t = 1, 2, 3, ...), the losses it returned and
the loss it reached."""

import math

import numpy as np

from qkv.np import adamw_step as _ref_adamw_step

from .. import _trusted as _t
from ..engine import Case, Spec, _call, _kind_of_object

# The defaults of the task's adamw_step: betas, eps and weight decay.
_BETAS, _EPS, _WEIGHT_DECAY = (0.9, 0.999), 1e-8, 0.01
_NAMES = ("loss_and_grads", "params", "ids", "steps", "batch_size", "context", "lr", "seed")


def toy_corpus(hidden: bool) -> str:
    if not hidden:
        return "the cat sat on the mat. the dog sat on the log. " * 12
    return "a bee can see a sea. a cat can see a bee. " * 14


def toy_problem(hidden: bool):
    """(params, ids, vocab): a bigram model logits = emb[x] @ w + b on a toy corpus."""
    text = toy_corpus(hidden)
    chars = sorted(set(text))
    ids = np.array([chars.index(c) for c in text])
    vocab, d = len(chars), 8
    rng = _t.default_rng(40 if not hidden else 140)
    params = {"emb": rng.normal(0.0, 0.1, size=(vocab, d)),
              "w": rng.normal(0.0, 0.1, size=(d, vocab)),
              "b": np.zeros(vocab)}
    return params, ids, vocab


def toy_loss_and_grads(params, x, y):
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


def toy_full_loss(params, ids) -> float:
    x, y = ids[None, :-1], ids[None, 1:]
    return toy_loss_and_grads(params, x, y)[0]


class Recorder:
    """The loss_and_grads handed to the learner's loop: the toy model, recording every call."""

    def __init__(self):
        self.calls = []  # (params copy, x, y, loss, grads)
        self.problem = None

    def __call__(self, params, x, y):
        if _t.type_(params) is not dict or sorted(params) != ["b", "emb", "w"]:
            self.problem = (f"loss_and_grads was called with params = "
                            f"{_kind_of_object(params)}; pass the dict of arrays "
                            f"{{'emb', 'w', 'b'}} you are training.")
            raise TypeError(self.problem)
        x, y = np.asarray(x), np.asarray(y)
        copy = {k: np.array(v, dtype=np.float64) for k, v in params.items()}
        loss, grads = toy_loss_and_grads(copy, x, y)
        self.calls.append((copy, x.copy(), y.copy(), loss, grads))
        return loss, grads

    def __repr__(self):
        return "loss_and_grads (the toy model's)"


def loop_cases(hidden: bool):
    """[(Case, the loss to reach)]: one run, with a fresh recorder."""
    steps, batch, context, lr, seed, target = ((150, 8, 16, 0.05, 0, 0.85) if not hidden
                                               else (200, 4, 12, 0.03, 7, 1.0))
    params, ids, _ = toy_problem(hidden)
    return [(Case((Recorder(), params, ids, steps, batch, context, lr, seed), _NAMES), target)]


def judge_loop(ex, learner, cases) -> None:
    """The training run: its calls, its optimizer state, its losses, its final loss."""
    name = ex.name
    for case, target in cases:
        record, params, ids, steps, batch, context, lr, _ = case.args
        start_loss = toy_full_loss(params, ids)
        with _t.pristine():
            out = _call(Spec(name, None, None), learner, case)
            if record.problem is not None:
                raise AssertionError(record.problem)
            if not (_t.type_(out) is tuple or _t.type_(out) is list) or _t.len_(out) != 2:
                raise AssertionError(f"{name} should return (params, losses); it returned "
                                     f"{_kind_of_object(out)}.")
            final, losses = out
            _check_loop_calls(record, steps, batch, context)
            _check_loop_params(final, params, record)
            _check_loop_state(record, final, lr)
            _check_loop_losses(record, losses, steps)
            _check_loop_loss(final, record, ids, start_loss, target, steps)




def _check_loop_calls(record, steps, batch, context):
    calls = record.calls
    if not calls:
        raise AssertionError("train_loop never called loss_and_grads: at every step, call "
                             "loss, grads = loss_and_grads(params, x, y) on a batch.")
    if _t.len_(calls) != steps:
        raise AssertionError(f"train_loop called loss_and_grads {_t.len_(calls)} times for "
                             f"steps = {steps}; call it once per step.")
    for i, (_, x, y, _, _) in enumerate(calls):
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


def _check_loop_params(final, params, record):
    if _t.type_(final) is not dict or sorted(final) != sorted(params):
        raise AssertionError(f"train_loop should return the trained params as a dict with the "
                             f"keys {sorted(params)}; it returned {_kind_of_object(final)}.")
    final = {k: np.array(v, dtype=np.float64) for k, v in final.items()}
    moved = len(record.calls) > 1 and not all(
        _t.identical(record.calls[1][0][k], params[k]) for k in params)
    if moved and all(_t.identical(final[k], params[k]) for k in params):
        raise AssertionError("train_loop returned the params it started with: return the "
                             "params after the last update.")


def _check_loop_loss(final, record, ids, start_loss, target, steps):
    final = {k: np.array(v, dtype=np.float64) for k, v in final.items()}
    loss = toy_full_loss(final, ids)
    if not math.isfinite(loss) or loss > target:
        first = record.calls[0][3]
        raise AssertionError(
            f"after {steps} steps the toy model's loss on the whole corpus is {loss:.3f} (it "
            f"started at {start_loss:.3f}; the first batch loss was {first:.3f}); a correct "
            f"loop reaches {target} or less with these settings. Check that every step uses "
            f"adamw_step with t = 1, 2, 3, ... (step + 1) and the lr you were given, and keeps "
            f"m and v from one step to the next (start them at zero ONCE, before the loop).")


def _adamw(params, grads, m, v, t, lr):
    new, state = _ref_adamw_step(params, grads, {"step": t - 1, "m": m, "v": v}, lr, _BETAS,
                                 _EPS, _WEIGHT_DECAY)
    return new, state["m"], state["v"]


def _same_params(a, b, tol) -> bool:
    return all(_t.close(a[k], b[k], **tol) for k in b)


def _check_loop_state(record, final, lr):
    """Replay AdamW on the gradients the loop was given: each step's params must be one
    reference step from the previous ones, with the moments carried over and t = step + 1."""
    tol = _t.tolerances["float64"]
    seen = [c[0] for c in record.calls] + [{k: np.array(v, dtype=np.float64)
                                            for k, v in final.items()}]
    zeros = {k: np.zeros_like(p) for k, p in seen[0].items()}
    m, v = dict(zeros), dict(zeros)
    for i, call in enumerate(record.calls):
        before, grads, after = call[0], call[4], seen[i + 1]
        with _t.errstate(all="ignore"):
            right, next_m, next_v = _adamw(before, grads, m, v, i + 1, lr)
            if _same_params(after, right, tol):
                m, v = next_m, next_v
                continue
            variants = [
                (before, "loses the update: the params it passes on are the ones from before "
                         "adamw_step; keep what it returns: params, m, v = adamw_step(...)"),
                (_adamw(before, grads, zeros, zeros, i + 1, lr)[0],
                 "starts m and v from zero again at every step: AdamW's moments carry the "
                 "history of the gradients, so make m and v ONCE before the loop and keep the "
                 "new_m, new_v that adamw_step returns"),
                (_adamw(before, grads, m, v, 1, lr)[0],
                 "passes t = 1 at every step: t counts the steps, t = step + 1"),
                (_adamw(before, grads, m, v, i, lr)[0],
                 "counts t from 0: the first step then divides by 1 - beta1**0 = 0 in the bias "
                 "correction, which makes every parameter nan; pass t = step + 1"),
                (_adamw(before, grads, m, v, i + 2, lr)[0],
                 "counts t from 2: the first step is t = 1 (pass step + 1)"),
            ]
        finite = all(_t.isfinite(after[k]).all() for k in after)
        where = (f"the params after step {i + 1} of the loop" if i + 1 < len(record.calls)
                 else "the params the loop returned")
        said = next((text for wrong, text in variants if _same_params(after, wrong, tol)), None)
        lead = f"{where} are not one AdamW step (t = {i + 1}) from the params before it"
        if not finite:
            lead = f"{where} hold nan or inf"
        raise AssertionError(
            f"train_loop: {lead}." + (f" The loop {said}." if said else
                                      " Keep m and v from step to step (zeros ONCE, before the "
                                      "loop), pass t = step + 1 and the lr you were given, and "
                                      "check adamw_step on its own test first."))
