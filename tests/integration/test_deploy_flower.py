"""Flower deployment mode on 127.0.0.1: a real `flower-superlink` and two
`flower-supernode` processes over TLS (certificates this test generates), each SuperNode
holding a different partition through its node config; the atoll app runs through that
federation with `flwr run` and lands in MLflow. Every process is stopped by its pid.
(Flower 1.41 carries the Fleet and Control APIs over HTTPS on the SuperLink's one port.)
"""

from __future__ import annotations

import json
import os
import shutil
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

from core.procs import alive, descendants, free_port, start, stop
from core.spec import load_spec
from federated import records as R
from federated.certs import generate
from tests.conftest import CONFIGS

pytestmark = pytest.mark.integration

BIN = Path(sys.executable).parent


def _wait_https(url: str, ca: Path, proc: subprocess.Popen, log: Path,
                timeout: float = 90) -> None:
    ctx = ssl.create_default_context(cafile=str(ca))
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(log.read_text(errors="replace")[-3000:])
        try:
            with urllib.request.urlopen(url, timeout=2, context=ctx) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.3)
    raise TimeoutError(log.read_text(errors="replace")[-3000:])


@pytest.fixture()
def federation(tmp_path):
    work = Path(tempfile.mkdtemp(prefix="atoll-fd-"))
    certs = generate(work / "certs", hosts=("localhost", "127.0.0.1"))
    port = free_port()
    home = work / "home"
    home.mkdir()
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "deploy"\n\n[superlink.deploy]\naddress = "127.0.0.1:{port}"\n'
        f'root-certificates = "{certs["ca"]}"\n')
    env = {"FLWR_HOME": str(home), "FLWR_DISABLE_UPDATE_CHECK": "1",
           "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    procs: list[subprocess.Popen] = []
    try:
        link_log = work / "superlink.log"
        link = start([str(BIN / "flower-superlink"), "--ssl-ca-certfile", str(certs["ca"]),
                      "--ssl-certfile", str(certs["cert"]), "--ssl-keyfile", str(certs["key"]),
                      "--host", "127.0.0.1", "--port", str(port),
                      "--database", str(work / "state.db"),
                      "--disable-runtime-dependency-installation"], link_log, env=env, cwd=work)
        procs.append(link)
        _wait_https(f"https://127.0.0.1:{port}/health", certs["ca"], link, link_log)

        def supernode(pid: int) -> None:  # each holds its own partition via node config
            procs.append(start([str(BIN / "flower-supernode"), "--superlink",
                                f"127.0.0.1:{port}", "--root-certificates", str(certs["ca"]),
                                "--node-config", f"partition-id={pid} num-partitions=3",
                                "--host", "127.0.0.1", "--port", str(free_port())],
                               work / f"supernode-{pid}.log", env=env, cwd=work))

        supernode(0)
        supernode(1)
        yield {"env": env, "work": work, "procs": procs, "supernode": supernode}
    finally:
        tree = [pid for p in procs for pid in [p.pid, *descendants(p.pid)]]
        for p in reversed(procs):
            stop(p)
        shutil.rmtree(work, ignore_errors=True)
        # the SuperLink's SuperExec/ServerApp and the SuperNodes' ClientApps included
        assert not [pid for pid in tree if alive(pid)]


def test_flwr_run_over_tls_and_a_supernode_that_joins_late(federation, tmp_path):
    """Two SuperNodes at the start; a third connects after round 1 and is sampled from the
    next round on (the server re-discovers nodes when it samples)."""
    from mlflow.tracking import MlflowClient

    spec = load_spec(CONFIGS / "federated.yaml", [
        "name=deployed", "federated.num_clients=2", "federated.rounds=6",
        "federated.min_fit_clients=2", "federated.local_epochs=1", "train.progress=off",
        "federated.faults.straggler=1.0", "federated.faults.straggler_delay=1.5",
        "tracking.experiment=tests-deploy", "tracking.log_model=false"])
    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    run_dir = tmp_path / "run"
    run_config = R.run_config_for(spec, run_dir=run_dir, tracking_uri=uri, mlflow_run_id=None,
                                  resume="")
    cfg = tmp_path / "run_config.toml"
    cfg.write_text(R.to_toml(run_config))
    runner = subprocess.Popen([str(BIN / "flwr"), "run", str(R.app_dir()), "deploy", "--stream",
                               "--run-config", str(cfg)], env={**os.environ, **federation["env"]},
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              stdin=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 300
        while not (run_dir / "checkpoints" / "round-000001.ckpt").is_file():
            assert runner.poll() is None and time.monotonic() < deadline, runner.stdout.read()
            time.sleep(0.2)
        federation["supernode"](2)
        out, _ = runner.communicate(timeout=600)
    finally:
        if runner.poll() is None:
            stop(runner)
    logs = "".join((federation["work"] / f).read_text(errors="replace")[-2000:]
                   for f in ("superlink.log", "supernode-0.log", "supernode-2.log"))
    assert runner.returncode == 0, out[-3000:] + logs
    result = json.loads((run_dir / "result.json").read_text())
    assert result["status"] == "FINISHED", result
    client = MlflowClient(uri)
    run = client.get_run(result["run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.params["federated.clients_connected"] == "2"  # two distinct partitions
    participants = [int(m.value) for m in sorted(
        client.get_metric_history(run.info.run_id, "participants"), key=lambda m: m.step)]
    assert len(participants) == 6 and participants[0] == 2
    assert participants[-1] == 3, participants  # the late SuperNode trains
    assert run.data.metrics["central_accuracy"] > 0.5
