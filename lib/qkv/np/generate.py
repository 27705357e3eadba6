"""Generation in NumPy, without a cache: every step re-runs ``qkv.np.gpt_forward`` on the whole
window. The same rules as ``qkv.pt.generate`` (greedy at temperature 0, then temperature ->
top-k -> top-p -> sample, stop after eos_id), so on the same weights the greedy tokens agree.
"""

import numpy as np

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


def generate(params: dict, n_head: int, prompt_ids, max_new_tokens: int,
             temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
             eos_id: int | None = None, seed: int | None = None) -> np.ndarray:
    """Extend a prompt by up to ``max_new_tokens`` tokens with ``gpt_forward``.

    params, n_head: as ``qkv.np.gpt_forward`` takes them (e.g. ``GPT.numpy_params()``).
    prompt_ids: (seq,) ints, at least one.  Others as in ``qkv.pt.generate``; seed seeds
    ``np.random.default_rng`` (so sampled tokens differ from torch's, greedy ones do not).
    returns: (seq + n_new,) int64 array: the prompt, then the new tokens (eos_id included).

    No cache: each step runs the model on the last context tokens (context = rows of wpe).
    """
    ids = [int(i) for i in np.asarray(prompt_ids).reshape(-1)]
    if not ids:
        raise ValueError("generate: prompt_ids is empty; give at least one token")
    if temperature < 0:
        raise ValueError(f"generate: temperature must be >= 0; got {temperature}")
    context = params["wpe"].shape[0]
    rng = np.random.default_rng(seed)
    for _ in range(max_new_tokens):
        logits = gpt_forward(np.array(ids[-context:]), params, n_head)[-1]  # (vocab,)
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
