"""Flower ClientApp: unpack the message, call `federated/task.py`, pack the reply.

Import-safe: this module runs inside Ray workers, so it does nothing at import functools
import time
beyond building the app object.
"""

from __future__ import annotations

import functools
import time

from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.clientapp.mod import adaptiveclipping_mod, fixedclipping_mod

from federated import records as R
from federated import task
from federated.faults import InjectedFault, round_fault


@functools.lru_cache(maxsize=4)
def _cached_spec(items: tuple):
    spec = R.spec_from_run_config(dict(items))
    task.cpu_threads(spec)
    return spec


def _spec(context: Context):
    return _cached_spec(tuple(sorted(context.run_config.items())))


def _who(context: Context) -> tuple[int, int]:
    cfg = context.node_config
    return int(cfg[R.NODE_PARTITION_ID]), int(cfg[R.NODE_NUM_PARTITIONS])


def privacy_mod(msg: Message, context: Context, call_next):
    """Client-side DP clipping when the spec asks for it (Flower's own mods)."""
    mode = _spec(context).federated.privacy.mode
    if mode == "client-fixed":
        return fixedclipping_mod(msg, context, call_next)
    if mode == "client-adaptive":
        return adaptiveclipping_mod(msg, context, call_next)
    return call_next(msg, context)


app = ClientApp(mods=[privacy_mod])


@app.train()
def train(msg: Message, context: Context) -> Message:
    spec = _spec(context)
    partition, num_clients = _who(context)
    cfg = msg.content[R.CONFIG]
    rnd = int(cfg[R.ROUND])
    fault = round_fault(spec.federated.faults, spec.seed, rnd, partition)
    if fault in ("dropout", "crash"):  # becomes an error reply the server counts
        raise InjectedFault(f"{R.FAILURE_PREFIX}{fault} (client {partition}, round {rnd})")
    if fault == "straggler":
        time.sleep(spec.federated.faults.straggler_delay)
    cl = _continual_state(spec, context, rnd)
    if cl is not None and R.FEDEWC in msg.content:
        from federated.fedewc import decode

        cl.federation = decode(R.arrays_to_state(msg.content[R.FEDEWC]))
    data = task.client_data(spec, partition, num_clients, cl.current if cl else None)
    global_state = R.arrays_to_state(msg.content[R.ARRAYS])
    weights, metrics, attack = task.local_train(
        spec, data, global_state, server_round=rnd, partition=partition,
        num_clients=num_clients, lr=float(cfg[R.LR]), local_epochs=int(cfg[R.LOCAL_EPOCHS]),
        batch_size=int(cfg[R.BATCH_SIZE]),
        proximal_mu=float(cfg.get(R.PROXIMAL_MU, 0.0)), continual=cl)
    if cl is not None:  # the strategy's memory survives to this client's next round
        context.state[R.CL_STATE] = ConfigRecord({R.CL_BLOB: cl.dump(), R.CL_TASK: cl.current})
    # DP accounting needs equal client weights (DP-FedAvg averages updates uniformly)
    weight = 1 if spec.federated.privacy.mode != "none" else len(data.train)
    who = {R.PARTITION_ID: partition, R.BYZANTINE: attack}
    if cl is not None:
        who[R.TASK] = cl.current  # the stream task it trained (client orders may differ)
    content = {
        R.ARRAYS: R.state_to_arrays(weights),
        R.METRICS: MetricRecord({R.NUM_EXAMPLES: weight, "samples": len(data.train),
                                 **metrics}),
    }
    if cl is not None and cl.closed is not None and spec.continual.ewc.aggregate == "server":
        task_index, fisher, n = cl.closed  # FedEWC: the server averages these
        content[R.FISHER] = R.state_to_arrays(fisher)
        who |= {R.FISHER_TASK: task_index, R.FISHER_WEIGHT: n}
    return Message(RecordDict({**content, R.CLIENT: ConfigRecord(who)}), reply_to=msg)


def _continual_state(spec, context: Context, rnd: int) -> task.ContinualState | None:
    if not task.streaming(spec):
        return None
    saved = context.state.get(R.CL_STATE)
    blob = bytes(saved[R.CL_BLOB]) if saved is not None else None
    last = int(saved[R.CL_TASK]) if saved is not None else None
    partition, _ = _who(context)
    return task.ContinualState(blob, last, current=task.client_task(spec, partition, rnd))


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    spec = _spec(context)
    partition, num_clients = _who(context)
    rnd = int(msg.content[R.CONFIG].get(R.ROUND, 1))
    current = task.client_task(spec, partition, rnd) if task.streaming(spec) else None
    data = task.client_data(spec, partition, num_clients, current)
    metrics, n = task.local_evaluate(spec, data, R.arrays_to_state(msg.content[R.ARRAYS]))
    return Message(RecordDict({
        R.METRICS: MetricRecord({R.NUM_EXAMPLES: n, **metrics}),
        R.CLIENT: ConfigRecord({R.PARTITION_ID: partition}),
    }), reply_to=msg)


@app.query()
def query(msg: Message, context: Context) -> Message:
    """Who is this node? The server maps node ids to partitions once per run."""
    partition, _ = _who(context)
    return Message(RecordDict({R.CLIENT: ConfigRecord({R.PARTITION_ID: partition})}),
                   reply_to=msg)

