"""The Tracker protocol and its null object (ranks ≠ 0, tests, tracking disabled)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch.nn as nn


class NothingToRegister(RuntimeError):
    """The weights completed no epoch/aggregated round: registering them would publish a
    model no better than where the run started."""


@dataclass(frozen=True)
class Selection:
    """Why these weights are the ones registered: the metric that chose them and where.

    `rule` is "best" (by `metric` over the run, e.g. early stopping's restore_best) or
    "last" (the final epoch/round; `metric` is then the value it ended with). `step` is the
    epoch, aggregated round or task the weights come from, counted in `unit`.
    """

    metric: str
    value: float | None
    step: int
    unit: str = "epoch"
    rule: str = "last"

    def check(self) -> None:
        """Registration requires at least one completed epoch/round (every mode)."""
        if self.step < 1:
            raise NothingToRegister(f"no {self.unit} completed; nothing was registered (a "
                                    "model that trained nothing is never registered)")

    def tags(self) -> dict[str, str]:
        """Model-version tags; the run gets the same under `atoll.`."""
        value = "" if self.value is None else f"{self.value:.6g}"
        return {"selected_by": self.metric, "selection": self.rule, "selected_value": value,
                f"selected_{self.unit}": str(self.step)}


@dataclass(frozen=True)
class RegisteredModel:
    name: str
    version: str
    alias: str
    uri: str  # models:/<name>@<alias>
    store: str = ""  # the tracking URI it is registered in (a fallback's local store too)


class Tracker(Protocol):
    run_id: str | None
    uri: str | None

    def log_params(self, params: dict[str, Any]) -> None: ...
    def log_metrics(self, metrics: dict[str, float], step: int) -> None: ...
    def set_tags(self, tags: dict[str, str]) -> None: ...
    def log_text(self, text: str, artifact_file: str) -> None: ...
    def log_plot(self, artifact_file: str, make: Callable[[], Any]) -> None: ...
    def log_model(self, model: nn.Module, data: Any, *, registered_name: str | None,
                  alias: str, tags: dict[str, str], selection: Selection | None = None
                  ) -> RegisteredModel | None: ...
    def flush(self) -> None: ...
    def close(self) -> None: ...
    def finish(self, status: str = "FINISHED") -> None: ...


class NullTracker:
    """Accepts everything and records nothing, so call sites need no `if tracking:`."""

    run_id: str | None = None
    uri: str | None = None

    def log_params(self, params: dict[str, Any]) -> None:
        pass

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        pass

    def set_tags(self, tags: dict[str, str]) -> None:
        pass

    def log_text(self, text: str, artifact_file: str) -> None:
        pass

    def log_plot(self, artifact_file: str, make: Callable[[], Any]) -> None:
        pass  # the figure is never drawn: plotting costs nothing when nothing records it

    def log_model(self, model: nn.Module, data: Any, *, registered_name: str | None,
                  alias: str, tags: dict[str, str], selection: Selection | None = None
                  ) -> RegisteredModel | None:
        if selection is not None:
            selection.check()  # the same refusal whether or not anything records it
        return None

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass

    def finish(self, status: str = "FINISHED") -> None:
        pass
