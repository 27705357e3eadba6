"""Byte-level BPE (qkv.bpe): training time against Hugging Face tokenizers' trainer, and encode
throughput against tiktoken, each pair timed side by side in one process.

Training: vocabulary 1,024 on tiny Shakespeare (the first 200,000 characters in --quick), on
one core: tokenizers runs with TOKENIZERS_PARALLELISM=false. Goal (issue 14): qkv's run in
<= 10 s. Encoding: the last 10% of the corpus, with a tiktoken.Encoding built from qkv's own
ranks (so both produce the same ids; checked here); qkv's chunk cache is emptied before every
call, so neither side gets to remember earlier text.
"""

from __future__ import annotations

import os

from .common import log, time_calls

TARGET_TRAIN_S = 10.0
COLUMNS = ["task", "status", "chars", "qkv_s", "other", "other_s", "qkv_over_other", "qkv_mb_s",
           "other_mb_s", "target_s", "met"]


def _hf_train(text: str, vocab_size: int) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    hf = Tokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    hf.train_from_iterator([text], trainers.BpeTrainer(
        vocab_size=vocab_size, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))


def run(args) -> list[dict]:
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one core, like qkv's pure Python
    import tiktoken

    from qkv.bpe import train_bpe
    from qkv.data import load_text

    section = dict(name="bpe", title="Byte-level BPE (qkv.bpe)", columns=COLUMNS, rows=[],
                   notes=["qkv_over_other > 1: qkv is that many times slower (pure Python "
                          "against Rust)"])
    text = load_text()
    train_text = text[:200_000] if args.quick else text
    log("  bpe: training, vocab 1024, qkv and tokenizers side by side")
    tok = {}

    def ours():
        tok["t"] = train_bpe(train_text, 1024)

    times = time_calls({"qkv": ours, "tokenizers": lambda: _hf_train(train_text, 1024)},
                       warmup=0, repeat=1 if args.quick else 3, budget_s=0)
    q, h = times["qkv"], times["tokenizers"]
    section["rows"].append(dict(task="train vocab 1024", status="ok", chars=len(train_text),
                                qkv_s=q, other="tokenizers", other_s=h, qkv_over_other=q / h,
                                target_s=TARGET_TRAIN_S, met=q <= TARGET_TRAIN_S))
    log("  bpe: encoding, qkv and tiktoken side by side")
    t = tok["t"]
    enc = tiktoken.Encoding("qkv-bench", pat_str=t.pattern, special_tokens={},
                            mergeable_ranks={b: i for i, b in t.vocab.items()})
    held = text[int(len(text) * 0.9):]
    status = "ok" if t.encode(held) == enc.encode_ordinary(held) else "MISMATCH with tiktoken"

    def ours_cold():
        t._cache.clear()
        t.encode(held)

    times = time_calls({"qkv": ours_cold, "tiktoken": lambda: enc.encode_ordinary(held)},
                       repeat=3, budget_s=1.0)
    q, k = times["qkv"], times["tiktoken"]
    mb = len(held.encode("utf-8")) / 1e6
    section["rows"].append(dict(task="encode held-out text", status=status, chars=len(held),
                                qkv_s=q, other="tiktoken", other_s=k, qkv_over_other=q / k,
                                qkv_mb_s=mb / q, other_mb_s=mb / k))
    return [section]
