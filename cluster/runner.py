"""`mode: cluster`: the driver side of a Ray Train run.

Connects to Ray (RAY_ADDRESS / cluster.address, else a local Ray it starts in a temp dir
of its own and removes at exit), creates the job's one MLflow run, hands the spec to
`TorchTrainer` (workers re-validate it and run `cluster/worker.py`), then evaluates the
selected checkpoint on the test set and registers it, exactly as a local run does
(`core.runner.finish_run`). The selected checkpoint is the best by
`cluster.checkpoint_metric`, else the early-stopping best (`restore_best`), else the newest.

Outcomes: FINISHED; FAILED (RunFailed: one line with the cause and the last good
checkpoint; a non-finite loss is never retried); KILLED on Ctrl-C (RunInterrupted says
how to resume); refused before start (SpecError) for a resume whose settings changed or,
inside a Ray job, for stores that would land in the job's throw-away working directory;
refused before an MLflow run begins (RayAuthError, one line) by a cluster whose token
authentication would refuse this driver (the token: RAY_AUTH_TOKEN_PATH / RAY_AUTH_TOKEN,
see `cluster.auth`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from atoll.cluster import shards, streaming
from atoll.cluster.worker import FAILED_MARK
from atoll.continual.streams import check_stream
from atoll.core.checkpoint import CheckpointError, load
from atoll.core.components import build_components, pick_device
from atoll.core.data import load_data
from atoll.core.runner import RunFailed, RunResult, check_resume_compatible, finish_run
from atoll.core.spec import ExperimentSpec, SpecError
from atoll.models import model_class
from atoll.models.stages import model_blocks, stage_names
from atoll.tracking.base import Selection

log = logging.getLogger("atoll.cluster")

FINISHED = "atoll-finished.json"
# Ray's job supervisor gives an entrypoint its job config (with the submission id) here.
RAY_JOB_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"


class RunInterrupted(KeyboardInterrupt):
    """Ctrl-C: the MLflow run ended KILLED; the message says how to resume."""


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
            if payload.get("sharded"):  # every rank's shards there and intact
                shards.verify(p.parent, payload["sharded"]["world"])
        except CheckpointError as e:
            log.warning("skipping checkpoint: %s", e)
            continue
        out.append((int(payload["state"]["epoch"]), p, payload))
    return sorted(out, key=lambda t: t[0])


def ray_job_id() -> str | None:
    """The Ray job this process is the entrypoint of, if any."""
    raw = os.environ.get(RAY_JOB_ENV)
    if not raw:
        return None
    try:
        return str(json.loads(raw).get("metadata", {}).get("job_submission_id") or "?")
    except (ValueError, AttributeError):
        return "?"


def _relative_store(uri: str | None) -> bool:
    """Would this tracking URI put the store under the current directory?"""
    if uri is None:
        return True  # the default, ./mlruns.db
    if uri.startswith("sqlite:///"):
        return not uri.startswith("sqlite:////")
    if uri.startswith("file:"):
        return not uri.removeprefix("file:").removeprefix("//").startswith("/")
    return "://" not in uri and not Path(uri).is_absolute()


def check_job_paths(spec: ExperimentSpec) -> None:
    """Inside a plain `ray job submit`, the cwd is the job's unpacked working_dir in Ray's
    session folder, which Ray deletes: a relative store would vanish with it. Refuse
    before anything starts (`atoll submit` makes both paths absolute itself)."""
    job = ray_job_id()
    if job is None:
        return
    where = (f"inside Ray job {job} it resolves into the job's working directory "
             f"({Path.cwd()}), which Ray deletes after the job")
    problems = []
    storage = os.environ.get("ATOLL_STORAGE_PATH") or spec.cluster.storage_path
    if storage is None or not Path(storage).is_absolute():
        problems.append(f"cluster.storage_path: {storage!r} is relative; {where}; allowed: an "
                        "absolute path on storage every node shares, as cluster.storage_path "
                        "or ATOLL_STORAGE_PATH")
    uri = os.environ.get("MLFLOW_TRACKING_URI") or spec.tracking.uri
    if spec.tracking.enabled and _relative_store(uri):
        problems.append(f"tracking.uri: {uri!r} is a relative store; {where}; allowed: "
                        "sqlite:////absolute/path.db or a tracking server, as tracking.uri "
                        "or MLFLOW_TRACKING_URI")
    if problems:
        raise SpecError(problems)


def _resolved(spec: ExperimentSpec, root: Path) -> ExperimentSpec:
    """The spec with its storage made absolute: what a checkpoint records and a resume is
    compared with (`atoll submit` and `atoll run` of one spec then agree)."""
    return spec.model_copy(update={"cluster": spec.cluster.model_copy(
        update={"storage_path": str(root)})})


def _prepare(spec: ExperimentSpec, run_dir: Path, restart: bool) -> dict[str, Any] | None:
    """The latest checkpoint of an unfinished run under this name, or None to start anew.

    The name's storage is cleared only when its run finished (the marker, written after
    registration) or on `--restart`; an unfinished run's checkpoints are never deleted
    otherwise (train.resume: false, or fewer epochs than it trained, is refused).
    """
    finished = (run_dir / FINISHED).is_file()
    if finished or restart:
        if run_dir.exists():
            log.info("run %s %s; starting a new run", spec.name,
                     "already finished" if finished else "is discarded (--restart)")
            shutil.rmtree(run_dir)
        return None
    found = _checkpoints(run_dir)
    if not found:
        return None
    epoch, path, payload = found[-1]
    if not spec.train.resume:
        raise SpecError([f"train.resume: false, but run {spec.name!r} has an unfinished "
                         f"checkpoint in {run_dir}; allowed: atoll run --restart to discard "
                         "it, train.resume: true to continue it, or another name"])
    if epoch > spec.train.epochs and not payload["state"].get("stopped_early"):
        raise SpecError([f"train.epochs: {spec.train.epochs} is fewer than the {epoch} epochs "
                         f"run {spec.name!r} has already trained ({path.parent}); allowed: >= "
                         f"{epoch}, or atoll run --restart to discard its checkpoints"])
    check_resume_compatible(payload.get("spec", {}), _resolved(spec, run_dir.parent), path)
    log.info("resuming %s from %s (epoch %d)", spec.name, path.parent.name, epoch)
    return payload


def _check_layout(spec: ExperimentSpec, model: Any) -> None:
    """What the spec alone cannot tell: can the model be cut into a block per stage (an
    nn.Sequential, or declared `model.stages`; build_components already checked that
    those compose to its forward)."""
    if spec.cluster.strategy not in ("pipeline", "hybrid"):
        return
    _, pp = spec.cluster.mesh()
    label = repr(spec.model.label)
    blocks = model_blocks(model, stage_names(spec.model, model), label)
    if pp > len(blocks):
        raise ValueError(f"cluster.num_workers: {spec.cluster.num_workers} needs {pp} pipeline "
                         f"stages but model {label} has {len(blocks)} blocks; allowed: at "
                         f"most {len(blocks)} stages")


def _last_good(run_dir: Path) -> str:
    found = _checkpoints(run_dir)
    if not found:
        return f"no checkpoint was written yet (storage {run_dir})"
    epoch, path, _ = found[-1]
    return f"last good checkpoint: {path.parent} (epoch {epoch})"


def _one_line(e: BaseException) -> str:
    """The exception line of a (possibly remote, multi-line) error."""
    lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()]
    return (lines[-1] if lines else type(e).__name__)[:500]


def select_checkpoint(spec: ExperimentSpec, found: list[tuple[int, Path, dict[str, Any]]]
                      ) -> tuple[tuple[int, Path, dict[str, Any]], Selection | None]:
    """The checkpoint to test and register, and the Selection that chose it (None: the
    newest, which `finish_run` describes itself).

    `cluster.checkpoint_metric` picks the best checkpoint by its epoch's value; otherwise,
    with early stopping on and `restore_best`, the epoch early stopping found best;
    otherwise the newest. Ray keeps the checkpoints these need (see `_run`).
    """
    es = spec.train.early_stopping
    newest = found[-1]
    metric, mode = spec.cluster.checkpoint_metric, spec.cluster.checkpoint_mode
    if metric is None and es.patience > 0 and es.restore_best:
        state = newest[2]["state"]
        for item in found:
            if item[0] == state.get("best_epoch", -1):
                return item, Selection(es.metric, state["best_metric"], item[0], "epoch", "best")
        metric, mode = es.metric, es.mode
        log.warning("the early-stopping best epoch %s has no checkpoint left; choosing the "
                    "best kept one by %s", state.get("best_epoch"), metric)
    if metric is None:
        return newest, None
    scored = [(item, (item[2]["state"].get("history") or [{}])[-1].get(metric))
              for item in found]
    scored = [(item, v) for item, v in scored if v is not None]
    if not scored:
        log.warning("no checkpoint has %s; using the newest", metric)
        return newest, None
    pick = max if mode == "max" else min
    item, value = pick(scored, key=lambda t: t[1])  # the earliest of equals
    return item, Selection(metric, value, item[0], "epoch", "best")


def _interruptible(trainer_cls: type) -> type:
    """`trainer_cls` whose Ctrl-C aborts the run and raises KeyboardInterrupt here.

    Ray Train's own SIGINT handler aborts the controller and then `sys.exit(0)`s from
    inside the handler, so the driver never learns why it stopped (the MLflow run stayed
    RUNNING, exit 1, no message). This one aborts the same way, then raises.
    """
    import ray

    class Interruptible(trainer_cls):  # type: ignore[misc,valid-type]
        def _register_sigint_handler(self, controller: Any) -> None:
            def handler(signum: int, frame: Any) -> None:
                signal.signal(signal.SIGINT, signal.default_int_handler)  # 2nd: at once
                with contextlib.suppress(Exception):  # the controller exits as it aborts
                    ray.get(controller.abort.remote(), timeout=60)
                raise KeyboardInterrupt

            signal.signal(signal.SIGINT, handler)

    return Interruptible


@contextlib.contextmanager
def _sigint_restored() -> Iterator[None]:
    """Put back the caller's SIGINT handler: Ray's (or ours) refers to a dead controller."""
    main = threading.current_thread() is threading.main_thread()
    previous = signal.getsignal(signal.SIGINT) if main else None
    try:
        yield
    finally:
        if main and previous is not None:
            signal.signal(signal.SIGINT, previous)


@contextlib.contextmanager
def _ray_connection(address: str | None, cpus: int) -> Iterator[None]:
    """Connect to `address`, or start a private local Ray whose session folder lives in a
    temp dir of its own and is removed at exit (not left to pile up in /tmp/ray). A
    caller that is already connected keeps its connection."""
    import ray

    if ray.is_initialized():
        yield
        return
    temp = None
    # the CLI lowers the "ray" logger unless -v; ray.init would reset it to INFO
    level = logging.getLogger("ray").getEffectiveLevel()
    if address:
        _connect(address, level)
    else:
        temp = tempfile.mkdtemp(prefix="atoll-ray-")  # short: Ray's socket paths
        # the dashboard's modules get 30 s to start by default, which a loaded 2-core
        # machine can exceed (seen: MetricsHead), and then ray.init fails
        os.environ.setdefault("RAY_DASHBOARD_SUBPROCESS_MODULE_WAIT_READY_TIMEOUT", "180")
        ray.init(num_cpus=cpus, include_dashboard=True, dashboard_host="127.0.0.1",
                 _temp_dir=temp, logging_level=level)
    try:
        yield
    finally:
        # disconnect, or this process stays a driver of that cluster and Ray ends it
        # when the cluster stops
        ray.shutdown()
        if temp is not None:
            shutil.rmtree(temp, ignore_errors=True)


def _sent_token() -> tuple[Any, Any]:
    """(the configured token, what Ray in this process will send: it, or None)."""
    from ray._raylet import AuthenticationMode, get_authentication_mode

    from atoll.cluster import auth

    found = auth.token()  # a bad token file fails here, in one line
    return found, found if get_authentication_mode() == AuthenticationMode.TOKEN else None


def _check_auth(address: str) -> None:
    """A cluster with Ray's token authentication that would refuse this driver is one line
    naming the variable to set (`cluster.auth.RayAuthError`, exit 2), before an MLflow run
    begins. Ray's driver says only "Failed to connect" after ~20 s of warnings, so the
    cluster is asked first, with exactly what Ray will send (`auth.check_cluster`).

    Ray sends the token itself when RAY_AUTH_MODE=token was set before ray was imported:
    importing `cluster` sets it for a token in RAY_AUTH_TOKEN(_PATH) (`cluster.auth`).
    """
    from atoll.cluster import auth

    found, sent = _sent_token()
    auth.check_cluster(address, sent, found)


def _check_store(spec: ExperimentSpec, address: str) -> None:
    """Rank 0 writes the epochs into MLflow from wherever Ray placed it. A store that is a
    file (sqlite, `file:`) lives on this node only: on a cluster of more than one node it
    is refused (exit 2) before a run begins, naming MLFLOW_TRACKING_URI. (sqlite over a
    shared filesystem is no way out: two nodes writing one sqlite file over NFS corrupt it.)
    """
    from atoll.cluster import auth
    from atoll.tracking import resolve_uri

    if not spec.tracking.enabled:
        return
    uri = resolve_uri(spec.tracking.uri)
    if uri.startswith(("http://", "https://", "databricks", "postgresql", "mysql", "mssql")):
        return
    nodes = auth.alive_nodes(address, _sent_token()[1])
    if nodes is not None and nodes > 1:
        raise SpecError([f"tracking.uri: {uri} is a file on this node, and the Ray cluster at "
                         f"{address} has {nodes} nodes: rank 0 may train on another one; set "
                         "MLFLOW_TRACKING_URI (or tracking.uri) to an MLflow server every "
                         "node reaches (http://HOST:PORT)"])


def _connect(address: str, level: int) -> None:
    """`ray.init(address)`; Ray's AuthenticationError becomes the one-line RayAuthError."""
    import ray
    from ray.exceptions import AuthenticationError

    from atoll.cluster import auth

    try:
        ray.init(address=address, log_to_driver=True, logging_level=level)
    except AuthenticationError:
        found, sent = _sent_token()
        raise auth.refused(f"the Ray cluster at {address}", found,
                           sent=sent is not None) from None


def run_cluster(spec: ExperimentSpec, restart: bool = False) -> RunResult:
    """Train `spec` on Ray Train; returns after the test evaluation and registration.
    `restart` (`atoll run --restart`) discards an unfinished run's checkpoints first."""
    check_job_paths(spec)
    if not streaming.wanted(spec):
        return _driver(spec, restart, None)
    # streamed data is read by Ray Data: connected from the first pass over it to the test
    # split's evaluation at the end
    address = os.environ.get("RAY_ADDRESS") or spec.cluster.address
    if address:
        _check_auth(address)
        _check_store(spec, address)
    with _ray_connection(address, _cpus(spec)):
        return _driver(spec, restart, streaming.prepare(spec))


def _cpus(spec: ExperimentSpec) -> int:
    """CPUs of a local Ray this driver starts: the machine's, or what the workers ask."""
    return max(os.cpu_count() or 1, spec.cluster.num_workers * spec.cluster.cpus_per_worker)


def _driver(spec: ExperimentSpec, restart: bool, data: Any) -> RunResult:
    """`run_cluster` with the data read (`data` None: loaded whole here)."""
    from atoll.tracking import make_tracker

    t0 = time.perf_counter()
    # what the spec alone cannot tell is refused before an MLflow run or Ray exists
    if data is None:
        data = load_data(spec.data, spec.seed, spec.project_dir, spec.task)
    comps = build_components(spec, data, 1, device=pick_device(spec))
    _check_layout(spec, comps.model)
    check_stream(data, spec.continual)
    root = storage_root(spec)
    run_dir = root / spec.name
    resumed = _prepare(spec, run_dir, restart)
    address = os.environ.get("RAY_ADDRESS") or spec.cluster.address
    streamed = isinstance(data.train, streaming.StreamSplit)
    if address and not streamed:  # a cluster that refuses us (token authentication) is
        _check_auth(address)  # told before a run (a streamed one was, before it connected)
    if address and not streamed:
        _check_store(spec, address)
    tracker = make_tracker(spec.tracking, spec.name, mode="cluster",
                           run_id=resumed.get("run_id") if resumed else None)
    try:
        return _run(spec, root, run_dir, resumed, tracker, t0, data, comps)
    except KeyboardInterrupt:
        with contextlib.suppress(Exception):
            tracker.finish("KILLED")
        found = _checkpoints(run_dir)
        # the CLI prints "atoll: interrupted; <this>"
        raise RunInterrupted(
            f"re-run the same name ({spec.name}) to resume from epoch {found[-1][0]} "
            f"({found[-1][1].parent})" if found else
            "no epoch was checkpointed; re-running the same name starts over") from None


def _run(spec: ExperimentSpec, root: Path, run_dir: Path, resumed: dict[str, Any] | None,
         tracker: Any, t0: float, data: Any, comps: Any) -> RunResult:
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from atoll.cluster.continual import continual_loop_per_worker
    from atoll.cluster.worker import train_loop_per_worker
    from atoll.core.loop import TrainState
    from atoll.tracking import resolve_uri

    c = spec.cluster
    dp, pp = c.mesh()
    streamed = isinstance(data.train, streaming.StreamSplit)
    if resumed is None:
        tracker.log_params(spec.flat())
        tracker.log_text(spec.to_yaml(), "spec.yaml")
        tracker.log_params({"cluster.global_batch": spec.data.batch_size,
                            "cluster.per_rank_batch": spec.data.batch_size // dp,
                            "cluster.dp": dp, "cluster.pp": pp,
                            "cluster.backend": "nccl" if c.use_gpu else "gloo",
                            "model.class": model_class(comps.model),
                            "data.task": data.task, "data.streamed": streamed})
    tracker.flush()
    tracker.set_tags({"atoll.run_dir": str(run_dir)})
    (run_dir / FAILED_MARK).unlink(missing_ok=True)
    # workers re-validate only the fields the user set (model warnings stay quiet);
    # checkpoints record the full resolved spec, which a resume is compared with
    config = {"spec": spec.model_dump(mode="json", exclude_unset=True),
              "spec_full": _resolved(spec, root).model_dump(mode="json"),
              "run_id": tracker.run_id,
              "tracking_uri": resolve_uri(spec.tracking.uri) if spec.tracking.enabled else None,
              "run_dir": str(run_dir)}
    datasets = None
    if streamed:  # Ray Train shards these over the workers (DataConfig: equal splits)
        config["stream"] = streaming.describe(data)
        datasets = {s: getattr(data, s).dataset for s in ("train", "val")
                    if len(getattr(data, s))}
    # Ray keeps the newest checkpoint plus the best `keep_checkpoints` by this score, so
    # the one `select_checkpoint` wants is still on disk at the end
    es = spec.train.early_stopping
    score, order = c.checkpoint_metric, c.checkpoint_mode
    if score is None and es.patience > 0 and es.restore_best:
        score, order = es.metric, es.mode
    keep = CheckpointConfig(num_to_keep=spec.train.keep_checkpoints,
                            checkpoint_score_attribute=score,
                            checkpoint_score_order=order) if score \
        else CheckpointConfig(num_to_keep=spec.train.keep_checkpoints)
    stream = spec.continual.stream != "none"
    trainer = _interruptible(TorchTrainer)(
        continual_loop_per_worker if stream else train_loop_per_worker,
        train_loop_config=config, datasets=datasets,
        torch_config=TorchConfig(backend="nccl" if c.use_gpu else "gloo"),
        scaling_config=ScalingConfig(
            num_workers=c.num_workers, use_gpu=c.use_gpu,
            resources_per_worker={"CPU": c.cpus_per_worker, **({"GPU": 1} if c.use_gpu else {})},
            placement_strategy=c.placement),
        run_config=RunConfig(name=spec.name, storage_path=str(root),
                             failure_config=FailureConfig(max_failures=c.max_failures),
                             checkpoint_config=keep))
    address = os.environ.get("RAY_ADDRESS") or c.address
    with _ray_connection(address, _cpus(spec)), _sigint_restored():
        try:
            result = trainer.fit()
        except Exception as e:
            tracker.set_tags({"atoll.failure": str(e)[:5000]})
            tracker.finish("FAILED")
            raise RunFailed(f"cluster training failed: {_one_line(e)}; {_last_good(run_dir)}"
                            ) from e
    mark = run_dir / FAILED_MARK
    if result.error is not None or mark.is_file():
        cause = json.loads(mark.read_text())["error"] if mark.is_file() \
            else _one_line(result.error)
        tracker.set_tags({"atoll.failure": cause[:5000]})
        tracker.finish("FAILED")
        raise RunFailed(f"{cause}; {_last_good(run_dir)}")
    found = _checkpoints(run_dir)
    if not found:
        tracker.finish("FAILED")
        raise RunFailed(f"cluster training produced no checkpoint in {run_dir}")
    # a task stream's checkpoints are per task, not per scored epoch: the newest
    (epoch, path, payload), chosen = (found[-1], None) if stream \
        else select_checkpoint(spec, found)
    comps.model.load_state_dict(shards.consolidate(path.parent, comps.model)
                                if payload.get("sharded") else payload["model"])
    tracker.set_tags({"atoll.selected_checkpoint": str(path.parent)})
    newest = found[-1][2]
    if stream:
        from atoll.continual.streams import build_stream
        from atoll.core.continual_runner import finish_stream

        out = finish_stream(spec, data, comps.model, build_stream(data, spec.continual, spec.seed),
                            newest["r"], newest["baseline"], newest["history"], tracker, path,
                            t0)
        trained = int(newest["state"]["epoch"])
    else:
        state = TrainState()
        state.load_state_dict(newest["state"])  # every epoch's history; weights: `path`
        # the Selection says which epoch's weights are tested and registered, and why
        out = finish_run(spec, data, comps, state, tracker, path, t0, selected=chosen)
        trained = state.epoch
    (run_dir / FINISHED).write_text(json.dumps({"run_id": out.run_id, "epoch": trained}))
    out.parameters = sum(p.numel() for p in comps.model.parameters())
    out.train_seconds = out.seconds
    return out
