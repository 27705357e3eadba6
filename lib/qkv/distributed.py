"""Training on several processes: torchrun's environment, DDP or FSDP, and each rank's batch.

``torchrun --standalone --nproc_per_node=N -m qkv.train ...`` starts N copies of the training
script and tells each who it is through environment variables (RANK, LOCAL_RANK, WORLD_SIZE,
MASTER_ADDR, MASTER_PORT). Every copy builds the same model from the same seed, trains on its
own slice of the global batch, and before each optimizer step the gradients are averaged over
all copies (an all-reduce), so every copy takes the same step and the weights stay equal.

Two ways to hold the weights:
- ``ddp``: DistributedDataParallel (Li et al. 2020) keeps a full copy of the weights, the
  gradients and the optimizer state on every rank and all-reduces gradients in buckets while
  the backward pass is still running.
- ``fsdp``: ``torch.distributed.fsdp.fully_shard`` (FSDP2; Zhao et al. 2023, after ZeRO-3 of
  Rajbhandari et al. 2020) keeps 1/N of every parameter, gradient and optimizer state per rank,
  all-gathers a block's weights just before it runs and reduce-scatters its gradients after.

The batch: a step trains on ``batch * world_size * grad_accum`` windows (the global batch). All
ranks draw the global batch's offsets from one generator seeded with the run's seed, and rank r
keeps, for micro-step k, windows ``(k * world_size + r) * batch`` up to the next ``batch``. So
a step sees the same windows whether it runs as 1 process with a batch of 2B, 2 processes with
B each, or 1 process accumulating 2 micro-batches of B: the runs agree up to float rounding, and
a checkpoint resumes on another number of processes. (nanoGPT instead seeds each rank with
seed + rank: just as random, but then the run depends on the number of processes.)
"""

import os
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    """Who this process is: rank in [0, world_size); local_rank: its GPU on this machine."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        """Rank 0 alone evaluates, prints, plots and writes checkpoints."""
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def from_env(env=None) -> DistInfo:
    """The DistInfo torchrun's variables describe (a plain ``python -m`` run: rank 0 of 1)."""
    env = os.environ if env is None else env
    return DistInfo(rank=int(env.get("RANK", 0)), local_rank=int(env.get("LOCAL_RANK", 0)),
                    world_size=int(env.get("WORLD_SIZE", 1)))


def setup(device: torch.device) -> tuple[DistInfo, torch.device]:
    """Join the process group when torchrun started several processes.

    gloo on the CPU, NCCL on CUDA (where rank r of a machine takes GPU ``LOCAL_RANK``).
    returns: (DistInfo, the device this rank trains on).
    """
    info = from_env()
    if not info.enabled:
        return info, device
    if device.type == "cuda":
        device = torch.device("cuda", info.local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        kwargs = {"device_id": device} if device.type == "cuda" else {}
        dist.init_process_group(backend=backend, **kwargs)
    return info, device


def teardown(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()


def wrap(model: torch.nn.Module, info: DistInfo, parallel: str) -> torch.nn.Module:
    """The model as the training step calls it: DDP, FSDP (sharded in place) or unchanged.

    parallel: "ddp" or "fsdp". One process: the model itself (nothing to synchronise).
    """
    if parallel not in ("ddp", "fsdp"):
        raise ValueError(f"wrap: parallel must be 'ddp' or 'fsdp', got {parallel!r}")
    if not info.enabled:
        return model
    if parallel == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        ids = [model_device(model)] if model_device(model).type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids)
    from torch.distributed.fsdp import fully_shard

    # One FSDP unit per block: a block's full weights exist only while it runs. The root call
    # takes what is left (embeddings, tied head, final norm).
    for block in model.transformer.h:
        fully_shard(block)
    fully_shard(model)
    return model


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The GPT inside a DDP wrapper (FSDP shards the model in place: it is its own GPT)."""
    return getattr(model, "module", model)


def model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def micro_batches(data, batch: int, context: int, generator, info: DistInfo,
                  grad_accum: int, device=None) -> list:
    """This rank's grad_accum micro-batches [(x, y), ...], each x, y (batch, seq).

    Every rank draws the offsets of the whole global batch (batch * world_size * grad_accum
    windows) from the shared ``generator`` and keeps its own; see the module docstring.
    """
    n = len(data)
    total = batch * info.world_size * grad_accum
    starts = torch.randint(n - context, (total,), generator=generator)  # (global batch,)
    out = []
    for k in range(grad_accum):
        first = (k * info.world_size + info.rank) * batch
        index = starts[first:first + batch, None] + torch.arange(context + 1)  # (batch, seq+1)
        windows = data[index.to(data.device)]
        x, y = windows[:, :-1], windows[:, 1:]
        if device is not None:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        out.append((x, y))
    return out


def sync_gradients(model: torch.nn.Module, last: bool):
    """A context for one micro-step's backward: all-reduce gradients only on the last one.

    Earlier micro-steps just add into .grad locally (DDP's no_sync; FSDP's
    set_requires_gradient_sync), so accumulation costs one all-reduce per optimizer step.
    """
    if last:
        return nullcontext()
    if hasattr(model, "no_sync"):  # DDP
        return model.no_sync()
    if hasattr(model, "set_requires_gradient_sync"):  # FSDP2
        return _fsdp_no_sync(model)
    return nullcontext()


@contextmanager
def _fsdp_no_sync(model):
    model.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


def mean_over_ranks(value: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """The mean of a scalar tensor over all ranks (itself with one process)."""
    if not info.enabled:
        return value
    value = value.detach().clone()
    dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value / info.world_size


def barrier(info: DistInfo) -> None:
    """Wait until every rank gets here (e.g. until rank 0 has written the checkpoint)."""
    if info.enabled:
        dist.barrier()


def gather_objects(obj, info: DistInfo) -> list:
    """[rank 0's obj, rank 1's, ...] on every rank ([obj] with one process)."""
    if not info.enabled:
        return [obj]
    out = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


def full_state_dicts(model, optimizer, parallel: str) -> tuple[dict, dict]:
    """(model state, optimizer state), whole and on the CPU, as one process would save them
    (optimizer None: None for its state).

    Under FSDP every rank must call this (it all-gathers the shards); the keys are the plain
    GPT's, so the checkpoint loads in one process, under DDP or under FSDP alike.
    """
    if parallel == "fsdp" and dist.is_initialized():
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
            get_optimizer_state_dict,
        )

        opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
        msd = get_model_state_dict(model, options=opts)
        if optimizer is None:
            return msd, None
        osd = get_optimizer_state_dict(model, optimizer, options=opts)
        if not from_env().is_main:  # with cpu_offload, rank 0 alone receives the whole
            return msd, None
        return msd, _optimizer_by_index(osd, _param_names(model, optimizer))
    return unwrap(model).state_dict(), None if optimizer is None else optimizer.state_dict()


def load_full_state_dicts(model, optimizer, model_state: dict, optim_state: dict,
                          parallel: str) -> None:
    """Load a checkpoint's whole states into a (possibly wrapped or sharded) model/optimizer."""
    if parallel == "fsdp" and dist.is_initialized():
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        opts = StateDictOptions(full_state_dict=True, broadcast_from_rank0=False)
        set_model_state_dict(model, model_state, options=opts)
        names = _param_names(model, optimizer)
        set_optimizer_state_dict(model, optimizer, _optimizer_by_name(optim_state, names),
                                 options=opts)
        return
    unwrap(model).load_state_dict(model_state)
    optimizer.load_state_dict(optim_state)


def check_global_batch(ckpt: dict, batch: int, world_size: int, grad_accum: int) -> None:
    """Raise ValueError unless batch x world_size x grad_accum is the checkpoint's global batch
    (a resumed run must keep it; --grad-accum absorbs a change in the number of processes)."""
    saved_world = ckpt.get("world_size", 1)
    saved = ckpt["config"]["batch_size"] * saved_world * ckpt["config"].get("grad_accum", 1)
    now = batch * world_size * grad_accum
    if saved == now:
        return
    per_step = batch * world_size
    hint = (f"use --grad-accum {saved // per_step}" if saved % per_step == 0 else
            f"{world_size} process(es) x batch {batch} = {per_step} does not divide it: choose "
            f"a number of processes that does")
    raise ValueError(f"the checkpoint's global batch is {saved} windows ({saved_world} "
                     f"process(es)); this run's is {batch} x {world_size} process(es) x "
                     f"grad_accum {grad_accum} = {now}; {hint}")


def plain_copy(model, parallel: str, make):
    """The model as one plain GPT for sampling, on rank 0 (None on the other ranks).

    DDP: the wrapped GPT itself. FSDP: every rank helps gather the shards into ``make()``, a
    fresh GPT of the same config, on rank 0.
    """
    info = from_env()
    if parallel != "fsdp" or not info.enabled:
        return unwrap(model) if info.is_main else None
    state, _ = full_state_dicts(model, None, "fsdp")
    if not info.is_main:
        return None
    plain = make()
    plain.load_state_dict(state)
    return plain


def _param_names(model, optimizer) -> list[str]:
    """Parameter names in the optimizer's order: the index that torch.optim's state_dict uses
    for each parameter (its groups one after the other)."""
    name_of = {id(p): name for name, p in unwrap(model).named_parameters()}
    return [name_of[id(p)] for g in optimizer.param_groups for p in g["params"]]


def _optimizer_by_index(osd: dict, names: list[str]) -> dict:
    """torch.distributed.checkpoint keys optimizer state by parameter name; torch.optim's own
    state_dict by index. Checkpoints keep the index form (what one process writes)."""
    index = {name: i for i, name in enumerate(names)}
    groups = [dict(g, params=[index[n] for n in g["params"]]) for g in osd["param_groups"]]
    return {"state": {index[n]: s for n, s in osd["state"].items()}, "param_groups": groups}


def _optimizer_by_name(osd: dict, names: list[str]) -> dict:
    groups = [dict(g, params=[names[i] for i in g["params"]]) for g in osd["param_groups"]]
    return {"state": {names[i]: s for i, s in osd["state"].items()}, "param_groups": groups}
