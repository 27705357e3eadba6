"""Small cases worked out by hand, checked in both backends (float64)."""

import math

import numpy as np
import pytest
import torch

from qkv.tolerances import TOL


def close(actual, expected):
    np.testing.assert_allclose(actual, expected, **TOL["float64"])


def test_softmax_of_logs_is_proportions(backend):
    # exp(ln k) = k, so softmax([ln 1, ln 2, ln 3]) = [1, 2, 3] / 6
    x = backend.array([0.0, math.log(2), math.log(3)])
    close(backend.numpy(backend.lib.softmax(x)), [1 / 6, 2 / 6, 3 / 6])


def test_softmax_over_axis_0(backend):
    x = backend.array([[0.0, 5.0], [math.log(3), 5.0]])
    close(backend.numpy(backend.lib.softmax(x, axis=0)), [[1 / 4, 1 / 2], [3 / 4, 1 / 2]])


def test_softmax_with_minus_inf(backend):
    x = backend.array([[-np.inf, 0.0, math.log(3)], [-np.inf, -np.inf, -np.inf]])
    close(backend.numpy(backend.lib.softmax(x)), [[0, 1 / 4, 3 / 4], [0, 0, 0]])


def test_causal_mask_square(backend):
    expected = [[True, False, False],
                [True, True, False],
                [True, True, True]]
    np.testing.assert_array_equal(backend.numpy(backend.lib.causal_mask(3)), expected)


def test_causal_mask_bottom_right(backend):
    # 2 new queries at absolute positions 2 and 3 over 4 keys (a KV cache of 2 + 2 new)
    expected = [[True, True, True, False],
                [True, True, True, True]]
    np.testing.assert_array_equal(backend.numpy(backend.lib.causal_mask(2, 4)), expected)
    np.testing.assert_array_equal(backend.numpy(backend.lib.causal_mask(1, 3)), [[True] * 3])
    # more queries than keys: the first query sits before every key and sees none
    expected = [[False, False],
                [True, False],
                [True, True]]
    np.testing.assert_array_equal(backend.numpy(backend.lib.causal_mask(3, 2)), expected)


def test_sinusoidal_positional_encoding_by_hand(backend):
    kwargs = {} if backend.name == "np" else {"dtype": torch.float64}
    pe = backend.numpy(backend.lib.sinusoidal_positional_encoding(3, 6, **kwargs))
    assert pe.shape == (3, 6)
    close(pe[0], [0, 1, 0, 1, 0, 1])  # sin 0, cos 0 in every pair
    # p = 1, i = 1: angle = 1 / 10000^(2/6) = 10000^(-1/3) = 0.046415888...
    close(pe[1, 2], math.sin(0.046415888336127774))
    close(pe[1, 3], math.cos(0.046415888336127774))
    close(pe[2, :2], [math.sin(2.0), math.cos(2.0)])  # i = 0: angle = p radians


def test_layer_norm_by_hand(backend):
    # [1, 2, 3, 4]: mean 2.5, biased variance (2.25 + 0.25 + 0.25 + 2.25) / 4 = 1.25
    x = backend.array([1.0, 2.0, 3.0, 4.0])
    gamma, beta = backend.array([1.0, 1.0, 2.0, 2.0]), backend.array([0.0, 0.0, 0.0, 1.0])
    y = backend.numpy(backend.lib.layer_norm(x, gamma, beta, eps=0.0))
    s = math.sqrt(1.25)
    close(y, [-1.5 / s, -0.5 / s, 2 * 0.5 / s, 2 * 1.5 / s + 1])
    # eps sits inside the sqrt: sqrt(1.25 + 2.75) = 2
    y = backend.numpy(backend.lib.layer_norm(x, gamma, beta, eps=2.75))
    close(y, [-0.75, -0.25, 0.5, 2.5])


def test_gelu_by_hand(backend):
    y = backend.numpy(backend.lib.gelu(backend.array([0.0, 1.0, -1.0, 10.0])))
    g1 = 0.5 * (1 + math.tanh(math.sqrt(2 / math.pi) * 1.044715))  # = 0.8411919906...
    close(y, [0.0, g1, -(1 - g1), 10.0])


def test_attention_by_hand(backend):
    # d_head = 4, so scores are q·k / 2: [2 ln 3 / 2, 0] = [ln 3, 0] -> weights [3/4, 1/4]
    q = backend.array([[2 * math.log(3), 0, 0, 0]])
    k = backend.array([[1.0, 0, 0, 0], [0, 0, 0, 0]])
    v = backend.array([[4.0, 0.0], [8.0, 4.0]])
    out, w = backend.lib.scaled_dot_product_attention(q, k, v, return_weights=True)
    close(backend.numpy(w), [[3 / 4, 1 / 4]])
    close(backend.numpy(out), [[5.0, 1.0]])


def test_causal_attention_first_query_copies_first_value(backend):
    q, k = backend.array(np.ones((3, 2))), backend.array(np.ones((3, 2)))
    v = backend.array([[1.0, 0.0], [0.0, 1.0], [3.0, 3.0]])
    out = backend.numpy(backend.lib.scaled_dot_product_attention(q, k, v, causal=True))
    close(out, [[1, 0], [1 / 2, 1 / 2], [4 / 3, 4 / 3]])  # equal scores: plain averages


def test_split_and_merge_heads_by_hand(backend):
    x = backend.array(np.arange(16.0).reshape(2, 8))  # (seq 2, d_model 8)
    heads = backend.numpy(backend.lib.split_heads(x, 2))  # (n_head 2, seq 2, d_head 4)
    close(heads, [[[0, 1, 2, 3], [8, 9, 10, 11]], [[4, 5, 6, 7], [12, 13, 14, 15]]])
    close(backend.numpy(backend.lib.merge_heads(backend.array(heads))), np.arange(16).reshape(2, 8))


def test_embed_and_linear_by_hand(backend):
    table = backend.array([[0.0, 0.0], [1.0, 2.0], [3.0, 4.0]])
    ids = backend.array([2, 1, 2], dtype="int64")
    close(backend.numpy(backend.lib.embed(ids, table)), [[3, 4], [1, 2], [3, 4]])
    x = backend.array([[1.0, 2.0]])
    w, b = backend.array([[1.0, 0.0, 1.0], [0.0, 1.0, 1.0]]), backend.array([0.0, 0.0, 10.0])
    close(backend.numpy(backend.lib.linear(x, w, b)), [[1, 2, 13]])  # w is (d_in, d_out)


@pytest.mark.parametrize("ignore_index", [None, 0])
def test_cross_entropy_by_hand(backend, ignore_index):
    # row 0: probs [1, 2, 3] / 6 and target 2 -> -ln(1/2); row 1: uniform -> ln 3
    logits = backend.array([[0.0, math.log(2), math.log(3)], [7.0, 7.0, 7.0]])
    targets = backend.array([2, 0], dtype="int64")
    loss = float(backend.lib.cross_entropy(logits, targets, ignore_index=ignore_index))
    expected = math.log(2) if ignore_index == 0 else (math.log(2) + math.log(3)) / 2
    close(loss, expected)
