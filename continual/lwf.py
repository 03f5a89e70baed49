"""Learning without Forgetting (Li & Hoiem 2017): distil the previous model's outputs.

After a task the model is frozen as the teacher. On later tasks every batch adds
λ·T²·KL(softmax(teacher(x)/T) ‖ softmax(model(x)/T)); T² keeps the gradient scale
independent of the temperature (Hinton et al. 2015). The penalty hook sees only the
model, so `batches` remembers the inputs of the batch being trained on.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Iterator
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from atoll.continual.base import BaseStrategy, Batch
from atoll.core.spec import LwfSpec


class LwF(BaseStrategy):
    name = "lwf"

    def __init__(self, cfg: LwfSpec):
        self.cfg = cfg
        self.teacher: nn.Module | None = None
        self._x: torch.Tensor | None = None

    def batches(self, loader: Iterable[Batch], task: Any) -> Iterator[Batch]:
        for x, y in loader:
            self._x = x
            yield x, y
        self._x = None

    def before_task(self, model: nn.Module, task: Any) -> None:
        self._bind(model)

    def penalty(self, model: nn.Module) -> torch.Tensor | None:
        self._bind(model)
        if self.teacher is None or self._x is None or self.cfg.alpha == 0:
            return None
        x = self._x.to(next(model.parameters()).device)
        t = self.cfg.temperature
        with torch.no_grad():
            target = F.softmax(self.teacher(x) / t, dim=1)
        log_p = F.log_softmax(model(x) / t, dim=1)
        return self.cfg.alpha * t * t * F.kl_div(log_p, target, reduction="batchmean")

    def after_task(self, model: nn.Module, task: Any, loader: Iterable[Batch]) -> None:
        self.teacher = copy.deepcopy(model).eval()
        for p in self.teacher.parameters():
            p.requires_grad_(False)

    def state_dict(self) -> dict[str, Any]:
        return {"teacher": None if self.teacher is None else self.teacher.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._pending = state.get("teacher")

    def _bind(self, model: nn.Module) -> None:
        """A restored teacher is rebuilt from its weights once a model is at hand."""
        pending = getattr(self, "_pending", None)
        if pending is not None:
            self.teacher = copy.deepcopy(model).eval()
            self.teacher.load_state_dict(pending)
            for p in self.teacher.parameters():
                p.requires_grad_(False)
            self._pending = None
