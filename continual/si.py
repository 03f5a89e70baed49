"""Synaptic Intelligence (Zenke, Poole & Ganguli 2017).

During a task each parameter accumulates its contribution to the loss decrease,
ω += −g·Δθ, summed over optimizer steps (g: the gradient that produced the step). At the
task's end its importance grows by Ω += ω / ((θ_end − θ_start)² + ξ) and θ_end becomes the
anchor. The penalty is c·Σ Ω (θ − θ*)² (no ½, as in the paper).

The running task (ω, θ_start and the step not yet closed) is part of the state: a
checkpoint between two epochs of a task, or a federated client that trains a task over
several rounds, continues the path integral instead of losing it. A federated round ends
with `pause`, which closes its last step: the next round starts from the server's model,
and that jump is not a gradient step.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
import torch.nn as nn

from atoll.continual.base import BaseStrategy, Batch, placed
from atoll.core.spec import SiSpec

Params = dict[str, torch.Tensor]


class SI(BaseStrategy):
    name = "si"

    def __init__(self, cfg: SiSpec):
        self.cfg = cfg
        self.omega: Params = {}  # Ω, importance so far
        self.anchor: Params = {}  # θ* at the end of the last task
        self._w: Params = {}  # ω of the current task
        self._start: Params = {}
        self._prev: Params = {}
        self._grad: Params = {}

    def before_task(self, model: nn.Module, task: Any) -> None:
        self._start = _snapshot(model)
        self._w = {n: torch.zeros_like(p) for n, p in self._start.items()}
        self._prev, self._grad = {}, {}

    def after_backward(self, model: nn.Module) -> None:
        """Called before each optimizer step: close the previous step's ω, record this g."""
        self._accumulate(model)
        self._prev = _snapshot(model)
        self._grad = {n: p.grad.detach().clone() for n, p in model.named_parameters()
                      if p.requires_grad and p.grad is not None}

    def _accumulate(self, model: nn.Module) -> None:
        if not self._prev:
            return
        for n, p in model.named_parameters():
            if n in self._grad:
                if n not in self._w:  # a state saved before the running task was kept
                    self._w[n] = torch.zeros_like(p.detach())
                self._w[n] -= self._grad[n] * (p.detach() - self._prev[n])

    def pause(self, model: nn.Module) -> None:
        """Training stops here for now (a federated round ends): close the last step."""
        self._accumulate(model)
        self._prev, self._grad = {}, {}

    def penalty(self, model: nn.Module) -> torch.Tensor | None:
        if not self.omega or self.cfg.c == 0:
            return None
        self._place(model)
        total = sum((self.omega[n] * (p - self.anchor[n]).pow(2)).sum()
                    for n, p in model.named_parameters() if n in self.omega)
        return self.cfg.c * total

    def after_task(self, model: nn.Module, task: Any, loader: Iterable[Batch]) -> None:
        self._accumulate(model)  # the last step of the task
        self._place(model)
        end = _snapshot(model)
        for n, theta in end.items():
            if n not in self._start:
                continue
            add = self._mean(self._w[n]) / ((theta - self._start[n]).pow(2) + self.cfg.xi)
            self.omega[n] = self.omega.get(n, torch.zeros_like(theta)) + add.clamp(min=0)
        self.anchor = end
        self._prev, self._grad = {}, {}

    def _place(self, model: nn.Module) -> None:
        device = next(model.parameters()).device
        self.omega, self.anchor = placed(self.omega, device), placed(self.anchor, device)

    def state_dict(self) -> dict[str, Any]:
        return {"omega": self.omega, "anchor": self.anchor, "w": self._w,
                "start": self._start, "prev": self._prev, "grad": self._grad}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.omega = dict(state.get("omega", {}))
        self.anchor = dict(state.get("anchor", {}))
        self._w, self._start = dict(state.get("w", {})), dict(state.get("start", {}))
        self._prev, self._grad = dict(state.get("prev", {})), dict(state.get("grad", {}))


def _snapshot(model: nn.Module) -> Params:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
