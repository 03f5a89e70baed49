"""`mode: local`: one process trains the spec, checkpoints every epoch and tracks the run.

Tracking is imported lazily (it pulls in mlflow); core/ itself never imports it at module
level, so `atoll --help` and `atoll validate` stay fast.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from atoll.core import interrupts, loader
from atoll.core.cadence import Cadence
from atoll.core.checkpoint import CheckpointDir, CheckpointError, load, save
from atoll.core.components import Components, build_components, checkpoint_payload, restore
from atoll.core.data import DataBundle, eval_batches, load_data, train_batches
from atoll.core.loop import NonFiniteLoss, TrainState, evaluate, train_task, unwrap
from atoll.core.spec import ExperimentSpec, SpecError, flatten

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
RESUMABLE_CHANGES = ("project_dir", "train.epochs", "train.progress", "train.log_every_n_steps",
                     "train.resume", "train.checkpoint_every",
                     "train.threads", "train.keep_checkpoints", "train.checkpoint_dir",
                     "train.early_stopping.", "data.data_dir", "data.cache_dir", "data.mirror",
                     "data.download", "tracking.", "cluster.address", "federated.rounds",
                     "federated.checkpoint_every", "federated.round_timeout",
                     "federated.max_failed_rounds",
                     "federated.concurrency", "compress")
BEST = "best.ckpt"  # the best epoch's weights (train.early_stopping.restore_best)


DICT_FIELDS = ("model.kwargs.", "data.kwargs.")  # free-form: a key added counts as a change


def check_resume_compatible(saved: dict[str, Any], spec: ExperimentSpec, path: Path) -> None:
    """Refuse a resume whose spec differs from the checkpointed one, except in
    RESUMABLE_CHANGES. Keys this version no longer has (an older dump's fields of other
    models) are not differences; keys added to a free-form dict are."""
    now, old = spec.flat(), flatten(saved)
    keys = [k for k in old if k in now or k.startswith(DICT_FIELDS)]
    keys += [k for k in now if k.startswith(DICT_FIELDS) and k not in old]
    if old:  # a field newer than the checkpoint: the checkpointed run had its default
        defaults = _defaults()
        for k in now:
            if k not in old and k in defaults and not k.startswith(DICT_FIELDS):
                old[k] = defaults[k]
                keys.append(k)
    same_loss = {"auto", "cross_entropy"}  # auto meant cross_entropy before regression
    problems = [
        f"{k}: {now.get(k)!r} differs from {old.get(k)!r} in the checkpointed run ({path}); "
        "allowed: the same value to resume, or atoll run --restart to discard that run"
        for k in keys
        if now.get(k) != old.get(k) and not k.startswith(RESUMABLE_CHANGES) and not (
            k == "train.loss.name" and {now.get(k), old.get(k)} == same_loss)]
    if problems:
        raise SpecError(problems)


@functools.cache
def _defaults() -> dict[str, Any]:
    """Every field's default, flattened (the default spec's)."""
    return ExperimentSpec().flat()


def latest_valid(ckpts: CheckpointDir) -> tuple[Path, dict[str, Any]] | None:
    """The newest checkpoint that verifies; a corrupt one is skipped with a warning."""
    for path in reversed(ckpts.all()):
        try:
            return path, load(path)
        except CheckpointError as e:
            # load() tells a user to delete it; here it is already being skipped
            log.warning("skipping checkpoint: %s; trying an earlier one",
                        str(e).split(". Delete it")[0])
    if ckpts.all():
        raise CheckpointError(f"no checkpoint in {ckpts.root} verifies; run with --restart to "
                              "discard them and start over")
    return None


def how_to_resume(ckpts: CheckpointDir) -> str:
    kept = ckpts.latest()
    return (f"re-run the same command to resume from {kept}" if kept else
            "no checkpoint was written yet; re-running the same command starts over")


def check_writable(directory: Path, field_name: str) -> None:
    """Refuse (exit 2) before training when `directory` cannot take files, instead of
    failing with a traceback at the first checkpoint. A real probe file, not os.access:
    root passes os.access on a read-only mount."""
    made = [p for p in [directory, *directory.parents] if not p.exists()]
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=directory, prefix=".atoll-probe-"):
            pass
    except OSError as e:
        raise SpecError([f"{field_name}: cannot write to {directory} ({e.strerror or e}); "
                         "allowed: a directory this user can create files in"]) from None
    finally:  # the probe leaves nothing: a run refused later must not leave folders
        for p in made:
            with contextlib.suppress(OSError):
                p.rmdir()


# ------------------------------------------------------------ finished / unfinished runs
# "Finished" is a marker file written atomically after the run's model is tested and
# registered, never read from the newest checkpoint: a corrupt final checkpoint must not
# turn a finished run back into one that resumes (and logs and registers twice).


def finished_marker(ckpts: CheckpointDir) -> Path:
    return ckpts.root / f"atoll-finished-{ckpts.prefix}.json"


def mark_finished(ckpts: CheckpointDir, run_id: str | None, completed: int, unit: str) -> None:
    path = finished_marker(ckpts)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps({"run_id": run_id, "completed": completed, "unit": unit}))
    os.replace(tmp, path)


def discard(ckpts: CheckpointDir) -> int:
    """Remove a name's checkpoints (of this prefix), best weights and marker; how many
    checkpoints went. Only for a finished run or an explicit --restart."""
    old = ckpts.all()
    for p in old:
        p.unlink()
    finished_marker(ckpts).unlink(missing_ok=True)
    if ckpts.prefix == "epoch":
        (ckpts.root / BEST).unlink(missing_ok=True)
    return len(old)


def start_anew(ckpts: CheckpointDir, spec: ExperimentSpec, completed: Any, unit: str) -> None:
    """A finished run's name is re-run: its checkpoints go, a new run starts."""
    log.info("run %s already completed %s %s; starting a new run", spec.name, completed, unit)
    discard(ckpts)


def prepare(ckpts: CheckpointDir, spec: ExperimentSpec, restart: bool, unit: str
            ) -> tuple[Path, dict[str, Any]] | None:
    """The checkpoint an unfinished run under this name resumes from, or None to start anew.

    A name's checkpoints are cleared only when its run finished (the marker) or on
    `--restart`; an unfinished run's are never deleted otherwise (train.resume: false with
    one is refused, exit 2).
    """
    if restart:
        n = discard(ckpts)
        if n:
            log.info("discarding %d checkpoint%s of run %s (--restart)", n, "s" * (n != 1),
                     spec.name)
        return None
    marker = finished_marker(ckpts)
    if marker.is_file():
        try:
            completed = json.loads(marker.read_text()).get("completed", "all its")
        except (OSError, ValueError, AttributeError):
            completed = "all its"
        start_anew(ckpts, spec, completed, unit)
        return None
    if not ckpts.all():
        discard(ckpts)  # a stale best.ckpt of a run that never checkpointed an epoch
        return None
    if not spec.train.resume:
        raise SpecError([f"train.resume: false, but run {spec.name!r} has an unfinished "
                         f"checkpoint in {ckpts.root}; allowed: atoll run --restart to "
                         "discard it, train.resume: true to continue it, or another name"])
    return latest_valid(ckpts)


def finished_in_mlflow(spec: ExperimentSpec, saved: dict[str, Any]) -> bool:
    """A complete checkpoint without a marker: finished (a run from before markers) only if
    its MLflow run says so; otherwise it stopped between its last epoch and registration."""
    if not saved.get("run_id"):
        return False
    from atoll.tracking import run_status

    return run_status(spec.tracking, saved["run_id"]) == "FINISHED"


def resume(ckpts: CheckpointDir, c: Components, state: TrainState, spec: ExperimentSpec,
           restart: bool = False) -> dict[str, Any] | None:
    """Restore the latest checkpoint of an unfinished run under this name, if any.

    A finished run is not resumed: its model is in MLflow, and re-running the name trains
    anew. An unfinished run that already has all its epochs (or stopped early) resumes
    into its test and registration only; one with more epochs than asked is refused.
    """
    found = prepare(ckpts, spec, restart, "epochs")
    if found is None:
        return None
    path, saved = found
    done, stopped = saved["state"]["epoch"], saved["state"]["stopped_early"]
    complete = done >= spec.train.epochs or stopped
    if complete and finished_in_mlflow(spec, saved):
        start_anew(ckpts, spec, done, "epochs")
        return None
    if done > spec.train.epochs and not stopped:
        raise SpecError([f"train.epochs: {spec.train.epochs} is fewer than the {done} epochs "
                         f"run {spec.name!r} has already trained ({path}); allowed: >= {done} "
                         f"to continue it ({done} ends it now), or atoll run --restart to "
                         "discard its checkpoints"])
    check_resume_compatible(saved.get("spec", {}), spec, path)
    restore(c, state, saved)
    log.info("resumed from %s (epoch %d, step %d)", path, state.epoch, state.global_step)
    if complete:
        log.info("run %s had completed its epochs when it stopped; finishing it (test and "
                 "registration), training nothing more", spec.name)
    return saved


# ------------------------------------------------------------------ best weights


def wants_best(spec: ExperimentSpec, state: TrainState) -> bool:
    """Whether the run should end with its best epoch's weights rather than the last's:
    early stopping on (patience > 0) with restore_best, and a best that is not the last."""
    es = spec.train.early_stopping
    return es.restore_best and es.patience > 0 and 1 <= state.best_epoch != state.epoch


def save_best(c: Components, state: TrainState, path: Path) -> None:
    save({"model": unwrap(c.model).state_dict(), "epoch": state.epoch,
          "value": state.best_metric}, path)


def load_best(c: Components, state: TrainState, spec: ExperimentSpec, path: Path) -> bool:
    """Put the best epoch's weights (saved in `path`) into the model; False keeps the last."""
    if not wants_best(spec, state):
        return False
    try:
        saved = load(path)
    except CheckpointError as e:
        log.warning("%s; the run ends with the last epoch's weights", e)
        return False
    if saved["epoch"] != state.best_epoch:
        log.warning("%s holds epoch %d, not the best epoch %d; the run ends with the last "
                    "epoch's weights", path, saved["epoch"], state.best_epoch)
        return False
    unwrap(c.model).load_state_dict(saved["model"])
    log.info("restored the weights of epoch %d (best %s %.4g; train.early_stopping."
             "restore_best); training stopped at epoch %d", state.best_epoch,
             spec.train.early_stopping.metric, state.best_metric, state.epoch)
    return True


def run_local(spec: ExperimentSpec, tracker: Any = None, *, restart: bool = False) -> RunResult:
    """Train `spec` in this process. `tracker` defaults to the spec's tracking settings;
    `restart` discards the name's checkpoints first (`atoll run --restart`)."""
    t0 = time.perf_counter()
    ckpts = CheckpointDir(Path(spec.train.checkpoint_dir) / spec.name, spec.train.keep_checkpoints)
    check_writable(ckpts.root, "train.checkpoint_dir")
    if spec.train.threads:
        torch.set_num_threads(spec.train.threads)
    data: DataBundle = loader.prepare(spec) if loader.wanted(spec) else \
        load_data(spec.data, spec.seed, spec.project_dir, spec.task)
    train = train_batches(data, spec.data, spec.seed)
    val = eval_batches(data.val, spec.data) if len(data.val) else None
    c = build_components(spec, data, len(train))
    state = TrainState()
    payload = resume(ckpts, c, state, spec, restart)
    es = spec.train.early_stopping
    keep_best = es.restore_best and es.patience > 0
    best = ckpts.root / BEST
    if keep_best and payload is not None and state.best_epoch == state.epoch:
        save_best(c, state, best)  # killed between the epoch's checkpoint and its best copy
    if tracker is None:
        from atoll.tracking import make_tracker

        tracker = make_tracker(spec.tracking, spec.name, mode="local",
                               run_id=payload.get("run_id") if payload else None, trains=True)
    from atoll.models import count_parameters, model_class

    if payload is None:
        tracker.log_params(spec.flat())
        tracker.log_text(spec.to_yaml(), "spec.yaml")
        tracker.log_params({"model.parameters": count_parameters(c.model),
                            "model.class": model_class(c.model), "data.task": data.task,
                            "data.train_samples": len(data.train), "device": str(c.device)})

    every = Cadence.of(spec.train.checkpoint_every, "local")

    def on_epoch_end(st: TrainState, metrics: dict[str, float]) -> None:
        tracker.log_metrics({k: v for k, v in metrics.items() if k != "samples"}, step=st.epoch)
        if every.due(st.epoch, final=st.epoch >= c.cfg.epochs or st.stopped_early):
            ckpts.save(checkpoint_payload(c, st, run_id=tracker.run_id,
                                           spec=spec.model_dump(mode="json")), st.epoch)
            every.saved()
        if keep_best and st.best_epoch == st.epoch:
            save_best(c, st, best)

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
    except BaseException as e:
        if interrupts.stopped_by(e):
            tracker.finish("KILLED")
            raise KeyboardInterrupt(how_to_resume(ckpts)) from None
        tracker.finish("FAILED")
        raise
    t_train_end = time.perf_counter()
    restored = load_best(c, state, spec, best)
    result = finish_run(spec, data, c, state, tracker, ckpts.latest(), t0,
                        restored_best=restored)
    mark_finished(ckpts, result.run_id, state.epoch, "epochs")
    result.train_seconds = t_train_end - t_train
    result.parameters = count_parameters(c.model)
    return result


def selection(spec: ExperimentSpec, state: TrainState, restored_best: bool) -> Any:
    """The tracking.Selection of the weights a run ends with: the early-stopping metric's
    best epoch when those were restored, else the last epoch (and what it ended with)."""
    from atoll.tracking.base import Selection

    es = spec.train.early_stopping
    if restored_best:
        return Selection(es.metric, state.best_metric, state.best_epoch, "epoch", "best")
    last = state.history[-1] if state.history else {}
    metric = es.metric if es.metric in last else "train_loss"
    return Selection(metric, last.get(metric), state.epoch, "epoch", "last")


def finish_run(spec: ExperimentSpec, data: DataBundle, c: Components, state: TrainState,
               tracker: Any, checkpoint: Path | None, t0: float, *,
               restored_best: bool = False, selected: Any = None) -> RunResult:
    """Test metrics, curves, the registered model; shared by every harness's rank 0.

    `restored_best`: the model holds the best epoch's weights (see `wants_best`), not the
    last's; `selected`: a tracking.Selection for weights chosen another way (e.g. by
    cluster.checkpoint_metric), overriding both. A run that completed no epoch is FAILED
    and registers nothing.
    """
    if state.epoch < 1:
        tracker.finish("FAILED")
        raise RunFailed(f"run {spec.name} completed no epoch; nothing was tested or registered")
    chosen = selected or selection(spec, state, restored_best)
    model = unwrap(c.model)
    test = evaluate(model, eval_batches(data.test, spec.data), c.loss_fn, data.num_classes,
                    prefix="test", autocast_dtype=c.cfg.autocast_dtype)
    tracker.log_metrics(test, step=state.epoch)
    tracker.set_tags({"atoll.epochs": str(state.epoch),
                      "atoll.stopped_early": str(state.stopped_early),
                      **{f"atoll.{k}": v for k, v in chosen.tags().items()}})
    if state.history:
        from atoll.tracking.plots import curves

        title = f"{spec.name} ({spec.model.label} on {spec.data.name})"
        tracker.log_plot("plots/curves.png", lambda: curves(state.history, title))
    registered = None
    main = "test_r2" if data.task == "regression" else "test_accuracy"
    if spec.tracking.log_model:
        registered = tracker.log_model(
            model.cpu(), data, registered_name=spec.tracking.registered_model,
            alias=spec.tracking.alias, selection=chosen,
            tags={"mode": spec.mode, "epoch": str(chosen.step), "epochs_trained":
                  str(state.epoch), "task": "0", "data.task": data.task,
                  main: f"{test.get(main, 0):.4f}"})
        model.to(c.device)
    tracker.finish("FINISHED")
    out = RunResult(tracker.run_id, test, state.epoch, time.perf_counter() - t0, checkpoint,
                    registered, state.history)
    out.details["selected"] = {"metric": chosen.metric, "epoch": chosen.step,
                               "rule": chosen.rule}
    return out
