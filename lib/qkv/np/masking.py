"""Causal mask: which keys each query may attend to."""

import numpy as np


def causal_mask(seq_q: int, seq_k: int | None = None) -> np.ndarray:
    """Boolean (seq_q, seq_k) matrix, True where query i may attend to key j.

    Aligned bottom-right: query i sits at absolute position i + (seq_k - seq_q), so it may
    attend key j iff j <= i + (seq_k - seq_q). With seq_q == seq_k this is the lower
    triangle (diagonal included); with a KV cache (seq_q = 1 new token, seq_k = all tokens
    so far) the single query sees every key.

    >>> causal_mask(3).astype(int)
    array([[1, 0, 0],
           [1, 1, 0],
           [1, 1, 1]])
    """
    if seq_k is None:
        seq_k = seq_q
    if seq_q < 0 or seq_k < 0:
        raise ValueError(f"causal_mask: sizes must be >= 0; got seq_q {seq_q} and seq_k {seq_k}")
    i = np.arange(seq_q)[:, None]  # (seq_q, 1) query positions
    j = np.arange(seq_k)[None, :]  # (1, seq_k) key positions
    return j <= i + (seq_k - seq_q)  # (seq_q, seq_k)
