"""Partitions, injected faults, Byzantine updates, FedProx's term and the run_config mapping."""

from __future__ import annotations

import tomllib

import numpy as np
import pytest
import torch

from atoll.core.data import load_data
from atoll.core.spec import ByzantineSpec, FaultSpec, PartitionSpec, SpecError, load_spec
from atoll.federated import records as R
from atoll.federated.faults import byzantine_clients, flip_labels, poison_update, round_fault
from atoll.federated.partition import client_split, label_histogram, partition_indices
from atoll.federated.proximal import Proximal

LABELS = np.repeat(np.arange(10), 100)


@pytest.mark.parametrize("method", ["iid", "dirichlet", "shard", "pathological"])
def test_partitions_are_disjoint_and_seeded(method):
    spec = PartitionSpec(method=method, alpha=0.5)
    parts = partition_indices(LABELS, spec, 10, seed=1)
    flat = np.concatenate(parts)
    assert len(flat) == len(set(flat.tolist()))
    assert all(len(p) > 0 for p in parts)
    again = partition_indices(LABELS, spec, 10, seed=1)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again, strict=True))
    other = partition_indices(LABELS, spec, 10, seed=2)  # the seed matters
    assert not all(np.array_equal(a, b) for a, b in zip(parts, other, strict=True))
    if method in ("iid", "dirichlet"):
        assert len(flat) == len(LABELS)  # every sample goes somewhere


def test_pathological_gives_k_classes_and_dirichlet_is_skewed():
    parts = partition_indices(LABELS, PartitionSpec(method="pathological",
                                                    classes_per_client=2), 10, seed=0)
    assert all(len(np.unique(LABELS[p])) == 2 for p in parts)
    hist = label_histogram(LABELS, partition_indices(
        LABELS, PartitionSpec(method="dirichlet", alpha=0.1), 10, seed=0), 10)
    iid = label_histogram(LABELS, partition_indices(LABELS, PartitionSpec(), 10, seed=0), 10)
    assert hist.sum() == iid.sum() == len(LABELS)
    share = hist / hist.sum(1, keepdims=True)
    assert share.max(1).mean() > 2 * (iid / iid.sum(1, keepdims=True)).max(1).mean()


def test_impossible_partition_names_the_field():
    with pytest.raises(ValueError, match="federated.partition"):
        partition_indices(LABELS[:30], PartitionSpec(method="dirichlet", alpha=0.05,
                                                     min_partition_size=10), 10, seed=0)


def test_client_split_is_seeded_per_client():
    data = load_data(load_spec(None).data, 0)
    idx = np.arange(100)
    tr, va = client_split(data, idx, 0.2, seed=0, client=3)
    assert len(tr) == 80 and len(va) == 20
    tr2, _ = client_split(data, idx, 0.2, seed=0, client=3)
    assert torch.equal(tr.y, tr2.y)
    _, va_other = client_split(data, idx, 0.2, seed=0, client=4)  # each client its own cut
    _, va_seed = client_split(data, idx, 0.2, seed=1, client=3)
    assert not torch.equal(va.x, va_other.x) and not torch.equal(va.x, va_seed.x)


def test_fault_rates_and_determinism():
    spec = FaultSpec(dropout=0.2, crash=0.1)
    draws = [round_fault(spec, 0, r, c) for r in range(1, 51) for c in range(20)]
    assert draws == [round_fault(spec, 0, r, c) for r in range(1, 51) for c in range(20)]
    assert draws != [round_fault(spec, 1, r, c) for r in range(1, 51) for c in range(20)]
    assert 0.15 < draws.count("dropout") / len(draws) < 0.25
    assert draws.count("straggler") == 0
    assert round_fault(FaultSpec(), 0, 1, 1) == ""


def test_byzantine_set_is_fixed_and_sized():
    spec = ByzantineSpec(fraction=0.2, attack="sign_flip")
    bad = byzantine_clients(spec, 10, seed=4)
    assert len(bad) == 2 and bad == byzantine_clients(spec, 10, seed=4)
    assert any(byzantine_clients(spec, 10, seed=s) != bad for s in range(5, 10))
    assert byzantine_clients(ByzantineSpec(), 10, seed=4) == set()


def test_poisoned_updates():
    g = {"w": torch.tensor([1.0, 1.0]), "n": torch.tensor(3)}
    local = {"w": torch.tensor([2.0, 0.0]), "n": torch.tensor(4)}
    flip = poison_update(ByzantineSpec(attack="sign_flip", scale=2.0), g, local, 0, 1, 0)
    torch.testing.assert_close(flip["w"], torch.tensor([-1.0, 3.0]))  # g − 2Δ
    assert flip["n"].item() == 4
    scaled = poison_update(ByzantineSpec(attack="scaling", scale=3.0), g, local, 0, 1, 0)
    torch.testing.assert_close(scaled["w"], torch.tensor([4.0, -2.0]))
    noisy = poison_update(ByzantineSpec(attack="gaussian", noise_std=1.0), g, local, 0, 1, 0)
    assert not torch.equal(noisy["w"], local["w"])
    assert torch.equal(flip_labels(torch.tensor([0, 9, 3]), 10), torch.tensor([9, 0, 6]))


def test_proximal_penalty_and_gradient():
    lin = torch.nn.Linear(3, 2)
    anchor = {k: v.detach().clone() for k, v in lin.state_dict().items()}
    prox = Proximal(0.5, anchor)
    assert prox.penalty(lin).item() == 0.0
    with torch.no_grad():
        lin.weight.add_(1.0)
    p = prox.penalty(lin)
    assert p.item() == pytest.approx(0.5 / 2 * 6)
    p.backward()
    torch.testing.assert_close(lin.weight.grad, torch.full((2, 3), 0.5))  # μ(w − w0)


def test_run_config_round_trip(tmp_path):
    spec = load_spec(None, ["mode=federated", "federated.rounds=7",
                            "federated.partition.method=shard", "model.hidden=[16]"])
    cfg = R.run_config_for(spec, run_dir=tmp_path, tracking_uri="sqlite:////x/y.db",
                           mlflow_run_id=None, resume="")
    parsed = tomllib.loads(R.to_toml(cfg))
    assert parsed[R.TRACKING_URI] == "sqlite:////x/y.db"
    assert R.spec_from_run_config(parsed) == spec
    assert set(cfg) == set(R.RUN_CONFIG_DEFAULTS)


def test_run_config_overrides_and_rounds():
    spec = R.spec_from_run_config({R.OVERRIDES: "federated.strategy=fedmedian; seed=3",
                                   R.NUM_ROUNDS: 2})
    assert spec.federated.strategy == "fedmedian" and spec.seed == 3
    assert spec.federated.rounds == 2 and spec.mode == "federated"
    with pytest.raises(SpecError, match="federated.strategy"):
        R.spec_from_run_config({R.OVERRIDES: "federated.strategy=fedavgx"})


def test_pyproject_declares_every_run_config_key():
    from tests.conftest import ROOT

    flwr = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]
    assert flwr["config"] == R.RUN_CONFIG_DEFAULTS
    assert flwr["components"] == {"serverapp": "atoll.federated.server_app:app",
                                  "clientapp": "atoll.federated.client_app:app"}


@pytest.mark.parametrize("override,field", [
    ("federated.min_fit_clients=20", "federated.min_fit_clients"),
    ("federated.byzantine.fraction=0.2", "federated.byzantine.attack"),
    ("federated.privacy.mode=server-fixed", "federated.privacy.mode"),
])
def test_federated_spec_errors_name_the_field(override, field):
    extra = ["federated.strategy=krum"] if "privacy" in override else []
    with pytest.raises(SpecError) as e:
        load_spec(None, [override, *extra])
    assert e.value.problems[0].startswith(field)


def test_client_specific_task_orders_are_seeded_permutations():
    from atoll.core.spec import load_spec
    from atoll.federated.task import client_task, task_order
    from tests.conftest import CONFIGS

    same = load_spec(CONFIGS / "fcl.yaml")
    assert all(task_order(same, c) == [0, 1, 2] for c in range(5))
    spec = load_spec(CONFIGS / "fcl.yaml", ["continual.client_order=shuffled"])
    orders = [task_order(spec, c) for c in range(5)]
    assert all(sorted(o) == [0, 1, 2] for o in orders)
    assert len({tuple(o) for o in orders}) > 1  # clients differ ...
    assert orders == [task_order(spec, c) for c in range(5)]  # ... reproducibly
    # rounds 1-4 train the first task of each client's order, 5-8 the second
    assert [client_task(spec, 2, r) for r in (1, 4, 5, 8, 9, 12)] == \
        [orders[2][0]] * 2 + [orders[2][1]] * 2 + [orders[2][2]] * 2


def test_unavailable_clients_stay_away_for_several_rounds():
    from atoll.federated.faults import unavailable

    spec = FaultSpec(unavailable=0.1, unavailable_rounds=3)
    absent = np.array([[unavailable(spec, 0, r, c) for r in range(1, 61)] for c in range(20)])
    assert 0.15 < absent.mean() < 0.45  # ≈ 1 − 0.9³
    starts = absent[:, 1:] & ~absent[:, :-1]  # a client that goes away ...
    for c, r in zip(*np.nonzero(starts), strict=True):
        assert absent[c, r + 1: r + 4].all() or r + 4 > 59  # ... is absent 3 rounds in a row
    assert not unavailable(FaultSpec(), 0, 5, 1)
