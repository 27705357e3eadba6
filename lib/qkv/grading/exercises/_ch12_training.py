"""Chapter 12's checkers, part 2: the schedule, the evaluation, the optimizer and the training
loop (PyTorch), and the whole model's gradients and training in NumPy."""

import math
import sys

import numpy as np
import torch
import torch.nn.functional as F

import qkv.np as qnp
from qkv.data import get_batch, split
from qkv.pt import GPT as RefGPT
from qkv.pt import GPTConfig
from qkv.train import TrainConfig
from qkv.train import lr_at as _ref_lr_at

from .. import _trusted as _t
from ._ch12_model import _call, _close, _diagnose, _function, _ref_evaluate, _returned

# ==============================================================================================
# (b) Warm-up and cosine
# ==============================================================================================


def _lr_reference(step, max_steps, warmup_steps, lr, min_lr, *, warm="plus1", span="rest",
                  floor=True):
    if step < warmup_steps:
        return lr * (step + (1 if warm == "plus1" else 0)) / warmup_steps
    total = max_steps - warmup_steps if span == "rest" else max_steps
    r = min(1.0, (step - warmup_steps) / max(1, total))
    low = min_lr if floor else 0.0
    return low + (lr - low) * 0.5 * (1 + math.cos(math.pi * r))


LR_MISTAKES = {
    "warm": ("the warm-up starts at 0 (lr * step / warmup_steps); the course's warm-up is "
             "lr * (step + 1) / warmup_steps, so step 0 already learns", dict(warm="zero")),
    "span": ("the cosine runs over max_steps instead of the max_steps - warmup_steps steps after "
             "the warm-up", dict(span="all")),
    "floor": ("the cosine goes down to 0 instead of min_lr", dict(floor=False)),
}


def _judge_lr_at(lr_at, hidden: bool = False) -> None:
    """lr_at(step, max_steps, warmup_steps, lr, min_lr) equals qkv.train.lr_at at every step."""
    _function("lr_at", lr_at)
    cases = [(100, 10, 1e-2, 1e-3)] if not hidden else [(37, 5, 3e-3, 3e-5), (20, 1, 1.0, 0.5)]
    for max_steps, warmup, lr, min_lr in cases:
        cfg = TrainConfig(max_steps=max_steps, warmup_steps=warmup, lr=lr, min_lr=min_lr)
        steps = range(max_steps + 3)
        expected = [_ref_lr_at(s, cfg) for s in steps]
        got = [_call("lr_at", lr_at, s, max_steps, warmup, lr, min_lr) for s in steps]
        for g in got:
            if not isinstance(g, (int, float, np.floating, np.integer)):
                raise _returned("lr_at", g, "a number (a float)")
        got = [float(g) for g in got]
        if _close(got, expected, "float64"):
            continue
        for says, switch in LR_MISTAKES.values():
            variant = [_lr_reference(s, max_steps, warmup, lr, min_lr, **switch) for s in steps]
            if _close(got, variant, "float64"):
                raise AssertionError(f"lr_at: {says}.")
        bad = max(steps, key=lambda s: abs(got[s] - expected[s]))  # the step furthest off
        raise AssertionError(f"lr_at({bad}, max_steps={max_steps}, warmup_steps={warmup}, "
                             f"lr={lr}, min_lr={min_lr}) should be {expected[bad]:.6g}; got "
                             f"{got[bad]:.6g} (the step where your schedule is furthest off).")


# ==============================================================================================
# (c) Evaluation, the optimizer and the training loop
# ==============================================================================================


def _tiny_model(seed: int, vocab=13, context=8):
    config = GPTConfig(vocab_size=vocab, context_length=context, n_layer=1, n_head=2, d_model=8,
                       fused=False)
    with torch.random.fork_rng(devices=[]):
        return RefGPT(config, generator=torch.Generator().manual_seed(seed)).double()


def _toy_ids(seed: int, n: int = 300, vocab: int = 13):
    """A toy text with structure (each token usually followed by the next one)."""
    gen = torch.Generator().manual_seed(seed)
    steps = torch.where(torch.rand(n, generator=gen) < 0.8, 1,
                        torch.randint(vocab, (n,), generator=gen))
    return torch.cumsum(steps, 0) % vocab


def _judge_evaluate(evaluate, hidden: bool = False) -> None:
    """evaluate(model, ids, batch_size, context, n_batches, seed) -> mean loss, fixed batches."""
    _function("evaluate", evaluate)
    for seed in ((1, 2) if hidden else (0,)):
        model, ids = _tiny_model(seed), _toy_ids(seed)
        model.train()
        args = (ids, 4, 8, 5, 10 + seed)
        expected = _ref_evaluate(model, *args)
        modes = []  # the model's mode at every forward the learner's evaluate runs
        hook = model.register_forward_pre_hook(lambda m, inputs, modes=modes:
                                               modes.append(m.training))
        global_seed = 1000 + seed  # what the global generator would give (a known mistake)
        try:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(global_seed)
                got = _call("evaluate", evaluate, model, *args)
        finally:
            hook.remove()
        try:
            got = float(got)
        except (TypeError, ValueError):
            raise AssertionError(f"evaluate should return one number (the mean loss, a float); "
                                 f"it returned {type(got).__name__}.") from None
        if not model.training:
            raise AssertionError("evaluate left the model in eval mode: put it back with "
                                 "model.train() (or model.train(was_training)) before returning.")
        if any(p.grad is not None for p in model.parameters()):
            raise AssertionError("evaluate computed gradients: run it under torch.no_grad().")
        if any(modes):
            raise AssertionError("evaluate ran the model in training mode: call model.eval() "
                                 "before the batches (and model.train() again at the end).")
        if _close(got, expected, "float64"):
            continue
        variants = {
            "evaluate returns the loss of the last batch only: average the n_batches losses.":
                _ref_evaluate(model, *args, last_only=True),
            "evaluate draws its windows from torch's global generator: make a fresh "
            "torch.Generator().manual_seed(seed) at each call, so that every evaluation sees "
            "the same windows.":
                _ref_evaluate(model, *args[:4], 0, fresh=False,
                              gen=torch.Generator().manual_seed(global_seed)),
        }
        said = _diagnose(got, variants, "float64")
        raise AssertionError(said or (f"evaluate gave {got:.6f}; the mean loss over "
                                      f"{args[3]} batches of {args[1]} windows of {args[2]} "
                                      f"tokens, drawn with get_batch and a fresh "
                                      f"torch.Generator().manual_seed({args[4]}), is "
                                      f"{expected:.6f}."))


def _judge_make_optimizer(make_optimizer, hidden: bool = False) -> None:
    """AdamW, betas (0.9, 0.99), decay on every matrix and no vector."""
    _function("make_optimizer", make_optimizer)
    model = _tiny_model(0)
    opt = _call("make_optimizer", make_optimizer, model, 3e-3, 0.1)
    if not isinstance(opt, torch.optim.AdamW):
        raise AssertionError(f"make_optimizer should return a torch.optim.AdamW; it returned "
                             f"{type(opt).__name__}.")
    decay = {}
    for group in opt.param_groups:
        if tuple(group["betas"]) != (0.9, 0.99):
            raise AssertionError(f"make_optimizer: use betas (0.9, 0.99); got "
                                 f"{tuple(group['betas'])}.")
        for p in group["params"]:
            decay[id(p)] = group["weight_decay"]
    for name, p in model.named_parameters():
        want = 0.1 if p.ndim >= 2 else 0.0
        if id(p) not in decay:
            raise AssertionError(f"make_optimizer leaves out the parameter {name}.")
        if decay[id(p)] != want:
            kind = "a matrix" if p.ndim >= 2 else "a vector"
            raise AssertionError(f"make_optimizer gives {name} ({kind}) weight decay "
                                 f"{decay[id(p)]}; decay matrices (ndim >= 2) by weight_decay "
                                 f"and vectors not at all.")


def _settings(hidden: bool) -> dict:
    return dict(batch_size=3, context=8, max_steps=12 if hidden else 10, warmup_steps=3,
                lr=3e-2, min_lr=3e-3, grad_clip=0.5, weight_decay=0.1, eval_interval=4,
                eval_batches=2)


def _ref_optimizer(model, s):
    params = list(model.parameters())
    groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": s["weight_decay"]},
              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=s["lr"], betas=(0.9, 0.99))


def _ref_train(model, optimizer, train_ids, val_ids, gen, first, last, s, *, clip=True,
               schedule=True, lr_shift=0, zero_grad=True, eval_shift=1, restart=False,
               clip_to=None):
    losses, evals = [], []
    model.train()
    for step in range(first, last):
        at = (step - first if restart else step) + lr_shift
        rate = _ref_lr_at(at, TrainConfig(max_steps=s["max_steps"], warmup_steps=s["warmup_steps"],
                                          lr=s["lr"], min_lr=s["min_lr"])) if schedule else s["lr"]
        for group in optimizer.param_groups:
            group["lr"] = rate
        x, y = get_batch(train_ids, s["batch_size"], s["context"], gen)
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
        if zero_grad:
            optimizer.zero_grad()
        loss.backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip_to or s["grad_clip"])
        optimizer.step()
        losses.append(loss.item())
        if (step + eval_shift) % s["eval_interval"] == 0:
            evals.append((step + eval_shift, _ref_evaluate(model, val_ids, s["batch_size"],
                                                           s["context"], s["eval_batches"], 0)))
    return losses, evals


LOOP_MISTAKES = {
    "clip": "the losses match a loop that never clips the gradient: call "
            "torch.nn.utils.clip_grad_norm_(model.parameters(), s['grad_clip']) between "
            "backward() and step().",
    "schedule": "the losses match a loop with a constant learning rate: set every group's "
                "'lr' to lr_at(step, ...) before each step.",
    "lr_shift": "the learning rate is one step ahead: step `step` (from 0) uses lr_at(step, ...).",
    "zero_grad": "the losses match a loop that never zeroes the gradients, so they pile up from "
                 "step to step: call optimizer.zero_grad() before backward().",
    "restart": "the schedule restarts at every call: use the run's step number (first_step, "
               "first_step + 1, ...), not a count from 0 within the call.",
    "clip_to": "the losses match a loop that clips the gradient norm to 1.0: clip to "
               "s['grad_clip'] (the checker's settings use 0.5).",
}
_LOOP_SWITCHES = {"clip": dict(clip=False), "schedule": dict(schedule=False),
                  "lr_shift": dict(lr_shift=1), "zero_grad": dict(zero_grad=False),
                  "restart": dict(restart=True), "clip_to": dict(clip_to=1.0)}


def _run_loop(train_fn, s, seed, chunks, **switch):
    """(losses, evals, final weights) of train_fn called on each chunk of one run."""
    model, ids = _tiny_model(seed), _toy_ids(seed)
    train_ids, val_ids = split(ids)
    optimizer = _ref_optimizer(model, s)
    gen = torch.Generator().manual_seed(seed)
    losses, evals = [], []
    for first, last in chunks:
        if switch.get("learner"):
            out = _call("train", train_fn, model, optimizer, train_ids, val_ids, gen, first,
                        last, dict(s))
            if not (isinstance(out, (tuple, list)) and len(out) == 2):
                raise _returned("train", out, "two lists, (losses, evals)")
            chunk_losses, chunk_evals = out
        else:
            chunk_losses, chunk_evals = _ref_train(model, optimizer, train_ids, val_ids, gen,
                                                   first, last, s, **switch)
        losses += [float(v) for v in chunk_losses]
        evals += [(int(a), float(b)) for a, b in chunk_evals]
    return losses, evals, torch.cat([p.detach().flatten() for p in model.parameters()])


def _judge_train(train, hidden: bool = False) -> None:
    """train(model, optimizer, train_ids, val_ids, gen, first_step, last_step, s), called on two
    chunks of one run, gives the reference loop's losses, evaluations and weights."""
    _function("train", train)
    s = _settings(hidden)
    seed = 5 if hidden else 3
    split_at = 7 if hidden else 4
    chunks = [(0, split_at), (split_at, s["max_steps"])]
    try:
        losses, evals, weights = _run_loop(train, s, seed, chunks, learner=True)
    except (TypeError, ValueError) as exc:
        raise AssertionError(f"train returned something that is not (losses, evals), a list of "
                             f"floats and a list of (step, val_loss) pairs: {exc}") from None
    ref_losses, ref_evals, ref_weights = _run_loop(None, s, seed, chunks)
    n = s["max_steps"]
    if len(losses) != n:
        raise AssertionError(f"train should return one loss per step: called for steps 0-"
                             f"{split_at - 1} and {split_at}-{n - 1}, it returned {len(losses)} "
                             f"losses in all, not {n}.")
    if _close(losses, ref_losses, "float64") and _close(weights, ref_weights, "float64"):
        want = [a for a, _ in ref_evals]
        if [a for a, _ in evals] != want:
            raise AssertionError(f"train should evaluate after every {s['eval_interval']} steps "
                                 f"of the run, at steps {want} (counting steps done); it "
                                 f"evaluated at {[a for a, _ in evals]}.")
        if not _close([b for _, b in evals], [b for _, b in ref_evals], "float64"):
            raise AssertionError("train's evaluations differ from evaluate(model, val_ids, "
                                 "batch_size, context, eval_batches, seed=0) after those steps.")
        return
    for flag, says in LOOP_MISTAKES.items():
        variant, _, _ = _run_loop(None, s, seed, chunks, **_LOOP_SWITCHES[flag])
        if _close(losses, variant, "float64"):
            raise AssertionError(f"train: {says}")
    bad = next((i for i in range(n) if not _close(losses[i], ref_losses[i], "float64")), None)
    if bad is None:
        raise AssertionError("train's losses are right but the weights after the last step "
                             "differ from the reference loop's: does it take one "
                             "optimizer.step() per step, after the clipping?")
    raise AssertionError(f"train's loss at step {bad} is {losses[bad]:.10f}; the reference loop "
                         f"gets {ref_losses[bad]:.10f} (off by "
                         f"{abs(losses[bad] - ref_losses[bad]):.2g}; {_agree(bad)}). Each "
                         f"step: lr_at, a batch with get_batch(train_ids, batch_size, context, "
                         f"gen), cross-entropy, zero_grad, backward, clip, step.")


def _agree(bad: int) -> str:
    """How many steps agree, in words."""
    return {0: "step 0 already differs", 1: "step 0 agrees"}.get(
        bad, f"steps 0-{bad - 1} agree")

# ==============================================================================================
# NumPy (f): the whole model's loss and gradients from chapter 9's pieces
# ==============================================================================================


def _np_params(seed: int, vocab=11, context=8, n_layer=2, d_model=8):
    config = GPTConfig(vocab_size=vocab, context_length=context, n_layer=n_layer, n_head=2,
                       d_model=d_model)
    with torch.random.fork_rng(devices=[]):
        params = RefGPT(config, generator=torch.Generator().manual_seed(seed)).numpy_params()
    rng = np.random.default_rng(seed)
    for block in params["blocks"]:  # non-trivial gains and biases, so every term shows
        for key in block:
            block[key] = block[key] + 0.1 * rng.standard_normal(block[key].shape)
    params["lnf_gamma"] = params["lnf_gamma"] + 0.1 * rng.standard_normal(d_model)
    return params


def _flat(tree, prefix=""):
    if isinstance(tree, dict):
        out = {}
        for k, v in tree.items():
            out.update(_flat(v, f"{prefix}{k}."))
        return out
    if isinstance(tree, (list, tuple)):
        out = {}
        for i, v in enumerate(tree):
            out.update(_flat(v, f"{prefix}{i}."))
        return out
    return {prefix[:-1]: tree}


def _grad_pieces(params, x, y, n_head):
    """The reference loss, gradients and the two parts of wte's gradient."""
    loss, cache = qnp.gpt_loss_forward(x, y, params, n_head)
    grads = qnp.gpt_loss_backward(cache)
    logits_cache, loss_cache = cache
    dlogits = qnp.cross_entropy_backward(1.0, loss_cache)["dlogits"]
    unembed = qnp.linear_backward(dlogits, logits_cache[4])["dw"].T  # (vocab, d_model)
    return float(loss), grads, unembed


class _CallSpy:
    """Notices calls of the given code objects (whatever name they were imported under)."""

    def __init__(self, codes):
        self.codes, self.hit, self.previous = codes, False, None

    def _profile(self, frame, event, arg):
        if event == "call" and frame.f_code in self.codes:
            self.hit = True

    def __enter__(self):
        self.previous = sys.getprofile()
        sys.setprofile(self._profile)
        return self

    def __exit__(self, *exc):
        sys.setprofile(self.previous)


def _judge_gpt_loss_and_grads(gpt_loss_and_grads, hidden: bool = False) -> None:
    """(loss, grads) equal qkv.np.gpt_loss_forward/backward's, without calling them."""
    _function("gpt_loss_and_grads", gpt_loss_and_grads)
    cases = [(0, 2, 8), (1, 3, 6)] if hidden else [(0, 2, 8)]
    from qkv.np import model as np_model

    spied = {np_model.gpt_loss_backward.__code__, np_model._logits_backward.__code__}
    for seed, batch, seq in cases:
        params = _np_params(seed)
        rng = np.random.default_rng(seed)
        x = rng.integers(0, 11, size=(batch, seq))
        y = rng.integers(0, 11, size=(batch, seq))
        loss, grads, unembed = _grad_pieces(params, x, y, 2)
        copy = {k: v.copy() for k, v in _flat(params).items()}
        with _CallSpy(spied) as spy:
            out = _call("gpt_loss_and_grads", gpt_loss_and_grads, params, x.copy(), y.copy(), 2)
        if spy.hit:
            raise AssertionError("gpt_loss_and_grads calls qkv.np's gpt_loss_backward, which is "
                                 "the answer itself: chain the layers' backward passes yourself.")
        if any(not _t.identical(_t.asarray(copy[k]), _t.asarray(v))
               for k, v in _flat(params).items()):
            raise AssertionError("gpt_loss_and_grads changed the params in place.")
        if not (isinstance(out, (tuple, list)) and len(out) == 2 and isinstance(out[1], dict)):
            raise _returned("gpt_loss_and_grads", out, "(loss, grads) with grads a dict shaped "
                            "like params")
        got_loss, got = out
        if not isinstance(got_loss, (int, float, np.floating, np.ndarray)):
            raise _returned("gpt_loss_and_grads", got_loss, "the loss as a number first")
        if not _close(float(got_loss), loss, "float64"):
            raise AssertionError(f"gpt_loss_and_grads's loss is {float(got_loss):.8f}; the mean "
                                 f"cross-entropy is {loss:.8f}.")
        want, have = _flat(grads), _flat(got)
        if set(have) != set(want):
            raise AssertionError(f"grads should have the structure of params (wte, wpe, blocks "
                                 f"[a dict per block], lnf_gamma, lnf_beta); missing "
                                 f"{sorted(set(want) - set(have))[:4]}, unexpected "
                                 f"{sorted(set(have) - set(want))[:4]}.")
        for key in want:
            shape = np.shape(have[key])
            if shape != want[key].shape:
                raise AssertionError(f"the gradient of {key} has shape {shape}; it should have "
                                     f"{key}'s shape, {want[key].shape}"
                                     + (" (rows past seq get 0)" if key == "wpe" else "") + ".")
            if _close(have[key], want[key], "float64"):
                continue
            if key == "wte":
                said = _diagnose(have[key], {
                    "the gradient of wte misses the unembedding's part: wte is used twice "
                    "(lookup and, transposed, logits = h @ wte.T), so add the two gradients.":
                        want[key] - unembed,
                    "the gradient of wte misses the lookup's part (embed_backward): wte is "
                    "used twice, so add the two gradients.": unembed}, "float64")
                if said:
                    raise AssertionError(said)
            if key == "wpe":
                said = _diagnose(have[key], {
                    "the gradient of wpe is averaged over the batch: every window adds to the "
                    "same rows, so sum over the batch.": want[key] / batch}, "float64")
                if said:
                    raise AssertionError(said)
            worst = np.max(np.abs(np.asarray(have[key], dtype=np.float64) - want[key]))
            raise AssertionError(f"the gradient of {key} differs from the reference (largest "
                                 f"difference {worst:.3g}) on a batch of {batch} windows of "
                                 f"{seq} tokens.")


# ==============================================================================================
# NumPy (g): training with the learner's AdamW matches qkv.np.train_numpy
# ==============================================================================================


def _np_lr(step):
    return 2e-2 * (step + 1) / 4 if step < 4 else 2e-2


def _np_batches(seed, n):
    ids = _toy_ids(seed, n=400, vocab=11).numpy()
    rng = np.random.default_rng(seed)
    return [get_batch(ids, 3, 8, rng) for _ in range(n)]


def _adam_variant(params, n_head, batches, lr, weight_decay, grad_clip, *, correct=True,
                  decay_all=False):
    """train_numpy with one known mistake (no bias corrections, or weight decay on every
    parameter): returns the losses."""
    flat = _flat(params)
    m = {k: np.zeros_like(p) for k, p in flat.items()}
    v = {k: np.zeros_like(p) for k, p in flat.items()}
    losses = []
    for step, (x, y) in enumerate(batches):
        loss, cache = qnp.gpt_loss_forward(x, y, _unflat(flat, params), n_head)
        grads, _ = qnp.clip_grad_norm(qnp.gpt_loss_backward(cache), grad_clip)
        t = step + 1
        for k, g in _flat(grads).items():
            m[k] = 0.9 * m[k] + 0.1 * g
            v[k] = 0.99 * v[k] + 0.01 * g * g
            m_hat = m[k] / (1 - 0.9**t) if correct else m[k]
            v_hat = v[k] / (1 - 0.99**t) if correct else v[k]
            decay = weight_decay if flat[k].ndim >= 2 or decay_all else 0.0
            flat[k] = flat[k] * (1 - lr(step) * decay) - lr(step) * m_hat / (np.sqrt(v_hat) + 1e-8)
        losses.append(float(loss))
    return losses


def _unflat(flat, like, prefix=""):
    if isinstance(like, dict):
        return {k: _unflat(flat, v, f"{prefix}{k}.") for k, v in like.items()}
    if isinstance(like, (list, tuple)):
        return [_unflat(flat, v, f"{prefix}{i}.") for i, v in enumerate(like)]
    return flat[prefix[:-1]]


def _judge_train_gpt_numpy(train_gpt_numpy, hidden: bool = False) -> None:
    """train_gpt_numpy(params, n_head, batches, lr, weight_decay, grad_clip) -> (params, losses)
    with the losses of qkv.np.train_numpy (betas (0.9, 0.99), eps 1e-8) on the same batches."""
    _function("train_gpt_numpy", train_gpt_numpy)
    seed, n = (4, 15) if hidden else (2, 12)
    params = _np_params(seed)
    batches = _np_batches(seed, n)
    clip = 0.5
    ref_params, ref_losses = qnp.train_numpy(params, 2, batches, _np_lr, betas=(0.9, 0.99),
                                             weight_decay=0.1, grad_clip=clip)
    out = _call("train_gpt_numpy", train_gpt_numpy, params, 2, batches, _np_lr, 0.1, clip)
    if not (isinstance(out, (tuple, list)) and len(out) == 2):
        raise _returned("train_gpt_numpy", out, "(params, losses)")
    got_params, losses = out
    try:
        losses = [float(v) for v in losses]
    except (TypeError, ValueError):
        raise AssertionError("train_gpt_numpy's losses should be a list of numbers.") from None
    if len(losses) != n:
        raise AssertionError(f"train_gpt_numpy should return one loss per batch: {n}, not "
                             f"{len(losses)}.")
    if _close(losses, ref_losses, "float64"):
        if not (isinstance(got_params, dict) and isinstance(got_params.get("blocks"), list)):
            raise AssertionError("train_gpt_numpy's losses are right, but return the params "
                                 "nested as you were given them (wte, wpe, blocks: a list of "
                                 "dicts, ...): unflatten_params(flat) turns a flat dict back.")
        flat_got, flat_ref = _flat(got_params), _flat(ref_params)
        # Adam divides by sqrt(v), so a near-zero gradient's last-bit rounding shows in the
        # weights (3e-12 seen on a bias): compare at float32_op, still 2,000 times finer than
        # one step of lr 2e-2, so params from before the last step fail
        if set(flat_got) != set(flat_ref) or not all(
                _close(flat_got[k], flat_ref[k], "float32_op") for k in flat_ref):
            raise AssertionError("train_gpt_numpy's losses are right but the params it returns "
                                 "are not those after the last step.")
        return
    variants = {
        "the losses match training without gradient clipping: scale all gradients by "
        "min(1, grad_clip / (norm + 1e-6)) with the global norm over every parameter.":
            qnp.train_numpy(params, 2, batches, _np_lr, betas=(0.9, 0.99), weight_decay=0.1)[1],
        "the losses match AdamW with beta2 = 0.999: this notebook uses (0.9, 0.99), as "
        "qkv.train does.": qnp.train_numpy(params, 2, batches, _np_lr, betas=(0.9, 0.999),
                                           weight_decay=0.1, grad_clip=clip)[1],
        "the losses match AdamW without the bias corrections m / (1 - beta1^t) and "
        "v / (1 - beta2^t); t counts steps from 1.":
            _adam_variant(params, 2, batches, _np_lr, 0.1, clip, correct=False),
        "the losses match AdamW that decays every parameter: weight decay applies to the "
        "matrices (p.ndim >= 2) only, not to biases and layer-norm vectors.":
            _adam_variant(params, 2, batches, _np_lr, 0.1, clip, decay_all=True),
    }
    said = _diagnose(losses, variants, "float64")
    bad = next(i for i in range(n) if not _close(losses[i], ref_losses[i], "float64"))
    raise AssertionError(said or (f"train_gpt_numpy's loss at step {bad} is {losses[bad]:.10f}; "
                                  f"the reference gets {ref_losses[bad]:.10f} (off by "
                                  f"{abs(losses[bad] - ref_losses[bad]):.2g}; {_agree(bad)}; "
                                  f"a loss is computed before its step's update)."))


# ==============================================================================================
