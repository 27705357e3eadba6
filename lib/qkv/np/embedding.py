"""Token embedding: each token id picks one row of a learned table."""

import numpy as np

from qkv._checks import check_float, check_min_ndim, check_ndim, check_token_ids


def embed(token_ids: np.ndarray, table: np.ndarray) -> np.ndarray:
    """Look up one row of ``table`` per token id.

    token_ids: (..., seq) integers in [0, vocab)
    table:     (vocab, d_model)
    returns:   (..., seq, d_model)

    Same result as one_hot(token_ids) @ table, without building the one-hot matrix.
    """
    fn = "embed"
    check_float(fn, "table", table)
    check_ndim(fn, "table", table, 2, "(vocab, d_model)")
    check_token_ids(fn, "token_ids", token_ids, vocab=table.shape[0])
    check_min_ndim(fn, "token_ids", token_ids, 1, "(..., seq)")
    return table[token_ids]  # (..., seq, d_model)
