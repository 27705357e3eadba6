"""Cross-entropy loss for next-token prediction."""

import torch
import torch.nn.functional as F

from qkv._checks import check_float, check_min_ndim, check_token_ids, shape_of


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor,
                  ignore_index: int | None = None, fused: bool = False) -> torch.Tensor:
    """Mean of -log softmax(logits)[target] over the positions not equal to ignore_index.

    logits: (..., vocab) floats;  targets: (...) integers in [0, vocab) (or ignore_index)
    returns: a 0-d tensor in logits' dtype. NaN if every target is ignored, as
    torch.nn.functional.cross_entropy does.

    Uses log-sum-exp: -log p[t] = logsumexp(logits) - logits[t], with the max subtracted
    inside the exp, so it never forms a softmax that could underflow to log(0).
    fused: torch's one-kernel F.cross_entropy (and its one-kernel gradient). Same result.
    """
    fn = "cross_entropy"
    check_float(fn, "logits", logits)
    check_min_ndim(fn, "logits", logits, 1, "(..., vocab)")
    check_token_ids(fn, "targets", targets, vocab=logits.shape[-1], ignore_index=ignore_index)
    if shape_of(targets) != shape_of(logits)[:-1]:
        raise ValueError(f"{fn}: targets must have shape logits.shape[:-1]; "
                         f"got logits {shape_of(logits)} and targets {shape_of(targets)}")

    if fused:
        flat = logits.reshape(-1, logits.shape[-1])  # (positions, vocab), as F wants them
        # F's ignore_index is always on (default -100): use one no valid target can have.
        ignore = -1 - logits.shape[-1] if ignore_index is None else ignore_index
        return F.cross_entropy(flat, targets.reshape(-1).long(), ignore_index=ignore)
    m = logits.amax(dim=-1, keepdim=True)  # (..., 1)
    lse = m[..., 0] + torch.log(torch.exp(logits - m).sum(dim=-1))  # (...,) log-sum-exp
    if ignore_index is None:
        keep = torch.ones_like(targets, dtype=torch.bool)  # (...,) every position counts
    else:
        keep = targets != ignore_index  # (...,) e.g. padding is skipped
    safe = torch.where(keep, targets, 0).long()  # any valid index at ignored positions
    target_logit = logits.gather(-1, safe[..., None])[..., 0]  # (...,)
    nll = lse - target_logit  # (...,) -log p(target)
    return nll[keep].mean()  # the mean of nothing is NaN
