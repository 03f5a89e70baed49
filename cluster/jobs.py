"""`atoll submit` / `atoll jobs`: Ray's Job Submission API with the spec resolved first.

The spec (with `--set` overrides applied) is validated here, then written into the job's
working directory with the paths a job cannot guess made absolute: the MLflow store (a
sqlite file next to the submitter, unless a server URI is given) and Ray Train's storage.
The entrypoint is the same `atoll run` a user would type.

Against a cluster with Ray's token authentication on, every call here sends the token
configured in RAY_AUTH_TOKEN_PATH / RAY_AUTH_TOKEN (see `cluster.auth`) as an explicit
`Authorization` header. A missing, unreadable or refused token is a `RayAuthError` (one
line, exit 2) raised when the client is made, before a spec file is written or anything
is uploaded. The token never goes into the job (entrypoint, runtime_env, metadata, nor
the uploaded working_dir when its file lies inside it): the job runs with the cluster's
own environment.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import yaml

from atoll.cluster import auth
from atoll.core.spec import ExperimentSpec

# What never goes into a job's working_dir (Ray uploads it to the cluster).
EXCLUDES = [".venv", ".git", "mlruns*", "mlartifacts", ".atoll/data", ".atoll/checkpoints",
            ".atoll/ray_results", "**/__pycache__", ".pytest_cache", "*.ckpt"]
SUBMIT_DIR = Path(".atoll") / "submit"


class JobsUnavailable(RuntimeError):
    """The Ray Job API cannot be reached: one line for the user, never a traceback."""


def client(address: str) -> Any:
    """A Job API client for `address`, authenticated when a token is configured."""
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    headers, found = auth.headers()  # a bad token file fails here, before any request
    try:  # the constructor already asks the server for its version
        return JobSubmissionClient(address, headers=headers or None)
    except ConnectionError:  # Ray's own: "Failed to connect to Ray at address: ..."
        raise JobsUnavailable(
            f"cannot reach the Ray Job API at {address}; start a cluster (ray start --head) "
            "or pass --address (or set RAY_ADDRESS) to its dashboard URL") from None
    except AuthenticationError:  # 401 without a token, 403 with a wrong one
        raise auth.refused(f"the Ray Job API at {address}", found,
                           sent=found is not None) from None


def resolved_for_job(spec: ExperimentSpec) -> ExperimentSpec:
    """Absolute tracking URI and storage path, so the job's cwd does not matter."""
    from atoll.cluster.runner import storage_root
    from atoll.tracking import resolve_uri

    tracking = spec.tracking.model_copy(update={"uri": resolve_uri(spec.tracking.uri)})
    cluster = spec.cluster.model_copy(update={"storage_path": str(storage_root(spec)),
                                              "address": None})
    return spec.model_copy(update={"tracking": tracking, "cluster": cluster})


def submit(spec: ExperimentSpec, address: str, working_dir: Path | None = None,
           entrypoint_cmd: str = "atoll") -> str:
    """Submit `atoll run` of `spec` as a Ray job; returns the submission id."""
    working_dir = (working_dir or Path.cwd()).resolve()
    spec = resolved_for_job(spec)
    c = client(address)  # before writing anything: an unreachable cluster leaves no file
    stamp = time.strftime("%Y%m%d-%H%M%S")
    rel = SUBMIT_DIR / f"{spec.name}-{stamp}.yaml"
    (working_dir / rel).parent.mkdir(parents=True, exist_ok=True)
    (working_dir / rel).write_text(yaml.safe_dump(spec.model_dump(mode="json",
                                                                   exclude_unset=True),
                                                  sort_keys=False))
    deadline = time.monotonic() + 90
    try:
        while True:
            try:
                return c.submit_job(
                    entrypoint=f"{entrypoint_cmd} run {rel.as_posix()}",
                    runtime_env={"working_dir": str(working_dir),
                                 "excludes": EXCLUDES + auth.excludes_for(working_dir),
                                 "env_vars": {"MLFLOW_DISABLE_TELEMETRY": "true"}},
                    metadata={"atoll.name": spec.name, "atoll.mode": spec.mode})
            except RuntimeError as e:  # a head that just started has no job agent yet
                if "No available agent" not in str(e) or time.monotonic() > deadline:
                    raise
                time.sleep(2)
    except BaseException:
        (working_dir / rel).unlink(missing_ok=True)  # the job never got it
        raise


def wait(address: str, job_id: str, timeout: float = 3600, poll: float = 2.0) -> str:
    """Until the job ends; returns its final status name."""
    from ray.job_submission import JobStatus

    c = client(address)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = c.get_job_status(job_id)
        if status in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
            return str(status.value)
        time.sleep(poll)
    raise TimeoutError(f"job {job_id} still running after {timeout:.0f}s")


def listing(address: str) -> list[dict[str, Any]]:
    rows = []
    for j in client(address).list_jobs():
        rows.append({"id": j.submission_id or j.job_id, "status": str(j.status.value),
                     "name": (j.metadata or {}).get("atoll.name", ""),
                     "entrypoint": j.entrypoint})
    return rows


def status(address: str, job_id: str) -> str:
    return str(client(address).get_job_status(job_id).value)


def logs(address: str, job_id: str, follow: bool = False) -> None:
    c = client(address)
    if not follow:
        print(c.get_job_logs(job_id), end="")
        return

    async def tail() -> None:
        async for chunk in c.tail_job_logs(job_id):
            print(chunk, end="", flush=True)

    asyncio.run(tail())


def stop(address: str, job_id: str) -> bool:
    return bool(client(address).stop_job(job_id))
