"""Induction heads on a CPU: a two-layer attention-only GPT trained on repeated random tokens.

Each training sequence is ``half`` uniformly random tokens followed by the same tokens again.
The first half cannot be predicted (its loss stays at ln(vocab)); the second half can, but only
by a model that finds the earlier copy of the current token and reads the token after it: an
induction head (Elhage et al., 2021; Olsson et al., 2022). ``half`` is drawn afresh for every
batch, so no head can solve the task by a fixed positional offset.

The model is ``qkv.pt.GPT`` itself with its MLPs set to zero and frozen: the MLP then adds
exactly 0 to the stream, which leaves attention (and the layer norms) as the only computation,
and every tool of ``qkv.pt.interp`` works on it unchanged.
"""

import time

import torch

from qkv.train import lr_at, make_config, make_optimizer

from .interp import (
    head_ablation,
    induction_scores,
    previous_token_scores,
    repeated_tokens,
    run_with_cache,
    run_with_patches,
)
from .loss import cross_entropy
from .model import GPT, GPTConfig


def attention_only(config: GPTConfig, generator: torch.Generator | None = None) -> GPT:
    """A GPT whose MLPs add nothing: their weights and biases are 0 and frozen."""
    model = GPT(config, generator=generator)
    with torch.no_grad():
        for block in model.transformer.h:
            for p in block.mlp.parameters():
                p.zero_()
                p.requires_grad_(False)  # make_optimizer skips them: they stay exactly 0
    return model


def split_losses(logits: torch.Tensor, ids: torch.Tensor, half: int) -> dict:
    """Mean cross-entropy on each half of repeated sequences.

    logits: (batch, 2*half, vocab) from model(ids);  ids: (batch, 2*half)
    returns: {"first": loss predicting tokens 1..half-1 (from positions 0..half-2),
              "repeated": loss predicting tokens half+1..2*half-1 (from positions
              half..2*half-2)}. Token ``half``, the first of the copy, is left out of both:
              nothing before it says the copy starts there.
    """
    return {"first": cross_entropy(logits[:, :half - 1], ids[:, 1:half]).item(),
            "repeated": cross_entropy(logits[:, half:-1], ids[:, half + 1:]).item()}


@torch.no_grad()
def evaluate(model: GPT, ids: torch.Tensor, half: int) -> dict:
    """Losses on both halves and every head's scores on the repeated sequences ids."""
    logits, cache = run_with_cache(model, ids, names=[
        f"blocks.{i}.attn.pattern" for i in range(model.config.n_layer)])
    patterns = [cache[f"blocks.{i}.attn.pattern"] for i in range(model.config.n_layer)]
    return dict(split_losses(logits, ids, half),
                previous_token=[previous_token_scores(p).tolist() for p in patterns],
                induction=[induction_scores(p, half).tolist() for p in patterns])


@torch.no_grad()
def ablation_losses(model: GPT, ids: torch.Tensor, half: int, how: str = "zero") -> list:
    """Repeated-half loss with each head ablated alone: [layer][head] floats."""
    cfg = model.config
    return [[split_losses(run_with_patches(model, ids, head_ablation(layer, h, how)), ids,
                          half)["repeated"] for h in range(cfg.n_head)]
            for layer in range(cfg.n_layer)]


def train_induction(config: GPTConfig, steps: int = 600, batch_size: int = 32,
                    halves: tuple[int, int] = (8, 32), lr: float = 3e-3, eval_half: int = 24,
                    eval_every: int = 25, prefix: int = 0, seed: int = 0,
                    progress: bool = True):
    """Train an attention-only GPT on repeated random tokens.

    config: the model's sizes (context_length >= 2 * halves[1])
    halves: each batch's half length is drawn uniformly from halves[0]..halves[1]
    lr: peak AdamW learning rate (qkv.train's warm-up and cosine schedule, 10% warm-up)
    prefix: each batch starts with 0..prefix extra random tokens (at most what the context
        leaves) before the repeated block, so the copy does not start at a fixed place
    eval_half, eval_every: a fixed batch of 64 sequences with half = eval_half is scored
        every eval_every steps (losses and every head's scores)
    returns: (model, history) with history = {"step": [...], "first": [...], "repeated": [...],
        "previous_token": [...], "induction": [...], "train_s": seconds in training steps}
    """
    lo, hi = halves
    if 2 * hi > config.context_length or not 2 <= lo <= hi:
        raise ValueError(f"train_induction: halves must satisfy 2 <= lo <= hi and "
                         f"2 * hi <= context_length {config.context_length}; got {halves}")
    model = attention_only(config, torch.Generator().manual_seed(seed))
    cfg = make_config(lr=lr, max_steps=steps, warmup_steps=max(1, steps // 10),
                      min_lr=lr / 10, batch_size=batch_size)
    optimizer = make_optimizer(model, cfg)
    data_gen = torch.Generator().manual_seed(seed + 1)
    eval_ids = repeated_tokens(64, eval_half, config.vocab_size,
                               torch.Generator().manual_seed(seed + 2))
    history = {k: [] for k in ("step", "first", "repeated", "previous_token", "induction")}

    def record(step):
        model.eval()
        for k, v in evaluate(model, eval_ids, eval_half).items():
            history[k].append(v)
        history["step"].append(step)
        model.train()

    from tqdm.auto import tqdm

    record(0)
    train_s = 0.0
    for step in tqdm(range(steps), disable=not progress, unit="step", mininterval=0.5):
        t0 = time.perf_counter()
        half = int(torch.randint(lo, hi + 1, (), generator=data_gen))
        room = min(prefix, config.context_length - 2 * half)
        p = int(torch.randint(0, room + 1, (), generator=data_gen))
        ids = torch.cat([torch.randint(0, config.vocab_size, (batch_size, p), generator=data_gen),
                         repeated_tokens(batch_size, half, config.vocab_size, data_gen)], dim=1)
        targets = ids[:, 1:].clone()
        targets[:, :p + half] = -1  # only the copy can be learned: the rest is pure noise
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, cfg)
        loss = cross_entropy(model(ids[:, :-1]), targets, ignore_index=-1)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        train_s += time.perf_counter() - t0
        if (step + 1) % eval_every == 0 or step + 1 == steps:
            record(step + 1)
    history["train_s"] = train_s
    return model.eval(), history
