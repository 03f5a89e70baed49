"""atoll's own federated driver against a fake Grid: exchange, discovery, sampling views,
failure counting, round refusals (robust bounds, DP) and client state on disk."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)

from atoll.core.spec import SpecError, load_spec
from atoll.federated import records as R
from atoll.federated.client_state import ClientStateError, ClientStateStore, prune_client_states
from atoll.federated.driver import SampledGrid, StopRequested, discover, exchange, rediscover
from atoll.federated.server import refusal, robust_bound


@pytest.fixture(autouse=True)
def _task_identity(monkeypatch):
    """Messages read the run id a ServerApp process would have set."""
    from flwr.supercore.task_identity import TaskIdentity

    monkeypatch.setattr(TaskIdentity, "_run_id", 1, raising=False)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1, raising=False)
    monkeypatch.setattr(TaskIdentity, "_node_id", 0, raising=False)


class FakeGrid:
    """Nodes 100+p hold partition p. `behaviour[p]` is 'ok', 'error', 'nan', 'silent' or
    'late:K' (the reply shows up on the K-th pull)."""

    def __init__(self, behaviour: dict[int, str]):
        self.behaviour = behaviour
        self.nodes = [100 + p for p in behaviour]
        self.inbox: dict[str, Message] = {}
        self.pulls = 0

    def get_node_ids(self):
        return list(self.nodes)

    def push_messages(self, messages):
        ids = []
        for m in messages:
            m.metadata.__dict__["_message_id"] = m.object_id
            self.inbox[m.object_id] = m
            ids.append(m.object_id)
        return ids

    def _reply(self, m: Message) -> Message | None:
        p = m.metadata.dst_node_id - 100
        kind = self.behaviour[p]
        if kind == "silent" or (kind.startswith("late:") and self.pulls < int(kind[5:])):
            return None
        if kind == "error":
            from flwr.app import Error

            return Message(Error(code=0, reason=f"{R.FAILURE_PREFIX}crash (client {p})"),
                           reply_to=m)
        if m.metadata.message_type == MessageType.QUERY:
            return Message(RecordDict({R.CLIENT: ConfigRecord({R.PARTITION_ID: p})}),
                           reply_to=m)
        w = torch.full((3,) if kind == "shape" else (2,), float("nan") if kind == "nan"
                       else float(p))
        arrays = {"w": w, "extra": torch.zeros(1)} if kind == "names" else {"w": w}
        n = 10**9 if kind == "greedy" else (-5 if kind == "negative" else 10 * (p + 1))
        content = RecordDict({
            R.ARRAYS: ArrayRecord(arrays),
            R.METRICS: MetricRecord({R.NUM_EXAMPLES: n}),
            R.CLIENT: ConfigRecord({R.PARTITION_ID: p, R.BYZANTINE: ""})})
        if kind in CRAFTED:
            content[R.ARRAYS]["w"] = CRAFTED[kind]()
        if kind == "junk":  # a record nobody asked for, 8 MB of it
            content["junk"] = ArrayRecord({"x": torch.zeros(2 * 2**20)})
        if kind == "fisher":  # FedEWC would add a negative importance to every client's loss
            content[R.FISHER] = ArrayRecord({"w": -torch.ones(2)})
            content[R.CLIENT][R.FISHER_TASK] = 0
            content[R.CLIENT][R.FISHER_WEIGHT] = 5.0
        return Message(content, reply_to=m)

    def pull_messages(self, message_ids):
        self.pulls += 1
        out = []
        for i in message_ids:
            r = self._reply(self.inbox[i])
            if r is not None:
                out.append(r)
        return out

    def send_and_receive(self, messages, *, timeout=None):
        return self.pull_messages(self.push_messages(list(messages)))


def _evil_npy() -> Array:
    """A float32[2] by its header whose bytes are an object-array pickle that would run
    `touch PWNED` when unpickled."""
    import io
    import os

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {PWNED}",))

    buf = io.BytesIO()
    np.save(buf, np.array([Payload(), Payload()], dtype=object), allow_pickle=True)
    return Array(dtype="float32", shape=(2,), stype="numpy.ndarray", data=buf.getvalue())


def _oversized() -> Array:
    """Declares float32[2]; carries 4 MB."""
    real = Array(np.zeros(2**20, dtype=np.float32))
    return Array(dtype="float32", shape=(2,), stype=real.stype, data=real.data)


def _garbage() -> Array:
    return Array(dtype="float32", shape=(2,), stype="numpy.ndarray", data=b"\x93NUMPY garbage")


def _foreign_stype() -> Array:
    real = Array(np.zeros(2, dtype=np.float32))
    return Array(dtype="float32", shape=(2,), stype="torch.save", data=real.data)


def _zipped() -> Array:
    """An npz archive (np.load returns an NpzFile, not an array, for these bytes)."""
    import io

    buf = io.BytesIO()
    np.savez(buf, w=np.zeros(2, np.float32))
    return Array(dtype="float32", shape=(2,), stype="numpy.ndarray", data=buf.getvalue())


def _huge_header() -> Array:
    """A header claiming 2**33 float64 values over 8 bytes (np.load would try to allocate
    64 GiB and raise MemoryError)."""
    import io

    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": "<f8", "fortran_order": False,
                                                "shape": (2**33,)})
    return Array(dtype="float32", shape=(2,), stype="numpy.ndarray",
                 data=buf.getvalue() + b"\0" * 8)


PWNED = Path(tempfile.gettempdir()) / f"atoll-pwned-{os.getpid()}"
CRAFTED = {"pickle": _evil_npy, "oversized": _oversized, "garbage": _garbage,
           "stype": _foreign_stype, "zip": _zipped, "huge": _huge_header}


def _train_messages(grid: FakeGrid, partitions: list[int]) -> list[Message]:
    return [Message(RecordDict({R.ARRAYS: ArrayRecord({"w": torch.zeros(2)}),
                                R.CONFIG: ConfigRecord()}),
                    dst_node_id=100 + p, message_type=MessageType.TRAIN) for p in partitions]


def test_exchange_sorts_replies_and_names_every_failure():
    grid = FakeGrid({0: "ok", 1: "error", 2: "nan", 3: "silent", 4: "late:2"})
    n2p = {100 + p: p for p in range(5)}
    out = exchange(grid, _train_messages(grid, [4, 3, 2, 1, 0]), n2p, timeout=0.3, poll=0.01)
    assert out.sampled == [0, 1, 2, 3, 4]
    assert [int(r.content[R.CLIENT][R.PARTITION_ID]) for r in out.ok] == [0, 4]
    assert out.timed_out == [3]
    assert set(out.errors) == {1, 2, 3}
    assert out.failures_by_kind() == {"timeout": 1, "crash": 1, "nonfinite": 1}
    # every sampled client has exactly one reply for the strategy, failures as errors
    assert len(out.replies) == 5
    assert [r.has_error() for r in out.replies] == [False, True, True, True, False]
    assert out.bytes_received == 2 * R.nbytes(ArrayRecord({"w": torch.zeros(2)}))
    assert out.cause() == "2 of 5 sampled clients replied (1 crash, 1 nonfinite, 1 timeout)"


def test_exchange_stops_waiting_on_request():
    grid = FakeGrid({0: "silent"})
    with pytest.raises(StopRequested):
        exchange(grid, _train_messages(grid, [0]), {100: 0}, timeout=30, should_stop=lambda: True,
                 poll=0.01)


@pytest.mark.parametrize(("behaviour", "cause"), [
    ({0: "nan", 1: "nan"}, "every client reported a non-finite loss"),
    ({0: "silent", 1: "silent"}, "no sampled client replied within federated.round_timeout"),
    ({0: "error", 1: "error"}, "every sampled client crashed"),
])
def test_cause_of_a_round_without_updates(behaviour, cause):
    grid = FakeGrid(behaviour)
    out = exchange(grid, _train_messages(grid, [0, 1]), {100: 0, 101: 1}, timeout=0.05,
                   poll=0.01)
    assert not out.ok and out.cause() == cause


def test_discover_maps_partitions_and_rediscover_adds_late_nodes():
    grid = FakeGrid({0: "ok", 1: "ok"})
    partitions = discover(grid, expected=2, timeout=5)
    assert partitions == {0: 100, 1: 101}
    assert rediscover(grid, partitions) == []
    grid.behaviour[2] = "ok"
    grid.nodes.append(102)  # a SuperNode that connected after round 1
    assert rediscover(grid, partitions) == [2] and partitions[2] == 102


def test_sampled_grid_shows_only_the_sampled_nodes():
    grid = FakeGrid({0: "ok", 1: "ok", 2: "ok"})
    view = SampledGrid(grid, [102, 100])
    assert view.get_node_ids() == [102, 100]
    assert view.push_messages == grid.push_messages  # everything else is the grid's


def _spec(*overrides: str):
    return load_spec(None, ["mode=federated", *overrides])


def test_robust_rules_refuse_rounds_below_their_bound():
    spec = _spec("federated.strategy=bulyan", "federated.num_clients=7",
                 "federated.num_malicious=1")
    bound = robust_bound(spec)
    assert bound is not None and bound[1] == 7
    grid = FakeGrid({p: ("error" if p < 2 else "ok") for p in range(7)})
    out = exchange(grid, _train_messages(grid, list(range(7))), {100 + p: p for p in range(7)},
                   timeout=0.05, poll=0.01)
    assert refusal(spec, out, bound) == "Bulyan needs ≥ 4f+3 = 7 replies (f = 1), got 5"
    krum = _spec("federated.strategy=krum", "federated.num_clients=7",
                 "federated.num_malicious=2")
    assert robust_bound(krum)[1] == 7 and robust_bound(_spec()) is None


def test_dp_refuses_a_round_with_a_failed_client():
    spec = _spec("federated.num_clients=3", "federated.privacy.mode=server-fixed")
    grid = FakeGrid({0: "ok", 1: "error", 2: "ok"})
    out = exchange(grid, _train_messages(grid, [0, 1, 2]), {100: 0, 101: 1, 102: 2},
                   timeout=0.05, poll=0.01)
    assert refusal(spec, out, None).startswith("differential privacy: 1 of 3 sampled clients "
                                               "failed")
    assert refusal(_spec("federated.num_clients=3"), out, None) is None


def test_flower_dp_wrapper_refuses_replies_with_an_error():
    """The Flower rule the server relies on: errors among the replies → no aggregate."""
    from atoll.federated.strategies import build_strategy

    spec = _spec("federated.num_clients=3", "federated.privacy.mode=server-fixed")
    grid = FakeGrid({0: "ok", 1: "error", 2: "ok"})
    strategy = build_strategy(spec, 3)
    start = ArrayRecord({"w": torch.zeros(2)})
    msgs = list(strategy.configure_train(1, start, ConfigRecord(), SampledGrid(
        grid, [100, 101, 102])))
    out = exchange(grid, msgs, {100: 0, 101: 1, 102: 2}, timeout=0.05, poll=0.01)
    assert strategy.aggregate_train(1, out.replies) == (None, None)


@pytest.mark.parametrize(("overrides", "needs"), [
    (["federated.strategy=bulyan", "federated.num_clients=10", "federated.fraction_fit=0.3",
      "federated.byzantine.fraction=0.1", "federated.byzantine.attack=sign_flip"],
     "needs n ≥ 4f+3 = 7 clients per round"),
    (["federated.strategy=krum", "federated.num_clients=4", "federated.num_malicious=1"],
     "needs n ≥ 2f+3 = 5 clients per round"),
])
def test_robust_bounds_are_checked_at_spec_time(overrides, needs):
    with pytest.raises(SpecError) as e:
        _spec(*overrides)
    assert e.value.problems[0].startswith("federated.strategy:") and needs in \
        e.value.problems[0]


def test_update_norms_measure_reply_minus_global():
    grid = FakeGrid({0: "ok", 1: "ok"})
    out = exchange(grid, _train_messages(grid, [0, 1]), {100: 0, 101: 1}, timeout=1, poll=0.01)
    np.testing.assert_allclose(out.norms, [0.0, np.sqrt(2.0)])  # measured while vetting


def test_client_states_by_round(tmp_path):
    store = ClientStateStore(tmp_path, partition=3, keep=2)
    assert store.load(before=5) is None
    store.save(1, b"one", 0)
    store.save(2, b"two", 0)
    store.save(4, b"four", 1)
    assert store.load(before=5) == (b"four", 1)
    assert store.load(before=4) == (b"two", 0)
    assert store.load(before=2) is None  # round 1's file was pruned (keep=2)
    prune_client_states(tmp_path, after=2)  # a resume from round 2 forgets round 4
    assert store.load(before=10) == (b"two", 0)


def test_a_crafted_client_state_file_is_refused_and_never_runs(tmp_path):
    """A file planted in client-states/ (the run dir is shared storage in a deployment)."""
    import io

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'pwned'}",))

    store = ClientStateStore(tmp_path, partition=0, keep=2)
    store.save(1, b"honest", 0)
    buf = io.BytesIO()
    torch.save({"blob": Payload(), "task": 0, "round": 2}, buf)
    (store.dir / "round-000002.state").write_bytes(buf.getvalue())
    with pytest.raises(ClientStateError, match="round-000002.state.*refused by a weights-only"):
        store.load(before=3)
    assert not (tmp_path / "pwned").exists()


def test_malformed_replies_are_failures_with_the_reason():
    grid = FakeGrid({0: "ok", 1: "shape", 2: "names", 3: "negative"})
    out = exchange(grid, _train_messages(grid, [0, 1, 2, 3]), {100 + p: p for p in range(4)},
                   timeout=1, poll=0.01)
    assert [int(r.content[R.CLIENT][R.PARTITION_ID]) for r in out.ok] == [0]
    assert out.failures_by_kind() == {"timeout": 0, "malformed": 3}
    assert "array 'w' is float32[3], the global model's is float32[2]" in out.errors[1]
    assert "extra ['extra']" in out.errors[2]
    assert "num-examples is -5" in out.errors[3]


def test_a_float32_reply_to_a_float64_global_model_is_well_formed():
    """FedAdam's aggregate is float64; clients' models answer in float32."""
    grid = FakeGrid({0: "ok"})
    msg = Message(RecordDict({R.ARRAYS: ArrayRecord({"w": torch.zeros(2, dtype=torch.float64)}),
                              R.CONFIG: ConfigRecord()}), dst_node_id=100,
                  message_type=MessageType.TRAIN)
    out = exchange(grid, [msg], {100: 0}, timeout=1, poll=0.01)
    assert len(out.ok) == 1 and not out.errors


def test_a_client_claiming_a_billion_examples_cannot_take_over_fedavg():
    from atoll.federated.strategies import build_strategy

    grid = FakeGrid({0: "ok", 1: "ok", 2: "greedy"})
    msgs = _train_messages(grid, [0, 1, 2])
    out = exchange(grid, msgs, {100: 0, 101: 1, 102: 2}, timeout=1, poll=0.01,
                   max_examples=30)
    assert out.capped == [2]
    arrays, _ = build_strategy(_spec("federated.num_clients=3"), 3).aggregate_train(
        1, out.replies)
    # weights 10, 20 and (capped) 30 for updates 0, 1, 2 — not ≈ 2 from the claimed 10⁹
    np.testing.assert_allclose(arrays["w"].numpy(), [(0 * 10 + 1 * 20 + 2 * 30) / 60] * 2,
                               rtol=1e-6)


def test_a_dropped_out_client_is_never_asked_and_the_round_waits_for_it():
    import time

    grid = FakeGrid({0: "ok", 1: "ok"})
    t0 = time.monotonic()
    out = exchange(grid, _train_messages(grid, [0, 1]), {100: 0, 101: 1}, timeout=0.4,
                   poll=0.01, silent={1})
    assert time.monotonic() - t0 >= 0.4  # the server cannot know it will never answer
    assert len(grid.inbox) == 1  # nothing was delivered to client 1
    assert out.timed_out == [1] and len(out.ok) == 1 and len(out.replies) == 2


def test_crafted_replies_are_refused_without_decoding_a_pickle():
    """Attacks on the aggregate through the reply's bytes: an object-array pickle (would run
    a command), an array whose bytes hold far more than its header claims, bytes that are
    not an array, a serialisation other than numpy's, an extra 8 MB record and a negative
    Fisher. Each is a malformed reply of that client; the honest one is aggregated alone."""
    PWNED.unlink(missing_ok=True)
    kinds = ["ok", "pickle", "oversized", "garbage", "stype", "junk", "fisher", "zip", "huge"]
    grid = FakeGrid(dict(enumerate(kinds)))
    n2p = {100 + p: p for p in range(len(kinds))}
    out = exchange(grid, _train_messages(grid, list(range(len(kinds)))), n2p, timeout=1,
                   poll=0.01)
    assert not PWNED.exists()
    assert [int(r.content[R.CLIENT][R.PARTITION_ID]) for r in out.ok] == [0]
    assert out.failures_by_kind() == {"timeout": 0, "malformed": 8}
    assert out.refused() == [1, 2, 3, 4, 5, 6, 7, 8]
    # an npz archive and a 64 GiB header: refused, neither crashes the server
    assert "array 'w' cannot be decoded (not an npy payload)" in out.errors[7]
    assert "array 'w' cannot be decoded (npy payload holds 8 bytes" in out.errors[8]
    assert "array 'w' cannot be decoded" in out.errors[1]
    assert "array 'w' holds float32[1048576], its header says float32[2]" in out.errors[2]
    assert "array 'w' cannot be decoded" in out.errors[3]
    assert "array 'w' is serialised as 'torch.save'" in out.errors[4]
    assert "unexpected record(s) ['junk']" in out.errors[5]
    assert "Fisher array 'w' is not finite and non-negative" in out.errors[6]
    assert out.bytes_received == R.nbytes(ArrayRecord({"w": torch.zeros(2)}))


def test_the_fast_npy_codec_writes_np_saves_bytes_and_reads_with_its_rules():
    """records.npy_bytes/npy_array replace np.save/np.load on the message path: the same
    bytes (so any Flower peer reads them), the same refusals (no pickles, no object arrays,
    a payload whose size disagrees with its header)."""
    import io

    import numpy as np

    from atoll.federated import records as R

    for a in [np.random.rand(3, 4).astype(np.float32), np.arange(5), np.array(2.5),
              np.zeros((0, 3), np.float16), np.random.rand(4, 3).T]:
        buf = io.BytesIO()
        np.save(buf, a, allow_pickle=False)  # the transposed one in Fortran order
        if a.flags.c_contiguous:
            assert R.npy_bytes(a) == buf.getvalue()
        for data in (buf.getvalue(), R.npy_bytes(a)):
            back = R.npy_array(data)
            assert back.dtype == a.dtype and back.shape == a.shape and (back == a).all()
    pickled = io.BytesIO()
    np.save(pickled, np.array([{"x": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError, match="object"):
        R.npy_array(pickled.getvalue())
    with pytest.raises(ValueError, match="holds 12 bytes"):
        R.npy_array(R.npy_bytes(np.zeros(4, np.float32))[:-4])
    with pytest.raises(ValueError, match="not an npy payload"):
        R.npy_array(b"\x80\x04K\x01.")
