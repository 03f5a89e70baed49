"""What one client does, as plain functions: its data, local training and evaluation.

Flower-free on purpose (Flower's quickstart split): `client_app.py` unpacks messages and
calls these; they call `core/loop.py`. Everything a client trains with depends only on
(spec, seed, round, partition), so a resumed federation repeats an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from typing import Any

import numpy as np
import torch

from core.components import build_components
from core.data import Batches, DataBundle, Split, eval_batches, load_data
from core.loop import TrainState, evaluate, train_task, unwrap
from core.metrics import build_loss
from core.spec import ExperimentSpec, validate
from federated.faults import byzantine_clients, flip_labels, poison_update
from federated.partition import client_split, partition_indices
from federated.proximal import Proximal


@dataclasses.dataclass
class ClientData:
    bundle: DataBundle  # train/val replaced by this client's share
    train: Split
    val: Split


@functools.lru_cache(maxsize=4)
def _spec(spec_json: str) -> ExperimentSpec:
    return validate(json.loads(spec_json))


def spec_key(spec: ExperimentSpec) -> str:
    return json.dumps(spec.model_dump(mode="json"), sort_keys=True)


@functools.lru_cache(maxsize=4)
def _bundle(spec_json: str) -> DataBundle:
    spec = _spec(spec_json)
    return load_data(spec.data, spec.seed)


@functools.lru_cache(maxsize=4)
def _parts(spec_json: str, num_clients: int) -> tuple[np.ndarray, ...]:
    spec = _spec(spec_json)
    labels = _bundle(spec_json).train.y.numpy()
    return tuple(partition_indices(labels, spec.federated.partition, num_clients, spec.seed))


def client_data(spec: ExperimentSpec, partition: int, num_clients: int) -> ClientData:
    """This client's train/validation split (cached per process: Ray actors are reused)."""
    key = spec_key(spec)
    bundle = _bundle(key)
    idx = _parts(key, num_clients)[partition]
    train, val = client_split(bundle, idx, spec.federated.partition.val_fraction, spec.seed,
                              partition)
    return ClientData(dataclasses.replace(bundle, train=train, val=val), train, val)


def _seed(spec: ExperimentSpec, server_round: int, partition: int) -> int:
    return int(np.random.default_rng([spec.seed, server_round, partition]).integers(2**31))


def local_train(spec: ExperimentSpec, data: ClientData, global_state: dict[str, torch.Tensor],
                *, server_round: int, partition: int, num_clients: int, lr: float,
                local_epochs: int, batch_size: int, proximal_mu: float = 0.0
                ) -> tuple[dict[str, torch.Tensor], dict[str, float], str]:
    """Train from the global weights; returns (weights to send, metrics, attack applied)."""
    seed = _seed(spec, server_round, partition)
    torch.manual_seed(seed)
    bad = partition in byzantine_clients(spec.federated.byzantine, num_clients, spec.seed)
    attack = spec.federated.byzantine.attack if bad else ""
    train = data.train
    if attack == "label_flip":
        train = Split(train.x, flip_labels(train.y, data.bundle.num_classes))
    batches = Batches(train, batch_size, shuffle=True, seed=seed)
    local = spec.model_copy(update={"train": spec.train.model_copy(update={
        "epochs": local_epochs, "progress": "off", "device": "cpu"})})
    c = build_components(local, data.bundle, len(batches), device=torch.device("cpu"))
    unwrap(c.model).load_state_dict(global_state)
    for group in c.optimizer.param_groups:
        group["lr"] = lr
    c.cfg.patience = 0  # no early stopping inside a round: the server decides
    strategy = c.strategy
    if proximal_mu > 0:
        from continual.base import Composite

        strategy = Composite([strategy, Proximal(proximal_mu, global_state)])
    state = train_task(c.model, batches, None, c.optimizer, c.loss_fn, c.cfg, TrainState(),
                       data.bundle.num_classes, strategy=strategy)
    last = state.history[-1]
    metrics = {"train_loss": last["train_loss"], "train_accuracy": last["train_accuracy"]}
    weights = {k: v.detach().clone() for k, v in unwrap(c.model).state_dict().items()}
    if attack in ("sign_flip", "scaling", "gaussian"):
        weights = poison_update(spec.federated.byzantine, global_state, weights, spec.seed,
                                server_round, partition)
    return weights, metrics, attack


def local_evaluate(spec: ExperimentSpec, data: ClientData,
                   global_state: dict[str, torch.Tensor]) -> tuple[dict[str, float], int]:
    """The global model on this client's validation split (its train split if empty)."""
    from models import build_model

    split = data.val if len(data.val) else data.train
    model = build_model(spec.model, data.bundle.input_shape, data.bundle.num_classes)
    model.load_state_dict(global_state)
    loss_fn = build_loss(spec.train.loss, split.y, data.bundle.num_classes)
    m = evaluate(model, eval_batches(split, spec.data), loss_fn, data.bundle.num_classes)
    return {"val_loss": m["val_loss"], "val_accuracy": m["val_accuracy"]}, len(split)


def read_spec(spec_json: str) -> ExperimentSpec:
    return _spec(spec_json)


def cpu_threads(spec: ExperimentSpec) -> None:
    """One client = `client_cpus` threads; oversubscription makes simulations crawl."""
    torch.set_num_threads(max(1, int(spec.federated.client_cpus)))


def describe(spec: ExperimentSpec) -> dict[str, Any]:
    return {"strategy": spec.federated.strategy, "partition": spec.federated.partition.method}
