"""Grouped-query attention's one new step, as ``qkv.np.repeat_kv``."""

import torch

from qkv._checks import check_min_ndim


def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """(..., n_kv_head, seq, d_head) -> (..., n_kv_head * n_rep, seq, d_head).

    Query head h uses key/value head h // n_rep: each K/V head is repeated n_rep times in a
    row (kv0 kv0 kv1 kv1 ..., as Hugging Face's repeat_kv), not the whole stack tiled.
    """
    check_min_ndim("repeat_kv", "x", x, 3, "(..., n_kv_head, seq, d_head)")
    if isinstance(n_rep, bool) or not isinstance(n_rep, int) or n_rep < 1:
        raise ValueError(f"repeat_kv: n_rep must be an int >= 1; got {n_rep!r}")
    return x if n_rep == 1 else x.repeat_interleave(n_rep, dim=-3)
