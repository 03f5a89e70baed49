"""The Strategy protocol: the naive strategy and composition."""

from __future__ import annotations

import torch
import torch.nn as nn

from continual import BaseStrategy, Composite, Naive, Strategy, build_strategy
from core.spec import load_spec


class _Scale(BaseStrategy):
    def __init__(self, k: float):
        self.k, self.seen = k, 0

    def batches(self, loader, task):
        for x, y in loader:
            self.seen += 1
            yield x * self.k, y

    def penalty(self, model):
        return torch.tensor(self.k)

    def state_dict(self):
        return {"seen": self.seen}

    def load_state_dict(self, state):
        self.seen = state["seen"]


def test_naive_changes_nothing():
    s = build_strategy(load_spec(None))
    assert isinstance(s, Naive) and isinstance(s, Strategy)
    loader = [(torch.ones(2, 3), torch.zeros(2))]
    assert s.batches(loader, None) is loader
    assert s.penalty(nn.Linear(3, 2)) is None
    assert s.state_dict() == {}


def test_composite_chains_batches_adds_penalties_and_round_trips_state():
    a, b = _Scale(2.0), _Scale(3.0)
    comp = Composite([a, b])
    out = list(comp.batches([(torch.ones(1, 2), torch.zeros(1))], None))
    torch.testing.assert_close(out[0][0], torch.full((1, 2), 6.0))
    assert comp.penalty(nn.Linear(2, 2)).item() == 5.0
    state = comp.state_dict()
    assert state == {"0": {"seen": 1}, "1": {"seen": 1}}
    fresh = Composite([_Scale(2.0), _Scale(3.0)])
    fresh.load_state_dict(state)
    assert fresh.state_dict() == state
    assert Composite([Naive()]).penalty(nn.Linear(2, 2)) is None
