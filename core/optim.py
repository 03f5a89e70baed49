"""Optimizers and per-step learning-rate schedules built from the spec."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch.optim.lr_scheduler import LambdaLR

from atoll.core.spec import OptimSpec, SchedulerSpec


def build_optimizer(params: Iterable[torch.nn.Parameter], spec: OptimSpec
                    ) -> torch.optim.Optimizer:
    """SGD/Adam/AdamW, with torch's fused kernel where it applies: one kernel per step, and
    a step the loop can skip on the device (`found_inf`) without a host sync."""
    params = list(params)
    fused = {"fused": True} if _fusable(params) else {}
    if spec.name == "sgd":
        return torch.optim.SGD(params, lr=spec.lr, momentum=spec.momentum,
                               nesterov=spec.nesterov, weight_decay=spec.weight_decay, **fused)
    cls = torch.optim.Adam if spec.name == "adam" else torch.optim.AdamW
    return cls(params, lr=spec.lr, betas=spec.betas, weight_decay=spec.weight_decay, **fused)


def _fusable(params: list[torch.nn.Parameter]) -> bool:
    """Plain floating-point tensors on CPU or CUDA: FSDP2's DTensor parameters have no
    sharding rule for fused SGD, and other devices have no fused kernels."""
    return bool(params) and all(
        type(p.detach()) is torch.Tensor and p.is_floating_point()
        and p.device.type in ("cpu", "cuda") for p in params)


def lr_factor(spec: SchedulerSpec, step: int, steps_per_epoch: int, epochs: int) -> float:
    """Multiplier of the base lr after `step` optimizer steps: warm-up × schedule."""
    total = max(1, steps_per_epoch * epochs)
    warm = int(round(spec.warmup_epochs * steps_per_epoch))
    if warm > 0 and step < warm:
        return (step + 1) / warm
    if spec.name == "step":
        return spec.gamma ** (step // max(1, spec.step_epochs * steps_per_epoch))
    progress = min(1.0, (step - warm) / max(1, total - warm))
    floor = spec.min_lr_ratio
    if spec.name == "cosine":
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
    if spec.name == "linear":
        return floor + (1 - floor) * (1 - progress)
    return 1.0


def build_scheduler(optimizer: torch.optim.Optimizer, spec: SchedulerSpec,
                    steps_per_epoch: int, epochs: int) -> LambdaLR:
    """A LambdaLR stepped once per optimizer step; its state_dict is just the step count."""
    return LambdaLR(optimizer, lambda s: lr_factor(spec, s, steps_per_epoch, epochs))
