"""The flash-gpu rows of benchmarks/flash.py: the Triton kernel against SDPA on a GPU, or
"not measured" without one. A module of its own so ``--only flash-gpu`` runs just these."""

from __future__ import annotations

from .flash import run_gpu


def run(args) -> list[dict]:
    return run_gpu(args.quick)
