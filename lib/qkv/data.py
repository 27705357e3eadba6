"""The training corpus: find it, read it, turn it into token ids, cut it into batches.

Where the text comes from (``corpus_path``), first match wins:

1. the ``path`` argument (the ``--data`` flag of ``python -m qkv.train``);
2. the environment variable ``QKV_DATA``;
3. ``../shared/data/tinyshakespeare.txt`` beside the repository, when it is there;
4. the public tiny-Shakespeare copy, downloaded once into ``~/.cache/qkv`` (or
   ``$XDG_CACHE_HOME/qkv``) and checked against its sha256; a wrong checksum is an error.

Tokens are characters (``CharTokenizer``). ``split`` keeps the first 90% of the ids for training
and the rest for validation, and ``get_batch`` cuts random windows of (x, y) with y = x moved
one token to the left: position t of y is the token that follows position t of x.
"""

import hashlib
import os
import urllib.request
from pathlib import Path

import numpy as np
import torch

SHAKESPEARE_URL = ("https://raw.githubusercontent.com/karpathy/char-rnn/master/"
                   "data/tinyshakespeare/input.txt")
SHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
SHAKESPEARE_NAME = "tinyshakespeare.txt"
ENV_VAR = "QKV_DATA"
# lib/qkv/data.py -> the repository root is two folders up; the shared data sits beside it.
SHARED_COPY = Path(__file__).resolve().parents[2].parent / "shared" / "data" / SHAKESPEARE_NAME


def cache_dir() -> Path:
    """Where downloads go: $XDG_CACHE_HOME/qkv, else ~/.cache/qkv."""
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "qkv"


def sha256_of(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _fetch(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=60) as response:  # file:// works too (tests)
        return response.read()


def download(url: str, dest, sha256: str, fetch=_fetch) -> Path:
    """Fetch ``url`` into ``dest`` unless it is already there; check its sha256.

    The bytes are checked before they are written, and written under a temporary name then
    renamed, so ``dest`` only ever holds a verified file. ``fetch(url) -> bytes`` can be
    replaced (tests pass one that reads a local file).
    """
    dest = Path(dest)
    if dest.exists():
        return dest
    data = fetch(url)
    got = hashlib.sha256(data).hexdigest()
    if got != sha256:
        raise ValueError(f"download: sha256 mismatch for {url}: expected {sha256}, got {got}")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + ".part")
    tmp.write_bytes(data)
    tmp.replace(dest)
    return dest


def corpus_path(path=None, *, url: str = SHAKESPEARE_URL, sha256: str = SHAKESPEARE_SHA256,
                fetch=_fetch) -> Path:
    """The corpus file to use: ``path``, else $QKV_DATA, else the shared copy, else a download.

    A ``path`` (or $QKV_DATA) that does not exist is an error, never a reason to download.
    """
    if path is None and os.environ.get(ENV_VAR):
        path = os.environ[ENV_VAR]
        if not Path(path).is_file():
            raise FileNotFoundError(f"corpus_path: corpus not found: {path} (from ${ENV_VAR})")
    if path is not None:
        if not Path(path).is_file():
            raise FileNotFoundError(f"corpus_path: corpus not found: {path}")
        return Path(path)
    if SHARED_COPY.is_file():
        return SHARED_COPY
    return download(url, cache_dir() / SHAKESPEARE_NAME, sha256, fetch=fetch)


def load_text(path=None, **kwargs) -> str:
    """The corpus as one string (UTF-8). ``path`` and ``kwargs`` as in ``corpus_path``."""
    path = corpus_path(path, **kwargs)
    text = path.read_text(encoding="utf-8")
    if not text:
        raise ValueError(f"load_text: corpus is empty: {path}")
    return text


class CharTokenizer:
    """One token per character; the vocabulary is the sorted set of characters in a text.

    eot: an optional end-of-text marker such as ``"<|endoftext|>"``. It gets the last id
    (``eot_id``); ``encode`` turns each occurrence of the marker string into that one id, and
    ``decode`` turns the id back into the marker. A model learns to emit it where a text ends,
    and generation can stop there (``eos_id=tokenizer.eot_id``).
    """

    def __init__(self, chars, eot: str | None = None):
        self.chars = "".join(chars)
        if len(set(self.chars)) != len(self.chars):
            raise ValueError("CharTokenizer: chars must be distinct")
        self.eot = eot
        self.itos = list(self.chars) + ([eot] if eot is not None else [])
        self.stoi = {c: i for i, c in enumerate(self.chars)}

    @classmethod
    def from_text(cls, text: str, eot: str | None = None) -> "CharTokenizer":
        """The vocabulary of ``text``: its characters sorted (the eot marker is not split up)."""
        pieces = text.split(eot) if eot else [text]
        return cls(sorted(set("".join(pieces))), eot=eot)

    @property
    def vocab_size(self) -> int:
        return len(self.itos)

    @property
    def eot_id(self) -> int | None:
        return len(self.chars) if self.eot is not None else None

    def _encode_plain(self, text: str) -> list[int]:
        try:
            return [self.stoi[c] for c in text]
        except KeyError:
            unknown = sorted(set(text) - set(self.stoi))
            raise ValueError(f"CharTokenizer.encode: characters not in the vocabulary: "
                             f"{''.join(unknown)!r}") from None

    def encode(self, text: str) -> list[int]:
        """str -> list of ids in [0, vocab_size)."""
        if not self.eot:
            return self._encode_plain(text)
        ids = []
        for i, piece in enumerate(text.split(self.eot)):
            if i:
                ids.append(self.eot_id)
            ids += self._encode_plain(piece)
        return ids

    def decode(self, ids) -> str:
        """ids (any iterable of ints, a list or a 1-D tensor/array) -> str."""
        return "".join(self.itos[int(i)] for i in ids)

    def state_dict(self) -> dict:
        """Enough to rebuild the tokenizer (saved in checkpoints)."""
        return {"chars": self.chars, "eot": self.eot}

    @classmethod
    def from_state_dict(cls, state: dict) -> "CharTokenizer":
        return cls(state["chars"], eot=state["eot"])


def split(ids, train_fraction: float = 0.9):
    """(train, val): the first ``train_fraction`` of ``ids`` and the rest, in order.

    Contiguous, not shuffled: validation text is text the model never saw, not just windows
    it never saw (neighbouring windows overlap almost entirely).
    """
    n = int(len(ids) * train_fraction)
    return ids[:n], ids[n:]


def get_batch(data, batch: int, context: int, generator, device=None):
    """``batch`` random windows of ``context`` tokens and their next tokens.

    data: (n_tokens,) token ids, a torch tensor (then ``generator`` is a torch.Generator) or a
        NumPy array (then ``generator`` is a np.random.Generator).
    returns: x, y, each (batch, context) of the same kind as data: a window starting at offset
        i is x[b] = data[i : i+context] and y[b] = data[i+1 : i+context+1], so y[b, t] is the
        token that follows x[b, t]. Offsets are uniform in [0, n_tokens - context - 1].
    device: torch only, where to put x and y (None: data's device).
    """
    n = len(data)
    if n < context + 1:
        raise ValueError(f"get_batch: data has {n} tokens; a window of context {context} "
                         f"needs at least context + 1 = {context + 1}")
    if isinstance(data, np.ndarray):
        starts = generator.integers(0, n - context, size=batch)  # (batch,)
        windows = data[starts[:, None] + np.arange(context + 1)]  # (batch, context + 1)
        return windows[:, :-1], windows[:, 1:]
    starts = torch.randint(n - context, (batch,), generator=generator)  # (batch,)
    index = starts[:, None] + torch.arange(context + 1)  # (batch, context + 1)
    windows = data[index.to(data.device)]  # (batch, context + 1)
    x, y = windows[:, :-1], windows[:, 1:]
    if device is not None:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
    return x, y


# --- A corpus that never needs the network, and documents with an end token --------------------

EOT = "<|endoftext|>"


def builtin_text(n_lines: int = 12000, seed: int = 0) -> str:
    """A stand-in corpus (about 390,000 characters) from a tiny grammar of play-like lines.

    Used where tiny Shakespeare is absent and nothing may be downloaded (the book's build, the
    exercises): speeches of three or four sentences under a speaker's name, separated by blank
    lines, like the real corpus but with 8 subjects, 8 verbs and 7 objects, so it is far easier
    to predict.
    """
    rng = np.random.default_rng(seed)
    who = ["the king", "my lord", "the queen", "a soldier", "the fool", "your brother", "she",
           "he"]
    verb = ["loves", "fears", "remembers", "betrays", "forgives", "follows", "defends", "mocks"]
    what = ["the crown", "his honour", "the sea", "our house", "the night", "her father", "me"]
    how = ["", " tonight", " in secret", " for ever", " with a sword", " at dawn"]
    names = ["ANNA", "BERT", "CORA", "DUNCAN"]
    lines = []
    for i in range(n_lines):
        if i % 4 == 0:
            lines.append("\n" + rng.choice(names) + ":")
        s = " ".join([rng.choice(who), rng.choice(verb), rng.choice(what)]) + rng.choice(how)
        lines.append(s[0].upper() + s[1:] + rng.choice([".", ",", "!", "?", ";"]))
    return "\n".join(lines) + "\n"


def _no_download(url):
    raise OSError(f"not downloading {url}: offline")


def local_corpus() -> Path | None:
    """The tiny Shakespeare file this machine has ($QKV_DATA, ../shared/data or the download
    cache), or None. Never downloads. The grader hands it to its sandboxed kernels, which see
    neither the caller's environment nor folders outside the course."""
    try:
        return corpus_path(fetch=_no_download).resolve()
    except (OSError, ValueError):
        return None


def course_text() -> tuple[str, str]:
    """(text, name): tiny Shakespeare if it is here ($QKV_DATA, ../shared/data or the download
    cache), else ``builtin_text()``. Never downloads. name is "tiny Shakespeare" or
    "builtin grammar"."""
    try:
        return load_text(fetch=_no_download), "tiny Shakespeare"
    except (OSError, ValueError):
        return builtin_text(), "builtin grammar"


def mark_ends(text: str, eot: str = EOT) -> str:
    """The text as documents that each end with ``eot``: every blank line (a paragraph break,
    between two speeches of a play) becomes one line break followed by the marker, and the text
    ends with it too. A model trained on the result learns where a speech ends, and generation
    can stop there (``CharTokenizer.from_text(marked, eot=eot).eot_id``)."""
    paragraphs = [p.strip("\n") for p in text.split("\n\n")]
    return "".join(p + "\n" + eot for p in paragraphs if p)
