"""Sinusoidal positional encoding (Vaswani et al., 2017): a fixed vector per position."""

import torch


def sinusoidal_positional_encoding(seq_len: int, d_model: int, base: float = 10000.0, *,
                                   dtype: torch.dtype = torch.float32,
                                   device=None) -> torch.Tensor:
    """The fixed position table, shape (seq_len, d_model), in ``dtype`` on ``device``.

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
    # Computed in float64 and rounded once at the end, so low-precision dtypes lose nothing
    # to rounding inside the angles.
    f64 = dict(dtype=torch.float64, device=device)
    position = torch.arange(seq_len, **f64)[:, None]  # (seq_len, 1)
    two_i = torch.arange(0, d_model, 2, **f64)  # (d_model/2,) the even columns 2i
    angle = position / base ** (two_i / d_model)  # (seq_len, d_model/2)
    pe = torch.empty(seq_len, d_model, **f64)
    pe[:, 0::2] = torch.sin(angle)  # even columns
    pe[:, 1::2] = torch.cos(angle)  # odd columns
    return pe.to(dtype)
