"""The measurements chapter 17 plots, written to book/data/ (small JSON and NPZ, committed).

    .venv/bin/python scripts/ch17_results.py induction
        trains the two-layer attention-only model on repeated random tokens (seeded; about
        20 s of CPU time) and writes book/data/17-induction.json
    .venv/bin/python -m qkv.train --preset cpu-small --out-dir /tmp/cpu-small
    .venv/bin/python scripts/ch17_results.py shakespeare --checkpoint /tmp/cpu-small/ckpt.pt
        reads the trained cpu-small model (never committed) and writes
        book/data/17-shakespeare.json and book/data/17-attention.npz

Both record the wall time and the CPU time of their work and the machine's load, since the
machine these ran on was shared.
"""

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

from qkv.data import load_text, split
from qkv.pt import GPTConfig, cross_entropy
from qkv.pt.induction import ablation_losses, evaluate, split_losses, train_induction
from qkv.pt.interp import repeated_tokens, run_with_cache, unembed_lens
from qkv.train import load_checkpoint

OUT = Path(__file__).resolve().parent.parent / "book" / "data"

# The induction run: sizes and schedule (see qkv.pt.induction.train_induction).
INDUCTION = dict(model=dict(vocab_size=64, context_length=32, n_layer=2, n_head=4, d_model=64),
                 train=dict(steps=6000, batch_size=16, halves=(6, 16), lr=3e-3, eval_half=11,
                            eval_every=250, seed=0))


def rounded(x, digits=4):
    if isinstance(x, dict):
        return {k: rounded(v, digits) for k, v in x.items()}
    return np.round(np.asarray(x, dtype=np.float64), digits).tolist()


def write(name: str, data: dict) -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / name).write_text(json.dumps(data, indent=1) + "\n")
    print(f"wrote {OUT / name}")


def induction() -> None:
    wall, cpu = time.perf_counter(), time.process_time()
    model, h = train_induction(GPTConfig(**INDUCTION["model"]), **INDUCTION["train"])
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    half = INDUCTION["train"]["eval_half"]
    ids = repeated_tokens(256, half, model.config.vocab_size, torch.Generator().manual_seed(7))
    final = evaluate(model, ids, half)  # fresh sequences, never trained on
    ind, prev = np.array(final["induction"]), np.array(final["previous_token"])
    best_ind = divmod(int(ind.argmax()), ind.shape[1])  # (layer, head)
    best_prev = divmod(int(prev[0].argmax()), prev.shape[1])
    _, cache = run_with_cache(model, ids[:1], names=["blocks.0.attn.pattern",
                                                     "blocks.1.attn.pattern"])
    write("17-induction.json", dict(
        config=INDUCTION, torch_threads=torch.get_num_threads(), load_average=os.getloadavg(),
        wall_s=round(wall, 1), cpu_s=round(cpu, 1), train_step_wall_s=round(h["train_s"], 1),
        history=dict(step=h["step"], first=rounded(h["first"]), repeated=rounded(h["repeated"]),
                     induction=rounded(h["induction"]),
                     previous_token=rounded(h["previous_token"])),
        loss=rounded(split_losses(model(ids).detach(), ids, half)),
        induction=rounded(ind), previous_token=rounded(prev),
        best_induction_head=best_ind, best_previous_token_head=best_prev,
        ablation_zero=rounded(ablation_losses(model, ids, half, "zero")),
        ablation_mean=rounded(ablation_losses(model, ids, half, "mean")),
        example_ids=ids[0].tolist(),
        example_patterns=[rounded(cache[f"blocks.{i}.attn.pattern"][0], 3) for i in range(2)],
    ))


@torch.no_grad()
def shakespeare(checkpoint: str, data: str | None) -> None:
    wall, cpu = time.perf_counter(), time.process_time()
    model, tok, ckpt = load_checkpoint(checkpoint)
    model.eval()
    cfg = model.config
    # Scores on repeated random characters (half = context / 2), and each head ablated.
    half = cfg.context_length // 2
    ids = repeated_tokens(128, half, cfg.vocab_size, torch.Generator().manual_seed(7))
    scores = evaluate(model, ids, half)
    text = load_text(data or ckpt["config"]["data"])
    val = split(torch.tensor(tok.encode(text)))[1]
    # The same on real text: 32 characters of validation text, then the same 32 again.
    g = torch.Generator().manual_seed(5)
    starts = torch.randint(0, len(val) - half, (128,), generator=g).tolist()
    text_ids = torch.stack([val[s:s + half] for s in starts]).repeat(1, 2)
    text_scores = evaluate(model, text_ids, half)
    # Logit lens on validation text: the stream after every block read through ln_f + wte.
    g = torch.Generator().manual_seed(3)
    starts = torch.randint(0, len(val) - cfg.context_length - 1, (64,), generator=g)
    x = torch.stack([val[s:s + cfg.context_length] for s in starts.tolist()])
    y = torch.stack([val[s + 1:s + 1 + cfg.context_length] for s in starts.tolist()])
    logits, cache = run_with_cache(model, x)
    streams = [cache["blocks.0.resid_pre"]] + [cache[f"blocks.{i}.resid_post"]
                                               for i in range(cfg.n_layer)]
    lens_loss = [cross_entropy(unembed_lens(model, s), y).item() for s in streams]
    lens_raw = [cross_entropy(s @ model.transformer.wte.weight.T, y).item() for s in streams]
    # One passage, for the per-position lens table and the attention maps.
    passage = "ROMEO:\nBut soft, what light through yonder window breaks?\nIt is"
    pid = torch.tensor(tok.encode(passage))[None]
    _, pc = run_with_cache(model, pid)
    lens = [unembed_lens(model, s) for s in [pc["blocks.0.resid_pre"]] + [
        pc[f"blocks.{i}.resid_post"] for i in range(cfg.n_layer)]]
    top = [tok.decode(lg[0].argmax(-1).tolist()) for lg in lens]
    target_p = [torch.softmax(lg[0, :-1], -1).gather(-1, pid[0, 1:, None])[:, 0] for lg in lens]
    patterns = np.stack([pc[f"blocks.{i}.attn.pattern"][0].numpy() for i in range(cfg.n_layer)])
    np.savez_compressed(OUT / "17-attention.npz", patterns=patterns.astype(np.float16))
    print(f"wrote {OUT / '17-attention.npz'}")
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    write("17-shakespeare.json", dict(
        model_config=ckpt["model_config"], steps=ckpt["step"],
        final_val_loss=round(ckpt["history"]["evals"][-1][2], 4),
        analysis_wall_s=round(wall, 1), analysis_cpu_s=round(cpu, 1),
        repeated_half=half, loss=rounded(split_losses(model(ids), ids, half)),
        induction=rounded(scores["induction"]), previous_token=rounded(scores["previous_token"]),
        ablation_zero=rounded(ablation_losses(model, ids, half, "zero")),
        text_loss=rounded(split_losses(model(text_ids), text_ids, half)),
        text_induction=rounded(text_scores["induction"]),
        text_previous_token=rounded(text_scores["previous_token"]),
        text_ablation_zero=rounded(ablation_losses(model, text_ids, half, "zero")),
        lens_loss=rounded(lens_loss), lens_loss_without_ln_f=rounded(lens_raw),
        model_loss=round(cross_entropy(logits, y).item(), 4),
        passage=passage, lens_top=top, lens_target_prob=[rounded(p, 3) for p in target_p],
    ))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("part", choices=["induction", "shakespeare"])
    p.add_argument("--checkpoint", help="ckpt.pt of a cpu-small run (part shakespeare)")
    p.add_argument("--data", help="the corpus (default: the one the checkpoint names)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.part == "induction":
        induction()
    elif not args.checkpoint:
        p.error("shakespeare needs --checkpoint")
    else:
        shakespeare(args.checkpoint, args.data)
    return 0


if __name__ == "__main__":
    sys.exit(main())
