"""Byte-level BPE (chapter 13): ``train_bpe`` learns merges from text; ``Tokenizer`` applies them.

    from qkv.bpe import train_bpe
    tok = train_bpe(text, vocab_size=512, special_tokens=["<|endoftext|>"])
    ids = tok.encode("To be, or not to be")      # list of ints
    tok.decode(ids)                               # the text again
    tok.save("tok.json"); Tokenizer.load("tok.json")

Checked token for token against tiktoken and Hugging Face ``tokenizers`` (tests/test_bpe.py).
"""

import math

from .tokenizer import GPT2_PATTERN, Tokenizer, merge_pair, split_specials
from .training import count_chunks, count_pairs, train_bpe, train_or_load

__all__ = ["GPT2_PATTERN", "Tokenizer", "bits_per_byte", "count_chunks", "count_pairs",
           "merge_pair", "split_specials", "train_bpe", "train_or_load"]


def bits_per_byte(loss: float, n_tokens: int, n_bytes: int) -> float:
    """Cross-entropy in bits per byte of text, from a mean loss in nats per token.

    Models with different vocabularies predict different units, so their losses per token do
    not compare; the total information per byte of the same text does:
    loss * n_tokens / (n_bytes * ln 2).
    """
    if n_bytes <= 0 or n_tokens <= 0:
        raise ValueError(f"bits_per_byte: expected positive counts, got n_tokens={n_tokens}, "
                         f"n_bytes={n_bytes}")
    return loss * n_tokens / (n_bytes * math.log(2))
