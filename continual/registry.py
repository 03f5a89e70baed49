"""Build the (possibly composite) strategy named by `spec.continual.strategy`."""

from __future__ import annotations

from collections.abc import Callable

from atoll.continual.agem import AGEM
from atoll.continual.base import Composite, Naive, Strategy
from atoll.continual.ewc import EWC
from atoll.continual.joint import Joint
from atoll.continual.lwf import LwF
from atoll.continual.replay import Replay
from atoll.continual.si import SI
from atoll.core.spec import ExperimentSpec

STRATEGIES: dict[str, Callable[[ExperimentSpec], Strategy]] = {
    "naive": lambda spec: Naive(),
    "joint": lambda spec: Joint(seed=spec.seed),
    "ewc": lambda spec: EWC(spec.continual.ewc, seed=spec.seed),
    "replay": lambda spec: Replay(spec.continual.replay, seed=spec.seed),
    "si": lambda spec: SI(spec.continual.si),
    "lwf": lambda spec: LwF(spec.continual.lwf),
    "agem": lambda spec: AGEM(spec.continual.agem, seed=spec.seed),
}


def build_strategy(spec: ExperimentSpec) -> Strategy:
    parts = [STRATEGIES[name](spec) for name in spec.continual.strategy]
    return parts[0] if len(parts) == 1 else Composite(parts)
