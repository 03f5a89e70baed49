"""A real MLflow tracking server as deployed: a database backend (PostgreSQL from the
machine's Debian packages when it has them, else sqlite), `--app-name basic-auth`,
artifacts served through the server. Credentials come from MLFLOW_TRACKING_USERNAME /
MLFLOW_TRACKING_PASSWORD only; unauthenticated and wrongly authenticated writes are
refused; a run with the right credentials lands with its registered model, and the
password appears in no param, artifact or log line. Every server is stopped by its pid.
"""

from __future__ import annotations

import base64
import glob
import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from atoll.core.runner import run_local
from atoll.tracking import TrackingUnauthorized
from tests.integration import procs

pytestmark = pytest.mark.integration

ADMIN = "admin"


def _initdb() -> Path | None:
    found = shutil.which("initdb") or next(iter(sorted(
        glob.glob("/usr/lib/postgresql/*/bin/initdb"), reverse=True)), None)
    try:
        import psycopg2  # noqa: F401  # MLflow's PostgreSQL driver
    except ImportError:
        return None
    return Path(found) if found else None


def _as_postgres_user(cmd: list[str]) -> list[str]:
    """PostgreSQL refuses to run as root: drop to the `postgres` account when we are root."""
    return ["runuser", "-u", "postgres", "--", *cmd] if os.geteuid() == 0 else cmd


def _wait_port(port: int, proc: subprocess.Popen, log: Path, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(log.read_text(errors="replace")[-3000:])
        try:
            socket.create_connection(("127.0.0.1", port), 1).close()
            return
        except OSError:
            time.sleep(0.2)
    raise TimeoutError(log.read_text(errors="replace")[-3000:])


@pytest.fixture(scope="module")
def database(tmp_path_factory):
    """(backend store URI, kind): a private PostgreSQL cluster on 127.0.0.1, or sqlite."""
    initdb = _initdb()
    if initdb is None:
        yield f"sqlite:///{tmp_path_factory.mktemp('db') / 'mlflow.db'}", "sqlite"
        return
    bin_dir = initdb.parent
    # in /tmp itself: the `postgres` account cannot enter pytest's root-only directories
    root = Path(tempfile.mkdtemp(prefix="atoll-pg-"))
    data = root / "pgdata"
    data.mkdir(mode=0o700)
    if os.geteuid() == 0:
        shutil.chown(root, "postgres")
        shutil.chown(data, "postgres")
    made = subprocess.run(_as_postgres_user([str(initdb), "-D", str(data), "-U", "atoll",
                                             "--auth=trust", "--no-sync"]),
                          capture_output=True, text=True, timeout=120, check=False)
    assert made.returncode == 0, made.stdout[-2000:] + made.stderr[-2000:]
    port = procs.free_port()
    log = root / "postgres.log"
    proc = procs.start(_as_postgres_user([str(bin_dir / "postgres"), "-D", str(data),
                                          "-h", "127.0.0.1", "-p", str(port),
                                          "-k", str(root)]), log)
    try:
        _wait_port(port, proc, log)
        createdb = shutil.which("createdb") or str(bin_dir / "createdb")
        subprocess.run([createdb, "-h", "127.0.0.1", "-p", str(port), "-U", "atoll", "mlflow"],
                       check=True, capture_output=True, timeout=60)
        yield f"postgresql+psycopg2://atoll@127.0.0.1:{port}/mlflow", "postgresql"
    finally:
        procs.stop(proc)
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def auth_server(database, tmp_path_factory):
    backend, kind = database
    root = tmp_path_factory.mktemp("mlflow-auth")
    password = secrets.token_urlsafe(16)
    ini = root / "basic_auth.ini"
    ini.write_text("[mlflow]\ndefault_permission = READ\n"
                   f"database_uri = sqlite:///{root / 'auth.db'}\n"
                   f"admin_username = {ADMIN}\nadmin_password = {password}\n"
                   "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n")
    ini.chmod(0o600)
    port = procs.free_port()
    log = root / "server.log"
    proc = procs.start(
        [sys.executable, "-m", "mlflow", "server", "--app-name", "basic-auth",
         "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--artifacts-destination", str(root / "artifacts"), "--serve-artifacts"],
        log, cwd=root, env={"MLFLOW_DISABLE_TELEMETRY": "true",
                            "MLFLOW_AUTH_CONFIG_PATH": str(ini),
                            "MLFLOW_BACKEND_STORE_URI": backend,
                            "MLFLOW_FLASK_SERVER_SECRET_KEY": secrets.token_hex(16)})
    try:
        procs.wait_http(f"http://127.0.0.1:{port}/health", proc, log, timeout=180)
        yield {"uri": f"http://127.0.0.1:{port}", "password": password, "root": root,
               "log": log, "backend": kind}
    finally:
        procs.stop(proc)


def _create_experiment(uri: str, auth: tuple[str, str] | None) -> int:
    req = urllib.request.Request(f"{uri}/api/2.0/mlflow/experiments/create",
                                 data=json.dumps({"name": f"x-{secrets.token_hex(4)}"}).encode(),
                                 headers={"Content-Type": "application/json"}, method="POST")
    if auth is not None:
        token = base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode()
        req.add_header("Authorization", f"Basic {token}")
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


def test_unauthenticated_and_wrong_credentials_are_refused(auth_server):
    uri = auth_server["uri"]
    assert _create_experiment(uri, None) == 401
    assert _create_experiment(uri, (ADMIN, "wrong")) == 401
    assert _create_experiment(uri, (ADMIN, auth_server["password"])) == 200


def test_a_run_lands_with_credentials_from_the_environment(auth_server, tiny_spec, tmp_path,
                                                           monkeypatch, caplog):
    from mlflow.tracking import MlflowClient

    uri, password = auth_server["uri"], auth_server["password"]
    spec = tiny_spec(f"tracking.uri={uri}", "tracking.registered_model=auth-mlp",
                     "data.limit=200")
    assert password not in spec.to_yaml()
    monkeypatch.delenv("MLFLOW_TRACKING_USERNAME", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_PASSWORD", raising=False)
    with pytest.raises(TrackingUnauthorized, match="refused the request with no credentials"):
        run_local(spec)  # refused before anything trains, and no fallback to local
    assert not (tmp_path / "mlruns.db").exists()
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", ADMIN)
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", password)
    result = run_local(spec)
    client = MlflowClient(uri)
    run = client.get_run(result.run_id)
    assert run.info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(result.run_id, "train_loss")] == [1, 2]
    mv = client.get_model_version_by_alias("auth-mlp", "candidate")
    assert mv.run_id == result.run_id
    # artifacts went through the server into its artifact store
    assert any((auth_server["root"] / "artifacts").rglob("curves.png"))
    assert not (tmp_path / "mlartifacts").exists()
    # the password is nowhere: params, the logged spec, our log lines
    assert all(password not in str(v) for v in run.data.params.values())
    spec_text = Path(client.download_artifacts(result.run_id, "spec.yaml", str(tmp_path)))
    assert password not in spec_text.read_text()
    assert password not in caplog.text
    print(f"\ntracking server backend: {auth_server['backend']}")
