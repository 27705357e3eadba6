"""DDP on the CPU: ``python -m qkv.train`` in 1 process against ``torchrun`` with 2 (gloo).

Each process runs one thread and the per-process micro-batch is the cpu-small preset's 12
windows, so 2 processes train a global batch of 24; a third row runs 1 process accumulating 2
micro-batches (the same global batch of 24, on one core). Scaling efficiency = tokens/s with 2
processes / (2 x tokens/s with 1): 100% would mean the all-reduce and the second process cost
nothing. On a machine whose cores are busy with other work the second process competes for a
core, so the number says as much about the machine's load as about DDP (the load average is
recorded). Tokens/s are qkv.train's own (training steps only, evaluation excluded).
"""

from __future__ import annotations

import re
import subprocess
import sys
import tempfile

from .common import log, thread_env

COLUMNS = ["run", "processes", "grad_accum", "global_batch", "tokens_per_s", "efficiency"]


def one(launcher: list, steps: int, extra: list) -> float:
    from qkv.data import corpus_path

    with tempfile.TemporaryDirectory(prefix="qkv-bench-ddp-") as out:
        cmd = [*launcher, "-m", "qkv.train", "--preset", "cpu-small", "--device", "cpu",
               f"--data={corpus_path()}", f"--out-dir={out}", f"--max-steps={steps}",
               f"--eval-interval={steps}", "--eval-iters=1", "--sample-tokens=0", "--quiet",
               "--threads=1", *extra]
        done = subprocess.run(cmd, capture_output=True, text=True, env=thread_env(1),
                              timeout=900)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:6])} ...: {done.stderr[-800:]}")
    return float(re.search(r"\(([\d,]+) tokens/s\)", done.stdout).group(1).replace(",", ""))


def run(args) -> list:
    steps = 20 if args.quick else 150
    py = [sys.executable]
    two = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    log("ddp: 1 process ...")
    t1 = one(py, steps, [])
    log("ddp: 1 process, grad-accum 2 ...")
    t_acc = one(py, steps, ["--grad-accum=2"])
    log("ddp: torchrun, 2 processes ...")
    t2 = one(two, steps, [])
    rows = [dict(run="python -m qkv.train", processes=1, grad_accum=1, global_batch=12,
                 tokens_per_s=round(t1), efficiency=1.0),
            dict(run="python -m qkv.train --grad-accum 2", processes=1, grad_accum=2,
                 global_batch=24, tokens_per_s=round(t_acc), efficiency=round(t_acc / t1, 3)),
            dict(run="torchrun --nproc_per_node=2 (gloo)", processes=2, grad_accum=1,
                 global_batch=24, tokens_per_s=round(t2), efficiency=round(t2 / (2 * t1), 3))]
    notes = [f"{steps} steps of cpu-small, 1 thread per process; efficiency = tokens/s / "
             f"(processes x tokens/s of 1 process): 2 processes give {t2 / (2 * t1):.0%}"]
    return [dict(name="ddp", title="DDP on the CPU: 1 vs 2 processes (tokens/s)",
                 columns=COLUMNS, rows=rows, notes=notes)]
