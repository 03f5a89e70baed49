"""Server-aggregated EWC importances (FedEWC-style): `continual.ewc.aggregate: server`.

Clients close a task on the global model they receive (EWC's `after_task` on their own
data of that task) and send that Fisher back with their update. The server keeps, per
finished task t, the sample-weighted mean of the Fishers clients sent for t and, as its
anchor, the global model at the end of t's last round; every training message carries
these (anchor, Fisher) pairs, and clients penalise against them instead of their own —
the whole federation's importances. Online EWC sends the one decayed running pair.

Wire format: one ArrayRecord per direction; keys `a{t}/{param}` (anchors) and
`f{t}/{param}` (Fishers) to clients, `f/{param}` from a client, with the task index and
weight in the reply's client ConfigRecord.
"""

from __future__ import annotations

from typing import Any

import torch

Params = dict[str, torch.Tensor]


def ewc_of(strategy: Any) -> Any:
    """The EWC part of a (possibly composite) strategy, or None."""
    for part in getattr(strategy, "parts", [strategy]):
        if getattr(part, "name", "") == "ewc":
            return part
    return None


class FederatedFisher:
    """The server's per-task importance estimates (state checkpointed with the server)."""

    def __init__(self, online: bool):
        self.online = online
        self.sums: dict[int, Params] = {}
        self.weights: dict[int, float] = {}
        self.anchors: dict[int, Params] = {}

    def close_task(self, task: int, global_state: Params) -> None:
        """The global model at the end of `task`'s last round is its anchor."""
        self.anchors[task] = {k: v.detach().clone().float() for k, v in global_state.items()}

    def add(self, task: int, fisher: Params, weight: float) -> None:
        if task not in self.anchors or weight <= 0:
            return  # a Fisher for a task the server has not closed: ignore it
        acc = self.sums.setdefault(task, {k: torch.zeros_like(v) for k, v in fisher.items()})
        for k, v in fisher.items():
            acc[k] += v.float() * weight
        self.weights[task] = self.weights.get(task, 0.0) + weight

    def pairs(self) -> list[tuple[int, Params, Params]]:
        """(task, anchor, mean Fisher) of every closed task with at least one Fisher;
        online EWC keeps only the newest (it already folds the older ones in)."""
        out = [(t, self.anchors[t], {k: v / self.weights[t] for k, v in self.sums[t].items()})
               for t in sorted(self.sums)]
        return out[-1:] if self.online else out

    def encode(self) -> Params:
        flat: Params = {}
        for t, anchor, fisher in self.pairs():
            flat.update({f"a{t}/{k}": v for k, v in anchor.items() if k in fisher})
            flat.update({f"f{t}/{k}": v for k, v in fisher.items()})
        return flat

    def state_dict(self) -> dict[str, Any]:
        return {"sums": self.sums, "weights": self.weights, "anchors": self.anchors}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.sums = {int(k): v for k, v in state.get("sums", {}).items()}
        self.weights = {int(k): float(v) for k, v in state.get("weights", {}).items()}
        self.anchors = {int(k): v for k, v in state.get("anchors", {}).items()}


def decode(flat: Params) -> list[tuple[int, Params, Params]]:
    """The server's pairs, as a client reads them (sorted by task)."""
    tasks: dict[int, tuple[Params, Params]] = {}
    for key, v in flat.items():
        head, name = key.split("/", 1)
        anchor, fisher = tasks.setdefault(int(head[1:]), ({}, {}))
        (anchor if head[0] == "a" else fisher)[name] = v
    return [(t, *tasks[t]) for t in sorted(tasks)]


def adopt(ewc: Any, pairs: list[tuple[int, Params, Params]], closed: int | None) -> None:
    """Penalise against the federation's pairs; a task this client has just closed and the
    server has no Fisher for yet keeps the client's own estimate until it has."""
    own = (ewc.anchors[-1], ewc.fishers[-1]) if closed is not None and ewc.fishers else None
    ewc.anchors = [a for _, a, _ in pairs]
    ewc.fishers = [f for _, _, f in pairs]
    if own is not None and closed not in {t for t, _, _ in pairs}:
        if ewc.cfg.mode == "online":
            ewc.anchors, ewc.fishers = [own[0]], [own[1]]
        else:
            ewc.anchors.append(own[0])
            ewc.fishers.append(own[1])
