"""Train a character-level GPT: ``python -m qkv.train --preset cpu-small``
(``--tokenizer bpe --vocab-size N``: on byte-level BPE tokens instead, chapter 13).

The loop, nanoGPT-style (its hyperparameters, presets and command line: qkv.train_config):

    text -> CharTokenizer -> ids -> 90/10 split -> random (x, y) batches (y = x shifted by one)
    repeat: lr from the schedule -> loss = cross_entropy(GPT(x), y) -> backward
            -> clip the gradient norm -> AdamW step
    every eval_interval steps: mean train/val loss on fixed batches, and a checkpoint

AdamW decays matrices only (embeddings and linear weights, ndim >= 2): shrinking biases and
layer-norm gains toward zero buys no regularisation, it only fights the normalisation.
The learning rate warms up linearly (Adam's moment estimates are noisy at first), then
follows a cosine down to min_lr. CPU runs in float32; CUDA runs under bf16 autocast
(``--dtype`` chooses).

Under ``torchrun --nproc_per_node=N -m qkv.train`` each process trains on its slice of the
global batch (batch_size x N x grad_accum windows) and DDP or FSDP averages the gradients;
rank 0 alone evaluates, prints, plots and writes checkpoints (see qkv.distributed).

Checkpoints hold the model, the optimizer, the step, the history and the state of every
random generator (torch's, for dropout, and the batch sampler's), so ``--resume`` continues
with exactly the losses the run would have had without the stop (bit for bit on CPU).
"""

import math
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, fields
from pathlib import Path

import torch

from qkv import distributed
from qkv._train_loop import _progress_bar, _StopOnCtrlC
from qkv.data import CharTokenizer, corpus_path, get_batch, load_text, sha256_of, split
from qkv.distributed import micro_batches, sync_gradients, unwrap
from qkv.flops import flops_per_token, throughput_report, training_memory
from qkv.precision import autocast_for, resolve_dtype
from qkv.pt import GPT, GPTConfig, cross_entropy, generate
from qkv.train_config import (  # noqa: F401 - re-exported: qkv.train is the public name
    PRESETS,
    RESUMABLE,
    ConfigError,
    TrainConfig,
    build_parser,
    make_config,
    resume_config,
)


def lr_at(step: int, cfg: TrainConfig) -> float:
    """The learning rate for optimizer step ``step`` (0-based).

    Warm-up: lr * (step + 1) / warmup_steps for step < warmup_steps (reaches lr at the last
    warm-up step). Then cosine: min_lr + (lr - min_lr) * (1 + cos(pi * r)) / 2 with
    r = (step - warmup_steps) / (max_steps - warmup_steps), clamped to [0, 1].
    """
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    r = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps))
    return cfg.min_lr + (cfg.lr - cfg.min_lr) * 0.5 * (1.0 + math.cos(math.pi * r))


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig):
    """AdamW with two parameter groups: matrices (decayed) and vectors (not decayed)."""
    params = [p for p in model.parameters() if p.requires_grad]  # the tied wte counts once
    groups = [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]
    # fused: one kernel updates every tensor (on CPU too), instead of a dozen ops per tensor
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=True)


def train_step(model, optimizer, x, y, lr: float, grad_clip: float, autocast=nullcontext):
    """One optimizer step on the batch (x, y), both (batch, seq) ids, or on lists of K
    micro-batches (gradient accumulation: each micro-batch's mean loss is divided by K, so
    the summed gradients are the gradient of the mean over all K * batch windows).

    returns: (loss, grad_norm) as tensors (loss: the mean over all micro-batches); grad_norm
    is the global norm BEFORE clipping (nan if grad_clip is 0, since it is then not
    computed). The gradients stay in the parameters' .grad until the next step (tests
    inspect them).
    """
    for group in optimizer.param_groups:
        group["lr"] = lr
    xs, ys = (x, y) if isinstance(x, (list, tuple)) else ([x], [y])
    optimizer.zero_grad(set_to_none=True)
    loss = 0.0
    for k, (xk, yk) in enumerate(zip(xs, ys, strict=True)):
        # under DDP/FSDP, all-reduce the gradients once, after the last micro-batch
        with sync_gradients(model, last=k == len(xs) - 1):
            with autocast():
                logits = model(xk)  # (batch, seq, vocab); bf16 under bf16 autocast
            # the loss itself in float32, through the model's own kernels
            part = cross_entropy(logits.float(), yk, fused=unwrap(model).config.fused) / len(xs)
            part.backward()
        loss = loss + part.detach()
    norm = torch.tensor(float("nan"))
    if grad_clip > 0:
        # Rescale all gradients together so their global norm is at most grad_clip: one bad
        # batch cannot throw the weights far.
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    return loss, norm


@torch.no_grad()
def estimate_loss(model, splits: dict, cfg: TrainConfig, device, autocast=nullcontext) -> dict:
    """Mean loss over cfg.eval_iters batches of each split, in eval mode.

    The batches come from a generator seeded afresh each call, so every evaluation of a run
    sees the same windows: the curve shows the model changing, not the sample.
    """
    was_training = model.training
    model.eval()
    out = {}
    for name, ids in splits.items():
        gen = torch.Generator().manual_seed(cfg.seed + 1)
        losses = []
        for _ in range(cfg.eval_iters):
            x, y = get_batch(ids, cfg.batch_size, cfg.context_length, gen, device=device)
            with autocast():
                logits = model(x)
            losses.append(cross_entropy(logits.float(), y, fused=model.config.fused))
        out[name] = torch.stack(losses).mean().item()
    model.train(was_training)
    return out


def perplexity(loss: float) -> float:
    """e ** loss: the model is as unsure as a uniform choice among this many tokens."""
    return math.exp(loss)


def bits_per_token(loss: float) -> float:
    """loss / ln 2: the loss in bits (per character, for a character model)."""
    return loss / math.log(2)


def loss_units(loss: float) -> str:
    """The same loss two more ways, for the log: 'perplexity 6.05, 2.60 bits per token'."""
    return f"perplexity {perplexity(loss):.2f}, {bits_per_token(loss):.2f} bits per token"


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} asked for, but torch sees no CUDA GPU")
    return device


def load_corpus(cfg: TrainConfig):
    """(tokenizer, train_ids, val_ids, path) for cfg.data, with the one-line errors of the CLI."""
    try:
        path = corpus_path(cfg.data)
        text = load_text(path)
    except (OSError, ValueError) as e:
        raise ConfigError(str(e)) from None
    if cfg.tokenizer == "bpe":  # trained on the training text only: val stays unseen
        from qkv.bpe import train_or_load

        n = int(len(text) * 0.9)  # the same cut as split() makes in characters
        try:
            tok = train_or_load(text[:n], cfg.vocab_size, tokenizer_path(cfg), progress=None)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        train_ids, val_ids = (torch.tensor(tok.encode(t), dtype=torch.long)
                              for t in (text[:n], text[n:]))
        ids = torch.cat([train_ids, val_ids])
    elif cfg.tokenizer == "char":
        tok = CharTokenizer.from_text(text)
        ids = torch.tensor(tok.encode(text), dtype=torch.long)
        train_ids, val_ids = split(ids)
    else:
        raise ConfigError(f"unknown tokenizer {cfg.tokenizer!r}; expected char or bpe")
    need = cfg.context_length + 1
    shortest = min(len(train_ids), len(val_ids))
    if shortest < need:
        raise ConfigError(f"context_length {cfg.context_length} is too long for the corpus "
                          f"{path} ({len(ids)} characters): its train/val splits have "
                          f"{len(train_ids)}/{len(val_ids)} tokens and a window needs "
                          f"context_length + 1 = {need}; use a longer text or a smaller "
                          f"--context-length")
    return tok, train_ids, val_ids, path


def tokenizer_path(cfg: TrainConfig) -> Path:
    return Path(cfg.out_dir or "out") / "tokenizer.json"


def tokenizer_from_state(state: dict):
    """The tokenizer saved in a checkpoint: a CharTokenizer or a qkv.bpe.Tokenizer."""
    if state.get("format") == "qkv-bpe":
        from qkv.bpe import Tokenizer

        return Tokenizer.from_state_dict(state)
    return CharTokenizer.from_state_dict(state)


def model_config(cfg: TrainConfig, vocab_size: int) -> GPTConfig:
    return GPTConfig(vocab_size=vocab_size, context_length=cfg.context_length,
                     n_layer=cfg.n_layer, n_head=cfg.n_head, d_model=cfg.d_model,
                     dropout=cfg.dropout, bias=cfg.bias, fused=True, norm=cfg.norm,
                     position=cfg.position, mlp=cfg.mlp, n_kv_head=cfg.n_kv_head or None,
                     qk_norm=cfg.qk_norm)


def save_checkpoint(path: Path, **state) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    tmp.replace(path)  # never a half-written ckpt.pt, even if interrupted while saving


def load_checkpoint(path, device="cpu"):
    """(model, tokenizer, checkpoint dict) from a ckpt.pt written by ``train``."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"no checkpoint at {path}")
    ckpt = torch.load(path, map_location=device, weights_only=True)
    model = GPT(GPTConfig(**ckpt["model_config"]), generator=torch.Generator()).to(device)
    model.load_state_dict(ckpt["model"])
    return model, tokenizer_from_state(ckpt["tokenizer"]), ckpt


def train(cfg: TrainConfig, *, resume: bool = False, stop_at: int | None = None,
          progress: bool = True, plot: bool = True, log=print) -> dict:
    """Run (or continue) training; returns the history.

    resume: continue from cfg.out_dir/ckpt.pt; cfg must equal the checkpoint's config except
        in the RESUMABLE fields (``resume_config`` builds such a cfg).
    stop_at: stop after this many steps (checkpoint saved; the schedule still runs to
        max_steps), e.g. to continue later with resume=True.
    progress: show a tqdm bar.  plot: write loss.png.  log: where messages go (print).
    returns: dict with train_loss (one float per step), lr (per step), evals (list of
        (step, train_loss, val_loss)), step, train_s (seconds in training steps, evaluations
        excluded) and tokens_per_s (the global batch's), both for this call's steps,
        flops_per_token and mfu (None off CUDA or on an unknown GPU; see qkv.flops),
        sample (text, or None), and out_dir.
    """
    out_dir = Path(cfg.out_dir or "out")
    ckpt_path = out_dir / "ckpt.pt"
    ckpt = None
    if resume:
        if not ckpt_path.is_file():
            raise ConfigError(f"--resume: no checkpoint at {ckpt_path}")
        ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
        saved = ckpt["config"]
        changed = [f"{k} ({getattr(cfg, k)!r}, checkpoint {v!r})" for k, v in saved.items()
                   if k not in RESUMABLE and getattr(cfg, k) != v]
        if changed:
            raise ConfigError("--resume: the run's settings differ from the checkpoint's: "
                              + ", ".join(changed))
    if cfg.grad_accum < 1 or cfg.parallel not in ("ddp", "fsdp"):
        raise ConfigError(f"grad_accum must be >= 1 and parallel ddp or fsdp; got "
                          f"{cfg.grad_accum} and {cfg.parallel!r}")
    try:
        dtype = resolve_dtype(cfg.dtype, resolve_device(cfg.device))
    except ValueError as e:
        raise ConfigError(str(e)) from None
    info, device = distributed.setup(resolve_device(cfg.device))
    if ckpt is not None:
        try:
            distributed.check_global_batch(ckpt, cfg.batch_size, info.world_size,
                                           cfg.grad_accum)
        except ValueError as e:
            raise ConfigError(f"--resume: {e}") from None
    if not info.is_main:
        log, progress, plot = (lambda *a, **k: None), False, False
    tok, train_ids, val_ids, path = load_corpus(cfg)
    digest = sha256_of(path)
    if ckpt is not None and ckpt["corpus_sha256"] != digest:
        raise ConfigError(f"--resume: {path} is not the corpus the checkpoint was trained on "
                          f"(sha256 {digest[:12]}..., expected {ckpt['corpus_sha256'][:12]}...)")
    if device.type == "cuda":
        train_ids, val_ids = train_ids.to(device), val_ids.to(device)  # batches cut on the GPU
    autocast = autocast_for(device, dtype)

    mcfg = model_config(cfg, tok.vocab_size)
    model = GPT(mcfg, generator=torch.Generator().manual_seed(cfg.seed)).to(device)
    model = distributed.wrap(model, info, cfg.parallel)  # unchanged in one process
    optimizer = make_optimizer(unwrap(model), cfg)
    batch_gen = torch.Generator().manual_seed(cfg.seed)  # batch offsets, on the CPU; all ranks
    torch.manual_seed(cfg.seed + info.rank)  # dropout draws from torch's global generator
    history = {"train_loss": [], "lr": [], "evals": []}
    step = 0
    if ckpt is not None:
        distributed.load_full_state_dicts(model, optimizer, ckpt["model"], ckpt["optimizer"],
                                           cfg.parallel)
        step, history = ckpt["step"], ckpt["history"]
        batch_gen.set_state(ckpt["rng"]["batches"])
        torch_states = ckpt["rng"]["torch"]
        torch_states = torch_states if isinstance(torch_states, list) else [torch_states]
        if info.rank < len(torch_states):
            torch.set_rng_state(torch_states[info.rank])  # dropout continues exactly
        if device.type == "cuda" and ckpt["rng"]["cuda"] is not None:
            torch.cuda.set_rng_state(ckpt["rng"]["cuda"], device)
        log(f"resumed from {ckpt_path} at step {step}")
    n_params = sum(p.numel() for p in unwrap(model).parameters())
    global_batch = cfg.batch_size * info.world_size * cfg.grad_accum
    log(f"{n_params / 1e6:.2f}M parameters, vocab {tok.vocab_size}, "
        f"{len(train_ids):,}/{len(val_ids):,} train/val tokens, device {device}")
    if info.enabled or cfg.grad_accum > 1:
        log(f"{info.world_size} process(es) x {cfg.grad_accum} micro-batch(es) x "
            f"{cfg.batch_size} windows = global batch {global_batch}"
            + (f" ({cfg.parallel})" if info.enabled else ""))

    def checkpoint():
        # every rank takes part (FSDP gathers its shards; the dropout generators are gathered)
        cuda_rng = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
        torch_rngs = distributed.gather_objects(torch.get_rng_state(), info)
        model_state, optim_state = distributed.full_state_dicts(model, optimizer, cfg.parallel)
        if info.is_main:
            out_dir.mkdir(parents=True, exist_ok=True)
            save_checkpoint(ckpt_path, config=dict(asdict(cfg), data=str(path)),
                            model_config=asdict(mcfg), model=model_state,
                            optimizer=optim_state, step=step, history=history,
                            tokenizer=tok.state_dict(), corpus_sha256=digest,
                            world_size=info.world_size,
                            rng={"torch": torch_rngs, "cuda": cuda_rng,
                                 "batches": batch_gen.get_state()})
        distributed.barrier(info)  # the file is complete before any rank reads it

    def evaluate():
        # rank 0 alone under DDP; every rank under FSDP, whose forward gathers the shards
        if not info.is_main and cfg.parallel != "fsdp":
            return ""
        net = unwrap(model) if cfg.parallel == "ddp" else model
        losses = estimate_loss(net, {"train": train_ids, "val": val_ids}, cfg, device,
                               autocast)
        history["evals"].append((step, losses["train"], losses["val"]))
        return (f"step {step}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f} "
                f"({loss_units(losses['val'])})")

    last = cfg.max_steps if stop_at is None else min(stop_at, cfg.max_steps)
    tokens_per_step = global_batch * cfg.context_length
    bar = _progress_bar(progress, step, last)
    say = bar.write if progress else log  # messages above the bar, not through it
    train_time, start_step = 0.0, step
    if step == 0 and last > 0:
        say(evaluate())  # the starting point: about ln(vocab) for a fresh model
    model.train()
    with _StopOnCtrlC() as ctrl_c:
        while step < last and not ctrl_c.requested:
            t0 = time.perf_counter()
            lr = lr_at(step, cfg)
            batches = micro_batches(train_ids, cfg.batch_size, cfg.context_length, batch_gen,
                                    info, cfg.grad_accum, device=device)
            xs, ys = zip(*batches, strict=True)
            loss, _ = train_step(model, optimizer, list(xs), list(ys), lr, cfg.grad_clip,
                                 autocast)
            # the mean over ranks, i.e. over the global batch; .item() waits for the GPU
            loss = distributed.mean_over_ranks(loss, info).item()
            train_time += time.perf_counter() - t0
            step += 1
            history["train_loss"].append(loss)
            history["lr"].append(lr)
            bar.update(1)
            if step % 10 == 0 or step == last:
                rate = (step - start_step) * tokens_per_step / max(train_time, 1e-9)
                bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{rate:,.0f}", refresh=False)
            if step % cfg.eval_interval == 0 or step == cfg.max_steps:
                say(evaluate())
                checkpoint()
        bar.close()
        if step > start_step and step % cfg.eval_interval != 0 and step != cfg.max_steps:
            checkpoint()  # stopped between evaluations (stop_at or Ctrl-C)

    steps_run = step - start_step
    tokens_per_s = steps_run * tokens_per_step / train_time if train_time else 0.0
    accounting, util = throughput_report(mcfg, tokens_per_s, device, info.world_size)
    result = dict(history, step=step, train_s=train_time, tokens_per_s=tokens_per_s,
                  sample=None, out_dir=str(out_dir), flops_per_token=flops_per_token(mcfg),
                  mfu=util)
    if steps_run:
        log(f"{steps_run} steps in {train_time:.1f} s of training ({tokens_per_s:,.0f} tokens/s)")
        log(accounting)
        if device.type == "cuda":  # the CPU keeps no peak counter (tests/test_flops.py measures)
            est = training_memory(mcfg, cfg.batch_size)["total"] / 2**30
            log(f"peak CUDA memory {torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB; "
                f"float32 estimate {est:.2f} GiB (qkv.flops.training_memory)")
    if plot and history["train_loss"]:
        plot_losses(history, out_dir / "loss.png")
    if step < cfg.max_steps:
        log(f"stopped at step {step} of {cfg.max_steps}; checkpoint in {ckpt_path}, "
            f"continue with --resume")
        return result
    sampler = (distributed.plain_copy(model, cfg.parallel, lambda: GPT(mcfg).to(device))
               if cfg.sample_tokens > 0 else None)
    if sampler is not None and info.is_main:
        start = (tok.encode("\n") if "\n" in getattr(tok, "stoi", "\n")  # bpe: any text
                 else train_ids[:1].tolist())
        ids = generate(sampler, start, cfg.sample_tokens, temperature=0.8, seed=cfg.seed)
        result["sample"] = tok.decode(ids.tolist())
        (out_dir / "sample.txt").write_text(result["sample"], encoding="utf-8")
        log("sample (temperature 0.8):\n" + result["sample"])
    return result


def plot_losses(history: dict, path: Path) -> None:
    """Per-step training loss (thin), its running mean, and the evaluations (dots)."""
    import matplotlib

    matplotlib.use("Agg")  # files only; no display needed
    import matplotlib.pyplot as plt

    losses = torch.tensor(history["train_loss"])
    steps = torch.arange(1, len(losses) + 1)
    w = min(50, len(losses))
    smooth = losses.unfold(0, w, 1).mean(-1)  # running mean over w steps
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(steps, losses, lw=0.5, alpha=0.35, color="C0", label="train (per step)")
    ax.plot(steps[w - 1:], smooth, color="C0", label=f"train (mean of {w})")
    if history["evals"]:
        s, tr, va = zip(*history["evals"], strict=True)
        ax.plot(s, tr, "o-", color="C1", label="train (eval)")
        ax.plot(s, va, "o-", color="C2", label="val (eval)")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats per character)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    overrides = {f.name: getattr(args, f.name) for f in fields(TrainConfig)}
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        cfg = make_config(args.preset, **overrides)  # also checks the preset's name
        if args.resume:
            cfg = resume_config(cfg.out_dir, overrides)
        train(cfg, resume=args.resume, stop_at=args.stop_at, progress=not args.quiet)
    except ConfigError as e:
        print(f"python -m qkv.train: error: {e}", file=sys.stderr)
        return 2
    finally:
        distributed.teardown(distributed.from_env())
    return 0


if __name__ == "__main__":
    sys.exit(main())
