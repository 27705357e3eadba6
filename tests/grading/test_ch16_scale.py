"""Chapter 16's exercises: FLOPs per token, training memory under ZeRO, an averaging
all-reduce on simulated ranks, gradient accumulation over micro-batches of unequal size."""

import numpy as np
import torch
from grading_meta import Declared, meta_tests

from qkv.flops import flops_per_token as lib_flops
from qkv.grading import (
    check_accumulate_gradients,
    check_all_reduce_mean,
    check_flops_per_token,
    check_training_memory,
)
from qkv.pt import GPTConfig


def flops_right(vocab, context, n_layer, d_model):
    n = 12 * n_layer * d_model**2 + vocab * d_model
    return 6 * n + 12 * n_layer * context * d_model


def flops_from_the_library(vocab, context, n_layer, d_model):  # qkv.flops, a second route
    return lib_flops(GPTConfig(vocab_size=vocab, context_length=context, n_layer=n_layer,
                               n_head=1, d_model=d_model))


def flops_by_parts(vocab, context, n_layer, d_model):
    forward = 0
    for _ in range(n_layer):
        forward += 2 * (3 * d_model * d_model + d_model * d_model + 8 * d_model * d_model)
        forward += 2 * context * d_model * 2  # scores and weighted sum
    forward += 2 * vocab * d_model
    return 3 * forward


def memory_right(n_params, world_size, stage):
    shard = [world_size if stage >= s else 1 for s in (3, 2, 1)]
    return np.array([2 * n_params / shard[0], 2 * n_params / shard[1], 12 * n_params / shard[2]])


def memory_by_table(n_params, world_size, stage):
    bytes_per = {"weights": 2, "grads": 2, "adam": 4 + 4 + 4}  # bf16, bf16, master + m + v
    sharded = {0: set(), 1: {"adam"}, 2: {"adam", "grads"}, 3: {"adam", "grads", "weights"}}
    return np.array([bytes_per[k] * n_params / (world_size if k in sharded[stage] else 1)
                     for k in ("weights", "grads", "adam")])


def memory_in_torch_float32(n_params, world_size, stage):
    n = torch.tensor(float(n_params))
    div = torch.tensor([float(world_size) if stage >= s else 1.0 for s in (3, 2, 1)])
    return torch.tensor([2.0, 2.0, 12.0]) * n / div


def reduce_with_loops(grads):
    world = len(grads)
    total = np.zeros_like(grads[0])
    for g in grads:
        total += g
    return np.stack([total / world for _ in range(world)])


def reduce_by_ring(grads):  # reduce-scatter then all-gather, chunk by chunk
    world = grads.shape[0]
    flat = [np.array_split(g.reshape(-1).copy(), world) for g in grads]
    for step in range(world - 1):
        sent = [flat[r][(r - step) % world].copy() for r in range(world)]
        for r in range(world):
            flat[(r + 1) % world][(r - step) % world] += sent[r]
    for step in range(world - 1):
        sent = [flat[r][(r + 1 - step) % world].copy() for r in range(world)]
        for r in range(world):
            flat[(r + 1) % world][(r + 1 - step) % world] = sent[r]
    return np.stack([np.concatenate(f).reshape(grads.shape[1:]) / world for f in flat])


def memory_built_from_ints(n_params, world_size, stage):  # int64 at stage 0 (nothing divided)
    weights, grads, adam = 2 * n_params, 2 * n_params, 12 * n_params
    if stage >= 1:
        adam = adam / world_size
    if stage >= 2:
        grads = grads / world_size
    if stage >= 3:
        weights = weights / world_size
    return np.array([weights, grads, adam])


def ring_without_all_gather(grads):  # the chapter's reduce-scatter, then stopped
    world = grads.shape[0]
    flat = [np.array_split(g.reshape(-1).copy(), world) for g in grads]
    for step in range(world - 1):
        sent = [flat[r][(r - step) % world].copy() for r in range(world)]
        for r in range(world):
            flat[(r + 1) % world][(r - step) % world] += sent[r]
    return np.stack([np.concatenate(f).reshape(grads.shape[1:]) / world for f in flat])


def accumulate_normalising_sizes_in_place(micro_grads, sizes):  # right values, caller's list
    total = sum(sizes)
    for k in range(len(sizes)):
        sizes[k] = sizes[k] / total
    return np.tensordot(np.asarray(sizes), micro_grads, axes=1)


def accumulate_right(micro_grads, sizes):
    sizes = np.asarray(sizes, dtype=float)
    return np.tensordot(sizes, micro_grads, axes=1) / sizes.sum()


def accumulate_as_scaled_losses(micro_grads, sizes):  # what loss / K-style scaling becomes
    total = sum(sizes)
    grad = np.zeros_like(micro_grads[0])
    for g, n in zip(micro_grads, sizes, strict=True):
        grad += g * (n / total)
    return grad


def accumulate_with_average_weights(micro_grads, sizes):
    return np.average(micro_grads, axis=0, weights=np.asarray(sizes, dtype=np.float32))


DECLARED = [
    Declared(check_flops_per_token,
             mistakes=[(lambda V, C, L, d: 2 * (12 * L * d * d + V * d) + 4 * L * C * d,
                        "forward pass only"),
                       (lambda V, C, L, d: 2 * (12 * L * d * d + V * d) + 12 * L * C * d,
                        "backward pass's 2x"),
                       (lambda V, C, L, d: 6 * (12 * L * d * d + V * d), "attention's own"),
                       (lambda V, C, L, d: 6 * (12 * L * d * d + V * d + C * d) + 12 * L * C * d,
                        "position table"),
                       (lambda V, C, L, d: 6 * (12 * L * d * d + V * d) + 6 * L * C * d,
                        "causal mask"),
                       (lambda V, C, L, d: 6 * (12 * L * d * d + V * d) + 12 * C * d,
                        "once for the whole model"),
                       (lambda V, C, L, d: 6 * (12 * L * d * d + 2 * V * d) + 12 * L * C * d,
                        "on the way in"),
                       (lambda V, C, L, d: 4 * (12 * L * d * d + V * d) + 8 * L * C * d,
                        "the same as the forward"),
                       (lambda V, C, L, d: 3 * (12 * L * d * d + V * d) + 6 * L * C * d,
                        "a multiply-add as one FLOP"),
                       (lambda V, C, L, d: 6 * (4 * L * d * d + 2 * L * d * d + V * d)
                        + 12 * L * C * d, "4 d_model wide"),
                       (lambda V, C, L, d: C * (6 * (12 * L * d * d + V * d) + 12 * L * C * d),
                        "a whole window"),
                       (lambda V, C, L, d: 6 * (12 * L * d * d + V * d) + 12 * L * C * C * d,
                        "context^2"),
                       (lambda V, C, L, d: 6 * (12 * L * d * d + 13 * L * d + 2 * d + V * d
                                                + C * d) + 12 * L * C * d,
                        "full parameter count")],
             alternatives=[flops_from_the_library, flops_by_parts]),
    Declared(check_training_memory,
             mistakes=[(lambda n, w, s: memory_right(n, w, s) * [1, 1, 8 / 12],
                        "Adam's states once"),
                       (lambda n, w, s: np.array([2.0 * n, 2 * n, 12 * n]) / w,
                        "shards everything"),
                       (lambda n, w, s: np.array([2.0 * n, 2 * n, 12 * n]), "shards nothing"),
                       (lambda n, w, s: np.array([4.0 * n, 4 * n, 8 * n / (w if s >= 1 else 1)]),
                        "autocast's accounting"),
                       (lambda n, w, s: np.array([2.0 * n, 2 * n, 12 * n])
                        / [w if s >= k else 1 for k in (2, 1, 0)], "one stage too early"),
                       (lambda n, w, s: np.array([2.0 * n, 2 * n, 12 * n])
                        / [w if s == k else 1 for k in (3, 2, 1)], "the stages add up"),
                       (lambda n, w, s: np.array([2.0 * n, 2 * n, 12 * n])
                        / [w if s >= k else 1 for k in (1, 2, 3)], "wrong order"),
                       (lambda n, w, s: np.array([4.0 * n, 4 * n, 12 * n])
                        / [w if s >= k else 1 for k in (3, 2, 1)], "20 bytes per parameter"),
                       (lambda n, w, s: memory_right(n, w, s) * w, "ONE device"),
                       (lambda n, w, s: memory_right(n, w, s)[::-1].copy(),
                        "[weights, gradients, optimizer]"),
                       (lambda n, w, s: memory_right(n, w, s) / 1e9, "gigabytes"),
                       (lambda n, w, s: memory_right(n, w, s) / 2**30, "gibibytes"),
                       (memory_built_from_ints, "dtype int64")],
             alternatives=[memory_right, memory_by_table, memory_in_torch_float32]),
    Declared(check_all_reduce_mean,
             mistakes=[(lambda g: np.stack([g.sum(0)] * len(g)), "without dividing"),
                       (lambda g: g.copy(), "nothing was reduced"),
                       (lambda g: np.stack([g[0]] * len(g)), "broadcast"),
                       (lambda g: g.mean(axis=0), "returns the mean once"),
                       (lambda g: g.mean(axis=0, keepdims=True), "returns the mean once"),
                       (lambda g: np.full_like(g, g.mean()), "a mean with no axis"),
                       (lambda g: np.stack([g.sum(0) / (len(g) - 1)] * len(g)),
                        "world_size - 1"),
                       (lambda g: np.tile(g.mean(0), (len(g), 1)), "whatever shape follows"),
                       (ring_without_all_gather, "all-gather missing"),
                       (lambda g: ring_without_all_gather(g) * len(g),
                        ["all-gather missing", "Then divide by world_size"])],
             alternatives=[reduce_with_loops, reduce_by_ring,
                           lambda g: np.broadcast_to(g.mean(axis=0), g.shape).copy()]),
    Declared(check_accumulate_gradients,
             mistakes=[(lambda g, s: g.mean(0), "plain mean"),
                       (lambda g, s: g.sum(0), "without scaling"),
                       (lambda g, s: np.tensordot(np.asarray(s, float), g, axes=1) / len(s),
                        "number of micro-batches"),
                       (lambda g, s: g[:-1].mean(0), "drops the short micro-batch"),
                       (lambda g, s: np.array(s) @ g / sum(s), "whatever shape follows"),
                       (accumulate_normalising_sizes_in_place, "changed its input sizes"),
                       (lambda g, s: (g * np.array(s, float)[:, None]).sum(0) / sum(s),
                        "whatever shape follows"),
                       (lambda g, s: sum(gk * (n / max(s)) for gk, n in zip(g, s, strict=True))
                        / len(s),
                        "as if the short one were full"),
                       (lambda g, s: np.tensordot(np.asarray(s, float), g, axes=1) / sum(s)
                        / len(s), "on top of the size weights")],
             alternatives=[accumulate_right, accumulate_as_scaled_losses,
                           accumulate_with_average_weights]),
]

globals().update(meta_tests(DECLARED))
