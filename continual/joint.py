"""Joint training, the upper bound: every task's data so far, in every epoch.

After each task its whole (unaugmented) training split is kept. While training task i,
each batch of task i is joined by the matching share of the stored tasks' samples, drawn
from a fresh permutation each epoch, so one epoch covers all data seen so far once. The
memory is unbounded by design: it is the reference continual strategies are measured
against, not a method.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import torch
import torch.nn as nn

from atoll.continual.base import BaseStrategy, Batch
from atoll.continual.replay import _unaugmented


class Joint(BaseStrategy):
    name = "joint"

    def __init__(self, seed: int = 0):
        self.x: torch.Tensor | None = None
        self.y: torch.Tensor | None = None
        self.generator = torch.Generator().manual_seed(seed)

    def batches(self, loader: Iterable[Batch], task: Any) -> Iterator[Batch]:
        if self.y is None:
            yield from loader
            return
        # this rank's share of the current task (its memory holds its share of the old ones)
        shard_len = getattr(loader, "shard_len", None)
        n_cur = (shard_len() if shard_len else len(getattr(loader, "split", []))) or 1
        order = torch.randperm(len(self.y), generator=self.generator)
        ratio = len(self.y) / n_cur
        taken = 0
        for x, y in loader:
            k = min(len(order) - taken, max(1, round(len(y) * ratio)))
            idx = order[taken:taken + k]
            taken += k
            yield (torch.cat([x, self.x[idx].to(x.device)]),
                   torch.cat([y, self.y[idx].to(y.device)]))

    def after_task(self, model: nn.Module, task: Any, loader: Iterable[Batch]) -> None:
        xs, ys = zip(*((x.cpu(), y.cpu()) for x, y in _unaugmented(loader)), strict=True)
        x, y = torch.cat(xs), torch.cat(ys)
        self.x = x if self.x is None else torch.cat([self.x, x])
        self.y = y if self.y is None else torch.cat([self.y, y])

    def state_dict(self) -> dict[str, Any]:
        return {"x": self.x, "y": self.y, "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.x, self.y = state.get("x"), state.get("y")
        if "generator" in state:
            self.generator.set_state(state["generator"])
