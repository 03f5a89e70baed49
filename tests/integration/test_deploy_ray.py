"""Two Ray nodes on one machine: a head and a second node joined with `ray start --address`,
each with 1 CPU and its own ports. A DDP job with STRICT_SPREAD placement puts one worker
on each node; both write checkpoints to one shared storage path. Both nodes are stopped
by their own pids.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

from cluster import jobs
from core.procs import free_port, start, stop, wait_http
from core.spec import load_spec
from tests.conftest import CONFIGS

pytestmark = pytest.mark.integration

BIN = Path(sys.executable).parent


def _node_ports() -> list[str]:
    """Every port a Ray node opens, chosen free (another Ray may run on this machine)."""
    names = ("dashboard-agent-listen-port", "dashboard-agent-grpc-port",
             "runtime-env-agent-port", "metrics-export-port", "node-manager-port",
             "object-manager-port")
    return [f"--{n}={free_port()}" for n in names]


@pytest.fixture(scope="module")
def two_nodes():
    tmp = tempfile.mkdtemp(prefix="atoll-mn-")  # short: Ray's socket paths
    port, dash = free_port(), free_port()
    env = {"PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "RAY_USAGE_STATS_ENABLED": "0"}
    common = ["--block", "--num-cpus=1", "--node-ip-address=127.0.0.1", "--disable-usage-stats"]
    head_log, node_log = Path(tmp) / "head.log", Path(tmp) / "node.log"
    head = start([str(BIN / "ray"), "start", "--head", *common, f"--port={port}",
                  "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", f"--temp-dir={tmp}",
                  *_node_ports()], head_log, env=env, cwd=Path(tmp))
    node = None
    try:
        http = f"http://127.0.0.1:{dash}"
        wait_http(f"{http}/api/version", head, head_log, timeout=120)
        node = start([str(BIN / "ray"), "start", f"--address=127.0.0.1:{port}", *common,
                      *_node_ports()], node_log, env=env, cwd=Path(tmp))
        _wait_for_nodes(http, 2, node, node_log)
        yield {"http": http, "tmp": tmp}
    finally:
        if node is not None:
            stop(node)
        stop(head)
        shutil.rmtree(tmp, ignore_errors=True)


def _alive_nodes(http: str) -> list[str]:
    from ray.util.state import list_nodes

    return [n.node_id for n in list_nodes(address=http) if n.state == "ALIVE"]


def _wait_for_nodes(http: str, count: int, proc, log: Path, timeout: float = 120) -> None:
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(log.read_text(errors="replace")[-3000:])
        try:
            if len(_alive_nodes(http)) >= count:
                return
        except Exception:  # the state API may not answer in the first seconds
            pass
        time.sleep(1)
    raise TimeoutError(log.read_text(errors="replace")[-3000:])


def test_ddp_job_spreads_over_both_nodes_with_shared_checkpoints(two_nodes, tmp_path):
    from mlflow.tracking import MlflowClient

    shared = tmp_path / "shared"
    spec = load_spec(CONFIGS / "demo.yaml", [
        "mode=cluster", "name=spread", "train.epochs=2", "train.progress=off",
        "cluster.placement=STRICT_SPREAD", f"cluster.storage_path={shared}",
        "tracking.experiment=tests-multinode", "tracking.log_model=false"])
    job = jobs.submit(spec, two_nodes["http"], working_dir=tmp_path,
                      entrypoint_cmd=str(BIN / "atoll"))
    final = jobs.wait(two_nodes["http"], job, timeout=600)
    assert final == "SUCCEEDED", jobs.client(two_nodes["http"]).get_job_logs(job)[-4000:]
    workers = shared / "spread" / "workers"
    placed = {(workers / f"rank-{r}.node").read_text() for r in (0, 1)}
    assert len(placed) == 2 and placed <= set(_alive_nodes(two_nodes["http"]))
    # both ranks recorded themselves in the one storage path; the checkpoints are there too
    assert len(list((shared / "spread").glob("checkpoint_*/state.ckpt"))) >= 1
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlruns.db'}")
    exp = client.get_experiment_by_name("tests-multinode")
    run, = client.search_runs([exp.experiment_id])
    assert run.info.status == "FINISHED" and run.data.metrics["test_accuracy"] > 0.8
    assert run.data.params["cluster.placement"] == "STRICT_SPREAD"
