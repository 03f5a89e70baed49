"""VectorizedGrid answers a round's train messages with the replies atoll's ClientApp
gives the same messages (`client_app.app`, mods included: what a SuperNode runs), client
by client: the same arrays (to float rounding), metrics and records, and the same failures
for injected faults. The server and its strategies are shared code, so equal replies mean
an equal global model (the end-to-end runs: tests/integration/test_federated.py)."""

from __future__ import annotations

import pytest
import torch
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict

from atoll.core.spec import load_spec
from atoll.federated import client_app
from atoll.federated import records as R
from atoll.federated.vectorized_grid import NODE_BASE, VectorizedGrid
from atoll.models import build_model
from tests.conftest import CONFIGS

CLIENTS = 6


def _setup(*sets: str):
    spec = load_spec(CONFIGS / "federated.yaml", [
        "train.progress=off", "tracking.enabled=false", f"federated.num_clients={CLIENTS}",
        "federated.partition.alpha=0.3", "federated.local_epochs=2", "model.hidden=[32]",
        "model.dropout=0", "federated.engine=vectorized", *sets])
    run_config = R.run_config_for(spec, run_dir="", tracking_uri=None, mlflow_run_id=None,
                                  resume="", restart=False)
    return spec, run_config


def _messages(spec, rnd: int, extra: dict | None = None) -> list[Message]:
    from atoll.federated.task import client_data

    bundle = client_data(spec, 0, CLIENTS).bundle
    torch.manual_seed(spec.seed)
    model = build_model(spec.model, bundle.input_shape, bundle.num_classes, spec.project_dir)
    arrays = R.state_to_arrays(model.state_dict())
    cfg = {R.ROUND: rnd, R.LR: spec.optim.lr, R.LOCAL_EPOCHS: 2,
           R.BATCH_SIZE: spec.data.batch_size, R.PROXIMAL_MU: 0.0, **(extra or {})}
    return [Message(RecordDict({R.ARRAYS: arrays, R.CONFIG: ConfigRecord(cfg)}),
                    dst_node_id=NODE_BASE + p, message_type=MessageType.TRAIN)
            for p in range(CLIENTS)]


def _flower_reply(msg: Message, run_config: dict) -> Message:
    p = msg.metadata.dst_node_id - NODE_BASE
    ctx = Context(run_id=0, node_id=msg.metadata.dst_node_id,
                  node_config={R.NODE_PARTITION_ID: p, R.NODE_NUM_PARTITIONS: CLIENTS},
                  state=RecordDict(), run_config=run_config)
    try:
        return client_app.app(msg, ctx)
    except Exception as e:  # noqa: BLE001 - Flower turns a ClientApp's exception into this
        return Message(__import__("flwr.app", fromlist=["Error"]).Error(code=0,
                                                                        reason=str(e)),
                       reply_to=msg)


@pytest.mark.parametrize("sets", [
    pytest.param([], id="fedavg"),
    pytest.param(["federated.byzantine.fraction=0.34", "federated.byzantine.attack=sign_flip"],
                 id="sign-flip"),
    pytest.param(["federated.byzantine.fraction=0.34", "federated.byzantine.attack=label_flip"],
                 id="label-flip"),
    pytest.param(["federated.privacy.mode=client-fixed", "federated.privacy.clipping_norm=0.5"],
                 id="client-dp-clipping"),
    pytest.param(["federated.faults.crash=0.3", "optim.name=adamw", "optim.lr=0.01"],
                 id="crashes-adamw"),
])
def test_each_reply_is_the_client_apps_reply(sets):
    spec, run_config = _setup(*sets)
    extra = {"clipping_norm": 0.5} if spec.federated.privacy.mode == "client-fixed" else None
    grid = VectorizedGrid(spec, run_config)
    sent = _messages(spec, rnd=2, extra=extra)
    ids = list(grid.push_messages(sent))
    got = {r.metadata.reply_to_message_id: r for r in grid.pull_messages(ids)}
    assert set(got) == set(ids)
    failures = 0
    for msg in sent:
        ours, theirs = got[msg.metadata.message_id], _flower_reply(msg, run_config)
        assert ours.has_error() == theirs.has_error(), (ours, theirs)
        if theirs.has_error():
            failures += 1
            assert str(theirs.error.reason).split(" (")[0].endswith(
                str(ours.error.reason).split(" (")[0]), (ours.error, theirs.error)
            continue
        assert set(ours.content.keys()) == set(theirs.content.keys())
        assert dict(ours.content[R.CLIENT]) == dict(theirs.content[R.CLIENT])
        a, b = R.arrays_to_state(ours.content[R.ARRAYS]), R.arrays_to_state(
            theirs.content[R.ARRAYS])
        assert max(float((a[k] - b[k]).abs().max()) for k in b) < 1e-5
        if extra:  # Flower's clipping mod ran on our reply: the update's norm is clipped
            start = R.arrays_to_state(msg.content[R.ARRAYS])
            norm = sum(float(((a[k] - start[k]) ** 2).sum()) for k in a) ** 0.5
            assert norm <= 0.5 + 1e-4, norm
        mine, flower = ours.content[R.METRICS], theirs.content[R.METRICS]
        assert set(mine.keys()) == set(flower.keys())
        for key in flower:
            assert mine[key] == pytest.approx(flower[key], abs=1e-5), key
    if spec.federated.faults.crash:
        assert failures > 0


def test_evaluate_and_query_replies_are_the_client_apps():
    """Every client's evaluation with the one shared global model equals its ClientApp's
    (a model built per client), and discovery maps nodes to partitions the same way."""
    spec, run_config = _setup("model.batch_norm=true")
    grid = VectorizedGrid(spec, run_config)
    train = _messages(spec, rnd=1)
    sent = [Message(RecordDict({R.ARRAYS: m.content[R.ARRAYS],
                                R.CONFIG: ConfigRecord({R.ROUND: 1})}),
                    dst_node_id=m.metadata.dst_node_id, message_type=MessageType.EVALUATE)
            for m in train]
    sent += [Message(RecordDict({R.CONFIG: ConfigRecord()}), dst_node_id=n,
                     message_type=MessageType.QUERY) for n in grid.get_node_ids()]
    got = {r.metadata.reply_to_message_id: r
           for r in grid.send_and_receive(sent, timeout=10)}
    assert len(got) == len(sent)
    for msg in sent:
        ours, theirs = got[msg.metadata.message_id], _flower_reply(msg, run_config)
        assert not ours.has_error() and not theirs.has_error()
        assert dict(ours.content[R.CLIENT]) == dict(theirs.content[R.CLIENT])
        if msg.metadata.message_type == MessageType.EVALUATE:
            mine, flower = ours.content[R.METRICS], theirs.content[R.METRICS]
            assert set(mine.keys()) == set(flower.keys()) and len(mine.keys()) >= 3
            for key in flower:
                assert mine[key] == pytest.approx(flower[key], abs=1e-6), key


def test_answering_a_round_leaves_the_server_processes_threads_alone():
    """The ClientApp sets its process to `client_cpus` threads; the vectorized engine runs
    in the server's process, whose threads are its own (train.threads)."""
    spec, run_config = _setup()
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        grid = VectorizedGrid(spec, run_config)
        sent = _messages(spec, rnd=1)
        list(grid.pull_messages(grid.push_messages(sent)))
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_float64_globals_train_as_the_client_apps_float32_model_does():
    """Server optimisers (FedAdam) send float64 arrays from round 2; a ClientApp loads them
    into its float32 model, and so does the engine."""
    from flwr.app import ArrayRecord

    spec, run_config = _setup("federated.strategy=fedadam")
    grid = VectorizedGrid(spec, run_config)
    sent = _messages(spec, rnd=2)
    wide = ArrayRecord({k: v.double() for k, v in R.arrays_to_state(
        sent[0].content[R.ARRAYS]).items()})
    for m in sent:
        m.content[R.ARRAYS] = wide
    got = {r.metadata.reply_to_message_id: r for r in grid.pull_messages(
        grid.push_messages(sent))}
    for msg in sent:
        ours, theirs = got[msg.metadata.message_id], _flower_reply(msg, run_config)
        assert not ours.has_error(), ours.error
        a, b = R.arrays_to_state(ours.content[R.ARRAYS]), R.arrays_to_state(
            theirs.content[R.ARRAYS])
        assert all(a[k].dtype == b[k].dtype for k in b)
        assert max(float((a[k] - b[k]).abs().max()) for k in b) < 1e-5


def test_a_client_whose_training_raises_fails_alone_as_on_flower():
    """Batch norm on a last batch of one sample raises in the ClientApp (an error reply
    for that client); here the same client fails and the round goes on."""
    spec, run_config = _setup("model.batch_norm=true", "federated.partition.method=iid",
                              "data.batch_size=16")
    from atoll.federated.task import client_data

    sizes = [len(client_data(spec, p, CLIENTS).train) for p in range(CLIENTS)]
    ones = [p for p, n in enumerate(sizes) if n % 16 == 1]
    if not ones:  # make one: the batch size that leaves client 0 a last batch of one
        batch = next(b for b in range(8, 64) if sizes[0] % b == 1)
        spec, run_config = _setup("model.batch_norm=true", "federated.partition.method=iid",
                                  f"data.batch_size={batch}")
        ones = [p for p, n in enumerate(sizes) if n % batch == 1]
    grid = VectorizedGrid(spec, run_config)
    sent = _messages(spec, rnd=1)
    got = {r.metadata.reply_to_message_id: r for r in grid.pull_messages(
        grid.push_messages(sent))}
    for msg in sent:
        p = msg.metadata.dst_node_id - NODE_BASE
        ours, theirs = got[msg.metadata.message_id], _flower_reply(msg, run_config)
        assert ours.has_error() == theirs.has_error() == (p in ones), (p, ours, theirs)


def test_a_batch_norm_model_aggregates_every_round(tmp_path):
    """Flower's averaging turns the integer `num_batches_tracked` into float64; the server
    keeps the global model in the model's own dtypes, so round 2's replies (int64 again)
    still match it and are aggregated (they were refused as malformed: every round after
    the first failed, on either engine)."""
    from atoll.federated.simulation import run_federated

    spec, _ = _setup("model.batch_norm=true", "federated.rounds=3",
                     f"train.checkpoint_dir={tmp_path}", "data.batch_size=16",
                     "federated.partition.method=iid")
    result = run_federated(spec)
    assert [r["aggregated"] for r in result.history] == [1.0, 1.0, 1.0]
    assert [r["failures"] for r in result.history] == [0.0, 0.0, 0.0]


def _stream(*sets: str):
    return _setup("continual.stream=permuted", "continual.scenario=domain",
                  "continual.n_tasks=3", "federated.rounds=4", "federated.rounds_per_task=1",
                  "data.limit=900", "continual.ewc.fisher_samples=64",
                  "continual.replay.size=60", "continual.replay.batch=8", *sets)


@pytest.mark.parametrize("sets", [
    pytest.param(["continual.strategy=[ewc]"], id="ewc"),
    pytest.param(["continual.strategy=[ewc,replay]", "optim.name=sgd", "optim.momentum=0.9",
                  "optim.grad_clip=1.0"], id="ewc-replay-momentum-clip"),
    pytest.param(["continual.strategy=[ewc]", "continual.ewc.mode=online",
                  "continual.ewc.gamma=0.9"], id="online-ewc"),
    # c·Ω·lr small enough that the penalty is stable (c = 0.5 here oscillates: ω grows to
    # 1e2 and rounding with it, on either engine)
    pytest.param(["continual.strategy=[si]", "continual.si.c=0.05"], id="si"),
    pytest.param(["continual.strategy=[joint]", "continual.client_order=shuffled"],
                 id="joint-shuffled"),
    pytest.param(["continual.strategy=[replay]", "continual.stream=split",
                  "continual.scenario=task", "continual.n_tasks=3"], id="replay-task-mask"),
])
def test_continual_clients_reply_as_their_client_apps_round_after_round(sets):
    """A 3-task stream over 4 rounds (every round a task boundary until the last): each
    client's strategy state lives in its node's Context.state on both sides, closes its
    task on the received global model, and every round's reply and kept state equal the
    ClientApp's."""
    import io

    spec, run_config = _stream(*sets)
    grid = VectorizedGrid(spec, run_config)
    contexts = {p: Context(run_id=0, node_id=NODE_BASE + p,
                           node_config={R.NODE_PARTITION_ID: p, R.NODE_NUM_PARTITIONS: CLIENTS},
                           state=RecordDict(), run_config=run_config)
                for p in range(CLIENTS)}
    sent = _messages(spec, rnd=1)
    theirs: dict[str, Message] = {}
    for rnd in range(1, 5):
        if rnd > 1:  # the next round's global model: the mean of the ClientApps' replies
            states = [R.arrays_to_state(r.content[R.ARRAYS]) for r in theirs.values()]
            mean = {k: torch.stack([s[k].float() for s in states]).mean(0) for k in states[0]}
            cfg = dict(sent[0].content[R.CONFIG]) | {R.ROUND: rnd}
            sent = [Message(RecordDict({R.ARRAYS: R.state_to_arrays(mean),
                                        R.CONFIG: ConfigRecord(cfg)}),
                            dst_node_id=m.metadata.dst_node_id, message_type=MessageType.TRAIN)
                    for m in sent]
        ids = list(grid.push_messages(sent))
        ours = {r.metadata.reply_to_message_id: r for r in grid.pull_messages(ids)}
        theirs = {m.metadata.message_id: client_app.app(m, contexts[m.metadata.dst_node_id
                                                                    - NODE_BASE])
                  for m in sent}
        for key, reply in theirs.items():
            assert not reply.has_error() and not ours[key].has_error(), (rnd, ours[key])
            a = R.arrays_to_state(ours[key].content[R.ARRAYS])
            b = R.arrays_to_state(reply.content[R.ARRAYS])
            assert max(float((a[k] - b[k]).abs().max()) for k in b) < 1e-5, rnd
            assert dict(ours[key].content[R.CLIENT]) == dict(reply.content[R.CLIENT])
            for m, value in reply.content[R.METRICS].items():
                assert ours[key].content[R.METRICS][m] == pytest.approx(value, abs=1e-5)
        for p in range(CLIENTS):  # what each side keeps for the client's next round
            mine = grid._context(p).state[R.CL_STATE]
            kept = contexts[p].state[R.CL_STATE]
            assert int(mine[R.CL_TASK]) == int(kept[R.CL_TASK])
            x = torch.load(io.BytesIO(bytes(mine[R.CL_BLOB])), weights_only=True)
            y = torch.load(io.BytesIO(bytes(kept[R.CL_BLOB])), weights_only=True)
            torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-5)


def _train_under_a_memory_limit(headroom_mb: int, replay: bool = False) -> None:
    """Run in a child process: one round of 16 wide clients (≈ 22 MB each) with
    `chunk_size: 16`, under an address-space limit that only a smaller chunk fits; prints
    each client's reply (its first 500 values of every array, or its error) and the chunk
    the engine ended with. `replay`: a 3-task stream with replay, the limited round the
    third (each client's memory holds two tasks, its draws must repeat on a retry)."""
    import json
    import logging
    import resource

    torch.set_num_threads(1)
    global CLIENTS
    CLIENTS = 16
    sets = ["model.hidden=[1024,1024]", "federated.num_clients=16", "federated.local_epochs=1"]
    if replay:
        spec, run_config = _stream(*sets, "continual.strategy=[replay]")
    else:
        spec, run_config = _setup(*sets)
    grid = VectorizedGrid(spec, run_config)
    rnd = 1
    if replay:  # two rounds (two tasks) without a limit: the memories fill
        for rnd in (1, 2):
            grid.pull_messages(list(grid.push_messages(_messages(spec, rnd=rnd))))
        rnd = 3
    grid.chunk_size = 16
    sent = _messages(spec, rnd=rnd)
    grid._data(0)  # the data and the model exist before the limit
    grid._model_for(grid._data(0))
    warnings: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda r: warnings.append(r.getMessage())  # type: ignore[method-assign]
    logging.getLogger("atoll.federated").addHandler(handler)
    with open("/proc/self/status") as f:
        vm = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize"))
    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    resource.setrlimit(resource.RLIMIT_AS, (vm + headroom_mb * 2**20, hard))
    try:
        ids = list(grid.push_messages(sent))
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (hard, hard))
    replies = {r.metadata.reply_to_message_id: r for r in grid.pull_messages(ids)}
    heads = [[v for t in R.arrays_to_state(replies[i].content[R.ARRAYS]).values()
              for v in t.flatten()[:500].tolist()]
             if not replies[i].has_error() else str(replies[i].error.reason) for i in ids]
    print(json.dumps({"heads": heads, "chunk": grid.chunk, "warnings": warnings}))


@pytest.mark.parametrize("replay", [False, True], ids=["plain", "replay-stream"])
def test_out_of_memory_trains_the_chunk_again_in_halves(tmp_path, replay):
    """A real allocation failure (an address-space limit in a child process): the engine
    warns, halves the chunk until it fits, and every client's reply equals training it
    in one chunk (with replay: the retried chunk draws the samples the failed try drew)."""
    import json
    import subprocess
    import sys

    from tests.conftest import ROOT

    def child(headroom_mb: int) -> dict:
        out = subprocess.run(
            [sys.executable, "-c", "from tests.unit.test_vectorized_grid import "
             f"_train_under_a_memory_limit as t; t({headroom_mb}, {replay})"],
            cwd=ROOT, capture_output=True, text=True, timeout=600, check=False,
            env={**__import__("os").environ, "OMP_NUM_THREADS": "1", "MALLOC_ARENA_MAX": "1"})
        assert out.returncode == 0, out.stderr[-3000:]
        return json.loads(out.stdout.strip().splitlines()[-1])

    limited = child(250)
    assert limited["chunk"] < 16, limited["chunk"]
    assert any("out of memory" in w for w in limited["warnings"]), limited["warnings"]
    assert all(isinstance(h, list) for h in limited["heads"]), limited["heads"]
    free = child(1 << 20)  # no effective limit: the 16 clients in one computation
    assert free["chunk"] == 16 and not free["warnings"]
    for a, b in zip(limited["heads"], free["heads"], strict=True):
        assert max(abs(x - y) for x, y in zip(a, b, strict=True)) < 1e-5


def test_a_continual_client_whose_state_cannot_be_read_fails_alone(tmp_path):
    """A resumed stream whose client 0 finds a corrupt state file in the run dir: its
    ClientApp raises (a failed reply); on the vectorized engine that client fails the same
    way and the others train — the round is not lost."""
    spec, _ = _stream("continual.strategy=[ewc]")
    run_config = R.run_config_for(spec, run_dir=str(tmp_path), tracking_uri=None,
                                  mlflow_run_id=None, resume="", restart=False)
    bad = tmp_path / R.CLIENT_STATES / "partition-0" / "round-000001.state"
    bad.parent.mkdir(parents=True)
    bad.write_bytes(b"not a state")
    grid = VectorizedGrid(spec, run_config)
    sent = _messages(spec, rnd=2, extra={R.RESUMED_FROM: 1})
    ids = list(grid.push_messages(sent))
    got = {r.metadata.reply_to_message_id: r for r in grid.pull_messages(ids)}
    failed = [m.metadata.dst_node_id - NODE_BASE for m in sent
              if got[m.metadata.message_id].has_error()]
    assert failed == [0]
    reason = str(got[sent[0].metadata.message_id].error.reason)
    assert "client 0, round 2: ClientStateError" in reason and "round-000001.state" in reason
    theirs = _flower_reply(sent[0], run_config)
    assert theirs.has_error() and "round-000001.state" in str(theirs.error.reason)
