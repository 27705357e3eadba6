"""What a training run depends on: ``TrainConfig`` (every hyperparameter, with its help text),
the named presets, the command line built from them, and the config a ``--resume`` continues with.
``qkv.train`` runs the loop; everything here is re-exported there.
"""

import argparse
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch


class ConfigError(ValueError):
    """Bad input to a training run (corpus, preset, sizes): the CLI prints it as one line."""


def _f(help_text: str, default):
    return field(default=default, metadata={"help": help_text})


@dataclass
class TrainConfig:
    """Everything a run depends on. The defaults are the cpu-small preset."""

    data: str | None = _f("corpus text file; default: $QKV_DATA, else ../shared/data/"
                          "tinyshakespeare.txt beside the repository, else a download into "
                          "~/.cache/qkv (sha256-checked)", None)
    out_dir: str | None = _f("folder for ckpt.pt, loss.png and sample.txt "
                             "(default: out-PRESET)", None)
    # model
    n_layer: int = _f("decoder blocks", 4)
    n_head: int = _f("attention heads per block (must divide d_model)", 4)
    d_model: int = _f("residual stream width", 128)
    context_length: int = _f("tokens the model sees at once (and the length of each "
                             "training window)", 64)
    tokenizer: str = _f("char (one token per character) or bpe (byte-level BPE trained on "
                        "the training split, cached as OUT_DIR/tokenizer.json)", "char")
    vocab_size: int = _f("bpe only: 256 bytes + merges", 512)
    dropout: float = _f("dropout on the input embeddings while training", 0.0)
    bias: bool = _f("biases in linear layers and layer norms", True)
    norm: str = _f("layer (LayerNorm, GPT-2) or rms (RMSNorm, Llama)", "layer")
    position: str = _f("learned (a wpe table, GPT-2) or rope (rotary, Llama)", "learned")
    mlp: str = _f("gelu (GPT-2) or swiglu (Llama; d_ff 8/3 d_model keeps the parameters)",
                  "gelu")
    n_kv_head: int = _f("key/value heads for grouped-query attention (0: n_head)", 0)
    qk_norm: bool = _f("RMS-normalise each head's q and k before the dot product", False)
    # optimisation
    batch_size: int = _f("windows per micro-batch on each process", 12)
    max_steps: int = _f("optimizer steps; the cosine schedule ends here", 2000)
    lr: float = _f("peak learning rate, reached at the end of warm-up", 4e-3)
    min_lr: float = _f("learning rate at the end of the cosine decay", 1e-4)
    warmup_steps: int = _f("steps of linear warm-up from lr/warmup_steps to lr", 100)
    weight_decay: float = _f("AdamW weight decay, on matrices (ndim >= 2) only", 0.1)
    beta1: float = _f("AdamW beta1 (momentum of the gradient mean)", 0.9)
    beta2: float = _f("AdamW beta2 (momentum of the squared gradient)", 0.99)
    grad_clip: float = _f("clip the global gradient norm to this (0: no clipping)", 1.0)
    grad_accum: int = _f("micro-batches per optimizer step on each process (global batch = "
                         "batch_size x processes x grad_accum)", 1)
    dtype: str = _f("auto (bfloat16 on CUDA, float32 on CPU), float32 or bfloat16 (autocast; "
                    "weights, gradients and the loss stay float32)", "auto")
    parallel: str = _f("under torchrun: ddp (a full copy per process) or fsdp (weights, "
                       "gradients and AdamW state sharded over the processes)", "ddp")
    # evaluation and the rest
    eval_interval: int = _f("evaluate and save a checkpoint every this many steps", 100)
    eval_iters: int = _f("batches per split for each evaluation (fixed batches, so evaluations "
                         "compare)", 20)
    sample_tokens: int = _f("characters to generate at the end (0: none)", 300)
    seed: int = _f("seeds weights, batches and dropout: same seed, same losses (on CPU)", 1337)
    device: str = _f("cpu, cuda, cuda:N or auto (cuda if available)", "auto")


PRESETS = {
    # ~0.8M parameters; 2000 steps of 12 x 64 tokens on two CPU cores.
    "cpu-small": {},
    # cpu-small's size with chapter 14's pieces (RoPE, RMSNorm, SwiGLU, QK-norm, no biases) on a
    # schedule 2.5x shorter: val <= 1.88 by step ~600-700 (book/data/modern_ablation.json has
    # the ablation; benchmarks/training.py times it against nanoGPT's layout).
    "cpu-modern": dict(position="rope", norm="rms", mlp="swiglu", qk_norm=True, bias=False,
                       max_steps=800, lr=3e-3, warmup_steps=40),
    # ~10.7M parameters (nanoGPT's shakespeare-char model) for one GPU.
    "gpu-baby": dict(n_layer=6, n_head=6, d_model=384, context_length=256, batch_size=64,
                     dropout=0.2, max_steps=2500, lr=2e-3, min_lr=2e-4, warmup_steps=100,
                     eval_interval=500, eval_iters=40, sample_tokens=500),
}


def make_config(preset: str = "cpu-small", **overrides) -> TrainConfig:
    """A preset's TrainConfig with some fields replaced (None values are ignored)."""
    if preset not in PRESETS:
        raise ConfigError(f"unknown preset {preset!r}; known presets: {', '.join(PRESETS)}")
    values = {**PRESETS[preset], **{k: v for k, v in overrides.items() if v is not None}}
    cfg = TrainConfig(**values)
    if cfg.out_dir is None:
        cfg.out_dir = f"out-{preset}"
    return cfg


# Fields a resumed run may change; anything else would make it a different run.
RESUMABLE = {"data", "out_dir", "max_steps", "eval_interval", "eval_iters", "sample_tokens",
             "device", "grad_accum", "parallel"}  # grad_accum: checked by _check_global_batch


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m qkv.train",
        description="Train a character-level GPT on a text file (or a BPE-level one, with "
                    "--tokenizer bpe). A preset sets every hyperparameter; any flag below "
                    "overrides the preset's value.",
        epilog="presets: " + "; ".join(
            f"{name}: " + (", ".join(f"{k}={v}" for k, v in values.items()) or "the defaults")
            for name, values in PRESETS.items()))
    parser.add_argument("--preset", default="cpu-small", metavar="NAME",
                        help=f"named set of hyperparameters: {', '.join(PRESETS)} "
                             f"(default: cpu-small)")
    parser.add_argument("--resume", action="store_true",
                        help="continue from OUT_DIR/ckpt.pt with the same losses as an "
                             "uninterrupted run (the checkpoint's hyperparameters are kept)")
    parser.add_argument("--stop-at", type=int, metavar="STEP",
                        help="stop after this step and save a checkpoint (the learning-rate "
                             "schedule still runs to --max-steps)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.add_argument("--threads", type=int, metavar="N",
                        help="CPU threads for torch (default: torch's choice, one per core); "
                             "on a busy machine 1 can be much faster than 2")
    for f in fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        default = getattr(TrainConfig, f.name)
        if f.type is bool or f.type == "bool":
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None,
                                help=f"{f.metadata['help']} (cpu-small: {default})")
            continue
        kind = {"int": int, "float": float}.get(getattr(f.type, "__name__", str(f.type)), str)
        suffix = "" if default is None else f" (cpu-small: {default})"
        parser.add_argument(flag, type=kind, default=None, metavar=f.name.upper(),
                            help=f.metadata["help"] + suffix)
    return parser


def resume_config(out_dir, overrides: dict) -> TrainConfig:
    """The config saved in out_dir/ckpt.pt, with RESUMABLE fields replaced from ``overrides``
    (field name -> value; None keeps the saved value)."""
    path = Path(out_dir) / "ckpt.pt"
    if not path.is_file():
        raise ConfigError(f"--resume: no checkpoint at {path}")
    saved = torch.load(path, map_location="cpu", weights_only=True)["config"]
    fixed = [k for k, v in overrides.items() if v is not None and k not in RESUMABLE]
    if fixed:
        raise ConfigError("--resume keeps the checkpoint's hyperparameters; drop "
                          + ", ".join("--" + k.replace("_", "-") for k in fixed))
    changes = {k: v for k, v in overrides.items() if v is not None}
    return TrainConfig(**{**saved, **changes, "out_dir": str(out_dir)})
