"""Aggregation math against hand-computed expectations, through Flower's own strategies."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Message,
    MessageType,
    Metadata,
    MetricRecord,
    RecordDict,
)

from atoll.core.spec import load_spec
from atoll.federated import records as R
from atoll.federated.driver import ClientSampler, spread
from atoll.federated.strategies import build_strategy, load_strategy_state, strategy_state


def reply(weights: dict[str, np.ndarray], n: int, partition: int, **metrics: float) -> Message:
    content = RecordDict({
        R.ARRAYS: ArrayRecord({k: torch.from_numpy(v) for k, v in weights.items()}),
        R.METRICS: MetricRecord({R.NUM_EXAMPLES: n, **metrics}),
        R.CLIENT: ConfigRecord({R.PARTITION_ID: partition, R.BYZANTINE: ""})})
    meta = Metadata(run_id=1, message_id="", src_node_id=100 + partition, dst_node_id=0,
                    reply_to_message_id="x", group_id="1", created_at=0.0, ttl=60.0,
                    message_type=MessageType.TRAIN)
    return Message(content=content, metadata=meta)


def spec(*overrides: str):
    return load_spec(None, ["federated.num_clients=5", *overrides])


def replies_3():
    w = [{"w": np.array([1.0, 2.0], dtype=np.float32), "b": np.array([0.0], np.float32)},
         {"w": np.array([3.0, 0.0], dtype=np.float32), "b": np.array([1.0], np.float32)},
         {"w": np.array([5.0, 4.0], dtype=np.float32), "b": np.array([5.0], np.float32)}]
    n = [10, 30, 60]
    return w, n, [reply(wi, ni, i, train_loss=float(i)) for i, (wi, ni) in
                  enumerate(zip(w, n, strict=True))]


def test_fedavg_is_the_weighted_mean():
    w, n, msgs = replies_3()
    arrays, metrics = build_strategy(spec(), 3).aggregate_train(1, msgs)
    got = arrays.to_numpy_ndarrays()
    expected_w = (10 * w[0]["w"] + 30 * w[1]["w"] + 60 * w[2]["w"]) / 100
    np.testing.assert_allclose(got[0], expected_w, rtol=1e-6)
    np.testing.assert_allclose(got[1], [(0 + 30 + 300) / 100], rtol=1e-6)
    assert metrics["train_loss"] == pytest.approx((0 * 10 + 1 * 30 + 2 * 60) / 100)


def test_fedmedian_is_the_coordinate_median():
    w, _, msgs = replies_3()
    arrays, _ = build_strategy(spec("federated.strategy=fedmedian"), 3).aggregate_train(1, msgs)
    np.testing.assert_allclose(arrays.to_numpy_ndarrays()[0], [3.0, 2.0])
    np.testing.assert_allclose(arrays.to_numpy_ndarrays()[1], [1.0])


def test_krum_ignores_the_outlier():
    honest = [{"w": np.array([1.0, 1.0], np.float32) + 0.01 * i} for i in range(4)]
    evil = {"w": np.array([100.0, -100.0], np.float32)}
    msgs = [reply(h, 10, i) for i, h in enumerate(honest)] + [reply(evil, 10, 4)]
    arrays, _ = build_strategy(spec("federated.strategy=krum", "federated.num_malicious=1"),
                               5).aggregate_train(1, msgs)
    assert np.abs(arrays.to_numpy_ndarrays()[0] - 1.0).max() < 0.05


def test_fedadam_state_survives_a_checkpoint_round_trip(monkeypatch):
    """Aggregating round 2 after a restore equals aggregating it without interruption."""
    from flwr.supercore.task_identity import TaskIdentity

    # configure_train builds Messages, which read the run id a ServerApp process would set
    monkeypatch.setattr(TaskIdentity, "_run_id", 1, raising=False)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1, raising=False)
    monkeypatch.setattr(TaskIdentity, "_node_id", 0, raising=False)
    s = spec("federated.strategy=fedadam")
    start = ArrayRecord({"w": torch.zeros(2), "b": torch.zeros(1)})

    def round_(strategy, r, base):
        list(strategy.configure_train(r, base, ConfigRecord(), _Grid()))
        _, _, msgs = replies_3()
        arrays, _ = strategy.aggregate_train(r, msgs)
        return arrays

    a = build_strategy(s, 3)
    after1 = round_(a, 1, start)
    saved = strategy_state(a)
    buf = io.BytesIO()
    torch.save(saved, buf)
    restored = torch.load(io.BytesIO(buf.getvalue()), weights_only=True)
    b = build_strategy(s, 3)
    load_strategy_state(b, restored)
    for x, y in zip(round_(a, 2, after1).to_numpy_ndarrays(),
                    round_(b, 2, after1).to_numpy_ndarrays(), strict=True):
        np.testing.assert_array_equal(x, y)
    assert "m_t" in saved and "v_t" in saved


class _Grid:
    def get_node_ids(self):
        return [100, 101, 102]


def test_sampler_is_seeded_and_its_state_round_trips():
    pop = list(range(20))
    a, b = ClientSampler(3), ClientSampler(3)
    assert a.sample(pop, 0.25, 2) == b.sample(pop, 0.25, 2)
    assert len(a.sample(pop, 0.25, 2)) == 5
    state = a.state_dict()
    nxt = a.sample(pop, 0.5, 1)
    c = ClientSampler(99)
    c.load_state_dict(state)
    assert c.sample(pop, 0.5, 1) == nxt
    assert ClientSampler.size(20, 1.0, 2) == 20 and ClientSampler.size(20, 0.01, 3) == 3


def test_sampler_state_survives_weights_only_load():
    from atoll.federated.server import _decode_state, _encode_state

    s = ClientSampler(5)
    s.sample(list(range(9)), 0.5, 1)
    buf = io.BytesIO()
    torch.save({"sampler": _encode_state(s.state_dict())}, buf)
    back = torch.load(io.BytesIO(buf.getvalue()), weights_only=True)["sampler"]
    t = ClientSampler(0)
    t.load_state_dict(_decode_state(back))
    assert t.sample(list(range(9)), 0.5, 1) == s.sample(list(range(9)), 0.5, 1)


def test_spread_is_unweighted_min_mean_max():
    _, _, msgs = replies_3()
    got = spread(msgs, "train_loss")
    assert got == {"clients_train_loss_mean": 1.0, "clients_train_loss_min": 0.0,
                   "clients_train_loss_max": 2.0}


def test_server_dp_clips_each_update_and_accounts_the_release(monkeypatch):
    """With σ = 0 the DP aggregate is the mean of the updates clipped to norm C around
    the global model; a released round charges ε; a round with an error is refused."""
    from flwr.supercore.task_identity import TaskIdentity

    monkeypatch.setattr(TaskIdentity, "_run_id", 1, raising=False)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1, raising=False)
    monkeypatch.setattr(TaskIdentity, "_node_id", 0, raising=False)
    s = spec("federated.num_clients=3", "federated.privacy.mode=server-fixed",
             "federated.privacy.noise_multiplier=1e-9", "federated.privacy.clipping_norm=1.0")
    strategy = build_strategy(s, 3)
    start = ArrayRecord({"w": torch.zeros(2), "b": torch.zeros(1)})
    list(strategy.configure_train(1, start, ConfigRecord(), _Grid()))
    w = [{"w": np.array([3.0, 4.0], np.float32), "b": np.array([0.0], np.float32)},  # |u|=5
         {"w": np.array([0.3, 0.0], np.float32), "b": np.array([0.4], np.float32)},  # 0.5
         {"w": np.array([0.0, 0.0], np.float32), "b": np.array([-2.0], np.float32)}]  # 2
    arrays, _ = strategy.aggregate_train(1, [reply(x, 1, i) for i, x in enumerate(w)])
    got = arrays.to_numpy_ndarrays()
    clipped_w = [np.array([0.6, 0.8]), np.array([0.3, 0.0]), np.array([0.0, 0.0])]
    clipped_b = [0.0, 0.4, -1.0]
    np.testing.assert_allclose(got[0], np.mean(clipped_w, axis=0), atol=1e-5)
    np.testing.assert_allclose(got[1], [np.mean(clipped_b)], atol=1e-5)
    assert strategy.privacy_spent().epsilon > 0
