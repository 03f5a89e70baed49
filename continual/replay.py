"""Experience replay: a bounded memory of past samples mixed into every training batch.

`reservoir` keeps a uniform sample of everything seen (Vitter's algorithm R);
`balanced` keeps an equal share per class seen so far, so early classes are not crowded
out as new ones arrive (class-incremental settings).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import torch
import torch.nn as nn

from continual.base import BaseStrategy, Batch
from core.spec import ReplaySpec


class Replay(BaseStrategy):
    name = "replay"

    def __init__(self, cfg: ReplaySpec, seed: int = 0):
        self.cfg = cfg
        self.x: torch.Tensor | None = None
        self.y: torch.Tensor | None = None
        self.seen = 0
        self.generator = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        return 0 if self.y is None else len(self.y)

    def batches(self, loader: Iterable[Batch], task: Any) -> Iterator[Batch]:
        for x, y in loader:
            if self.x is None or self.y is None:
                yield x, y
                continue
            idx = torch.randint(len(self.y), (self.cfg.batch,), generator=self.generator)
            yield torch.cat([x, self.x[idx].to(x.device)]), torch.cat([y, self.y[idx].to(y.device)])

    def after_task(self, model: nn.Module, task: Any, loader: Iterable[Batch]) -> None:
        xs, ys = zip(*((x.cpu(), y.cpu()) for x, y in _unaugmented(loader)), strict=True)
        self.add(torch.cat(xs), torch.cat(ys))

    def add(self, x: torch.Tensor, y: torch.Tensor) -> None:
        if self.cfg.policy == "reservoir":
            self._reservoir(x, y)
        else:
            self._balanced(x, y)

    def _reservoir(self, x: torch.Tensor, y: torch.Tensor) -> None:
        size = self.cfg.size
        mem_x = list(self.x) if self.x is not None else []
        mem_y = list(self.y) if self.y is not None else []
        for xi, yi in zip(x, y, strict=True):
            self.seen += 1
            if len(mem_y) < size:
                mem_x.append(xi)
                mem_y.append(yi)
            else:
                j = int(torch.randint(self.seen, (1,), generator=self.generator))
                if j < size:
                    mem_x[j], mem_y[j] = xi, yi
        self.x, self.y = torch.stack(mem_x), torch.stack(mem_y)

    def _balanced(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.seen += len(y)
        pool_x = x if self.x is None else torch.cat([self.x, x])
        pool_y = y if self.y is None else torch.cat([self.y, y])
        classes, counts = pool_y.unique(return_counts=True)
        # Equal shares; a class with fewer samples than its share hands the rest on, so the
        # memory fills up whenever there is enough data. Smallest classes are served first.
        capacity, left, keep = self.cfg.size, len(classes), []
        for i in torch.argsort(counts).tolist():
            idx = torch.nonzero(pool_y == classes[i]).squeeze(1)
            take = min(len(idx), capacity // left)
            idx = idx[torch.randperm(len(idx), generator=self.generator)]
            keep.append(idx[:take])
            capacity, left = capacity - take, left - 1
        sel = torch.cat(keep)
        self.x, self.y = pool_x[sel], pool_y[sel]

    def state_dict(self) -> dict[str, Any]:
        return {"x": self.x, "y": self.y, "seen": self.seen,
                "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.x, self.y = state.get("x"), state.get("y")
        self.seen = state.get("seen", 0)
        if "generator" in state:
            self.generator.set_state(state["generator"])


def _unaugmented(loader: Iterable[Batch]) -> Iterable[Batch]:
    """The task's stored samples (this rank's shard), not augmented copies, when the loader
    exposes them."""
    shard = getattr(loader, "shard", None)
    if shard is not None:
        split = shard()
        return [(split.x, split.y)]
    return loader
