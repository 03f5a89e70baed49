"""MLflow tracking behind a small Tracker protocol; the only package that imports mlflow."""

from __future__ import annotations

import logging
import os
from pathlib import Path

# Before mlflow is imported anywhere: no telemetry, bounded HTTP retries (fail fast).
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")

from atoll.core.spec import TrackingSpec  # noqa: E402
from atoll.tracking.base import (  # noqa: E402
    NothingToRegister,
    NullTracker,
    RegisteredModel,
    Selection,
    Tracker,
)
from atoll.tracking.context import run_tags  # noqa: E402
from atoll.tracking.uri import (  # noqa: E402
    TrackingUnauthorized,
    TrackingUnavailable,
    check_reachable,
    default_uri,
    resolve_uri,
)

log = logging.getLogger("atoll.tracking")

__all__ = ["NothingToRegister", "NullTracker", "RegisteredModel", "Selection", "Tracker",
           "TrackingUnauthorized", "TrackingUnavailable", "default_uri", "make_tracker",
           "resolve_uri", "run_status", "run_tag", "run_tags"]


def run_tag(uri: str, run_id: str, key: str) -> str | None:
    """A tag of an existing run; KeyError when the store has no such run."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    try:
        return MlflowClient(uri).get_run(run_id).data.tags.get(key)
    except MlflowException:
        raise KeyError(run_id) from None


def run_status(spec: TrackingSpec, run_id: str) -> str | None:
    """FINISHED/FAILED/KILLED/RUNNING of a run in the spec's store; None when tracking is
    off, the store does not exist (yet) or has no such run. Starts nothing, creates nothing."""
    if not spec.enabled:
        return None
    uri = resolve_uri(spec.uri)
    if uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///"):]).is_file():
        return None
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    try:
        return MlflowClient(uri).get_run(run_id).info.status
    except (MlflowException, OSError):  # no such run, or a server that is not there
        return None


def make_tracker(spec: TrackingSpec, run_name: str, *, mode: str, rank: int = 0,
                 run_id: str | None = None, trains: bool = False) -> Tracker:
    """An MlflowTracker on rank 0 (NullTracker elsewhere or when disabled).

    `trains`: this process runs (or hosts) the training, so its machine's CPU, memory and
    GPU figures go to the run as MLflow system metrics (`tracking.system_metrics`).

    An unreachable store raises TrackingUnavailable before training starts, unless the
    spec asks for `fallback: local`, in which case one warning says where runs go instead.
    """
    if not spec.enabled or rank != 0:
        return NullTracker()
    uri = resolve_uri(spec.uri)
    try:
        check_reachable(uri)
    except TrackingUnavailable as e:
        if spec.fallback != "local" or isinstance(e, TrackingUnauthorized):
            raise
        uri = default_uri()
        log.warning("%s — logging to the local store %s instead", e, uri)
    from atoll.tracking.mlflow_tracker import MlflowTracker

    root = Path(uri[len("sqlite:///"):]).parent / "mlartifacts" if uri.startswith("sqlite") \
        else None
    return MlflowTracker(uri, spec.experiment, run_name, run_id=run_id, artifact_root=root,
                         tags=run_tags(mode),
                         system_metrics=spec.system_metrics_interval
                         if trains and spec.system_metrics else None)
