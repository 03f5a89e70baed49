"""The Strategy protocol: the naive strategy and composition."""

from __future__ import annotations

import torch
import torch.nn as nn

from atoll.continual import BaseStrategy, Composite, Naive, Strategy, build_strategy
from atoll.core.spec import load_spec


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


def test_restored_importances_follow_the_model_to_its_device():
    """A checkpoint's EWC/SI state is loaded on the CPU; the model may live elsewhere (GPU).

    The `meta` device stands in for a GPU here: mixing it with CPU tensors raises the
    same "not on the expected device" error.
    """
    spec = load_spec(None, ["continual.strategy=[ewc,si]", "continual.ewc.fisher_samples=8"])
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    data = [(torch.randn(8, 4), torch.randint(0, 3, (8,)))]
    trained = build_strategy(spec)
    trained.before_task(model, 0)
    loss = nn.functional.cross_entropy(model(data[0][0]), data[0][1])
    loss.backward()
    trained.after_backward(model)
    trained.after_task(model, 0, data)
    restored = build_strategy(spec)
    restored.load_state_dict(trained.state_dict())
    elsewhere = model.to("meta")
    penalty = restored.penalty(elsewhere)
    assert penalty is not None and penalty.device.type == "meta"
    restored.before_task(elsewhere, 1)
    restored.after_task(elsewhere, 1, [])  # SI adds to Ω on the model's device
    ewc, si = restored.parts
    assert all(t.device.type == "meta" for t in ewc.fishers[0].values())
    assert all(t.device.type == "meta" for t in si.omega.values())
