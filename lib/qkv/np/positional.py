"""Sinusoidal positional encoding (Vaswani et al., 2017): a fixed vector per position."""

import numpy as np


def sinusoidal_positional_encoding(seq_len: int, d_model: int, base: float = 10000.0) -> np.ndarray:
    """The fixed position table, float64, shape (seq_len, d_model).

    PE[p, 2i]   = sin(p / base^(2i / d_model))
    PE[p, 2i+1] = cos(p / base^(2i / d_model))

    Each pair of columns is a sine/cosine clock; the clocks slow down geometrically from
    one radian per position (i = 0) to one radian per ~base positions, so every position
    gets a distinct pattern. d_model must be even (columns come in sin/cos pairs).
    """
    fn = "sinusoidal_positional_encoding"
    if seq_len < 0 or d_model <= 0 or d_model % 2 != 0:
        raise ValueError(f"{fn}: need seq_len >= 0 and an even d_model > 0; "
                         f"got seq_len {seq_len} and d_model {d_model}")
    position = np.arange(seq_len, dtype=np.float64)[:, None]  # (seq_len, 1)
    two_i = np.arange(0, d_model, 2, dtype=np.float64)  # (d_model/2,) the even columns 2i
    angle = position / base ** (two_i / d_model)  # (seq_len, d_model/2)
    pe = np.empty((seq_len, d_model))
    pe[:, 0::2] = np.sin(angle)  # even columns
    pe[:, 1::2] = np.cos(angle)  # odd columns
    return pe
