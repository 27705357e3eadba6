"""Chapter 9's derived exercises: GELU, the MLP, the embedding lookup and a whole decoder block.
Mistakes are wrong backwards run with a correct learner-style forward; alternatives include
backwards computed by PyTorch's autograd, an independent second implementation."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from grading_meta import Declared, meta_tests

from qkv.grading import (
    check_decoder_block_backward,
    check_embedding_backward,
    check_gelu_backward,
    check_mlp_backward,
)
from qkv.grading.engine import _float64
from qkv.grading.pairs import _same

C = np.sqrt(2.0 / np.pi)

# --- a learner's pieces, written as the notebook asks -------------------------------------------


def linear_forward(x, w, b):
    return x @ w + b, (x, w)


def linear_backward(dout, cache):
    x, w = cache
    xr, dr = x.reshape(-1, x.shape[-1]), dout.reshape(-1, dout.shape[-1])
    return {"dx": dout @ w.T, "dw": xr.T @ dr, "db": dr.sum(axis=0)}


def gelu_forward(x):
    t = np.tanh(C * (x + 0.044715 * x**3))
    return 0.5 * x * (1 + t), (x, t)


def gelu_backward(dout, cache):
    x, t = cache
    return {"dx": dout * (0.5 * (1 + t) + 0.5 * x * (1 - t**2) * C * (1 + 3 * 0.044715 * x**2))}


def mlp_forward(x, w_fc, b_fc, w_proj, b_proj):
    h, c1 = linear_forward(x, w_fc, b_fc)
    a, c2 = gelu_forward(h)
    out, c3 = linear_forward(a, w_proj, b_proj)
    return out, (c1, c2, c3)


def mlp_backward(dout, cache, *, slope=gelu_backward, bias_from="dh", sum0=False):
    c1, c2, c3 = cache
    g3 = linear_backward(dout, c3)
    dh = slope(g3["dx"], c2)["dx"]
    g1 = linear_backward(dh, c1)
    lead = 0 if sum0 else tuple(range(dout.ndim - 1))
    db_fc = {"dh": g1["db"], "da": g3["dx"].reshape(-1, g3["dx"].shape[-1]).sum(axis=0)}[bias_from]
    return {"dx": g1["dx"], "dw_fc": g1["dw"], "db_fc": db_fc if not sum0 else dh.sum(axis=lead),
            "dw_proj": g3["dw"], "db_proj": g3["db"] if not sum0 else dout.sum(axis=lead)}


def embedding_forward(token_ids, table):
    return table[token_ids], (token_ids, table.shape)


def embedding_backward(dout, cache):
    ids, shape = cache
    dtable = np.zeros(shape)
    np.add.at(dtable, ids, dout)
    return {"dtable": dtable}


def layer_norm_forward(x, gamma, beta, eps=1e-5):
    mean = x.mean(axis=-1, keepdims=True)
    s = np.sqrt(((x - mean) ** 2).mean(axis=-1, keepdims=True) + eps)
    x_hat = (x - mean) / s
    return gamma * x_hat + beta, (x_hat, s, gamma)


def layer_norm_backward(dout, cache):
    x_hat, s, gamma = cache
    g = dout * gamma
    dx = (g - g.mean(-1, keepdims=True) - x_hat * (g * x_hat).mean(-1, keepdims=True)) / s
    lead = tuple(range(dout.ndim - 1))
    return {"dx": dx, "dgamma": (dout * x_hat).sum(axis=lead), "dbeta": dout.sum(axis=lead)}


def attention_forward(q, k, v):
    seq, d = q.shape[-2:]
    s = q @ np.swapaxes(k, -1, -2) / np.sqrt(d)
    s = np.where(np.tril(np.ones((seq, seq), dtype=bool)), s, -np.inf)
    e = np.exp(s - s.max(-1, keepdims=True))
    a = e / e.sum(-1, keepdims=True)
    return a @ v, (q, k, v, a)


def attention_backward(dout, cache):
    q, k, v, a = cache
    d = q.shape[-1]
    dv = np.swapaxes(a, -1, -2) @ dout
    da = dout @ np.swapaxes(v, -1, -2)
    ds = a * (da - (da * a).sum(-1, keepdims=True))
    return {"dq": ds @ k / np.sqrt(d), "dk": np.swapaxes(ds, -1, -2) @ q / np.sqrt(d), "dv": dv}


def split_heads(x, n_head):
    *lead, seq, d = x.shape
    return np.swapaxes(x.reshape(*lead, seq, n_head, d // n_head), -3, -2)


def merge_heads(x):
    *lead, n_head, seq, d_head = x.shape
    return np.swapaxes(x, -3, -2).reshape(*lead, seq, n_head * d_head)


KEYS = ("ln1_gamma", "ln1_beta", "w_qkv", "b_qkv", "w_out", "b_out",
        "ln2_gamma", "ln2_beta", "w_fc", "b_fc", "w_proj", "b_proj")


def block_forward(x, ln1_gamma, ln1_beta, w_qkv, b_qkv, w_out, b_out, ln2_gamma, ln2_beta,
                  w_fc, b_fc, w_proj, b_proj, n_head):
    h1, c_ln1 = layer_norm_forward(x, ln1_gamma, ln1_beta)
    qkv, c_qkv = linear_forward(h1, w_qkv, b_qkv)
    q, k, v = (split_heads(t, n_head) for t in np.split(qkv, 3, axis=-1))
    o, c_att = attention_forward(q, k, v)
    a, c_out = linear_forward(merge_heads(o), w_out, b_out)
    x1 = x + a
    h2, c_ln2 = layer_norm_forward(x1, ln2_gamma, ln2_beta)
    m, c_mlp = mlp_forward(h2, w_fc, b_fc, w_proj, b_proj)
    return x1 + m, (c_ln1, c_qkv, c_att, c_out, c_ln2, c_mlp, n_head)


def block_backward(dout, cache, *, stream2=True, stream1=True, order=("dq", "dk", "dv"),
                   merge_back=True):
    c_ln1, c_qkv, c_att, c_out, c_ln2, c_mlp, n_head = cache
    g_mlp = mlp_backward(dout, c_mlp)
    g_ln2 = layer_norm_backward(g_mlp["dx"], c_ln2)
    dx1 = (dout if stream2 else 0) + g_ln2["dx"]
    g_out = linear_backward(dx1, c_out)
    g_att = attention_backward(split_heads(g_out["dx"], n_head), c_att)
    if merge_back:
        dqkv = np.concatenate([merge_heads(g_att[k]) for k in order], axis=-1)
    else:  # a reshape that forgets to swap the head and seq axes back
        dqkv = np.concatenate([g_att[k].reshape(*g_out["dx"].shape) for k in order], axis=-1)
    g_qkv = linear_backward(dqkv, c_qkv)
    g_ln1 = layer_norm_backward(g_qkv["dx"], c_ln1)
    return {"dx": (dx1 if stream1 else 0) + g_ln1["dx"],
            "dln1_gamma": g_ln1["dgamma"], "dln1_beta": g_ln1["dbeta"],
            "dw_qkv": g_qkv["dw"], "db_qkv": g_qkv["db"], "dw_out": g_out["dw"],
            "db_out": g_out["db"], "dln2_gamma": g_ln2["dgamma"], "dln2_beta": g_ln2["dbeta"],
            "dw_fc": g_mlp["dw_fc"], "db_fc": g_mlp["db_fc"], "dw_proj": g_mlp["dw_proj"],
            "db_proj": g_mlp["db_proj"]}


# --- valid alternatives, written differently ---------------------------------------------------


def _autograd(fn, arrays, dout):
    """Gradients of sum(fn(*tensors) * dout) by PyTorch's autograd, in float64."""
    ts = [torch.tensor(a, dtype=torch.float64, requires_grad=True) for a in arrays]
    (fn(*ts) * torch.tensor(dout, dtype=torch.float64)).sum().backward()
    return [t.grad.numpy() for t in ts]


def gelu_forward_keep_x(x):  # a cache of the learner's choice: x only
    return gelu_forward(x)[0], x


def gelu_backward_autograd(dout, x):
    return {"dx": _autograd(lambda t: F.gelu(t, approximate="tanh"), [x], dout)[0]}


def gelu_backward_cosh(dout, cache):  # tanh' written as 1 / cosh^2, u recomputed
    x, _ = cache
    u = C * (x + 0.044715 * x**3)
    return {"dx": dout * (0.5 * (1 + np.tanh(u)) + 0.5 * x / np.cosh(u) ** 2
                          * C * (1 + 0.134145 * x**2))}


def mlp_forward_keep_inputs(x, w_fc, b_fc, w_proj, b_proj):
    return mlp_forward(x, w_fc, b_fc, w_proj, b_proj)[0], (x, w_fc, b_fc, w_proj, b_proj)


def mlp_backward_autograd(dout, cache):
    def f(x, w1, b1, w2, b2):
        return F.gelu(x @ w1 + b1, approximate="tanh") @ w2 + b2
    dx, dw1, db1, dw2, db2 = _autograd(f, cache, dout)
    return {"dx": dx, "dw_fc": dw1, "db_fc": db1, "dw_proj": dw2, "db_proj": db2}


def mlp_backward_einsum(dout, cache):
    (x, w1), (h, t), (a, w2) = cache
    dh = gelu_backward(dout @ w2.T, (h, t))["dx"]
    lead = tuple(range(dout.ndim - 1))
    return {"dx": np.einsum("...f,df->...d", dh, w1),
            "dw_fc": np.tensordot(x, dh, axes=(lead, lead)), "db_fc": dh.sum(axis=lead),
            "dw_proj": np.tensordot(a, dout, axes=(lead, lead)), "db_proj": dout.sum(axis=lead)}


def embedding_backward_onehot(dout, cache):
    ids, (vocab, d) = cache
    onehot = np.eye(vocab)[ids.reshape(-1)]  # (positions, vocab)
    return {"dtable": onehot.T @ dout.reshape(-1, d)}


def embedding_backward_loop(dout, cache):
    ids, shape = cache
    dtable = np.zeros(shape)
    for pos in np.ndindex(ids.shape):
        dtable[ids[pos]] += dout[pos]
    return {"dtable": dtable}


def embedding_backward_torch(dout, cache):
    ids, shape = cache
    dtable = torch.zeros(shape, dtype=torch.float64)
    dtable.index_add_(0, torch.as_tensor(ids.reshape(-1)),
                      torch.as_tensor(dout.reshape(-1, shape[1])))
    return {"dtable": dtable.numpy()}


def block_forward_keep_inputs(x, *rest):
    return block_forward(x, *rest)[0], (x, *rest)


def block_backward_autograd(dout, cache):
    """The whole block in PyTorch's own ops (F.layer_norm, F.gelu, F.scaled_dot_product_attention),
    differentiated by autograd: independent of every NumPy piece above."""
    *arrays, n_head = cache

    def f(x, g1, be1, w_qkv, b_qkv, w_out, b_out, g2, be2, w_fc, b_fc, w_proj, b_proj):
        d = x.shape[-1]

        def heads(t):
            return t.reshape(*t.shape[:-1], n_head, d // n_head).transpose(-3, -2)

        q, k, v = (heads(t) for t in (F.layer_norm(x, (d,), g1, be1) @ w_qkv + b_qkv)
                   .split(d, dim=-1))
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(-3, -2)
        x1 = x + o.reshape(*x.shape) @ w_out + b_out
        h = F.gelu(F.layer_norm(x1, (d,), g2, be2) @ w_fc + b_fc, approximate="tanh")
        return x1 + h @ w_proj + b_proj

    grads = _autograd(f, arrays, dout)
    return {"dx": grads[0], **{f"d{k}": g for k, g in zip(KEYS, grads[1:], strict=True)}}


DECLARED = [
    Declared(
        check_gelu_backward,
        reference=(gelu_forward, gelu_backward),
        mistakes=[
            ((gelu_forward, lambda d, c: {"dx": d * 0.5 * (1 + c[1])}), "as a constant"),
            ((gelu_forward, lambda d, c: {"dx": d * (0.5 * (1 + c[1]) + 0.5 * c[0] * (1 - c[1])
                                                      * C * (1 + 3 * 0.044715 * c[0] ** 2))}),
             "1 - t as the slope"),
            ((gelu_forward, lambda d, c: {"dx": d * (0.5 * (1 + c[1]) + 0.5 * c[0]
                                                      * (1 - c[1] ** 2) * C
                                                      * (1 + 0.044715 * c[0] ** 2))}),
             "missing the 3"),
            ((gelu_forward, lambda d, c: {"dx": gelu_backward(np.ones_like(d), c)["dx"]}),
             "without multiplying by dout"),
        ],
        alternatives=[(gelu_forward, gelu_backward_cosh),
                      (gelu_forward_keep_x, gelu_backward_autograd)],
    ),
    Declared(
        check_mlp_backward,
        reference=(mlp_forward, mlp_backward),
        mistakes=[
            ((mlp_forward, lambda d, c: mlp_backward(d, c, bias_from="da")), "BEFORE the GELU"),
            ((mlp_forward, lambda d, c: mlp_backward(d, c, slope=lambda g, _: {"dx": g})),
             "skips the GELU"),
            ((mlp_forward, lambda d, c: mlp_backward(
                d, c, slope=lambda g, gc: {"dx": g * gelu_forward(gc[0])[0]})),
             "GELU(h) itself"),
            ((mlp_forward, lambda d, c: mlp_backward(d, c, sum0=True)), "first axis only"),
        ],
        alternatives=[(mlp_forward, mlp_backward_einsum),
                      (mlp_forward_keep_inputs, mlp_backward_autograd)],
    ),
    Declared(
        check_embedding_backward,
        reference=(embedding_forward, embedding_backward),
        mistakes=[
            ((embedding_forward, lambda d, c: {"dtable": _fancy(d, c)}), "keeps only one"),
            ((embedding_forward, lambda d, c: {"dtable": _mean(d, c)}), "averages"),
        ],
        alternatives=[(embedding_forward, embedding_backward_onehot),
                      (embedding_forward, embedding_backward_loop),
                      (embedding_forward, embedding_backward_torch)],
    ),
    Declared(
        check_decoder_block_backward,
        reference=(block_forward, block_backward),
        mistakes=[
            ((block_forward, lambda d, c: block_backward(d, c, stream2=False)),
             "missing the stream's copy"),
            ((block_forward, lambda d, c: block_backward(d, c, stream1=False)),
             "first residual sum"),
            ((block_forward, lambda d, c: block_backward(d, c, order=("dk", "dq", "dv"))),
             "[dk | dq | dv]"),
            ((block_forward, lambda d, c: block_backward(d, c, merge_back=False)),
             "relative error"),
        ],
        alternatives=[(block_forward, block_backward),
                      (block_forward_keep_inputs, block_backward_autograd)],
    ),
]


def _fancy(dout, cache):
    ids, shape = cache
    g = np.zeros(shape)
    g[ids] += dout
    return g


def _mean(dout, cache):
    ids, shape = cache
    g = embedding_backward(dout, cache)["dtable"]
    return g / np.maximum(np.bincount(ids.reshape(-1), minlength=shape[0]), 1)[:, None]


globals().update(meta_tests(DECLARED))


# --- every catalogued mistake is named on the visible cases ------------------------------------

_CHECKS = [check_gelu_backward, check_mlp_backward, check_embedding_backward,
           check_decoder_block_backward]


def _catalogue(check):
    ex = check.exercise
    kind = ex.output
    for i, (case, dout) in enumerate(ex.visible()):
        args = _float64(case.args)
        ref_out, ref_cache = ex.reference(*args)
        ref_grads = kind.ref_backward(dout, ref_cache)
        for mistake in ex.mistakes(*args, dout=dout):
            wrong = mistake.fn()
            if any(not _same(np.asarray(w, float), np.asarray(ref_grads[k], float))
                   for k, w in wrong.items()):
                yield i, mistake, wrong


@pytest.mark.parametrize("check", _CHECKS, ids=[c.__name__ for c in _CHECKS])
def test_catalogue_is_named_on_visible_cases(check):
    ex = check.exercise
    kind = ex.output
    found = list(_catalogue(check))
    assert found, f"{check.__name__}: no catalogued mistake differs from the reference"
    for index, mistake, wrong in found:
        case, _ = ex.visible()[index]

        def backward(dout, cache, wrong=wrong, index=index):
            grads = dict(kind.ref_backward(dout, cache))
            if np.array_equal(dout, ex.visible()[index][1]):  # the case with this mistake
                grads.update(wrong)
            return grads

        with pytest.raises(AssertionError) as info:
            check(ex.reference, backward)
        head = mistake.says.split("{case}")[0].replace("{name}", kind.backward)
        assert head in str(info.value), (check.__name__, index, head, str(info.value))
