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

from atoll.core.components import build_components, pick_device
from atoll.core.data import Batches, DataBundle, Split, eval_batches, load_data
from atoll.core.loop import TrainState, evaluate, train_task, unwrap
from atoll.core.metrics import build_loss
from atoll.core.spec import ExperimentSpec, validate
from atoll.federated.faults import byzantine_clients, flip_labels, poison_update
from atoll.federated.partition import client_split, partition_indices
from atoll.federated.proximal import Proximal


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
    return load_data(spec.data, spec.seed, spec.project_dir, spec.task)


@functools.lru_cache(maxsize=4)
def _parts(spec_json: str, num_clients: int) -> tuple[np.ndarray, ...]:
    spec = _spec(spec_json)
    labels = _bundle(spec_json).train.y.numpy()
    return tuple(partition_indices(labels, spec.federated.partition, num_clients, spec.seed))


@functools.lru_cache(maxsize=4)
def _tasks(spec_json: str) -> tuple[Any, ...]:
    from atoll.continual.streams import build_stream

    spec = _spec(spec_json)
    return tuple(build_stream(_bundle(spec_json), spec.continual, spec.seed))


@functools.lru_cache(maxsize=32)
def _task_parts(spec_json: str, task_index: int, num_clients: int) -> tuple[np.ndarray, ...]:
    spec = _spec(spec_json)
    labels = _tasks(spec_json)[task_index].train.y.numpy()
    return tuple(partition_indices(labels, spec.federated.partition, num_clients,
                                   spec.seed + task_index))


def streaming(spec: ExperimentSpec) -> bool:
    return spec.continual.stream != "none"


def rounds_per_task(spec: ExperimentSpec) -> int:
    f = spec.federated
    return f.rounds_per_task or max(1, f.rounds // spec.continual.n_tasks)


def task_of_round(spec: ExperimentSpec, server_round: int) -> int:
    """Which position of the stream round r trains (the last keeps any extra rounds)."""
    return min((server_round - 1) // rounds_per_task(spec), spec.continual.n_tasks - 1)


def task_order(spec: ExperimentSpec, partition: int) -> list[int]:
    """The order in which this client meets the stream's tasks: the stream's own, or with
    `continual.client_order: shuffled` a permutation seeded by (seed, client)."""
    n = spec.continual.n_tasks
    if spec.continual.client_order == "same":
        return list(range(n))
    return [int(t) for t in np.random.default_rng([spec.seed, 7_717, partition]).permutation(n)]


def client_task(spec: ExperimentSpec, partition: int, server_round: int) -> int:
    """The task (stream index) this client trains in round r."""
    return task_order(spec, partition)[task_of_round(spec, server_round)]


def stream(spec: ExperimentSpec) -> tuple[Any, ...]:
    return _tasks(spec_key(spec))


def client_data(spec: ExperimentSpec, partition: int, num_clients: int,
                task_index: int | None = None) -> ClientData:
    """This client's train/validation split — of task `task_index` when streaming —
    cached per process (Ray actors are reused across clients and rounds)."""
    key = spec_key(spec)
    bundle = _bundle(key)
    if task_index is None:
        source, idx = bundle.train, _parts(key, num_clients)[partition]
    else:
        source = _tasks(key)[task_index].train
        idx = _task_parts(key, task_index, num_clients)[partition]
    train, val = client_split(dataclasses.replace(bundle, train=source), idx,
                              spec.federated.partition.val_fraction, spec.seed, partition)
    return ClientData(dataclasses.replace(bundle, train=train, val=val), train, val)


def _seed(spec: ExperimentSpec, server_round: int, partition: int) -> int:
    return int(np.random.default_rng([spec.seed, server_round, partition]).integers(2**31))


def federation_loss(spec: ExperimentSpec, device: torch.device | str = "cpu") -> torch.nn.Module:
    """The loss every client and the server use: class weights (`balanced`) come from the
    federation's global training histogram, never from one client's labels."""
    bundle = _bundle(spec_key(spec))
    return build_loss(spec.train.loss, bundle.train.y, bundle.num_classes, bundle.task,
                      bundle.y_mean, bundle.y_std).to(device)


class CrashFault(RuntimeError):
    """An injected crash part-way through local training."""


def local_train(spec: ExperimentSpec, data: ClientData, global_state: dict[str, torch.Tensor],
                *, server_round: int, partition: int, num_clients: int, lr: float,
                local_epochs: int, batch_size: int, proximal_mu: float = 0.0,
                continual: ContinualState | None = None, crash: bool = False
                ) -> tuple[dict[str, torch.Tensor], dict[str, float], str]:
    """Train from the global weights; returns (weights to send, metrics, attack applied).

    With `continual` (a task stream), the client's strategy state carries over between
    rounds: at a task boundary the previous task is closed on the received global model
    (EWC's Fisher, replay's memory, … from this client's data of that task). `crash`
    raises CrashFault half-way through the local steps (an injected fault).
    A non-finite loss or gradient raises core.loop.NonFiniteLoss; no step applied it.
    """
    seed = _seed(spec, server_round, partition)
    bad = partition in byzantine_clients(spec.federated.byzantine, num_clients, spec.seed)
    attack = spec.federated.byzantine.attack if bad else ""
    train = data.train
    if attack == "label_flip":
        train = Split(train.x, flip_labels(train.y, data.bundle.num_classes))
    aug = spec.data.augment if data.bundle.is_image else None
    batches = Batches(train, batch_size, shuffle=True, seed=seed,
                      shift=aug.shift if aug else 0, noise_std=aug.noise_std if aug else 0.0)
    device = pick_device(spec)
    local = spec.model_copy(update={"train": spec.train.model_copy(update={
        "epochs": local_epochs, "progress": "off"})})
    c = build_components(local, data.bundle, len(batches), device=device)
    c.loss_fn = federation_loss(spec, device)
    # build_components seeds the model's init with spec.seed; everything random from here
    # on (dropout masks, augmentation noise) is this client's and this round's own
    torch.manual_seed(seed)
    unwrap(c.model).load_state_dict(global_state)
    for group in c.optimizer.param_groups:
        group["lr"] = lr
    c.cfg.patience = 0  # no early stopping inside a round: the server decides
    strategy, task, mask = c.strategy, None, None
    if continual is not None:
        strategy, task, mask = continual.enter(spec, c.model, partition, num_clients,
                                               batch_size)
    if proximal_mu > 0:
        from atoll.continual.base import Composite

        strategy = Composite([strategy, Proximal(proximal_mu, global_state)])
    on_step = None
    if crash:
        halfway = max(1, (len(batches) * local_epochs) // 2)
        c.cfg.log_every_n_steps = 1

        def on_step(step: int, _: dict[str, float]) -> None:
            if step >= halfway:
                raise CrashFault(f"crashed after {step} of {len(batches) * local_epochs} "
                                 "local steps")

    state = train_task(c.model, batches, None, c.optimizer, c.loss_fn, c.cfg, TrainState(),
                       data.bundle.num_classes, strategy=strategy, task=task,
                       logit_mask=mask, task_boundaries=continual is None, on_step=on_step)
    if continual is not None:  # the round ends; the next starts from the server's model
        strategy.pause(unwrap(c.model))
    last = state.history[-1]
    metrics = {k: last[k] for k in ("train_loss", "train_accuracy") if k in last}
    weights = {k: v.detach().cpu().clone() for k, v in unwrap(c.model).state_dict().items()}
    if attack in ("sign_flip", "scaling", "gaussian"):
        weights = poison_update(spec.federated.byzantine, global_state, weights, spec.seed,
                                server_round, partition)
    return weights, metrics, attack


def local_evaluate(spec: ExperimentSpec, data: ClientData,
                   global_state: dict[str, torch.Tensor]) -> tuple[dict[str, float], int]:
    """The global model on this client's validation split."""
    from atoll.models import build_model

    split = data.val
    if not len(split):
        raise ValueError(NO_VALIDATION)
    model = build_model(spec.model, data.bundle.input_shape, data.bundle.num_classes,
                        spec.project_dir, data.bundle.embedded)
    model.load_state_dict(global_state)
    m = evaluate(model, eval_batches(split, spec.data), federation_loss(spec),
                 data.bundle.num_classes)
    return client_metrics(m, data.bundle.task), len(split)


NO_VALIDATION = "this client has no validation samples; raise federated.partition.val_fraction"


def client_metrics(m: dict[str, float], task: str) -> dict[str, float]:
    """What a client reports of `core.loop.evaluate`'s figures."""
    keys = ("val_loss", "val_r2") if task == "regression" else ("val_loss", "val_accuracy")
    return {k: m[k] for k in keys}


@dataclasses.dataclass
class ContinualState:
    """A client's continual-learning state between rounds (kept in Flower's Context.state).

    `blob` is the strategy's state_dict as bytes (torch.save, read back weights_only);
    `task` the task it last trained. `enter` rebuilds the strategy and, on the first round
    of a new task, closes the old one.
    """

    blob: bytes | None
    task: int | None
    current: int = 0
    strategy: Any = None
    federation: list | None = None  # FedEWC: the server's (task, anchor, Fisher) pairs
    closed: tuple[int, dict[str, torch.Tensor], float] | None = None  # what goes back

    def enter(self, spec: ExperimentSpec, model: torch.nn.Module, partition: int,
              num_clients: int, batch_size: int) -> tuple[Any, Any, Any]:
        import io

        from atoll.continual import build_strategy
        from atoll.core.continual_runner import task_mask
        from atoll.federated.fedewc import adopt, ewc_of

        tasks = stream(spec)
        self.strategy = build_strategy(spec)
        if self.blob:
            self.strategy.load_state_dict(torch.load(io.BytesIO(self.blob), weights_only=True))
        closed = None  # the stream position this client just finished (FedEWC's key)
        if self.task is not None and self.task != self.current:
            old = client_data(spec, partition, num_clients, self.task)
            self.strategy.after_task(model, tasks[self.task], Batches(old.train, batch_size))
            closed = task_order(spec, partition).index(self.task)
            ewc = ewc_of(self.strategy)
            if ewc is not None and ewc.fishers:
                self.closed = (closed, ewc.fishers[-1],
                               float(min(len(old.train), spec.continual.ewc.fisher_samples)))
        if self.federation is not None and (ewc := ewc_of(self.strategy)) is not None:
            adopt(ewc, self.federation, closed)
        if self.task != self.current:
            self.strategy.before_task(model, tasks[self.current])
        mask = task_mask(list(tasks), _bundle(spec_key(spec)).num_classes) \
            if spec.continual.scenario == "task" else None
        return self.strategy, tasks[self.current], mask

    def dump(self) -> bytes:
        import io

        buf = io.BytesIO()
        torch.save(self.strategy.state_dict(), buf)
        return buf.getvalue()


def cpu_threads(spec: ExperimentSpec) -> None:
    """One client = `client_cpus` threads; oversubscription makes simulations crawl."""
    torch.set_num_threads(max(1, int(spec.federated.client_cpus)))
