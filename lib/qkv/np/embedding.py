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


def embed_forward(token_ids: np.ndarray, table: np.ndarray):
    """embed(token_ids, table), and the cache embed_backward needs: (token_ids, table's shape)."""
    return embed(token_ids, table), (token_ids, table.shape)


def embed_backward(dout: np.ndarray, cache) -> dict:
    """Gradient of the lookup: dout (..., seq, d_model) -> {"dtable": (vocab, d_model)}.

    Row v of the table receives the sum of dout over every position holding token v; rows of
    tokens that do not appear get 0. np.add.at adds repeated ids up (dtable[ids] += dout
    would keep only one of them).
    """
    token_ids, table_shape = cache
    dtable = np.zeros(table_shape, dtype=dout.dtype)  # (vocab, d_model)
    np.add.at(dtable, token_ids, dout)
    return {"dtable": dtable}
