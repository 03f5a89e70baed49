"""A task stream on Ray Train workers: continual learning in cluster mode (DDP).

Every rank follows the same stream on its own shard of each task. Estimates a strategy
takes from its shard — EWC's Fisher, SI's Ω, A-GEM's reference gradient — are averaged
over ranks (`continual.base.distribute`), so every rank holds the same penalty; replay
memories stay per rank. After each task the ranks evaluate every task's test split
together (row i of the accuracy matrix) and rank 0 reports a Ray Train checkpoint with the
model, every rank's strategy state, the matrix so far and the history. A restarted
worker group (a dead worker, or the same job name run again) resumes at the next task;
epochs of a task are logged to MLflow once its checkpoint is durable, so a task that is
re-run after a failure is logged exactly once.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import torch.distributed as dist

CKPT_FILE = "state.ckpt"


def continual_loop_per_worker(config: dict[str, Any]) -> None:
    import ray.train

    from atoll.cluster.parallel import even_shard, on_cpu
    from atoll.cluster.worker import (
        deterministic_failure,
        newest_checkpoint,
        rank_tracker,
        saved_spec,
        start_worker,
    )
    from atoll.continual.base import distribute
    from atoll.continual.streams import build_stream
    from atoll.core.checkpoint import load, rng_state, save, set_rng_state
    from atoll.core.components import build_components
    from atoll.core.continual_runner import accuracy_row, task_mask
    from atoll.core.data import Batches, eval_batches
    from atoll.core.loop import TrainState, train_task

    w = start_worker(config)
    spec, rank, device, data, layout = w.spec, w.rank, w.device, w.data, w.layout
    world, run_dir = layout.dp_size, Path(config["run_dir"])
    tasks = build_stream(data, spec.continual, spec.seed)
    mask = task_mask(tasks, data.num_classes) if spec.continual.scenario == "task" else None
    c = build_components(spec, data, 1, device=device, model=layout.model)
    distribute(c.strategy, lambda t: layout.reduce(t) / world)

    def row() -> list[float]:
        return accuracy_row(layout.model, tasks, spec, data.num_classes, c.loss_fn, mask,
                            rank=rank, world=world, reduce=layout.reduce)

    baseline = row()  # the randomly initialised model: FWT's reference
    r: list[list[float]] = []
    history: list[dict[str, float]] = []
    start, epochs_done = 0, 0
    found = newest_checkpoint(ray.train.get_checkpoint(), run_dir, load)
    payload = found[0] if found is not None else None  # streams keep whole checkpoints
    if payload is not None:
        layout.load_full_state(payload["model"])
        c.strategy.load_state_dict(payload["strategy_per_rank"][rank])
        set_rng_state(payload["rng"])
        r, baseline, history = payload["r"], payload["baseline"], payload["history"]
        start, epochs_done = payload["next_task"], int(payload["state"]["epoch"])
    tracker = rank_tracker(spec, config, rank)
    if rank == 0:
        if payload is None:
            tracker.log_params({"continual.tasks": " | ".join(t.name for t in tasks),
                                "cluster.layout.parallel": "ddp", "cluster.world_size": world,
                                "cluster.device": str(device)})
            tracker.log_metrics({f"baseline_task_{j}": a for j, a in enumerate(baseline)},
                                step=0)
        _backfill(tracker, history, r)

    per_rank = w.per_rank
    aug = spec.data.augment if data.is_image else None
    for task in tasks[start:]:
        train = Batches(task.train, per_rank, shuffle=True, seed=spec.seed + task.index,
                        rank=rank, world=world, shift=aug.shift if aug else 0,
                        noise_std=aug.noise_std if aug else 0.0)
        val_shard = even_shard(task.val, rank, world)
        val = eval_batches(val_shard, spec.data) if len(task.val) else None
        fresh = build_components(spec, data, len(train), device=device, model=layout.model)
        state, rows = TrainState(), []

        def on_epoch_end(st: TrainState, m: dict[str, float], base: int = epochs_done,
                         t: int = task.index, out: list = rows) -> None:
            shown = {k: v for k, v in m.items() if k != "samples"}
            out.append({"epoch": float(base + st.epoch), "task": float(t), **shown})

        with deterministic_failure(run_dir, rank, tracker):
            train_task(layout.model, train, val, fresh.optimizer, c.loss_fn, fresh.cfg, state,
                       data.num_classes, scheduler=fresh.scheduler, strategy=c.strategy,
                       task=task, reduce=layout.reduce, no_sync=layout.no_sync,
                       on_epoch_end=on_epoch_end, logit_mask=mask)
        if state.epoch < fresh.cfg.epochs and not state.stopped_early:
            return  # a non-finite loss stopped every rank (see cluster/worker.py)
        epochs_done += state.epoch
        r.append(row())
        history.extend(rows)
        strategies: list[Any] = [None] * world
        dist.all_gather_object(strategies, on_cpu(c.strategy.state_dict()))
        full = layout.full_state()
        seen = sum(r[-1][:task.index + 1]) / (task.index + 1)
        if rank == 0:
            staging = run_dir / ".staging"
            staging.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=staging) as d:
                save({"model": full, "strategy_per_rank": strategies, "rng": rng_state(),
                      "r": r, "baseline": baseline, "history": history,
                      "next_task": task.index + 1, "state": {"epoch": epochs_done},
                      "run_id": config["run_id"], "spec": saved_spec(config)},
                     Path(d) / CKPT_FILE)
                ray.train.report({"task": task.index + 1, "acc_seen": seen, "epoch": epochs_done},
                                 checkpoint=ray.train.Checkpoint.from_directory(d))
            _log_task(tracker, rows, r, task.index)
        else:
            ray.train.report({"task": task.index + 1, "acc_seen": seen, "epoch": epochs_done})
    if rank == 0:
        tracker.close()  # the system-metrics monitor's last samples; the driver ends the run


def _log_task(tracker: Any, rows: list[dict[str, float]], r: list[list[float]], i: int) -> None:
    for row in rows:
        tracker.log_metrics({k: v for k, v in row.items() if k != "epoch"},
                            step=int(row["epoch"]))
    tracker.log_metrics({f"acc_task_{j}": a for j, a in enumerate(r[i])}
                        | {"acc_seen": sum(r[i][:i + 1]) / (i + 1)}, step=i + 1)
    tracker.wait()


def _backfill(tracker: Any, history: list[dict[str, float]], r: list[list[float]]) -> None:
    """Tasks the checkpoint holds but MLflow lacks (a worker died between the two)."""
    client = getattr(tracker, "client", None)
    if client is None or not r:
        return
    logged = {m.step for m in client.get_metric_history(tracker.run_id, "acc_seen")}
    for i in range(len(r)):
        if i + 1 not in logged:
            _log_task(tracker, [h for h in history if int(h["task"]) == i], r, i)
