"""The function every Ray Train worker runs: thin glue around `core/loop.py`.

Re-validates the spec, builds the data shard and the parallel layout, restores the
latest Ray Train checkpoint (after a worker died, or when a job name is re-run), trains
with the one loop, and reports to Ray Train with a checkpoint at the epoch ends
`train.checkpoint_every` names (a report waits for Ray Train's controller to poll): rank
0's file, or under FSDP2 every rank's shards, written in the background and reported at
the first epoch end after they are on disk.
Only rank 0 logs, into the MLflow run the driver created.

A non-finite loss is deterministic: a retry would meet it again. The ranks agree on it
(core.loop), rank 0 records it in `atoll-failed.json` and every rank returns normally, so
Ray Train ends the run without spending `cluster.max_failures` (its v2 failure policy
retries every worker error) and the driver reports it as FAILED.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from atoll.cluster import shards
from atoll.cluster.parallel import all_reduce_sum, even_shard
from atoll.core.cadence import Cadence
from atoll.core.loop import NonFiniteLoss

CKPT_FILE = "state.ckpt"
FAILED_MARK = "atoll-failed.json"  # a deterministic failure, for the driver to report


@dataclass
class WorkerStart:
    """What every worker function sets up the same way before its own training."""

    spec: Any
    rank: int
    device: torch.device
    data: Any
    layout: Any
    per_rank: int  # this replica's share of the global batch


def quiet_ray_train() -> None:
    """Ray Train logs every `report` with the whole metrics dict at INFO, from every rank,
    and the driver echoes it (`Reporting training result …`): chatter for the run's log
    files, not the console. Its logger is named by its file path, not `ray.train`."""
    try:
        from ray.train.v2._internal.execution import context
    except ImportError:  # another Ray layout: nothing to quieten
        return
    logging.getLogger(context.__file__).setLevel(logging.WARNING)
    logging.getLogger("ray.train").setLevel(logging.WARNING)  # "Checkpoint created at …"


def start_worker(config: dict[str, Any]) -> WorkerStart:
    """Re-validate the spec, pin threads and device, record the rank, load the data and
    build the model (same seed on every rank) in its parallel layout."""
    import ray.train

    from atoll.cluster.parallel import build
    from atoll.core.components import autocast_dtype, seed_everything
    from atoll.core.data import load_data
    from atoll.core.spec import validate
    from atoll.models import build_model
    from atoll.models.stages import stage_names

    quiet_ray_train()
    spec = validate(config["spec"])
    ctx = ray.train.get_context()
    rank = ctx.get_world_rank()
    device = torch.device("cuda", ctx.get_local_rank()) if spec.cluster.use_gpu \
        else torch.device("cpu")
    torch.set_num_threads(spec.cluster.cpus_per_worker)
    record_worker(Path(config["run_dir"]), rank)
    seed_everything(spec.seed)
    if "stream" in config:  # shards of the driver's Ray Data splits, and its statistics
        from atoll.cluster.streaming import on_worker

        info = config["stream"]
        data = on_worker(info, {s: ray.train.get_dataset_shard(s) for s in ("train", "val")
                                if info[s]["rows"]})
    else:
        data = load_data(spec.data, spec.seed, spec.project_dir, spec.task)
    torch.manual_seed(spec.seed)  # every rank starts from the same weights

    def make() -> torch.nn.Module:  # FSDP2 calls it on the meta device (parallel.build)
        return build_model(spec.model, data.input_shape, data.num_classes, spec.project_dir,
                           data.embedded)

    dp, pp = spec.cluster.mesh()
    per_rank = spec.data.batch_size // dp
    pipelined = spec.cluster.strategy in ("pipeline", "hybrid")
    model = make().to(device) if pipelined else make  # stages are cut from the whole model
    layout = build(spec.cluster.strategy, model, device, compile=spec.train.compile,
                   precision=autocast_dtype(spec, device), stages=pp,
                   schedule=spec.cluster.schedule, microbatches=spec.cluster.microbatches,
                   batch=per_rank,
                   block_names=stage_names(spec.model, model) if pipelined else None)
    return WorkerStart(spec, rank, device, data, layout, per_rank)


def train_loop_per_worker(config: dict[str, Any]) -> None:
    import ray.train

    from atoll.core.checkpoint import load, save
    from atoll.core.components import build_components, checkpoint_payload
    from atoll.core.loop import TrainState, train_task

    w = start_worker(config)
    spec, rank, device, data, layout, per_rank = (w.spec, w.rank, w.device, w.data, w.layout,
                                                  w.per_rank)
    train, val = batches(spec, data, layout, per_rank, device)
    c = build_components(spec, data, len(train), device=device, model=layout.model)
    if rank != 0:  # one epoch line per epoch, not one per rank
        c.cfg.progress = "off"
    state = TrainState()

    found = newest_checkpoint(ray.train.get_checkpoint(), Path(config["run_dir"]), load)
    if found is not None:
        payload, where = found
        if payload.get("sharded"):  # every rank reads its shards (cluster/shards.py)
            shards.load(where, layout.model, c.optimizer)
        else:
            layout.load_full_state(payload["model"])
        restore_rest(c, state, payload, layout)
        if rank == 0:  # the job's log says a restarted group went on, and from where
            print(f"atoll: the worker group resumed from {where.name} (epoch {state.epoch}"
                  f"{', sharded' if payload.get('sharded') else ''})", file=sys.stderr,
                  flush=True)

    tracker = rank_tracker(spec, config, rank)
    if rank == 0:
        _backfill(tracker, state)
        if state.epoch == 0:
            tracker.log_params({f"cluster.layout.{k}": v for k, v in layout.description.items()}
                               | {"cluster.world_size": layout.dp_size,
                                  "cluster.device": str(device)})

    es = spec.train.early_stopping
    every = Cadence.of(spec.train.checkpoint_every, "cluster", selects_best=bool(
        spec.cluster.checkpoint_metric or (es.patience > 0 and es.restore_best)))

    sharded = spec.cluster.strategy == "fsdp"  # DCP shards, no gather (cluster/shards.py)
    writer = shards.AsyncWriter() if sharded else None
    staging = Path(config["run_dir"]) / ".staging"
    pending: dict[str, Any] = {}  # the sharded checkpoint being written: its epoch's report

    def report(d: Path | None, shown: dict[str, float], epoch: int) -> None:
        """Every rank: the epoch's report, with the checkpoint in `d`; rank 0 logs the
        epoch after the checkpoint is durable — a crash in between is back-filled from
        the checkpoint's history on restart, so no epoch is logged twice."""
        ray.train.report({**shown, "epoch": epoch},
                         checkpoint=ray.train.Checkpoint.from_directory(d) if d else None)
        if rank == 0:
            tracker.log_metrics(shown, step=epoch)
            tracker.wait()

    def settle(wait: bool) -> None:
        """The sharded checkpoint being written, once every rank's files are (`wait`:
        now): sealed, reported, and its staging folder removed."""
        if not pending:
            return
        if not wait:  # ranks finish writing at different times: all of them, or none
            busy = torch.tensor([float(not writer.done())], dtype=torch.float64)
            if all_reduce_sum(busy)[0] > 0:
                return
        d = writer.finish(rank)
        report(d, pending["shown"], pending["epoch"])
        shutil.rmtree(d, ignore_errors=True)
        pending.clear()

    def checkpoint(st: TrainState, shown: dict[str, float]) -> None:
        """Every rank together. Sharded: each rank starts writing its shards into a folder
        of its own (reported once written, see `settle`; Ray Train merges the folders);
        otherwise the state is gathered (a collective) and rank 0 alone writes and
        reports the file."""
        staging.mkdir(parents=True, exist_ok=True)
        if sharded:
            settle(wait=True)
            d = Path(tempfile.mkdtemp(dir=staging))
            writer.start(d, layout.model, c.optimizer)  # copied to host memory: go on
            if rank == 0:  # the rest of the state, as of this epoch (small: written now)
                payload = checkpoint_payload(c, st, model_state={}, run_id=config["run_id"],
                                             spec=saved_spec(config))
                del payload["model"], payload["optimizer"]  # they are in the shards
                payload["sharded"] = {"world": layout.dp_size}
                save(payload, d / CKPT_FILE)
            pending.update(shown=shown, epoch=st.epoch)
            return
        model_state, optim_state = layout.full_state(), layout.full_optim_state(c.optimizer)
        with tempfile.TemporaryDirectory(dir=staging) as d:
            if rank == 0:
                payload = checkpoint_payload(c, st, model_state=model_state,
                                             run_id=config["run_id"], spec=saved_spec(config))
                payload["optimizer"] = optim_state
                save(payload, Path(d) / CKPT_FILE)
            report(Path(d) if rank == 0 else None, shown, st.epoch)

    def on_epoch_end(st: TrainState, metrics: dict[str, float]) -> None:
        settle(wait=False)  # the last checkpoint, if its shards are written by now
        shown = {k: v for k, v in metrics.items() if k != "samples"}
        final = st.epoch >= c.cfg.epochs or st.stopped_early
        due = every.due(st.epoch, final)  # an epoch count: the same on every rank
        if every.unit == "minutes":  # each rank's own clock: rank 0's decides for all
            due = bool(all_reduce_sum(torch.tensor([float(due and rank == 0)],
                                                   dtype=torch.float64))[0])
        if not due:
            # no checkpoint, and no report: Ray Train v2's report waits for its controller's
            # next poll (RAY_TRAIN_HEALTH_CHECK_INTERVAL_S, 2 s), which was most of a small
            # model's epoch. A crash re-trains these epochs (and skips re-logging them).
            if rank == 0:
                tracker.log_metrics(shown, step=st.epoch)
            return
        every.saved()
        checkpoint(st, shown)

    # steps re-trained after a restart are not logged twice: a tracker that joins an
    # existing run skips the (key, step) pairs it already holds
    on_step = (lambda step, m: tracker.log_metrics(m, step=step)) if rank == 0 else None
    with deterministic_failure(Path(config["run_dir"]), rank, tracker):
        try:
            train_task(c.model, train, val, c.optimizer, c.loss_fn, c.cfg, state,
                       data.num_classes, scheduler=c.scheduler, strategy=c.strategy,
                       reduce=layout.reduce, on_step=on_step,
                       on_epoch_end=on_epoch_end, no_sync=layout.no_sync, pipe=layout.pipe)
        except NonFiniteLoss:  # every rank at the same step: the last good one is kept
            settle(wait=True)
            raise
        settle(wait=True)
    if writer is not None:
        writer.close()
    if rank == 0:
        tracker.close()  # the system-metrics monitor's last samples; the driver ends the run


def batches(spec: Any, data: Any, layout: Any, per_rank: int, device: torch.device
            ) -> tuple[Any, Any]:
    """This rank's training and validation batches: slices of the in-memory splits, or its
    Ray Data shards (equal row counts per rank, so every rank runs the same steps)."""
    from atoll.cluster.streaming import StreamBatches, StreamSplit
    from atoll.core.data import Batches, eval_batches

    aug = spec.data.augment if data.is_image else None
    shift, noise = (aug.shift, aug.noise_std) if aug else (0, 0.0)
    if isinstance(data.train, StreamSplit):
        world = layout.dp_size
        train = StreamBatches(data.train.dataset, len(data.train) // world, per_rank,
                              shuffle=True, seed=spec.seed, pin_memory=device.type == "cuda",
                              shift=shift, noise_std=noise)
        val = None
        if len(data.val) >= world:
            val = StreamBatches(data.val.dataset, len(data.val) // world,
                                spec.data.eval_batch_size, shuffle=False, seed=spec.seed,
                                pin_memory=device.type == "cuda")
        return train, val
    # a pipeline's activation shapes are fixed by its first step: no short last batch
    train = Batches(data.train, per_rank, shuffle=True, seed=spec.seed, rank=layout.dp_rank,
                    world=layout.dp_size, shift=shift, noise_std=noise,
                    drop_last=layout.pipe is not None)
    val_shard = even_shard(data.val, layout.dp_rank, layout.dp_size)
    val = None
    if len(data.val):
        val = Batches(val_shard, per_rank, shuffle=False) if layout.pipe is not None \
            else eval_batches(val_shard, spec.data)
    return train, val


def saved_spec(config: dict[str, Any]) -> dict[str, Any]:
    """The fully resolved spec a checkpoint records (resume compares every field with it);
    workers re-validate the `spec` of only the fields the user set, so model warnings
    about ignored fields stay quiet."""
    return config.get("spec_full") or config["spec"]


@contextmanager
def deterministic_failure(run_dir: Path, rank: int, tracker: Any) -> Iterator[None]:
    """A NonFiniteLoss (all ranks raise it at the same step) ends this worker normally;
    rank 0 leaves the cause for the driver in FAILED_MARK. See the module doc."""
    try:
        yield
    except NonFiniteLoss as e:
        if rank == 0:
            tracker.wait()  # the steps before the NaN are flushed
            (run_dir / FAILED_MARK).write_text(json.dumps(
                {"error": str(e), "epoch": e.epoch, "step": e.step, "value": e.value}))



def newest_checkpoint(ray_ckpt: Any, run_dir: Path, load: Any
                      ) -> tuple[dict[str, Any], Path] | None:
    """Ray's latest registered checkpoint, or a newer one already on disk: its payload and
    its folder (where a sharded checkpoint's shards are; the storage path is a
    filesystem path, so the folder outlives `as_directory`).

    Ray registers a reported checkpoint asynchronously; a worker killed right after a
    report can be restored from the one before, although the newer file is complete (our
    SHA-256-verified payload) and its epoch already logged. Resuming from the newest
    verified file keeps every epoch in MLflow exactly once.
    """
    from atoll.cluster.runner import _checkpoints

    found = None
    if ray_ckpt is not None:
        with ray_ckpt.as_directory() as d:
            payload = load(Path(d) / CKPT_FILE)
            if payload.get("sharded"):
                shards.verify(Path(d), payload["sharded"]["world"])
            found = payload, Path(d)
    on_disk = _checkpoints(run_dir)
    if on_disk and (found is None or on_disk[-1][0] > found[0]["state"]["epoch"]):
        found = on_disk[-1][2], on_disk[-1][1].parent
    return found


def restore_rest(c: Any, state: Any, payload: dict[str, Any], layout: Any) -> None:
    """Optimizer (through the layout), scheduler, strategy, counters and RNGs."""
    from atoll.core.checkpoint import set_rng_state

    if "optimizer" in payload:  # a sharded checkpoint's is in its shards
        layout.load_full_optim_state(c.optimizer, payload["optimizer"])
    c.scheduler.load_state_dict(payload["scheduler"])
    c.strategy.load_state_dict(payload["strategy"])
    state.load_state_dict(payload["state"])
    set_rng_state(payload["rng"])


def record_worker(run_dir: Path, rank: int) -> None:
    """`workers/rank-N.pid` and `.node`: which process and which Ray node hold each rank
    (operators, fault tests, placement checks)."""
    import ray

    d = run_dir / "workers"
    d.mkdir(parents=True, exist_ok=True)
    (d / f"rank-{rank}.pid").write_text(str(os.getpid()))
    (d / f"rank-{rank}.node").write_text(ray.get_runtime_context().get_node_id())


def rank_tracker(spec: Any, config: dict[str, Any], rank: int) -> Any:
    from atoll.tracking import NullTracker, make_tracker

    if rank != 0 or not config.get("run_id"):
        return NullTracker()
    tracking = spec.tracking.model_copy(update={"uri": config["tracking_uri"]})
    return make_tracker(tracking, spec.name, mode="cluster", run_id=config["run_id"],
                        trains=True)


def _backfill(tracker: Any, state: Any) -> None:
    """Log epochs the checkpoint has but MLflow lacks (a worker died between the two)."""
    client = getattr(tracker, "client", None)
    if client is None or not state.history:
        return
    logged = {m.step for m in client.get_metric_history(tracker.run_id, "train_loss")}
    for row in state.history:
        epoch = int(row["epoch"])
        if epoch not in logged:
            tracker.log_metrics({k: v for k, v in row.items() if k not in ("epoch", "samples")},
                                step=epoch)
    tracker.wait()
