"""Generating text from a GPT, one token at a time, with or without a KV cache.

Each step turns the model's last logits into a next token:

    logits / temperature  ->  filter_top_k  ->  filter_top_p  ->  softmax  ->  sample
    (temperature == 0: argmax instead, the greedy choice)

The KV cache: attention at a new position needs the keys and values of every earlier position,
and those do not change when a token is appended (the mask keeps earlier positions from seeing
later ones). So we keep them, per layer, in a ``KVCache`` passed to the model's own forward
(``model(ids, kv_cache=cache)``, the forward training uses), and each step runs the model on the
ONE new token: its query (seq_q = 1) attends over all cached keys (seq_k = positions so far).
qkv's causal mask is aligned bottom-right, so ``causal=True`` with seq_q = 1 < seq_k lets the
new token see every key, as it should.
"""

from collections.abc import Iterator

import torch

from qkv._checks import shape_of
from qkv._kv_cache import KVCache

from .softmax import softmax


def filter_top_k(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the k largest logits, set the others to -inf.

    logits: (..., vocab);  k: int >= 1 (k >= vocab keeps everything).
    returns: (..., vocab), a new tensor keeping exactly min(k, vocab) entries per row.
    Ties at the k-th place go to the lower token id, so never more than k are kept.
    """
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"filter_top_k: k must be an integer >= 1; got {k!r}")
    vocab = logits.shape[-1]
    if k >= vocab:
        return logits.clone()
    # A stable descending sort puts equal logits in token-id order: the lower id ranks first.
    order = torch.sort(logits, dim=-1, descending=True, stable=True).indices  # (..., vocab)
    keep = torch.zeros_like(logits, dtype=torch.bool)
    keep.scatter_(-1, order[..., :k], True)
    return logits.masked_fill(~keep, float("-inf"))


def filter_top_p(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Nucleus filtering: keep the smallest set of most likely tokens whose probability
    reaches p; set the other logits to -inf.

    logits: (..., vocab);  p: float in (0, 1] (1 keeps everything).
    returns: (..., vocab). Tokens are taken from the most likely down until their summed
    probability is >= p; the most likely token is always kept. Equal probabilities are taken in
    token-id order (lower id first), so the kept set is the smallest one that reaches p and
    ties at the boundary do not all come in. Sums are floating point: keep p away from a sum
    that lands on it exactly if the result must be exact.
    """
    if not 0.0 < p <= 1.0:
        raise ValueError(f"filter_top_p: p must be in (0, 1]; got {p!r}")
    probs = softmax(logits, axis=-1)  # (..., vocab)
    sorted_probs, order = torch.sort(probs, dim=-1, descending=True, stable=True)
    before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs  # probability of those ranked above
    keep_sorted = before < p  # rank 0 always (before = 0 < p)
    keep = torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)  # back to token order
    return logits.masked_fill(~keep, float("-inf"))


def next_token(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None,
               top_p: float | None = None, generator: torch.Generator | None = None) -> int:
    """Pick the next token from one row of logits (vocab,): greedy if temperature == 0,
    else sample from softmax(filtered logits / temperature)."""
    if temperature == 0:
        return int(torch.argmax(logits))  # the first of equal maxima
    # Sample in float32 at least: bf16 logits are too coarse for the cumulative sums of top-p.
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32)) / temperature
    if top_k is not None:
        logits = filter_top_k(logits, top_k)
    if top_p is not None:
        logits = filter_top_p(logits, top_p)
    probs = softmax(logits, axis=-1)
    return int(torch.multinomial(probs, 1, generator=generator))


def _prompt(prompt_ids) -> torch.Tensor:
    """The prompt as a 1-D long tensor on the CPU."""
    prompt = torch.as_tensor(prompt_ids, dtype=torch.long).cpu()
    if prompt.ndim != 1:
        raise ValueError(f"generate: prompt_ids must be 1-D (seq,); got {shape_of(prompt)}")
    return prompt


def stream(model, prompt_ids, max_new_tokens: int, temperature: float = 1.0,
           top_k: int | None = None, top_p: float | None = None, eos_id: int | None = None,
           seed: int | None = None, use_cache: bool = True) -> Iterator[int]:
    """An iterator over the new token ids, one per step (arguments as in ``generate``).

    The arguments are checked at once, before the first token is asked for.
    """
    ids = _prompt(prompt_ids).tolist()
    if not ids:
        raise ValueError("generate: prompt_ids is empty; give at least one token "
                         "(e.g. a newline or an end-of-text id)")
    if max_new_tokens < 0:
        raise ValueError(f"generate: max_new_tokens must be >= 0; got {max_new_tokens}")
    if temperature < 0:
        raise ValueError(f"generate: temperature must be >= 0; got {temperature}")
    if top_k is not None:
        filter_top_k(torch.zeros(1), top_k)  # raises on a bad k, with filter_top_k's message
    if top_p is not None:
        filter_top_p(torch.zeros(1), top_p)
    return _stream(model, ids, max_new_tokens, temperature, top_k, top_p, eos_id, seed,
                   use_cache)


def _stream(model, ids, max_new_tokens, temperature, top_k, top_p, eos_id, seed, use_cache):
    ctx = model.config.context_length
    device = model.transformer.wte.weight.device
    generator = None if seed is None else torch.Generator(device=device).manual_seed(seed)

    cache = None  # KVCache of the current window's tokens, or None before the first step
    was_training = model.training
    model.eval()  # no dropout while generating
    try:
        for _ in range(max_new_tokens):
            window = ids[-ctx:]  # the model sees at most context_length tokens
            with torch.no_grad():
                if not use_cache:
                    logits = model(torch.tensor(window, device=device))[-1]  # (vocab,)
                elif cache is not None and cache.pos == len(window) - 1:
                    # One new token at the end of a window the cache already holds.
                    new = torch.tensor(window[-1:], device=device)
                    logits = model(new, kv_cache=cache)[-1]
                else:
                    # First step, or the window slid: positions are absolute (learned wpe), so
                    # each kept token now sits one position earlier and its cached keys and
                    # values are stale. Recompute the whole window (this is what the no-cache
                    # path does every step).
                    cache = KVCache(model.config.n_layer)
                    logits = model(torch.tensor(window, device=device), kv_cache=cache)[-1]
            token = next_token(logits, temperature, top_k, top_p, generator)
            ids.append(token)
            yield token
            if eos_id is not None and token == eos_id:
                return
    finally:
        model.train(was_training)


def generate(model, prompt_ids, max_new_tokens: int, temperature: float = 1.0,
             top_k: int | None = None, top_p: float | None = None, eos_id: int | None = None,
             seed: int | None = None, use_cache: bool = True) -> torch.Tensor:
    """Extend a prompt by up to ``max_new_tokens`` tokens.

    model: a qkv.pt GPT (put it on the device and dtype you want; it runs in eval mode here
        and gets its training mode back afterwards).
    prompt_ids: (seq,) token ids (list, tensor or array), at least one.
    temperature: divides the logits; < 1 sharpens, > 1 flattens; 0 means greedy (argmax,
        deterministic; top_k, top_p and seed are then unused).
    top_k: keep only the k most likely tokens (``filter_top_k``); None: no limit.
    top_p: keep the smallest set of most likely tokens with probability >= p
        (``filter_top_p``); None: no limit. Applied after top_k.
    eos_id: stop right after this token is produced; it IS included in the output.
    seed: seeds a private torch.Generator, so equal seeds give equal samples and torch's global
        random state is left alone; None samples from the global generator.
    use_cache: keep each layer's keys and values (KV cache) instead of re-running the model on
        the whole prefix every step; both give the same tokens.
    returns: (seq + n_new,) long tensor on the model's device: the prompt, then the new
        tokens (n_new < max_new_tokens only if eos_id was produced).

    Context: the model sees the last context_length tokens. While the sequence fits, the cache
    grows by one token per step. Once it is longer, the window slides by one token every step;
    positions are learned and absolute, so every kept token changes position, the cache is
    stale, and each step recomputes the whole window, just as use_cache=False does (the cache
    then saves nothing; models with relative positions, like RoPE, can keep it).
    """
    prompt = _prompt(prompt_ids)
    device = model.transformer.wte.weight.device
    new = list(stream(model, prompt, max_new_tokens, temperature, top_k, top_p, eos_id, seed,
                      use_cache))
    return torch.cat([prompt, torch.tensor(new, dtype=torch.long)]).to(device)
