"""Cross-entropy loss for next-token prediction."""

import numpy as np

from qkv._checks import check_float, check_min_ndim, check_token_ids, shape_of


def cross_entropy(logits: np.ndarray, targets: np.ndarray, ignore_index: int | None = None):
    """Mean of -log softmax(logits)[target] over the positions not equal to ignore_index.

    logits: (..., vocab) floats;  targets: (...) integers in [0, vocab) (or ignore_index)
    returns: a NumPy scalar in logits' dtype. NaN if every target is ignored, as
    torch.nn.functional.cross_entropy does.

    Uses log-sum-exp: -log p[t] = logsumexp(logits) - logits[t], with the max subtracted
    inside the exp, so it never forms a softmax that could underflow to log(0).
    """
    loss, _ = cross_entropy_forward(logits, targets, ignore_index)  # the math lives there
    return loss


def cross_entropy_forward(logits: np.ndarray, targets: np.ndarray,
                          ignore_index: int | None = None):
    """cross_entropy(logits, targets, ignore_index), and the cache cross_entropy_backward needs.

    returns: loss (a NumPy scalar in logits' dtype, as cross_entropy returns),
             cache = (probs (..., vocab), targets (...), which positions count (...) bool)
    """
    fn = "cross_entropy"
    check_float(fn, "logits", logits)
    check_min_ndim(fn, "logits", logits, 1, "(..., vocab)")
    check_token_ids(fn, "targets", targets, vocab=logits.shape[-1], ignore_index=ignore_index)
    if shape_of(targets) != shape_of(logits)[:-1]:
        raise ValueError(f"{fn}: targets must have shape logits.shape[:-1]; "
                         f"got logits {shape_of(logits)} and targets {shape_of(targets)}")

    m = logits.max(axis=-1, keepdims=True)  # (..., 1)
    lse = m[..., 0] + np.log(np.exp(logits - m).sum(axis=-1))  # (...,) log-sum-exp
    if ignore_index is None:
        keep = np.ones(targets.shape, dtype=bool)  # (...,) every position counts
    else:
        keep = targets != ignore_index  # (...,) e.g. padding is skipped
    safe = np.where(keep, targets, 0)  # any valid index at ignored positions; dropped below
    target_logit = np.take_along_axis(logits, safe[..., None], axis=-1)[..., 0]  # (...,)
    nll = lse - target_logit  # (...,) -log p(target)
    # The softmax, from the same log-sum-exp: p = exp(logits - lse), never exp of a large number.
    probs = np.exp(logits - lse[..., None])  # (..., vocab)
    cache = (probs, safe, keep)
    if not keep.any():
        return logits.dtype.type(np.nan), cache  # the mean of nothing
    return nll[keep].mean(), cache


def cross_entropy_backward(dloss, cache) -> dict:
    """Gradient of the mean cross-entropy with respect to the logits, softmax included.

    dloss: the upstream gradient of the (scalar) loss, 1.0 when the loss is the final output.
    returns: {"dlogits": (..., vocab)}

    Softmax and -log fuse into one simple gradient: for each counted position,
    d(-log p[t]) / dlogits = p - onehot(t); the mean over the N counted positions divides by N.
    Ignored positions get 0. (If nothing counts, the loss is NaN and the gradient is all 0.)
    """
    probs, targets, keep = cache
    onehot = np.zeros_like(probs)  # (..., vocab)
    np.put_along_axis(onehot, targets[..., None], 1.0, axis=-1)
    n = max(int(keep.sum()), 1)  # N, the positions the mean runs over
    dlogits = (probs - onehot) * keep[..., None] * (float(dloss) / n)  # (..., vocab)
    return {"dlogits": dlogits}
