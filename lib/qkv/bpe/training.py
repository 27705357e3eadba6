"""Training byte-level BPE: count adjacent pairs, merge the most frequent, repeat.

The corpus is cut as the tokenizer cuts it (special tokens out, then the pre-tokenisation
pattern), and each distinct chunk is kept once with its count: tiny Shakespeare's 1.1 MB is
about 300,000 chunks but only about 14,000 distinct ones.

Each merge changes the counts of only the pairs next to it: merging (a, b) into n in "x a b y"
removes (x, a), (a, b), (b, y) and adds (x, n), (n, y). So the trainer keeps

- ``counts``: pair -> how often it occurs, weighted by chunk counts;
- ``where``: pair -> the chunks it may occur in (kept loose: a chunk may have lost the pair);
- ``heap``: (-count, pair) entries, the top one the next merge; stale entries (whose count has
  changed since) are skipped when they reach the top,

and a merge touches only the chunks that hold the pair, never the whole corpus.

Ties: when several pairs share the top count, the one with the smallest (left id, right id)
wins, the ids being the byte values 0..255 and then the merges in order. Hugging Face
``tokenizers`` breaks ties the same way in its own ids, which order the 256 bytes as GPT-2
did (printable characters first), so the two trainers can part at a tie between pairs
involving, say, a space and a letter.
"""

from __future__ import annotations

import hashlib
import heapq
from collections import Counter
from itertools import pairwise
from pathlib import Path

import regex

from .tokenizer import GPT2_PATTERN, Tokenizer, check_special_tokens, merge_pair, split_specials


def count_chunks(text: str, special_tokens=(), pattern: str = GPT2_PATTERN) -> Counter:
    """Counter of the chunks of ``text`` (as bytes), special tokens cut out first."""
    compiled = regex.compile(pattern)
    counts = Counter()
    for k, part in enumerate(split_specials(text, special_tokens)):
        if k % 2 == 0:
            counts.update(compiled.findall(part))
    return Counter({chunk.encode("utf-8"): n for chunk, n in counts.items()})


def count_pairs(chunks, weights=None) -> Counter:
    """Counter of adjacent pairs over ``chunks`` (lists of ids), each chunk counted
    ``weights[k]`` times (default once). Every adjacent position counts: "aaa" holds (a, a)
    twice, as in Sennrich et al.'s and Hugging Face's trainers, although merging it makes one
    "aa"."""
    counts = Counter()
    for k, ids in enumerate(chunks):
        n = 1 if weights is None else weights[k]
        for pair in pairwise(ids):
            counts[pair] += n
    return counts


def train_bpe(text: str, vocab_size: int, special_tokens=(), pattern: str = GPT2_PATTERN, *,
              progress: bool | None = False) -> Tokenizer:
    """Learn vocab_size - 256 - len(special_tokens) merges from ``text``.

    returns: a Tokenizer with ids 0..255 for the bytes, 256.. for the merges in order, and the
        special tokens last. A text too short to hold that many pairs gives fewer merges
        (training stops when no adjacent pair is left).
    progress: a tqdm bar over the merges (None: only when writing to a terminal).
    """
    if not isinstance(text, str):
        raise ValueError(f"train_bpe: expected text as a str, got {type(text).__name__}")
    specials = check_special_tokens(special_tokens)
    if not isinstance(vocab_size, int) or vocab_size < 256 + len(specials):
        raise ValueError(f"train_bpe: vocab_size must be an int >= 256 + {len(specials)} "
                         f"special token(s) = {256 + len(specials)}, got {vocab_size!r}")
    n_merges = vocab_size - 256 - len(specials)
    chunk_counts = count_chunks(text, specials, pattern)
    words = [list(chunk) for chunk in chunk_counts]  # each chunk as ids, bytes to begin with
    freq = list(chunk_counts.values())
    counts, where = count_pairs(words, freq), {}
    for w, ids in enumerate(words):
        for pair in pairwise(ids):
            where.setdefault(pair, set()).add(w)
    heap = [(-c, pair) for pair, c in counts.items()]
    heapq.heapify(heap)

    vocab = {i: bytes([i]) for i in range(256)}
    merges = []
    bar = _bar(n_merges, progress)
    while len(merges) < n_merges and heap:
        neg, pair = heapq.heappop(heap)
        if counts.get(pair, 0) != -neg or neg == 0:
            continue  # stale: this pair's count changed after the entry was pushed
        new_id = 256 + len(merges)
        vocab[new_id] = vocab[pair[0]] + vocab[pair[1]]
        merges.append((vocab[pair[0]], vocab[pair[1]]))
        _apply_merge(pair, new_id, words, freq, counts, where, heap)
        bar.update(1)
    bar.close()
    return Tokenizer(vocab, merges, specials, pattern)


def _apply_merge(pair, new_id, words, freq, counts, where, heap):
    """Merge ``pair`` into ``new_id`` in every chunk that holds it; update only the pairs that
    change, and push their new counts."""
    changed = Counter()
    for w in where.pop(pair, ()):
        ids = words[w]
        if len(ids) < 2:
            continue
        out = merge_pair(ids, pair, new_id)
        if len(out) == len(ids):
            continue  # the loose index: this chunk lost the pair to an earlier merge
        # net change of this chunk's pairs; pairs far from the merge cancel out
        delta = Counter(pairwise(out))
        delta.subtract(Counter(pairwise(ids)))
        for p, d in delta.items():
            if d:
                changed[p] += d * freq[w]
                if d > 0:
                    where.setdefault(p, set()).add(w)
        words[w] = out
    for p, d in changed.items():
        if d:
            counts[p] += d
            if counts[p] > 0:
                heapq.heappush(heap, (-counts[p], p))
            else:
                del counts[p]


def _bar(total: int, progress):
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="merge", desc="train_bpe", disable=not progress
                if progress is not None else None, mininterval=0.5)


def train_or_load(text: str, vocab_size: int, path, special_tokens=(),
                  pattern: str = GPT2_PATTERN, *, progress: bool | None = False) -> Tokenizer:
    """The tokenizer saved at ``path`` if it was trained on this text with these settings,
    else a new one, trained and saved there (training runs use it to cache the tokenizer
    beside their checkpoint)."""
    key = {"sha256": hashlib.sha256(text.encode("utf-8")).hexdigest(),
           "vocab_size": vocab_size, "special_tokens": list(special_tokens), "pattern": pattern}
    path = Path(path)
    if path.is_file():
        tok = Tokenizer.load(path)
        if tok.meta.get("trained_on") == key:
            return tok
    tok = train_bpe(text, vocab_size, special_tokens, pattern, progress=progress)
    tok.meta["trained_on"] = key
    tok.save(path)
    return tok
