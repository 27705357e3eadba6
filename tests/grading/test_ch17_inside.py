"""Chapter 17's exercises: previous-token score, induction score, head ablation, logit lens.

Besides the meta-tests: the checkers' references agree with qkv.pt.interp (a second
implementation) on patterns and streams of a real seeded GPT.
"""

import numpy as np
import torch
from grading_meta import Declared, meta_tests

import qkv.np as qnp
from qkv.grading import (
    check_ablate_head,
    check_induction_score,
    check_logit_lens,
    check_previous_token_score,
)
from qkv.pt import GPT, GPTConfig
from qkv.pt.interp import (
    head_ablation,
    induction_scores,
    previous_token_scores,
    repeated_tokens,
    unembed_lens,
)
from qkv.tolerances import TOL


def previous_token_score(pattern):
    n_head, seq = pattern.shape[-3], pattern.shape[-1]
    diag = np.diagonal(pattern, offset=-1, axis1=-2, axis2=-1)  # (..., n_head, seq-1)
    return diag.reshape(-1, n_head, seq - 1).mean(axis=(0, 2))


def previous_token_score_loops(pattern):
    p = np.asarray(pattern, dtype=np.float64).reshape(-1, *pattern.shape[-3:])
    return np.array([np.mean([p[b, h, t, t - 1] for b in range(p.shape[0])
                              for t in range(1, p.shape[-1])]) for h in range(p.shape[1])])


def induction_score(pattern, half):
    n_head = pattern.shape[-3]
    diag = np.diagonal(pattern, offset=1 - half, axis1=-2, axis2=-1)[..., 1:]
    return diag.reshape(-1, n_head, diag.shape[-1]).mean(axis=(0, 2))


def induction_score_index(pattern, half):
    t = np.arange(half, pattern.shape[-1])
    picked = pattern[..., t, t - half + 1]  # (..., n_head, seq - half)
    return picked.mean(axis=-1).reshape(-1, pattern.shape[-3]).mean(axis=0)


def ablate_head(z, head):
    z = z.copy()
    z[..., head, :, :] = 0
    return z


def logit_lens(resid, gamma, beta, wte):
    return qnp.layer_norm(resid, gamma, beta) @ wte.T


def logit_lens_torch(resid, gamma, beta, wte):
    x = torch.nn.functional.layer_norm(resid, resid.shape[-1:], gamma, beta, eps=1e-5)
    return x @ wte.T


def _lens_without_norm(resid, gamma, beta, wte):
    return resid @ wte.T


def _lens_axis_two(resid, gamma, beta, wte):
    """Written for (batch, seq, d_model): axis=2 is d_model only with one batch axis."""
    mu = resid.mean(axis=2, keepdims=True)
    var = resid.var(axis=2, keepdims=True)
    return ((resid - mu) / np.sqrt(var + 1e-5) * gamma + beta) @ wte.T


def _prev_one_batch_axis_at_most(pattern):
    """Handles 'no batch axis' and 'one batch axis', not two."""
    t = np.arange(1, pattern.shape[-1])
    picked = pattern[..., t, t - 1]
    if picked.ndim == 3:
        picked = picked.mean(axis=0)
    return picked.mean(axis=-1)


def _ind_queries_from_one(pattern, half, first=1):
    """The previous-token loop copied over: negative keys wrap to masked zeros."""
    t = np.arange(first, pattern.shape[-1])
    return pattern[..., t, t - half + 1].reshape(-1, pattern.shape[-3], len(t)).mean(axis=(0, 2))


def _mean_ablation(z, head, over_everything=False):
    out = z.copy()
    part = z[..., head, :, :]
    out[..., head, :, :] = part.mean() if over_everything else part.mean(axis=0)
    return out


DECLARED = [
    Declared(
        check_previous_token_score,
        mistakes=[
            (lambda p: np.diagonal(p, 0, -2, -1).reshape(-1, p.shape[-3], p.shape[-1]).mean((0, 2)),
             "main diagonal"),
            (lambda p: np.diagonal(p, 1, -2, -1).reshape(-1, p.shape[-3], p.shape[-1] - 1)
             .mean((0, 2)), "diagonal above"),
            (lambda p: np.diagonal(p, -1, -2, -1).reshape(-1, p.shape[-3], p.shape[-1] - 1)
             .sum((0, 2)) / (np.prod(p.shape[:-3], dtype=int) * p.shape[-1]), "divides by seq"),
            (lambda p: np.stack([p[..., h, 1:, :-1].diagonal(0, -2, -1).sum(-1).mean()
                                 for h in range(p.shape[-3])]), "sums the diagonal"),
            (lambda p: np.mean([p[..., t, t - 1] for t in range(1, p.shape[-1] - 1)], axis=0)
             .reshape(-1, p.shape[-3]).mean(0), "leaves out the last query"),
            (_prev_one_batch_axis_at_most, ["returned shape", "two batch axes here"]),
        ],
        alternatives=[previous_token_score, previous_token_score_loops,
                      lambda p: torch.diagonal(p, -1, -2, -1).reshape(-1, p.shape[-3],
                                                                       p.shape[-1] - 1)
                      .mean((0, 2))],
    ),
    Declared(
        check_induction_score,
        mistakes=[
            (lambda p, n: np.diagonal(p, -n, -2, -1).reshape(-1, p.shape[-3], n).mean((0, 2)),
             "off by one"),  # key t - half
            (lambda p, n: np.diagonal(p, 1 - n, -2, -1).reshape(-1, p.shape[-3], n + 1)
             .mean((0, 2)), "first-half queries"),
            (lambda p, n: np.diagonal(p, n - 1, -2, -1).reshape(-1, p.shape[-3], n + 1)
             .mean((0, 2)), "above the diagonal"),
            (lambda p, n: np.mean([p[..., t, t - n + 1] for t in range(n, p.shape[-1] - 1)],
                                  axis=0).reshape(-1, p.shape[-3]).mean(0), "last query"),
            (_ind_queries_from_one, "from t = 1"),
            (lambda p, n: _ind_queries_from_one(p, n, first=0), "every query t = 0..seq-1"),
            (lambda p, n: np.mean([p[..., t, t - n + 1] for t in range(n + 1, p.shape[-1])],
                                  axis=0).reshape(-1, p.shape[-3]).mean(0), "leaves out t = half"),
        ],
        alternatives=[induction_score, induction_score_index,
                      lambda p, n: torch.stack([p[..., h, n:, :].diagonal(1, -2, -1).mean()
                                                for h in range(p.shape[-3])])],
    ),
    Declared(
        check_ablate_head,
        mistakes=[
            (lambda z, h: np.where(np.arange(z.shape[-2])[:, None] == h, 0.0, z),
             "wrong axis"),
            (lambda z, h: np.concatenate([np.zeros_like(z[:1]), z[1:]]) if h == 0 else
             np.concatenate([z[:h], np.zeros_like(z[h:h + 1]), z[h + 1:]]), "wrong axis"),
            (lambda z, h: z * (np.arange(z.shape[-3]) == h)[:, None, None], "keeps only"),
            (lambda z, h: np.concatenate([z[:, :h], np.zeros_like(z[:, h:h + 1]), z[:, h + 1:]],
                                         axis=1), "axis 1"),
            (_mean_ablation, "mean ablation"),
            (lambda z, h: _mean_ablation(z, h, over_everything=True), "mean ablation"),
        ],
        alternatives=[ablate_head,
                      lambda z, h: z * (np.arange(z.shape[-3]) != h)[:, None, None],
                      lambda z, h: torch.cat([z[..., :h, :, :],
                                              torch.zeros_like(z[..., h:h + 1, :, :]),
                                              z[..., h + 1:, :, :]], dim=-3)],
    ),
    Declared(
        check_logit_lens,
        mistakes=[
            (_lens_without_norm, "without the final layer norm"),
            (lambda r, g, b, w: qnp.layer_norm(r, np.ones_like(g), np.zeros_like(b)) @ w.T,
             "gamma and beta"),
            (lambda r, g, b, w: ((r - r.mean(-1, keepdims=True))
                                 / np.sqrt(r.var(-1, ddof=1, keepdims=True) + 1e-5) * g + b) @ w.T,
             "unbiased variance"),
            (lambda r, g, b, w: ((r - r.mean(-1, keepdims=True))
                                 / (r.std(-1, keepdims=True) + 1e-5) * g + b) @ w.T,
             "outside the square root"),
            (lambda r, g, b, w: (r / np.sqrt((r * r).mean(-1, keepdims=True) + 1e-5) * g + b)
             @ w.T, "RMS norm"),
            (lambda r, g, b, w: qnp.layer_norm(r, g, np.zeros_like(b)) @ w.T, "leaves out beta"),
            (lambda r, g, b, w: qnp.layer_norm(r, np.ones_like(g), b) @ w.T, "leaves out gamma"),
            (lambda r, g, b, w: qnp.softmax(qnp.layer_norm(r, g, b) @ w.T), "probabilities"),
            (_lens_axis_two, ["sequence axis", "axis=-1"]),
        ],
        alternatives=[logit_lens, logit_lens_torch,
                      lambda r, g, b, w: np.einsum("...d,vd->...v", qnp.layer_norm(r, g, b), w)],
    ),
]

globals().update(meta_tests(DECLARED))


def test_references_agree_with_qkv_pt_interp_on_a_real_model():
    model = GPT(GPTConfig(vocab_size=30, context_length=16, n_layer=2, n_head=4, d_model=32),
                generator=torch.Generator().manual_seed(0)).double().eval()
    ids = repeated_tokens(3, 8, 30, torch.Generator().manual_seed(1))
    with torch.no_grad():
        _, cache = model.run_with_cache(ids)
        pattern = cache["blocks.1.attn.pattern"]
        ex = {c.exercise.name: c.exercise for c in (check_previous_token_score,
                                                     check_induction_score, check_ablate_head,
                                                     check_logit_lens)}
        np.testing.assert_allclose(ex["previous_token_score"].reference(pattern.numpy()),
                                   previous_token_scores(pattern).numpy(), **TOL["float64"])
        np.testing.assert_allclose(ex["induction_score"].reference(pattern.numpy(), 8),
                                   induction_scores(pattern, 8).numpy(), **TOL["float64"])
        resid = cache["blocks.0.resid_post"]
        ln_f = model.transformer.ln_f
        np.testing.assert_allclose(
            ex["logit_lens"].reference(resid.numpy(), ln_f.weight.numpy(), ln_f.bias.numpy(),
                                       model.transformer.wte.weight.numpy()),
            unembed_lens(model, resid).numpy(), **TOL["float64"])
        # the reference ablation, patched into the model, is qkv.pt's head_ablation
        z = ex["ablate_head"].reference(cache["blocks.1.attn.z"].numpy(), 2)
        patched = model.run_with_patches(ids, {"blocks.1.attn.z": torch.tensor(z)})
        torch.testing.assert_close(patched, model.run_with_patches(ids, head_ablation(1, 2)),
                                   **TOL["float64"])


def test_a_mean_over_every_axis_is_named_as_a_reduction_too_far():
    """The scores are per head: averaging everything returns a single NumPy number, and the
    message says what shape was expected instead of 'it should return an array'."""
    def mean_over_everything(pattern):
        return np.diagonal(pattern, offset=-1, axis1=-2, axis2=-1).mean()

    try:
        check_previous_token_score(mean_over_everything)
    except AssertionError as e:
        message = str(e)
    else:
        raise AssertionError("a single number passed check_previous_token_score")
    assert "returned a single number (float64)" in message, message
    assert "expected an array of shape (" in message and "one axis too many" in message, message
