"""The one tolerance table for the course: tests, graders and benchmarks import it from here.

Each comparison entry is a dict of keyword arguments, so it can be splatted straight into
``np.testing.assert_allclose(actual, expected, **TOL["float32_op"])`` or
``torch.testing.assert_close(actual, expected, **TOL["float32_op"])``.

Why these numbers:
- float64 carries ~16 digits, so two implementations of the same formula agree almost exactly.
- float32 carries ~7 digits (eps = 1.2e-7); one op compared with PyTorch's own kernel differs by
  a few ulps (torch.testing's own float32 default is rtol 1.3e-6, atol 1e-5).
- A whole model stacks dozens of float32 ops, so rounding adds up: 1e-4.
- bfloat16 keeps only 8 bits of mantissa (eps = 2^-7 = 7.8e-3): compare with float32 at ~2 ulps.
- A float64 gradient check (analytic backward vs central differences) is judged by one relative
  error, max |analytic - numeric| / max(|analytic| + |numeric|), so that entry holds ``rel_err``.
"""

TOL = {
    # NumPy vs PyTorch (or any two implementations) in float64.
    "float64": dict(rtol=1e-10, atol=1e-12),
    # One float32 op vs PyTorch's own op (or vs the NumPy reference).
    "float32_op": dict(rtol=1.3e-6, atol=1e-5),
    # A whole float32 model (many ops stacked) vs another implementation.
    "float32_model": dict(rtol=1e-4, atol=1e-4),
    # A bfloat16 result vs the same computation in float32.
    "bfloat16": dict(rtol=1.6e-2, atol=1e-2),
    # Analytic gradient vs numerical gradient in float64 (not allclose kwargs: one number).
    "float64_gradcheck": dict(rel_err=1e-7),
}
