"""The narrow protocol through which continual-learning strategies plug into the loop.

Strategies return values (batches, a penalty) or adjust gradients after backward; they
never reach into the loop's state. Penalties see the unwrapped module, so parameter names
are the same under DDP (which prefixes `module.`) and in a single process.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, Protocol, runtime_checkable

import torch
import torch.nn as nn

Batch = tuple[torch.Tensor, torch.Tensor]
# Mean of a tensor over data-parallel ranks (cluster mode); strategies whose estimates
# come from a rank's own data shard (EWC's Fisher, SI's Ω, A-GEM's reference gradient)
# pass them through it so every rank holds the same penalty and projection.
Average = Callable[[torch.Tensor], torch.Tensor]


def placed(params: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """`params` on `device`: state restored from a checkpoint sits on the CPU, the model
    it penalises may be on a GPU. Moves only when needed, so the per-step check is cheap."""
    if all(t.device == device for t in params.values()):
        return params
    return {n: t.to(device) for n, t in params.items()}


@runtime_checkable
class Strategy(Protocol):
    def before_task(self, model: nn.Module, task: Any) -> None: ...
    def batches(self, loader: Iterable[Batch], task: Any) -> Iterable[Batch]: ...
    def penalty(self, model: nn.Module) -> torch.Tensor | None: ...
    def after_backward(self, model: nn.Module) -> None: ...
    def after_task(self, model: nn.Module, task: Any, loader: Iterable[Batch]) -> None: ...
    def pause(self, model: nn.Module) -> None: ...
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class BaseStrategy:
    """No-op hooks; a strategy overrides only what it needs."""

    name = "base"
    average: Average | None = None  # set by `distribute` in cluster mode

    def _mean(self, t: torch.Tensor) -> torch.Tensor:
        return self.average(t) if self.average is not None else t

    def before_task(self, model: nn.Module, task: Any) -> None:
        return None

    def batches(self, loader: Iterable[Batch], task: Any) -> Iterable[Batch]:
        return loader

    def penalty(self, model: nn.Module) -> torch.Tensor | None:
        return None

    def after_backward(self, model: nn.Module) -> None:
        return None

    def after_task(self, model: nn.Module, task: Any, loader: Iterable[Batch]) -> None:
        return None

    def pause(self, model: nn.Module) -> None:
        """Training of this task stops for now and resumes from another model (a federated
        round ends; the server's aggregate comes next)."""
        return None

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        return None


class Naive(BaseStrategy):
    """Plain fine-tuning: the lower bound every continual strategy is measured against."""

    name = "naive"


class Composite(BaseStrategy):
    """Several strategies at once (e.g. [ewc, replay]): batches chain, penalties add."""

    name = "composite"

    def __init__(self, parts: list[Strategy]):
        self.parts = parts

    def before_task(self, model: nn.Module, task: Any) -> None:
        for s in self.parts:
            s.before_task(model, task)

    def batches(self, loader: Iterable[Batch], task: Any) -> Iterable[Batch]:
        for s in self.parts:
            loader = s.batches(loader, task)
        return loader

    def penalty(self, model: nn.Module) -> torch.Tensor | None:
        terms = [p for s in self.parts if (p := s.penalty(model)) is not None]
        return torch.stack(terms).sum() if terms else None

    def after_backward(self, model: nn.Module) -> None:
        for s in self.parts:
            s.after_backward(model)

    def after_task(self, model: nn.Module, task: Any, loader: Iterable[Batch]) -> None:
        for s in self.parts:
            s.after_task(model, task, loader)

    def pause(self, model: nn.Module) -> None:
        for s in self.parts:
            s.pause(model)

    def state_dict(self) -> dict[str, Any]:
        return {str(i): s.state_dict() for i, s in enumerate(self.parts)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for i, s in enumerate(self.parts):
            s.load_state_dict(state.get(str(i), {}))


def distribute(strategy: Strategy, average: Average) -> None:
    """Make `strategy` (and a composite's parts) average its estimates across ranks."""
    for part in getattr(strategy, "parts", [strategy]):
        part.average = average  # type: ignore[attr-defined]
