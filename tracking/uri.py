"""Where runs go: resolve the tracking URI and fail fast when a server is unreachable."""

from __future__ import annotations

import os
import urllib.error
import urllib.request
from pathlib import Path


class TrackingUnavailable(RuntimeError):
    """The tracking store cannot be reached; raised before any training starts."""


def default_uri() -> str:
    """`sqlite:///<cwd>/mlruns.db`, made absolute so Ray jobs and subprocesses agree."""
    return f"sqlite:///{Path('mlruns.db').resolve()}"


def resolve_uri(spec_uri: str | None) -> str:
    uri = os.environ.get("MLFLOW_TRACKING_URI") or spec_uri or default_uri()
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        uri = f"sqlite:///{Path(uri[len('sqlite:///'):]).resolve()}"
    return uri


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
    elif uri.startswith("sqlite:///"):
        parent = Path(uri[len("sqlite:///"):]).parent
        if not parent.is_dir() or not os.access(parent, os.W_OK):
            raise TrackingUnavailable(f"tracking store {uri}: directory {parent} is not writable")
