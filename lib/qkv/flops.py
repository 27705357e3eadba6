"""Accounting for a GPT: parameters, FLOPs per token, model FLOPs utilisation, training memory.

FLOPs (one multiply-add = 2 FLOPs). A token's forward pass multiplies its d_model-vector by
every weight matrix once: 2 FLOPs per matrix weight, so 2 * N_matmul, where N_matmul counts the
weights of the linear layers (12 * n_layer * d_model^2 in GPT-2's layout; chapter 14's
grouped-query attention and SwiGLU change the count) and the unembedding
(vocab * d_model); embeddings are looked up, not multiplied, and biases, norms and GELU are
a rounding error. Attention adds, per layer, the scores Q K^T and the weighted sum A V: each a
dot product of length d_model with each of the seq positions, 2 * 2 * seq * d_model FLOPs
(counted over all seq positions, as the kernels compute them and as PaLM's MFU counts them;
the causal mask makes half of them zeros, which Kaplan et al. 2020 count away). The backward
pass costs twice the forward (for y = x W it needs dL/dx = dL/dy W^T and dL/dW = x^T dL/dy, two
matmuls of the forward's size), so training costs 3x the forward:

    flops_per_token = 6 * N_matmul + 12 * n_layer * seq * d_model

Memory (bytes). Training with AdamW keeps, per parameter, the weight, its gradient and Adam's
two moments: 4 + 4 + 8 = 16 bytes in float32, and still 16 under mixed precision (float32
weights and states, as autocast and ZeRO's accounting have it). Activations: what autograd
saves for the backward pass, which grows with batch * seq; ``activation_bytes`` counts the
tensors this library's fused float32 path saves (tests/test_flops.py checks it against the
bytes autograd actually holds). Around the loss three (batch, seq, vocab) tensors exist at
once (``loss_bytes``); ``measured_peak_bytes`` measures a training step's real peak.
"""

import os
import sys
from contextlib import contextmanager

from qkv.pt.model import GPTConfig

# Dense (no sparsity) bfloat16 tensor-core peaks from NVIDIA's data sheets, FLOP/s. Longest
# name first: "H100 PCIe" must win over "H100".
PEAK_BF16_FLOPS = {
    "H100 PCIe": 756e12,
    "H100 NVL": 835e12,
    "H100": 989e12,  # SXM
    "H200": 989e12,
    "A100": 312e12,
    "L40S": 362e12,
    "L4": 121e12,
    "RTX 4090": 165e12,
    "V100": 125e12,  # float16 (V100 has no bfloat16)
}


def _matrices_per_block(config: GPTConfig) -> int:
    """Weights of one block's matrices: c_attn (d_model x (n_head + 2 n_kv_head) d_head),
    attention's c_proj (d_model^2) and the MLP (d_model x d_ff twice; three times for SwiGLU's
    gate, up and down). GPT-2's layout: 3 + 1 + 4 + 4 = 12 d_model^2. Grouped-query attention
    narrows c_attn; SwiGLU's d_ff of 8/3 d_model keeps the MLP near 8 d_model^2."""
    d = config.d_model
    d_head = d // config.n_head
    qkv = (config.n_head + 2 * (config.n_kv_head or config.n_head)) * d_head
    mlp = (3 if config.mlp == "swiglu" else 2) * config.hidden
    return d * (qkv + d + mlp)


def count_parameters(config: GPTConfig) -> int:
    """Parameters of a GPT (the tied wte/lm_head once): equals sum(p.numel() for p in model)."""
    d = config.d_model
    d_head = d // config.n_head
    qkv = (config.n_head + 2 * (config.n_kv_head or config.n_head)) * d_head
    mlp_width = (2 if config.mlp == "swiglu" else 1) * config.hidden
    norm = 2 * d if config.bias and config.norm == "layer" else d  # gain (and shift)
    biases = qkv + d + mlp_width + d if config.bias else 0
    qk_norm = 2 * d_head if config.qk_norm else 0  # one scale for q's heads, one for k's
    per_block = _matrices_per_block(config) + biases + 2 * norm + qk_norm
    positions = config.context_length * d if config.position == "learned" else 0
    unembed = 0 if config.tie_embeddings else config.vocab_size * d
    return config.vocab_size * d + positions + config.n_layer * per_block + norm + unembed


def matmul_params(config: GPTConfig) -> int:
    """The weights a token is multiplied by: every block's matrices and the unembedding
    (12 n_layer d_model^2 + vocab d_model in GPT-2's layout)."""
    return config.n_layer * _matrices_per_block(config) + config.vocab_size * config.d_model


def attention_flops_per_token(config: GPTConfig, seq: int | None = None) -> int:
    """Forward FLOPs of Q K^T and A V for one token: 4 * n_layer * seq * d_model."""
    seq = config.context_length if seq is None else seq
    return 4 * config.n_layer * seq * config.d_model


def flops_per_token(config: GPTConfig, seq: int | None = None, *, training: bool = True) -> int:
    """FLOPs to process one token of a (batch, seq) window: forward 2 * N_matmul + attention;
    training (forward + backward) three times that. seq defaults to config.context_length."""
    forward = 2 * matmul_params(config) + attention_flops_per_token(config, seq)
    return 3 * forward if training else forward


def peak_flops(device_name: str) -> float | None:
    """The bfloat16 dense peak of a GPU named like torch.cuda.get_device_name(); None if the
    table does not know it (then MFU is reported as unknown)."""
    for key in sorted(PEAK_BF16_FLOPS, key=len, reverse=True):
        if key.lower() in device_name.lower():
            return PEAK_BF16_FLOPS[key]
    return None


def mfu(flops_per_token: float, tokens_per_s: float, peak: float | None,
        n_devices: int = 1) -> float | None:
    """Model FLOPs utilisation (Chowdhery et al. 2022): the FLOP/s the model's arithmetic
    needs at this throughput, over the peak of the devices doing it. None if peak is None."""
    if peak is None:
        return None
    return flops_per_token * tokens_per_s / (peak * n_devices)


def activation_bytes(config: GPTConfig, batch: int, seq: int | None = None,
                     dtype_bytes: int = 4) -> int:
    """Bytes autograd keeps for the backward pass of this library's fused float32 path.

    Per block and token, GPT-2's layout keeps 16 d_model + 4 + n_head numbers: the block
    input, ln_1's output, Q|K|V (3 d_model), attention's output, the residual after attention,
    ln_2's output, the MLP's hidden layer before and after GELU (4 d_model each), each layer
    norm's mean and 1/std (2 each), and the attention kernel's log-sum-exp per head (n_head).
    After the blocks: ln_f's input and output (2 d_model), its mean and 1/std, the
    log-softmax over the vocabulary (vocab), and the int64 token ids (8 bytes).

    Chapter 14's switches change what is kept (each measured with saved_tensors_hooks):
    - norm "rms": x / rms(x) before the gain (d_model) and 1/rms (1), for LayerNorm's 2 stats.
    - mlp "swiglu": gate|up (2 d_ff), SiLU(gate) and the product (d_ff each): 4 d_ff.
    - qk_norm: per query and key head its 1/rms and its normalised vector.
    - rope or qk_norm: q and k are new tensors laid out (batch, n_head, seq, d_head); the
      attention output follows q's layout, so merging the heads copies it (d_model more). The
      cos/sin tables (seq x d_head in all) are kept once.
    - n_kv_head < n_head: Q|K|V is narrower, but the repeated keys and values are new
      (d_model each); with rope and no qk_norm nothing keeps Q|K|V itself.
    - dropout > 0 (on the embeddings, while training): its scaled mask, d_model per token.
    """
    seq = config.context_length if seq is None else seq
    d, h = config.d_model, config.n_head
    d_head = d // h
    g = config.n_kv_head or h  # key/value heads
    rope, qk_norm, grouped = config.position == "rope", config.qk_norm, g < h
    norm = (d + 1) if config.norm == "rms" else 2  # besides the norm's output
    mlp = 4 * config.hidden if config.mlp == "swiglu" else 8 * d
    new_qk = rope or qk_norm  # rotated or normalised: q and k are copies
    attention = h + d  # log-sum-exp and the output
    if not (rope and grouped and not qk_norm):
        attention += (h + 2 * g) * d_head  # Q|K|V, kept through a view of it
    attention += d * (new_qk + (new_qk or grouped) + grouped)  # copies of q, k, v
    attention += d * new_qk  # the merged heads, when the output is (batch, n_head, ...)
    if qk_norm:
        attention += (h + g) * (1 + d_head)
    per_block = d + (d + norm) + attention + d + (d + norm) + mlp
    per_token = config.n_layer * per_block + 2 * d + norm + config.vocab_size
    per_token += d if config.dropout > 0 else 0  # dropout's mask on the embeddings, as float32
    tables = seq * d_head if rope else 0
    return batch * seq * (per_token * dtype_bytes + 8) + tables * dtype_bytes


def loss_bytes(config: GPTConfig, batch: int, seq: int | None = None,
               dtype_bytes: int = 4) -> int:
    """Bytes that exist only around the loss, at the start of the backward pass: the logits
    (the caller still holds them), the gradient of the log-probabilities and the gradient of
    the logits, three (batch, seq, vocab) tensors beside the saved log-softmax. With a 50k
    vocabulary they outweigh a small model's activations.
    """
    seq = config.context_length if seq is None else seq
    return 3 * batch * seq * config.vocab_size * dtype_bytes


def training_memory(config: GPTConfig, batch: int, seq: int | None = None, *,
                    world_size: int = 1, shard: bool = False) -> dict:
    """Bytes per device to train with AdamW in float32 (or bf16 autocast: the same states).

    shard: FSDP/ZeRO-3, where parameters, gradients and Adam's moments are split over
        world_size devices (activations are not: each device runs its own micro-batch).
    returns: dict of parameters, gradients, optimizer, activations, logits (loss_bytes) and
        total (bytes). The total is a slight over-estimate of the peak: it counts every
        gradient and every activation at once, while the backward pass frees activations as
        it fills gradients (tests/test_flops.py measures the peak: 80-100 % of the total).
    """
    n = count_parameters(config)
    split = world_size if shard else 1
    out = {"parameters": 4 * n / split, "gradients": 4 * n / split,
           "optimizer": 2 * 4 * n / split, "activations": activation_bytes(config, batch, seq),
           "logits": loss_bytes(config, batch, seq)}
    out["total"] = sum(out.values())
    return out


def measured_peak_bytes(step, model, optimizer) -> int:
    """The most bytes allocated at once while ``step()`` runs one training step of ``model``.

    CUDA: torch.cuda.max_memory_allocated() over the step (everything on the model's device,
        the batch included).
    CPU, which keeps no such counter: the bytes of the tensors that outlive the step (the
        weights and the optimizer's state; the gradients are set to None first) plus the
        peak of the bytes torch's CPU allocator hands out during it, replayed from the
        allocation and free events that torch.profiler records.
    """
    import torch

    optimizer.zero_grad(set_to_none=True)
    device = next(model.parameters()).device
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        step()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device)
    from torch.profiler import ProfilerActivity, profile

    def nbytes(t):
        return t.numel() * t.element_size() if torch.is_tensor(t) else 0

    resident = sum(nbytes(p) for p in model.parameters()) + sum(
        nbytes(t) for state in optimizer.state.values() for t in state.values())
    prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
    with _c_stderr_silenced():  # the profiler logs its start and stop from C++
        prof.start()
    try:
        step()
    finally:
        with _c_stderr_silenced():
            prof.stop()
    events = getattr(getattr(prof.profiler, "kineto_results", None), "events", None)
    if events is None:
        raise RuntimeError("measured_peak_bytes: this torch's profiler does not expose its "
                           "allocation events (prof.profiler.kineto_results.events())")
    live = peak = 0
    for e in sorted((e for e in events() if e.name() == "[memory]"), key=lambda e: e.start_ns()):
        live += e.nbytes()  # > 0 for an allocation, < 0 for a free
        peak = max(peak, live)
    return resident + peak


@contextmanager
def _c_stderr_silenced():
    """File descriptor 2 points at /dev/null meanwhile: a line written there from C++ would
    otherwise reach a notebook's stderr (and a graded cell that writes to stderr scores 0)."""
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def throughput_report(config: GPTConfig, tokens_per_s: float, device, n_devices: int = 1):
    """(one line for the log, MFU or None): FLOPs per token, achieved FLOP/s and, on CUDA, MFU
    against the device's bfloat16 peak ("unknown device" if the table lacks it)."""
    per_token = flops_per_token(config)
    line = (f"{per_token:.3g} FLOPs/token (6N + attention) x {tokens_per_s:,.0f} tokens/s "
            f"= {per_token * tokens_per_s:.3g} FLOP/s")
    if getattr(device, "type", device) != "cuda":
        return line + "; MFU: not computed on the CPU", None
    import torch

    name = torch.cuda.get_device_name(device)
    util = mfu(per_token, tokens_per_s, peak_flops(name), n_devices)
    if util is None:
        return line + f"; MFU: unknown device {name!r}", None
    return line + f"; MFU {util:.1%} of {n_devices} x {name}'s bf16 peak", util
