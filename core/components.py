"""Build the training parts a spec describes, and move them in and out of checkpoints.

Shared by every harness (local runner, Ray workers, Flower clients) so that all of them
train the same model with the same optimizer, schedule, loss and strategy.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn as nn

from atoll.core.checkpoint import rng_state, set_rng_state
from atoll.core.data import DataBundle
from atoll.core.loop import LoopConfig, TrainState
from atoll.core.metrics import build_loss
from atoll.core.optim import build_optimizer, build_scheduler
from atoll.core.spec import ExperimentSpec, check_task

if TYPE_CHECKING:
    from atoll.continual.base import Strategy


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def pick_device(spec: ExperimentSpec) -> torch.device:
    want = spec.train.device
    if want == "cuda" and not torch.cuda.is_available():
        raise ValueError("train.device: 'cuda' but no GPU is visible; allowed here: auto, cpu")
    if want == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(want)


def autocast_dtype(spec: ExperimentSpec, device: torch.device) -> torch.dtype | None:
    """bf16 autocast on GPU by default; fp32 on CPU unless bf16 is asked for explicitly."""
    p = spec.train.precision
    if p == "bf16" or (p == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return None


def loop_config(spec: ExperimentSpec, device: torch.device) -> LoopConfig:
    es = spec.train.early_stopping
    return LoopConfig(
        epochs=spec.train.epochs, grad_accum_steps=spec.train.grad_accum_steps,
        grad_clip=spec.optim.grad_clip, log_every_n_steps=spec.train.log_every_n_steps,
        autocast_dtype=autocast_dtype(spec, device), progress=spec.train.progress,
        early_stopping_metric=es.metric, early_stopping_mode=es.mode, patience=es.patience,
        min_delta=es.min_delta)


@dataclass
class Components:
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    loss_fn: nn.Module
    strategy: Strategy
    cfg: LoopConfig
    device: torch.device


def build_components(spec: ExperimentSpec, data: DataBundle, steps_per_epoch: int,
                     device: torch.device | None = None, model: nn.Module | None = None
                     ) -> Components:
    """Everything `core.loop.train_task` needs; `model` may be pre-built (e.g. DDP-wrapped)."""
    from atoll.continual import build_strategy
    from atoll.models import build_model, check_model

    device = device or pick_device(spec)
    check_task(spec, data.task)  # a float label makes it regression: class-only options go
    if model is None:
        # a user's model: bad kwargs or output shape is exit 2 before any memory or work
        check_model(spec.model, data.input_shape, data.num_classes, spec.project_dir,
                    export=spec.tracking.enabled and spec.tracking.log_model,
                    embedded=data.embedded)
        torch.manual_seed(spec.seed)
        model = build_model(spec.model, data.input_shape, data.num_classes,
                            spec.project_dir, data.embedded).to(device)
        check_stages(spec, model, data)
        if spec.train.compile:  # in place: the state dict keeps its keys
            model.compile()
    optimizer = build_optimizer(model.parameters(), spec.optim)
    steps = -(-steps_per_epoch // spec.train.grad_accum_steps)
    scheduler = build_scheduler(optimizer, spec.optim.scheduler, steps, spec.train.epochs)
    loss_fn = build_loss(spec.train.loss, data.train.y, data.num_classes, data.task,
                         data.y_mean, data.y_std,
                         counts=getattr(data.train, "counts", None)).to(device)
    return Components(model, optimizer, scheduler, loss_fn, build_strategy(spec),
                      loop_config(spec, device), device)


def check_stages(spec: ExperimentSpec, model: nn.Module, data: DataBundle) -> None:
    """Declared `model.stages` must compose to the model's forward in every mode, not only
    when a pipeline cuts there (a wrong list would otherwise wait for that run)."""
    from atoll.models.stages import check_blocks_compose, model_blocks, stage_names

    names = stage_names(spec.model, model)
    if names is None:
        return

    label = repr(spec.model.label)
    sample = data.val.x[:4] if len(data.val) else data.train.x[:4]
    device = next(model.parameters(), torch.empty(0)).device
    check_blocks_compose(model, model_blocks(model, names, label), sample.to(device), label)


def checkpoint_payload(c: Components, state: TrainState, model_state: dict[str, Any] | None = None,
                       **extra: Any) -> dict[str, Any]:
    """Full resume state; `model_state` overrides for wrapped/sharded models."""
    from atoll.core.loop import unwrap

    return {
        "model": model_state if model_state is not None else unwrap(c.model).state_dict(),
        "optimizer": c.optimizer.state_dict(),
        "scheduler": c.scheduler.state_dict(),
        "strategy": c.strategy.state_dict(),
        "state": state.state_dict(),
        "rng": rng_state(),
        **extra,
    }


def restore(c: Components, state: TrainState, payload: dict[str, Any]) -> None:
    from atoll.core.loop import unwrap

    unwrap(c.model).load_state_dict(payload["model"])
    c.optimizer.load_state_dict(payload["optimizer"])
    c.scheduler.load_state_dict(payload["scheduler"])
    c.strategy.load_state_dict(payload["strategy"])
    state.load_state_dict(payload["state"])
    set_rng_state(payload["rng"])
