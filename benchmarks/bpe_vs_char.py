"""Character tokens against byte-level BPE, compared honestly: bits per byte at equal compute.

    python -m benchmarks.bpe_vs_char             # a few minutes on one core; writes the JSON
    python -m benchmarks.bpe_vs_char --steps 50  # a smoke run (numbers meaningless)

Every run trains the same GPT (cpu-small's shape) for the same number of steps on windows of
the same number of tokens, so the compute per step is the same except for the unembedding,
whose width is the vocabulary (recorded as flops_per_step). A BPE token holds several bytes, so
at equal tokens the BPE models read more text per step and see more of it in their context:
that is BPE's advantage, and it is part of the comparison, not a flaw in it.

Losses per token do not compare across vocabularies (a token is a different unit in each), so
each model is scored on the whole validation text in bits per byte: the total cross-entropy of
every validation token it predicts (non-overlapping windows), divided by the bytes those tokens
hold and by ln 2. The tokenizers are trained on the training split only.

The result is committed as book/data/13-char-vs-bpe.json and plotted in chapter 13.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import tempfile
import time
from pathlib import Path

import torch

from qkv import train as qtrain
from qkv.bpe import bits_per_byte
from qkv.pt import cross_entropy, generate

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "book" / "data" / "13-char-vs-bpe.json"
RUNS = [("char", None), ("bpe", 512), ("bpe", 1024)]


def token_bytes(tok, ids) -> int:
    """Bytes of UTF-8 text that the tokens ``ids`` stand for."""
    if hasattr(tok, "vocab"):  # BPE: each token is a byte string
        return sum(len(tok.vocab[int(i)]) for i in ids)
    return sum(len(tok.itos[int(i)].encode("utf-8")) for i in ids)


@torch.no_grad()
def exact_bits_per_byte(model, tok, val_ids, context: int, batch: int = 64) -> dict:
    """Bits per byte over the whole validation split: windows of ``context`` tokens, side by
    side, each predicting its next tokens; every validation token but the first is a target
    once."""
    model.eval()
    starts = list(range(0, len(val_ids) - context - 1, context))
    nats, n_tokens = 0.0, 0
    for k in range(0, len(starts), batch):
        idx = torch.tensor(starts[k:k + batch])[:, None] + torch.arange(context + 1)
        windows = val_ids[idx]  # (batch, context + 1)
        logits = model(windows[:, :-1])  # (batch, context, vocab)
        loss = cross_entropy(logits.float(), windows[:, 1:])
        nats += loss.item() * windows[:, 1:].numel()
        n_tokens += windows[:, 1:].numel()
    targets = val_ids[starts[0] + 1:starts[-1] + context + 1]
    n_bytes = token_bytes(tok, targets)
    assert len(targets) == n_tokens
    return dict(val_loss_per_token=nats / n_tokens, val_tokens=n_tokens, val_bytes=n_bytes,
                bits_per_byte=bits_per_byte(nats / n_tokens, n_tokens, n_bytes))


def flops_per_step(cfg, vocab: int) -> int:
    """6 N per token (forward and backward, Kaplan et al. 2020) with N the weights a token
    passes through: the blocks and the unembedding (the embedding is a lookup)."""
    per_block = 12 * cfg.d_model ** 2
    n = cfg.n_layer * per_block + cfg.d_model * vocab
    return 6 * n * cfg.batch_size * cfg.context_length


def one_run(kind: str, vocab_size, steps: int, data) -> dict:
    with tempfile.TemporaryDirectory(prefix="qkv-bpe-vs-char-") as out_dir:
        cfg = qtrain.make_config("cpu-small", data=data, out_dir=out_dir, tokenizer=kind,
                                 vocab_size=vocab_size, max_steps=steps,
                                 eval_interval=max(10, steps // 10), sample_tokens=0)
        t0 = time.perf_counter()
        tok, train_ids, val_ids, _ = qtrain.load_corpus(cfg)  # trains (and caches) the BPE
        tokenizer_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        result = qtrain.train(cfg, progress=False, plot=False, log=lambda m: None)
        wall = time.perf_counter() - t0
        model, tok, _ = qtrain.load_checkpoint(Path(out_dir) / "ckpt.pt")
    val_bytes_per_token = token_bytes(tok, val_ids) / len(val_ids)
    exact = exact_bits_per_byte(model, tok, val_ids, cfg.context_length)
    start = tok.encode("\n")
    sample = tok.decode(generate(model, start, 60, temperature=0.8, seed=0).tolist())
    ln2 = math.log(2)
    return dict(
        tokenizer=kind, vocab_size=tok.vocab_size, steps=steps, train_s=result["train_s"],
        wall_s=wall, tokenizer_s=tokenizer_s, flops_per_step=flops_per_step(cfg, tok.vocab_size),
        train_tokens=len(train_ids), val_bytes_per_token=val_bytes_per_token,
        bytes_per_step=cfg.batch_size * cfg.context_length * val_bytes_per_token,
        # the evaluations on fixed random windows, turned into bits per byte with the
        # validation text's mean bytes per token
        curve=[dict(step=s, train_loss=tr, val_loss=va,
                    val_bits_per_byte=va / ln2 / val_bytes_per_token)
               for s, tr, va in result["evals"]],
        sample=sample, **exact)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.bpe_vs_char", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=600, help="optimizer steps per run")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    p.add_argument("--data", default=None, help="corpus (default: as python -m qkv.train)")
    p.add_argument("--out", type=Path, default=OUT)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    runs = []
    for kind, vocab in RUNS:
        row = one_run(kind, vocab, args.steps, args.data)
        print(f"{kind:>4} vocab {row['vocab_size']:>5}: {row['bits_per_byte']:.3f} bits/byte, "
              f"{row['val_loss_per_token']:.3f} nats/token, {row['val_bytes_per_token']:.2f} "
              f"bytes/token, {row['train_s']:.0f} s training", flush=True)
        runs.append(row)
    char, cfg = runs[0], qtrain.make_config("cpu-small")
    for row in runs[1:]:
        print(f"  {row['tokenizer']} {row['vocab_size']}: bits/byte ratio to char "
              f"{row['bits_per_byte'] / char['bits_per_byte']:.3f}, flops/step ratio "
              f"{row['flops_per_step'] / char['flops_per_step']:.3f}")
    meta = dict(date=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
                threads=args.threads, load_avg_1min=round(os.getloadavg()[0], 2),
                torch=torch.__version__, steps=args.steps,
                model={k: getattr(cfg, k) for k in ("n_layer", "n_head", "d_model",
                                                     "context_length", "batch_size", "lr")})
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(dict(meta=meta, runs=runs), indent=1) + "\n",
                        encoding="utf-8")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
