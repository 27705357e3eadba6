"""Train chapter 12's solution model (the learner's code, taken from the solution notebook) and
write what the chapter plots to book/data/ch12_run.json.

    python book/data/ch12_run.py            # about 2 minutes on two CPU cores

It runs the notebook's settings for three seeds (the curves, the checker's validation loss and
the time of each 150-step cell), a deliberately weak run of 300 steps (partial credit), samples
and the lengths of sampled and real speeches (does the model learn where a speech ends?).
"""

import json
import math
import time
from pathlib import Path

import nbformat
import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[2]
NOTEBOOK = ROOT / "solutions" / "12-your-own-gpt" / "your_gpt.ipynb"
OUT = Path(__file__).with_suffix(".json")
ANSWERS = ("gpt-answer", "lr-answer", "eval-answer", "loop-answer", "sample-answer")


def learner_code() -> dict:
    """The solution notebook's answer cells, executed: GPT, lr_at, evaluate, train, sample."""
    nb = nbformat.read(NOTEBOOK, as_version=4)
    namespace = {}
    exec(next(c.source for c in nb.cells if c.id == "setup"), namespace)
    for cell in nb.cells:
        if cell.id in ANSWERS:
            exec(cell.source, namespace)
    return namespace


def one_run(ns, data, seed, max_steps, settings):
    from qkv.grading.exercises._ch12_model import validation_loss
    from qkv.pt import GPTConfig

    tok, train_ids, val_ids, _ = data
    s = dict(settings, max_steps=max_steps)
    config = GPTConfig(vocab_size=tok.vocab_size, context_length=s["context"], n_layer=2,
                       n_head=4, d_model=64)
    torch.manual_seed(seed)
    model = ns["GPT"](config)
    optimizer = ns["make_optimizer"](model, s["lr"], s["weight_decay"])
    gen = torch.Generator().manual_seed(1337 + seed)
    bounds = [max_steps * i // 6 for i in range(7)]
    losses, evals, cell_s = [], [], []
    for a, b in zip(bounds[:-1], bounds[1:], strict=True):
        t0 = time.perf_counter()
        chunk, ev = ns["train"](model, optimizer, train_ids, val_ids, gen, a, b, s)
        cell_s.append(time.perf_counter() - t0)
        losses += chunk
        evals += ev
    return model, dict(seed=seed, max_steps=max_steps, losses=losses, evals=evals,
                       cell_seconds=cell_s, checker_val_loss=validation_loss(model),
                       n_params=sum(p.numel() for p in model.parameters()))


def speech_lengths(ns, model, tok, n, seed):
    gen = torch.Generator().manual_seed(seed)
    texts = []
    for _ in range(n):
        out = ns["sample"](model, [tok.eot_id], 600, 0.8, tok.eot_id, gen)
        texts.append(tok.decode(out[1:]))
    return texts


def rounded(value, digits=4):
    """Floats to 4 decimals (the JSON stays small; the plots cannot show more)."""
    if isinstance(value, float):
        return round(value, digits)
    if isinstance(value, dict):
        return {k: rounded(v, digits) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [rounded(v, digits) for v in value]
    return value


def main():
    from qkv.grading.exercises._ch12_model import course_data

    torch.set_num_threads(1)
    ns = learner_code()
    data = course_data()
    tok, _, val_ids, corpus = data
    settings = dict(batch_size=16, context=64, warmup_steps=50, lr=1e-2, min_lr=1e-3,
                    grad_clip=1.0, weight_decay=0.1, eval_interval=150, eval_batches=8)
    runs, first = [], None
    for seed in (0, 1, 2):
        model, run = one_run(ns, data, seed, 900, settings)
        runs.append(run)
        first = first or model
        print(f"seed {seed}: checker val {run['checker_val_loss']:.3f}, cells "
              f"{[round(t, 1) for t in run['cell_seconds']]} s", flush=True)
    _, weak = one_run(ns, data, 0, 300, settings)
    print(f"weak (300 steps): checker val {weak['checker_val_loss']:.3f}", flush=True)
    samples = speech_lengths(ns, first, tok, 200, 0)
    eot = tok.eot
    real = [len(p) + 1 for p in tok.decode(val_ids.tolist()).split(eot)[1:-1]]
    result = dict(corpus=corpus, settings=settings, runs=runs, weak=weak,
                  samples=[t.replace(eot, "") for t in samples[:6]],
                  sampled_lengths=[len(t) for t in samples],
                  finished=sum(t.endswith(eot) for t in samples), real_lengths=real,
                  torch_version=torch.__version__, threads=1,
                  ln_vocab=math.log(tok.vocab_size))
    OUT.write_text(json.dumps(rounded(result)) + "\n")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
