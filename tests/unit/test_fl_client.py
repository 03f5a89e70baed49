"""What a federated client trains with: its own randomness, the federation's loss, and
every local-mode spec field honoured or refused (never silently dropped)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from atoll.core.data import Split, load_data
from atoll.core.metrics import build_loss
from atoll.core.spec import SpecError, load_spec
from atoll.federated import task
from atoll.federated.fields import REFUSED, treatment


def _spec(*overrides: str):
    return load_spec(None, ["mode=federated", "federated.num_clients=4", "model.hidden=[32]",
                            "data.limit=400", *overrides])


def _train(spec, partition: int, data=None) -> dict[str, torch.Tensor]:
    from atoll.models import build_model

    data = data or task.client_data(spec, 0, 4)

    torch.manual_seed(spec.seed)
    glob = build_model(spec.model, data.bundle.input_shape, data.bundle.num_classes
                       ).state_dict()
    weights, _, _ = task.local_train(spec, data, glob, server_round=1, partition=partition,
                                     num_clients=4, lr=0.1, local_epochs=1,
                                     batch_size=len(data.train))
    return weights


def test_each_client_draws_its_own_dropout_masks_reproducibly():
    """Same single training sample (no order to shuffle): only dropout masks can differ."""
    spec = _spec("model.dropout=0.5", "optim.name=sgd")
    full = task.client_data(spec, 0, 4)
    one = Split(full.train.x[:1], full.train.y[:1])
    data = dataclasses.replace(full, train=one, bundle=dataclasses.replace(full.bundle,
                                                                             train=one))
    a, b, a2 = _train(spec, 0, data), _train(spec, 1, data), _train(spec, 0, data)
    diff = max((a[k] - b[k]).abs().max().item() for k in a)
    assert diff > 1e-3, "clients 0 and 1 drew the same randomness"
    for k in a:
        torch.testing.assert_close(a[k], a2[k], rtol=0, atol=0)


def test_balanced_class_weights_come_from_the_global_training_histogram():
    spec = _spec("train.loss.class_weights=balanced", "federated.partition.method=dirichlet",
                 "federated.partition.alpha=0.3")
    glob = load_data(spec.data, spec.seed, spec.project_dir, spec.task)
    expected = build_loss(spec.train.loss, glob.train.y, glob.num_classes).weight
    torch.testing.assert_close(task.federation_loss(spec).weight, expected)
    local = task.client_data(spec, 1, 4)
    own = build_loss(spec.train.loss, local.train.y, glob.num_classes).weight
    assert not torch.allclose(own, expected)  # a client's own labels would differ


def test_augmentation_is_applied_by_clients():
    plain = _train(_spec(), 0)
    shifted = _train(_spec("data.augment.noise_std=0.5"), 0)
    assert max((plain[k] - shifted[k]).abs().max().item() for k in plain) > 1e-4


def test_every_local_field_is_honoured_replaced_or_refused():
    keys = [k for k in load_spec(None).flat() if k.split(".")[0] in
            ("data", "model", "optim", "train")]
    unclassified = [k for k in keys if treatment(k) is None]
    assert not unclassified, f"say how federated mode treats: {unclassified}"
    refused = [k for k in keys if treatment(k) == REFUSED]
    assert refused == ["optim.scheduler.name", "train.early_stopping.patience",
                       "train.compile"]
    for key, value in (("optim.scheduler.name", "cosine"),
                       ("train.early_stopping.patience", "3"), ("train.compile", "true")):
        with pytest.raises(SpecError) as e:
            _spec(f"{key}={value}")
        assert e.value.problems[0].startswith(f"{key}:")
        load_spec(None, [f"{key}={value}"])  # local mode takes it


def test_federated_evaluation_needs_a_client_validation_split():
    with pytest.raises(SpecError, match="federated.partition.val_fraction"):
        _spec("federated.partition.val_fraction=0")
    _spec("federated.partition.val_fraction=0", "federated.fraction_evaluate=0")


def test_an_si_client_trains_a_task_over_several_rounds():
    """SI in a federated stream: the second round of a task crashed with a KeyError (the
    running path integral was not in the state a client keeps between rounds)."""
    from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    from atoll.continual.si import SI
    from atoll.federated import client_app
    from atoll.federated import records as R
    from atoll.models import build_model

    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 0, 0, 1
    spec = _spec("continual.stream=permuted", "continual.strategy=[si]", "continual.n_tasks=2",
                 "continual.scenario=domain",
                 "federated.rounds=4", "federated.rounds_per_task=2", "tracking.enabled=false")
    run_config = R.run_config_for(spec, run_dir="", tracking_uri=None, mlflow_run_id=None,
                                  resume="", restart=False)
    ctx = Context(run_id=0, node_id=5, node_config={R.NODE_PARTITION_ID: 0,
                                                    R.NODE_NUM_PARTITIONS: 4},
                  state=RecordDict(), run_config=run_config)
    data = task.client_data(spec, 0, 4)
    state = build_model(spec.model, data.bundle.input_shape, data.bundle.num_classes
                        ).state_dict()
    for rnd in (1, 2, 3):  # task 0 twice, then task 1 closes task 0
        cfg = {R.ROUND: rnd, R.LR: 0.05, R.LOCAL_EPOCHS: 1, R.BATCH_SIZE: 32}
        reply = client_app.app(Message(RecordDict({R.ARRAYS: R.state_to_arrays(state),
                                                   R.CONFIG: ConfigRecord(cfg)}),
                                       dst_node_id=5, message_type=MessageType.TRAIN), ctx)
        assert not reply.has_error(), reply.error.reason
        state = R.arrays_to_state(reply.content[R.ARRAYS])
    saved = ctx.state[R.CL_STATE]
    si = SI(spec.continual.si)
    si.load_state_dict(torch.load(__import__("io").BytesIO(bytes(saved[R.CL_BLOB])),
                                  weights_only=True))
    assert si.omega and all(torch.isfinite(o).all() and (o >= 0).all()
                            for o in si.omega.values())
    assert any(o.sum() > 0 for o in si.omega.values())
