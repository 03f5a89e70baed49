"""Compressed replies through atoll's real ClientApp (`client_app.app`, mods included) and
the server's expansion (`wire.expand`, what `driver.exchange` calls before vetting): the
decoded model is the uncompressed reply within the method's bound, DP clips what the
server decodes, the error-feedback residual survives in the node's state and the run dir,
and a reply that does not decode is refused, naming why."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import Array, ConfigRecord, Context, Message, MessageType, RecordDict

from atoll.core.spec import load_spec
from atoll.federated import client_app
from atoll.federated import records as R
from atoll.federated.driver import malformed
from atoll.federated.vectorized_grid import NODE_BASE, VectorizedGrid
from atoll.federated.wire import expand
from atoll.models import build_model
from tests.conftest import CONFIGS

CLIENTS = 4


def _setup(tmp_path, *sets: str):
    spec = load_spec(CONFIGS / "federated.yaml", [
        "train.progress=off", "tracking.enabled=false", f"federated.num_clients={CLIENTS}",
        "federated.local_epochs=1", "model.hidden=[32]", "data.limit=400", *sets])
    run_config = R.run_config_for(spec, run_dir=str(tmp_path), tracking_uri=None,
                                  mlflow_run_id=None, resume="", restart=False)
    return spec, run_config


def _context(p: int, run_config: dict) -> Context:
    return Context(run_id=0, node_id=NODE_BASE + p,
                   node_config={R.NODE_PARTITION_ID: p, R.NODE_NUM_PARTITIONS: CLIENTS},
                   state=RecordDict(), run_config=run_config)


def _message(spec, rnd: int, p: int, state=None, extra=None) -> Message:
    VectorizedGrid(spec, {})  # sets the process's task identity (Message needs one)
    from atoll.federated.task import client_data

    if state is None:
        bundle = client_data(spec, 0, CLIENTS).bundle
        torch.manual_seed(0)
        state = build_model(spec.model, bundle.input_shape, bundle.num_classes).state_dict()
    cfg = {R.ROUND: rnd, R.LR: 0.05, R.LOCAL_EPOCHS: 1, R.BATCH_SIZE: 32, **(extra or {})}
    return Message(RecordDict({R.ARRAYS: R.state_to_arrays(state), R.CONFIG: ConfigRecord(cfg)}),
                   dst_node_id=NODE_BASE + p, message_type=MessageType.TRAIN)


def _update(reply: Message, msg: Message) -> np.ndarray:
    got, sent = reply.content[R.ARRAYS], msg.content[R.ARRAYS]
    return np.concatenate([(got[k].numpy().astype(np.float64) - sent[k].numpy()).ravel()
                           for k in sent])


@pytest.mark.parametrize("method,ratio", [("int8", 3.5), ("topk", 8.0), ("fp16", 1.9),
                                          ("qsgd", 6.5), ("randk", 8.0)])
def test_a_compressed_reply_expands_to_the_clients_model(tmp_path, method, ratio):
    plain_spec, plain_rc = _setup(tmp_path)
    spec, rc = _setup(tmp_path, f"federated.compression.method={method}")
    msg = _message(spec, 1, 0)
    plain = client_app.app(_message(plain_spec, 1, 0), _context(0, plain_rc))
    reply = client_app.app(msg, _context(0, rc))
    assert not reply.has_error(), reply.error
    assert R.ARRAYS not in reply.content and R.UPDATE in reply.content
    wire = sum(R.nbytes(a) for a in reply.content.array_records.values())
    assert expand(reply, msg, spec.federated.compression) is None
    assert malformed(reply, msg) is None  # an ordinary reply now
    dense = R.nbytes(reply.content[R.ARRAYS])
    assert dense / wire >= ratio, (dense, wire)
    full, got = _update(plain, msg), _update(reply, msg)
    if method in ("topk", "randk"):  # the kept 10 % as fp16, the rest dropped
        kept = got != 0
        assert 0.05 < kept.mean() < 0.15
        np.testing.assert_allclose(got[kept], full[kept], rtol=2e-3, atol=1e-7)
    elif method == "qsgd":  # unbiased but coarse: within ‖x‖/levels, and aligned with x
        assert np.abs(got - full).max() <= np.linalg.norm(full) / 4 * 1.01
        assert np.corrcoef(got, full)[0, 1] > 0.3
    else:
        scale = np.abs(full).max()
        tol = {"int8": scale / 127 / 2, "fp16": scale * 2**-10}
        assert np.abs(got - full).max() <= tol[method] * 1.01
    assert dict(reply.content[R.METRICS]) == dict(plain.content[R.METRICS])


def test_client_dp_clips_the_update_the_server_decodes(tmp_path):
    spec, rc = _setup(tmp_path, "federated.compression.method=int8",
                      "federated.privacy.mode=client-adaptive",
                      "federated.privacy.clipping_norm=0.05")
    msg = _message(spec, 1, 1, extra={"clipping_norm": 0.05})
    reply = client_app.app(msg, _context(1, rc))
    assert reply.content[R.METRICS]["norm_bit"] == 1  # it was clipped
    assert expand(reply, msg, spec.federated.compression) is None
    assert np.linalg.norm(_update(reply, msg)) <= 0.05 * (1 + 1e-5)


def test_the_error_feedback_residual_survives_in_the_node_and_the_run_dir(tmp_path):
    """Round 1 keeps what top-k dropped; round 2 sends it along with its own update, from
    the node's state — or, for a resumed federation (a new Flower run, no node state), from
    the run dir's copy."""
    spec, rc = _setup(tmp_path, "federated.compression.method=topk",
                      "federated.compression.fraction=0.05",
                      "federated.compression.error_feedback=true")
    ctx = _context(2, rc)
    msg1 = _message(spec, 1, 2)
    reply1 = client_app.app(msg1, ctx)
    residual = ctx.state[R.EF_STATE]["residual"].numpy()
    assert np.abs(residual).max() > 0
    assert list((tmp_path / R.CLIENT_FEEDBACK / "partition-2").glob("round-000001.state"))
    expand(reply1, msg1, spec.federated.compression)
    state2 = R.arrays_to_state(reply1.content[R.ARRAYS])
    a = client_app.app(_message(spec, 2, 2, state2), ctx)
    resumed = _context(2, rc)  # no node state: what a resumed federation's client has
    b = client_app.app(_message(spec, 2, 2, state2, {R.RESUMED_FROM: 1}), resumed)
    for x, y in zip(a.content[R.UPDATE].values(), b.content[R.UPDATE].values(), strict=True):
        np.testing.assert_array_equal(x.numpy(), y.numpy())
    fresh = client_app.app(_message(spec, 2, 2, state2), _context(2, rc))  # no residual
    assert any((x.numpy() != y.numpy()).any() for x, y in
               zip(a.content[R.UPDATE].values(), fresh.content[R.UPDATE].values(),
                   strict=True))


def _tampered(tmp_path, change):
    spec, rc = _setup(tmp_path, "federated.compression.method=int8")
    msg = _message(spec, 1, 3)
    reply = client_app.app(msg, _context(3, rc))
    change(reply)
    return expand(reply, msg, spec.federated.compression)


@pytest.mark.parametrize("change,message", [
    (lambda r: r.content[R.COMPRESSION].__setitem__("method", "topk"),
     "compressed with 'topk'; this run uses 'int8'"),
    (lambda r: r.content[R.COMPRESSION].__setitem__("dtypes", ["int64"]), "dtypes"),
    (lambda r: r.content[R.UPDATE].__setitem__("q", Array(np.zeros(3, np.int8))),
     "'q' is int8[3]"),
    (lambda r: r.content[R.UPDATE].__setitem__("s", Array(np.full(4, np.nan, np.float32))),
     "finite"),
    (lambda r: r.content[R.UPDATE].__setitem__("x", Array(np.zeros(1, np.float32))),
     "extra ['x']"),
    (lambda r: r.content.__setitem__(R.ARRAYS, r.content[R.UPDATE]), "a full model"),
])
def test_a_reply_that_does_not_decode_is_refused_naming_why(tmp_path, change, message):
    assert message in (_tampered(tmp_path, change) or "")


def test_the_vectorized_engine_sends_what_the_client_app_sends(tmp_path):
    """The same compressed parts (to float rounding of the training) per client."""
    spec, rc = _setup(tmp_path, "federated.compression.method=int8",
                      "federated.compression.error_feedback=true", "federated.engine=vectorized")
    grid = VectorizedGrid(spec, rc)
    sent = [_message(spec, 1, p) for p in range(CLIENTS)]
    ids = list(grid.push_messages(sent))
    ours = {r.metadata.reply_to_message_id: r for r in grid.pull_messages(ids)}
    for msg in sent:
        mine = ours[msg.metadata.message_id]
        theirs = client_app.app(msg, _context(msg.metadata.dst_node_id - NODE_BASE, rc))
        assert set(mine.content.keys()) == set(theirs.content.keys())
        q1, q2 = mine.content[R.UPDATE]["q"].numpy(), theirs.content[R.UPDATE]["q"].numpy()
        assert np.abs(q1.astype(int) - q2).max() <= 1  # a rounding tie may go either way
        expand(mine, msg, spec.federated.compression)
        expand(theirs, msg, spec.federated.compression)
        assert np.abs(_update(mine, msg) - _update(theirs, msg)).max() < 1e-4


def test_an_fp16_downlink_loses_no_update_below_fp16s_spacing():
    """A weight of 0.3 sits between fp16 values 2.4e-4 apart; a client sent fp16(0.3) that
    moves it by 1e-4 must move the full-precision model by 1e-4 (`rebase`), not round back
    to fp16's grid; values outside fp16's range travel at full precision."""
    from flwr.app import ArrayRecord

    from atoll.federated.server import _half
    from atoll.federated.wire import rebase

    VectorizedGrid(load_spec(CONFIGS / "federated.yaml", ["tracking.enabled=false"]), {})
    full = ArrayRecord({"w": R.to_array(np.array([0.3, -1.7], np.float32)),
                        "n": R.to_array(np.array(7, np.int64))})
    half = ArrayRecord({k: _half(a) for k, a in full.items()})
    assert R.array_of(half["w"]).dtype == np.float16
    assert half["n"].dtype == "int64" and half["n"].data == full["n"].data
    trained = R.array_of(half["w"]).astype(np.float32) + np.float32(1e-4)
    reply = Message(RecordDict({R.ARRAYS: ArrayRecord({
        "w": R.to_array(trained), "n": R.to_array(np.array(8, np.int64))})}),
        dst_node_id=NODE_BASE, message_type=MessageType.TRAIN)
    rebase(reply, half, full)
    got = R.array_of(reply.content[R.ARRAYS]["w"])
    np.testing.assert_allclose(got, [0.3 + 1e-4, -1.7 + 1e-4], rtol=0, atol=1e-7)
    assert R.array_of(reply.content[R.ARRAYS]["n"]) == 8
    big = R.to_array(np.array([1e6, 1.0], np.float32))  # past fp16's 65504
    assert _half(big) is big


def test_what_error_feedback_sent_plus_its_residual_is_what_the_client_trained(tmp_path):
    """Three rounds from the same global model; each round's true update u_r is the
    uncompressed ClientApp's for that round's message: Σ decoded updates + the residual
    the client keeps = Σ u_r."""
    plain_spec, plain_rc = _setup(tmp_path)
    spec, rc = _setup(tmp_path, "federated.compression.method=topk",
                      "federated.compression.fraction=0.02",
                      "federated.compression.error_feedback=true")
    ctx, sent, true = _context(1, rc), 0.0, 0.0
    for rnd in (1, 2, 3):
        m = _message(plain_spec, rnd, 1)
        true = true + _update(client_app.app(m, _context(1, plain_rc)), m)
        m = _message(spec, rnd, 1)
        reply = client_app.app(m, ctx)
        assert expand(reply, m, spec.federated.compression) is None
        sent = sent + _update(reply, m)
    residual = R.array_of(ctx.state[R.EF_STATE]["residual"]).astype(np.float64)
    np.testing.assert_allclose(sent + residual, true, atol=1e-5)
    assert np.abs(residual).max() > 1e-3  # top-k 2 % left most of it behind
