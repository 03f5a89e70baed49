"""Pipeline (`pipeline`) and data × pipeline (`hybrid`) layouts on `torch.distributed.pipelining`.

The model is cut into contiguous stages by `models.stages.split_blocks`; each rank keeps
only its stage (the other blocks become `nn.Identity`, so its state dict keeps the model's
own names). Ranks form a (dp, pp) device mesh: rank = dp_index · pp + stage. With dp > 1
each stage averages its gradients over its dp group in one flat all-reduce after the
schedule's backward (PipelineStage's DDP path breaks the reducer under GPipe in torch
2.13: "rebuilt parameter indices size is not same"). Stage 0 feeds the inputs, the last
stage computes the loss.

Fixed shapes: the schedule infers activation shapes from its first step, so training
drops the last partial batch and evaluation pads a short batch to the training size.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn

from atoll.cluster.parallel import Layout, all_reduce_sum, on_cpu
from atoll.models.stages import model_blocks, split_blocks

Criterion = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class Pipe:
    """One rank's stage and schedule; the loop's `pipe` (see core.loop.PipelineStep)."""

    def __init__(self, stage_module: nn.Module, index: int, stages: int, device: torch.device,
                 group: Any, schedule: str, microbatches: int, batch: int, dp_size: int,
                 dp_group: Any = None):
        from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe

        self.index, self.stages, self.batch, self.dp_size = index, stages, batch, dp_size
        self.module, self.dp_group = stage_module, dp_group
        self.is_first, self.is_last = index == 0, index == stages - 1
        self._crit: Criterion | None = None
        stage = PipelineStage(stage_module, index, stages, device, group=group)
        cls = {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B}[schedule]
        # the loss is a trampoline: a task's logit mask changes the criterion, not the schedule
        self.schedule = cls(stage, microbatches, loss_fn=self._loss)

    def _loss(self, out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        assert self._crit is not None
        return self._crit(out, target)

    def train(self, x: torch.Tensor, y: torch.Tensor, crit: Criterion
              ) -> tuple[torch.Tensor | None, torch.Tensor]:
        """Forward + backward of one batch; (logits, mean loss) on the last stage."""
        self._crit = crit
        losses: list[torch.Tensor] = []
        if self.is_first:
            out = self.schedule.step(x)
        else:
            out = self.schedule.step(target=y if self.is_last else None, losses=losses)
        if self.dp_size > 1:
            self._average_grads()
        loss = torch.stack(losses).mean().detach() if losses else torch.zeros(())
        return (out.detach() if out is not None else None), loss.to("cpu", torch.float64)

    @torch.no_grad()
    def _average_grads(self) -> None:
        from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

        grads = [p.grad for p in self.module.parameters() if p.grad is not None]
        flat = _flatten_dense_tensors(grads)
        dist.all_reduce(flat, group=self.dp_group)
        flat /= self.dp_size
        for g, synced in zip(grads, _unflatten_dense_tensors(flat, grads), strict=True):
            g.copy_(synced)

    @torch.no_grad()
    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor | None:
        """Forward only; the last stage gets the logits of the (unpadded) batch."""
        n = x.shape[0]
        if n < self.batch:  # the schedule's shapes are fixed: pad, then drop the padding
            x = torch.cat([x, x.new_zeros((self.batch - n, *x.shape[1:]))])
            y = torch.cat([y, y.new_zeros(self.batch - n)])
        # 1F1B computes its loss even in eval: give the last stage targets and a free loss
        self._crit = lambda out, target: out.new_zeros(())
        if self.is_first:
            out = self.schedule.eval(x)
        else:
            out = self.schedule.eval(target=y if self.is_last else None, losses=[])
        return out[:n] if out is not None else None

    def agree(self, values: torch.Tensor) -> torch.Tensor:
        """Sum over every rank, divided by dp: the loss (last stage) plus every stage's penalty.

        All ranks then see the same objective, so a non-finite one stops them together.
        """
        return all_reduce_sum(values.to(torch.float64)) / self.dp_size


def pipeline(model: nn.Module, device: torch.device, *, stages: int, schedule: str,
             microbatches: int, batch: int, block_names: list[str] | None = None) -> Layout:
    """`stages` ranks per replica, `world // stages` replicas (dp); see the module doc.
    `block_names`: a non-Sequential model's stage submodules (`model.stages`)."""
    from torch.distributed.device_mesh import init_device_mesh

    world, rank = dist.get_world_size(), dist.get_rank()
    dp = world // stages
    mesh = init_device_mesh(device.type, (dp, stages), mesh_dim_names=("dp", "pp"))
    pp_group, index, dp_rank = mesh["pp"].get_group(), rank % stages, rank // stages
    parts = split_blocks(model_blocks(model, block_names), stages)
    split = "|".join(",".join(name for name, _ in part) for part in parts)
    stage_module: nn.Module = nn.Sequential(*(m for _, m in parts[index]))
    for i, part in enumerate(parts):
        if i != index:
            for name, _ in part:  # free the other stages' weights; names stay the model's
                model.set_submodule(name, nn.Identity())
    model.to(device)
    pipe = Pipe(stage_module, index, stages, device, pp_group, schedule, microbatches, batch, dp,
                dp_group=mesh["dp"].get_group() if dp > 1 else None)

    def full_state() -> dict[str, torch.Tensor]:
        mine = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
        gathered: list[dict[str, torch.Tensor]] = [{} for _ in range(stages)]
        dist.all_gather_object(gathered, mine, group=pp_group)
        return {k: v for part in gathered for k, v in part.items()}

    def load_state(state: dict[str, torch.Tensor]) -> None:
        model.load_state_dict({k: state[k] for k in model.state_dict()})

    def optim_state(opt: torch.optim.Optimizer) -> dict[str, Any]:
        gathered: list[dict[str, Any]] = [{} for _ in range(stages)]
        # on CPU first: a pickled CUDA tensor would be unpickled onto the receiver's GPU
        dist.all_gather_object(gathered, on_cpu(opt.state_dict()), group=pp_group)
        return {"pipeline_stages": gathered}

    def load_optim(opt: torch.optim.Optimizer, state: dict[str, Any]) -> None:
        opt.load_state_dict(state["pipeline_stages"][index])

    return Layout(
        model=stage_module, base=stage_module, dp_rank=dp_rank, dp_size=dp,
        reduce=all_reduce_sum, no_sync=None, full_state=full_state,
        full_optim_state=optim_state, load_full_state=load_state,
        load_full_optim_state=load_optim, pipe=pipe,
        description={"parallel": "pipeline" if dp == 1 else "hybrid", "dp": dp, "pp": stages,
                     "schedule": schedule, "microbatches": microbatches,
                     "stage_blocks": split})

