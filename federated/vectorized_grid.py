"""`federated.engine: vectorized`: Flower's Grid, answered in this process.

The server (`federated/server.py`) runs unchanged — Flower's strategy objects, atoll's
sampler, faults, Byzantine attacks, DP wrappers, checkpoints and MLflow logging — and
talks to this Grid as it would to a SuperLink. Instead of delivering each train message to
a ClientApp on a Ray actor, the Grid trains every sampled client of the round at once
(`federated/vectorized.py`) and answers with the replies the ClientApp would send
(`client_app.train_reply`): same records, same metrics, the same faults and attacks
applied, Flower's own client-side clipping mods run on them. Evaluation and node
discovery are answered per client, in process.
"""

from __future__ import annotations

import gc
import logging
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from flwr.app import Context, Message, MessageType, RecordDict
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.serverapp import Grid
from flwr.supercore.task_identity import TaskIdentity

from atoll.continual.ewc import EWC
from atoll.continual.si import SI
from atoll.core.components import pick_device
from atoll.core.data import Split
from atoll.core.spec import ExperimentSpec
from atoll.federated import client_app, task
from atoll.federated import records as R
from atoll.federated.driver import failed_reply
from atoll.federated.faults import byzantine_clients, flip_labels, poison_update, round_fault
from atoll.federated.vectorized import (
    ClientResult,
    Strategies,
    auto_chunk,
    client_bytes,
    evaluate_clients,
    out_of_memory,
    parts_of,
    rule_of,
    train_clients,
)

log = logging.getLogger("atoll.federated")


NODE_BASE = 1 << 20  # node id of partition 0 (the server is Flower's SUPERLINK_NODE_ID, 1)


@dataclass
class _Work:
    """One sampled client of a round that trains."""

    msg: Message
    partition: int
    data: task.ClientData
    attack: str
    delay: float
    cl: task.ContinualState | None


class VectorizedGrid(Grid):
    """Node NODE_BASE + p is partition p; replies wait in memory until pulled (a
    straggler's until its delay has passed, so the round's timeout applies as before)."""

    def __init__(self, spec: ExperimentSpec, run_config: dict[str, Any]):
        # Flower's Message reads who sends it from the process's task identity, which a
        # SuperLink's runtime sets; here this process is the server's task
        TaskIdentity.run_id, TaskIdentity.task_id = 0, 0
        TaskIdentity.node_id = SUPERLINK_NODE_ID
        self.spec, self.run_config = spec, dict(run_config)
        self.num_clients = spec.federated.num_clients
        self.replies: dict[str, tuple[float, Message]] = {}
        self.contexts: dict[int, Context] = {}
        self.device = pick_device(spec)
        self.chunk_size = spec.federated.vectorized.chunk_size  # None: from free memory
        self.cap: int | None = None  # what an out-of-memory failure taught
        self.chunk: int | None = None  # the chunk size of the last round
        self._auto_logged: int | None = None
        self._model: torch.nn.Module | None = None
        self._evaluating: tuple[Any, torch.nn.Module] | None = None
        self.datas: dict[tuple[int, int | None], task.ClientData] = {}
        self._run: Any = None

    # --- Flower's Grid interface -----------------------------------------------------
    def set_run(self, run: Any) -> None:
        self._run = run

    @property
    def run(self) -> Any:
        return self._run

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int,
                       group_id: str, ttl: float | None = None) -> Message:
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        return [NODE_BASE + p for p in range(self.num_clients)]

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids, train, evaluate = [], [], []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = str(uuid.uuid4())
            ids.append(msg.metadata.message_id)
            kind = msg.metadata.message_type
            if kind == MessageType.TRAIN:
                train.append(msg)
            elif kind == MessageType.EVALUATE:
                evaluate.append(msg)
            else:
                self._answer(msg, client_app.query_reply(msg, self._partition(msg)))
        if train:
            self._train(train)
        if evaluate:
            self._evaluate(evaluate)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        now = time.monotonic()
        out = []
        for key in message_ids:
            held = self.replies.get(key)
            if held is not None and held[0] <= now:
                out.append(self.replies.pop(key)[1])
        return out

    def send_and_receive(self, messages: Iterable[Message], *,
                         timeout: float | None = None) -> Iterable[Message]:
        pending = set(self.push_messages(messages))
        end = time.monotonic() + (timeout if timeout is not None else float("inf"))
        got: list[Message] = []
        while pending and time.monotonic() < end:
            replies = list(self.pull_messages(pending))
            got += replies
            pending -= {r.metadata.reply_to_message_id for r in replies}
            if pending:
                time.sleep(0.05)
        return got

    # --- what the clients would have done --------------------------------------------
    def _answer(self, msg: Message, reply: Message, delay: float = 0.0) -> None:
        self.replies[msg.metadata.message_id] = (time.monotonic() + delay, reply)

    def _partition(self, msg: Message) -> int:
        return int(msg.metadata.dst_node_id) - NODE_BASE

    def _context(self, partition: int) -> Context:
        """The node's Context, kept across rounds as a SuperNode keeps it."""
        if partition not in self.contexts:
            self.contexts[partition] = Context(
                run_id=0, node_id=NODE_BASE + partition,
                node_config={R.NODE_PARTITION_ID: partition,
                             R.NODE_NUM_PARTITIONS: self.num_clients},
                state=RecordDict(), run_config=self.run_config)
        return self.contexts[partition]

    def _data(self, partition: int, task_index: int | None = None) -> task.ClientData:
        """A client's splits (of stream task `task_index`), made once per run (they depend
        on the spec alone)."""
        key = (partition, task_index)
        if key not in self.datas:
            self.datas[key] = task.client_data(self.spec, partition, self.num_clients,
                                               task_index)
        return self.datas[key]

    def _delay(self, msg: Message, partition: int, rnd: int, phase: str = "") -> float | None:
        """This round's injected fault for the client: a crash or dropout is answered here
        with its failure (None); otherwise the seconds its reply is held back (stragglers)."""
        f = self.spec.federated
        fault = round_fault(f.faults, self.spec.seed, rnd, partition)
        if fault in ("crash", "dropout"):  # a crash fails before any update is sent
            self._answer(msg, failed_reply(msg, f"{R.FAILURE_PREFIX}{fault} (client "
                                                f"{partition}, round {rnd}{phase})"))
            return None
        return f.faults.straggler_delay if fault == "straggler" else 0.0

    def _build(self, data: task.ClientData) -> torch.nn.Module:
        from atoll.models import build_model

        b = data.bundle
        return build_model(self.spec.model, b.input_shape, b.num_classes,
                           self.spec.project_dir, b.embedded)

    def _evaluate(self, messages: list[Message]) -> None:
        """Every evaluate message of a round: the global model on each client's validation
        split, all of them in one forward (`vectorized.evaluate_clients`)."""
        spec = self.spec
        work: list[tuple[Message, int, task.ClientData]] = []
        for msg in messages:
            p = self._partition(msg)
            rnd = int(msg.content[R.CONFIG].get(R.ROUND, 1))
            delay = self._delay(msg, p, rnd, ", evaluation")
            if delay is None:
                continue
            current = task.client_task(spec, p, rnd) if task.streaming(spec) else None
            data = self._data(p, current)
            if not len(data.val):
                self._answer(msg, failed_reply(msg, task.NO_VALIDATION))
                continue
            work.append((msg, p, data, delay))
        if not work:
            return
        first = work[0][2]
        found = evaluate_clients(self._global(work[0][0], first), [d.val for _, _, d, _ in work],
                                 task.federation_loss(spec), first.bundle.num_classes,
                                 spec.data.eval_batch_size)
        for (msg, p, data, delay), metrics in zip(work, found, strict=True):
            kept = task.client_metrics(metrics, data.bundle.task)
            self._answer(msg, client_app.evaluate_reply(msg, p, kept, len(data.val)), delay)

    def _global(self, msg: Message, data: task.ClientData) -> torch.nn.Module:
        """One model holding the round's global state, for every client's evaluation (the
        strategy sends all of them the same record: it is decoded once)."""
        arrays = msg.content[R.ARRAYS]
        if self._evaluating is None or self._evaluating[0] is not arrays:
            model = self._build(data)
            model.load_state_dict(R.arrays_to_state(arrays))
            self._evaluating = (arrays, model)
        return self._evaluating[1]

    def _model_for(self, data: task.ClientData) -> torch.nn.Module:
        if self._model is None:
            self._model = self._build(data).to(self.device)
        return self._model

    def _train(self, messages: list[Message]) -> None:
        """Every train message of a round: faults first, then one batched computation for
        the clients that train, then each reply as its ClientApp would have built it."""
        spec, f = self.spec, self.spec.federated
        cfg = messages[0].content[R.CONFIG]
        rnd = int(cfg[R.ROUND])
        rule = rule_of(spec, float(cfg[R.LR]), int(cfg[R.LOCAL_EPOCHS]),
                       int(cfg[R.BATCH_SIZE]), float(cfg.get(R.PROXIMAL_MU, 0.0)))
        bad = byzantine_clients(f.byzantine, self.num_clients, spec.seed)
        work: list[_Work] = []
        for msg in messages:
            p = self._partition(msg)
            delay = self._delay(msg, p, rnd)
            if delay is None:
                continue
            attack = f.byzantine.attack if p in bad else ""
            try:  # a continual client's state, restored as its ClientApp restores it
                cl = client_app.continual_state(spec, self._context(p), rnd, cfg)
                data = self._data(p, cl.current if cl else None)
            except Exception as e:  # noqa: BLE001 - that client fails, as its ClientApp would
                self._fail(msg, p, rnd, e)
                continue
            work.append(_Work(msg, p, data, attack, delay, cl))
        # a strategy sends every client the same model; one sending several is served
        # group by group
        groups: dict[int, list[_Work]] = {}
        for item in work:
            groups.setdefault(id(item.msg.content[R.ARRAYS]), []).append(item)
        for group in groups.values():
            self._train_group(group, rnd, rule)

    def _fail(self, msg: Message, partition: int, rnd: int, e: Exception) -> None:
        """What Flower replies for a ClientApp that raised."""
        self._answer(msg, failed_reply(msg, f"client {partition}, round {rnd}: "
                                            f"{type(e).__name__}: {e}"))

    def _enter(self, work: list[_Work], global_state: dict[str, torch.Tensor],
               rule: Any, rnd: int) -> tuple[list[_Work], Strategies | None]:
        """Each continual client's strategy for this round (`ContinualState.enter`: a task
        just finished is closed on the received global model), as its ClientApp does; a
        client whose strategy cannot enter (its state, its Fisher) fails alone."""
        if work[0].cl is None:
            return work, None
        from atoll.federated.fedewc import decode

        content = work[0].msg.content
        federation = decode(R.arrays_to_state(content[R.FEDEWC])) \
            if R.FEDEWC in content else None
        model = self._model_for(work[0].data)
        model.load_state_dict(global_state)
        kept, strategies, tasks, mask = [], [], [], None
        for w in work:
            w.cl.federation = federation
            try:
                strategy, current, mask = w.cl.enter(self.spec, model, w.partition,
                                                     self.num_clients, rule.batch_size)
            except Exception as e:  # noqa: BLE001 - as its ClientApp would fail
                self._fail(w.msg, w.partition, rnd, e)
                continue
            kept.append(w)
            strategies.append(strategy)
            tasks.append(current)
        return kept, Strategies(strategies, tasks, mask)

    def _train_group(self, work: list[_Work], rnd: int, rule: Any) -> None:
        spec, f = self.spec, self.spec.federated
        global_state = R.arrays_to_state(work[0].msg.content[R.ARRAYS])
        work, continual = self._enter(work, global_state, rule, rnd)
        if not work:
            return
        splits = []
        for w in work:
            train = w.data.train
            if w.attack == "label_flip":
                train = Split(train.x, flip_labels(train.y, w.data.bundle.num_classes))
            splits.append(train)
        seeds = [task._seed(spec, rnd, w.partition) for w in work]
        first = work[0].data
        aug = spec.data.augment if first.bundle.is_image else None
        results = self._train_chunked(self._model_for(first), global_state, splits, seeds,
                                      rule, aug.shift if aug else 0,
                                      aug.noise_std if aug else 0.0, continual)
        for w, result in zip(work, results, strict=True):
            msg, p, data, attack, delay = w.msg, w.partition, w.data, w.attack, w.delay
            if result.error and result.kind == "nonfinite":
                reply = failed_reply(msg, f"{R.FAILURE_PREFIX}nonfinite (client {p}, round "
                                          f"{rnd}): {result.error}")
            elif result.error:  # what Flower replies for a ClientApp that raised
                reply = failed_reply(msg, f"client {p}, round {rnd}: {result.error}")
            else:
                weights = result.state
                if attack in ("sign_flip", "scaling", "gaussian"):
                    weights = poison_update(f.byzantine, global_state, weights, spec.seed,
                                            rnd, p)
                if w.cl is not None:
                    client_app.keep_continual(spec, self._context(p), p, rnd, w.cl)
                built = client_app.train_reply(msg, spec, p, weights, result.metrics, attack,
                                               len(data.train), w.cl)
                # compression and Flower's client-side clipping mods, as on a SuperNode
                reply = client_app.update_mod(msg, self._context(p),
                                              lambda _m, _c, r=built: r)
            self._answer(msg, reply, delay)

    def _train_chunked(self, model: torch.nn.Module, global_state: dict[str, torch.Tensor],
                       splits: list[Split], seeds: list[int], rule: Any, shift: int,
                       noise_std: float, continual: Strategies | None
                       ) -> list[ClientResult]:
        """`federated.vectorized.chunk_size` clients at a time (default: as many as half
        the free memory holds, estimated each round: continual state and replayed data
        grow); out of memory halves the chunk, with a warning, and trains the failed
        chunk again — a full-sized chunk's failure also caps later rounds."""
        loss_fn = task.federation_loss(self.spec, self.device)
        size = self.chunk_size or self._auto_chunk(model, splits, rule, continual)
        if self.cap is not None:
            size = min(size, self.cap)
        self.chunk = size
        out: list[ClientResult] = []
        start = 0
        while start < len(splits):
            part = slice(start, start + size)
            cl = Strategies(continual.strategies[part], continual.tasks[part],
                            continual.mask) if continual else None
            # what training changes in a strategy before it can fail: replay's and joint's
            # draws (SI's path integral is written back only at the end)
            draws = [(g, g.get_state()) for st in (cl.strategies if cl else [])
                     for g in _generators(st)]
            try:
                out += train_clients(model, global_state, splits[part], seeds[part], loss_fn,
                                     rule, shift=shift, noise_std=noise_std,
                                     device=self.device, continual=cl)
            except Exception as e:
                if not out_of_memory(e) or size == 1:
                    raise
                for g, state in draws:  # the retry draws what the first try drew
                    g.set_state(state)
                gc.collect()
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()
                failed = min(size, len(splits) - start)
                if failed == size:  # a short last chunk says nothing about full ones
                    self.cap = max(1, size // 2)
                size = self.chunk = max(1, failed // 2)
                log.warning("vectorized engine: out of memory; training %d clients at a "
                            "time (federated.vectorized.chunk_size)", size)
                continue
            start += size
        return out

    def _auto_chunk(self, model: torch.nn.Module, splits: list[Split], rule: Any,
                    continual: Strategies | None) -> int:
        """Clients per batched computation from the memory free now and one client's
        estimated peak (`vectorized.client_bytes`), for this round's largest client:
        its epoch of batches held in memory, its largest batch (with replayed or joint
        samples), its stacked continual state (EWC pairs, SI's path integral)."""
        split = max(splits, key=len)
        extra, memory, batch = 0, 0, min(rule.batch_size, max(len(split), 1))
        for st in continual.strategies if continual else []:
            extra = max(extra, 2 * sum(len(e.fishers) for e in parts_of(st, EWC)) +
                        (5 if parts_of(st, SI) else 0))
            for part in getattr(st, "parts", [st]):
                stored = getattr(part, "x", None)
                if isinstance(stored, torch.Tensor):
                    memory = max(memory, stored.numel() * stored.element_size())
                    more = getattr(getattr(part, "cfg", None), "batch", None) or \
                        -(-batch * len(stored) // max(len(split), 1))  # joint's share
                    batch = max(batch, min(rule.batch_size, len(split)) + int(more))
        rows = split.x[torch.arange(batch) % max(len(split), 1)].to(self.device)
        held = 2 * (split.x.numel() * split.x.element_size() + memory)
        per = client_bytes(model.to(self.device), rows, rule, extra) + held
        chunk, free = auto_chunk(per, self.device)
        if chunk != self._auto_logged:
            log.info("vectorized engine: up to %d clients per batched computation (%.1f MiB "
                     "each, estimated; %.1f GiB free); federated.vectorized.chunk_size sets it",
                     chunk, per / 2**20, free / 2**30)
            self._auto_logged = chunk
        return chunk


def _generators(strategy: Any) -> list[torch.Generator]:
    """The random generators of a (possibly composite) strategy's parts."""
    return [g for part in getattr(strategy, "parts", [strategy])
            if isinstance(g := getattr(part, "generator", None), torch.Generator)]
