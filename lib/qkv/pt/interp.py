"""Inside a GPT: record every intermediate activation by name, and patch any of them.

``run_with_cache(model, token_ids)`` runs the forward pass of ``qkv.pt.GPT`` step by step, on
the naive path the book teaches (so attention weights exist), and returns the logits with a
dict from names to tensors. ``patches`` replaces any named activation on the way, and every
later step reads the replacement: that one argument does ablation and activation patching.

Names (i = block index; token_ids (..., seq); d_ff = 4 * d_model):

    embed                       (..., seq, d_model)        token embeddings, wte[token_ids]
    pos_embed                   (seq, d_model)             learned positions, wpe[:seq]
    blocks.{i}.resid_pre        (..., seq, d_model)        residual stream entering block i
    blocks.{i}.ln_1             (..., seq, d_model)        LN1(resid_pre): what the heads read
    blocks.{i}.attn.q           (..., n_head, seq, d_head) queries (.k keys, .v values alike)
    blocks.{i}.attn.scores      (..., n_head, seq, seq)    q k^T / sqrt(d_head); -inf where masked
    blocks.{i}.attn.pattern     (..., n_head, seq, seq)    softmax(scores): row = query, col = key
    blocks.{i}.attn.z           (..., n_head, seq, d_head) pattern @ v: head h's result, the slice
                                                           h*d_head:(h+1)*d_head of c_proj's input
    blocks.{i}.attn.head_out    (..., n_head, seq, d_model) what head h writes into the stream:
                                                           z_h @ w_out[h*d_head:(h+1)*d_head]
    blocks.{i}.attn.out         (..., seq, d_model)        sum of head_out over heads + b_out
    blocks.{i}.resid_mid        (..., seq, d_model)        resid_pre + attn.out
    blocks.{i}.ln_2             (..., seq, d_model)        LN2(resid_mid): what the MLP reads
    blocks.{i}.mlp.pre          (..., seq, d_ff)           ln_2 @ w_fc + b_fc
    blocks.{i}.mlp.post         (..., seq, d_ff)           gelu(mlp.pre)
    blocks.{i}.mlp.out          (..., seq, d_model)        mlp.post @ w_proj + b_proj
    blocks.{i}.resid_post       (..., seq, d_model)        resid_mid + mlp.out
    ln_final                    (..., seq, d_model)        the final layer norm of the stream
    logits                      (..., seq, vocab)          ln_final @ wte^T

A patch is a tensor (it replaces the activation; same shape) or a function value -> value.
``head_ablation`` builds the patch that zeroes (or mean-ablates) heads; names follow
TransformerLens's (Nanda and Bloom, 2022) where the idea is the same.
"""

import math

import torch

from qkv._checks import check_min_ndim, check_token_ids, shape_of

from .attention import split_heads
from .embedding import embed
from .gelu import gelu
from .layer_norm import layer_norm
from .linear import linear
from .masking import causal_mask
from .softmax import softmax

_BLOCK_NAMES = ("resid_pre", "ln_1", "attn.q", "attn.k", "attn.v", "attn.scores",
                "attn.pattern", "attn.z", "attn.head_out", "attn.out", "resid_mid", "ln_2",
                "mlp.pre", "mlp.post", "mlp.out", "resid_post")


def activation_names(n_layer: int) -> list[str]:
    """Every name run_with_cache records for a model with n_layer blocks, in forward order."""
    blocks = [f"blocks.{i}.{n}" for i in range(n_layer) for n in _BLOCK_NAMES]
    return ["embed", "pos_embed", *blocks, "ln_final", "logits"]


class _Recorder:
    """Applies the patches and keeps the activations asked for, step by step."""

    def __init__(self, valid: list[str], names, patches):
        self.fn = "run_with_cache"
        known = set(valid)
        patches = dict(patches or {})
        wanted = valid if names is None else list(names)
        for what, given in (("patches", list(patches)), ("names", wanted)):
            unknown = [n for n in given if n not in known]
            if unknown:
                raise KeyError(f"{self.fn}: unknown activation name(s) {unknown} in {what}; "
                               f"valid names: {', '.join(valid)}")
        self.patches, self.wanted, self.cache = patches, set(wanted), {}

    def __call__(self, name: str, value: torch.Tensor) -> torch.Tensor:
        patch = self.patches.get(name)
        if patch is not None:
            new = patch(value) if callable(patch) else torch.as_tensor(patch)
            if not isinstance(new, torch.Tensor) or new.shape != value.shape:
                raise ValueError(f"{self.fn}: the patch for {name} must give a tensor of "
                                 f"shape {shape_of(value)}; got {shape_of(new)}")
            value = new.to(dtype=value.dtype, device=value.device)
        if name in self.wanted:
            self.cache[name] = value.detach()
        return value


def _attention(rec: _Recorder, p: str, h, params: dict, n_head: int) -> torch.Tensor:
    """The naive multi-head attention of qkv.pt.attention, one named step at a time."""
    d_model = h.shape[-1]
    qkv = linear(h, params["w_qkv"], params["b_qkv"])  # (..., seq, 3*d_model)
    q, k, v = (rec(f"{p}.attn.{n}", split_heads(t, n_head))  # (..., n_head, seq, d_head)
               for n, t in zip("qkv", qkv.split(d_model, dim=-1), strict=True))
    seq, d_head = q.shape[-2:]
    scores = q @ k.transpose(-2, -1) / math.sqrt(d_head)  # (..., n_head, seq, seq)
    scores = rec(f"{p}.attn.scores",
                 scores.masked_fill(~causal_mask(seq, seq, device=h.device), float("-inf")))
    pattern = rec(f"{p}.attn.pattern", softmax(scores, axis=-1))
    z = rec(f"{p}.attn.z", pattern @ v)  # (..., n_head, seq, d_head)
    # merge_heads(z) @ w_out is the sum over heads of z_h @ (rows h*d_head.. of w_out):
    # split w_out's rows by head to see each head's own write into the stream.
    w_out = params["w_out"].reshape(n_head, d_head, d_model)  # (n_head, d_head, d_model)
    head_out = rec(f"{p}.attn.head_out", z @ w_out)  # (..., n_head, seq, d_model)
    out = head_out.sum(dim=-3)  # (..., seq, d_model)
    if params["b_out"] is not None:
        out = out + params["b_out"]
    return rec(f"{p}.attn.out", out)


def run_with_cache(model, token_ids: torch.Tensor, names=None, patches: dict | None = None):
    """Run ``model`` (a qkv.pt.GPT) on token_ids, recording activations and applying patches.

    token_ids: (..., seq) int64 ids, seq <= context_length
    names: the activation names to keep (default: all of ``activation_names(n_layer)``)
    patches: dict name -> tensor (replaces the activation) or function value -> new value
    returns: (logits (..., seq, vocab), cache: dict name -> detached tensor)

    The logits equal ``model(token_ids)`` (to float rounding) when nothing is patched. An
    unknown name raises a KeyError that lists the valid ones.
    """
    cfg = model.config
    check_token_ids("run_with_cache", "token_ids", token_ids, vocab=cfg.vocab_size)
    check_min_ndim("run_with_cache", "token_ids", token_ids, 1, "(..., seq)")
    seq = token_ids.shape[-1]
    if seq > cfg.context_length:
        raise ValueError(f"run_with_cache: seq must be <= context_length {cfg.context_length}; "
                         f"got token_ids {shape_of(token_ids)}")
    rec = _Recorder(activation_names(cfg.n_layer), names, patches)
    T = model.transformer
    x = rec("embed", embed(token_ids, T.wte.weight)) + rec("pos_embed", T.wpe.weight[:seq])
    x = T.drop(x)  # (..., seq, d_model)
    for i, block in enumerate(T.h):
        p, prm = f"blocks.{i}", block.params()
        x = rec(f"{p}.resid_pre", x)
        h = rec(f"{p}.ln_1", layer_norm(x, prm["ln1_gamma"], prm["ln1_beta"]))
        x = rec(f"{p}.resid_mid", x + _attention(rec, p, h, prm, cfg.n_head))
        h = rec(f"{p}.ln_2", layer_norm(x, prm["ln2_gamma"], prm["ln2_beta"]))
        pre = rec(f"{p}.mlp.pre", linear(h, prm["w_fc"], prm["b_fc"]))  # (..., seq, d_ff)
        post = rec(f"{p}.mlp.post", gelu(pre))
        out = rec(f"{p}.mlp.out", linear(post, prm["w_proj"], prm["b_proj"]))
        x = rec(f"{p}.resid_post", x + out)
    x = rec("ln_final", layer_norm(x, T.ln_f.weight, T.ln_f.bias))
    logits = rec("logits", x @ T.wte.weight.T)  # (..., seq, vocab): the tied unembedding
    return logits, rec.cache


def run_with_patches(model, token_ids: torch.Tensor, patches: dict) -> torch.Tensor:
    """The logits (..., seq, vocab) of ``model`` on token_ids with ``patches`` applied (see
    run_with_cache); records nothing."""
    return run_with_cache(model, token_ids, names=[], patches=patches)[0]


def head_ablation(layer: int, heads, how: str = "zero", mean: torch.Tensor | None = None):
    """A patch dict that removes heads of block ``layer`` from the model.

    heads: a head index or a list of them.
    how: "zero": head h's z (its slice of c_proj's input) becomes 0, so the head writes nothing
        but c_proj's bias; "mean": z becomes its mean (the head keeps its average contribution
        and loses what depends on this input).
    mean: (n_head, seq, d_head) means to use for "mean", e.g. ``cache[name].mean(0)`` from a
        reference batch; None takes the mean over the batch axes of the run itself.
    returns: {"blocks.{layer}.attn.z": function}, to pass as ``patches=`` (merge two such dicts
        only for different layers; for one layer pass a list of heads).
    """
    if how not in ("zero", "mean"):
        raise ValueError(f"head_ablation: how must be 'zero' or 'mean'; got {how!r}")
    heads = [heads] if isinstance(heads, int) else list(heads)

    def patch(z):  # (..., n_head, seq, d_head)
        n_head = z.shape[-3]
        bad = [h for h in heads if not 0 <= h < n_head]
        if bad:
            raise IndexError(f"head_ablation: head(s) {bad} out of range; block {layer} has "
                             f"heads 0..{n_head - 1}")
        if how == "mean" and mean is None and z.ndim < 4:
            raise ValueError("head_ablation: how='mean' without mean= needs a batch axis to "
                             f"average over; got z {shape_of(z)}")
        fill = torch.zeros_like(z) if how == "zero" else (
            z.mean(dim=tuple(range(z.ndim - 3))) if mean is None else mean).expand_as(z)
        z = z.clone()
        z[..., heads, :, :] = fill[..., heads, :, :]
        return z

    return {f"blocks.{layer}.attn.z": patch}


def unembed_lens(model, resid: torch.Tensor) -> torch.Tensor:
    """The logit lens (nostalgebraist, 2020): read a residual stream (..., seq, d_model) with
    the model's own final layer norm and unembedding. returns: (..., seq, vocab)."""
    ln_f = model.transformer.ln_f
    return layer_norm(resid, ln_f.weight, ln_f.bias) @ model.transformer.wte.weight.T


def previous_token_scores(pattern: torch.Tensor) -> torch.Tensor:
    """How much each head attends to the token just before the query.

    pattern: (..., n_head, seq, seq) attention weights (row = query, column = key)
    returns: (n_head,) the weight on key t-1 from query t, averaged over t = 1..seq-1 and over
        every batch axis: 1 for a perfect previous-token head.
    """
    check_min_ndim("previous_token_scores", "pattern", pattern, 3, "(..., n_head, seq, seq)")
    n_head = pattern.shape[-3]
    diag = pattern.diagonal(offset=-1, dim1=-2, dim2=-1)  # (..., n_head, seq-1): [t, t-1]
    return diag.reshape(-1, n_head, diag.shape[-1]).mean(dim=(0, 2))


def induction_scores(pattern: torch.Tensor, half: int) -> torch.Tensor:
    """How much each head attends to the token after the earlier copy of the query's token.

    pattern: (..., n_head, seq, seq) weights on sequences whose token t equals token t - half
        for every t >= half (a random first half, then the same tokens again)
    half: the length of the repeated block
    returns: (n_head,) the weight on key t - half + 1 from query t, averaged over the second
        half's queries t = half..seq-1 and over every batch axis: 1 for a perfect induction head.
    """
    fn = "induction_scores"
    check_min_ndim(fn, "pattern", pattern, 3, "(..., n_head, seq, seq)")
    n_head, seq = pattern.shape[-3], pattern.shape[-1]
    if not 1 <= half < seq:
        raise ValueError(f"{fn}: half must be in 1..seq-1 = {seq - 1}; got {half}")
    # offset -(half-1) holds [t, t-half+1] for t = half-1..seq-1; the first is a first-half query
    diag = pattern.diagonal(offset=1 - half, dim1=-2, dim2=-1)[..., 1:]  # (..., n_head, seq-half)
    return diag.reshape(-1, n_head, diag.shape[-1]).mean(dim=(0, 2))


def repeated_tokens(batch: int, half: int, vocab: int, generator: torch.Generator) -> torch.Tensor:
    """(batch, 2*half) int64 ids: half uniformly random tokens, then the same tokens again."""
    first = torch.randint(0, vocab, (batch, half), generator=generator)
    return torch.cat([first, first], dim=-1)
