"""Chapter 13's exercises: count pairs, apply one merge, encode by rank, decode bytes."""

from collections import Counter, defaultdict

import regex
from grading_meta import Declared, meta_tests, run

from qkv.bpe import GPT2_PATTERN
from qkv.grading import check_bpe_count_pairs, check_bpe_decode, check_bpe_encode, check_bpe_merge

# --- learner-style answers, written independently of qkv.bpe --------------------------------------


def count_pairs(chunks):
    counts = {}
    for ids in chunks:
        for i in range(len(ids) - 1):
            pair = (ids[i], ids[i + 1])
            counts[pair] = counts.get(pair, 0) + 1
    return counts


def count_pairs_counter(chunks):
    return Counter(p for ids in chunks for p in zip(ids, ids[1:], strict=False))


def count_pairs_defaultdict(chunks):
    counts = defaultdict(int)
    for ids in chunks:
        for a, b in zip(ids[:-1], ids[1:], strict=True):
            counts[a, b] += 1
    return dict(counts)


def merge(ids, pair, new_id):
    out, i = [], 0
    while i < len(ids):
        if i + 1 < len(ids) and ids[i] == pair[0] and ids[i + 1] == pair[1]:
            out.append(new_id)
            i += 2
        else:
            out.append(ids[i])
            i += 1
    return out


def merge_skip_flag(ids, pair, new_id):
    out, skip = [], False
    for i, token in enumerate(ids):
        if skip:
            skip = False
            continue
        if i + 1 < len(ids) and (token, ids[i + 1]) == tuple(pair):
            out.append(new_id)
            skip = True
        else:
            out.append(token)
    return out


def encode(text, merges):
    ranks = {tuple(p): r for r, p in enumerate(merges)}
    out = []
    for chunk in regex.findall(GPT2_PATTERN, text):
        ids = list(chunk.encode("utf-8"))
        while len(ids) >= 2:
            pair = min(zip(ids, ids[1:], strict=False), key=lambda p: ranks.get(p, float("inf")))
            if pair not in ranks:
                break
            ids = merge(ids, pair, 256 + ranks[pair])
        out.extend(ids)
    return out


def encode_in_rank_order(text, merges):
    """Every merge in rank order over each chunk: the same result, by a different route."""
    out = []
    for chunk in regex.findall(GPT2_PATTERN, text):
        ids = list(chunk.encode("utf-8"))
        for r, pair in enumerate(merges):
            ids = merge_skip_flag(ids, pair, 256 + r)
        out += ids
    return out


def decode(ids, vocab):
    return b"".join(vocab[i] for i in ids).decode("utf-8", errors="replace")


def decode_bytearray(ids, vocab):
    buf = bytearray()
    for i in ids:
        buf.extend(vocab[i])
    return str(buf, "utf-8", "replace")


# --- the mistakes, as a learner would make them ---------------------------------------------------


def count_across_chunks(chunks):
    flat = [t for ids in chunks for t in ids]
    return count_pairs([flat])


def count_once_per_chunk(chunks):
    counts = {}
    for ids in chunks:
        for pair in set(zip(ids, ids[1:], strict=False)):
            counts[pair] = counts.get(pair, 0) + 1
    return counts


def count_off_by_one(chunks):
    counts = {}
    for ids in chunks:
        for i in range(len(ids) - 2):
            counts[ids[i], ids[i + 1]] = counts.get((ids[i], ids[i + 1]), 0) + 1
    return counts


def count_set_to_one(chunks):
    counts = {}
    for ids in chunks:
        for pair in zip(ids, ids[1:], strict=False):
            counts[pair] = 1
    return counts


def count_lists_as_keys(chunks):
    return {str([a, b]): n for (a, b), n in count_pairs(chunks).items()}


def merge_no_skip(ids, pair, new_id):
    out, i = [], 0
    while i < len(ids):
        if i + 1 < len(ids) and ids[i] == pair[0] and ids[i + 1] == pair[1]:
            out.append(new_id)
        else:
            out.append(ids[i])
        i += 1
    return out


def merge_first_only(ids, pair, new_id):
    for i in range(len(ids) - 1):
        if (ids[i], ids[i + 1]) == tuple(pair):
            return ids[:i] + [new_id] + ids[i + 2:]
    return list(ids)


def merge_drop_last(ids, pair, new_id):
    out, i = [], 0
    while i < len(ids) - 1:
        if ids[i] == pair[0] and ids[i + 1] == pair[1]:
            out.append(new_id)
            i += 2
        else:
            out.append(ids[i])
            i += 1
    return out


def merge_first_token_only(ids, pair, new_id):
    out, i = [], 0
    while i < len(ids):
        if i + 1 < len(ids) and ids[i] == pair[0]:
            out.append(new_id)
            i += 2
        else:
            out.append(ids[i])
            i += 1
    return out


def merge_in_place(ids, pair, new_id):
    i = 0
    while i < len(ids) - 1:
        if ids[i] == pair[0] and ids[i + 1] == pair[1]:
            ids[i:i + 2] = [new_id]
        i += 1
    return ids


def encode_no_chunks(text, merges):
    ranks = {tuple(p): r for r, p in enumerate(merges)}
    ids = list(text.encode("utf-8"))
    while len(ids) >= 2:
        pair = min(zip(ids, ids[1:], strict=False), key=lambda p: ranks.get(p, float("inf")))
        if pair not in ranks:
            break
        ids = merge(ids, pair, 256 + ranks[pair])
    return ids


def encode_leftmost(text, merges):
    ranks = {tuple(p): r for r, p in enumerate(merges)}
    out = []
    for chunk in regex.findall(GPT2_PATTERN, text):
        ids = list(chunk.encode("utf-8"))
        while True:
            hits = [p for p in zip(ids, ids[1:], strict=False) if p in ranks]
            if not hits:
                break
            ids = merge(ids, hits[0], 256 + ranks[hits[0]])
        out += ids
    return out


def encode_code_points(text, merges):
    ranks = {tuple(p): r for r, p in enumerate(merges)}
    out = []
    for chunk in regex.findall(GPT2_PATTERN, text):
        ids = [ord(c) for c in chunk]
        while len(ids) >= 2:
            pair = min(zip(ids, ids[1:], strict=False), key=lambda p: ranks.get(p, float("inf")))
            if pair not in ranks:
                break
            ids = merge(ids, pair, 256 + ranks[pair])
        out += ids
    return out


def encode_rank_as_id(text, merges):
    ranks = {tuple(p): r for r, p in enumerate(merges)}
    out = []
    for chunk in regex.findall(GPT2_PATTERN, text):
        ids = list(chunk.encode("utf-8"))
        while len(ids) >= 2:
            pair = min(zip(ids, ids[1:], strict=False), key=lambda p: ranks.get(p, float("inf")))
            if pair not in ranks:
                break
            ids = merge(ids, pair, ranks[pair])
        out += ids
    return out


def encode_one_merge_per_chunk(text, merges):
    ranks = {tuple(p): r for r, p in enumerate(merges)}
    out = []
    for chunk in regex.findall(GPT2_PATTERN, text):
        ids = list(chunk.encode("utf-8"))
        hits = [p for p in zip(ids, ids[1:], strict=False) if p in ranks]
        if hits:
            pair = min(hits, key=ranks.get)
            ids = merge(ids, pair, 256 + ranks[pair])
        out += ids
    return out


def decode_per_token(ids, vocab):
    return "".join(vocab[i].decode("utf-8", errors="replace") for i in ids)


def decode_ignore(ids, vocab):
    return b"".join(vocab[i] for i in ids).decode("utf-8", errors="ignore")


def decode_strict(ids, vocab):
    return b"".join(vocab[i] for i in ids).decode("utf-8")


DECLARED = [
    Declared(check_bpe_count_pairs, reference=count_pairs, mistakes=[
        (count_across_chunks, "across chunk boundaries"),
        (count_once_per_chunk, "at most once per chunk"),
        (count_off_by_one, "misses the last pair of each chunk"),
        (count_set_to_one, "gives every pair the count 1"),
        (count_lists_as_keys, "each key should be a pair of token ids"),
        (lambda chunks: list(count_pairs(chunks).items()), "it should return a dict"),
    ], alternatives=[count_pairs_counter, count_pairs_defaultdict]),
    Declared(check_bpe_merge, mistakes=[
        (merge_no_skip, "moves on by one token after a merge"),
        (merge_first_only, "only the first occurrence"),
        (merge_drop_last, "drops the last token"),
        (merge_in_place, "changed its input ids"),
        (merge_first_token_only, "without checking that ids[i + 1] == pair[1]"),
    ], alternatives=[merge, merge_skip_flag]),
    Declared(check_bpe_encode, mistakes=[
        (encode_no_chunks, "merges across pre-tokenised chunks"),
        (encode_leftmost, "leftmost pair"),
        (encode_code_points, "code points"),
        (encode_rank_as_id, "gives merge r the id r"),
        (encode_one_merge_per_chunk, "only one merge to each chunk"),
    ], alternatives=[encode, encode_in_rank_order]),
    Declared(check_bpe_decode, mistakes=[
        (decode_per_token, "decodes token by token"),
        (decode_ignore, "errors='ignore'"),
        (decode_strict, ["UnicodeDecodeError", "errors='replace'"]),
    ], alternatives=[decode, decode_bytearray]),
]
globals().update(meta_tests(DECLARED))


def test_the_non_overlapping_count_is_named():
    def count_runs_once(chunks):  # "aaa" read as one (a, a), as a merge would take it
        counts = {}
        for ids in chunks:
            i = 0
            while i < len(ids) - 1:
                counts[ids[i], ids[i + 1]] = counts.get((ids[i], ids[i + 1]), 0) + 1
                i += 2 if ids[i] == ids[i + 1] else 1
        return counts

    message, _, _ = run(check_bpe_count_pairs, count_runs_once)
    assert "holds (7, 7) twice" in message


def test_encode_uses_the_learners_merge_once_written():
    def encode_with_unwritten_merge(text, merges):
        def merge(ids, pair, new_id):
            raise NotImplementedError()
        return merge(list(text.encode()), merges[0], 256)

    message, _, _ = run(check_bpe_encode, encode_with_unwritten_merge)
    assert "it calls merge, which raised NotImplementedError" in message


def test_the_encode_reference_is_qkv_bpe():
    """The checker's reference (built from captured functions) equals qkv.bpe.Tokenizer."""
    import qkv.grading.exercises.ch13_bpe as ch13
    from qkv.bpe import Tokenizer

    for case in ch13.ENCODE.visible() + ch13.ENCODE.hidden():
        text, merges = case.args
        vocab = {i: bytes([i]) for i in range(256)}
        for r, (a, b) in enumerate(merges):
            vocab[256 + r] = vocab[a] + vocab[b]
        tok = Tokenizer(vocab, [(vocab[a], vocab[b]) for a, b in merges])
        assert ch13.ENCODE.reference(text, merges) == tok.encode(text)


def test_counts_may_be_numpy_integers_but_not_bools():
    import numpy as np

    message, _, _ = run(check_bpe_count_pairs,
                        lambda c: {p: np.int64(n) for p, n in count_pairs(c).items()})
    assert message is None
    message, _, _ = run(check_bpe_count_pairs, lambda c: {p: True for p in count_pairs(c)})
    assert "counts are ints" in message
