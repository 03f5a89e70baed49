"""Two Ray nodes on one machine with Ray's token authentication on: a head and a second
node joined with `ray start --address`, each with 1 CPU and its own ports, both started
with RAY_AUTH_MODE=token and RAY_AUTH_TOKEN_PATH naming a 0600 file this module writes.

A DDP job with STRICT_SPREAD placement puts one worker on each node; both write
checkpoints to one shared storage path. Around it: an unauthenticated `ray job submit` is
refused; `atoll submit` / `atoll jobs` without a token, with a wrong one or with a bad
token file fail in one line (exit 2) before anything is written or uploaded; with the
token (only ever as RAY_AUTH_TOKEN_PATH in the environment) they work, and the token shows
up in no output, log, spec file, job record or MLflow store. Both nodes are stopped by
their own pids (core.procs), never by name.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from atoll.cluster import jobs
from atoll.core.procs import free_port, start, stop, wait_http
from atoll.core.spec import load_spec
from tests.conftest import CONFIGS
from tests.integration.conftest import start_ray

pytestmark = pytest.mark.integration

BIN = Path(sys.executable).parent
# the smallest job: one epoch on a slice of digits, nothing registered (the DDP test is the
# one that runs Ray Train through an authenticated job)
SMALL = ["--set", "train.epochs=1", "--set", "data.limit=256", "--set", "train.progress=off",
         "--set", "tracking.log_model=false", "--set", "tracking.experiment=tests-auth"]
CLUSTER = ["--set", "mode=cluster"]


def _node_ports() -> list[str]:
    """Every port a Ray node opens, chosen free (another Ray may run on this machine).
    The Ray client server's default port (10001) is fixed: another head would collide."""
    names = ("dashboard-agent-listen-port", "dashboard-agent-grpc-port",
             "runtime-env-agent-port", "metrics-export-port", "node-manager-port",
             "object-manager-port", "ray-client-server-port")
    return [f"--{n}={free_port()}" for n in names]


def _write_secret(path: Path, text: str) -> Path:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text + "\n")
    return path


@pytest.fixture(scope="module")
def two_nodes():
    tmp = tempfile.mkdtemp(prefix="atoll-mn-")  # short: Ray's socket paths
    token = secrets.token_hex(32)  # what `ray get-auth-token --generate` makes
    token_file = _write_secret(Path(tmp) / "auth_token", token)
    port, dash = free_port(), free_port()
    env = {"PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "RAY_USAGE_STATS_ENABLED": "0",
           # token auth on every node; the token itself only in the file
           "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token_file),
           "RAY_AUTH_TOKEN": "",  # Ray ignores an empty one; it would win over the file
           # the dashboard's modules get 30 s to start, too few on a loaded 2-core machine
           "RAY_DASHBOARD_SUBPROCESS_MODULE_WAIT_READY_TIMEOUT": "180"}
    common = ["--num-cpus=1", "--node-ip-address=127.0.0.1", "--disable-usage-stats"]
    head_log = Path(tmp) / "head.log"
    http = f"http://127.0.0.1:{dash}"
    head = node = None
    try:
        head = start_ray(["--head", *common, f"--port={port}", "--dashboard-host=127.0.0.1",
                          f"--dashboard-port={dash}", f"--temp-dir={tmp}", *_node_ports()],
                         head_log,
                         # public without a token (/api/version needs one)
                         lambda p: wait_http(f"{http}/api/gcs_healthz", p, head_log, timeout=240),
                         env=env, cwd=Path(tmp))
        node = _join(f"127.0.0.1:{port}", common, env, Path(tmp), http, token)
        yield {"http": http, "gcs": f"127.0.0.1:{port}", "tmp": Path(tmp), "token": token,
               "token_file": token_file}
    finally:
        for proc in (node, head):
            if proc is not None:
                stop(proc)
        shutil.rmtree(tmp, ignore_errors=True)


def _join(gcs: str, common: list[str], env: dict[str, str], tmp: Path, http: str,
          token: str) -> subprocess.Popen:
    """The second node, joined with `ray start --address`, on fresh ports per attempt."""
    log = tmp / "node.log"
    return start_ray(lambda: [f"--address={gcs}", *common, *_node_ports()], log,
                     lambda p: _wait_for_nodes(http, token, 2, p, log), env=env, cwd=tmp)


def _alive_nodes(http: str, token: str) -> list[str]:
    from ray.util.state import StateApiClient
    from ray.util.state.common import ListApiOptions, StateResource

    c = StateApiClient(address=http, headers={"Authorization": f"Bearer {token}"})
    return [n.node_id for n in c.list(StateResource.NODES, options=ListApiOptions(),
                                      raise_on_missing_output=False) if n.state == "ALIVE"]


def _wait_for_nodes(http: str, token: str, count: int, proc, log: Path,
                    timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(log.read_text(errors="replace")[-3000:])
        try:
            if len(_alive_nodes(http, token)) >= count:
                return
        except Exception:  # the state API may not answer in the first seconds
            pass
        time.sleep(1)
    raise TimeoutError(log.read_text(errors="replace")[-3000:])


@pytest.fixture
def with_token(two_nodes, monkeypatch):
    """This process authenticates the way a user would: RAY_AUTH_TOKEN_PATH only."""
    for var in ("RAY_AUTH_TOKEN", "RAY_AUTH_MODE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(two_nodes["token_file"]))
    return two_nodes


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """A user's environment with no Ray token anywhere: no RAY_AUTH_* variables and a HOME
    without ~/.ray/auth_token. `extra` adds what a test gives it."""
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("RAY_AUTH") and k != "RAY_ADDRESS"}
    return {**env, "HOME": str(home), "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
            **extra}


def _atoll(*args: str, cwd: Path, env: dict[str, str], timeout: int = 600
           ) -> subprocess.CompletedProcess:
    """The installed console script, as a user types it."""
    return subprocess.run([str(BIN / "atoll"), *args], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=timeout, check=False)


def _one_line(out: subprocess.CompletedProcess) -> str:
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in out.stderr + out.stdout, \
        out.stdout[-2000:] + out.stderr[-3000:]
    return lines[0]


def _job_ids(http: str, token_file: Path, monkeypatch) -> set[str]:
    with monkeypatch.context() as m:
        m.setenv("RAY_AUTH_TOKEN_PATH", str(token_file))
        return {row["id"] for row in jobs.listing(http)}


def _files_holding(root: Path, needle: str, skip: Path | None = None) -> list[str]:
    """Every file under `root` whose bytes contain `needle`."""
    found = []
    for p in root.rglob("*"):
        if p.is_file() and not p.is_symlink() and p != skip:
            try:
                if needle.encode() in p.read_bytes():
                    found.append(str(p))
            except OSError:
                continue
    return found


def _assert_token_hidden(two_nodes, job_id: str, workdir: Path,
                         *outputs: subprocess.CompletedProcess,
                         token_file: Path | None = None) -> None:
    """The token is in no command output, in nothing the job carries (entrypoint,
    metadata, runtime_env), not in its logs, not in the working dir (the submitted spec
    file, the MLflow store and artifacts; `token_file` aside) and nowhere in Ray's session
    folder (its logs, the job's unpacked working_dir)."""
    token = two_nodes["token"]
    for out in outputs:
        assert token not in out.stdout + out.stderr
    c = jobs.client(two_nodes["http"])  # authenticated: the caller set RAY_AUTH_TOKEN_PATH
    info = c.get_job_info(job_id)
    assert token not in repr((info.entrypoint, info.metadata, info.runtime_env))
    assert token not in c.get_job_logs(job_id)
    submitted = list((workdir / ".atoll" / "submit").glob("*.yaml"))
    assert submitted and all(token not in p.read_text() for p in submitted)
    assert _files_holding(workdir, token, skip=token_file) == []
    assert _files_holding(two_nodes["tmp"], token, skip=two_nodes["token_file"]) == []


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """An MLflow server on loopback: the store a multi-node cluster's ranks all reach."""
    root = tmp_path_factory.mktemp("mlflow-server")
    port = free_port()
    log = root / "server.log"
    proc = start([sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port",
                  str(port), "--workers", "1", "--backend-store-uri",
                  f"sqlite:///{root / 'mlruns.db'}", "--artifacts-destination",
                  str(root / "artifacts"), "--serve-artifacts"], log, cwd=root,
                 env={"MLFLOW_DISABLE_TELEMETRY": "true"})
    try:
        wait_http(f"http://127.0.0.1:{port}/health", proc, log, timeout=180)
        yield f"http://127.0.0.1:{port}"
    finally:
        stop(proc)


def _mlflow_run(workdir: Path, experiment: str, uri: str | None = None):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri or f"sqlite:///{workdir / 'mlruns.db'}")
    run, = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    return run


def test_a_file_store_is_refused_on_a_cluster_of_two_nodes(with_token, tmp_path):
    """The default sqlite store is a file on the driver's node; rank 0 may train on the
    other one. Refused in one line naming MLFLOW_TRACKING_URI before a run or a store
    exists."""
    out = _atoll("run", str(CONFIGS / "demo.yaml"), *CLUSTER, *SMALL, cwd=tmp_path,
                 env=_env(tmp_path, RAY_ADDRESS=with_token["gcs"],
                          RAY_AUTH_TOKEN_PATH=str(with_token["token_file"])))
    assert out.returncode == 2, out.stdout[-2000:] + out.stderr[-3000:]
    line = _one_line(out)
    assert line.startswith(f"atoll: tracking.uri: sqlite:///{tmp_path / 'mlruns.db'} is a "
                           "file on this node, and the Ray cluster at "
                           f"{with_token['gcs']} has 2 nodes"), line
    assert "set MLFLOW_TRACKING_URI" in line
    assert not (tmp_path / "mlruns.db").exists() and not (tmp_path / ".atoll").exists()


def test_ddp_job_spreads_over_both_nodes_with_shared_checkpoints(with_token, mlflow_server,
                                                                 tmp_path):
    """The multi-node DDP job through `jobs.submit` authenticated by RAY_AUTH_TOKEN_PATH
    alone (this process imported ray without RAY_AUTH_MODE), tracked on an MLflow server
    (a file store is refused on two nodes: the test above)."""
    two_nodes = with_token
    shared = tmp_path / "shared"
    spec = load_spec(CONFIGS / "demo.yaml", [
        "mode=cluster", "name=spread", "train.epochs=2", "train.progress=off",
        "cluster.placement=STRICT_SPREAD", f"cluster.storage_path={shared}",
        f"tracking.uri={mlflow_server}",
        "tracking.experiment=tests-multinode", "tracking.log_model=false"])
    job = jobs.submit(spec, two_nodes["http"], working_dir=tmp_path,
                      entrypoint_cmd=str(BIN / "atoll"))
    final = jobs.wait(two_nodes["http"], job, timeout=600)
    assert final == "SUCCEEDED", jobs.client(two_nodes["http"]).get_job_logs(job)[-4000:]
    workers = shared / "spread" / "workers"
    placed = {(workers / f"rank-{r}.node").read_text() for r in (0, 1)}
    assert len(placed) == 2 and placed <= set(_alive_nodes(two_nodes["http"],
                                                           two_nodes["token"]))
    # both ranks recorded themselves in the one storage path; the checkpoints are there too
    assert len(list((shared / "spread").glob("checkpoint_*/state.ckpt"))) >= 1
    run = _mlflow_run(tmp_path, "tests-multinode", mlflow_server)
    assert run.info.status == "FINISHED" and run.data.metrics["test_accuracy"] > 0.8
    assert run.data.params["cluster.placement"] == "STRICT_SPREAD"
    token = two_nodes["token"]
    assert token not in repr((run.data.params, run.data.tags))
    _assert_token_hidden(two_nodes, job, tmp_path)


def test_unauthenticated_ray_job_submit_is_refused(two_nodes, tmp_path, monkeypatch):
    """Ray's own CLI without a token: refused with 401, and no job exists afterwards."""
    before = _job_ids(two_nodes["http"], two_nodes["token_file"], monkeypatch)
    out = subprocess.run(
        [str(BIN / "ray"), "job", "submit", "--address", two_nodes["http"], "--",
         "python", "-c", "'print(1)'"],
        capture_output=True, text=True, cwd=tmp_path, env=_env(tmp_path), timeout=300,
        check=False)
    assert out.returncode != 0
    assert "Unauthorized: Missing authentication token" in out.stdout + out.stderr
    assert _job_ids(two_nodes["http"], two_nodes["token_file"], monkeypatch) == before


def test_atoll_without_a_token_fails_in_one_line_before_writing(two_nodes, tmp_path,
                                                                monkeypatch):
    """`atoll submit` and `atoll jobs list`: exit 2, one line naming RAY_AUTH_TOKEN_PATH;
    submit leaves no spec file behind and no job on the cluster."""
    before = _job_ids(two_nodes["http"], two_nodes["token_file"], monkeypatch)
    out = _atoll("submit", str(CONFIGS / "demo.yaml"), *CLUSTER, *SMALL,
                 "--address", two_nodes["http"], cwd=tmp_path, env=_env(tmp_path))
    assert out.returncode == 2, out.stdout + out.stderr[-3000:]
    line = _one_line(out)
    assert line.startswith(f"atoll: error: the Ray Job API at {two_nodes['http']} requires "
                           "a token"), line
    assert "set RAY_AUTH_TOKEN_PATH" in line and "RAY_AUTH_TOKEN)" in line
    assert not (tmp_path / ".atoll").exists()
    listed = _atoll("jobs", "list", "--address", two_nodes["http"], cwd=tmp_path,
                    env=_env(tmp_path))
    assert listed.returncode == 2 and "set RAY_AUTH_TOKEN_PATH" in _one_line(listed)
    assert _job_ids(two_nodes["http"], two_nodes["token_file"], monkeypatch) == before


@pytest.mark.parametrize("problem", ["wrong", "missing"])
def test_a_bad_token_is_refused_in_one_line(two_nodes, tmp_path, monkeypatch, problem):
    """A token the cluster refuses (403), or a RAY_AUTH_TOKEN_PATH without a token file: one
    line naming the variable and the file, exit 2, nothing written, no job. (An empty or
    unreadable file: tests/unit/test_ray_auth.py.)"""
    path = tmp_path / "token"
    if problem == "wrong":
        _write_secret(path, secrets.token_hex(32))
    before = _job_ids(two_nodes["http"], two_nodes["token_file"], monkeypatch)
    out = _atoll("submit", str(CONFIGS / "demo.yaml"), *CLUSTER, *SMALL,
                 "--address", two_nodes["http"], cwd=tmp_path,
                 env=_env(tmp_path, RAY_AUTH_TOKEN_PATH=str(path)))
    assert out.returncode == 2, out.stdout + out.stderr[-3000:]
    line = _one_line(out)
    assert f"RAY_AUTH_TOKEN_PATH ({path})" in line, line
    expected = {"wrong": f"the Ray Job API at {two_nodes['http']} refused the token",
                "missing": "the token file does not exist"}[problem]
    assert expected in line, line
    assert not (tmp_path / ".atoll").exists()
    assert _job_ids(two_nodes["http"], two_nodes["token_file"], monkeypatch) == before


def test_authenticated_atoll_submit_succeeds_and_never_shows_the_token(with_token, tmp_path):
    """`atoll submit --wait` with only RAY_AUTH_TOKEN_PATH set (no RAY_AUTH_MODE): the job
    trains and is tracked; `atoll jobs list` sees it; the token is nowhere to be read, not
    even from the token file kept inside the working dir that the job uploads.
    A local-mode spec: the job's driver trains in the job, the smallest job there is."""
    two_nodes = with_token
    (tmp_path / ".secrets").mkdir()
    token_file = _write_secret(tmp_path / ".secrets" / "ray_token", two_nodes["token"])
    env = _env(tmp_path, RAY_AUTH_TOKEN_PATH=str(token_file))
    out = _atoll("submit", str(CONFIGS / "demo.yaml"), *SMALL, "--set", "name=auth-small",
                 "--address", two_nodes["http"], "--wait", cwd=tmp_path, env=env)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-3000:]
    assert "SUCCEEDED" in out.stdout
    job_id = out.stdout.split("submitted: ")[1].split()[0]
    listed = _atoll("jobs", "list", "--address", two_nodes["http"], cwd=tmp_path, env=env)
    assert listed.returncode == 0, listed.stderr[-3000:]
    assert any(line.split()[:2] == [job_id, "SUCCEEDED"] for line in listed.stdout.splitlines())
    run = _mlflow_run(tmp_path, "tests-auth")
    assert run.info.status == "FINISHED"
    assert two_nodes["token"] not in repr((run.data.params, run.data.tags))
    _assert_token_hidden(two_nodes, job_id, tmp_path, out, listed, token_file=token_file)
    # that scan saw the upload: the job's unpacked working dir is in the session folder
    spec_file, = (tmp_path / ".atoll" / "submit").glob("auth-small-*.yaml")
    unpacked = [p.parent.parent.parent for p in two_nodes["tmp"].rglob(spec_file.name)]
    assert unpacked and not any((u / ".secrets" / "ray_token").exists() for u in unpacked)


def test_a_driver_reaches_an_authenticated_cluster_only_with_the_token(two_nodes, tmp_path):
    """`atoll run` in cluster mode with RAY_ADDRESS at the cluster's GCS and no token: one
    line naming the variables, exit 2, no MLflow run begun (not Ray's 20 s of retries and
    warnings). With RAY_AUTH_TOKEN_PATH alone (no RAY_AUTH_MODE) the same driver code
    (`cluster.runner`: the check `run_cluster` makes, then `_ray_connection`) connects:
    importing `cluster` turned token mode on before ray was imported."""
    out = _atoll("run", str(CONFIGS / "demo.yaml"), *CLUSTER, *SMALL, cwd=tmp_path,
                 env=_env(tmp_path, RAY_ADDRESS=two_nodes["gcs"]), timeout=300)
    assert out.returncode == 2, out.stdout[-2000:] + out.stderr[-3000:]
    line = _one_line(out)
    assert line.startswith(f"atoll: error: the Ray cluster at {two_nodes['gcs']} requires "
                           "a token"), line
    assert "set RAY_AUTH_TOKEN_PATH" in line
    assert not (tmp_path / "mlruns.db").exists()
    driver = ("from atoll.cluster import runner\nimport ray\n"
              f"runner._check_auth({two_nodes['gcs']!r})\n"
              f"with runner._ray_connection({two_nodes['gcs']!r}, 1):\n"
              "    print('nodes', len([n for n in ray.nodes() if n['Alive']]))\n")
    out = subprocess.run([sys.executable, "-c", driver], capture_output=True, text=True,
                         cwd=tmp_path, timeout=300, check=False,
                         env=_env(tmp_path, RAY_AUTH_TOKEN_PATH=str(two_nodes["token_file"])))
    assert out.returncode == 0 and "nodes 2" in out.stdout, out.stderr[-3000:]
    assert two_nodes["token"] not in out.stdout + out.stderr
