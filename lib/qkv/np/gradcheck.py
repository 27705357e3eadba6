"""Gradient checking: compare an analytic backward pass with centred finite differences."""

import numpy as np


def numerical_gradient(f, x: np.ndarray, eps: float = 1e-6, indices=None) -> np.ndarray:
    """Estimate df/dx by centred differences: (f(x + eps e_i) - f(x - eps e_i)) / (2 eps).

    f: called as f(x), returns a scalar. x is nudged in place (and restored), so f may also
       read x through a closure, e.g. a params dict that holds it.
    x: a float64 array (in float32 the rounding error of f swamps the 1e-6 nudge).
    indices: None for every entry (returns an array shaped like x), or a list of index
       tuples to estimate only those (returns a 1-D array, one value per index).

    The centred difference is accurate to O(eps^2), the one-sided (f(x + eps) - f(x)) / eps
    only to O(eps); each entry costs two calls of f, so check big arrays on a sample.
    """
    if x.dtype != np.float64:
        raise TypeError(f"numerical_gradient: x must be a float64 array; got dtype {x.dtype}")
    entries = np.ndindex(x.shape) if indices is None else indices
    grads = []
    for i in entries:
        i = tuple(i)
        old = x[i]
        x[i] = old + eps
        f_plus = f(x)
        x[i] = old - eps
        f_minus = f(x)
        x[i] = old  # restore
        grads.append((f_plus - f_minus) / (2 * eps))
    grads = np.array(grads, dtype=np.float64)
    return grads.reshape(x.shape) if indices is None else grads


def relative_error(a, b) -> float:
    """max |a - b| / max(|a| + |b|): one number for how far two gradients are apart.

    Scale-free (a gradient of size 1e-3 and one of size 1e3 are judged alike); 0 when both
    are all zero. qkv.tolerances.TOL["float64_gradcheck"]["rel_err"] is the bar (1e-7).
    """
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    scale = max(float(np.max(np.abs(a) + np.abs(b), initial=0.0)), np.finfo(np.float64).tiny)
    return float(np.max(np.abs(a - b), initial=0.0)) / scale
