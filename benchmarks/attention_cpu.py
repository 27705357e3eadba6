"""qkv.np against qkv.pt on the CPU, float32, same shapes and same weights.

Three operations: multi_head_attention, one decoder_block, and the whole-model forward
(qkv.np.gpt_forward against qkv.pt.GPT), each with PyTorch's naive path (the one the book teaches)
and its fused path (torch's scaled_dot_product_attention). The measurement runs in a child
process whose BLAS/OpenMP thread counts are fixed before NumPy and PyTorch are imported.

    python -m benchmarks.attention_cpu --threads 1 [--quick]    (the child, printing JSON)
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from functools import partial

from .common import ROOT, fit_exponent, log, thread_env

OPS = ("attention", "block", "model")
VOCAB = 65  # the character vocabulary of tinyshakespeare, as in the course's models
TARGET = 1.5  # NumPy within 1.5x of PyTorch for the whole model at d_model >= 256


def sizes(quick: bool) -> dict:
    if quick:
        return dict(d_models=(128, 256), seqs=(64, 128), batch=1, n_layer=2, repeat=3,
                    budget_s=0.1)
    return dict(d_models=(128, 256, 512), seqs=(64, 256, 1024), batch=1, n_layer=2, repeat=7,
                budget_s=1.0)


def measure(quick: bool, threads: int) -> list[dict]:
    """Runs in the child: one row per (op, d_model, T) with the three median times."""
    import numpy as np
    import torch

    import qkv.pt as qpt

    from .common import time_calls

    torch.set_num_threads(threads)
    cfg = sizes(quick)
    rows = []
    for d_model in cfg["d_models"]:
        n_head = max(1, d_model // 64)  # d_head 64, as in GPT-2
        for seq in cfg["seqs"]:
            log(f"  attention-cpu: d_model {d_model}, T {seq}")
            model = qpt.GPT(qpt.GPTConfig(vocab_size=VOCAB, context_length=seq,
                                          n_layer=cfg["n_layer"], n_head=n_head, d_model=d_model),
                            generator=torch.Generator().manual_seed(0)).eval()
            rng = np.random.default_rng(0)
            ids = rng.integers(0, VOCAB, size=(cfg["batch"], seq))  # (batch, seq)
            x = rng.standard_normal((cfg["batch"], seq, d_model)).astype(np.float32)
            with torch.inference_mode():
                for op, (np_fn, pt_fn) in _cases(model, ids, x).items():
                    ref = pt_fn(True).numpy()
                    out = np_fn()
                    if out.dtype != np.float32:
                        raise AssertionError(f"qkv.np {op} returned {out.dtype} for float32 input")
                    t = time_calls({"numpy": np_fn, "torch_naive": partial(pt_fn, False),
                                    "torch_fused": partial(pt_fn, True)},
                                   repeat=cfg["repeat"], budget_s=cfg["budget_s"])
                    rows.append(dict(op=op, d_model=d_model, n_head=n_head, T=seq,
                                     batch=cfg["batch"],
                                     n_layer=cfg["n_layer"] if op == "model" else None,
                                     numpy_ms=1e3 * t["numpy"],
                                     torch_naive_ms=1e3 * t["torch_naive"],
                                     torch_fused_ms=1e3 * t["torch_fused"],
                                     np_over_naive=t["numpy"] / t["torch_naive"],
                                     np_over_fused=t["numpy"] / t["torch_fused"],
                                     max_abs_diff=float(np.abs(out - ref).max())))
    return rows


def _cases(model, ids, x) -> dict:
    """op -> (qkv.np call, qkv.pt call taking fused), on the same float32 weights and inputs.

    model: a qkv.pt.GPT; ids (batch, seq) token ids; x (batch, seq, d_model) float32 input of
    the attention and the block (the model's first block's weights).
    """
    import torch

    import qkv.np as qnp
    import qkv.pt as qpt

    n_head = model.config.n_head
    params = _float32(model.numpy_params())
    ids_t, x_t = torch.from_numpy(ids), torch.from_numpy(x)
    bp, bp_t = params["blocks"][0], model.transformer.h[0].params()
    attn = [bp[k] for k in ("w_qkv", "b_qkv", "w_out", "b_out")]
    attn_t = [bp_t[k] for k in ("w_qkv", "b_qkv", "w_out", "b_out")]

    def gpt(fused):
        model.config.fused = fused  # read at every call by the attention and the blocks
        return model(ids_t)

    return {
        "attention": (lambda: qnp.multi_head_attention(x, *attn, n_head),
                      lambda fused: qpt.multi_head_attention(x_t, *attn_t, n_head, fused=fused)),
        "block": (lambda: qnp.decoder_block(x, bp, n_head),
                  lambda fused: qpt.decoder_block(x_t, bp_t, n_head, fused=fused)),
        "model": (lambda: qnp.gpt_forward(ids, params, n_head), gpt),
    }


def _float32(params):
    """GPT.numpy_params() is float64: the same weights as float32 NumPy arrays."""
    if isinstance(params, dict):
        return {k: _float32(v) for k, v in params.items()}
    if isinstance(params, list):
        return [_float32(v) for v in params]
    return params.astype("float32")


def run(args) -> list[dict]:
    """Runs the child with fixed threads, then adds the exponents and the 1.5x verdict."""
    threads = args.attention_threads
    cmd = [sys.executable, "-m", "benchmarks.attention_cpu", "--threads", str(threads)]
    proc = subprocess.run(cmd + (["--quick"] if args.quick else []), cwd=ROOT,
                          env=thread_env(threads), stdout=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited with {proc.returncode}")
    rows = json.loads(proc.stdout)
    columns = ["op", "d_model", "n_head", "T", "numpy_ms", "torch_naive_ms", "torch_fused_ms",
               "np_over_naive", "np_over_fused", "max_abs_diff"]
    sections = [dict(name="attention-cpu",
                     title=f"Attention, CPU: qkv.np / qkv.pt, float32, batch {rows[0]['batch']}, "
                           f"{threads} thread(s), model = {rows[-1]['n_layer']} layers, "
                           f"vocab {VOCAB}",
                     columns=columns, rows=rows, notes=[])]

    exps = []
    for op in OPS:
        for d_model in sorted({r["d_model"] for r in rows}):
            sel = sorted((r for r in rows if r["op"] == op and r["d_model"] == d_model),
                         key=lambda r: r["T"])
            ts = [r["T"] for r in sel]
            exps.append(dict(op=op, d_model=d_model, T_range=f"{ts[0]}-{ts[-1]}",
                             **{f"{impl}_exponent": fit_exponent(ts, [r[f"{impl}_ms"] for r in sel])
                                for impl in ("numpy", "torch_naive", "torch_fused")}))
    sections.append(dict(name="attention-cpu-exponents",
                         title="Attention, CPU: time ~ T^exponent (log-log least squares)",
                         columns=["op", "d_model", "T_range", "numpy_exponent",
                                  "torch_naive_exponent", "torch_fused_exponent"],
                         rows=exps, notes=[]))

    judged = [r for r in rows if r["op"] == "model" and r["d_model"] >= 256]
    worst_fused = max(r["np_over_fused"] for r in judged)
    worst_naive = max(r["np_over_naive"] for r in judged)
    verdict = "MET" if worst_fused <= TARGET else "NOT MET"
    sections[0]["notes"].append(
        f"target NumPy <= {TARGET}x PyTorch, whole model, d_model >= 256: {verdict} "
        f"(worst NumPy/PyTorch-fused {worst_fused:.2f}x, NumPy/PyTorch-naive {worst_naive:.2f}x)")
    sections[0]["target"] = dict(ratio=TARGET, met=worst_fused <= TARGET,
                                 worst_np_over_fused=worst_fused,
                                 worst_np_over_naive=worst_naive)
    return sections


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--threads", type=int, required=True)
    p.add_argument("--quick", action="store_true")
    a = p.parse_args(argv)
    print(json.dumps(measure(a.quick, a.threads)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
