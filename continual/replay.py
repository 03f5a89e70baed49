"""Experience replay: a bounded memory of past samples mixed into every training batch.

`balanced` (the default) gives every task seen so far an equal share, then every class
an equal share inside its task. Both levels matter: ACC weighs every task equally, and in
a domain-incremental stream (permuted, rotated: every task holds the same classes) a
class-only share lets the newest task's ~1,250 samples crowd its predecessors out of a
200-sample memory at every re-balance. `class_balanced` is that class-only share (in a
split stream the two coincide; regression targets are balanced by task only);
`reservoir` keeps a uniform sample of everything seen
(Vitter's algorithm R). Each stored sample keeps its task's id, so the shares survive
checkpoints and Flower's Context.state.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import torch
import torch.nn as nn

from atoll.continual.base import BaseStrategy, Batch
from atoll.core.spec import ReplaySpec

# Task id of memory restored from a state saved before task ids were stored: all of it
# counts as one task, distinct from every stream position.
LEGACY_TASK = -1


class Replay(BaseStrategy):
    name = "replay"

    def __init__(self, cfg: ReplaySpec, seed: int = 0):
        self.cfg = cfg
        self.x: torch.Tensor | None = None
        self.y: torch.Tensor | None = None
        self.task: torch.Tensor | None = None  # the task id of each stored sample
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
        index = getattr(task, "index", task)  # a stream's Task, or its position
        self.add(torch.cat(xs), torch.cat(ys), task=index if isinstance(index, int) else None)

    def add(self, x: torch.Tensor, y: torch.Tensor, task: int | None = None) -> None:
        """Store task `task`'s samples (stream position; None: a task not seen before)."""
        if task is None:
            task = 0 if self.task is None else int(self.task.max()) + 1
        t = torch.full((len(y),), int(task), dtype=torch.long)
        if self.cfg.policy == "reservoir":
            self._reservoir(x, y, t)
        else:
            self._balanced(x, y, t)

    def _reservoir(self, x: torch.Tensor, y: torch.Tensor, t: torch.Tensor) -> None:
        size = self.cfg.size
        stored = (self.x, self.y, self.task)
        mem = [[] if m is None else list(m) for m in stored]
        for sample in zip(x, y, t, strict=True):
            self.seen += 1
            if len(mem[1]) < size:
                for m, v in zip(mem, sample, strict=True):
                    m.append(v)
            else:
                j = int(torch.randint(self.seen, (1,), generator=self.generator))
                if j < size:
                    for m, v in zip(mem, sample, strict=True):
                        m[j] = v
        self.x, self.y, self.task = (torch.stack(m) for m in mem)

    def _balanced(self, x: torch.Tensor, y: torch.Tensor, t: torch.Tensor) -> None:
        self.seen += len(y)
        pool_x, pool_y, pool_t = ((new if old is None else torch.cat([old, new]))
                                  for old, new in ((self.x, x), (self.y, y), (self.task, t)))
        groups = pool_t if self.cfg.policy == "balanced" else torch.zeros_like(pool_t)
        keep = []
        for group, quota in _shares(groups, self.cfg.size):
            members = torch.nonzero(groups == group).squeeze(1)
            if pool_y.is_floating_point():  # regression targets: by task only
                pick = torch.randperm(len(members), generator=self.generator)[:quota]
                keep.append(members[pick])
                continue
            for label, take in _shares(pool_y[members], quota):
                idx = members[pool_y[members] == label]
                keep.append(idx[torch.randperm(len(idx), generator=self.generator)[:take]])
        sel = torch.cat(keep)
        self.x, self.y, self.task = pool_x[sel], pool_y[sel], pool_t[sel]

    def state_dict(self) -> dict[str, Any]:
        return {"x": self.x, "y": self.y, "task": self.task, "seen": self.seen,
                "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.x, self.y, self.task = state.get("x"), state.get("y"), state.get("task")
        if self.task is None and self.y is not None:
            self.task = torch.full_like(self.y, LEGACY_TASK)
        self.seen = state.get("seen", 0)
        if "generator" in state:
            self.generator.set_state(state["generator"])


def _shares(keys: torch.Tensor, capacity: int) -> list[tuple[int, int]]:
    """(key, how many to keep) for each distinct key: equal shares of `capacity`. A key with
    fewer samples than its share hands the rest on (smallest first), so the memory fills up
    whenever there is enough data."""
    values, counts = keys.unique(return_counts=True)
    out, left = [], len(values)
    for i in torch.argsort(counts, stable=True).tolist():
        take = min(int(counts[i]), capacity // left)
        out.append((int(values[i]), take))
        capacity, left = capacity - take, left - 1
    return out


def _unaugmented(loader: Iterable[Batch]) -> Iterable[Batch]:
    """The task's stored samples (this rank's shard), not augmented copies, when the loader
    exposes them."""
    shard = getattr(loader, "shard", None)
    if shard is not None:
        split = shard()
        return [(split.x, split.y)]
    return loader
