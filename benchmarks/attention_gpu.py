"""Causal attention on a GPU in bf16: qkv.pt's naive path, its fused path, and
torch.nn.functional.scaled_dot_product_attention called directly.

For each head dim and sequence length: time, TFLOP/s (causal attention counted as
4·B·H·T²·d/2 FLOPs: two matmuls of 2·T²·d each, half of them masked away), peak memory
(torch.cuda.max_memory_allocated), and the TFLOP/s as a fraction of a bf16 matmul measured on
the same GPU. The naive path forms the (T, T) scores and runs out of memory first: that is
reported as "OOM". Skipped, with one row saying so, where CUDA is not available.
"""

from __future__ import annotations

from functools import partial

from .common import fit_exponent, log, time_calls

PATHS = ("naive", "fused", "sdpa")


def sizes(quick: bool) -> dict:
    seqs = (512, 1024, 2048, 4096) if quick else (512, 1024, 2048, 4096, 8192, 16384)
    return dict(d_heads=(64, 128), seqs=seqs, batch=4, n_head=16, matmul_n=8192,
                fit_from_T=1024 if quick else 2048, repeat=3 if quick else 5)


def matmul_tflops(device, dtype, n: int, sync) -> float:
    """The measured rate of an (n, n) @ (n, n) matmul in TFLOP/s (2·n³ FLOPs)."""
    import torch

    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    t = time_calls({"mm": lambda: a @ b}, warmup=2, repeat=10, number=10, sync=sync)["mm"]
    return 2 * n**3 / t / 1e12


def measure(device, dtype, *, d_heads, seqs, batch, n_head, matmul_n, repeat,
            **_) -> tuple[float, list[dict]]:
    """(matmul TFLOP/s, rows) for one device. Also runs on the CPU with tiny sizes, which is
    how the test checks this code on a machine without a GPU."""
    import torch

    sync = torch.cuda.synchronize if device.type == "cuda" else None
    peak_rate = matmul_tflops(device, dtype, matmul_n, sync)
    log(f"  attention-gpu: {dtype} matmul {peak_rate:.1f} TFLOP/s")
    rows = []
    for d_head in d_heads:
        out_of_memory = set()  # a path that ran out of memory is not tried at a longer T
        for seq in seqs:
            log(f"  attention-gpu: d_head {d_head}, T {seq}")
            new = measure_one(device, dtype, batch, n_head, seq, d_head, repeat, out_of_memory)
            for row in new:
                if "tflops" in row:
                    row["frac_of_matmul"] = row["tflops"] / peak_rate
            rows += new
    return peak_rate, rows


def measure_one(device, dtype, batch, n_head, seq, d_head, repeat, out_of_memory) -> list[dict]:
    """One row per path for q, k, v of shape (batch, n_head, seq, d_head); adds to
    out_of_memory the paths that ran out of memory."""
    import torch
    import torch.nn.functional as F

    import qkv.pt as qpt

    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else None
    fns = {
        "naive": partial(qpt.scaled_dot_product_attention, causal=True),
        "fused": partial(qpt.scaled_dot_product_attention, causal=True, fused=True),
        "sdpa": partial(F.scaled_dot_product_attention, is_causal=True),
    }
    gen = torch.Generator(device=device).manual_seed(0)
    q, k, v = (torch.randn(batch, n_head, seq, d_head, device=device, dtype=dtype,
                           generator=gen) for _ in range(3))  # (B, nh, T, hs)
    flops = 4 * batch * n_head * seq**2 * d_head / 2  # causal: half of the two T x T matmuls
    rows = {}
    for path, fn in fns.items():
        row = rows[path] = dict(d_head=d_head, T=seq, path=path, batch=batch, n_head=n_head,
                                status="ok")
        if path in out_of_memory:
            row["status"] = "OOM (at a shorter T)"
            continue
        call = partial(fn, q, k, v)
        with torch.inference_mode():
            try:
                if cuda:
                    torch.cuda.empty_cache()
                    torch.cuda.reset_peak_memory_stats(device)
                call()  # also the warm-up
                if cuda:
                    torch.cuda.synchronize()
                    row["peak_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
                t = time_calls({path: call}, repeat=repeat, max_repeat=20,
                               number=10 if cuda else 1, sync=sync)[path]
                if isinstance(t, BaseException):
                    raise t
            except torch.OutOfMemoryError:
                t = None  # drop the exception and the tensors its frames held
                out_of_memory.add(path)
                row["status"] = "OOM"
                row.pop("peak_gib", None)
                continue
        row.update(ms=1e3 * t, tflops=flops / t / 1e12)
    for row in rows.values():
        if "tflops" in row and "tflops" in rows["sdpa"]:
            row["vs_sdpa"] = row["tflops"] / rows["sdpa"]["tflops"]
    return list(rows.values())


def exponents(rows, fit_from_T) -> list[dict]:
    """Time and peak memory ~ T^exponent for each head dim and path, from T >= fit_from_T."""
    out = []
    for d_head in sorted({r["d_head"] for r in rows}):
        for path in PATHS:
            sel = [r for r in rows if r["d_head"] == d_head and r["path"] == path
                   and r["T"] >= fit_from_T and r["status"] == "ok"]
            ts = [r["T"] for r in sel]
            out.append(dict(d_head=d_head, path=path,
                            T_range=f"{min(ts)}-{max(ts)}" if ts else "-",
                            time_exponent=fit_exponent(ts, [r["ms"] for r in sel]),
                            memory_exponent=fit_exponent(ts, [r.get("peak_gib") for r in sel])))
    return out


def run(args) -> list[dict]:
    import torch

    if not torch.cuda.is_available():
        return [dict(name="attention-gpu", title="Attention, GPU", columns=["status"],
                     rows=[dict(status="skipped: no CUDA (torch.cuda.is_available() is False)")],
                     notes=[])]
    cfg = sizes(args.quick)
    dtype = torch.bfloat16
    peak_rate, rows = measure(torch.device("cuda"), dtype, **cfg)
    columns = ["d_head", "T", "path", "status", "ms", "tflops", "frac_of_matmul", "vs_sdpa",
               "peak_gib"]
    fused = [r["vs_sdpa"] for r in rows if r["path"] == "fused" and "vs_sdpa" in r]
    worst = min(fused) if fused else None
    notes = [f"bf16 matmul ({cfg['matmul_n']}^3): {peak_rate:.1f} TFLOP/s",
             "target fused >= 0.95x SDPA at every size: "
             + ("MET" if worst is not None and worst >= 0.95 else "NOT MET")
             + (f" (worst {worst:.3f}x)" if worst is not None else "")]
    oom = [f"d_head {r['d_head']}: T {r['T']}" for r in rows
           if r["path"] == "naive" and r["status"] == "OOM"]
    notes.append("naive path runs out of memory at "
                 + (", ".join(oom) if oom else "none of the sizes tried"))
    title = (f"Attention, GPU ({torch.cuda.get_device_name(0)}): causal bf16, "
             f"batch {cfg['batch']}, {cfg['n_head']} heads")
    return [dict(name="attention-gpu", title=title, columns=columns, rows=rows, notes=notes,
                 matmul_tflops=peak_rate),
            dict(name="attention-gpu-exponents",
                 title=f"Attention, GPU: time and peak memory ~ T^exponent "
                       f"(fit on T >= {cfg['fit_from_T']})",
                 columns=["d_head", "path", "T_range", "time_exponent", "memory_exponent"],
                 rows=exponents(rows, cfg["fit_from_T"]), notes=[])]
