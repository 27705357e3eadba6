"""Generation in NumPy, through ``qkv.np.gpt_forward`` with or without a KV cache. The same
rules and arguments as ``qkv.pt.generate`` (greedy at temperature 0, then temperature -> top-k
-> top-p -> sample, stop after eos_id), so on the same weights the greedy tokens agree.
"""

import numpy as np

from qkv._checks import shape_of
from qkv._kv_cache import KVCache

from .model import gpt_forward
from .softmax import softmax


def filter_top_k(logits: np.ndarray, k: int) -> np.ndarray:
    """Keep the k largest logits, set the others to -inf (as ``qkv.pt.filter_top_k``).

    logits: (..., vocab) -> (..., vocab). Ties at the k-th place go to the lower token id.
    """
    if isinstance(k, bool) or not isinstance(k, int | np.integer) or k < 1:
        raise ValueError(f"filter_top_k: k must be an integer >= 1; got {k!r}")
    if k >= logits.shape[-1]:
        return logits.copy()
    order = np.argsort(-logits, axis=-1, kind="stable")  # equal logits: lower id first
    keep = np.zeros(logits.shape, dtype=bool)
    np.put_along_axis(keep, order[..., :k], True, axis=-1)
    return np.where(keep, logits, -np.inf)


def filter_top_p(logits: np.ndarray, p: float) -> np.ndarray:
    """Keep the smallest set of most likely tokens whose probability reaches p (as
    ``qkv.pt.filter_top_p``): logits (..., vocab) -> (..., vocab), the rest -inf."""
    if not 0.0 < p <= 1.0:
        raise ValueError(f"filter_top_p: p must be in (0, 1]; got {p!r}")
    probs = softmax(logits, axis=-1)
    order = np.argsort(-probs, axis=-1, kind="stable")
    sorted_probs = np.take_along_axis(probs, order, axis=-1)
    before = np.cumsum(sorted_probs, axis=-1) - sorted_probs  # probability ranked above
    keep = np.zeros(logits.shape, dtype=bool)
    np.put_along_axis(keep, order, before < p, axis=-1)
    return np.where(keep, logits, -np.inf)


def generate(model, prompt_ids, max_new_tokens: int, temperature: float = 1.0,
             top_k: int | None = None, top_p: float | None = None, eos_id: int | None = None,
             seed: int | None = None, use_cache: bool = True) -> np.ndarray:
    """Extend a prompt by up to ``max_new_tokens`` tokens with ``gpt_forward``.

    model: the pair (params, n_head) that ``gpt_forward`` takes, e.g.
        ``(gpt.numpy_params(), gpt.config.n_head)`` for a qkv.pt GPT, or the triple
        (params, n_head, arch) for a model with other pieces (``gpt.config.arch``).
    prompt_ids: (seq,) ints, at least one.  Others as in ``qkv.pt.generate``; seed seeds
        ``np.random.default_rng`` (so sampled tokens differ from torch's, greedy ones do not).
    use_cache: run each new token alone through ``gpt_forward(..., kv_cache=...)`` instead of
        the whole window; both give the same tokens.
    returns: (seq + n_new,) int64 array: the prompt, then the new tokens (eos_id included).

    Context (context = rows of wpe): the model sees the last context tokens; once the sequence
    is longer, the window slides, every kept token changes position, and the cache is rebuilt
    each step, as in ``qkv.pt.generate``. RoPE models have no wpe and so no context here: the
    whole sequence is the window, and the cache is never rebuilt.
    """
    params, n_head, arch = model if len(model) == 3 else (*model, None)
    prompt = np.asarray(prompt_ids)
    if prompt.ndim != 1:
        raise ValueError(f"generate: prompt_ids must be 1-D (seq,); got {shape_of(prompt)}")
    ids = [int(i) for i in prompt]
    if not ids:
        raise ValueError("generate: prompt_ids is empty; give at least one token")
    if max_new_tokens < 0:
        raise ValueError(f"generate: max_new_tokens must be >= 0; got {max_new_tokens}")
    if temperature < 0:
        raise ValueError(f"generate: temperature must be >= 0; got {temperature}")
    if top_k is not None:
        filter_top_k(np.zeros(1), top_k)  # raises on a bad k, with filter_top_k's message
    if top_p is not None:
        filter_top_p(np.zeros(1), top_p)
    context = params["wpe"].shape[0] if "wpe" in params else None
    rng = np.random.default_rng(seed)
    cache = None  # KVCache of the current window's tokens
    for _ in range(max_new_tokens):
        window = ids if context is None else ids[-context:]
        if not use_cache:
            logits = gpt_forward(np.array(window), params, n_head, arch=arch)[-1]  # (vocab,)
        elif cache is not None and cache.pos == len(window) - 1:
            # one new token after a window the cache already holds
            logits = gpt_forward(np.array(window[-1:]), params, n_head, kv_cache=cache,
                                 arch=arch)[-1]
        else:  # first step, or the window slid: the cached positions are stale
            cache = KVCache(len(params["blocks"]))
            logits = gpt_forward(np.array(window), params, n_head, kv_cache=cache, arch=arch)[-1]
        if temperature == 0:
            token = int(np.argmax(logits))  # the first of equal maxima, like torch.argmax
        else:
            logits = logits / temperature
            if top_k is not None:
                logits = filter_top_k(logits, top_k)
            if top_p is not None:
                logits = filter_top_p(logits, top_p)
            probs = softmax(logits, axis=-1)
            token = int(rng.choice(len(probs), p=probs / probs.sum()))
        ids.append(token)
        if eos_id is not None and token == eos_id:
            break
    return np.array(ids, dtype=np.int64)
