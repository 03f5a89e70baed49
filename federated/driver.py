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
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from federated import records as R


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


class ClientSampler:
    """Seeded choice of partitions per round; its state goes into server checkpoints."""

    def __init__(self, seed: int):
        self.rng = np.random.default_rng([seed, 31])

    @staticmethod
    def size(n: int, fraction: float, minimum: int) -> int:
        return n if fraction >= 1.0 else min(n, max(minimum, math.ceil(fraction * n)))

    def sample(self, population: list[int], fraction: float, minimum: int) -> list[int]:
        k = self.size(len(population), fraction, minimum)
        if k == len(population):
            return sorted(population)
        return sorted(int(p) for p in self.rng.choice(population, size=k, replace=False))

    def state_dict(self) -> dict[str, Any]:
        return self.rng.bit_generator.state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rng.bit_generator.state = state


@dataclass
class Outcome:
    """What came back from one phase (train or evaluate) of a round."""

    sampled: list[int]
    ok: list[Any] = field(default_factory=list)  # replies without error, by partition
    errors: dict[int, str] = field(default_factory=dict)  # partition -> reason
    timed_out: list[int] = field(default_factory=list)
    bytes_sent: int = 0
    bytes_received: int = 0

    def failures_by_kind(self) -> dict[str, int]:
        kinds: dict[str, int] = {"timeout": len(self.timed_out)}
        for reason in self.errors.values():
            kind = "error"
            if R.FAILURE_PREFIX in reason:
                kind = reason.split(R.FAILURE_PREFIX, 1)[1].split()[0]
            kinds[kind] = kinds.get(kind, 0) + 1
        return kinds


def exchange(grid: Any, messages: Iterable[Any], node_to_partition: dict[int, int],
             timeout: float) -> Outcome:
    """Send, wait up to `timeout`, and sort what came back by partition id."""
    messages = list(messages)
    sampled = sorted(node_to_partition[m.metadata.dst_node_id] for m in messages)
    out = Outcome(sampled=sampled)
    for m in messages:
        out.bytes_sent += sum(R.nbytes(a) for a in m.content.array_records.values())
    replies = list(grid.send_and_receive(messages, timeout=timeout)) if messages else []
    answered = set()
    ok = []
    for r in replies:
        p = node_to_partition.get(r.metadata.src_node_id, -1)
        answered.add(p)
        if r.has_error():
            out.errors[p] = str(r.error.reason)
        else:
            out.bytes_received += sum(R.nbytes(a) for a in r.content.array_records.values())
            ok.append((p, r))
    out.ok = [r for _, r in sorted(ok, key=lambda t: t[0])]
    out.timed_out = [p for p in sampled if p not in answered]
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
