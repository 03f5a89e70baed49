"""Training a compressed network on the one loop (`core.loop.train_task`): fine-tuning a
pruned model, and distilling a trained teacher into a smaller student.

Both use the spec's optimizer, schedule, batch size and augmentation on its training
split, so a compressed version is trained the way its parent was. Distillation (Hinton et
al., 2015) minimises (1 − α)·loss(student, labels) + α·T²·KL(softmax(teacher/T) ‖
softmax(student/T)); T² keeps the soft term's gradients at the scale of the hard one's as
T grows. For regression the soft term is the squared distance to the teacher's output.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from atoll.core.components import build_components, seed_everything
from atoll.core.data import DataBundle, eval_batches, train_batches
from atoll.core.loop import TrainState, train_task
from atoll.core.metrics import is_regression
from atoll.core.spec import ExperimentSpec


class SoftTargets(nn.Module):
    """The distillation loss; the labels alone while no teacher logits are set (evaluation)."""

    def __init__(self, base: nn.Module, temperature: float, alpha: float):
        super().__init__()
        self.base, self.temperature, self.alpha = base, temperature, alpha
        self.regression = is_regression(base)
        if self.regression:  # evaluation reports errors in the target's units through these
            self.y_mean, self.y_std = base.y_mean, base.y_std
        self.teacher_logits: torch.Tensor | None = None

    def forward(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        hard = self.base(logits, y)
        t = self.teacher_logits
        if t is None:
            return hard
        if self.regression:
            soft = F.mse_loss(logits, t)
        else:
            T = self.temperature
            soft = F.kl_div(F.log_softmax(logits / T, 1), F.log_softmax(t / T, 1),
                            log_target=True, reduction="batchmean") * T * T
        return (1 - self.alpha) * hard + self.alpha * soft


class _Taught:
    """The training batches, each with the teacher's logits handed to the loss as the loop
    draws it (so the loop itself needs no notion of a teacher)."""

    def __init__(self, batches: Any, teacher: nn.Module, loss: SoftTargets):
        self.batches, self.teacher, self.loss = batches, teacher.eval(), loss

    def __len__(self) -> int:
        return len(self.batches)

    def set_epoch(self, epoch: int) -> None:
        self.batches.set_epoch(epoch)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        try:
            for x, y in self.batches:
                with torch.no_grad():
                    self.loss.teacher_logits = self.teacher(x).float()
                yield x, y
        finally:
            self.loss.teacher_logits = None


def retrain(model: nn.Module, spec: ExperimentSpec, data: DataBundle, epochs: int, *,
            teacher: nn.Module | None = None, temperature: float = 4.0, alpha: float = 0.7,
            lr: float | None = None) -> dict[str, float]:
    """Train `model` (in place, on the CPU) for `epochs` on the spec's training split, with
    `teacher`'s soft targets if given; returns the last epoch's metrics. `lr` (fine-tuning
    a trained network): that peak learning rate and no warm-up, where a network trained
    from scratch (a student) takes the spec's schedule as it is."""
    seed_everything(spec.seed)
    train: Any = train_batches(data, spec.data, spec.seed)
    val = eval_batches(data.val, spec.data) if len(data.val) else None
    # the spec's optimizer, schedule and loss (build_components), for these epochs, all of
    # them: no early stop without the best epoch to go back to
    c = build_components(_for_retraining(spec, epochs, lr), data, len(train),
                         torch.device("cpu"), model=model)
    loss = c.loss_fn
    if teacher is not None:
        loss = SoftTargets(loss, temperature, alpha)
        train = _Taught(train, teacher, loss)
    history: list[dict[str, float]] = []
    train_task(model, train, val, c.optimizer, loss, c.cfg, TrainState(), data.num_classes,
               scheduler=c.scheduler, on_epoch_end=lambda st, m: history.append(m))
    model.eval()
    return history[-1] if history else {}


def _for_retraining(spec: ExperimentSpec, epochs: int, lr: float | None) -> ExperimentSpec:
    """The spec with `epochs`, no early stopping and (given `lr`) that rate, no warm-up."""
    train = spec.train.model_copy(update={
        "epochs": epochs,
        "early_stopping": spec.train.early_stopping.model_copy(update={"patience": 0})})
    optim = spec.optim
    if lr is not None:
        optim = optim.model_copy(update={"lr": lr, "scheduler": optim.scheduler.model_copy(
            update={"warmup_epochs": 0.0})})
    return spec.model_copy(update={"train": train, "optim": optim})
