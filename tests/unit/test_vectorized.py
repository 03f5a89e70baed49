"""The vectorized engine's local training equals `task.local_train`, client by client
(federated/vectorized.py): same batch orders, loss, update rules and masked short shards."""

from __future__ import annotations

import pytest
import torch

from atoll.core.spec import load_spec
from atoll.federated import task
from atoll.federated.vectorized import LocalRule, rule_of, train_clients
from atoll.models import build_model
from tests.conftest import CONFIGS

CLIENTS = 6  # a Dirichlet α=0.3 split: shards of very different sizes


def _spec(*sets: str):
    return load_spec(CONFIGS / "federated.yaml", [
        "train.progress=off", "tracking.enabled=false", f"federated.num_clients={CLIENTS}",
        "federated.partition.alpha=0.3", "federated.local_epochs=2", "model.dropout=0",
        "model.hidden=[32]", *sets])


@pytest.mark.parametrize("sets", [
    pytest.param([], id="sgd-momentum"),
    pytest.param(["optim.nesterov=true", "optim.weight_decay=0.01"], id="sgd-nesterov-wd"),
    pytest.param(["optim.name=adam", "optim.lr=0.01", "optim.weight_decay=0.001"], id="adam"),
    pytest.param(["optim.name=adamw", "optim.lr=0.01", "optim.weight_decay=0.05",
                  "optim.grad_clip=0.5"], id="adamw-clip"),
    pytest.param(["train.loss.class_weights=balanced", "train.loss.label_smoothing=0.1"],
                 id="weighted-smoothed"),
    pytest.param(["federated.strategy=fedprox", "federated.proximal_mu=0.1"], id="fedprox"),
    pytest.param(["model.batch_norm=true"], id="batch-norm"),  # no padded batches
    pytest.param(["train.loss.name=focal", "train.loss.class_weights=balanced"], id="focal"),
])
def test_every_client_ends_where_training_it_alone_ends(sets):
    spec = _spec(*sets)
    rnd, lr, batch = 3, spec.optim.lr * 0.9, spec.data.batch_size
    mu = spec.federated.proximal_mu if spec.federated.strategy == "fedprox" else 0.0
    data = [task.client_data(spec, c, CLIENTS) for c in range(CLIENTS)]
    sizes = [len(d.train) for d in data]
    assert max(sizes) > 2 * min(sizes) and any(s % batch for s in sizes), sizes
    bundle = data[0].bundle
    torch.manual_seed(spec.seed)
    model = build_model(spec.model, bundle.input_shape, bundle.num_classes, spec.project_dir)
    global_state = {k: v.clone() for k, v in model.state_dict().items()}

    alone = [task.local_train(spec, d, global_state, server_round=rnd, partition=c,
                              num_clients=CLIENTS, lr=lr, local_epochs=2, batch_size=batch,
                              proximal_mu=mu)
             for c, d in enumerate(data)]
    together = train_clients(
        model, global_state, [d.train for d in data],
        [task._seed(spec, rnd, c) for c in range(CLIENTS)], task.federation_loss(spec),
        rule_of(spec, lr, 2, batch, mu))
    for c, ((weights, metrics, _), got) in enumerate(zip(alone, together, strict=True)):
        assert not got.error
        assert set(got.state) == set(weights)
        worst = max(float((got.state[k] - weights[k]).abs().max()) for k in weights)
        assert worst < 1e-5, (c, worst)
        for key, value in metrics.items():
            assert got.metrics[key] == pytest.approx(value, abs=1e-5), (c, key)


def test_a_client_with_a_non_finite_loss_fails_alone():
    """Its steps stop at the bad one and it returns an error, never weights; the others
    train as they would without it (to float rounding)."""
    spec = _spec()
    data = [task.client_data(spec, c, CLIENTS) for c in range(CLIENTS)]
    bundle = data[0].bundle
    torch.manual_seed(spec.seed)
    model = build_model(spec.model, bundle.input_shape, bundle.num_classes, spec.project_dir)
    global_state = {k: v.clone() for k, v in model.state_dict().items()}
    splits = [d.train for d in data]
    poisoned = splits[2].x.clone()
    poisoned[:] = float("nan")
    seeds = [task._seed(spec, 1, c) for c in range(CLIENTS)]
    rule = rule_of(spec, spec.optim.lr, 2, spec.data.batch_size)
    clean = train_clients(model, global_state, splits, seeds, task.federation_loss(spec), rule)
    splits[2] = type(splits[2])(poisoned, splits[2].y)
    got = train_clients(model, global_state, splits, seeds, task.federation_loss(spec), rule)
    assert got[2].state is None and "non-finite loss" in got[2].error
    for c in (0, 1, 3, 4, 5):
        assert not got[c].error
        for k, v in clean[c].state.items():
            # (masked and in-place updates round alike to within a few ulps)
            assert torch.allclose(got[c].state[k], v, rtol=0, atol=1e-6), (c, k)


class _WithScalar(torch.nn.Module):
    """A scalar parameter (a temperature), a frozen one and one the forward never uses."""

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(64, 10)
        self.temperature = torch.nn.Parameter(torch.tensor(1.5))
        self.frozen = torch.nn.Parameter(torch.ones(10), requires_grad=False)
        self.unused = torch.nn.Parameter(torch.zeros(3))

    def forward(self, x):
        return self.lin(x.flatten(1)) * self.temperature + self.frozen


def test_scalar_frozen_and_unused_parameters_train_as_torch_does():
    """torch's optimizers skip a parameter without a gradient and never touch a frozen one;
    a scalar parameter is stacked like any other."""
    from atoll.core.data import Batches

    spec = _spec()
    data = [task.client_data(spec, c, CLIENTS) for c in range(3)]
    torch.manual_seed(0)
    model = _WithScalar()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    rule = LocalRule("adamw", 0.01, 2, 32, weight_decay=0.1)
    got = train_clients(model, state, [d.train for d in data], [5, 6, 7],
                        torch.nn.CrossEntropyLoss(), rule)
    for c, d in enumerate(data):
        alone = _WithScalar()
        alone.load_state_dict(state)
        opt = torch.optim.AdamW(alone.parameters(), lr=0.01, weight_decay=0.1)
        batches = Batches(d.train, 32, seed=[5, 6, 7][c])
        for epoch in range(2):
            batches.set_epoch(epoch)
            for x, y in batches:
                opt.zero_grad(set_to_none=True)
                torch.nn.functional.cross_entropy(alone(x), y).backward()
                opt.step()
        assert not got[c].error, got[c].error
        for k, v in alone.state_dict().items():
            assert torch.allclose(got[c].state[k], v, atol=1e-5), (c, k)


def test_one_clients_memory_estimate_is_its_states_and_activations():
    """Hand-computed for Linear(10, 3) and a batch of 4: 33 parameters (132 bytes) held
    4 times with SGD (θ, g, two temporaries), 6 times with Adam (+ two moments); the
    output (48 bytes) 3 times; the batch (160 bytes)."""
    from atoll.federated.vectorized import client_bytes

    model, x = torch.nn.Linear(10, 3), torch.zeros(4, 10)
    assert client_bytes(model, x, LocalRule("sgd", 0.1, 1, 4)) == 132 * 4 + 3 * 48 + 160
    assert client_bytes(model, x, LocalRule("adam", 0.1, 1, 4)) == 132 * 6 + 3 * 48 + 160
    assert client_bytes(model, x, LocalRule("sgd", 0.1, 1, 4, momentum=0.9),
                        extra_copies=2) == 132 * 7 + 3 * 48 + 160
