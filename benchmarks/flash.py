"""Fast attention (chapter 15): tiled against naive, on the CPU in NumPy and on a GPU in Triton.

flash-cpu: qkv.np.flash_attention against qkv.np.scaled_dot_product_attention, float32, no mask,
    time and peak memory (tracemalloc, beyond the inputs) against T, with log-log fitted
    exponents. Runs in a child process with its BLAS threads fixed, as attention-cpu does.
flash-gpu: qkv.pt.flash_attention (Triton) against F.scaled_dot_product_attention, causal, bf16,
    forward and forward + backward, T 1k..16k, d_head 64 and 128, in TFLOP/s and as ratios.
    Without CUDA every row says "not measured": no number from anywhere else is ever shown.

FLOPs counted: forward 4·B·H·T²·d (two T x T x d matmuls, 2 FLOPs per multiply-add), halved
when causal; backward 2.5 times the forward (five such matmuls instead of two), so forward +
backward is 3.5 times the forward (the convention of Dao 2023).

    python -m benchmarks.flash --threads 1 [--quick]   the flash-cpu child (prints JSON)
    python -m benchmarks.flash --threads 1 --book      measure and write book/data/flash-cpu.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from functools import partial

from .common import ROOT, fit_exponent, log, thread_env, time_calls

BOOK_DATA = ROOT / "book" / "data" / "flash-cpu.json"  # what chapter 15 plots
GPU_TARGET = 0.7  # Triton at >= 0.7x SDPA's TFLOP/s for T >= 4096
NOT_MEASURED = "not measured: no CUDA GPU (torch.cuda.is_available() is False)"


def cpu_sizes(quick: bool) -> dict:
    seqs = (256, 512, 1024) if quick else (256, 512, 1024, 2048, 4096)
    return dict(seqs=seqs, n_head=4, d_head=64, block=64, repeat=3 if quick else 5,
                budget_s=0.2 if quick else 1.0)


def peak_bytes(fn) -> int:
    """Peak bytes NumPy allocated while fn() ran (tracemalloc sees NumPy's allocations)."""
    import tracemalloc

    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def measure_cpu(quick: bool) -> list[dict]:
    """Runs in the child: one row per T with both paths' time and peak memory."""
    import numpy as np

    import qkv.np as qnp

    cfg = cpu_sizes(quick)
    rows = []
    for seq in cfg["seqs"]:
        log(f"  flash-cpu: T {seq}")
        rng = np.random.default_rng(0)
        q, k, v = (rng.standard_normal((cfg["n_head"], seq, cfg["d_head"])).astype(np.float32)
                   for _ in range(3))  # (n_head, T, d_head)
        fns = {"naive": partial(qnp.scaled_dot_product_attention, q, k, v),
               "tiled": partial(qnp.flash_attention, q, k, v, block_q=cfg["block"],
                                block_k=cfg["block"])}
        diff = float(np.abs(fns["naive"]() - fns["tiled"]()).max())
        t = time_calls(fns, repeat=cfg["repeat"], budget_s=cfg["budget_s"])
        mem = {name: peak_bytes(fn) for name, fn in fns.items()}
        rows.append(dict(T=seq, n_head=cfg["n_head"], d_head=cfg["d_head"], block=cfg["block"],
                         naive_ms=1e3 * t["naive"], tiled_ms=1e3 * t["tiled"],
                         tiled_over_naive_time=t["tiled"] / t["naive"],
                         naive_peak_mib=mem["naive"] / 2**20, tiled_peak_mib=mem["tiled"] / 2**20,
                         naive_over_tiled_memory=mem["naive"] / mem["tiled"], max_abs_diff=diff))
    return rows


def cpu_exponents(rows) -> list[dict]:
    ts = [r["T"] for r in rows]
    return [dict(path=path, T_range=f"{ts[0]}-{ts[-1]}",
                 time_exponent=fit_exponent(ts, [r[f"{path}_ms"] for r in rows]),
                 memory_exponent=fit_exponent(ts, [r[f"{path}_peak_mib"] for r in rows]))
            for path in ("naive", "tiled")]


def run_cpu(quick: bool, threads: int) -> list[dict]:
    cmd = [sys.executable, "-m", "benchmarks.flash", "--threads", str(threads)]
    proc = subprocess.run(cmd + (["--quick"] if quick else []), cwd=ROOT,
                          env=thread_env(threads), stdout=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited with {proc.returncode}")
    rows = json.loads(proc.stdout)
    cfg = cpu_sizes(quick)
    return [dict(name="flash-cpu",
                 title=f"Fast attention, CPU: qkv.np tiled (block {cfg['block']}) / naive, "
                       f"float32, {cfg['n_head']} heads, d_head {cfg['d_head']}, "
                       f"{threads} thread(s)",
                 columns=["T", "naive_ms", "tiled_ms", "tiled_over_naive_time", "naive_peak_mib",
                          "tiled_peak_mib", "naive_over_tiled_memory", "max_abs_diff"],
                 rows=rows, notes=[]),
            dict(name="flash-cpu-exponents",
                 title="Fast attention, CPU: time and peak memory ~ T^exponent (log-log fit)",
                 columns=["path", "T_range", "time_exponent", "memory_exponent"],
                 rows=cpu_exponents(rows), notes=[])]


def gpu_sizes(quick: bool) -> dict:
    seqs = (1024, 2048, 4096) if quick else (1024, 2048, 4096, 8192, 16384)
    return dict(d_heads=(64, 128), seqs=seqs, tokens=16384, d_model=2048,
                repeat=3 if quick else 5)


def measure_gpu(device, dtype, *, d_heads, seqs, tokens, d_model, repeat, **_) -> list[dict]:
    """One row per (d_head, T, pass): Triton and SDPA side by side, causal. batch = tokens / T
    and n_head = d_model / d_head, so every row does the same number of tokens (Dao 2023's
    setup). Also runs on the CPU in Triton's interpreter with tiny sizes (the test does)."""
    import torch

    sync = torch.cuda.synchronize if device.type == "cuda" else None
    rows = []
    for d_head in d_heads:
        for seq in seqs:
            log(f"  flash-gpu: d_head {d_head}, T {seq}")
            batch, n_head = max(1, tokens // seq), d_model // d_head
            gen = torch.Generator(device=device).manual_seed(0)
            tensors = [torch.randn(batch, n_head, seq, d_head, device=device, dtype=dtype,
                                   generator=gen) for _ in range(4)]  # q k v dout (B, nh, T, hs)
            rows += _gpu_rows(tensors, repeat, sync)
    return rows


def _gpu_rows(tensors, repeat, sync) -> list[dict]:
    """The fwd and fwd+bwd rows for one shape; tensors = [q, k, v, dout]."""
    import torch
    import torch.nn.functional as F

    import qkv.pt as qpt

    q, k, v, dout = tensors
    batch, n_head, seq, d_head = q.shape
    fwd_flops = 4 * batch * n_head * seq**2 * d_head / 2  # causal: half the scores
    paths = {"triton": partial(qpt.flash_attention, causal=True),
             "sdpa": partial(F.scaled_dot_product_attention, is_causal=True)}
    with torch.no_grad():
        diff = float((paths["triton"](q, k, v).float() - paths["sdpa"](q, k, v).float())
                     .abs().max())
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]

    def fwd_bwd(fn):
        fn(*leaves).backward(dout)

    rows = []
    for pass_, flops, fns in (("fwd", fwd_flops, {p: partial(fn, q, k, v)
                                                  for p, fn in paths.items()}),
                              ("fwd+bwd", 3.5 * fwd_flops, {p: partial(fwd_bwd, fn)
                                                            for p, fn in paths.items()})):
        with torch.inference_mode(pass_ == "fwd"):
            t = time_calls(fns, repeat=repeat, max_repeat=20, sync=sync)
        row = dict(d_head=d_head, T=seq, pass_=pass_, batch=batch, n_head=n_head,
                   max_abs_diff=diff, status="ok")
        for p in paths:
            if isinstance(t[p], BaseException):
                row["status"] = f"{p}: {type(t[p]).__name__}"
            else:
                row[f"{p}_ms"], row[f"{p}_tflops"] = 1e3 * t[p], flops / t[p] / 1e12
        if "triton_tflops" in row and "sdpa_tflops" in row:
            row["triton_over_sdpa"] = row["triton_tflops"] / row["sdpa_tflops"]
        rows.append(row)
    return rows


def run_gpu(quick: bool) -> list[dict]:
    import torch

    cfg = gpu_sizes(quick)
    columns = ["d_head", "T", "pass_", "status", "triton_ms", "sdpa_ms", "triton_tflops",
               "sdpa_tflops", "triton_over_sdpa", "max_abs_diff"]
    if not torch.cuda.is_available():
        rows = [dict(d_head=d, T=t, pass_=p, status=NOT_MEASURED)
                for d in cfg["d_heads"] for t in cfg["seqs"] for p in ("fwd", "fwd+bwd")]
        return [dict(name="flash-gpu", title="Fast attention, GPU: Triton / SDPA, causal bf16",
                     columns=columns, rows=rows,
                     notes=[f"target Triton >= {GPU_TARGET}x SDPA at T >= 4096: not measured"])]
    rows = measure_gpu(torch.device("cuda"), torch.bfloat16, **cfg)
    judged = [r["triton_over_sdpa"] for r in rows if r["T"] >= 4096 and "triton_over_sdpa" in r]
    worst = min(judged) if judged else None
    verdict = "MET" if worst is not None and worst >= GPU_TARGET else "NOT MET"
    return [dict(name="flash-gpu",
                 title=f"Fast attention, GPU ({torch.cuda.get_device_name(0)}): Triton / SDPA, "
                       f"causal bf16, {cfg['tokens']} tokens per call, d_model {cfg['d_model']}",
                 columns=columns, rows=rows,
                 notes=[f"target Triton >= {GPU_TARGET}x SDPA at T >= 4096: {verdict}"
                        + (f" (worst {worst:.2f}x)" if worst is not None else "")])]


def run(args) -> list[dict]:
    """The flash-cpu rows (``make bench``; flash-gpu is benchmarks/flash_gpu.py)."""
    return run_cpu(args.quick, args.attention_threads)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, required=True)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--book", action="store_true", help=f"write {BOOK_DATA.relative_to(ROOT)}")
    a = p.parse_args(argv)
    if a.book:
        sections = run_cpu(False, a.threads)
        from .common import machine_info, write_json

        write_json(BOOK_DATA, machine_info({"flash-cpu": a.threads}), {"threads": a.threads},
                   {s.pop("name"): s for s in sections})
        log(f"wrote {BOOK_DATA}")
        return 0
    print(json.dumps(measure_cpu(a.quick)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
