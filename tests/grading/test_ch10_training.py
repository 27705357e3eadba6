"""Chapter 10's exercises: a batch of windows, one AdamW step, the training loop.

Besides the meta-tests: the AdamW reference is torch.optim.AdamW itself; the loop's target loss
leaves a margin; the loop's judge follows the optimizer state (issue 12, finding 4).
"""

import numpy as np
import torch
from grading_meta import Declared, meta_tests, run
from test_checkers import Liar, failure

import qkv.grading.exercises._training_run as tr
import qkv.grading.exercises.ch10_training as ch10
from qkv.grading import check_adamw_step, check_make_batch, check_training_loop
from qkv.grading.engine import _float64


def make_batch(ids, batch_size, context, rng):
    starts = rng.integers(0, len(ids) - context, size=batch_size)
    x = np.stack([ids[s:s + context] for s in starts])
    y = np.stack([ids[s + 1:s + context + 1] for s in starts])
    return x, y


def adamw_step(params, grads, m, v, t, lr, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.01):
    new_p, new_m, new_v = {}, {}, {}
    for k, p in params.items():
        g = grads[k]
        new_m[k] = beta1 * m[k] + (1 - beta1) * g
        new_v[k] = beta2 * v[k] + (1 - beta2) * g**2
        m_hat = new_m[k] / (1 - beta1**t)
        v_hat = new_v[k] / (1 - beta2**t)
        if p.ndim >= 2:
            p = p * (1 - lr * weight_decay)
        new_p[k] = p - lr * m_hat / (np.sqrt(v_hat) + eps)
    return new_p, new_m, new_v


def train_loop(loss_and_grads, params, ids, steps, batch_size, context, lr, seed,
               batcher=make_batch, stepper=adamw_step):
    rng = np.random.default_rng(seed)
    m = {k: np.zeros_like(p) for k, p in params.items()}
    v = {k: np.zeros_like(p) for k, p in params.items()}
    losses = []
    for step in range(steps):
        x, y = batcher(ids, batch_size, context, rng)
        loss, grads = loss_and_grads(params, x, y)
        params, m, v = stepper(params, grads, m, v, step + 1, lr)
        losses.append(loss)
    return params, losses



def make_batch_fancy(ids, batch_size, context, rng):  # one fancy index, rng.choice for starts
    starts = rng.choice(len(ids) - context, size=batch_size)
    window = ids[starts[:, None] + np.arange(context + 1)]
    return window[:, :-1], window[:, 1:]


def make_batch_torch_style(ids, batch_size, context, rng):  # int32 arrays, a Python loop
    xs, ys = [], []
    for _ in range(batch_size):
        s = int(rng.integers(len(ids) - context))
        xs.append(ids[s:s + context])
        ys.append(ids[s + 1:s + context + 1])
    return np.array(xs, dtype=np.int32), np.array(ys, dtype=np.int32)


def adamw_inplace_copies(params, grads, m, v, t, lr, beta1=0.9, beta2=0.999, eps=1e-8,
                         weight_decay=0.01):  # copies first, then in-place arithmetic
    params = {k: p.copy() for k, p in params.items()}
    m = {k: a.copy() for k, a in m.items()}
    v = {k: a.copy() for k, a in v.items()}
    for k in params:
        m[k] *= beta1
        m[k] += (1 - beta1) * grads[k]
        v[k] *= beta2
        v[k] += (1 - beta2) * grads[k] ** 2
        if params[k].ndim > 1:
            params[k] *= 1 - lr * weight_decay
        params[k] -= lr * (m[k] / (1 - beta1**t)) / (np.sqrt(v[k] / (1 - beta2**t)) + eps)
    return params, m, v


def loop_with_state_dicts(loss_and_grads, params, ids, steps, batch_size, context, lr, seed):
    rng = np.random.default_rng(seed)
    state = {"m": {k: 0 * p for k, p in params.items()}, "v": {k: 0 * p for k, p in params.items()}}
    history = np.zeros(steps)
    for t in range(1, steps + 1):
        x, y = make_batch_fancy(ids, batch_size, context, rng)
        loss, grads = loss_and_grads(params, x, y)
        params, state["m"], state["v"] = adamw_step(params, grads, state["m"], state["v"], t, lr)
        history[t - 1] = loss
    return params, history



def _batch(shift=1, high=0, same_target=False, separate=False, swap=False, global_rng=False,
           every=False):
    def fn(ids, batch_size, context, rng):
        n = len(ids) - context + high
        if global_rng:
            starts = np.random.randint(0, n, size=batch_size)
        else:
            starts = rng.integers(0, n, size=batch_size)
        y_starts = rng.integers(0, n, size=batch_size) if separate else starts
        x = np.stack([ids[s:s + context] for s in starts])
        if same_target:
            y = x.copy()
        else:
            y = np.stack([ids[s + shift:s + shift + context] for s in y_starts])
        return (x.T, y.T) if swap else (x, y)
    return fn


def _adam(**kw):
    return lambda *a: ch10._adamw_variant(*a, **kw)


def _loop(same_batch=False, lose_update=False, return_start=False, bad_losses=False,
          skip_last=False, lr_scale=1.0, new_rng=False, extra=0):
    def fn(loss_and_grads, params, ids, steps, batch_size, context, lr, seed):
        start = params
        rng = np.random.default_rng(seed)
        m = {k: np.zeros_like(p) for k, p in params.items()}
        v = {k: np.zeros_like(p) for k, p in params.items()}
        losses = []
        fixed = make_batch(ids, batch_size, context, np.random.default_rng(seed))
        for step in range(steps + extra):
            if new_rng:
                rng = np.random.default_rng(seed)
            x, y = fixed if same_batch else make_batch(ids, batch_size, context, rng)
            loss, grads = loss_and_grads(params, x, y)
            new, m, v = adamw_step(params, grads, m, v, step + 1, lr * lr_scale)
            if not lose_update and not (skip_last and step == steps - 1):
                params = new
            losses.append(loss * 2 if bad_losses else loss)
        return (start if return_start else params), losses
    return fn



def _loop_state(reset_moments=False, t_from=1):
    """A loop with a correct adamw_step that mishandles the optimizer state."""
    def fn(loss_and_grads, params, ids, steps, batch_size, context, lr, seed):
        rng = np.random.default_rng(seed)
        zeros = {k: np.zeros_like(p) for k, p in params.items()}
        m, v = dict(zeros), dict(zeros)
        losses = []
        for step in range(steps):
            x, y = make_batch(ids, batch_size, context, rng)
            loss, grads = loss_and_grads(params, x, y)
            if reset_moments:
                m, v = dict(zeros), dict(zeros)
            t = 1 if t_from is None else step + t_from
            with np.errstate(all="ignore"):
                params, m, v = adamw_step(params, grads, m, v, t, lr)
            losses.append(loss)
        return params, losses
    return fn


DECLARED = [
    Declared(
        check_make_batch,
        mistakes=[
            (_batch(same_target=True), "targets are not shifted"),
            (_batch(shift=-1), "the wrong way"),
            (_batch(shift=2), "shifts the targets by two"),
            (_batch(separate=True), "draw the starts ONCE"),
            (_batch(high=-1), "never starts a window at"),
            (_batch(high=1), "high end is exclusive"),
            (_batch(swap=True), "the two axes are swapped"),
            (_batch(global_rng=True), "from rng, the generator passed in"),
        ],
        alternatives=[make_batch_fancy, make_batch_torch_style],
        reference=make_batch,
    ),
    Declared(
        check_adamw_step,
        mistakes=[
            (_adam(correct=False), "leaves out the bias correction"),
            (_adam(decay="all"), "to every parameter"),
            (_adam(decay="none"), "never applies weight decay"),
            (_adam(l2=True), "L2 regularisation"),
            (_adam(decay_lr=False), "scaled by the learning rate"),
            (_adam(decay_after=True), "after the Adam step"),
            (_adam(eps_inside=True), "inside the square root"),
            (_adam(square=False), "instead of its square"),
            (_adam(root=False), "instead of its square root"),
            (_adam(moments=False), "returns the old m and v"),
            (_adam(t_used=0), "a division by zero"),
            (lambda p, g, m, v, t, *a: ch10._adamw_variant(p, g, m, v, t, *a, t_used=t + 1),
             "uses t + 1"),
        ],
        alternatives=[adamw_step, adamw_inplace_copies],
    ),
    Declared(
        check_training_loop,
        mistakes=[
            (_loop(same_batch=True), "same batch at every step"),
            (_loop(new_rng=True), "same batch at every step"),
            (_loop(lose_update=True), "loses the update"),
            (_loop(return_start=True), "returned the params it started with"),
            (_loop(skip_last=True), "the params the loop returned are not one AdamW step"),
            (_loop(bad_losses=True), "append the loss each call returns"),
            (_loop(extra=1), "call it once per step"),
            (_loop(lr_scale=1e-3), "not one AdamW step"),
            # finding 4: the optimizer state is followed from step to step
            (_loop_state(reset_moments=True), "starts m and v from zero again at every step"),
            (_loop_state(t_from=0), "counts t from 0"),
            (_loop_state(t_from=None), "passes t = 1 at every step"),
        ],
        alternatives=[train_loop, loop_with_state_dicts],
        reference=train_loop,
    ),
]

globals().update(meta_tests(DECLARED))


def test_adamw_reference_is_torch_adamw():
    """The checker's reference step equals torch.optim.AdamW (two groups) on every case."""
    for hidden in (False, True):
        for case in ch10._adamw_cases(hidden):
            params, grads, m, v, t, lr, b1, b2, eps, wd = _float64(case.args)
            want_p, want_m, want_v = ch10._reference_adamw(*_float64(case.args))
            tensors = {k: torch.tensor(p, requires_grad=True) for k, p in params.items()}
            opt = torch.optim.AdamW(
                [{"params": [p for p in tensors.values() if p.ndim >= 2], "weight_decay": wd},
                 {"params": [p for p in tensors.values() if p.ndim < 2], "weight_decay": 0.0}],
                lr=lr, betas=(b1, b2), eps=eps)
            for k, p in tensors.items():
                p.grad = torch.tensor(grads[k])
                opt.state[p] = {"step": torch.tensor(float(t - 1)),
                                "exp_avg": torch.tensor(m[k]), "exp_avg_sq": torch.tensor(v[k])}
            opt.step()
            for k, p in tensors.items():
                np.testing.assert_allclose(want_p[k], p.detach().numpy(), rtol=1e-12, atol=1e-14)
                np.testing.assert_allclose(want_m[k], opt.state[p]["exp_avg"].numpy(), rtol=1e-12)
                np.testing.assert_allclose(want_v[k], opt.state[p]["exp_avg_sq"].numpy(),
                                           rtol=1e-12)


def test_the_loop_target_leaves_a_margin():
    """A correct loop ends well below the target loss; an untrained model is far above it."""
    for hidden in (False, True):
        (case, target), = tr.loop_cases(hidden)
        _, params, ids, steps, batch, context, lr, seed = case.args
        for batcher in (make_batch, make_batch_fancy):
            final, _ = train_loop(tr.Recorder(), params, ids, steps, batch, context, lr, seed,
                                  batcher=batcher)
            assert tr.toy_full_loss(final, ids) < target - 0.1
        assert tr.toy_full_loss(params, ids) > target + 1.0


def test_changing_the_inputs_in_place_fails():
    def adamw_in_place(params, grads, m, v, t, lr, *args):
        for k in params:
            params[k] -= lr * grads[k]
        return params, m, v

    assert "changed its input params['w'] in place" in failure(check_adamw_step, adamw_in_place)


def test_loop_messages_point_at_the_step():
    def ignores_seed_and_passes_wrong_pairs(loss_and_grads, params, ids, steps, batch_size,
                                            context, lr, seed):
        rng = np.random.default_rng(seed)
        for _ in range(steps):
            x, y = make_batch(ids, batch_size, context, rng)
            loss_and_grads(params, y, x)
        return params, []

    message = failure(check_training_loop, ignores_seed_and_passes_wrong_pairs)
    assert "y is not x shifted by one" in message, message


def test_a_wrong_batch_row_shows_the_row():
    def noisy(ids, batch_size, context, rng):
        x, y = make_batch(ids, batch_size, context, rng)
        return x, y + 1

    message = failure(check_make_batch, noisy)
    assert "row 0 of y is not the targets of row 0 of x" in message, message


def test_lying_parts_fail():
    message = failure(check_adamw_step, lambda *a: (Liar(), Liar(), Liar()))
    assert "as a dict of arrays" in message and "Liar" in message, message
    message = failure(check_make_batch, lambda *a: (Liar(), Liar()))
    assert "returned x as a Liar" in message, message



def test_finding_4_dropped_moments_and_t_zero_are_named():
    """Issue 12, finding 4: a loop that drops AdamW's moments used to pass, and t = 0 (every
    parameter nan) was reported as a lost update."""
    message, _, _ = run(check_training_loop, _loop_state(reset_moments=True))
    assert message is not None and "m and v from zero again" in message, message
    message, _, _ = run(check_training_loop, _loop_state(t_from=0))
    assert "nan" in message and "counts t from 0" in message and "lost" not in message, message
