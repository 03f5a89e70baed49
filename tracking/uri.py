"""Where runs go: resolve the tracking URI and fail fast when a server is unreachable."""

from __future__ import annotations

import os
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

from atoll.core.spec import SpecError, check_tracking_uri


class TrackingUnavailable(RuntimeError):
    """The tracking store cannot be reached; raised before any training starts."""


class TrackingUnauthorized(TrackingUnavailable):
    """The server answers but refuses our credentials: a configuration error, never a
    reason to fall back to the local store."""


def default_uri() -> str:
    """`sqlite:///<cwd>/mlruns.db`, made absolute so Ray jobs and subprocesses agree."""
    return f"sqlite:///{Path('mlruns.db').resolve()}"


def resolve_uri(spec_uri: str | None) -> str:
    """The store runs go to; ValueError (exit 2) when MLFLOW_TRACKING_URI is not a URI
    MLflow can track to (the spec's own `tracking.uri` was checked on validation)."""
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        try:
            check_tracking_uri(env)
        except ValueError as e:
            raise ValueError(f"MLFLOW_TRACKING_URI: {env!r} is not valid; {e}") from None
    uri = env or spec_uri or default_uri()
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        uri = f"sqlite:///{Path(uri[len('sqlite:///'):]).resolve()}"
    return uri


def _check_credentials(uri: str, timeout: float) -> None:
    """A server with auth (`mlflow server --app-name basic-auth`) refuses requests without
    valid MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD: say so before training."""
    import base64

    req = urllib.request.Request(
        uri.rstrip("/") + "/api/2.0/mlflow/experiments/search?max_results=1")
    user, password = (os.environ.get("MLFLOW_TRACKING_USERNAME"),
                      os.environ.get("MLFLOW_TRACKING_PASSWORD"))
    if user and password:
        token = base64.b64encode(f"{user}:{password}".encode()).decode()
        req.add_header("Authorization", f"Basic {token}")
    try:
        urllib.request.urlopen(req, timeout=timeout).close()
    except urllib.error.HTTPError as e:
        if e.code in (401, 403):
            who = f"user {user!r}" if user else "no credentials"
            raise TrackingUnauthorized(
                f"tracking server {uri} refused the request with {who} ({e.code}); set "
                "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD") from None
    except (urllib.error.URLError, OSError, TimeoutError):
        pass  # reachability was checked just before; the real request will tell


def check_reachable(uri: str, timeout: float = 5.0) -> None:
    """Probe an HTTP server's /health (or a sqlite file's directory) once, quickly."""
    if uri.startswith(("http://", "https://")):
        url = uri.rstrip("/") + "/health"
        try:
            with urllib.request.urlopen(url, timeout=timeout) as resp:
                if resp.status >= 500:
                    raise TrackingUnavailable(f"tracking server {uri} answered {resp.status}")
        except urllib.error.HTTPError as e:
            if e.code >= 500:
                raise TrackingUnavailable(f"tracking server {uri} answered {e.code}") from None
        except (urllib.error.URLError, OSError, TimeoutError) as e:
            reason = getattr(e, "reason", e)
            raise TrackingUnavailable(
                f"tracking server {uri} is unreachable ({reason}); start it, fix "
                "tracking.uri / MLFLOW_TRACKING_URI, or set tracking.fallback: local") from None
        _check_credentials(uri, timeout)
    elif uri.startswith("sqlite:///"):
        check_local_store(Path(uri[len("sqlite:///"):]))


def check_local_store(db: Path) -> None:
    """A sqlite store's directory and the artifact root beside it must take files: a
    configuration the user fixes, so a refusal (exit 2) before training, not a fallback."""
    field = "MLFLOW_TRACKING_URI" if os.environ.get("MLFLOW_TRACKING_URI") else "tracking.uri"
    if not db.parent.is_dir():
        raise SpecError([f"{field}: sqlite:///{db}: directory {db.parent} does not exist; "
                         "allowed: a store in an existing directory (create it first)"])
    for where in (db.parent, db.parent / "mlartifacts"):
        problem = where.is_dir() and unwritable(where)
        if problem:
            raise SpecError([f"{field}: sqlite:///{db}: cannot write to {where} ({problem}); "
                             "allowed: a directory this user can create files in"])


def unwritable(directory: Path) -> str | None:
    """Why files cannot be created in an existing `directory`, or None if they can.

    A real probe file, not os.access: root passes os.access on a read-only mount.
    """
    try:
        with tempfile.TemporaryFile(dir=directory, prefix=".atoll-probe-"):
            return None
    except OSError as e:
        return e.strerror or str(e)
