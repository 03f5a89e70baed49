"""How one worker holds the model under each `cluster.strategy`: DDP, FSDP2, or a
pipeline stage (`cluster/pipeline.py`).

A Layout gives the loop what it needs (the module to call, `reduce` for metrics, `no_sync`
for gradient accumulation) and gives checkpoints a full, unsharded state dict — gathered
collectively, so every rank must call `full_state`/`full_optim_state` together.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn

from atoll.core.data import Split
from atoll.core.loop import PAD_LABEL

log = logging.getLogger(__name__)


@dataclass
class Layout:
    model: nn.Module  # what the loop calls
    base: nn.Module  # the user's module (parameters may be sharded)
    dp_rank: int
    dp_size: int
    reduce: Callable[[torch.Tensor], torch.Tensor]
    no_sync: Callable[[], contextlib.AbstractContextManager] | None
    full_state: Callable[[], dict[str, torch.Tensor]]
    full_optim_state: Callable[[torch.optim.Optimizer], dict[str, Any]]
    load_full_state: Callable[[dict[str, torch.Tensor]], None]
    load_full_optim_state: Callable[[torch.optim.Optimizer, dict[str, Any]], None]
    description: dict[str, Any]
    pipe: Any = None  # cluster.pipeline.Pipe: the loop runs the schedule instead of model(x)


def on_cpu(obj: Any) -> Any:
    """`obj` (nested dicts/lists/tuples) with every tensor on the CPU: what ranks gather as
    objects (a pickled CUDA tensor is unpickled onto the receiver's GPU) and rank 0 saves."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: on_cpu(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(on_cpu(v) for v in obj)
    return obj


def all_reduce_sum(t: torch.Tensor, group: Any = None) -> torch.Tensor:
    """Sum across ranks (float64 metric stats stay on CPU for gloo; moved for nccl)."""
    backend = dist.get_backend(group)
    if backend == "nccl":
        moved = t.cuda()
        dist.all_reduce(moved, op=dist.ReduceOp.SUM, group=group)
        return moved.to(t.device)
    out = t.clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group)
    return out


def even_shard(split: Split, rank: int, world: int) -> Split:
    """Rank `rank`'s every-`world`-th row of `split`, padded to ceil(n / world) rows.

    Why: FSDP2's forward all-gathers parameters, so a rank with one batch fewer than the
    others leaves them waiting forever in evaluation. Padding rows carry PAD_LABEL (NaN
    for a regression target);
    `core.loop.evaluate` runs them through the model and leaves them out of every count.
    """
    x, y = split.x[rank::world], split.y[rank::world]
    short = -(-len(split) // world) - len(y)
    if short > 0:
        x = torch.cat([x, x.new_zeros((short, *split.x.shape[1:]))])
        pad = float("nan") if y.is_floating_point() else PAD_LABEL  # regression: NaN
        y = torch.cat([y, y.new_full((short,), pad)])
    return Split(x, y)


def sync_batchnorm(model: nn.Module, device: torch.device) -> nn.Module:
    """Batch norm over the global batch on GPUs (SyncBatchNorm: the same parameters and
    buffers, so checkpoints are unchanged). torch implements it for accelerators only; on
    CPU/gloo each rank keeps statistics of its own shard."""
    has_bn = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    if device.type != "cuda" or not has_bn:
        return model
    return nn.SyncBatchNorm.convert_sync_batchnorm(model)


def ddp(model: nn.Module, device: torch.device, compile: bool = False) -> Layout:
    from torch.nn.parallel import DistributedDataParallel as DDP

    model = sync_batchnorm(model, device)
    wrapped = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    if compile:  # the DDP module, so Dynamo splits graphs at its gradient buckets
        wrapped.compile()

    def load_optim(opt: torch.optim.Optimizer, state: dict[str, Any]) -> None:
        opt.load_state_dict(state)

    return Layout(
        model=wrapped, base=model, dp_rank=dist.get_rank(), dp_size=dist.get_world_size(),
        reduce=all_reduce_sum, no_sync=wrapped.no_sync,
        full_state=lambda: {k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
        full_optim_state=lambda opt: opt.state_dict(),
        load_full_state=model.load_state_dict, load_full_optim_state=load_optim,
        description={"parallel": "ddp", "dp": dist.get_world_size()})


def fsdp(model: nn.Module, device: torch.device, precision: torch.dtype | None = None
         ) -> Layout:
    """FSDP2: every child with parameters is its own shard unit, then the root.

    With bf16 precision on a GPU, FSDP2's MixedPrecisionPolicy keeps bf16 parameters for
    the forward/backward and reduces gradients in fp32 (the sharded master weights stay
    fp32). Accumulation micro-steps skip the gradient reduce-scatter
    (`set_requires_gradient_sync(False)`), as DDP's `no_sync` does.
    """
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    world = dist.get_world_size()
    mesh = init_device_mesh(device.type, (world,))
    mp = MixedPrecisionPolicy(param_dtype=precision, reduce_dtype=torch.float32) \
        if precision is not None and device.type == "cuda" else MixedPrecisionPolicy()
    for child in model.children():
        if any(p.requires_grad for p in child.parameters()):
            fully_shard(child, mesh=mesh, mp_policy=mp)
    fully_shard(model, mesh=mesh, mp_policy=mp)

    @contextlib.contextmanager
    def no_sync() -> Iterator[None]:
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)
    full = StateDictOptions(full_state_dict=True, cpu_offload=True)
    load = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)

    def load_state(state: dict[str, torch.Tensor]) -> None:
        set_model_state_dict(model, state, options=load)

    def optim_state(opt: torch.optim.Optimizer) -> dict[str, Any]:
        return get_optimizer_state_dict(model, opt, options=full)

    def load_optim(opt: torch.optim.Optimizer, state: dict[str, Any]) -> None:
        set_optimizer_state_dict(model, opt, state, options=load)

    return Layout(
        model=model, base=model, dp_rank=dist.get_rank(), dp_size=world, reduce=all_reduce_sum,
        no_sync=no_sync, full_state=lambda: get_model_state_dict(model, options=full),
        full_optim_state=optim_state, load_full_state=load_state,
        load_full_optim_state=load_optim,
        description={"parallel": "fsdp2", "dp": world, "shard_units": sum(
            1 for c in model.children() if any(True for _ in c.parameters())) + 1})


def fsdp_on_meta(make: Callable[[], nn.Module], device: torch.device,
                 precision: torch.dtype | None = None) -> Layout:
    """FSDP2 over a model that no device holds whole.

    Every rank builds the model on the meta device (no memory), shards it and allocates
    only its own shard (`to_empty`). The values are those a plain build draws: rank 0
    builds the model once on the CPU after the same seed and broadcasts it tensor by tensor,
    each rank keeping its shard (`set_model_state_dict(..., broadcast_from_rank0=True)`);
    non-persistent buffers, which no state dict holds, are broadcast whole. Rank 0's RNG
    state after its build goes to every rank, so what is drawn next (dropout, noise) is
    what it was when every rank built the model itself.
    """
    rank = dist.get_rank()
    full: dict[str, torch.Tensor] = {}
    loose: dict[str, torch.Tensor] = {}
    seeded = torch.get_rng_state()  # the same on every rank
    if rank == 0:
        reference = make()
        full = reference.state_dict()
        loose = dict(_non_persistent_buffers(reference))
    rng = [torch.get_rng_state() if rank == 0 else None]
    try:
        with torch.device("meta"):
            model = make()
    except Exception as e:  # noqa: BLE001 - construction that reads values (.item(), ...):
        # every rank fails alike, and builds the whole model as before
        log.warning("model: cannot be built on the meta device (%s: %s); every rank "
                    "builds it whole before sharding", type(e).__name__, e)
        torch.set_rng_state(seeded)
        layout = fsdp(make().to(device), device, precision)
        layout.description["init"] = "full"
        return layout
    dist.broadcast_object_list(rng, src=0)
    torch.set_rng_state(rng[0])
    layout = fsdp(model, device, precision)
    model.to_empty(device=device)
    layout.load_full_state(full)
    for name, buf in _non_persistent_buffers(model):
        if rank == 0:
            buf.copy_(loose[name])
        dist.broadcast(buf, src=0)
    layout.description["init"] = "meta"
    return layout


def _non_persistent_buffers(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    for prefix, module in model.named_modules():
        for name in sorted(module._non_persistent_buffers_set):
            buf = module._buffers.get(name)
            if buf is not None:
                yield f"{prefix}.{name}" if prefix else name, buf


def build(strategy: str, model: nn.Module | Callable[[], nn.Module], device: torch.device,
          compile: bool = False, precision: torch.dtype | None = None, **pipeline: Any
          ) -> Layout:
    """`model`: the module, or a function that builds it (FSDP2 then builds it on the meta
    device: `fsdp_on_meta`; the other strategies call it and move the module to `device`).
    `pipeline` (stages, schedule, microbatches, batch, block_names) is used by
    pipeline/hybrid; `compile` (train.compile) by ddp, the only strategy the spec allows
    it with."""
    if not isinstance(model, nn.Module):
        if strategy == "fsdp":
            return fsdp_on_meta(model, device, precision)
        model = model().to(device)
    if strategy == "ddp":
        return ddp(model, device, compile=compile)
    if strategy == "fsdp":
        return fsdp(model, device, precision)
    if strategy in ("pipeline", "hybrid"):
        from atoll.cluster.pipeline import pipeline as pipelined

        return pipelined(model, device, **pipeline)
    raise ValueError(f"cluster.strategy: {strategy!r}; allowed: ddp, fsdp, pipeline, hybrid")
