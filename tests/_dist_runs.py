"""Run under ``torchrun --nproc_per_node=2`` by tests/test_distributed.py: several short
qkv.train runs in one process group (one launch instead of one per run, which is what costs
seconds). argv: corpus, out folder, then run names. Rank 0 writes OUT/<name>.json."""

import json
import shutil
import sys
from pathlib import Path

import torch

from qkv import distributed
from qkv.train import make_config, train

SMALL = dict(n_layer=1, n_head=2, d_model=16, context_length=16, batch_size=4, max_steps=20,
             lr=1e-2, min_lr=1e-3, warmup_steps=5, eval_interval=10, eval_iters=2,
             sample_tokens=0, device="cpu")


def main(corpus, out, names):
    torch.set_num_threads(1)
    out = Path(out)
    rank = distributed.from_env().rank
    for name in names:
        folder = out / name
        if name == "ddp":  # uninterrupted
            h = train_cfg(corpus, folder)
        elif name == "ddp_stop":  # stop at 10, resume at once under DDP
            train_cfg(corpus, folder, stop_at=10)
            if rank == 0:
                shutil.copytree(folder, out / "ddp_ckpt10")  # for the 2 -> 1 resume
            h = train_cfg(corpus, folder, resume=True)
        elif name == "from_one":  # a 1-process checkpoint (written by the test) resumed here
            h = train_cfg(corpus, folder, resume=True, grad_accum=1)
        elif name == "fsdp":
            h = train_cfg(corpus, folder, parallel="fsdp", stop_at=10)
            if rank == 0:
                shutil.copytree(folder, out / "fsdp_ckpt10")
            h = train_cfg(corpus, folder, parallel="fsdp", resume=True)
        else:
            raise SystemExit(f"unknown run {name}")
        if rank == 0:
            (out / f"{name}.json").write_text(json.dumps(h["train_loss"]))


def train_cfg(corpus, folder, *, stop_at=None, resume=False, **overrides):
    cfg = make_config("cpu-small", data=corpus, out_dir=str(folder), **{**SMALL, **overrides})
    return train(cfg, resume=resume, stop_at=stop_at, progress=False, plot=False,
                 log=lambda *a: None)


if __name__ == "__main__":
    try:
        main(sys.argv[1], sys.argv[2], sys.argv[3:])
    finally:
        distributed.teardown(distributed.from_env())
