"""Token embedding: each token id picks one row of a learned table."""

import torch

from qkv._checks import check_float, check_min_ndim, check_ndim, check_token_ids


def embed(token_ids: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Look up one row of ``table`` per token id.

    token_ids: (..., seq) integers in [0, vocab), on table's device
    table:     (vocab, d_model)
    returns:   (..., seq, d_model), table's dtype and device

    Same result as one_hot(token_ids) @ table, without building the one-hot matrix.
    """
    fn = "embed"
    check_float(fn, "table", table)
    check_ndim(fn, "table", table, 2, "(vocab, d_model)")
    check_token_ids(fn, "token_ids", token_ids, vocab=table.shape[0])
    check_min_ndim(fn, "token_ids", token_ids, 1, "(..., seq)")
    # .long(): torch reads a uint8 index tensor as a boolean mask, int64 is always an index.
    return table[token_ids.long()]  # (..., seq, d_model)
