"""Training in NumPy: AdamW and a loop on top of chapter 9's ``gpt_loss_forward/backward``.

The same optimizer as ``torch.optim.AdamW`` (and ``qkv.train``), written out:

    m <- beta1 * m + (1 - beta1) * g                  running mean of the gradient
    v <- beta2 * v + (1 - beta2) * g**2               running mean of its square
    m_hat = m / (1 - beta1**t),  v_hat = v / (1 - beta2**t)   bias correction (m, v start at 0)
    p <- p - lr * weight_decay * p                    decoupled weight decay (matrices only)
    p <- p - lr * m_hat / (sqrt(v_hat) + eps)

Weight decay applies to matrices (ndim >= 2: embeddings and linear weights), never to biases or
layer-norm gains, as in ``qkv.train.make_optimizer``. Parameters may be any nesting of dicts
and lists of arrays (``None`` entries are skipped), such as ``gpt_forward``'s params. Nothing is
changed in place: each step returns new params and a new state.
"""

import math

import numpy as np

from .model import gpt_loss_backward, gpt_loss_forward


def _map(fn, *trees):
    """fn applied leaf by leaf to trees of the same structure (dicts, lists, arrays, None)."""
    first = trees[0]
    if isinstance(first, dict):
        return {k: _map(fn, *(t[k] for t in trees)) for k in first}
    if isinstance(first, (list, tuple)):
        return [_map(fn, *items) for items in zip(*trees, strict=True)]
    if first is None:
        return None
    return fn(*trees)


def _leaves(tree):
    if isinstance(tree, dict):
        for v in tree.values():
            yield from _leaves(v)
    elif isinstance(tree, (list, tuple)):
        for v in tree:
            yield from _leaves(v)
    elif tree is not None:
        yield tree


def adamw_init(params) -> dict:
    """A fresh AdamW state for ``params``: step 0 and zero moments shaped like every array.

    returns: {"step": 0, "m": tree of zeros, "v": tree of zeros} (same structure as params)
    """
    return {"step": 0, "m": _map(np.zeros_like, params), "v": _map(np.zeros_like, params)}


def adamw_step(params, grads, state, lr: float, betas=(0.9, 0.999), eps: float = 1e-8,
               weight_decay: float = 0.0):
    """One AdamW step (torch.optim.AdamW's update), decaying matrices (ndim >= 2) only.

    params, grads: trees (dicts/lists) of arrays of the same structure, e.g. gpt_forward's
        params and gpt_loss_backward's grads.
    state: from ``adamw_init`` (or the previous step); None starts a fresh one.
    returns: (new_params, new_state), new arrays; the inputs are left as they were.
    """
    if state is None:
        state = adamw_init(params)
    beta1, beta2 = betas
    t = state["step"] + 1
    m = _map(lambda m, g: beta1 * m + (1 - beta1) * g, state["m"], grads)
    v = _map(lambda v, g: beta2 * v + (1 - beta2) * g * g, state["v"], grads)
    c1, c2 = 1 - beta1**t, 1 - beta2**t  # bias corrections: m and v started at zero

    def update(p, m, v):
        decay = weight_decay if p.ndim >= 2 else 0.0
        p = p * (1 - lr * decay)  # decoupled: shrink the weight, do not touch the gradient
        return p - lr * (m / c1) / (np.sqrt(v / c2) + eps)

    return _map(update, params, m, v), {"step": t, "m": m, "v": v}


def clip_grad_norm(grads, max_norm: float):
    """Scale all gradients together so their global L2 norm is at most ``max_norm``.

    returns: (clipped grads, the norm before clipping). Same rule as
    torch.nn.utils.clip_grad_norm_: multiply by min(1, max_norm / (norm + 1e-6)).
    """
    norm = math.sqrt(sum(float(np.sum(g * g)) for g in _leaves(grads)))
    scale = min(1.0, max_norm / (norm + 1e-6))
    return _map(lambda g: g * scale, grads), norm


def train_numpy(params, n_head: int, batches, lr, betas=(0.9, 0.999), eps: float = 1e-8,
                weight_decay: float = 0.0, grad_clip: float = 0.0, arch=None):
    """Train gpt_forward's params with AdamW, one step per batch.

    params: as gpt_forward takes them (e.g. ``GPT.numpy_params()``); left unchanged.
    batches: iterable of (x, y), each (batch, seq) token ids, y = x shifted by one.
    lr: a float, or a function step -> learning rate (step counts from 0).
    grad_clip: clip the global gradient norm to this (0: no clipping).
    arch: the model's pieces, as in gpt_forward (None: GPT-2).
    returns: (trained params, losses): one float per step, the loss BEFORE that step's update.
    """
    state = adamw_init(params)
    losses = []
    for step, (x, y) in enumerate(batches):
        loss, cache = gpt_loss_forward(x, y, params, n_head, arch)
        grads = gpt_loss_backward(cache)
        if grad_clip > 0:
            grads, _ = clip_grad_norm(grads, grad_clip)
        rate = lr(step) if callable(lr) else lr
        params, state = adamw_step(params, grads, state, rate, betas, eps, weight_decay)
        losses.append(float(loss))
    return params, losses


def flatten_params(params) -> dict:
    """gpt_forward's nested params as one flat dict: {"wte": ..., "blocks.0.w_qkv": ..., ...}.

    For optimizers written on flat dicts of arrays (chapter 10's adamw_step). The arrays are
    the same objects, not copies. ``unflatten_params`` is the inverse.
    """
    flat = {k: v for k, v in params.items() if k != "blocks"}
    for i, block in enumerate(params.get("blocks", [])):
        flat.update({f"blocks.{i}.{k}": v for k, v in block.items()})
    return flat


def unflatten_params(flat: dict) -> dict:
    """flatten_params's inverse: {"blocks.0.w_qkv": ...} -> {"blocks": [{"w_qkv": ...}], ...}."""
    params = {k: v for k, v in flat.items() if not k.startswith("blocks.")}
    n_layer = len({k.split(".")[1] for k in flat if k.startswith("blocks.")})
    if n_layer:
        params["blocks"] = [{k.split(".", 2)[2]: v for k, v in flat.items()
                             if k.startswith(f"blocks.{i}.")} for i in range(n_layer)]
    return params
