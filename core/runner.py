"""`mode: local`: one process trains the spec, checkpoints every epoch and tracks the run.

Tracking is imported lazily (it pulls in mlflow); core/ itself never imports it at module
level, so `atoll --help` and `atoll validate` stay fast.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from core.checkpoint import CheckpointDir, CheckpointError, load
from core.components import Components, build_components, checkpoint_payload, restore
from core.data import DataBundle, eval_batches, load_data, train_batches
from core.loop import NonFiniteLoss, TrainState, evaluate, train_task
from core.spec import ExperimentSpec

log = logging.getLogger("atoll")


class RunFailed(RuntimeError):
    """Training stopped on purpose (e.g. NaN loss); the message names the checkpoint kept."""


@dataclass
class RunResult:
    run_id: str | None
    metrics: dict[str, float]
    epochs: int
    seconds: float
    checkpoint: Path | None
    registered: Any = None  # tracking.RegisteredModel
    history: list[dict[str, float]] = field(default_factory=list)
    parameters: int = 0
    train_seconds: float = 0.0  # inside the training loop (per-step/epoch logging included)
    details: dict[str, Any] = field(default_factory=dict)  # mode-specific (e.g. CL matrix)


# Fields that may change between a run and its resumption (how long, how it is shown and
# where it is logged); anything else would silently train a different experiment.
RESUMABLE_CHANGES = ("train.epochs", "train.progress", "train.log_every_n_steps", "train.resume",
                     "train.threads", "train.keep_checkpoints", "train.checkpoint_dir",
                     "train.early_stopping.", "data.data_dir", "data.cache_dir", "data.mirror",
                     "data.download", "tracking.", "cluster.address", "federated.rounds",
                     "federated.checkpoint_every", "federated.round_timeout",
                     "federated.concurrency")


def check_resume_compatible(saved: dict[str, Any], spec: ExperimentSpec, path: Path) -> None:
    from core.spec import SpecError, flatten

    now = spec.flat()
    problems = [
        f"{k}: {now.get(k)!r} differs from {v!r} in the checkpointed run ({path}); resume "
        "with the same value or set train.resume: false"
        for k, v in flatten(saved).items()
        if now.get(k) != v and not k.startswith(RESUMABLE_CHANGES)]
    if problems:
        raise SpecError(problems)


def latest_valid(ckpts: CheckpointDir) -> tuple[Path, dict[str, Any]] | None:
    """The newest checkpoint that verifies; a corrupt one is skipped with a warning."""
    for path in reversed(ckpts.all()):
        try:
            return path, load(path)
        except CheckpointError as e:
            log.warning("skipping checkpoint: %s", e)
    if ckpts.all():
        raise CheckpointError(f"no checkpoint in {ckpts.root} verifies; delete the directory "
                              "or set train.resume: false to start over")
    return None


def resume(ckpts: CheckpointDir, c: Components, state: TrainState, spec: ExperimentSpec
           ) -> dict[str, Any] | None:
    """Restore the latest checkpoint of an unfinished run under this name, if any.

    A finished run (all epochs done, or stopped early) is not resumed: its model is in
    MLflow, and re-running the name trains anew. Its checkpoints are then cleared so the
    new run's epoch numbering starts clean.
    """
    found = latest_valid(ckpts) if spec.train.resume else None
    payload = None
    if found is not None:
        path, saved = found
        done = saved["state"]["epoch"] >= spec.train.epochs or saved["state"]["stopped_early"]
        if done:
            log.info("run %s already completed %d epochs; starting a new run", spec.name,
                     saved["state"]["epoch"])
        else:
            check_resume_compatible(saved.get("spec", {}), spec, path)
            restore(c, state, saved)
            log.info("resumed from %s (epoch %d, step %d)", path, state.epoch,
                     state.global_step)
            payload = saved
    if payload is None and ckpts.all():
        log.info("removing %d checkpoints of the previous run in %s", len(ckpts.all()),
                 ckpts.root)
        for old in ckpts.all():
            old.unlink()
    return payload


def run_local(spec: ExperimentSpec, tracker: Any = None) -> RunResult:
    """Train `spec` in this process. `tracker` defaults to the spec's tracking settings."""
    t0 = time.perf_counter()
    if spec.train.threads:
        torch.set_num_threads(spec.train.threads)
    data: DataBundle = load_data(spec.data, spec.seed)
    train = train_batches(data, spec.data, spec.seed)
    val = eval_batches(data.val, spec.data) if len(data.val) else None
    c = build_components(spec, data, len(train))
    state = TrainState()
    ckpts = CheckpointDir(Path(spec.train.checkpoint_dir) / spec.name, spec.train.keep_checkpoints)
    payload = resume(ckpts, c, state, spec)
    if tracker is None:
        from tracking import make_tracker

        tracker = make_tracker(spec.tracking, spec.name, mode="local",
                               run_id=payload.get("run_id") if payload else None)
    from models import count_parameters

    if payload is None:
        tracker.log_params(spec.flat())
        tracker.log_text(spec.to_yaml(), "spec.yaml")
        tracker.log_params({"model.parameters": count_parameters(c.model),
                            "data.train_samples": len(data.train), "device": str(c.device)})

    def on_epoch_end(st: TrainState, metrics: dict[str, float]) -> None:
        tracker.log_metrics({k: v for k, v in metrics.items() if k != "samples"}, step=st.epoch)
        ckpts.save(checkpoint_payload(c, st, run_id=tracker.run_id,
                                       spec=spec.model_dump(mode="json")), st.epoch)

    t_train = time.perf_counter()
    try:
        train_task(c.model, train, val, c.optimizer, c.loss_fn, c.cfg, state, data.num_classes,
                   scheduler=c.scheduler, strategy=c.strategy,
                   on_step=lambda step, m: tracker.log_metrics(m, step=step),
                   on_epoch_end=on_epoch_end)
    except NonFiniteLoss as e:
        kept = ckpts.latest()
        tracker.set_tags({"atoll.failure": str(e)})
        tracker.finish("FAILED")
        where = f"last good checkpoint kept: {kept}" if kept else "no checkpoint was written yet"
        raise RunFailed(f"{e}; {where}") from e
    except KeyboardInterrupt:
        tracker.finish("KILLED")
        raise
    except Exception:
        tracker.finish("FAILED")
        raise
    t_train_end = time.perf_counter()
    result = finish_run(spec, data, c, state, tracker, ckpts.latest(), t0)
    result.train_seconds = t_train_end - t_train
    result.parameters = count_parameters(c.model)
    return result


def finish_run(spec: ExperimentSpec, data: DataBundle, c: Components, state: TrainState,
               tracker: Any, checkpoint: Path | None, t0: float) -> RunResult:
    """Test metrics, curves, the registered model; shared by every harness's rank 0."""
    from core.loop import unwrap

    model = unwrap(c.model)
    test = evaluate(model, eval_batches(data.test, spec.data), c.loss_fn, data.num_classes,
                    prefix="test", autocast_dtype=c.cfg.autocast_dtype)
    tracker.log_metrics(test, step=state.epoch)
    tracker.set_tags({"atoll.epochs": str(state.epoch),
                      "atoll.stopped_early": str(state.stopped_early)})
    if state.history:
        from tracking.plots import curves

        title = f"{spec.name} ({spec.model.name} on {spec.data.name})"
        tracker.log_plot("plots/curves.png", lambda: curves(state.history, title))
    registered = None
    if spec.tracking.log_model:
        example = data.test.x[:4].to(c.device).cpu().numpy()
        registered = tracker.log_model(
            model.cpu(), example, registered_name=spec.tracking.registered_model,
            alias=spec.tracking.alias,
            tags={"mode": spec.mode, "epoch": str(state.epoch), "task": "0",
                  "test_accuracy": f"{test.get('test_accuracy', 0):.4f}"})
        model.to(c.device)
    tracker.finish("FINISHED")
    return RunResult(tracker.run_id, test, state.epoch, time.perf_counter() - t0, checkpoint,
                     registered, state.history)
