"""Bad input fails early with a message that names the function, what it expected and what
it got: ValueError for shapes and ranges, TypeError for the wrong kind of numbers."""

import re
from contextlib import contextmanager

import numpy as np
import pytest
import torch

import qkv.np as qnp
import qkv.pt as qpt


@contextmanager
def raises(exc, fn_name, *fragments):
    """pytest.raises, then: the message starts with fn_name and contains every fragment."""
    with pytest.raises(exc) as info:
        yield info
    msg = str(info.value).strip("'\"")  # KeyError quotes its message
    assert msg.startswith(fn_name + ":"), msg
    for fragment in fragments:
        assert str(fragment) in msg, f"{fragment!r} not in {msg!r}"


def z(backend, *shape):
    return backend.array(np.zeros(shape))


def test_linear_mismatched_d_in(backend):
    with raises(ValueError, "linear", (2, 5, 8), (7, 3), "d_in"):
        backend.lib.linear(z(backend, 2, 5, 8), z(backend, 7, 3))
    with raises(ValueError, "linear", (3,), (4,)):
        backend.lib.linear(z(backend, 2, 8), z(backend, 8, 3), z(backend, 4))
    with raises(ValueError, "linear", (8,)):
        backend.lib.linear(z(backend, 2, 8), z(backend, 8))


def test_attention_shape_errors(backend):
    sdpa = backend.lib.scaled_dot_product_attention
    with raises(ValueError, "scaled_dot_product_attention", "d_head", (2, 5, 8), (2, 5, 16)):
        sdpa(z(backend, 2, 5, 8), z(backend, 2, 5, 16), z(backend, 2, 5, 16))
    with raises(ValueError, "scaled_dot_product_attention", "seq_k", (2, 5, 8), (2, 6, 8)):
        sdpa(z(backend, 2, 5, 8), z(backend, 2, 5, 8), z(backend, 2, 6, 8))
    with raises(ValueError, "scaled_dot_product_attention", (8,)):
        sdpa(z(backend, 8), z(backend, 8), z(backend, 8))
    mask = backend.array(np.ones((5, 4), dtype=bool))
    with raises(ValueError, "scaled_dot_product_attention", "mask", (5, 4), (2, 5, 5)):
        sdpa(z(backend, 2, 5, 8), z(backend, 2, 5, 8), z(backend, 2, 5, 8), mask=mask)
    with raises(ValueError, "scaled_dot_product_attention", (2, 5, 8), (3, 5, 8)):
        sdpa(z(backend, 2, 5, 8), z(backend, 3, 5, 8), z(backend, 3, 5, 8))


def test_mask_must_be_bool(backend):
    with raises(TypeError, "scaled_dot_product_attention", "bool"):
        backend.lib.scaled_dot_product_attention(z(backend, 5, 8), z(backend, 5, 8),
                                                 z(backend, 5, 8), mask=z(backend, 5, 5))


def test_multi_head_attention_errors(backend):
    x = z(backend, 2, 5, 8)
    good = [z(backend, 8, 24), z(backend, 24), z(backend, 8, 8), z(backend, 8)]
    with raises(ValueError, "multi_head_attention", "n_head", "d_model 8", "n_head 3"):
        backend.lib.multi_head_attention(x, *good, 3)
    with raises(ValueError, "multi_head_attention", "w_qkv", (8, 24), (8, 16)):
        backend.lib.multi_head_attention(x, z(backend, 8, 16), *good[1:], 2)
    with raises(ValueError, "multi_head_attention", "mask", (2, 4, 5), (2, 5, 5)):
        backend.lib.multi_head_attention(
            x, *good, 2, mask=backend.array(np.ones((2, 4, 5), dtype=bool)))


def test_split_and_merge_heads_errors(backend):
    with raises(ValueError, "split_heads", "d_model 10", "n_head 4"):
        backend.lib.split_heads(z(backend, 3, 10), 4)
    with raises(ValueError, "merge_heads", (4, 5)):
        backend.lib.merge_heads(z(backend, 4, 5))


def test_layer_norm_errors(backend):
    with raises(ValueError, "layer_norm", "gamma", (8,), (7,)):
        backend.lib.layer_norm(z(backend, 2, 8), z(backend, 7), z(backend, 8))
    with raises(ValueError, "layer_norm", "beta", (8,), (9,)):
        backend.lib.layer_norm(z(backend, 2, 8), z(backend, 8), z(backend, 9))


def test_mlp_errors(backend):
    with raises(ValueError, "mlp", "d_ff", (8, 32), (16, 8)):
        backend.lib.mlp(z(backend, 2, 8), z(backend, 8, 32), None, z(backend, 16, 8), None)
    with raises(ValueError, "mlp", "d_model", (2, 4), (8, 32)):
        backend.lib.mlp(z(backend, 2, 4), z(backend, 8, 32), None, z(backend, 32, 8), None)


@pytest.mark.parametrize("name", ["softmax", "gelu", "layer_norm", "linear", "cross_entropy",
                                  "scaled_dot_product_attention"])
def test_integer_input_needs_float(backend, name):
    x = backend.array(np.ones((2, 4)), dtype="int64")
    one = backend.array(np.ones(4))
    args = {
        "softmax": (x,), "gelu": (x,), "layer_norm": (x, one, one),
        "linear": (x, backend.array(np.ones((4, 3)))),
        "cross_entropy": (x, backend.array(np.zeros(2), dtype="int64")),
        "scaled_dot_product_attention": (x, x, x),
    }[name]
    with raises(TypeError, name, "float", "int64"):
        getattr(backend.lib, name)(*args)


def test_token_ids_must_be_integers(backend):
    table = z(backend, 10, 4)
    with raises(TypeError, "embed", "integer", "float64"):
        backend.lib.embed(backend.array([1.0, 2.0]), table)
    with raises(TypeError, "cross_entropy", "integer"):
        backend.lib.cross_entropy(z(backend, 2, 10), backend.array([1.0, 2.0]))


@pytest.mark.parametrize("bad", [10, 12, -1])
def test_token_ids_out_of_range(backend, bad):
    table = z(backend, 10, 4)
    ids = backend.array([[0, 3], [bad, 9]], dtype="int64")
    with raises(ValueError, "embed", f"id {bad}", "vocab 10"):
        backend.lib.embed(ids, table)
    with raises(ValueError, "cross_entropy", f"id {bad}", "vocab 10"):
        backend.lib.cross_entropy(z(backend, 2, 2, 10), ids)
    if bad == -1:  # ignored, so allowed
        backend.lib.cross_entropy(z(backend, 2, 2, 10), ids, ignore_index=-1)


def test_cross_entropy_shape_mismatch(backend):
    with raises(ValueError, "cross_entropy", (2, 5, 10), (2, 4)):
        backend.lib.cross_entropy(z(backend, 2, 5, 10), backend.array(np.zeros((2, 4)), "int64"))


def test_positional_encoding_needs_even_d_model(backend):
    with raises(ValueError, "sinusoidal_positional_encoding", "d_model 7"):
        backend.lib.sinusoidal_positional_encoding(4, 7)


def test_decoder_block_missing_params(backend):
    with raises(KeyError, "decoder_block", "w_fc"):
        backend.lib.decoder_block(z(backend, 2, 8), {"ln1_gamma": z(backend, 8)}, 2)


def test_fused_attention_cannot_return_weights():
    q = torch.zeros(5, 8)
    with raises(ValueError, "scaled_dot_product_attention", "fused"):
        qpt.scaled_dot_product_attention(q, q, q, return_weights=True, fused=True)


def test_sequence_longer_than_context():
    cfg = qpt.GPTConfig(vocab_size=10, context_length=4, n_layer=1, n_head=2, d_model=8)
    model = qpt.GPT(cfg)
    ids = torch.zeros(2, 5, dtype=torch.long)
    with raises(ValueError, "GPT.forward", "context_length 4", (2, 5)):
        model(ids)
    with raises(ValueError, "gpt_forward", "context 4", (2, 5)):
        qnp.gpt_forward(ids.numpy(), model.numpy_params(), n_head=2)
    with raises(ValueError, "GPT.forward", "id 10"):
        model(torch.full((1, 3), 10))


def test_gpt_config_checks_heads():
    with pytest.raises(ValueError, match=re.escape("GPTConfig: n_head")):
        qpt.GPTConfig(vocab_size=10, context_length=4, n_layer=1, n_head=3, d_model=8)


def test_non_array_input():
    with raises(TypeError, "softmax", "list"):
        qnp.softmax([1.0, 2.0])
