"""`mode: local` over a task stream: the accuracy matrix and its metrics.

After every task the model is evaluated on every task's test split, filling row i of
R[i][j]; a randomly initialised model's accuracy on each task is the FWT baseline. The
strategy (EWC, replay, …) carries over between tasks; optimizer and schedule restart per
task. A checkpoint after each task holds everything the next task depends on, so an
interrupted stream resumes at the next task and ends as an uninterrupted one would.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import torch

from atoll.continual.metrics import summary
from atoll.continual.streams import Task, build_stream
from atoll.core import interrupts
from atoll.core.checkpoint import CheckpointDir, rng_state, set_rng_state
from atoll.core.components import build_components, seed_everything
from atoll.core.data import Batches, DataBundle, Split, eval_batches, load_data
from atoll.core.loop import MaskFn, NonFiniteLoss, Reducer, TrainState, evaluate, train_task
from atoll.core.metrics import is_regression
from atoll.core.runner import (
    RunFailed,
    RunResult,
    check_resume_compatible,
    check_writable,
    finished_in_mlflow,
    how_to_resume,
    mark_finished,
    prepare,
    start_anew,
)
from atoll.core.spec import ExperimentSpec, check_task

log = logging.getLogger("atoll.continual")


def task_mask(tasks: list[Task], num_classes: int) -> MaskFn:
    """Task-incremental: each sample may only predict the classes of its own task."""
    allowed = torch.zeros(num_classes, num_classes, dtype=torch.bool)
    for t in tasks:
        idx = torch.tensor(t.classes)
        allowed[idx.unsqueeze(1), idx.unsqueeze(0)] = True  # row: label, cols: its task
    return lambda y: allowed[y.cpu()]


def _batches(spec: ExperimentSpec, data: DataBundle, task: Task) -> Batches:
    aug = spec.data.augment if data.is_image else None
    return Batches(task.train, spec.data.batch_size, shuffle=True, seed=spec.seed + task.index,
                   shift=aug.shift if aug else 0, noise_std=aug.noise_std if aug else 0.0)


def accuracy_row(model: torch.nn.Module, tasks: list[Task], spec: ExperimentSpec,
                 num_classes: int, loss_fn: torch.nn.Module, mask: MaskFn | None,
                 rank: int = 0, world: int = 1, reduce: Reducer | None = None) -> list[float]:
    """Accuracy (R² for regression) on every task's test split; ranks split each test set
    and `reduce` sums."""
    key = "test_r2" if is_regression(loss_fn) else "test_accuracy"
    return [evaluate(model, eval_batches(Split(t.test.x[rank::world], t.test.y[rank::world]),
                                         spec.data),
                     loss_fn, num_classes, prefix="test", logit_mask=mask,
                     reduce=reduce).get(key, 0.0) for t in tasks]


def run_continual(spec: ExperimentSpec, tracker: Any = None, *, restart: bool = False
                  ) -> RunResult:
    """Train `spec.continual`'s stream task by task; log R, ACC/BWT/FWT/forgetting.

    `restart` discards the name's task checkpoints first (`atoll run --restart`); otherwise
    an unfinished stream resumes and a finished one (its marker) starts anew.
    """
    from atoll.models import count_parameters, model_class

    t0 = time.perf_counter()
    ckpts = CheckpointDir(Path(spec.train.checkpoint_dir) / spec.name,
                          spec.train.keep_checkpoints, prefix="task")
    check_writable(ckpts.root, "train.checkpoint_dir")
    if spec.train.threads:
        torch.set_num_threads(spec.train.threads)
    seed_everything(spec.seed)
    data = load_data(spec.data, spec.seed, spec.project_dir, spec.task)
    check_task(spec, data.task)  # before the stream: a split stream of a regression, say
    tasks = build_stream(data, spec.continual, spec.seed)
    mask = task_mask(tasks, data.num_classes) if spec.continual.scenario == "task" else None
    c = build_components(spec, data, len(_batches(spec, data, tasks[0])))
    baseline = accuracy_row(c.model, tasks, spec, data.num_classes, c.loss_fn, mask)
    r: list[list[float]] = []
    history: list[dict[str, float]] = []
    start, run_id = 0, None
    found = prepare(ckpts, spec, restart, "tasks")
    if found is not None and found[1]["next_task"] >= len(tasks) and \
            finished_in_mlflow(spec, found[1]):  # a stream finished before markers existed
        start_anew(ckpts, spec, len(tasks), "tasks")
        found = None
    if found is not None:
        path, saved = found
        check_resume_compatible(saved.get("spec", {}), spec, path)
        c.model.load_state_dict(saved["model"])
        c.strategy.load_state_dict(saved["strategy"])
        set_rng_state(saved["rng"])
        r, baseline, history = saved["r"], saved["baseline"], saved["history"]
        start, run_id = saved["next_task"], saved["run_id"]
        if start < len(tasks):
            log.info("resumed %s at task %d/%d from %s", spec.name, start + 1, len(tasks), path)
        else:
            log.info("resumed %s from %s: every task was trained before it stopped; "
                     "finishing it (metrics and registration)", spec.name, path)
    if tracker is None:
        from atoll.tracking import make_tracker

        tracker = make_tracker(spec.tracking, spec.name, mode=spec.mode, run_id=run_id,
                               trains=True)
    if start == 0:
        tracker.log_params(spec.flat())
        tracker.log_text(spec.to_yaml(), "spec.yaml")
        tracker.log_params({"model.parameters": count_parameters(c.model),
                            "model.class": model_class(c.model), "data.task": data.task,
                            "continual.tasks": " | ".join(t.name for t in tasks)})
        tracker.log_metrics({f"baseline_task_{j}": a for j, a in enumerate(baseline)}, step=0)
    epochs_done = start * spec.train.epochs
    try:
        for task in tasks[start:]:
            log.info("task %d/%d: %s (%d training samples)", task.index + 1, len(tasks),
                     task.name, len(task.train))
            train = _batches(spec, data, task)
            val = eval_batches(task.val, spec.data) if len(task.val) else None
            fresh = build_components(spec, data, len(train), model=c.model)  # new optimizer
            state = TrainState()

            def on_epoch_end(st: TrainState, m: dict[str, float], base: int = epochs_done,
                             t: int = task.index) -> None:
                row = {k: v for k, v in m.items() if k != "samples"}
                tracker.log_metrics({**row, "task": float(t)}, step=base + st.epoch)
                history.append({"epoch": float(base + st.epoch), "task": float(t), **row})

            train_task(c.model, train, val, fresh.optimizer, c.loss_fn, fresh.cfg, state,
                       data.num_classes, scheduler=fresh.scheduler, strategy=c.strategy,
                       task=task, on_epoch_end=on_epoch_end, logit_mask=mask)
            epochs_done += state.epoch
            row = accuracy_row(c.model, tasks, spec, data.num_classes, c.loss_fn, mask)
            r.append(row)
            tracker.log_metrics({f"acc_task_{j}": a for j, a in enumerate(row)}
                                | {"acc_seen": sum(row[:task.index + 1]) / (task.index + 1)},
                                step=task.index + 1)
            ckpts.save({"model": c.model.state_dict(), "strategy": c.strategy.state_dict(),
                        "rng": rng_state(), "r": r, "baseline": baseline, "history": history,
                        "next_task": task.index + 1, "run_id": tracker.run_id,
                        "spec": spec.model_dump(mode="json")}, task.index + 1)
    except NonFiniteLoss as e:
        tracker.finish("FAILED")
        raise RunFailed(f"{e}; last good checkpoint kept: {ckpts.latest()}") from e
    except BaseException as e:
        if interrupts.stopped_by(e):
            tracker.finish("KILLED")
            raise KeyboardInterrupt(how_to_resume(ckpts)) from None
        tracker.finish("FAILED")
        raise
    result = finish_stream(spec, data, c.model, tasks, r, baseline, history, tracker,
                           ckpts.latest(), t0)
    mark_finished(ckpts, result.run_id, len(tasks), "tasks")
    return result


def finish_stream(spec: ExperimentSpec, data: DataBundle, model: torch.nn.Module,
                  tasks: list[Task], r: list[list[float]], baseline: list[float],
                  history: list[dict[str, float]], tracker: Any, checkpoint: Path | None,
                  t0: float) -> RunResult:
    """ACC/BWT/FWT/forgetting, the matrix and curves, the registered model (local, cluster)."""
    from atoll.models import count_parameters
    from atoll.tracking.base import Selection
    from atoll.tracking.plots import accuracy_matrix, task_curves

    if not r:  # registration requires at least one completed task
        tracker.finish("FAILED")
        raise RunFailed(f"run {spec.name} completed no task; nothing was registered")
    metrics = summary(r, baseline)
    chosen = Selection("cl_acc", metrics["cl_acc"], len(r), "task", "last")
    tracker.set_tags({f"atoll.{k}": v for k, v in chosen.tags().items()})
    tracker.log_metrics(metrics, step=len(tasks))
    tracker.log_text(_matrix_text(r, tasks), "continual/accuracy_matrix.txt")
    names = [t.name for t in tasks]
    tracker.log_plot("plots/accuracy_matrix.png", lambda: accuracy_matrix(r, names, metrics))
    tracker.log_plot("plots/task_accuracy.png", lambda: task_curves(r, names))
    registered = None
    if spec.tracking.log_model:
        registered = tracker.log_model(
            model.cpu(), data, registered_name=spec.tracking.registered_model,
            alias=spec.tracking.alias, selection=chosen,
            tags={"mode": spec.mode, "task": str(len(tasks) - 1),
                  "strategy": "+".join(spec.continual.strategy),
                  "cl_acc": f"{metrics['cl_acc']:.4f}"})
    tracker.finish("FINISHED")
    out = RunResult(tracker.run_id, metrics, len(history), time.perf_counter() - t0,
                    checkpoint, registered, history)
    out.parameters = count_parameters(model)
    out.details = {"matrix": r, "baseline": baseline, "tasks": names}
    return out


def _matrix_text(r: list[list[float]], tasks: list[Task]) -> str:
    head = "after \\ on  " + "  ".join(f"T{j}" .rjust(6) for j in range(len(tasks)))
    rows = [f"task {i:<6}" + "  ".join(f"{a:6.3f}" for a in row) for i, row in enumerate(r)]
    return "\n".join([head, *rows, "", *(f"T{t.index}: {t.name}" for t in tasks)]) + "\n"
