"""Diagnosis by parts, for composite answers whose mistake is not in the catalogue.

An exercise's ``explain(probe, got, args, case)`` runs after no catalogued mistake matched; it
returns a sentence that says which part of the computation differs, or None. ``probe`` (see
``engine.Probe``) calls the learner's function again: on other inputs (``probe.call``), or with
one helper its code uses swapped for the reference (``probe.swapped``). Everything here runs
inside ``_trusted.pristine()``, like the rest of a checker.
"""

import math

import numpy as np

from . import _trusted as _t

_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
_GELU_C = 0.044715


# --- GELU: read the constants back from the output ------------------------------------------------


def explain_gelu(probe, got, args, case):
    """Fit got = h x (1 + tanh(k (x + c x^3))) for h in (0.5, 1) and say which constant is off."""
    x = np.asarray(args[0], dtype=np.float64).reshape(-1)
    g = np.asarray(got, dtype=np.float64).reshape(-1)
    use = (np.abs(x) > 0.2) & (np.abs(x) < 2.5)
    x, g = x[use], g[use]
    if x.size < 3:
        return None
    for half in (0.5, 1.0):
        t = g / (half * x) - 1.0
        if not (np.abs(t) < 1.0 - 1e-12).all():
            continue
        lhs = np.arctanh(t) / x  # = k + (k c) x^2
        design = np.stack([np.ones_like(x), x**2], axis=1)
        (k, kc), *_ = np.linalg.lstsq(design, lhs, rcond=None)
        if not np.allclose(design @ np.array([k, kc]), lhs, rtol=1e-6, atol=1e-9):
            continue
        c = kc / k
        wrong = []
        if half != 0.5:
            wrong.append("the factor in front is 1, not 0.5")
        if abs(k - _SQRT_2_OVER_PI) > 1e-6:
            wrong.append(f"the constant inside the tanh is {k:.7g}, not sqrt(2/pi) = "
                         f"{_SQRT_2_OVER_PI:.7g}")
        if abs(c - _GELU_C) > 1e-7:
            wrong.append(f"the cubic coefficient is {c:.7g}, not 0.044715")
        if wrong:
            return ("By parts: your output has the shape h x (1 + tanh(k (x + c x^3))), but "
                    + "; ".join(wrong) + ".")
    return ("By parts: your output is not of the form 0.5 x (1 + tanh(k (x + c x^3))) for any "
            "constants k and c; check the formula's structure (the 0.5 x in front, the tanh, the "
            "x + c x^3 inside).")


# --- the similarity matrix: dot products, then lengths --------------------------------------------


def explain_similarity(probe, got, args, case):
    """Which of the two parts of a cosine-similarity matrix differs: the dot products
    E[u] . E[v], or the division by the lengths |E[u]| |E[v]|."""
    table = np.asarray(args[0], dtype=np.float64)
    got = np.asarray(got, dtype=np.float64)
    dots = table @ table.T
    norms = np.sqrt(np.sum(table * table, axis=-1))
    right = dots / np.outer(norms, norms)
    if got.shape != right.shape:
        return None
    tol = _t.tolerances["float32_op"]
    diagonal_ok = _t.close(np.diagonal(got).copy(), np.ones(len(got)), **tol)
    with np.errstate(all="ignore"):
        # divided by some other per-row number r[u] r[v]? The diagonal gives r[u]^2.
        r = np.sqrt(np.diagonal(dots) / np.diagonal(got))
        other = dots / np.outer(r, r)
    if np.isfinite(r).all() and _t.close(got, other, **tol):
        return ("By parts: your entries are the right dot products E[u] . E[v], each divided "
                "by something other than the two lengths |E[u]| |E[v]|"
                + ("" if diagonal_ok else " (so the diagonal, a token with itself, is not 1)")
                + ": the length of a row is np.sqrt(np.sum(row * row)), "
                  "np.linalg.norm(table, axis=1).")
    if diagonal_ok:
        return ("By parts: your diagonal is 1, as a normalised table's is, but the other "
                "entries differ: entry (u, v) is the dot product of rows u and v, divided by "
                "both lengths.")
    return ("By parts: neither the dot products nor the lengths match: entry (u, v) is "
            "E[u] . E[v] / (|E[u]| |E[v]|), and every diagonal entry is 1.")


# --- the decoder block: swap the reference's helpers in, then switch a half off -----------------


def _helpers():
    """The helper names a learner's block may call, with the reference each stands for."""
    return (("layer_norm", lambda x, gamma, beta, *a, **k: _t.ref_layer_norm(x, gamma, beta)),
            ("multi_head_attention", lambda x, w_qkv, b_qkv, w_out, b_out, n_head, *a, **k:
             _t.ref_multi_head_attention(x, w_qkv, b_qkv, w_out, b_out, n_head)),
            ("mlp", lambda x, w_fc, b_fc, w_proj, b_proj, *a, **k:
             _t.ref_mlp(x, w_fc, b_fc, w_proj, b_proj)),
            ("gelu", lambda x, *a, **k: _t.ref_gelu(x)),
            ("softmax", lambda x, *a, **k: _t.ref_softmax(x)))


def _close(a, b) -> bool:
    return a is not None and a.shape == b.shape and _t.close(a, b, **_t.tolerances["float32_model"])


def explain_block(probe, got, args, case):
    """Which part of ``decoder_block(x, params, n_head)`` differs: first each helper the
    learner's block calls, swapped for the reference; then the block with a sublayer's weights
    set to zero (that sublayer then adds exactly zero, so only the rest is tested)."""
    x, params, n_head = args
    right = _t.ref_decoder_block(x, params, n_head)
    for name, reference in _helpers():
        out = probe.swapped(name, reference, x, params, n_head)
        if _close(out, right):
            return (f"By parts: with the reference {name} in place of yours, your decoder_block "
                    f"gives the right output, so the part that differs is your {name} (check it "
                    f"against its own exercise).")
    mlp_keys, attn_keys = ("w_fc", "b_fc", "w_proj", "b_proj"), ("w_qkv", "b_qkv", "w_out", "b_out")

    def off(keys):
        return dict(params, **{k: 0.0 * params[k] for k in keys})

    def ok(p):
        return _close(probe.call(x, p, n_head), _t.ref_decoder_block(x, p, n_head))

    if not ok(off(mlp_keys + attn_keys)):
        return ("By parts: with every weight of both sublayers set to zero, each sublayer adds "
                "exactly zero and the block must return x unchanged; yours does not, so a "
                "residual connection differs (x = x + sublayer(ln(x)): add to the stream, and "
                "do not normalise the stream itself).")
    attn_ok, mlp_ok = ok(off(mlp_keys)), ok(off(attn_keys))
    if attn_ok and not mlp_ok:
        return ("By parts: ln_1, the attention and the residual connections are right (checked "
                "with the MLP's weights set to zero); ln_2 or the MLP, the second sublayer "
                "x + mlp(ln_2(x)), is where it differs.")
    if mlp_ok and not attn_ok:
        return ("By parts: ln_2, the MLP and the residual connections are right (checked with "
                "the attention's weights set to zero); ln_1 or the attention, the first "
                "sublayer x + attention(ln_1(x)), is where it differs.")
    if attn_ok and mlp_ok:
        return ("By parts: each sublayer is right on its own (with the other's weights set to "
                "zero), so they are chained wrongly: the MLP must start from the stream the "
                "attention returned, x = x + attention(ln_1(x)), then x = x + mlp(ln_2(x)).")
    return ("By parts: both sublayers differ (each checked with the other's weights set to "
            "zero): x + attention(ln_1(x)) and x + mlp(ln_2(x)).")
