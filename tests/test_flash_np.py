"""qkv.np's tiled (flash) attention and streaming softmax.

Values and gradients against qkv.np's naive attention and against torch (softmax, logsumexp,
F.scaled_dot_product_attention with autograd) in float64; gradients also against centred
finite differences; the causal tile schedule against the causal mask entry by entry; and
peak memory (tracemalloc) growing about linearly in seq where the naive path grows
quadratically.
"""

import tracemalloc

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import qkv.np as qnp
from qkv.np.flash import key_blocks
from qkv.np.gradcheck import numerical_gradient, relative_error
from qkv.tolerances import TOL

REL_ERR = TOL["float64_gradcheck"]["rel_err"]

# (seq_q, seq_k, block_q, block_k): blocks that divide seq, blocks that do not, one block
# bigger than seq, more queries than keys (causal: the first rows see nothing) and fewer.
SHAPES = [(32, 32, 8, 8), (37, 37, 16, 7), (5, 5, 64, 64), (29, 13, 8, 4), (11, 40, 4, 16),
          (1, 9, 3, 2)]


def _inputs(seq_q, seq_k, d_head=8, d_v=6, lead=(2, 3), seed=0):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal(lead + (seq_q, d_head))
    k = rng.standard_normal(lead + (seq_k, d_head))
    v = rng.standard_normal(lead + (seq_k, d_v))
    dout = rng.standard_normal(lead + (seq_q, d_v))
    return q, k, v, dout


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("seq_q,seq_k,block_q,block_k", SHAPES)
def test_flash_equals_naive_values_and_gradients(seq_q, seq_k, block_q, block_k, causal):
    q, k, v, dout = _inputs(seq_q, seq_k)
    ref, ref_cache = qnp.attention_forward(q, k, v, causal=causal)
    out, cache = qnp.flash_attention_forward(q, k, v, causal=causal, block_q=block_q,
                                             block_k=block_k)
    np.testing.assert_allclose(out, ref, **TOL["float64"])
    np.testing.assert_allclose(qnp.flash_attention(q, k, v, causal, block_q, block_k), ref,
                               **TOL["float64"])
    want = qnp.attention_backward(dout, ref_cache)
    got = qnp.flash_attention_backward(dout, cache)
    for name in ("dq", "dk", "dv"):
        np.testing.assert_allclose(got[name], want[name], **TOL["float64"], err_msg=name)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("seq_q,seq_k", [(13, 13), (7, 19)])
def test_flash_against_torch_autograd(seq_q, seq_k, causal):
    q, k, v, dout = _inputs(seq_q, seq_k, seed=1)
    out, cache = qnp.flash_attention_forward(q, k, v, causal=causal, block_q=4, block_k=5)
    grads = qnp.flash_attention_backward(dout, cache)
    tq, tk, tv = (torch.tensor(a, requires_grad=True) for a in (q, k, v))
    # torch's is_causal aligns top-left; qkv aligns bottom-right, so pass that mask explicitly.
    mask = torch.ones(seq_q, seq_k, dtype=torch.bool).tril(seq_k - seq_q) if causal else None
    t_out = F.scaled_dot_product_attention(tq, tk, tv, attn_mask=mask)
    t_out.backward(torch.tensor(dout))
    np.testing.assert_allclose(out, t_out.detach().numpy(), **TOL["float64"])
    for name, t in (("dq", tq), ("dk", tk), ("dv", tv)):
        np.testing.assert_allclose(grads[name], t.grad.numpy(), **TOL["float64"], err_msg=name)


@pytest.mark.parametrize("causal", [False, True])
def test_flash_backward_finite_differences(causal):
    q, k, v, dout = _inputs(6, 7, d_head=3, d_v=2, lead=(2,), seed=2)
    grads = qnp.flash_attention_backward(
        dout, qnp.flash_attention_forward(q, k, v, causal=causal, block_q=4, block_k=3)[1])
    for name, x in (("q", q), ("k", k), ("v", v)):
        def loss(_):
            return float(np.sum(qnp.flash_attention(q, k, v, causal, 4, 3) * dout))

        numeric = numerical_gradient(loss, x)
        assert relative_error(grads["d" + name], numeric) <= REL_ERR, name


def test_flash_broadcast_batch_and_blocked_rows():
    # k and v shared by every batch entry: their gradients collect all entries'; with more
    # queries than keys and causal, the first queries see no key and get zeros (never NaN).
    rng = np.random.default_rng(3)
    q = rng.standard_normal((3, 2, 12, 4))
    k, v = rng.standard_normal((1, 2, 7, 4)), rng.standard_normal((2, 7, 5))
    dout = rng.standard_normal((3, 2, 12, 5))
    ref, ref_cache = qnp.attention_forward(q, k, v, causal=True)
    out, cache = qnp.flash_attention_forward(q, k, v, causal=True, block_q=4, block_k=2)
    np.testing.assert_allclose(out, ref, **TOL["float64"])
    assert np.all(out[..., :5, :] == 0.0)
    want, got = qnp.attention_backward(dout, ref_cache), qnp.flash_attention_backward(dout, cache)
    for name, like in (("dq", q), ("dk", k), ("dv", v)):
        assert got[name].shape == like.shape
        assert np.all(np.isfinite(got[name]))
        np.testing.assert_allclose(got[name], want[name], **TOL["float64"], err_msg=name)


@pytest.mark.parametrize("seq_q,seq_k,block_q,block_k", SHAPES + [(64, 64, 16, 16)])
def test_causal_tile_schedule_matches_the_mask(seq_q, seq_k, block_q, block_k):
    # Every tile with at least one visible entry is visited, no other; exactly the tiles with a
    # blocked entry inside are masked. Checked against the mask itself, entry by entry.
    mask = np.asarray(qnp.causal_mask(seq_q, seq_k))
    for qs in range(0, seq_q, block_q):
        qe = min(qs + block_q, seq_q)
        visited = {(ks, ke): masked for ks, ke, masked in
                   key_blocks(qs, qe, seq_q, seq_k, block_k, causal=True)}
        for ks in range(0, seq_k, block_k):
            ke = min(ks + block_k, seq_k)
            tile = mask[qs:qe, ks:ke]
            assert ((ks, ke) in visited) == bool(tile.any()), (qs, ks)
            if (ks, ke) in visited:
                assert visited[(ks, ke)] == (not tile.all()), (qs, ks)


def test_causal_skips_about_half_the_tiles():
    n = 16  # 16 x 16 tiles, causal square: 16 * 17 / 2 = 136 visited
    visited = sum(1 for qs in range(0, 16 * n, 16)
                  for _ in key_blocks(qs, qs + 16, 16 * n, 16 * n, 16, causal=True))
    assert visited == n * (n + 1) // 2


@pytest.mark.parametrize("block", [1, 3, 64])
def test_streaming_softmax_and_logsumexp_match_torch(block):
    rng = np.random.default_rng(4)
    x = rng.standard_normal((4, 3, 50)) * 5
    x[0, 0, 30:] += 1e4  # the max arrives late: earlier blocks must be rescaled, not overflow
    x[1, 1, :] = -np.inf  # a fully blocked row
    x[2, 2, ::2] = -np.inf
    t = torch.tensor(x)
    np.testing.assert_allclose(qnp.streaming_logsumexp(x, block), torch.logsumexp(t, -1).numpy(),
                               **TOL["float64"])
    want = torch.softmax(t, -1).nan_to_num(0.0).numpy()  # torch gives NaN on the -inf row
    np.testing.assert_allclose(qnp.streaming_softmax(x, block), want, **TOL["float64"])
    np.testing.assert_allclose(qnp.streaming_softmax(x, block), qnp.softmax(x), **TOL["float64"])


def _peak_bytes(fn, seq, d_head=16):
    rng = np.random.default_rng(5)
    q, k, v = (rng.standard_normal((1, seq, d_head)) for _ in range(3))
    tracemalloc.start()
    tracemalloc.reset_peak()
    fn(q, k, v)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return peak


def test_peak_memory_linear_for_flash_quadratic_for_naive():
    # Doubling seq: the naive path's (seq, seq) scores quadruple its peak; the tiled path holds
    # (block_q, block_k) tiles and O(seq * d_head) rows, so its peak about doubles.
    def naive(q, k, v):
        return qnp.scaled_dot_product_attention(q, k, v)

    def tiled(q, k, v):
        return qnp.flash_attention(q, k, v, block_q=32, block_k=32)

    n_small, n_big = 512, 1024
    naive_growth = _peak_bytes(naive, n_big) / _peak_bytes(naive, n_small)
    tiled_growth = _peak_bytes(tiled, n_big) / _peak_bytes(tiled, n_small)
    assert naive_growth > 3.5, naive_growth  # ~4 = 2 ** 2
    assert tiled_growth < 2.5, tiled_growth  # ~2 = 2 ** 1
    assert _peak_bytes(tiled, n_big) * 8 < _peak_bytes(naive, n_big)


@pytest.mark.parametrize("bad", [0, -3, 2.5, None, True])
def test_flash_rejects_bad_blocks(bad):
    q, k, v, _ = _inputs(4, 4)
    with pytest.raises(ValueError, match=r"^flash_attention: block_q must be a positive int"):
        qnp.flash_attention(q, k, v, block_q=bad)
    with pytest.raises(ValueError, match=r"^flash_attention: block_k must be a positive int"):
        qnp.flash_attention(q, k, v, block_k=bad)
    with pytest.raises(ValueError, match=r"^streaming_softmax: block must be a positive int"):
        qnp.streaming_softmax(q, block=bad)


def test_flash_rejects_bad_shapes_and_dtypes():
    q, k, v, _ = _inputs(4, 5)
    with pytest.raises(ValueError, match=r"flash_attention: q and k must share d_head"):
        qnp.flash_attention(q, k[..., :5], v)
    with pytest.raises(ValueError, match=r"flash_attention: k and v must share seq_k"):
        qnp.flash_attention(q, k, v[..., :3, :])
    with pytest.raises(TypeError, match=r"flash_attention: q must be a float array"):
        qnp.flash_attention(q.astype(np.int64), k, v)
