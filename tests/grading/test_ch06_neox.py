"""Chapter 6's layout exercise: GPT-NeoX's interleaved query_key_value to GPT-2's [Q | K | V].
The reference is checked against transformers' own GPT-NeoX attention (a small random layer, no
download), and the page's count of 8,448 matrices against transformers' GPT-NeoX-20B config."""

import numpy as np
import torch
from grading_meta import Declared, meta_tests

import qkv.pt
from qkv.grading import check_neox_to_gpt2_layout
from qkv.grading.exercises._neox_layout import _reference
from qkv.tolerances import TOL


def by_index(w, b, n_head):
    """Gather the columns by their computed positions: kind k of head h sits at (3h + k) d_head."""
    d_head = w.shape[-1] // (3 * n_head)
    idx = np.concatenate([np.arange(d_head) + (3 * h + kind) * d_head
                          for kind in range(3) for h in range(n_head)])
    return w[..., idx], b[idx]


def by_split(w, b, n_head):
    """Cut into heads, then each head into q, k, v, and glue the kinds back together."""
    def convert(a):
        heads = np.split(a, n_head, axis=-1)  # each (..., 3 * d_head): q, k, v of one head
        q, k, v = zip(*(np.split(h, 3, axis=-1) for h in heads), strict=True)
        return np.concatenate(q + k + v, axis=-1)
    return convert(w), convert(b)


def by_torch(w, b, n_head):
    def convert(a):
        lead, width = a.shape[:-1], a.shape[-1]
        return a.reshape(*lead, n_head, 3, width // (3 * n_head)).transpose(-3, -2).reshape(a.shape)
    return convert(w), convert(b)


def _interleave(w, n_head):  # GPT-2 -> NeoX, a learner's wrong direction
    d_head = w.shape[-1] // (3 * n_head)
    return np.swapaxes(w.reshape(*w.shape[:-1], 3, n_head, d_head), -3, -2).reshape(w.shape)


DECLARED = [Declared(
    check_neox_to_gpt2_layout,
    mistakes=[
        (lambda w, b, h: (_interleave(w, h), _interleave(b, h)), "the wrong way"),
        (lambda w, b, h: (w.reshape(w.shape[0], h, 3, -1).reshape(w.shape), b),
         "original order"),
        (lambda w, b, h: (by_index(w, b, h)[0], b), "leaves the bias"),
    ],
    alternatives=[by_index, by_split, by_torch],
)]

globals().update(meta_tests(DECLARED))


def test_reference_matches_transformers_gpt_neox_attention():
    """A random GPT-NeoX attention layer from transformers, with rotary turned into the
    identity (cos = 1, sin = 0), equals qkv.pt's [Q | K | V] attention once its
    query_key_value is converted by the reference; unconverted, it does not."""
    from transformers import GPTNeoXConfig
    from transformers.models.gpt_neox.modeling_gpt_neox import GPTNeoXAttention

    d_model, n_head, seq = 12, 3, 6
    torch.manual_seed(0)
    cfg = GPTNeoXConfig(hidden_size=d_model, num_attention_heads=n_head, num_hidden_layers=1,
                        intermediate_size=4 * d_model, vocab_size=11, max_position_embeddings=16)
    cfg._attn_implementation = "eager"
    attn = GPTNeoXAttention(cfg, layer_idx=0).double().eval()
    x = torch.randn(2, seq, d_model, dtype=torch.float64)
    cos = torch.ones(1, seq, d_model // n_head, dtype=torch.float64)
    sin = torch.zeros(1, seq, d_model // n_head, dtype=torch.float64)
    causal = torch.full((seq, seq), float("-inf"), dtype=torch.float64).triu(1)[None, None]
    with torch.no_grad():
        expected, _ = attn(x, attention_mask=causal, position_embeddings=(cos, sin))
    # nn.Linear stores (out, in); the course's layout is (in, out)
    w = attn.query_key_value.weight.detach().T.numpy()
    b = attn.query_key_value.bias.detach().numpy()
    w_out, b_out = attn.dense.weight.detach().T, attn.dense.bias.detach()

    w_qkv, b_qkv = _reference(w, b, n_head)
    got = qkv.pt.multi_head_attention(x, torch.tensor(w_qkv), torch.tensor(b_qkv), w_out, b_out,
                                      n_head)
    # transformers' eager attention takes its softmax in float32, hence float32's tolerance
    torch.testing.assert_close(got, expected, **TOL["float32_op"])
    unconverted = qkv.pt.multi_head_attention(x, torch.tensor(w), torch.tensor(b), w_out, b_out,
                                              n_head)
    assert (unconverted - expected).abs().max() > 0.1


def test_neox_20b_count_matches_the_config_transformers_ships():
    """Chapter 6 counts 44 layers x 64 heads x 3 = 8,448 matrices of 6144 x 96; transformers'
    GPTNeoXConfig defaults are GPT-NeoX-20B's sizes."""
    from transformers import GPTNeoXConfig

    cfg = GPTNeoXConfig()
    assert (cfg.num_hidden_layers, cfg.num_attention_heads, cfg.hidden_size) == (44, 64, 6144)
    assert cfg.num_hidden_layers * cfg.num_attention_heads * 3 == 8448
    assert cfg.hidden_size // cfg.num_attention_heads == 96
