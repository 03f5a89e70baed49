"""The Tracker protocol and its null object (ranks ≠ 0, tests, tracking disabled)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch.nn as nn


@dataclass(frozen=True)
class RegisteredModel:
    name: str
    version: str
    alias: str
    uri: str  # models:/<name>@<alias>


class Tracker(Protocol):
    run_id: str | None
    uri: str | None

    def log_params(self, params: dict[str, Any]) -> None: ...
    def log_metrics(self, metrics: dict[str, float], step: int) -> None: ...
    def set_tags(self, tags: dict[str, str]) -> None: ...
    def log_text(self, text: str, artifact_file: str) -> None: ...
    def log_plot(self, artifact_file: str, make: Callable[[], Any]) -> None: ...
    def log_model(self, model: nn.Module, input_example: Any, *, registered_name: str | None,
                  alias: str, tags: dict[str, str]) -> RegisteredModel | None: ...
    def flush(self) -> None: ...
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

    def log_model(self, model: nn.Module, input_example: Any, *, registered_name: str | None,
                  alias: str, tags: dict[str, str]) -> RegisteredModel | None:
        return None

    def flush(self) -> None:
        pass

    def finish(self, status: str = "FINISHED") -> None:
        pass
