"""When the harness writes a checkpoint: `train.checkpoint_every`.

A checkpoint costs a full state write (and in cluster mode a report to Ray Train that
persists it to the storage path, ~1-2 s on two cores), which dominates a small model's
epoch. Checkpoints are written at epoch ends only — every N epochs, or at the first
epoch end at least M minutes after the last one — and always at the last epoch, so a
finished run always ends with one. Streams (continual) checkpoint after every task.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field

PATTERN = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(epochs?|minutes?|min)?\s*$")  # bare: epochs
ALLOWED = "'auto', 'N epochs' (N ≥ 1, whole) or 'M minutes' (M > 0)"
# auto: a local checkpoint is a small file write; a cluster one is a report to Ray Train
AUTO = {"local": "1 epoch", "cluster": "1 minute"}


def parse(text: str) -> tuple[str, float]:
    """('epochs' | 'minutes', amount); ValueError naming what is allowed."""
    found = PATTERN.match(text)
    if found is None:
        raise ValueError(f"allowed: {ALLOWED}")
    amount = float(found.group(1))
    unit = "minutes" if (found.group(2) or "e").startswith("m") else "epochs"
    if amount <= 0 or (unit == "epochs" and amount != int(amount)):
        raise ValueError(f"allowed: {ALLOWED}")
    return unit, amount


@dataclass
class Cadence:
    unit: str
    every: float
    last: float = field(default_factory=time.monotonic)  # the last save, or the start

    @classmethod
    def of(cls, text: str, mode: str, selects_best: bool = False) -> Cadence:
        """`selects_best`: the run ends with its best epoch's checkpoint (early stopping's
        restore_best, cluster.checkpoint_metric), so auto keeps every epoch's."""
        if text == "auto":
            text = AUTO["local"] if selects_best else AUTO.get(mode, AUTO["local"])
        return cls(*parse(text))

    def due(self, epoch: int, final: bool) -> bool:
        """Whether the end of `epoch` (1-based) gets a checkpoint."""
        if final:
            return True
        if self.unit == "epochs":
            return epoch % int(self.every) == 0
        return time.monotonic() - self.last >= self.every * 60

    def saved(self) -> None:
        self.last = time.monotonic()
