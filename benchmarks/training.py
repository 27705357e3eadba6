"""Training speed of ``qkv.train``: tokens/s, and the wall time to the validation-loss target.

Targets (the training issue): cpu-small reaches validation loss <= 1.88 within its 2000 steps
(nanoGPT's CPU recipe of the same size: 1.886 in 90 s on this 2-core machine class); on a GPU,
gpu-baby reaches <= 1.47 in under 40 s including start-up. --quick runs 50 steps and reports
tokens/s only. Threads: --threads (default 1), as ``python -m qkv.train --threads N``; on a
busy 2-core machine one thread is several times faster than two. A missing qkv.train is
reported as missing, never estimated.
"""

from __future__ import annotations

import tempfile
import time

from .common import log

TARGETS = {"cpu-small": dict(val_loss=1.88, wall_s=90.0),
           "gpu-baby": dict(val_loss=1.47, wall_s=40.0)}
COLUMNS = ["preset", "status", "device", "threads", "steps", "tokens_per_s", "train_s", "wall_s",
           "final_val_loss", "target_val_loss", "step_at_target", "s_to_target", "target_s",
           "met"]


def one_run(qtrain, preset: str, quick: bool, threads: int) -> dict:
    import torch

    row = dict(preset=preset, status="ok", threads=threads)
    with tempfile.TemporaryDirectory(prefix="qkv-bench-train-") as out_dir:
        overrides = dict(out_dir=out_dir, sample_tokens=0)
        if quick:
            overrides.update(max_steps=50, eval_interval=50, eval_iters=2)
        cfg = qtrain.make_config(preset, **overrides)
        stamps = []  # seconds since the start at each evaluation message ("step N: ...")
        t0 = time.perf_counter()

        def note(message: str):
            if message.startswith("step "):
                stamps.append(time.perf_counter() - t0)

        previous = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            result = qtrain.train(cfg, progress=False, plot=False, log=note)
        finally:
            torch.set_num_threads(previous)
        wall = time.perf_counter() - t0
    train_s = result.get("train_s", result.get("wall_s"))  # seconds in steps, evals excluded
    row.update(device=str(qtrain.resolve_device(cfg.device)), steps=result["step"],
               tokens_per_s=result["tokens_per_s"], train_s=train_s, wall_s=wall)
    if quick:
        row["status"] = "ok (--quick: tokens/s only)"
        return row
    evals = result["evals"]  # (step, train_loss, val_loss), the step-0 one first
    target = TARGETS[preset]
    row.update(final_val_loss=evals[-1][2], target_val_loss=target["val_loss"],
               target_s=target["wall_s"])
    reached = [i for i, e in enumerate(evals) if e[2] <= target["val_loss"]]
    if reached:
        i = reached[0]
        row["step_at_target"] = evals[i][0]
        row["s_to_target"] = stamps[i] if len(stamps) == len(evals) else None
    s = row.get("s_to_target")
    row["met"] = bool(reached) and s is not None and s <= target["wall_s"]
    return row


def run(args) -> list[dict]:
    import torch

    section = dict(name="training", title="Training (qkv.train)", columns=COLUMNS, rows=[],
                   notes=[])
    try:
        import qkv.train as qtrain

        qtrain.train, qtrain.make_config, qtrain.resolve_device  # noqa: B018 - the API we use
    except (ImportError, AttributeError) as e:
        section["rows"].append(dict(preset="cpu-small",
                                    status=f"missing (qkv.train not built yet: {e})"))
        return [section]
    presets = ["cpu-small"] + (["gpu-baby"] if torch.cuda.is_available() else [])
    for preset in presets:
        log(f"  training: {preset}{' (--quick: 50 steps)' if args.quick else ''}")
        try:
            section["rows"].append(one_run(qtrain, preset, args.quick, args.threads))
        except Exception as e:  # noqa: BLE001 - reported in the table
            section["rows"].append(dict(preset=preset, status=f"error: {type(e).__name__}: {e}"))
    if not args.quick:
        section["notes"].append("targets: cpu-small val loss <= 1.88 within 90 s wall "
                                "(nanoGPT's CPU recipe: 1.886 in 90 s); gpu-baby <= 1.47 "
                                "within 40 s; s_to_target counts start-up and evaluations")
    return [section]
