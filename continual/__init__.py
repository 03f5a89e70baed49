"""Continual-learning strategies that plug into core.loop through `Strategy`."""

from atoll.continual.base import BaseStrategy, Composite, Naive, Strategy
from atoll.continual.registry import STRATEGIES, build_strategy

__all__ = ["STRATEGIES", "BaseStrategy", "Composite", "Naive", "Strategy", "build_strategy"]
