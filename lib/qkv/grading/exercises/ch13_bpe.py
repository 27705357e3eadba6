"""Chapter 13, byte-level BPE: count adjacent pairs, apply one merge, encode by rank, decode.

The learner's functions work on plain Python values: chunks and ids are lists of ints, a pair
is a tuple of two ints, merges are a list of pairs in rank order (merge r makes token 256 + r)
and the vocabulary is a list of bytes (vocab[i] is token i's bytes). The references are
``qkv.bpe``'s, captured when ``qkv.grading`` is imported.
"""

from itertools import pairwise

import numpy as np
import regex

from qkv.bpe import GPT2_PATTERN, train_bpe
from qkv.bpe import count_pairs as _lib_count_pairs
from qkv.bpe import merge_pair as _lib_merge_pair

from .. import _trusted as _t
from ..engine import Case, Mistake, Spec, _call, _describe, _with_note
from ..exercise import Exercise
from ..kinds import Judged, Value

_PATTERN = regex.compile(GPT2_PATTERN)
_dict_items = dict.items  # the C method: a learner's dict subclass cannot lie through it


def _chunks_of(text: str) -> list:
    return [list(c.encode("utf-8")) for c in _PATTERN.findall(text)]


# --- (a) count pairs --------------------------------------------------------------------------


def _ref_count_pairs(chunks):
    return dict(_lib_count_pairs(chunks))


def _count(pairs_of, chunks):
    counts = {}
    for ids in chunks:
        for p in pairs_of(ids):
            counts[p] = counts.get(p, 0) + 1
    return counts


def _non_overlapping(ids):
    i, out = 0, []
    while i < len(ids) - 1:
        out.append((ids[i], ids[i + 1]))
        i += 2 if ids[i] == ids[i + 1] else 1  # "aaa": one (a, a), as one merge would take
    return out


def _count_pairs_mistakes(chunks):
    yield Mistake(
        "{name} counts pairs across chunk boundaries: the last token of one chunk and the first "
        "of the next are not neighbours (pre-tokenisation keeps merges inside a chunk). Count "
        "inside each chunk on its own.",
        lambda c: _count(lambda ids: list(pairwise(ids)), [[t for ids in c for t in ids]]))
    yield Mistake(
        "{name} counts a run like [7, 7, 7] as one (7, 7); every adjacent position counts, so "
        "it holds (7, 7) twice.", lambda c: _count(_non_overlapping, c))
    yield Mistake(
        "{name} counts each pair at most once per chunk (a set?); a pair that occurs twice in "
        "a chunk counts twice.", lambda c: _count(lambda ids: set(pairwise(ids)), c))
    yield Mistake(
        "{name} misses the last pair of each chunk: the pairs are (ids[i], ids[i + 1]) for i "
        "from 0 to len(ids) - 2 included.",
        lambda c: _count(lambda ids: list(pairwise(ids[:-1])), c))
    yield Mistake(
        "{name} gives every pair the count 1: add one for each occurrence, "
        "counts[pair] = counts.get(pair, 0) + 1, instead of setting it to 1.",
        lambda c: dict.fromkeys((p for ids in c for p in pairwise(ids)), 1))


def _count_pairs_cases(hidden: bool):
    names = ("chunks",)
    if not hidden:
        # [4, 5] ends on a pair found nowhere else: missing the last pair drops a key
        return [Case(([[1, 2, 3, 1, 2], [3, 1], [7, 7, 7], [2], [4, 5]],), names),
                Case((_chunks_of("the cat sat on the mat, the end"),), names,
                     "These chunks are the UTF-8 bytes of a pre-tokenised sentence.")]
    rng = _t.default_rng(1300)
    chunks = [[int(t) for t in rng.integers(0, 4, size=int(n))] for n in rng.integers(0, 7, 6)]
    return [Case((chunks,), names, "Random chunks of small ids, some empty or of one token."),
            Case(([],), names, "No chunks at all: no pairs."),
            Case((_chunks_of("Ça va? 東京 🙂 aaaa"),), names,
                 "Bytes of non-ASCII text, and a run of four equal bytes.")]


def _read_counts(name: str, out, case: Case) -> dict:
    if not _t.isinstance_(out, dict):
        raise AssertionError(f"{name} returned {_t.type_(out).__name__} for {_describe(case)}; "
                             f"it should return a dict mapping each pair (a tuple of two ints) "
                             f"to its count.")
    counts = {}
    for key, value in _dict_items(out):
        if (_t.type_(key) is not tuple or _t.len_(key) != 2
                or not all(_t.type_(k) is int for k in key)):
            raise AssertionError(f"{name} returned a dict with the key {key!r}; each key should "
                                 f"be a pair of token ids, a tuple like (1, 2).")
        if not (_t.type_(value) is int or _t.isinstance_(value, np.integer)):
            raise AssertionError(f"{name} returned the count {value!r} for the pair {key}; "
                                 f"counts are ints.")
        if value:  # a zero count says nothing
            counts[key] = int(value)
    return counts


def _judge_count_pairs(ex, learner, cases) -> None:
    spec = Spec(ex.name, ex.reference, ex.mistakes)
    with _t.pristine():
        for case in cases:
            want = ex.reference(*case.args)
            before = repr(case.args[0])
            got = _read_counts(ex.name, _call(spec, learner, case), case)
            if repr(case.args[0]) != before:
                raise AssertionError(f"{ex.name} changed its input chunks when called with "
                                     f"{_describe(case)}. Leave the inputs alone.")
            if got == want:
                continue
            for mistake in ex.mistakes(*case.args):
                if mistake.fn(*case.args) == got:
                    raise AssertionError(mistake.says.replace("{name}", ex.name))
            missing = sorted(set(want) - set(got))
            extra = sorted(set(got) - set(want))
            wrong = sorted(p for p in set(want) & set(got) if want[p] != got[p])
            if wrong:
                what = (f"the pair {wrong[0]} is counted {got[wrong[0]]} times; expected "
                        f"{want[wrong[0]]}")
            elif missing:
                what = f"the pair {missing[0]} is missing (it occurs {want[missing[0]]} times)"
            else:
                what = f"the pair {extra[0]} is counted but never occurs inside a chunk"
            raise AssertionError(_with_note(f"{ex.name} is wrong for {_describe(case)}: {what}.",
                                            case))


COUNT_PAIRS = Exercise(
    name="count_pairs",
    check="check_bpe_count_pairs",
    reference=_ref_count_pairs,
    visible=lambda: _count_pairs_cases(False),
    hidden=lambda: _count_pairs_cases(True),
    mistakes=_count_pairs_mistakes,
    output=Judged(_judge_count_pairs, "counts every adjacent pair inside each chunk"),
    backends=("numpy",),
    doc="count_pairs(chunks) -> dict {(a, b): count}: every adjacent pair inside each chunk (a "
        "list of lists of ids), never across chunks; [7, 7, 7] holds (7, 7) twice.",
)


# --- (b) apply one merge ------------------------------------------------------------------------


def _merge_variant(ids, pair, new_id, *, step=2, first_only=False, stop=1, reverse=False,
                   half=False):
    if reverse:
        flipped = _merge_variant(ids[::-1], pair[::-1], new_id)
        return flipped[::-1]
    out, i, done = [], 0, False
    while i < len(ids) - (stop - 1):
        if (i < len(ids) - 1 and ids[i] == pair[0] and (half or ids[i + 1] == pair[1])
                and not (first_only and done)):
            out.append(new_id)
            i += step
            done = True
        else:
            out.append(ids[i])
            i += 1
    return out


def _merge_mistakes(ids, pair, new_id):
    yield Mistake(
        "{name} moves on by one token after a merge instead of two, so the second token of a "
        "merged pair is used again: [7, 7, 7] with the pair (7, 7) gives [256, 256, 7] instead "
        "of [256, 7]. Skip both tokens of a pair you merged.",
        lambda i, p, n: _merge_variant(i, p, n, step=1))
    yield Mistake(
        "{name} merges only the first occurrence of the pair; replace every occurrence.",
        lambda i, p, n: _merge_variant(i, p, n, first_only=True))
    yield Mistake(
        "{name} drops the last token when it is not part of a merge: loop while i < len(ids) "
        "and look at ids[i + 1] only when i + 1 < len(ids).",
        lambda i, p, n: _merge_variant(i, p, n, stop=2))
    yield Mistake(
        "{name} scans from the right: in a run like [7, 7, 7] the pairs overlap, and the rule is "
        "to take them left to right, giving [256, 7].",
        lambda i, p, n: _merge_variant(i, p, n, reverse=True))
    yield Mistake(
        "{name} merges wherever ids[i] == pair[0] without checking that ids[i + 1] == pair[1]: "
        "both tokens must match the pair.", lambda i, p, n: _merge_variant(i, p, n, half=True))


def _merge_cases(hidden: bool):
    names = ("ids", "pair", "new_id")
    if not hidden:
        # the 5 followed by 7 is not the pair (5, 6)
        return [Case(([5, 6, 7, 5, 6, 5, 7, 6], (5, 6), 300), names),
                Case(([7, 7, 7, 7, 7], (7, 7), 256), names,
                     "The pair (7, 7) overlaps itself here: merge left to right.")]
    rng = _t.default_rng(1301)
    cases = []
    for n in (1, 12, 30):
        ids = [int(t) for t in rng.integers(0, 3, size=n)]
        cases.append(Case((ids, (int(ids[0]), int(ids[-1])), 256 + n), names,
                          f"Random ids of length {n}."))
    cases.append(Case(([], (1, 2), 256), names, "No ids at all."))
    cases.append(Case(([1, 2, 1, 2], (2, 3), 256), names, "The pair does not occur."))
    return cases


MERGE = Exercise(
    name="merge",
    check="check_bpe_merge",
    reference=lambda ids, pair, new_id: _lib_merge_pair(ids, tuple(pair), new_id),
    visible=lambda: _merge_cases(False),
    hidden=lambda: _merge_cases(True),
    mistakes=_merge_mistakes,
    output=Value("ids"),
    backends=("numpy",),
    doc="merge(ids, pair, new_id) -> list: ids with every occurrence of pair, left to right "
        "and never overlapping, replaced by new_id; ids itself unchanged.",
)


# --- (c) encode by rank -------------------------------------------------------------------------


def _encode_variant(text, merges, *, chunks=True, pick="lowest", units="bytes", first=256,
                    rounds=None, pattern=None):
    ranks = {tuple(p): r for r, p in enumerate(merges)}
    pieces = (pattern or _PATTERN).findall(text) if chunks else [text]
    out = []
    for piece in pieces:
        ids = list(piece.encode("utf-8")) if units == "bytes" else [ord(c) for c in piece]
        done = 0
        while rounds is None or done < rounds:
            done += 1
            found = [p for p in pairwise(ids) if p in ranks]
            if not found:
                break
            if pick == "leftmost":
                pair = found[0]
            elif pick == "highest":
                pair = max(found, key=ranks.get)
            else:
                pair = min(found, key=ranks.get)
            ids = _lib_merge_pair(ids, pair, first + ranks[pair])
        out += ids
    return out


def _ref_encode(text, merges):
    """qkv.bpe's encoding, from functions captured at import (a learner may rebind methods of
    qkv.bpe.Tokenizer; tests/grading/test_ch13_bpe.py checks this equals Tokenizer.encode)."""
    return _encode_variant(text, merges)


def _trained_merges() -> list:
    corpus = ("It's the cat's hat, isn't it? We'll see: 12 cats and 345 hats. Le café est "
              "très bon. 東京 is Tokyo. 🙂🙂 aaaa aaa bandana banana ") * 2
    tok = train_bpe(corpus, 256 + 40)
    return [(tok.ids[x], tok.ids[y]) for x, y in tok.merges]


_HIDDEN_MERGES = _trained_merges()  # learned once, at import, before any learner code runs


def _encode_mistakes(text, merges):
    yield Mistake(
        "{name} merges across pre-tokenised chunks: it ran the merges on the whole text's "
        "bytes. Cut the text with regex.findall(PATTERN, text) first and encode each chunk on "
        "its own, so no merge crosses a chunk boundary.",
        lambda t, m: _encode_variant(t, m, chunks=False))
    yield Mistake(
        "{name} merges the leftmost pair that is a merge; take the pair with the LOWEST rank "
        "(the earliest merge in the list), wherever it is in the chunk.",
        lambda t, m: _encode_variant(t, m, pick="leftmost"))
    yield Mistake(
        "{name} merges the pair with the highest rank first; the lowest rank (the earliest "
        "merge in the list) goes first.", lambda t, m: _encode_variant(t, m, pick="highest"))
    yield Mistake(
        "{name} starts from code points (ord of each character), not UTF-8 bytes: 'é' must "
        "become the two bytes [195, 169]. Use list(chunk.encode('utf-8')).",
        lambda t, m: _encode_variant(t, m, units="chars"))
    yield Mistake(
        "{name} gives merge r the id r; ids 0 to 255 are the bytes, so merge r makes the new "
        "token 256 + r.", lambda t, m: _encode_variant(t, m, first=0))
    yield Mistake(
        "{name} applies only one merge to each chunk; repeat: find the lowest-rank pair again "
        "in the merged chunk, until no adjacent pair is in merges.",
        lambda t, m: _encode_variant(t, m, rounds=1))
    yield Mistake(
        "{name} cuts the text with a simpler pattern of its own (words with their leading "
        "space, as \" ?\\S+\" does): PATTERN also splits letters from digits and punctuation "
        "('cat' and \"'s\", 'café' and '?'). Use regex.findall(PATTERN, text) exactly.",
        lambda t, m: _encode_variant(t, m, pattern=_SIMPLE_WORDS))


_SIMPLE_WORDS = regex.compile(r" ?\S+|\s+")


def _encode_cases(hidden: bool):
    names = ("text", "merges")
    n, a, b, sp, e, t, h = (ord(c) for c in "nab eth")
    if not hidden:
        # (n, a) ranks before (a, n): "banana" is b|a|na|na, not b|an|an|a
        banana = [(n, a), (a, n), (b, a), (sp, b)]
        # (e, space) would join "the" to " cat" if merges crossed chunks
        the = [(e, sp), (t, h), (256 + 1, e), (sp, 256 + 2), (ord("a"), t)]
        return [Case(("banana bandana", banana), names,
                     "Here (110, 97) is merge 0 and (97, 110) merge 1, so 'banana' is "
                     "b|a|na|na: [98, 97, 256, 256]."),
                Case(("the cat ate the hat", the), names,
                     "The merge (101, 32), 'e' + ' ', never applies: 'e' and ' ' are in "
                     "different chunks."),
                Case(("café au lait", [(195, 169), (ord("f"), 256), (ord("a"), ord("u"))]),
                     names, "'é' is two bytes, 195 and 169, which the first merge joins."),
                Case(("it's 2 cats!", [(ord("s"), sp), (t, ord("'")), (ord("s"), ord("!")),
                                        (ord("i"), t)]),
                     names, "PATTERN cuts it|'s| 2| cats|!: the merges (115, 32), 's' + ' ', "
                     "(116, 39), 't' + \"'\", and (115, 33), 's' + '!', never apply.")]
    merges = list(_HIDDEN_MERGES)
    return [Case(("Is that the cat's café? 東京, 12 hats 🙂", merges), names,
                 "40 merges learned from a small text, on new text."),
            Case(("", merges), names, "An empty text has no tokens."),
            Case(("aaaaaaa  bandana", merges), names, "Runs of one letter, two spaces.")]


ENCODE = Exercise(
    name="encode",
    check="check_bpe_encode",
    reference=_ref_encode,
    visible=lambda: _encode_cases(False),
    hidden=lambda: _encode_cases(True),
    mistakes=_encode_mistakes,
    output=Value("ids"),
    backends=("numpy",),
    doc="encode(text, merges) -> list of ids: chunks by PATTERN, each chunk's UTF-8 bytes, then "
        "repeatedly the adjacent pair of lowest rank merged (merge r makes 256 + r).",
)


# --- (d) decode ---------------------------------------------------------------------------------


def _ref_decode(ids, vocab):
    return b"".join(vocab[i] for i in ids).decode("utf-8", errors="replace")


def _decode_mistakes(ids, vocab):
    yield Mistake(
        "{name} decodes token by token: a character whose bytes are split across two tokens "
        "(here 'é', bytes 195 and 169) turns into replacement characters. Join all the bytes "
        "first, then decode once.",
        lambda i, v: "".join(v[k].decode("utf-8", errors="replace") for k in i))
    yield Mistake(
        "{name} drops bytes that are not valid UTF-8 (errors='ignore'); replace them with "
        "U+FFFD so the reader sees that something was there: errors='replace'.",
        lambda i, v: b"".join(v[k] for k in i).decode("utf-8", errors="ignore"))
    yield Mistake(
        "{name} decodes the bytes as Latin-1 (one character per byte); text is UTF-8: "
        ".decode('utf-8', errors='replace').",
        lambda i, v: b"".join(v[k] for k in i).decode("latin-1"))


class _Vocab(list):
    """The vocabulary handed to decode: a plain list of bytes that messages show briefly."""

    def __repr__(self):
        return f"[the 256 bytes, then {', '.join(repr(b) for b in self[256:])}]"


def _vocab_with(merges) -> tuple:
    vocab = [bytes([i]) for i in range(256)]
    for a, b in merges:
        vocab.append(vocab[a] + vocab[b])
    return tuple(vocab)


# 256 = "ca", 257 = "f" + the first byte of "é"; the same bytes objects in every case
_VOCAB = _vocab_with([(ord("c"), ord("a")), (ord("f"), 195)])


def _decode_cases(hidden: bool):
    names = ("ids", "vocab")
    vocab = _Vocab(_VOCAB)  # a fresh list per call: a learner's changes do not carry over
    if not hidden:
        return [Case(([256, 257, 169, 32, 33], vocab), names,
                     "Token 257 ends with the first byte of 'é' and token 169 is its second."),
                Case(([104, 105, 255, 33], vocab), names,
                     "Byte 255 is never valid UTF-8: it must become '\ufffd'.",
                     on_error="Byte 255 is never valid UTF-8: decode with errors='replace' "
                              "so that it becomes '\ufffd' instead of raising.")]
    text = "Ça va? 東京 🙂 ok"
    raw = list(text.encode("utf-8"))
    return [Case((raw, vocab), names, "Every byte of a non-ASCII text, one token each."),
            Case(([], vocab), names, "No ids: the empty string."),
            Case(([0xE6, 0x9D, 33, 0xF0, 0x9F], vocab), names,
                 "Cut-off multi-byte characters in the middle and at the end.")]


DECODE = Exercise(
    name="decode",
    check="check_bpe_decode",
    reference=_ref_decode,
    visible=lambda: _decode_cases(False),
    hidden=lambda: _decode_cases(True),
    mistakes=_decode_mistakes,
    output=Value("text"),
    backends=("numpy",),
    doc="decode(ids, vocab) -> str: the tokens' bytes joined, then decoded as UTF-8 with "
        "invalid bytes replaced by U+FFFD.",
)

EXERCISES = [COUNT_PAIRS, MERGE, ENCODE, DECODE]
