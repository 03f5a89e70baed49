"""Drive a Flower strategy round by round (what `Strategy.start` does, with hooks).

`Strategy.start` runs all rounds in one call; a server that checkpoints, resumes at round
r+1 and logs each round needs the loop in its hands. The strategy still configures and
aggregates every round — this module only decides who is asked (a seeded sampler whose
state is checkpointed), orders replies by client so that aggregation is deterministic,
and measures what happened (failures, bytes, time, spread of client metrics).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from atoll.core.spec import sample_size
from atoll.federated import records as R


class SampledGrid:
    """A view of the Grid that shows the strategy only the nodes atoll sampled."""

    def __init__(self, grid: Any, node_ids: list[int]):
        self._grid, self._nodes = grid, list(node_ids)

    def get_node_ids(self) -> list[int]:
        return list(self._nodes)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)


def discover(grid: Any, expected: int, minimum: int = 1, timeout: float = 120.0,
             settle: float = 5.0) -> dict[int, int]:
    """partition id -> node id, by asking every node once (node ids change per run).

    Waits for `expected` nodes; a federation of another size (e.g. `flwr run` with its
    own num-supernodes) is accepted once at least `minimum` nodes have been connected
    and unchanged for `settle` seconds.
    """
    from flwr.app import ConfigRecord, Message, MessageType, RecordDict

    deadline = time.monotonic() + timeout
    last, since = -1, time.monotonic()
    while len(nodes := list(grid.get_node_ids())) < expected:
        if len(nodes) != last:
            last, since = len(nodes), time.monotonic()
        elif len(nodes) >= minimum and time.monotonic() - since >= settle:
            break
        if time.monotonic() > deadline:
            raise RuntimeError(f"only {len(nodes)} of {expected} clients connected within "
                               f"{timeout:.0f}s")
        time.sleep(0.5)
    msgs = [Message(RecordDict({R.CONFIG: ConfigRecord()}), dst_node_id=n,
                    message_type=MessageType.QUERY) for n in nodes]
    mapping: dict[int, int] = {}
    for reply in grid.send_and_receive(msgs, timeout=timeout):
        if not reply.has_error():
            mapping[int(reply.content[R.CLIENT][R.PARTITION_ID])] = reply.metadata.src_node_id
    return dict(sorted(mapping.items()))


def rediscover(grid: Any, partitions: dict[int, int], timeout: float = 30.0) -> list[int]:
    """Add nodes that connected since the last look (late-joining or restarted SuperNodes)
    to `partitions` (partition id -> node id); returns the partitions that changed."""
    from flwr.app import ConfigRecord, Message, MessageType, RecordDict

    known = set(partitions.values())
    new = [n for n in grid.get_node_ids() if n not in known]
    if not new:
        return []
    msgs = [Message(RecordDict({R.CONFIG: ConfigRecord()}), dst_node_id=n,
                    message_type=MessageType.QUERY) for n in new]
    changed = []
    for reply in grid.send_and_receive(msgs, timeout=timeout):
        if not reply.has_error():
            p = int(reply.content[R.CLIENT][R.PARTITION_ID])
            partitions[p] = reply.metadata.src_node_id
            changed.append(p)
    return sorted(changed)


class ClientSampler:
    """Seeded choice of partitions per round; its state goes into server checkpoints."""

    def __init__(self, seed: int):
        self.rng = np.random.default_rng([seed, 31])

    size = staticmethod(sample_size)

    def sample(self, population: list[int], fraction: float, minimum: int) -> list[int]:
        k = self.size(len(population), fraction, minimum)
        if k == len(population):
            return sorted(population)
        return sorted(int(p) for p in self.rng.choice(population, size=k, replace=False))

    def state_dict(self) -> dict[str, Any]:
        return self.rng.bit_generator.state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rng.bit_generator.state = state


class StopRequested(KeyboardInterrupt):
    """The run was asked to stop (Ctrl-C / SIGTERM of `atoll run`, or the stop file)."""


@dataclass
class Outcome:
    """What came back from one phase (train or evaluate) of a round.

    `replies` holds one Message per sampled client in partition order: the good ones, the
    error replies and, for clients that never answered, an error reply made here — so a
    strategy sees every failure (Flower's DP wrappers refuse a round with any).
    """

    sampled: list[int]
    ok: list[Any] = field(default_factory=list)  # replies without error, by partition
    errors: dict[int, str] = field(default_factory=dict)  # partition -> reason
    timed_out: list[int] = field(default_factory=list)
    replies: list[Any] = field(default_factory=list)
    capped: list[int] = field(default_factory=list)  # claimed more examples than allowed
    # L2 norm of each good train reply's update (reply − the model it was sent), in `ok`'s
    # order: measured while vetting decodes the reply, one reply in memory at a time
    norms: list[float] = field(default_factory=list)
    bytes_sent: int = 0
    bytes_received: int = 0  # as received (compressed updates compressed)
    bytes_dense: int = 0  # the same replies as uncompressed models

    def failures_by_kind(self) -> dict[str, int]:
        kinds: dict[str, int] = {"timeout": len(self.timed_out)}
        for p, reason in self.errors.items():
            if p in self.timed_out:
                continue
            kinds[failure_kind(reason)] = kinds.get(failure_kind(reason), 0) + 1
        return kinds

    def refused(self) -> list[int]:
        """Clients whose reply the server refused to aggregate (malformed), sorted."""
        return sorted(p for p, r in self.errors.items() if failure_kind(r) == "malformed")

    def cause(self) -> str:
        """Why no update came back, in words (for a failed round)."""
        if not self.sampled:
            return "no client was sampled"
        kinds = {k: v for k, v in self.failures_by_kind().items() if v}
        if len(kinds) == 1 and not self.ok:
            kind = next(iter(kinds))
            return {"nonfinite": "every client reported a non-finite loss",
                    "timeout": "no sampled client replied within federated.round_timeout",
                    "dropout": "every sampled client dropped out",
                    "crash": "every sampled client crashed",
                    "unavailable": "every sampled client was unavailable",
                    "malformed": "every reply was malformed",
                    }.get(kind, f"every sampled client failed ({kind})")
        shown = ", ".join(f"{v} {k}" for k, v in sorted(kinds.items()))
        return f"{len(self.ok)} of {len(self.sampled)} sampled clients replied ({shown})"


def failure_kind(reason: str) -> str:
    """'dropout', 'crash', 'nonfinite', ... for atoll's own failures, else 'error'."""
    if R.FAILURE_PREFIX in reason:
        return reason.split(R.FAILURE_PREFIX, 1)[1].split()[0]
    return "error"


def failed_reply(msg: Any, reason: str) -> Any:
    """An error reply to `msg`, as Flower would deliver one from a failing ClientApp."""
    from flwr.app import Error, Message

    return Message(Error(code=0, reason=reason), reply_to=msg)


def _kind(dtype: Any) -> str:
    """'f' float, 'i'/'u' integer, 'b' bool, … of a numpy dtype (or its name)."""
    return np.dtype(str(dtype)).kind


# What a training reply may carry: the model, its metrics, who answered, and a FedEWC
# Fisher. Anything else (a record nobody asked for) is refused before it is decoded.
REPLY_RECORDS = frozenset({R.ARRAYS, R.METRICS, R.CLIENT, R.FISHER})


def _decoded(name: str, arr: Any, want: Any) -> tuple[np.ndarray | None, str | None]:
    """The array a reply's bytes hold, checked against its own header and the global
    model's: numpy's format only, never a pickle (np.load(allow_pickle=False) inside
    Flower), and the bytes must hold exactly the shape and dtype the header claims."""
    if arr.stype != "numpy.ndarray":
        return None, f"array {name!r} is serialised as {arr.stype!r}, not 'numpy.ndarray'"
    # the kind, not the width: server optimisers (FedAdam) send float64 globals back to
    # clients whose models reply in float32
    if tuple(arr.shape) != tuple(want.shape) or _kind(arr.dtype) != _kind(want.dtype):
        return None, (f"array {name!r} is {arr.dtype}{list(arr.shape)}, the global "
                      f"model's is {want.dtype}{list(want.shape)}")
    try:
        t = R.array_of(arr)  # np.load's rules (no pickles), the header parsed once
    except (ValueError, TypeError, OSError, EOFError) as e:  # an object array, not npy
        return None, f"array {name!r} cannot be decoded ({str(e).splitlines()[0][:120]})"
    if tuple(t.shape) != tuple(arr.shape) or t.dtype != np.dtype(str(arr.dtype)):
        return None, (f"array {name!r} holds {t.dtype}{list(t.shape)}, its header says "
                      f"{arr.dtype}{list(arr.shape)}")
    return t, None


def malformed(reply: Any, sent: Any, keep: dict[str, np.ndarray] | None = None
              ) -> str | None:
    """Why a training reply cannot be aggregated, or None: it may carry only the records
    atoll's client sends; its model arrays must decode to the names, shapes and dtypes of
    the global model it was sent; a Fisher must match the model too and be finite and
    non-negative; and it must claim a positive, finite number of examples. A bad reply is
    a failure of that client, never an exception inside the strategy's aggregation.
    `keep` receives the model arrays as decoded here."""
    from flwr.app import MessageType

    if sent.metadata.message_type != MessageType.TRAIN or R.ARRAYS not in sent.content:
        return None
    records = set(reply.content.keys())
    if extra := sorted(records - REPLY_RECORDS):
        return f"unexpected record(s) {extra} in the reply"
    if R.ARRAYS not in reply.content.array_records:
        return f"no {R.ARRAYS!r} record in the reply"
    if R.CLIENT not in reply.content.config_records:
        return f"no {R.CLIENT!r} record in the reply"
    want, got = sent.content[R.ARRAYS], reply.content[R.ARRAYS]
    if set(got.keys()) != set(want.keys()):
        extra, missing = sorted(set(got) - set(want)), sorted(set(want) - set(got))
        return f"array names differ from the global model's (extra {extra}, missing {missing})"
    for name, arr in want.items():
        t, why = _decoded(name, got[name], arr)
        if why is not None:
            return why
        if t.dtype.kind in "fc" and not np.isfinite(t).all():
            return f"{R.FAILURE_PREFIX}nonfinite (array {name!r} holds NaN/inf)"
        if keep is not None:
            keep[name] = t
    if R.FISHER in records and (why := _bad_fisher(reply, want)) is not None:
        return why
    metrics = reply.content.metric_records.get(R.METRICS)
    n = metrics.get(R.NUM_EXAMPLES) if metrics is not None else None
    if isinstance(n, bool) or not isinstance(n, int | float) or not math.isfinite(n) or n <= 0:
        return f"{R.NUM_EXAMPLES} is {n!r}; a positive finite number is required"
    return None


def _bad_fisher(reply: Any, want: Any) -> str | None:
    """A FedEWC Fisher: model parameters only, finite, ≥ 0, for a task and with a weight."""
    if R.FISHER not in reply.content.array_records:
        return f"{R.FISHER!r} is not an array record"
    who = reply.content[R.CLIENT]
    task, weight = who.get(R.FISHER_TASK), who.get(R.FISHER_WEIGHT)
    if isinstance(task, bool) or not isinstance(task, int) or task < 0:
        return f"{R.FISHER_TASK} is {task!r}; a task index ≥ 0 is required"
    if isinstance(weight, bool) or not isinstance(weight, int | float) or \
            not math.isfinite(weight) or weight <= 0:
        return f"{R.FISHER_WEIGHT} is {weight!r}; a positive finite number is required"
    fisher = reply.content[R.FISHER]
    if extra := sorted(set(fisher.keys()) - set(want.keys())):
        return f"the Fisher names arrays the model does not have: {extra}"
    for name, arr in fisher.items():
        t, why = _decoded(f"{R.FISHER}/{name}", arr, want[name])
        if why is not None:
            return why
        if not np.isfinite(t).all() or (t < 0).any():
            return f"Fisher array {name!r} is not finite and non-negative"
    return None


def exchange(grid: Any, messages: Iterable[Any], node_to_partition: dict[int, int],
             timeout: float, should_stop: Callable[[], bool] | None = None,
             poll: float = 0.05, max_examples: int | None = None,
             silent: Iterable[int] = (),
             expand: Callable[[Any, Any], str | None] | None = None) -> Outcome:
    """Send, collect replies until all are in or `timeout` passes, sort them by partition.

    Polls the grid itself (Flower's `send_and_receive` sleeps 3 s between pulls and cannot
    be interrupted): a stop request ends the wait at once with StopRequested. A reply that
    is malformed (see `malformed`) or whose arrays are not finite counts as a failure,
    never as an update; a claimed number of examples above `max_examples` is capped to it
    (one client must not outweigh the federation in FedAvg by claiming 10⁹ samples).
    Messages to `silent` partitions (injected dropouts) are never delivered: those clients
    never reply, and the round waits for them until `timeout` like for any lost client.
    `expand(reply, sent)` turns a compressed reply into the model it stands for, in place,
    or says why it cannot (a malformed reply).
    """
    messages = list(messages)
    sampled = sorted(node_to_partition[m.metadata.dst_node_id] for m in messages)
    out = Outcome(sampled=sampled)
    for m in messages:
        out.bytes_sent += sum(R.nbytes(a) for a in m.content.array_records.values())
    mute = set(silent)
    lost = [m for m in messages if node_to_partition[m.metadata.dst_node_id] in mute]
    delivered = [m for m in messages if node_to_partition[m.metadata.dst_node_id] not in mute]
    sent: dict[str, Any] = {}
    if delivered:
        for msg_id, m in zip(grid.push_messages(delivered), delivered, strict=True):
            if msg_id:
                sent[str(msg_id)] = m
    pending = set(sent)
    got: dict[str, Any] = {}
    sent_models: dict[int, dict[str, np.ndarray]] = {}  # each distinct model sent, decoded

    def update_norm(reply_arrays: dict[str, np.ndarray], msg: Any) -> float:
        if not reply_arrays:
            return 0.0
        ref = msg.content[R.ARRAYS]
        if id(ref) not in sent_models:
            sent_models[id(ref)] = {k: R.array_of(a).astype(np.float64)
                                    for k, a in ref.items()}
        base = sent_models[id(ref)]
        return math.sqrt(sum(float(np.square(v.astype(np.float64) - base[k]).sum())
                             for k, v in reply_arrays.items()
                             if v.dtype.kind == "f" and k in base))
    deadline = time.monotonic() + timeout
    delay = poll
    # with a lost client the round can only end at the deadline, as in a real federation
    while pending or (lost and time.monotonic() < deadline):
        if pending:
            for r in grid.pull_messages(sorted(pending)):
                key = str(r.metadata.reply_to_message_id)
                if key in pending:
                    got[key] = r
                    pending.discard(key)
        if time.monotonic() >= deadline or not (pending or lost):
            break
        if should_stop is not None and should_stop():
            raise StopRequested("stop requested while waiting for replies")
        time.sleep(min(delay, max(0.0, deadline - time.monotonic())))
        delay = min(delay * 1.5, 1.0)
    by_partition: list[tuple[int, Any]] = []
    for m in lost:
        p = node_to_partition[m.metadata.dst_node_id]
        out.timed_out.append(p)
        out.errors[p] = f"{R.FAILURE_PREFIX}timeout (no reply within {timeout:g}s)"
        by_partition.append((p, failed_reply(m, out.errors[p])))
    for key, m in sent.items():
        p = node_to_partition[m.metadata.dst_node_id]
        r = got.get(key)
        if r is None:
            out.timed_out.append(p)
            out.errors[p] = f"{R.FAILURE_PREFIX}timeout (no reply within {timeout:g}s)"
            r = failed_reply(m, out.errors[p])
        elif r.has_error():
            out.errors[p] = str(r.error.reason)
        else:
            # what came over the wire; a compressed update is then expanded into the model
            # it stands for, and vetted like any reply
            wire = sum(R.nbytes(a) for a in r.content.array_records.values())
            keep: dict[str, np.ndarray] = {}
            try:  # a client's bytes must never take the server down, whatever they hold
                why = expand(r, m) if expand is not None else None
                if why is None:
                    why = malformed(r, m, keep)
            except Exception as e:  # noqa: BLE001 - refused, with what went wrong
                why = f"the reply cannot be read ({type(e).__name__}: {str(e)[:120]})"
            if why is not None:
                out.errors[p] = why if why.startswith(R.FAILURE_PREFIX) else \
                    f"{R.FAILURE_PREFIX}malformed reply from client {p}: {why}"
                r = failed_reply(m, out.errors[p])
                by_partition.append((p, r))
                continue
            metrics = r.content.metric_records.get(R.METRICS)
            claimed = metrics.get(R.NUM_EXAMPLES) if metrics is not None else None
            if max_examples is not None and isinstance(claimed, int | float) and \
                    claimed > max_examples:
                metrics[R.NUM_EXAMPLES] = max_examples
                out.capped.append(p)
            out.bytes_received += wire
            out.bytes_dense += sum(R.nbytes(a) for a in r.content.array_records.values())
            out.ok.append((p, r, update_norm(keep, m)))
        by_partition.append((p, r))
    for m in delivered:  # never pushed (malformed): a failure of that client
        if not any(m is s for s in sent.values()):
            p = node_to_partition[m.metadata.dst_node_id]
            out.errors[p] = "the SuperLink did not accept the message"
            by_partition.append((p, failed_reply(m, out.errors[p])))
    good = sorted(out.ok, key=lambda t: t[0])
    out.ok, out.norms = [r for _, r, _ in good], [n for _, _, n in good]
    out.replies = [r for _, r in sorted(by_partition, key=lambda t: t[0])]
    out.timed_out.sort()
    return out


def spread(replies: list[Any], key: str) -> dict[str, float]:
    """mean/min/max of a client metric across replies (unweighted: one vote per client)."""
    values = [float(r.content[R.METRICS][key]) for r in replies
              if key in r.content[R.METRICS]]
    if not values:
        return {}
    return {f"clients_{key}_mean": float(np.mean(values)),
            f"clients_{key}_min": float(np.min(values)),
            f"clients_{key}_max": float(np.max(values))}
