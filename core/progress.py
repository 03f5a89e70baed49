"""Progress reporting: a tqdm bar on a terminal, plain log lines elsewhere (CI, Ray logs)."""

from __future__ import annotations

import sys
from typing import Any


class Progress:
    """One bar per epoch; `mode` is the spec's train.progress (auto/bar/log/off)."""

    def __init__(self, total: int, desc: str, mode: str = "auto"):
        self.desc = desc
        if mode == "auto":
            mode = "bar" if sys.stderr.isatty() else "log"
        self.mode = mode
        self._bar: Any = None
        if mode == "bar":
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True)

    def update(self, n: int = 1, **postfix: float) -> None:
        if self._bar is not None:
            self._bar.update(n)
            if postfix:
                self._bar.set_postfix({k: f"{v:.4g}" for k, v in postfix.items()}, refresh=False)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
