"""qkv.data: finding and checking the corpus, the character tokenizer, the split, the batches."""

import hashlib
import string

import numpy as np
import pytest
import torch

import qkv.data as qdata
from qkv.data import CharTokenizer, corpus_path, download, get_batch, load_text, split

TEXT = string.ascii_letters  # 52 distinct characters: every window occurs exactly once


@pytest.fixture
def no_shared_copy(monkeypatch, tmp_path):
    """Pretend ../shared/data is absent and send downloads to a temporary cache."""
    monkeypatch.setattr(qdata, "SHARED_COPY", tmp_path / "absent" / "tinyshakespeare.txt")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv(qdata.ENV_VAR, raising=False)


# ----- batches -----------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["torch", "numpy"])
def test_y_is_x_shifted_by_one_in_the_raw_text(kind):
    tok = CharTokenizer.from_text(TEXT)
    ids = tok.encode(TEXT)
    if kind == "torch":
        data, gen = torch.tensor(ids), torch.Generator().manual_seed(0)
    else:
        data, gen = np.array(ids), np.random.default_rng(0)
    x, y = get_batch(data, 16, 7, gen)
    assert tuple(x.shape) == tuple(y.shape) == (16, 7)
    for xb, yb in zip(x.tolist(), y.tolist(), strict=True):
        xs, ys = tok.decode(xb), tok.decode(yb)
        i = TEXT.index(xs)  # where this window starts in the text
        assert ys == TEXT[i + 1:i + 8], (xs, ys)


def test_batch_offsets_cover_exactly_the_valid_range():
    data = torch.arange(12)  # windows of 5 (+1 for y) start at 0 .. 6
    gen = torch.Generator().manual_seed(1)
    starts = set()
    for _ in range(200):
        x, y = get_batch(data, 4, 5, gen)
        assert (y == x + 1).all()  # data[i] = i, so y is x plus one
        assert int(y.max()) <= 11 and int(x.min()) >= 0
        starts |= set(x[:, 0].tolist())
    assert starts == set(range(7))


def test_batches_are_deterministic_with_a_generator():
    data = torch.arange(1000)
    a = get_batch(data, 8, 16, torch.Generator().manual_seed(5))
    b = get_batch(data, 8, 16, torch.Generator().manual_seed(5))
    c = get_batch(data, 8, 16, torch.Generator().manual_seed(6))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])
    n1 = get_batch(np.arange(1000), 8, 16, np.random.default_rng(5))
    n2 = get_batch(np.arange(1000), 8, 16, np.random.default_rng(5))
    assert np.array_equal(n1[0], n2[0]) and np.array_equal(n1[1], n2[1])


def test_batch_needs_context_plus_one_tokens():
    with pytest.raises(ValueError) as info:
        get_batch(torch.arange(8), 2, 8, torch.Generator())
    assert str(info.value) == ("get_batch: data has 8 tokens; a window of context 8 needs at "
                               "least context + 1 = 9")
    x, y = get_batch(torch.arange(9), 2, 8, torch.Generator())  # exactly enough
    assert torch.equal(x[0], torch.arange(8)) and torch.equal(y[0], torch.arange(1, 9))


# ----- tokenizer and split -----------------------------------------------------------------

def test_tokenizer_round_trip_and_vocab():
    text = "To be, or not to be:\nthat is the question. Ça va? ✓"
    tok = CharTokenizer.from_text(text)
    assert tok.chars == "".join(sorted(set(text)))
    assert tok.vocab_size == len(set(text)) and tok.eot_id is None
    ids = tok.encode(text)
    assert len(ids) == len(text) and max(ids) < tok.vocab_size
    assert tok.decode(ids) == text
    assert tok.decode(torch.tensor(ids)) == text  # tensors decode too
    again = CharTokenizer.from_state_dict(tok.state_dict())
    assert again.encode(text) == ids


def test_tokenizer_unknown_character():
    tok = CharTokenizer.from_text("abc")
    with pytest.raises(ValueError) as info:
        tok.encode("abz!")
    assert str(info.value) == "CharTokenizer.encode: characters not in the vocabulary: '!z'"


def test_tokenizer_end_of_text_token():
    eot = "<|endoftext|>"
    tok = CharTokenizer.from_text(f"ab{eot}ba{eot}", eot=eot)
    assert tok.chars == "ab"  # the marker is one token, not five characters
    assert tok.vocab_size == 3 and tok.eot_id == 2
    ids = tok.encode(f"ab{eot}b")
    assert ids == [0, 1, 2, 1]
    assert tok.decode(ids) == f"ab{eot}b"
    assert CharTokenizer.from_state_dict(tok.state_dict()).eot_id == 2


def test_split_sizes_and_order():
    train, val = split(list(range(100)))
    assert (len(train), len(val)) == (90, 10)
    assert train + val == list(range(100))  # contiguous, in order
    t, v = split(torch.arange(1_115_394))
    assert (len(t), len(v)) == (1_003_854, 111_540)


# ----- finding and loading the corpus ------------------------------------------------------

def test_missing_corpus(tmp_path):
    path = tmp_path / "nope.txt"
    with pytest.raises(FileNotFoundError) as info:
        load_text(path)
    assert str(info.value) == f"corpus_path: corpus not found: {path}"


def test_empty_corpus(tmp_path):
    path = tmp_path / "empty.txt"
    path.write_text("")
    with pytest.raises(ValueError) as info:
        load_text(path)
    assert str(info.value) == f"load_text: corpus is empty: {path}"


def test_path_then_environment_variable(tmp_path, monkeypatch, no_shared_copy):
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text("from the argument")
    b.write_text("from the environment")
    monkeypatch.setenv("QKV_DATA", str(b))
    assert load_text(a) == "from the argument"
    assert load_text() == "from the environment"
    monkeypatch.setenv("QKV_DATA", str(tmp_path / "gone.txt"))
    with pytest.raises(FileNotFoundError) as info:
        corpus_path(fetch=_no_network)
    gone = tmp_path / "gone.txt"
    assert str(info.value) == f"corpus_path: corpus not found: {gone} (from $QKV_DATA)"


def _no_network(url):
    raise AssertionError(f"tests must not download ({url})")


def test_shared_copy_before_download(tmp_path, monkeypatch, no_shared_copy):
    shared = tmp_path / "shared.txt"
    shared.write_text("shared text")
    monkeypatch.setattr(qdata, "SHARED_COPY", shared)
    assert corpus_path(fetch=_no_network) == shared


def test_download_via_file_url_checks_sha256_and_caches(tmp_path, no_shared_copy):
    source = tmp_path / "remote.txt"
    source.write_bytes(b"First Citizen:\nBefore we proceed any further, hear me speak.\n")
    digest = hashlib.sha256(source.read_bytes()).hexdigest()
    path = corpus_path(url=source.as_uri(), sha256=digest)  # file:// through urllib
    assert path == tmp_path / "cache" / "qkv" / "tinyshakespeare.txt"
    assert path.read_bytes() == source.read_bytes()
    # Cached: a second call reads the file and fetches nothing.
    assert corpus_path(url=source.as_uri(), sha256=digest, fetch=_no_network) == path


def test_download_with_a_wrong_checksum_is_an_error(tmp_path, no_shared_copy):
    source = tmp_path / "tampered.txt"
    source.write_bytes(b"not the real corpus")
    got = hashlib.sha256(b"not the real corpus").hexdigest()
    url = source.as_uri()
    with pytest.raises(ValueError) as info:
        corpus_path(url=url)  # expects tiny-Shakespeare's sha256
    assert str(info.value) == (f"download: sha256 mismatch for {url}: expected "
                               f"{qdata.SHAKESPEARE_SHA256}, got {got}")
    assert not (tmp_path / "cache").exists()  # nothing cached, not even a partial file
    calls = []
    with pytest.raises(ValueError):
        download("https://example.invalid/x", tmp_path / "x.txt", "0" * 64,
                 fetch=lambda u: calls.append(u) or b"bytes")
    assert calls == ["https://example.invalid/x"] and not (tmp_path / "x.txt").exists()


@pytest.mark.skipif(not qdata.SHARED_COPY.is_file(), reason="../shared/data is not present")
def test_the_shared_copy_is_tiny_shakespeare():
    assert qdata.sha256_of(qdata.SHARED_COPY) == qdata.SHAKESPEARE_SHA256


def test_mark_ends_hand_worked():
    from qkv.data import CharTokenizer, mark_ends

    text = "A:\nhi.\n\nB:\nyo.\n\n\nC:\nok.\n"
    marked = mark_ends(text, eot="<E>")
    assert marked == "A:\nhi.\n<E>B:\nyo.\n<E>C:\nok.\n<E>"
    tok = CharTokenizer.from_text(marked, eot="<E>")
    ids = tok.encode(marked)
    assert ids.count(tok.eot_id) == 3 and tok.decode(ids) == marked


def test_builtin_text_is_seeded_play_text():
    from qkv.data import builtin_text

    a, b = builtin_text(n_lines=40), builtin_text(n_lines=40)
    assert a == b and a != builtin_text(n_lines=40, seed=1)
    speakers = [line[:-1] for line in a.split("\n") if line.endswith(":")]
    assert len(speakers) == 10 and set(speakers) <= {"ANNA", "BERT", "CORA", "DUNCAN"}
    assert a.count("\n\n") == 9  # a blank line between two speeches


def test_course_text_prefers_the_corpus_and_never_downloads(tmp_path, monkeypatch):
    import qkv.data as data

    corpus = tmp_path / "c.txt"
    corpus.write_text("to be or not\n")
    monkeypatch.setenv("QKV_DATA", str(corpus))
    assert data.course_text() == ("to be or not\n", "tiny Shakespeare")
    monkeypatch.delenv("QKV_DATA")
    monkeypatch.setattr(data, "SHARED_COPY", tmp_path / "absent.txt")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    text, name = data.course_text()  # no file anywhere: the grammar text, no download
    assert name == "builtin grammar" and text == data.builtin_text()
