"""Flower ClientApp: unpack the message, call `federated/task.py`, pack the reply.

Import-safe: this module runs inside Ray workers, so it does nothing at import time
beyond building the app object.
"""

from __future__ import annotations

import functools
import logging
import time
from pathlib import Path

from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.clientapp.mod import adaptiveclipping_mod, fixedclipping_mod

from atoll.core.loop import NonFiniteLoss
from atoll.federated import records as R
from atoll.federated import task
from atoll.federated.client_state import ClientStateStore
from atoll.federated.faults import InjectedFault, round_fault


@functools.lru_cache(maxsize=4)
def _cached_spec(items: tuple):
    return R.spec_from_run_config(dict(items))


def _spec(context: Context):
    return _cached_spec(tuple(sorted(context.run_config.items())))


def _who(context: Context) -> tuple[int, int]:
    cfg = context.node_config
    return int(cfg[R.NODE_PARTITION_ID]), int(cfg[R.NODE_NUM_PARTITIONS])


def privacy_mod(msg: Message, context: Context, call_next):
    """Client-side DP clipping when the spec asks for it (Flower's own mods).

    Attached to `train` only: the mods clip the reply's one ArrayRecord against the
    global model, which `query` and `evaluate` replies do not carry.
    """
    mode = _spec(context).federated.privacy.mode
    if mode == "client-fixed":
        return fixedclipping_mod(msg, context, call_next)
    if mode == "client-adaptive":
        return adaptiveclipping_mod(msg, context, call_next)
    return call_next(msg, context)


def update_mod(msg: Message, context: Context, call_next):
    """What a train reply carries: with `federated.compression` the compressed update,
    clipped in the compressed domain when client-side DP is on (federated/wire.py says
    why in that order); otherwise the model, through Flower's clipping mods."""
    spec = _spec(context)
    if spec.federated.compression.method == "none":
        return privacy_mod(msg, context, call_next)
    from atoll.federated.wire import compress_reply

    reply = call_next(msg, context)
    if reply.has_error():
        return reply
    return compress_reply(msg, reply, context, spec)


app = ClientApp()
log = logging.getLogger("atoll.federated")


def _fault(spec, rnd: int, partition: int) -> str:
    """Apply this round's injected fault that happens before any work; returns it."""
    fault = round_fault(spec.federated.faults, spec.seed, rnd, partition)
    if fault == "dropout":  # the server never sends to a dropout (federated.server.dropouts)
        raise InjectedFault(f"{R.FAILURE_PREFIX}dropout (client {partition}, round {rnd})")
    if fault == "straggler":
        time.sleep(spec.federated.faults.straggler_delay)
    return fault


@app.train(mods=[update_mod])
def train(msg: Message, context: Context) -> Message:
    spec = _spec(context)
    task.cpu_threads(spec)  # this process is a client's (never the vectorized server's)
    partition, num_clients = _who(context)
    cfg = msg.content[R.CONFIG]
    rnd = int(cfg[R.ROUND])
    fault = _fault(spec, rnd, partition)
    cl = continual_state(spec, context, rnd, cfg)
    if cl is not None and R.FEDEWC in msg.content:
        from atoll.federated.fedewc import decode

        cl.federation = decode(R.arrays_to_state(msg.content[R.FEDEWC]))
    data = task.client_data(spec, partition, num_clients, cl.current if cl else None)
    global_state = R.arrays_to_state(msg.content[R.ARRAYS])
    try:
        weights, metrics, attack = task.local_train(
            spec, data, global_state, server_round=rnd, partition=partition,
            num_clients=num_clients, lr=float(cfg[R.LR]),
            local_epochs=int(cfg[R.LOCAL_EPOCHS]), batch_size=int(cfg[R.BATCH_SIZE]),
            proximal_mu=float(cfg.get(R.PROXIMAL_MU, 0.0)), continual=cl,
            crash=fault == "crash")
    except NonFiniteLoss as e:  # a failure with its reason, never an update
        raise InjectedFault(f"{R.FAILURE_PREFIX}nonfinite (client {partition}, round {rnd}): "
                            f"{e}") from None
    except task.CrashFault as e:
        raise InjectedFault(f"{R.FAILURE_PREFIX}crash (client {partition}, round {rnd}): "
                            f"{e}") from None
    if cl is not None:
        keep_continual(spec, context, partition, rnd, cl)
    return train_reply(msg, spec, partition, weights, metrics, attack, len(data.train), cl)


def train_reply(msg: Message, spec, partition: int, weights: dict, metrics: dict[str, float],
                attack: str, samples: int, cl: task.ContinualState | None = None) -> Message:
    """What a client that trained sends back (also the vectorized engine's replies)."""
    # DP accounting needs equal client weights (DP-FedAvg averages updates uniformly)
    weight = 1 if spec.federated.privacy.mode != "none" else samples
    who = {R.PARTITION_ID: partition, R.BYZANTINE: attack}
    if cl is not None:
        who[R.TASK] = cl.current  # the stream task it trained (client orders may differ)
    content = {
        R.ARRAYS: R.state_to_arrays(weights),
        R.METRICS: MetricRecord({R.NUM_EXAMPLES: weight, "samples": samples, **metrics}),
    }
    if cl is not None and cl.closed is not None and spec.continual.ewc.aggregate == "server":
        task_index, fisher, n = cl.closed  # FedEWC: the server averages these
        content[R.FISHER] = R.state_to_arrays(fisher)
        who |= {R.FISHER_TASK: task_index, R.FISHER_WEIGHT: n}
    return Message(RecordDict({**content, R.CLIENT: ConfigRecord(who)}), reply_to=msg)


def keep_continual(spec, context: Context, partition: int, rnd: int,
                   cl: task.ContinualState) -> None:
    """The strategy's memory survives to this client's next round (Context.state) and to
    an interrupted federation's resume (the run dir's client states)."""
    blob = cl.dump()
    context.state[R.CL_STATE] = ConfigRecord({R.CL_BLOB: blob, R.CL_TASK: cl.current})
    store = _client_store(spec, context, partition)
    if store is not None:
        try:
            store.save(rnd, blob, cl.current)
        except OSError as e:  # a SuperNode that cannot reach the server's run dir
            log.warning("client %d: continual state not saved for resume (%s)", partition, e)


def _client_store(spec, context: Context, partition: int) -> ClientStateStore | None:
    run_dir = str(context.run_config.get(R.RUN_DIR, "") or "")
    if not run_dir:  # `flwr run` without a run dir: Context.state only
        return None
    keep = spec.train.keep_checkpoints * spec.federated.checkpoint_every + 1
    return ClientStateStore(Path(run_dir) / R.CLIENT_STATES, partition, keep)


def continual_state(spec, context: Context, rnd: int, cfg: ConfigRecord
                    ) -> task.ContinualState | None:
    if not task.streaming(spec):
        return None
    partition, _ = _who(context)
    saved = context.state.get(R.CL_STATE)
    if saved is not None:
        blob, last = bytes(saved[R.CL_BLOB]), int(saved[R.CL_TASK])
    else:  # a resumed federation is a new Flower run: the state saved up to its checkpoint
        resumed = int(cfg.get(R.RESUMED_FROM, 0))
        store = _client_store(spec, context, partition) if resumed > 0 else None
        found = store.load(before=resumed + 1) if store is not None else None
        blob, last = found if found is not None else (None, None)
    return task.ContinualState(blob, last, current=task.client_task(spec, partition, rnd))


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    spec = _spec(context)
    task.cpu_threads(spec)
    partition, num_clients = _who(context)
    rnd = int(msg.content[R.CONFIG].get(R.ROUND, 1))
    if _fault(spec, rnd, partition) == "crash":
        raise InjectedFault(f"{R.FAILURE_PREFIX}crash (client {partition}, round {rnd}, "
                            "evaluation)")
    current = task.client_task(spec, partition, rnd) if task.streaming(spec) else None
    data = task.client_data(spec, partition, num_clients, current)
    metrics, n = task.local_evaluate(spec, data, R.arrays_to_state(msg.content[R.ARRAYS]))
    return evaluate_reply(msg, partition, metrics, n)


def evaluate_reply(msg: Message, partition: int, metrics: dict[str, float], n: int
                   ) -> Message:
    return Message(RecordDict({
        R.METRICS: MetricRecord({R.NUM_EXAMPLES: n, **metrics}),
        R.CLIENT: ConfigRecord({R.PARTITION_ID: partition}),
    }), reply_to=msg)


@app.query()
def query(msg: Message, context: Context) -> Message:
    """Who is this node? The server maps node ids to partitions once per run."""
    partition, _ = _who(context)
    return query_reply(msg, partition)


def query_reply(msg: Message, partition: int) -> Message:
    return Message(RecordDict({R.CLIENT: ConfigRecord({R.PARTITION_ID: partition})}),
                   reply_to=msg)

