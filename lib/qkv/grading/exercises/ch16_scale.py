"""Chapter 16, training past one machine: FLOPs per token, the memory of AdamW training under
ZeRO sharding, an all-reduce on simulated ranks, and gradient accumulation over micro-batches
of unequal size."""

from .. import _trusted as _t
from ..engine import Case, Mistake, _normal
from ..exercise import Exercise
from ..kinds import Value

# --- FLOPs per training token ---------------------------------------------------------------------


def _reference_flops(vocab, context, n_layer, d_model):
    n = 12 * n_layer * d_model**2 + vocab * d_model  # the weights a token is multiplied by
    return 6 * n + 12 * n_layer * context * d_model


def _flops_mistakes(vocab, context, n_layer, d_model):
    V, C, L, d = vocab, context, n_layer, d_model
    n = 12 * L * d * d + V * d
    attention = 12 * L * C * d
    yield Mistake(
        "{name} counts the forward pass only (2 N + 4 n_layer context d_model). Training also "
        "runs the backward pass, which costs twice the forward (dL/dx and dL/dW, one matmul "
        "each): 6 N + 12 n_layer context d_model.",
        lambda *a: (2 * n + attention // 3))
    yield Mistake(
        "{name} forgets the backward pass's 2x for the weights (2 N instead of 6 N): the "
        "backward needs two matmuls per forward matmul.",
        lambda *a: 2 * n + attention)
    yield Mistake(
        "{name} leaves out attention's own work: per layer the scores Q K^T and the weighted "
        "sum A V cost 4 context d_model FLOPs forward, 12 n_layer context d_model for training.",
        lambda *a: 6 * n)
    yield Mistake(
        "{name} counts attention for the forward pass only (4 n_layer context d_model); its "
        "backward costs twice as much too: 12 n_layer context d_model in all.",
        lambda *a: 6 * n + attention // 3)
    yield Mistake(
        "{name} leaves out the unembedding: the logits H @ wte.T multiply by vocab x d_model "
        "weights, so N = 12 n_layer d_model^2 + vocab d_model.",
        lambda *a: 6 * (n - V * d) + attention)
    yield Mistake(
        "{name} halves attention's work for the causal mask (as Kaplan et al. do); the task "
        "counts all context positions, as the kernels compute them: 12 n_layer context d_model.",
        lambda *a: 6 * n + attention // 2)
    yield Mistake(
        "{name} counts attention's work once for the whole model; every layer has its own "
        "attention: 12 n_layer context d_model.",
        lambda *a: 6 * n + attention // L)
    yield Mistake(
        "{name} counts the embedding on the way in as multiplied too (vocab d_model twice); "
        "it is a lookup, and the tied unembedding is the one vocab x d_model matmul: "
        "N = 12 n_layer d_model^2 + vocab d_model.",
        lambda *a: 6 * (n + V * d) + attention)
    yield Mistake(
        "{name} counts the position table as multiplied; wpe (and wte on the way in) is looked "
        "up, not multiplied: N = 12 n_layer d_model^2 + vocab d_model.",
        lambda *a: 6 * (n + C * d) + attention)
    yield Mistake(
        "{name} counts the backward pass as costing the same as the forward (4 N + 8 n_layer "
        "context d_model). It costs TWICE the forward (dL/dx and dL/dW, one matmul each), so "
        "training is 3 forwards: 6 N + 12 n_layer context d_model.",
        lambda *a: 4 * n + 2 * attention // 3)
    yield Mistake(
        "{name} counts a multiply-add as one FLOP (3 N + 6 n_layer context d_model); it is two, "
        "a multiply and an add, so the forward costs 2 FLOPs per weight: 6 N + 12 n_layer "
        "context d_model for training.",
        lambda *a: 3 * n + attention // 2)
    yield Mistake(
        "{name} counts the MLP as two d_model x d_model matrices (6 n_layer d_model^2 per "
        "model); its hidden layer is 4 d_model wide, so the MLP holds 8 d_model^2 weights and a "
        "layer 12 d_model^2 in all.",
        lambda *a: 6 * (6 * L * d * d + V * d) + attention)
    yield Mistake(
        "{name} counts a whole window of context tokens; the task asks for one token: "
        "6 N + 12 n_layer context d_model (context enters only through attention, where the "
        "token meets every key and value).",
        lambda *a: (6 * n + attention) * C)
    yield Mistake(
        "{name} counts attention as context^2 per token: that is the work of a whole window. "
        "One token's query meets context keys and context values, 4 context d_model FLOPs per "
        "layer forward: 12 n_layer context d_model for training.",
        lambda *a: 6 * n + attention * C)
    yield Mistake(
        "{name} multiplies the full parameter count by 6 (with biases, layer norms and the "
        "position table: 124,439,808 for GPT-2 small). Count only the weights a token is "
        "multiplied by: N = 12 n_layer d_model^2 + vocab d_model; biases and norms are "
        "negligible and the position table is looked up.",
        lambda *a: 6 * (n + 13 * L * d + 2 * d + C * d) + attention)


def _flops_cases(hidden: bool):
    names = ("vocab", "context", "n_layer", "d_model")
    if not hidden:
        return [Case((65, 64, 4, 128), names, "These are the sizes of qkv.train's cpu-small.")]
    return [Case((50257, 1024, 12, 768), names, "These are the sizes of GPT-2 small."),
            Case((32000, 4096, 32, 4096), names, "These are the chapter's 7B sizes."),
            Case((11, 3, 1, 2), names)]


FLOPS_PER_TOKEN = Exercise(
    name="flops_per_token",
    reference=_reference_flops,
    visible=lambda: _flops_cases(False),
    hidden=lambda: _flops_cases(True),
    mistakes=_flops_mistakes,
    output=Value("count", hint="N = 12 n_layer d_model^2 + vocab d_model (the tied "
                               "unembedding); training: 6 N + 12 n_layer context d_model."),
    backends=("numpy",),
    doc="flops_per_token(vocab, context, n_layer, d_model) -> training FLOPs per token: "
        "6 (12 L d^2 + V d) + 12 L C d.",
)

# --- memory per device, mixed precision AdamW under ZeRO ------------------------------------------


def _memory(n_params, world_size, stage, *, w=2, g=2, opt=12, shard_from=(3, 2, 1)):
    """[weights, gradients, optimizer] bytes per device; stage s shards what stage s covers."""
    wst, gst, ost = shard_from
    return _t.asarray([w * n_params / (world_size if stage >= wst else 1),
                       g * n_params / (world_size if stage >= gst else 1),
                       opt * n_params / (world_size if stage >= ost else 1)], dtype=_t.float64)


def _reference_memory(n_params, world_size, stage):
    return _memory(n_params, world_size, stage)


def _memory_mistakes(n_params, world_size, stage):
    def m(**knobs):
        return lambda *a: _memory(*a, **knobs)

    yield Mistake(
        "{name} counts Adam's states once: AdamW keeps TWO moments (m and v, 4 bytes each) "
        "besides the float32 master weights (4 bytes): 12 bytes per parameter.",
        m(opt=8))
    yield Mistake(
        "{name} keeps the gradients in float32 (4 bytes); under mixed precision they are 16-bit "
        "like the weights: 2 bytes per parameter.",
        m(g=4))
    yield Mistake(
        "{name} keeps the weights in float32 (4 bytes); under mixed precision the working copy "
        "is 16-bit: 2 bytes per parameter (the float32 master copy is in the optimizer state).",
        m(w=4))
    yield Mistake(
        "{name} counts float32 weights and gradients and the two moments (4 + 4 + 8 bytes): "
        "that is autocast's accounting, with the same 16 bytes in all. The task asks for ZeRO's: "
        "16-bit weights and gradients (2 + 2), and in the optimizer state a float32 master copy "
        "besides m and v (4 + 4 + 4).",
        m(w=4, g=4, opt=8))
    yield Mistake(
        "{name} shards only one part at each stage (stage 2 the gradients alone); the stages "
        "add up: stage 2 shards the optimizer state and the gradients, stage 3 all three.",
        lambda n, w, s: _memory(n, w, s, shard_from=tuple(x if x == s else 99 for x in (3, 2, 1))))
    yield Mistake(
        "{name} shards one stage too early: stage 1 shards the optimizer state only (the "
        "gradients wait for stage 2, the weights for stage 3), and stage 0 shards nothing.",
        m(shard_from=(2, 1, 0)))
    for always in (0, 1):  # from stage 0 on, or from stage 1 on
        yield Mistake(
            "{name} shards everything at every stage. Stage 0 shards nothing, stage 1 the "
            "optimizer state only, stage 2 also the gradients, stage 3 also the weights.",
            m(shard_from=(always,) * 3))
    yield Mistake(
        "{name} shards nothing: at stage 1 and above each device keeps 1/world_size of the "
        "optimizer state (stage 2: of the gradients too; stage 3: of the weights too).",
        m(shard_from=(99, 99, 99)))
    yield Mistake(
        "{name} shards the parts in the wrong order: stage 1 shards the optimizer state (12 of "
        "the 16 bytes, the biggest saving), stage 2 also the gradients, stage 3 also the weights.",
        m(shard_from=(1, 2, 3)))
    yield Mistake(
        "{name} keeps float32 weights and gradients (4 + 4) AND a float32 master copy with the "
        "moments (12): 20 bytes per parameter. Under ZeRO's mixed precision the working weights "
        "and gradients are 16-bit (2 + 2); the only float32 weights are the master copy.",
        m(w=4, g=4))
    yield Mistake(
        "{name} adds up the bytes of all world_size devices; the task asks for ONE device: a "
        "sharded part is its total / world_size there, a part that is not sharded is all of it.",
        lambda n, w, s: _memory(n, w, s) * w)
    yield Mistake(
        "{name} returns [optimizer, gradients, weights]; return the three parts in the task's "
        "order: [weights, gradients, optimizer].",
        lambda *a: _memory(*a)[::-1])
    for unit, size in (("gigabytes (1e9 bytes)", 1e9), ("gibibytes (2**30 bytes)", 2**30)):
        yield Mistake(
            "{name} returns " + unit + "; return bytes (the task's example: [2e6, 2e6, 3e6] for "
            "a million parameters on 4 devices at stage 1).",
            lambda *a, size=size: _memory(*a) / size)


def _memory_cases(hidden: bool):
    names = ("n_params", "world_size", "stage")
    if not hidden:  # stage 0 too: an answer built from ints is int64 there, and must say so
        return [Case((1_000_000, 4, 0), names, "Stage 0 is plain data parallelism (DDP)."),
                Case((1_000_000, 4, 1), names), Case((1_000_000, 4, 2), names),
                Case((1_000_000, 4, 3), names)]
    return [Case((124_439_808, 8, 0), names, "Stage 0 is plain data parallelism (DDP)."),
            Case((124_439_808, 8, 2), names),
            Case((6_592_012_288, 64, 3), names),
            Case((1000, 1, 3), names, "world_size 1: nothing to shard over.")]


TRAINING_MEMORY = Exercise(
    name="training_memory",
    reference=_reference_memory,
    visible=lambda: _memory_cases(False),
    hidden=lambda: _memory_cases(True),
    mistakes=_memory_mistakes,
    backends=("numpy",),
    doc="training_memory(n_params, world_size, stage) -> [weights, gradients, optimizer] bytes "
        "per device, mixed-precision AdamW (2 + 2 + 12 bytes per parameter), ZeRO stage 0-3.",
)

# --- all-reduce on simulated ranks ----------------------------------------------------------------


def _reference_all_reduce(grads):
    total = grads[0] * 0.0
    for g in grads:
        total = total + g
    mean = total / _t.len_(grads)
    return _t.asarray([mean for _ in grads], dtype=_t.float64)


def _all_reduce_mistakes(grads):
    world = _t.len_(grads)
    right = _reference_all_reduce(grads)
    yield Mistake(
        "{name} sums the gradients without dividing by the number of ranks; each rank's "
        "gradient is the mean over its own windows, so the big batch's gradient is their "
        "MEAN: sum / world_size.",
        lambda g: right * world)
    yield Mistake(
        "{name} gives each rank its own gradient back: nothing was reduced. Every rank must end "
        "with the same array, the mean over ranks.",
        lambda g: _t.asarray(g, dtype=_t.float64))
    yield Mistake(
        "{name} copies rank 0's gradient to every rank (a broadcast); an all-reduce combines "
        "every rank's gradient: the mean over axis 0.",
        lambda g: _t.asarray([g[0] for _ in g], dtype=_t.float64))
    yield Mistake(
        "{name} averages over each rank's own entries (the wrong axis); average over the ranks, "
        "axis 0, entry by entry.",
        lambda g: _t.asarray(g, dtype=_t.float64) * 0.0
        + _t.asarray(g, dtype=_t.float64).mean(axis=tuple(range(1, g.ndim)), keepdims=True))
    once = ("{name} returns the mean once; after an all-reduce EVERY rank holds it, so return "
            "one copy per rank: the shape of grads, (world_size, ...), e.g. with np.stack or "
            "np.broadcast_to(...).copy().")
    yield Mistake(once, lambda g: right[0])
    yield Mistake(once, lambda g: right[:1])
    yield Mistake(
        "{name} averages over every entry of every rank (a mean with no axis); average over the "
        "ranks only, axis 0, entry by entry.",
        lambda g: right * 0.0 + _t.asarray(g, dtype=_t.float64).mean())
    if world > 1:
        yield Mistake(
            "{name} divides the sum by world_size - 1; the mean over world_size ranks divides by "
            "world_size (the ring's world_size - 1 steps per phase are not the divisor).",
            lambda g: right * world / (world - 1))


def _explain_all_reduce(probe, got, args, case):
    """A ring simulated without its all-gather: each rank holds a different part of the result
    (its fully reduced chunk) and something else elsewhere."""
    grads = _t.asarray(args[0], dtype=_t.float64)
    world = _t.len_(grads)
    if world < 2 or got.shape != grads.shape:
        return None
    mean = _reference_all_reduce(grads)
    for target, divided in ((mean, True), (mean * world, False)):
        right = _t.close_where(got, target, **_t.tolerances["float32_op"]).reshape(world, -1)
        every_rank_part = all(0 < int(r.sum()) < r.size for r in right)
        if every_rank_part and bool(right.any(axis=0).all()):
            return ("Each rank holds the " + ("mean" if divided else "sum") + " on some entries "
                    "only, a different part on each rank: that is a ring after its "
                    "reduce-scatter, with the all-gather missing. In the all-gather each rank "
                    "passes its fully reduced chunk on, world_size - 1 times, until every rank "
                    "holds every chunk." + ("" if divided else " Then divide by world_size."))
    return None


_ANY_SHAPE = ("Each rank's gradient is a matrix here: the ranks are axis 0, whatever shape "
              "follows (np.tile(mean, (world_size, 1)) only fits 1-D gradients; "
              "np.stack([mean] * world_size) fits any).")


def _all_reduce_cases(hidden: bool):
    if not hidden:  # a matrix too, so code that only fits 1-D gradients fails here, visibly
        return [Case((_normal(_t.default_rng(16), 4, 6),), ("grads",)),
                Case((_normal(_t.default_rng(15), 3, 2, 4),), ("grads",), _ANY_SHAPE,
                     _ANY_SHAPE)]
    return [Case((_normal(_t.default_rng(17), 2, 3, 5),), ("grads",), _ANY_SHAPE, _ANY_SHAPE),
            Case((_normal(_t.default_rng(18), 8, 33),), ("grads",), "This case has 8 ranks."),
            Case((_normal(_t.default_rng(19), 1, 4),), ("grads",), "This case has one rank.")]


ALL_REDUCE_MEAN = Exercise(
    name="all_reduce_mean",
    reference=_reference_all_reduce,
    visible=lambda: _all_reduce_cases(False),
    hidden=lambda: _all_reduce_cases(True),
    mistakes=_all_reduce_mistakes,
    explain=_explain_all_reduce,
    backends=("numpy",),
    doc="all_reduce_mean(grads) -> what every rank holds after an averaging all-reduce: "
        "grads (world_size, ...) -> (world_size, ...), each row the mean over ranks.",
)

# --- gradient accumulation with unequal micro-batches ---------------------------------------------


def _reference_accumulate(micro_grads, sizes):
    total, count = micro_grads[0] * 0.0, 0
    for g, n in zip(micro_grads, sizes, strict=True):
        total = total + g * float(n)
        count += int(n)
    return _t.asarray(total / count, dtype=_t.float64)


def _accumulate_mistakes(micro_grads, sizes):
    k = _t.len_(micro_grads)
    right = _reference_accumulate(micro_grads, sizes)
    plain = _t.asarray(micro_grads, dtype=_t.float64).mean(axis=0)
    yield Mistake(
        "{name} takes the plain mean of the micro-batch gradients; they are means over "
        "different numbers of windows, so weight each by its size: sum(n_k g_k) / sum(n_k).",
        lambda g, s: plain)
    yield Mistake(
        "{name} adds the micro-batch gradients without scaling (what loss.backward() does if "
        "each micro-batch's loss is not divided): the result is too large.",
        lambda g, s: plain * k)
    yield Mistake(
        "{name} weights by size but does not divide by the total number of windows: "
        "sum(n_k g_k) / sum(n_k).",
        lambda g, s: right * float(sum(int(n) for n in s)))
    yield Mistake(
        "{name} weights by size and divides by the number of micro-batches; divide by the "
        "number of windows, sum(n_k).",
        lambda g, s: right * float(sum(int(n) for n in s)) / k)
    if k > 1 and int(sizes[-1]) < max(int(n) for n in sizes):
        yield Mistake(
            "{name} drops the short micro-batch; its windows count too: weight every "
            "micro-batch by its size, sum(n_k g_k) / sum(n_k).",
            lambda g, s: _t.asarray(micro_grads[:-1], dtype=_t.float64).mean(axis=0))
    yield Mistake(
        "{name} divides by K full micro-batches (K x the largest size), as if the short one "
        "were full; divide by the windows that are there, sum(n_k).",
        lambda g, s: right * float(sum(int(n) for n in s)) / (k * max(int(n) for n in s)))
    yield Mistake(
        "{name} divides by K on top of the size weights; the weights n_k / sum(n_k) already "
        "add up to 1: sum(n_k g_k) / sum(n_k).",
        lambda g, s: right / k)


_WEIGHT_AXIS_0 = ("Each micro-batch's gradient is a matrix here: weight along axis 0, whatever "
                  "shape follows (sizes @ micro_grads and sizes[:, None] only fit 1-D gradients; "
                  "np.tensordot(sizes, micro_grads, axes=1) or a loop over k fits any).")


def _accumulate_cases(hidden: bool):
    names = ("micro_grads", "sizes")
    if not hidden:  # a matrix too, so code that only fits 1-D gradients fails here, visibly
        return [Case((_normal(_t.default_rng(26), 3, 5), [4, 4, 2]), names,
                     "The last micro-batch holds 2 windows, the others 4."),
                Case((_normal(_t.default_rng(25), 3, 2, 3), [2, 2, 1]), names, _WEIGHT_AXIS_0,
                     _WEIGHT_AXIS_0)]
    return [Case((_normal(_t.default_rng(27), 2, 3, 4), [3, 1]), names, _WEIGHT_AXIS_0,
                 _WEIGHT_AXIS_0),
            Case((_normal(_t.default_rng(28), 4, 7), [5, 5, 5, 5]), names,
                 "Equal sizes here: the weighted mean is the plain mean."),
            Case((_normal(_t.default_rng(29), 1, 6), [7]), names, "This case has one micro-batch.")]


ACCUMULATE_GRADIENTS = Exercise(
    name="accumulate_gradients",
    reference=_reference_accumulate,
    visible=lambda: _accumulate_cases(False),
    hidden=lambda: _accumulate_cases(True),
    mistakes=_accumulate_mistakes,
    backends=("numpy",),
    doc="accumulate_gradients(micro_grads, sizes) -> the gradient of the mean loss over all "
        "windows: micro_grads (K, ...) are per-micro-batch mean gradients, sizes (K,) their "
        "window counts.",
)

EXERCISES = [FLOPS_PER_TOKEN, TRAINING_MEMORY, ALL_REDUCE_MEAN, ACCUMULATE_GRADIENTS]
