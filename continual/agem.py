"""Averaged GEM (Chaudhry et al. 2019): never let a step increase the memory's loss.

Before each optimizer step the gradient g is compared with a reference gradient g_ref
of the loss on a random memory batch; if they conflict (g·g_ref < 0), g is projected to
g − (g·g_ref / g_ref·g_ref)·g_ref, which is orthogonal to g_ref. The memory is a bounded,
(task, class)-balanced buffer filled at the end of each task (the replay buffer's storage).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from atoll.continual.base import BaseStrategy, Batch
from atoll.continual.replay import Replay
from atoll.core.spec import AgemSpec, ReplaySpec


class AGEM(BaseStrategy):
    name = "agem"

    def __init__(self, cfg: AgemSpec, seed: int = 0):
        self.cfg = cfg
        self.memory = Replay(ReplaySpec(size=cfg.size, policy="balanced", batch=cfg.batch),
                             seed=seed)
        self.generator = torch.Generator().manual_seed(seed + 1)
        self.projected = 0  # steps whose gradient was projected (for inspection/tests)

    def after_backward(self, model: nn.Module) -> None:
        if len(self.memory) == 0:
            return
        params = [p for p in model.parameters() if p.requires_grad and p.grad is not None]
        g = torch.cat([p.grad.reshape(-1) for p in params])
        idx = torch.randint(len(self.memory), (self.cfg.batch,), generator=self.generator)
        device = params[0].device
        x, y = self.memory.x[idx].to(device), self.memory.y[idx].to(device)
        ref = torch.autograd.grad(F.cross_entropy(model(x), y), params, allow_unused=True)
        g_ref = self._mean(torch.cat([(r if r is not None else torch.zeros_like(p)).reshape(-1)
                                      for r, p in zip(ref, params, strict=True)]))
        g_new = project(g, g_ref)
        if g_new is g:
            return
        self.projected += 1
        offset = 0
        for p in params:
            n = p.numel()
            p.grad.copy_(g_new[offset:offset + n].view_as(p))
            offset += n

    def after_task(self, model: nn.Module, task: Any, loader: Iterable[Batch]) -> None:
        self.memory.after_task(model, task, loader)

    def state_dict(self) -> dict[str, Any]:
        return {"memory": self.memory.state_dict(), "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.memory.load_state_dict(state.get("memory", {}))
        if "generator" in state:
            self.generator.set_state(state["generator"])


def project(g: torch.Tensor, g_ref: torch.Tensor) -> torch.Tensor:
    """A-GEM's projection; returns `g` itself when there is no conflict."""
    dot = torch.dot(g, g_ref)
    if dot >= 0:
        return g
    return g - dot / torch.dot(g_ref, g_ref).clamp(min=1e-12) * g_ref
