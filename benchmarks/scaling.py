"""A small scaling-law experiment: final loss against parameters and against compute.

    python -m benchmarks.scaling                 the full protocol (below)
    python -m benchmarks.scaling --reduced       what fits ~15 minutes on a busy 2-core machine
    python -m benchmarks.scaling --out FILE      (default book/data/16-scaling.json)

Protocol: character-level GPTs of increasing width and depth (SIZES) on tiny Shakespeare, each
trained with qkv.train's cpu-small recipe (AdamW, warm-up then cosine) for the same number of
tokens; the validation loss is recorded every ``eval_every`` steps, so each model also gives a
loss-against-compute curve (compute = qkv.flops.flops_per_token x tokens seen). The script
fits two power laws by least squares in log-log space: final loss L(N) = a N^-alpha over the
non-embedding parameters N (Kaplan et al. 2020), and the compute frontier, the lowest loss any
model reached at each compute, L(C) = b C^-beta (the envelope Hoffmann et al. 2022 read their
compute-optimal sizes from). The full protocol trains 6 sizes for 2000 steps each with 20
evaluation batches (about half an hour on one idle core); --reduced trains the same sizes for
800 steps with 8 evaluation batches, and the JSON says which one it ran.
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

BOOK_DATA = Path(__file__).resolve().parent.parent / "book" / "data"  # the chapter plots it

# (n_layer, n_head, d_model): each a bit over twice the non-embedding parameters of the last
SIZES = [(1, 2, 16), (2, 2, 24), (2, 4, 40), (3, 4, 56), (4, 4, 80), (4, 4, 112)]
FULL = dict(sizes=SIZES, steps=2000, eval_every=100, eval_iters=20)
REDUCED = dict(sizes=SIZES, steps=800, eval_every=50, eval_iters=8)
RECIPE = dict(context_length=64, batch_size=16, lr=4e-3, min_lr=1e-4, warmup_steps=40,
              dropout=0.0, sample_tokens=0, device="cpu", seed=1337)


def fit_power_law(xs, ys) -> dict:
    """Least squares of log y = log a - k log x: returns a, k (y = a x^-k) and r^2 in log space."""
    lx = [math.log(x) for x in xs]
    ly = [math.log(y) for y in ys]
    mx, my = sum(lx) / len(lx), sum(ly) / len(ly)
    sxx = sum((x - mx) ** 2 for x in lx)
    sxy = sum((x - mx) * (y - my) for x, y in zip(lx, ly, strict=True))
    slope = sxy / sxx
    intercept = my - slope * mx
    ss_res = sum((y - (intercept + slope * x)) ** 2 for x, y in zip(lx, ly, strict=True))
    ss_tot = sum((y - my) ** 2 for y in ly)
    return dict(a=math.exp(intercept), exponent=-slope, r2=1 - ss_res / ss_tot)


def frontier(points) -> list:
    """(compute, loss) points -> the lowest loss reached at or below each compute, in order."""
    out, best = [], math.inf
    for c, loss in sorted(points):
        if loss < best:
            best = loss
            out.append((c, loss))
    return out


def run(protocol: dict, threads: int) -> dict:
    import torch
    from tqdm.auto import tqdm

    from qkv.flops import count_parameters, flops_per_token
    from qkv.train import load_corpus, make_config, model_config, train

    torch.set_num_threads(threads)
    runs = []
    for n_layer, n_head, d_model in tqdm(protocol["sizes"], desc="model sizes", unit="model"):
        with tempfile.TemporaryDirectory(prefix="qkv-scaling-") as out:
            cfg = make_config("cpu-small", out_dir=out, n_layer=n_layer, n_head=n_head,
                              d_model=d_model, max_steps=protocol["steps"],
                              eval_interval=protocol["eval_every"],
                              eval_iters=protocol["eval_iters"], **RECIPE)
            t0 = time.perf_counter()
            h = train(cfg, progress=False, plot=False, log=lambda *a: None)
            wall = time.perf_counter() - t0
        mcfg = model_config(cfg, vocab_size=load_corpus(cfg)[0].vocab_size)
        n_total = count_parameters(mcfg)
        n_embed = (mcfg.vocab_size + mcfg.context_length) * d_model
        per_token = flops_per_token(mcfg)
        tokens_per_step = cfg.batch_size * cfg.context_length
        evals = [dict(step=s, tokens=s * tokens_per_step, compute=s * tokens_per_step * per_token,
                      train_loss=tr, val_loss=va) for s, tr, va in h["evals"]]
        runs.append(dict(n_layer=n_layer, n_head=n_head, d_model=d_model, params=n_total,
                         non_embedding_params=n_total - n_embed, flops_per_token=per_token,
                         tokens=protocol["steps"] * tokens_per_step,
                         final_val_loss=evals[-1]["val_loss"], wall_s=round(wall, 1),
                         tokens_per_s=round(h["tokens_per_s"]), evals=evals))
    fit_n = fit_power_law([r["non_embedding_params"] for r in runs],
                          [r["final_val_loss"] for r in runs])
    edge = frontier([(e["compute"], e["val_loss"]) for r in runs for e in r["evals"]
                     if e["step"] > 0])
    fit_c = fit_power_law([c for c, _ in edge], [loss for _, loss in edge])
    return dict(runs=runs, fit_params=fit_n, frontier=[list(p) for p in edge], fit_compute=fit_c)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.scaling", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reduced", action="store_true",
                   help="800 steps and 8 evaluation batches instead of 2000 and 20")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    p.add_argument("--out", type=Path, default=BOOK_DATA / "16-scaling.json")
    args = p.parse_args(argv)
    protocol = REDUCED if args.reduced else FULL
    t0 = time.perf_counter()
    result = run(protocol, args.threads)
    result["protocol"] = dict(name="reduced" if args.reduced else "full",
                              sizes=[list(s) for s in protocol["sizes"]],
                              steps=protocol["steps"], eval_every=protocol["eval_every"],
                              eval_iters=protocol["eval_iters"], recipe=RECIPE,
                              full_protocol=dict(FULL, sizes=[list(s) for s in SIZES]))
    result["machine"] = dict(date=datetime.datetime.now().isoformat(timespec="seconds"),
                             cores=os.cpu_count(), threads=args.threads,
                             load_avg_1min=round(os.getloadavg()[0], 2),
                             total_s=round(time.perf_counter() - t0, 1))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    fn, fc = result["fit_params"], result["fit_compute"]
    print(f"{result['protocol']['name']} protocol, {len(result['runs'])} sizes, "
          f"{result['machine']['total_s']:.0f} s: L(N) = {fn['a']:.3g} N^-{fn['exponent']:.3f} "
          f"(r^2 {fn['r2']:.3f}); frontier L(C) = {fc['a']:.3g} C^-{fc['exponent']:.3f} "
          f"(r^2 {fc['r2']:.3f}); JSON: {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
