"""qkv.bpe against tiktoken, Hugging Face tokenizers, a naive trainer written here, and cases
worked by hand. Offline: tiktoken.Encoding and tokenizers' BPE are built from our own merges."""

import itertools
import json
import random
from collections import Counter
from itertools import pairwise
from pathlib import Path

import pytest
import regex

from qkv.bpe import GPT2_PATTERN, Tokenizer, bits_per_byte, count_chunks, train_bpe, train_or_load
from qkv.data import SHARED_COPY
from qkv.tolerances import TOL

EOT = "<|endoftext|>"
# A small corpus written for these tests: English with contractions, numbers, odd spacing,
# French, Greek, Chinese, emoji, and an end token between documents.
SMALL = ("It's the cat's hat, isn't it? We'll see: 12 cats, 345 hats and 6789 bats.\n"
         "  Two  spaces,\ttabs\t\tand\n\n\nnew lines.   \n"
         "Le café est très bon ; où est l'hôtel ? Ελληνικά κείμενα. 你好，世界！今天天气很好。"
         " 🙂🙂 👩‍👩‍👧 ok\x00nul\x07bell" + EOT + "banana bandana banana bandana aaaa aaa\n")
SMALL = SMALL * 3 + "A second document, shorter. " + EOT + "The end."
HELD_OUT = ("What's this? A held-out line: 2024 was a year; 'quoted' words, and\r\n Windows "
            "lines.\n\n  Straße, naïve, façade, 東京, Привет мир, مرحبا, 🤖 robots 🤖!\n" + EOT +
            "   trailing spaces   " + EOT + EOT + "x<|endoftext" + "|>y<|end")


def shakespeare(n_chars: int, start: int = 0) -> str:
    if not SHARED_COPY.is_file():
        pytest.skip(f"tiny Shakespeare not found at {SHARED_COPY}")
    return SHARED_COPY.read_text(encoding="utf-8")[start:start + n_chars]


@pytest.fixture(scope="module")
def tok():
    return train_bpe(SMALL, 256 + 120 + 1, special_tokens=[EOT])


# --- the GPT-2 byte <-> printable character map that Hugging Face's byte-level BPE uses -------

def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's map (Radford et al. 2019): printable bytes stand for themselves, the 68 others
    (control characters, space, ...) for chr(256 + k) in byte order. Written from its
    description, as a second source of truth for the vocab strings tokenizers expects."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    others = [b for b in range(256) if b not in printable]
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + k) for k, b in enumerate(others)}}


B2U = bytes_to_unicode()
U2B = {c: b for b, c in B2U.items()}


def as_unicode(b: bytes) -> str:
    return "".join(B2U[x] for x in b)


def as_bytes(s: str) -> bytes:
    return bytes(U2B[c] for c in s)


def hf_tokenizer(tok: Tokenizer):
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers

    specials = set(tok.special_ids.values())
    vocab = {as_unicode(b): i for i, b in tok.vocab.items() if i not in specials}
    merges = [(as_unicode(a), as_unicode(b)) for a, b in tok.merges]
    hf = HFTokenizer(models.BPE(vocab=vocab, merges=merges))
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    hf.decoder = decoders.ByteLevel()
    hf.add_special_tokens(tok.special_tokens)
    return hf


def tiktoken_encoding(tok: Tokenizer):
    import tiktoken

    specials = set(tok.special_ids.values())
    ranks = {b: i for i, b in tok.vocab.items() if i not in specials}
    return tiktoken.Encoding("qkv-test", pat_str=tok.pattern, mergeable_ranks=ranks,
                             special_tokens=dict(tok.special_ids))


# --- a naive trainer: recount every pair after every merge --------------------------------------

def naive_train(text, n_merges, specials=(), tie_key=lambda pair: (-pair[0], -pair[1])):
    """Sennrich et al.'s loop as plainly as possible: count all adjacent pairs of all chunks,
    take the most frequent (ties: the largest tie_key(pair)), merge it everywhere, repeat."""
    parts = regex.split("(" + "|".join(map(regex.escape, specials)) + ")", text) if specials \
        else [text]
    chunks = Counter()
    for part in parts[::2]:
        chunks.update(regex.findall(GPT2_PATTERN, part))
    words = [[list(c.encode("utf-8")), n] for c, n in chunks.items()]
    vocab = {i: bytes([i]) for i in range(256)}
    merges = []
    for _ in range(n_merges):
        counts = Counter()
        for ids, n in words:
            for pair in pairwise(ids):
                counts[pair] += n
        if not counts:
            break
        best = max(counts, key=lambda p: (counts[p], tie_key(p)))
        new = 256 + len(merges)
        vocab[new] = vocab[best[0]] + vocab[best[1]]
        merges.append((vocab[best[0]], vocab[best[1]]))
        for w in words:
            ids, out, i = w[0], [], 0
            while i < len(ids):
                if ids[i:i + 2] == list(best):
                    out.append(new)
                    i += 2
                else:
                    out.append(ids[i])
                    i += 1
            w[0] = out
    return merges


# --- worked by hand -------------------------------------------------------------------------

def byte_vocab():
    return {i: bytes([i]) for i in range(256)}


def test_encode_by_hand_lowest_rank_not_leftmost():
    # merges: rank 0 (n, a), rank 1 (a, n). "banana" = b a n a n a. The lowest rank is (n, a),
    # not the leftmost mergeable pair (a, n): b a [na] [na], and then no pair is a merge.
    vocab = {**byte_vocab(), 256: b"na", 257: b"an"}
    t = Tokenizer(vocab, [(b"n", b"a"), (b"a", b"n")])
    assert t.encode("banana") == [ord("b"), ord("a"), 256, 256]
    # merges (a, n) then (b, an): b [an] [an] a -> [ban] [an] a
    vocab = {**byte_vocab(), 256: b"an", 257: b"ban"}
    t = Tokenizer(vocab, [(b"a", b"n"), (b"b", b"an")])
    assert t.encode("banana") == [257, 256, ord("a")]
    # overlapping: "aaa" with (a, a) is [aa, a], and "aaaa" is [aa, aa]
    t = Tokenizer({**byte_vocab(), 256: b"aa"}, [(b"a", b"a")])
    assert t.encode("aaa") == [256, ord("a")]
    assert t.encode("aaaa") == [256, 256]
    # merges never cross chunks: " a" and "a a" -> the chunks "a", " a"; (a, space) cannot merge
    t = Tokenizer({**byte_vocab(), 256: b"a "}, [(b"a", b" ")])
    assert t.encode("a a") == [ord("a"), ord(" "), ord("a")]


def test_train_by_hand():
    # "aaabdaaabac" is one chunk. Pairs: aa x4 (overlapping positions count), ab x2, bd, da,
    # ba, ac. Merge 1: (a, a) -> Z: "ZabdZabac". Pairs: Za x2, ab x2, ... ties at 2 between
    # (97, 98) "ab" and (256, 97) "Za": the smaller ids win, so "ab" -> Y: "ZYdZYac".
    # Then (Z, Y) x2 -> X: "XdXac".
    t = train_bpe("aaabdaaabac", 256 + 3)
    assert t.merges == [(b"a", b"a"), (b"a", b"b"), (b"aa", b"ab")]
    assert t.encode("aaabdaaabac") == [258, ord("d"), 258, ord("a"), ord("c")]


def test_pretokenize_gpt2_pattern_by_hand(tok):
    assert tok.pretokenize("Hello world, it's 2024!!  ok\n") == [
        "Hello", " world", ",", " it", "'s", " 2024", "!!", " ", " ok", "\n"]


# --- round trips, decoding, special tokens ---------------------------------------------------

@pytest.mark.parametrize("text", [
    "", "a", "héllo wörld", "東京タワー 你好", "🙂👩‍👩‍👧🏳️‍🌈", "\x00\x01\x02\x7f\x1b[31m",
    "nul\x00in\x00side",
    "tabs\tand\r\nCRLF", "   ", "\n\n\n", "<|endoftext", "ends with " + EOT, EOT * 3])
def test_round_trip(tok, text):
    assert tok.decode(tok.encode(text)) == text


def test_round_trip_random_code_points(tok):
    rng = random.Random(0)
    points = [*range(0, 0xD800), *range(0xE000, 0x110000)]  # every scalar value (no surrogates)
    for _ in range(200):
        s = "".join(chr(rng.choice(points)) for _ in range(rng.randrange(1, 30)))
        assert tok.decode(tok.encode(s)) == s


def test_decode_invalid_utf8_never_raises(tok):
    enc = tiktoken_encoding(tok)
    cases = [[0x80], [0xFF, 0xFE], [0xE4, 0xBD], [0xF0, 0x9F, 0x99], [ord("a"), 0xC3], [0xC3] * 5]
    ids_of = {b: i for i, b in tok.vocab.items()}
    for raw in cases:
        ids = [ids_of[bytes([x])] for x in raw]
        assert tok.decode(ids) == bytes(raw).decode("utf-8", errors="replace")
        assert tok.decode(ids) == enc.decode(ids)  # tiktoken's decode replaces too
    rng = random.Random(1)
    for _ in range(100):
        ids = [rng.randrange(tok.vocab_size) for _ in range(rng.randrange(1, 20))]
        assert tok.decode(ids) == enc.decode(ids)


def test_stream_decode_joins_characters_cut_across_tokens(tok):
    text = "é東🙂 ok 👩‍👩‍👧"
    ids = tok.encode(text)
    pieces = list(tok.stream_decode(ids))
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)
    per_token = "".join(tok.decode([i]) for i in ids)  # the mistake stream_decode avoids
    assert per_token != text


def test_special_tokens_are_one_id_and_never_merged(tok):
    eot = tok.special_ids[EOT]
    ids = tok.encode("a" + EOT + EOT + "b" + EOT)
    assert ids == tok.encode("a") + [eot, eot] + tok.encode("b") + [eot]
    # no merge produces the end token, nor any token holding part of it next to other text
    assert all(EOT.encode() not in tok.vocab[i] for i in tok.vocab if i != eot)
    # specials=False: the same characters are ordinary text, never the special id
    plain = tok.encode(EOT, specials=False)
    assert eot not in plain and tok.decode(plain) == EOT


def test_training_never_merges_across_special_tokens():
    text = ("xy" + EOT) * 50
    t = train_bpe(text, 256 + 30, special_tokens=[EOT])
    assert t.merges == [(b"x", b"y")]  # the only pair left once the end tokens are cut out
    assert t.encode(text) == [256, t.special_ids[EOT]] * 50


# --- against tiktoken and Hugging Face tokenizers ---------------------------------------------

def held_out_texts():
    texts = [HELD_OUT, SMALL[::-1]]
    if SHARED_COPY.is_file():
        texts.append(SHARED_COPY.read_text(encoding="utf-8")[1_000_000:1_020_000])
    return texts


def test_encode_equals_tiktoken(tok):
    enc = tiktoken_encoding(tok)
    for text in held_out_texts():
        assert tok.encode(text) == enc.encode(text, allowed_special="all")
        assert tok.encode(text, specials=False) == enc.encode(text, disallowed_special=())


def test_encode_equals_hf_tokenizers(tok):
    hf = hf_tokenizer(tok)
    for text in held_out_texts():
        ids = tok.encode(text)
        assert ids == hf.encode(text).ids
        assert tok.decode(ids) == hf.decode(ids, skip_special_tokens=False)


def test_shakespeare_tokenizer_equals_tiktoken_and_hf():
    train = shakespeare(60_000)
    t = train_bpe(train, 512, special_tokens=[EOT])
    held = shakespeare(20_000, start=1_050_000) + EOT + HELD_OUT
    assert t.encode(held) == tiktoken_encoding(t).encode(held, allowed_special="all")
    assert t.encode(held) == hf_tokenizer(t).encode(held).ids


# --- training against a naive recount and against tokenizers' trainer -------------------------

def test_incremental_training_equals_naive_recount():
    text = SMALL + "aaaa aaaaaaa abababab " * 3
    t = train_bpe(text, 256 + 150 + 1, special_tokens=[EOT])
    assert t.merges == naive_train(text, 150, specials=[EOT])


def test_incremental_training_equals_naive_recount_shakespeare():
    text = shakespeare(8_000)
    assert train_bpe(text, 256 + 120).merges == naive_train(text, 120)


def hf_train(text, vocab_size):
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import models, pre_tokenizers, trainers

    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False, min_frequency=0,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    hf.train_from_iterator([text], trainer)
    merges = json.loads(hf.to_str())["model"]["merges"]
    return [(as_bytes(a), as_bytes(b)) for a, b in merges]


def hf_tie_key():
    """tokenizers' tie-break: the smallest (left id, right id) in ITS ids, which list the 256
    bytes sorted by their printable stand-ins (GPT-2's order), then the merges in order."""
    byte_rank = {b: r for r, b in enumerate(sorted(range(256), key=lambda b: B2U[b]))}

    def hf_id(i):
        return byte_rank[i] if i < 256 else i

    return lambda pair: (-hf_id(pair[0]), -hf_id(pair[1]))


@pytest.mark.parametrize("source", ["small", "shakespeare"])
def test_training_equals_hf_trainer_where_ties_agree(source):
    text = SMALL.replace(EOT, " ") if source == "small" else shakespeare(40_000)
    n = 150
    ours = train_bpe(text, 256 + n).merges
    theirs = hf_train(text, 256 + n)
    # 1. With tokenizers' tie-break, the naive trainer reproduces tokenizers exactly: the
    #    counting and merging agree, and only the tie-break rule differs.
    assert naive_train(text, n, tie_key=hf_tie_key()) == theirs
    # 2. Ours equals tokenizers up to the first merge where the rules pick different pairs
    #    from a tie; there both pairs have the same count (checked by recounting).
    k = next((i for i, (a, b) in enumerate(zip(ours, theirs, strict=True)) if a != b), None)
    if k is None:
        return
    assert ours[:k] == theirs[:k]
    prefix = Tokenizer({**byte_vocab(), **{256 + i: a + b for i, (a, b) in enumerate(ours[:k])}},
                       ours[:k])
    counts = Counter()
    for chunk, c in count_chunks(text).items():
        ids = prefix.encode_chunk(chunk.decode("utf-8"))
        for p in pairwise(ids):
            counts[tuple(prefix.vocab[i] for i in p)] += c
    assert counts[ours[k]] == counts[theirs[k]] == max(counts.values())
    # the tie is between pairs that GPT-2's byte order sorts differently (e.g. a space)
    assert any(B2U[b] != chr(b) for b in ours[k][0] + ours[k][1] + theirs[k][0] + theirs[k][1])


# --- streaming, saving, bad input ---------------------------------------------------------------

def test_encode_iterable_equals_encode_at_any_cut(tok):
    text = HELD_OUT + " it'll  \n  be 'll fine" + EOT + "ok"
    rng = random.Random(2)
    for _ in range(60):
        cuts = sorted(rng.sample(range(1, len(text)), rng.randrange(1, 25)))
        pieces = [text[i:j] for i, j in zip([0, *cuts], [*cuts, len(text)], strict=True)]
        assert list(tok.encode_iterable(pieces)) == tok.encode(text)
    for cut in range(len(text)):  # every single cut: specials and contractions split in two
        assert list(tok.encode_iterable([text[:cut], text[cut:]])) == tok.encode(text)


def test_encode_iterable_streams_an_endless_input(tok):
    line = "To be, or not to be:\n"
    first = list(itertools.islice(tok.encode_iterable(itertools.cycle([line])), 200))
    assert first == tok.encode(line * 100)[:200]


def test_save_load_round_trip(tok, tmp_path):
    path = tok.save(tmp_path / "tok.json")
    state = json.loads(Path(path).read_text(encoding="utf-8"))
    assert state["format"] == "qkv-bpe" and state["special_tokens"] == [EOT]
    assert bytes.fromhex(state["vocab"]["256"]) == tok.merges[0][0] + tok.merges[0][1]
    loaded = Tokenizer.load(path)
    assert loaded.vocab == tok.vocab and loaded.merges == tok.merges
    assert loaded.encode(HELD_OUT) == tok.encode(HELD_OUT)


def test_train_or_load_caches(tmp_path):
    path = tmp_path / "tok.json"
    a = train_or_load(SMALL, 300, path)
    stamp = path.stat().st_mtime_ns
    b = train_or_load(SMALL, 300, path)  # same text and size: loaded, not retrained
    assert path.stat().st_mtime_ns == stamp and b.merges == a.merges
    c = train_or_load(SMALL, 290, path)  # another size: retrained
    assert len(c.merges) == 290 - 256


def test_bits_per_byte():
    # 4 tokens of 2 bytes at ln 2 nats each: 1 bit per token, 0.5 bit per byte
    assert bits_per_byte(0.6931471805599453, 4, 8) == pytest.approx(0.5, rel=TOL["float64"]["rtol"])


@pytest.mark.parametrize("call, message", [
    (lambda: train_bpe(SMALL, 255), "vocab_size must be an int >= 256"),
    (lambda: train_bpe(SMALL, 256, special_tokens=[EOT]), ">= 256 + 1 special"),
    (lambda: train_bpe(b"bytes", 300), "expected text as a str, got bytes"),
    (lambda: train_bpe(SMALL, 300, special_tokens=[""]), "non-empty str"),
    (lambda: train_bpe(SMALL, 300, special_tokens=EOT), "not one string"),
    (lambda: train_bpe(SMALL, 300, special_tokens=["<|a|>", "<|a|><|b|>"]), "contains another"),
    (lambda: train_bpe(SMALL, 300, special_tokens=["<s>", "<s>"]), "distinct"),
    (lambda: Tokenizer({0: b"a"}, []), "all 256 single bytes"),
    (lambda: Tokenizer(byte_vocab(), [(b"a", b"b")]), "b'ab' is not in the vocab"),
])
def test_bad_input_errors(call, message):
    with pytest.raises(ValueError, match=regex.escape(message)):
        call()


def test_bad_input_to_encode_and_decode(tok, tmp_path):
    with pytest.raises(ValueError, match="expected a str, got list"):
        tok.encode(["a"])
    with pytest.raises(ValueError, match="not in the vocabulary"):
        tok.decode([tok.vocab_size])
    with pytest.raises(FileNotFoundError, match="no tokenizer file"):
        Tokenizer.load(tmp_path / "missing.json")


# --- training a GPT on BPE tokens ----------------------------------------------------------------

def test_train_cli_with_bpe_tokens_and_generate(tmp_path, capsys):
    from qkv import generate as qgenerate
    from qkv import train as qtrain

    corpus = tmp_path / "corpus.txt"
    corpus.write_text(SMALL * 4, encoding="utf-8")
    out = tmp_path / "run"
    argv = ["--data", str(corpus), "--out-dir", str(out), "--tokenizer", "bpe",
            "--vocab-size", "300", "--n-layer", "1", "--n-head", "2", "--d-model", "16",
            "--context-length", "16", "--batch-size", "4", "--max-steps", "6",
            "--eval-interval", "3", "--eval-iters", "1", "--sample-tokens", "20", "--quiet"]
    assert qtrain.main(argv) == 0
    text = corpus.read_text(encoding="utf-8")
    n = int(len(text) * 0.9)
    # the tokenizer was trained on the training split only (recomputed here), and cached
    cached = Tokenizer.load(out / "tokenizer.json")
    assert cached.merges == train_bpe(text[:n], 300).merges != train_bpe(text, 300).merges
    model, tok, ckpt = qtrain.load_checkpoint(out / "ckpt.pt")
    assert isinstance(tok, Tokenizer) and tok.merges == cached.merges
    assert model.config.vocab_size == 300 and ckpt["config"]["tokenizer"] == "bpe"
    capsys.readouterr()
    prompt = "café 你好"
    argv = ["--checkpoint", str(out / "ckpt.pt"), "--prompt", prompt, "--max-new-tokens", "30",
            "--seed", "0", "--temperature", "0"]
    assert qgenerate.main(argv) == 0
    printed = capsys.readouterr().out
    from qkv.pt import generate

    ids = generate(model, tok.encode(prompt), 30, temperature=0.0, seed=0)
    assert printed == tok.decode(ids.tolist()) + "\n"  # streamed pieces join to the decoding


def test_train_rejects_an_unknown_tokenizer_and_a_tiny_vocab(tmp_path, capsys):
    from qkv import train as qtrain

    corpus = tmp_path / "corpus.txt"
    corpus.write_text(SMALL * 4, encoding="utf-8")
    base = ["--data", str(corpus), "--out-dir", str(tmp_path / "o"), "--quiet"]
    assert qtrain.main(base + ["--tokenizer", "words"]) == 2
    assert "unknown tokenizer 'words'; expected char or bpe" in capsys.readouterr().err
    assert qtrain.main(base + ["--tokenizer", "bpe", "--vocab-size", "100"]) == 2
    assert "vocab_size must be an int >= 256" in capsys.readouterr().err


def test_with_merges_is_training_to_a_smaller_vocab():
    text = SMALL * 2
    big = train_bpe(text, 256 + 60 + 1, special_tokens=[EOT])
    small = train_bpe(text, 256 + 25 + 1, special_tokens=[EOT])
    cut = big.with_merges(25)
    assert cut.merges == small.merges
    assert cut.encode(HELD_OUT, specials=False) == tiktoken_encoding(small).encode(
        HELD_OUT, disallowed_special=())


def test_count_pairs_by_hand():
    from qkv.bpe import count_pairs

    assert count_pairs([[1, 1, 1], [1, 2]], weights=[2, 5]) == {(1, 1): 4, (1, 2): 5}


# --- the scripts behind the chapter's numbers ----------------------------------------------------

@pytest.mark.slow
def test_bench_bpe_rows_quick():
    import sys
    from types import SimpleNamespace

    root = str(Path(__file__).resolve().parents[1])
    if root not in sys.path:  # benchmarks/ is a folder of the repository, not a package
        sys.path.insert(0, root)
    if not SHARED_COPY.is_file():
        pytest.skip("the bench trains on tiny Shakespeare")
    from benchmarks import bpe as bench

    (section,) = bench.run(SimpleNamespace(quick=True))
    train, enc = section["rows"]
    assert train["status"] == "ok" and train["qkv_s"] > 0 and train["other_s"] > 0
    assert enc["status"] == "ok"  # qkv's ids equal tiktoken's on the held-out text


def test_exact_bits_per_byte_equals_a_direct_sum():
    import math
    import sys

    import torch

    root = str(Path(__file__).resolve().parents[1])
    if root not in sys.path:
        sys.path.insert(0, root)
    from benchmarks.bpe_vs_char import exact_bits_per_byte

    from qkv.pt import GPT, GPTConfig

    tok = train_bpe(SMALL, 300)
    ids = torch.tensor(tok.encode(SMALL * 2))
    model = GPT(GPTConfig(vocab_size=300, context_length=8, n_layer=1, n_head=2, d_model=16),
                generator=torch.Generator().manual_seed(0))
    got = exact_bits_per_byte(model, tok, ids, context=8, batch=3)
    # direct: every window's targets, one by one, with torch's own cross-entropy
    nats, n_bytes = 0.0, 0
    for start in range(0, len(ids) - 9, 8):
        x, y = ids[start:start + 8], ids[start + 1:start + 9]
        with torch.no_grad():
            logits = model(x[None])[0]
        nats += torch.nn.functional.cross_entropy(logits, y, reduction="sum").item()
        n_bytes += len(tok.decode_bytes(y.tolist()))
    assert got["val_bytes"] == n_bytes
    want = nats / n_bytes / math.log(2)
    assert got["bits_per_byte"] == pytest.approx(want, rel=TOL["float32_model"]["rtol"])
