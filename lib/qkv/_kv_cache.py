"""The KV cache, shared by ``qkv.np`` and ``qkv.pt`` (it only holds arrays, never computes).

Attention at a new position needs the keys and values of every earlier position, and those do
not change when a token is appended (the causal mask keeps earlier positions from seeing later
ones). So generation keeps them: the model's own forward takes ``kv_cache=`` and runs only the
new tokens, each block's attention adding their keys and values to its entry and attending over
all of them. One wiring serves training and generation, as in nanochat's ``GPT.forward``.
"""

from qkv._checks import shape_of


class KVCache:
    """Keys and values of the positions a model has already seen, one entry per decoder block.

    n_layer: the number of decoder blocks.
    layers: one dict per block, empty until the block first runs, then
        {"k": (..., n_head, pos, d_head), "v": (..., n_head, pos, d_head)}
        (what ``multi_head_attention(..., kv_cache=layers[i])`` reads and extends).
    pos: how many positions are cached, so the position of the next token; the model's forward
        advances it (the blocks do not know positions).
    """

    def __init__(self, n_layer: int):
        if isinstance(n_layer, bool) or not isinstance(n_layer, int) or n_layer < 0:
            raise ValueError(f"KVCache: n_layer must be an int >= 0; got {n_layer!r}")
        self.layers: list[dict] = [{} for _ in range(n_layer)]
        self.pos = 0

    def __repr__(self) -> str:
        first = self.layers[0] if self.layers else {}
        shape = shape_of(first["k"]) if first else None
        return f"KVCache(n_layer={len(self.layers)}, pos={self.pos}, k of layer 0: {shape})"


def cached_seq(fn: str, kv_cache) -> int:
    """How many positions one layer's cache entry (a dict) holds; 0 when empty.

    TypeError unless the entry is a dict (``KVCache.layers[i]``), so passing the whole KVCache
    to a single block says what to pass instead.
    """
    if not isinstance(kv_cache, dict):
        raise TypeError(f"{fn}: kv_cache must be one layer's entry, a dict such as "
                        f"KVCache(n_layer).layers[i]; got {type(kv_cache).__name__}")
    return kv_cache["k"].shape[-2] if kv_cache else 0


def check_model_cache(fn: str, kv_cache, n_layer: int, seq: int, context: int) -> int:
    """The first position of ``seq`` new tokens run with ``kv_cache`` (a KVCache of n_layer
    entries); ValueError if they would not fit in the context."""
    if not isinstance(kv_cache, KVCache):
        raise TypeError(f"{fn}: kv_cache must be a KVCache (KVCache(n_layer)); "
                        f"got {type(kv_cache).__name__}")
    if len(kv_cache.layers) != n_layer:
        raise ValueError(f"{fn}: kv_cache has {len(kv_cache.layers)} layers; "
                         f"the model has n_layer {n_layer}")
    if kv_cache.pos + seq > context:
        raise ValueError(f"{fn}: {kv_cache.pos} cached + {seq} new positions exceed the "
                         f"context {context}; start a new KVCache on the last {context} tokens")
    return kv_cache.pos
