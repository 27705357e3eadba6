"""A byte-level BPE tokenizer: text -> UTF-8 bytes -> chunks -> merges applied by rank.

Encoding, in three steps:

1. special tokens (such as ``"<|endoftext|>"``) are cut out of the text first and become one id
   each, so nothing ever splits them or merges across them;
2. the rest is cut into chunks by the pre-tokenisation pattern (GPT-2's by default: words with
   their leading space, numbers, runs of punctuation, whitespace), so merges never cross a chunk;
3. each chunk becomes its UTF-8 bytes, one token per byte, and the merges are applied: again and
   again, the adjacent pair with the lowest merge rank is merged, everywhere in the chunk, until
   no adjacent pair is a merge.

Decoding joins the tokens' bytes and decodes them as UTF-8, replacing invalid bytes with U+FFFD:
a model can emit any sequence of ids, and decoding them must never fail.

The file format (``save`` / ``load``) is one UTF-8 JSON object::

    {"format": "qkv-bpe", "version": 1, "pattern": "<regex>",
     "special_tokens": ["<|endoftext|>", ...],
     "vocab": {"<id>": "<hex of the token's bytes>", ...},
     "merges": [["<hex>", "<hex>"], ...],          # in merge order: rank 0 first
     "meta": {...}}                                 # free-form (what it was trained on)
"""

from __future__ import annotations

import codecs
import json
from itertools import pairwise
from pathlib import Path

import regex

# GPT-2's pre-tokenisation pattern (Radford et al. 2019, encoder.py): English contractions, a
# run of letters / digits / other symbols with at most one leading space, and whitespace
# (a run of spaces keeps its last space for the word that follows it).
GPT2_PATTERN = (r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+"""
                r"""|\s+(?!\S)|\s+""")
FORMAT = "qkv-bpe"
VERSION = 1


def check_special_tokens(special_tokens) -> list[str]:
    """The special tokens as a list, or a ValueError saying what is wrong with them."""
    if isinstance(special_tokens, str):
        raise ValueError(f"special_tokens must be a list of strings, not one string "
                         f"({special_tokens!r}); write [{special_tokens!r}]")
    specials = list(special_tokens)
    for s in specials:
        if not isinstance(s, str) or not s:
            raise ValueError(f"each special token must be a non-empty str, got {s!r}")
    if len(set(specials)) != len(specials):
        raise ValueError(f"special tokens must be distinct, got {specials}")
    for s in specials:
        for t in specials:
            if s != t and s in t:
                raise ValueError(f"special token {t!r} contains another special token {s!r}; "
                                 f"expected no special token inside another")
    return specials


def split_specials(text: str, specials) -> list[str]:
    """[text, special, text, special, ..., text]: the text cut at each special token.

    Odd positions hold the special tokens, even positions the (possibly empty) text between them.
    """
    if not specials:
        return [text]
    alternation = "|".join(regex.escape(s) for s in sorted(specials, key=len, reverse=True))
    return regex.split(f"({alternation})", text)


def merge_pair(ids: list[int], pair: tuple[int, int], new_id: int) -> list[int]:
    """ids with every occurrence of ``pair`` replaced by ``new_id``, left to right
    (so "aaa" with the merge (a, a) becomes [aa, a]: occurrences never overlap)."""
    out, i, n = [], 0, len(ids)
    while i < n:
        if i < n - 1 and ids[i] == pair[0] and ids[i + 1] == pair[1]:
            out.append(new_id)
            i += 2
        else:
            out.append(ids[i])
            i += 1
    return out


class Tokenizer:
    """Byte-level BPE: ``encode(str) -> list[int]``, ``decode(list[int]) -> str``.

    vocab: dict[int, bytes], id -> the token's bytes. It must hold every one of the 256 single
        bytes (so any text can be encoded) and no byte string twice.
    merges: list of (bytes, bytes) in merge order; merge r joins the two tokens into one whose
        bytes (their concatenation) must be in the vocab. Rank r: lower merges first.
    special_tokens: strings encoded as one id each, never split and never merged. A special
        token whose UTF-8 bytes are in the vocab keeps that id; the others get new ids after the
        largest one.
    pattern: the pre-tokenisation regex (``regex`` syntax); merges never cross its matches.
    """

    def __init__(self, vocab: dict[int, bytes], merges, special_tokens=(),
                 pattern: str = GPT2_PATTERN, meta: dict | None = None):
        self.vocab = {int(i): bytes(b) for i, b in vocab.items()}
        self.merges = [(bytes(a), bytes(b)) for a, b in merges]
        self.special_tokens = check_special_tokens(special_tokens)
        self.pattern = pattern
        self.meta = dict(meta or {})
        self._regex = regex.compile(pattern)
        self.ids = {}  # bytes -> id, the inverse of the vocab
        for i, b in self.vocab.items():
            if b in self.ids:
                raise ValueError(f"vocab: ids {self.ids[b]} and {i} both hold {b!r}; expected "
                                 f"each byte string once")
            self.ids[b] = i
        missing = [x for x in range(256) if bytes([x]) not in self.ids]
        if missing:
            raise ValueError(f"vocab: expected all 256 single bytes, {len(missing)} missing "
                             f"(first: {bytes([missing[0]])!r})")
        self.special_ids = {}
        for s in self.special_tokens:
            b = s.encode("utf-8")
            if b not in self.ids:
                i = max(self.vocab) + 1
                self.vocab[i], self.ids[b] = b, i
            self.special_ids[s] = self.ids[b]
        # (left id, right id) -> (rank, id of the merged token)
        self.ranks = {}
        for r, (a, b) in enumerate(self.merges):
            for part in (a, b, a + b):
                if part not in self.ids:
                    raise ValueError(f"merge {r} ({a!r}, {b!r}): {part!r} is not in the vocab")
            if self.ids[a + b] in self.special_ids.values():
                raise ValueError(f"merge {r} ({a!r}, {b!r}) makes a special token; expected "
                                 f"special tokens never to come out of merges")
            self.ranks.setdefault((self.ids[a], self.ids[b]), (r, self.ids[a + b]))
        self._cache = {}  # chunk -> ids; text repeats its words, so this pays off quickly

    @property
    def vocab_size(self) -> int:
        """One more than the largest id (ids need not be contiguous, but here they are)."""
        return max(self.vocab) + 1

    @property
    def eot_id(self) -> int | None:
        """The id of ``"<|endoftext|>"`` if it is a special token, else None."""
        return self.special_ids.get("<|endoftext|>")

    def __repr__(self) -> str:
        return (f"Tokenizer(vocab_size={self.vocab_size}, merges={len(self.merges)}, "
                f"special_tokens={self.special_tokens})")

    def with_merges(self, n: int) -> Tokenizer:
        """The tokenizer of the first ``n`` merges only (special tokens kept). Training is
        greedy, so for a trained tokenizer this is what training to 256 + n tokens gives."""
        merges = self.merges[:n]
        keep = {bytes([x]) for x in range(256)} | {a + b for a, b in merges}
        keep |= {s.encode("utf-8") for s in self.special_tokens}
        vocab = {i: b for i, b in self.vocab.items() if b in keep}
        return Tokenizer(vocab, merges, self.special_tokens, self.pattern)

    # encoding ---------------------------------------------------------------------------------

    def encode_chunk(self, chunk: str) -> list[int]:
        """One pre-tokenised chunk -> ids: its bytes, then the lowest-ranked merge, repeatedly."""
        cached = self._cache.get(chunk)
        if cached is not None:
            return cached
        ids = [self.ids[bytes([x])] for x in chunk.encode("utf-8")]
        none = (float("inf"), None)
        while len(ids) >= 2:
            # the lowest rank among adjacent pairs: not the leftmost pair, not the most common
            pair = min(pairwise(ids), key=lambda p: self.ranks.get(p, none)[0])
            rank, new_id = self.ranks.get(pair, none)
            if new_id is None:
                break
            ids = merge_pair(ids, pair, new_id)
        if len(self._cache) < 100_000:  # bounded: encode_iterable must not grow without end
            self._cache[chunk] = ids
        return ids

    def pretokenize(self, text: str) -> list[str]:
        """The chunks of ``text`` (no special tokens in it) by the pattern."""
        return self._regex.findall(text)

    def encode(self, text: str, *, specials: bool = True) -> list[int]:
        """str -> list of ids.

        specials: True (default) turns each special-token string in ``text`` into its id; False
            encodes them as ordinary text (use it for untrusted text, so a user cannot type the
            end token).
        """
        if not isinstance(text, str):
            raise ValueError(f"encode: expected a str, got {type(text).__name__}")
        out = []
        parts = split_specials(text, self.special_tokens if specials else ())
        for k, part in enumerate(parts):
            if k % 2:
                out.append(self.special_ids[part])
            else:
                for chunk in self._regex.findall(part):
                    out.extend(self.encode_chunk(chunk))
        return out

    def encode_iterable(self, lines):
        """Yield the ids of ``"".join(lines)``, exactly as ``encode`` would, holding only a few
        chunks in memory (``lines``: any iterable of str, such as an open text file).

        A chunk at the end of what has been read so far may still grow ("hel" + "lo"), and one
        before it may still change (with GPT-2's pattern, "'" + "ll" becomes "'ll"), so the last
        two chunks and any possible start of a special token wait for more text.
        """
        buffer = ""
        for line in lines:
            if not isinstance(line, str):
                raise ValueError(f"encode_iterable: expected str items, got "
                                 f"{type(line).__name__}")
            buffer += line
            parts = split_specials(buffer, self.special_tokens)
            for k, part in enumerate(parts[:-1]):
                if k % 2:
                    yield self.special_ids[part]
                else:
                    yield from self.encode(part, specials=False)
            tail = parts[-1]
            hold = len(tail) - self._partial_special(tail)  # where a special token may begin
            spans = [m.span() for m in self._regex.finditer(tail, 0, hold)]
            cut = spans[-2][0] if len(spans) >= 2 else 0
            for start, end in spans[:-2]:
                yield from self.encode_chunk(tail[start:end])
            buffer = tail[cut:]
        yield from self.encode(buffer)

    def _partial_special(self, text: str) -> int:
        """Length of the longest end of ``text`` that is the start of a special token."""
        best = 0
        for s in self.special_tokens:
            for n in range(min(len(s) - 1, len(text)), best, -1):
                if text.endswith(s[:n]):
                    best = n
                    break
        return best

    # decoding ---------------------------------------------------------------------------------

    def decode_bytes(self, ids) -> bytes:
        """ids -> the bytes they stand for (joined first: a character may span tokens)."""
        try:
            return b"".join(self.vocab[int(i)] for i in ids)
        except KeyError as e:
            raise ValueError(f"decode: id {e.args[0]} is not in the vocabulary "
                             f"(ids 0..{self.vocab_size - 1})") from None

    def decode(self, ids) -> str:
        """ids -> str. Bytes that are not valid UTF-8 become U+FFFD; this never raises for ids
        in the vocabulary."""
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def stream_decode(self, ids):
        """Yield text as ids arrive (for printing while generating): bytes of a character cut
        across tokens wait for the rest instead of printing as U+FFFD."""
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        for i in ids:
            text = decoder.decode(self.decode_bytes([i]))
            if text:
                yield text
        tail = decoder.decode(b"", final=True)
        if tail:
            yield tail

    # saving -----------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        """The file format of the module docstring, as a dict of JSON types."""
        return {"format": FORMAT, "version": VERSION, "pattern": self.pattern,
                "special_tokens": list(self.special_tokens),
                "vocab": {str(i): b.hex() for i, b in sorted(self.vocab.items())},
                "merges": [[a.hex(), b.hex()] for a, b in self.merges],
                "meta": self.meta}

    @classmethod
    def from_state_dict(cls, state: dict) -> Tokenizer:
        if state.get("format") != FORMAT or state.get("version") != VERSION:
            raise ValueError(f"not a {FORMAT} version {VERSION} tokenizer: format "
                             f"{state.get('format')!r}, version {state.get('version')!r}")
        vocab = {int(i): bytes.fromhex(h) for i, h in state["vocab"].items()}
        merges = [(bytes.fromhex(a), bytes.fromhex(b)) for a, b in state["merges"]]
        return cls(vocab, merges, state["special_tokens"], state["pattern"],
                   state.get("meta"))

    def save(self, path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(self.state_dict(), indent=1), encoding="utf-8")
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, path) -> Tokenizer:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"Tokenizer.load: no tokenizer file at {path}")
        try:
            state = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise ValueError(f"Tokenizer.load: {path} is not JSON ({e})") from None
        return cls.from_state_dict(state)
