"""`mode: cluster`: the driver side of a Ray Train run.

Connects to Ray (RAY_ADDRESS / cluster.address, else a local Ray it starts and stops),
creates the job's one MLflow run, hands the spec to `TorchTrainer` (workers re-validate it
and run `cluster/worker.py`), then — from the final checkpoint — evaluates on the test
set and registers the model, exactly as a local run does (`core.runner.finish_run`).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

from core.checkpoint import CheckpointError, load
from core.runner import RunFailed, RunResult, check_resume_compatible, finish_run
from core.spec import ExperimentSpec

log = logging.getLogger("atoll.cluster")

FINISHED = "atoll-finished.json"


def storage_root(spec: ExperimentSpec) -> Path:
    """Where Ray Train keeps checkpoints: ATOLL_STORAGE_PATH (a cluster's shared volume,
    set on its nodes) wins, as RAY_ADDRESS and MLFLOW_TRACKING_URI do."""
    chosen = os.environ.get("ATOLL_STORAGE_PATH") or spec.cluster.storage_path
    return Path(chosen or Path(".atoll") / "ray_results").resolve()


def _checkpoints(run_dir: Path) -> list[tuple[int, Path, dict[str, Any]]]:
    """Valid checkpoints of this run name, oldest epoch first (corrupt ones skipped)."""
    out = []
    for p in run_dir.glob("checkpoint_*/state.ckpt"):
        try:
            payload = load(p)
        except CheckpointError as e:
            log.warning("skipping checkpoint: %s", e)
            continue
        out.append((int(payload["state"]["epoch"]), p, payload))
    return sorted(out, key=lambda t: t[0])


def _prepare(spec: ExperimentSpec, run_dir: Path) -> dict[str, Any] | None:
    """The latest checkpoint of an unfinished run under this name (or start clean)."""
    finished = (run_dir / FINISHED).is_file()
    if finished or not spec.train.resume:
        if run_dir.exists():
            log.info("run %s %s; starting a new run", spec.name,
                     "already finished" if finished else "is not resumed (train.resume)")
            shutil.rmtree(run_dir)
        return None
    found = _checkpoints(run_dir)
    if not found:
        return None
    epoch, path, payload = found[-1]
    check_resume_compatible(payload.get("spec", {}), spec, path)
    log.info("resuming %s from %s (epoch %d)", spec.name, path.parent.name, epoch)
    return payload


def _check_layout(spec: ExperimentSpec, model: Any) -> None:
    """What the spec alone cannot tell: does the model have a block for every stage."""
    _, pp = spec.cluster.mesh()
    blocks = len(list(model.children()))
    if pp > blocks:
        raise ValueError(f"cluster.num_workers: {spec.cluster.num_workers} needs {pp} pipeline "
                         f"stages but {spec.model.name} has {blocks} blocks; allowed: at most "
                         f"{blocks} stages")


def run_cluster(spec: ExperimentSpec) -> RunResult:
    """Train `spec` on Ray Train; returns after the test evaluation and registration."""
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from cluster.continual import continual_loop_per_worker
    from cluster.worker import train_loop_per_worker
    from core.components import build_components, pick_device
    from core.data import load_data
    from core.loop import TrainState
    from tracking import make_tracker, resolve_uri

    t0 = time.perf_counter()
    data = load_data(spec.data, spec.seed)
    comps = build_components(spec, data, 1, device=pick_device(spec))
    _check_layout(spec, comps.model)
    c = spec.cluster
    dp, pp = c.mesh()
    root = storage_root(spec)
    run_dir = root / spec.name
    resumed = _prepare(spec, run_dir)
    tracker = make_tracker(spec.tracking, spec.name, mode="cluster",
                           run_id=resumed.get("run_id") if resumed else None)
    if resumed is None:
        tracker.log_params(spec.flat())
        tracker.log_text(spec.to_yaml(), "spec.yaml")
        tracker.log_params({"cluster.global_batch": spec.data.batch_size,
                            "cluster.per_rank_batch": spec.data.batch_size // dp,
                            "cluster.dp": dp, "cluster.pp": pp,
                            "cluster.backend": "nccl" if c.use_gpu else "gloo"})
    tracker.flush()
    tracker.set_tags({"atoll.run_dir": str(run_dir)})
    address = os.environ.get("RAY_ADDRESS") or c.address
    # Connect (or start a local Ray) only if the caller has not; disconnect when done, or
    # this process stays a driver of that cluster and Ray ends it when the cluster stops.
    connected = False
    if not ray.is_initialized():
        if address:
            ray.init(address=address, log_to_driver=True)
        else:
            ray.init(num_cpus=max(os.cpu_count() or 1, c.num_workers * c.cpus_per_worker),
                     include_dashboard=True, dashboard_host="127.0.0.1")
        connected = True
    config = {"spec": spec.model_dump(mode="json", exclude_unset=True), "run_id": tracker.run_id,
              "tracking_uri": resolve_uri(spec.tracking.uri) if spec.tracking.enabled else None,
              "run_dir": str(run_dir)}
    keep = CheckpointConfig(num_to_keep=spec.train.keep_checkpoints,
                            checkpoint_score_attribute=c.checkpoint_metric,
                            checkpoint_score_order=c.checkpoint_mode) if c.checkpoint_metric \
        else CheckpointConfig(num_to_keep=spec.train.keep_checkpoints)
    stream = spec.continual.stream != "none"
    trainer = TorchTrainer(
        continual_loop_per_worker if stream else train_loop_per_worker,
        train_loop_config=config,
        torch_config=TorchConfig(backend="nccl" if c.use_gpu else "gloo"),
        scaling_config=ScalingConfig(
            num_workers=c.num_workers, use_gpu=c.use_gpu,
            resources_per_worker={"CPU": c.cpus_per_worker, **({"GPU": 1} if c.use_gpu else {})},
            placement_strategy=c.placement),
        run_config=RunConfig(name=spec.name, storage_path=str(root),
                             failure_config=FailureConfig(max_failures=c.max_failures),
                             checkpoint_config=keep))
    try:
        result = trainer.fit()
    except Exception as e:
        tracker.set_tags({"atoll.failure": str(e)[:5000]})
        tracker.finish("FAILED")
        raise RunFailed(f"cluster training failed: {e}; checkpoints kept in {run_dir}") from e
    finally:
        if connected:
            ray.shutdown()
    if result.error is not None:
        tracker.finish("FAILED")
        raise RunFailed(f"cluster training failed: {result.error}; checkpoints in {run_dir}")
    found = _checkpoints(run_dir)
    if not found:
        tracker.finish("FAILED")
        raise RunFailed(f"cluster training produced no checkpoint in {run_dir}")
    _, path, payload = found[-1]
    comps.model.load_state_dict(payload["model"])
    if stream:
        from continual.streams import build_stream
        from core.continual_runner import finish_stream

        out = finish_stream(spec, data, comps.model, build_stream(data, spec.continual, spec.seed),
                            payload["r"], payload["baseline"], payload["history"], tracker, path,
                            t0)
        epoch = int(payload["state"]["epoch"])
    else:
        state = TrainState()
        state.load_state_dict(payload["state"])
        out = finish_run(spec, data, comps, state, tracker, path, t0)
        epoch = state.epoch
    (run_dir / FINISHED).write_text(json.dumps({"run_id": out.run_id, "epoch": epoch}))
    out.parameters = sum(p.numel() for p in comps.model.parameters())
    out.train_seconds = out.seconds
    return out
