"""Flower deployment mode on 127.0.0.1, locked down as docker/compose.yaml runs it: a real
`flower-superlink` with SuperNode authentication over TLS (certificates and keys this test
generates with federated.certs), SuperNodes admitted by their registered public keys
(federated.supernode_auth), and process isolation: the ServerApp and ClientApps run under
separate `flower-superexec` processes that prove themselves with the shared SuperExec
secret. The atoll app runs through that federation with `flwr run` and lands in MLflow.
A SuperNode whose key was never registered and a SuperExec with the wrong secret are
started alongside and must be refused. Every process is stopped by its pid.
(Flower 1.41 carries the Fleet, Control and Runtime APIs over HTTPS on the SuperLink's one
port.)
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from atoll.core.procs import alive, descendants, free_port, start, stop
from atoll.core.spec import load_spec
from atoll.federated import records as R
from atoll.federated.certs import generate, superexec_secret, supernode_keys
from atoll.federated.supernode_auth import register
from tests.conftest import CONFIGS

pytestmark = pytest.mark.integration

BIN = Path(sys.executable).parent
INTRUDER = 3  # key index of the SuperNode that is never registered
ACTIVATED = re.compile(r"\[Fleet\.ActivateNode\] Activated node_id=(\d+)")
PUSHED = re.compile(r"\[Fleet\.PushMessages\] Push replies from node_id=(\d+)")


def _wait_for(what: str, cond, proc: subprocess.Popen | None, log: Path,
              timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{what}: process exited\n"
                               + log.read_text(errors="replace")[-3000:])
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not after {timeout}s\n"
                               + log.read_text(errors="replace")[-3000:])
        time.sleep(0.2)


def _https_up(url: str, ca: Path) -> bool:
    import ssl
    import urllib.request

    try:
        ctx = ssl.create_default_context(cafile=str(ca))
        with urllib.request.urlopen(url, timeout=2, context=ctx) as r:
            return r.status == 200
    except OSError:
        return False


def _logged_public_key(private_key: Path) -> str:
    """The key's public half as the SuperLink logs a refused key: repr of its PEM bytes."""
    from cryptography.hazmat.primitives import serialization

    key = serialization.load_ssh_private_key(private_key.read_bytes(), None)
    pem = key.public_key().public_bytes(serialization.Encoding.PEM,
                                        serialization.PublicFormat.SubjectPublicKeyInfo)
    return repr(pem)


@pytest.fixture()
def federation(tmp_path):
    work = Path(tempfile.mkdtemp(prefix="atoll-fd-"))
    certs = generate(work / "certs", hosts=("localhost", "127.0.0.1"))
    keys = supernode_keys(work / "certs", 4)  # 0, 1 at the start, 2 late, 3 never registered
    secret = superexec_secret(work / "certs")
    wrong = work / "wrong.secret"
    wrong.write_text("not-the-secret")
    port = free_port()
    home = work / "home"  # FLWR_HOME of `flwr run`
    home.mkdir()
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "deploy"\n\n[superlink.deploy]\naddress = "127.0.0.1:{port}"\n'
        f'root-certificates = "{certs["ca"]}"\n')
    env = {"FLWR_HOME": str(home), "FLWR_DISABLE_UPDATE_CHECK": "1",
           "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    procs: list[subprocess.Popen] = []
    named: dict[str, subprocess.Popen] = {}

    def run(name: str, cmd: list[str]) -> subprocess.Popen:
        p = start(cmd, work / f"{name}.log", env=env, cwd=work)
        procs.append(p)
        named[name] = p
        return p

    def superexec(name: str, runtime_api: str, secret_file: Path = secret,
                  tls: bool = True) -> subprocess.Popen:
        return run(name, [str(BIN / "flower-superexec"), "--runtime-api-address", runtime_api,
                          *(["--root-certificates", str(certs["ca"])] if tls else ["--insecure"]),
                          "--superexec-auth-secret-file", str(secret_file)])

    def supernode(k: int, partition: int | None = None) -> None:
        """SuperNode `k` signs with key k; its ClientApps run under its own SuperExec, which
        proves itself with the secret. As in compose (one network namespace for the pair),
        the SuperNode's Runtime API stays on loopback without TLS, which is what Flower's
        own subprocess isolation does; SuperNodes never hold the SuperLink's TLS key."""
        api = free_port()
        partition = k if partition is None else partition
        run(f"supernode-{k}", [
            str(BIN / "flower-supernode"), "--superlink", f"127.0.0.1:{port}",
            "--root-certificates", str(certs["ca"]),
            "--auth-supernode-private-key", str(keys[k][0]),
            "--node-config", f"partition-id={partition} num-partitions=3",
            "--isolation", "process", "--superexec-auth-secret-file", str(secret),
            "--host", "127.0.0.1", "--port", str(api)])
        if k != INTRUDER:
            superexec(f"superexec-{k}", f"127.0.0.1:{api}", tls=False)

    try:
        link_log = work / "superlink.log"
        link = run("superlink", [
            str(BIN / "flower-superlink"), "--ssl-ca-certfile", str(certs["ca"]),
            "--ssl-certfile", str(certs["cert"]), "--ssl-keyfile", str(certs["key"]),
            "--host", "127.0.0.1", "--port", str(port), "--database", str(work / "state.db"),
            "--disable-runtime-dependency-installation", "--enable-supernode-auth",
            "--isolation", "process", "--superexec-auth-secret-file", str(secret)])
        _wait_for("SuperLink health", lambda: _https_up(f"https://127.0.0.1:{port}/health",
                                                        certs["ca"]), link, link_log)
        superexec("superexec-link", f"127.0.0.1:{port}")  # runs the ServerApp
        superexec("superexec-rogue", f"127.0.0.1:{port}", wrong)
        node_ids = register([pub for _, pub in keys[:3]], f"127.0.0.1:{port}", certs["ca"])
        supernode(0)
        supernode(1)
        supernode(INTRUDER, partition=2)  # claims the late node's partition
        yield {"env": env, "work": work, "procs": procs, "named": named, "keys": keys,
               "port": port, "certs": certs, "node_ids": node_ids, "supernode": supernode,
               "run": run}
    finally:
        tree = [pid for p in procs for pid in [p.pid, *descendants(p.pid)]]
        for p in reversed(procs):
            stop(p)
        logs = tmp_path / "logs"  # pytest keeps its last few tmp_paths: the logs outlive us
        logs.mkdir(exist_ok=True)
        for f in work.glob("*.log"):
            shutil.copy(f, logs / f.name)
        shutil.rmtree(work, ignore_errors=True)
        # the SuperExecs' ServerApp and ClientApps included
        assert not [pid for pid in tree if alive(pid)]


def test_authenticated_federation_refuses_an_unknown_supernode_and_admits_a_late_one(
        federation, tmp_path):
    """Over TLS, with SuperNode authentication and SuperExec-secret process isolation:
    the two registered SuperNodes train from round 1; the third registered one connects
    once round 1 is under way and trains in round 2 (the server re-discovers nodes when it
    samples); the SuperNode with an unregistered key is refused at activation,
    gets no node id and no message, and is not counted; the SuperExec with the wrong secret
    is refused by the Runtime API and claims no app."""
    from mlflow.tracking import MlflowClient

    fed, work = federation, federation["work"]
    link_log, intruder_log = work / "superlink.log", work / f"supernode-{INTRUDER}.log"
    node_ids = fed["node_ids"]
    assert len(node_ids) == 3 and all(isinstance(i, int) for i in node_ids.values())

    # refused before the run starts, so the server's first head-count could not include it
    intruder = fed["named"][f"supernode-{INTRUDER}"]
    assert intruder.wait(timeout=120) == 1, intruder_log.read_text(errors="replace")[-3000:]
    rogue = fed["named"]["superexec-rogue"]
    _wait_for("rogue SuperExec refused", lambda: "ApiError:1008" in link_log.read_text(
        errors="replace"), None, link_log)

    spec = load_spec(CONFIGS / "federated.yaml", [
        "name=deployed", "federated.num_clients=2", "federated.rounds=2",
        "federated.min_fit_clients=2", "federated.local_epochs=3", "train.progress=off",
        "tracking.experiment=tests-deploy", "tracking.log_model=false"])
    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    run_dir = tmp_path / "run"
    run_config = R.run_config_for(spec, run_dir=run_dir, tracking_uri=uri, mlflow_run_id=None,
                                  resume="")
    cfg = tmp_path / "run_config.toml"
    cfg.write_text(R.to_toml(run_config))
    runner_log = work / "flwr-run.log"
    runner = fed["run"]("flwr-run", [str(BIN / "flwr"), "run", str(R.app_dir()), "deploy",
                                     "--stream", "--run-config", str(cfg)])
    # a restarted registration step (compose runs it on every `up`) leaves the keys be
    again = fed["run"]("register-again", [
        sys.executable, "-m", "atoll.federated.supernode_auth", "--superlink",
        f"127.0.0.1:{fed['port']}", "--root-certificates", str(fed["certs"]["ca"]),
        str(fed["keys"][0][1])])
    # late: round 1 is under way (its train messages went out after the server's first
    # head-count); round 1 still has to launch a ClientApp for training and one for
    # evaluation, time enough for the new SuperNode to be online when round 2 samples
    _wait_for("round 1's train message", lambda: "Receiving: train message" in (
        work / "supernode-0.log").read_text(errors="replace"), runner, runner_log, timeout=300)
    assert not (run_dir / "checkpoints" / "round-000001.ckpt").exists()
    fed["supernode"](2)
    late_log = work / "supernode-2.log"
    deadline = time.monotonic() + 600
    while runner.poll() is None and time.monotonic() < deadline:
        time.sleep(0.5)
    logs = "".join(f"\n===== {f}\n" + (work / f).read_text(errors="replace")[-2500:]
                   for f in ("flwr-run.log", "superlink.log", "supernode-0.log",
                             "supernode-2.log", "superexec-link.log"))
    assert runner.returncode == 0, logs
    assert again.wait(timeout=120) == 0
    again_text = (work / "register-again.log").read_text()
    assert "supernode-0.pub: already registered" in again_text, again_text
    assert "PRIVATE" not in again_text

    result = json.loads((run_dir / "result.json").read_text())
    assert result["status"] == "FINISHED", result
    client = MlflowClient(uri)
    run = client.get_run(result["run_id"])
    assert run.info.status == "FINISHED"
    # the intruder claimed partition 2 before the run: only the two registered nodes count
    assert run.data.params["federated.clients_connected"] == "2"
    participants = [int(m.value) for m in sorted(
        client.get_metric_history(run.info.run_id, "participants"), key=lambda m: m.step)]
    assert participants == [2, 3], [participants, logs]  # the late SuperNode trains
    assert run.data.metrics["central_accuracy"] > 0.5
    assert "Receiving: train message" in late_log.read_text(errors="replace")

    # the refusal, on both sides, of exactly the intruder's key
    link_text = link_log.read_text(errors="replace")
    refused = [ln for ln in link_text.splitlines()
               if "[/v1/fleet/activate-node][ApiError:2004]" in ln]
    assert len(refused) == 1, link_text[-3000:]
    assert "No SuperNode found with the given public key." in refused[0]
    assert f"public key: {_logged_public_key(fed['keys'][INTRUDER][0])}" in refused[0]
    assert '"POST /v1/fleet/activate-node HTTP/1.1" 412' in link_text
    intruder_text = intruder_log.read_text(errors="replace")
    assert "[code: 2004] Failed to activate SuperNode." in intruder_text
    assert "SuperNode ID:" not in intruder_text and "Receiving:" not in intruder_text
    # no node id was activated, and no reply came, except the registered ones
    assert set(map(int, ACTIVATED.findall(link_text))) == set(node_ids.values())
    assert set(map(int, PUSHED.findall(link_text))) == set(node_ids.values())

    # the wrong secret: refused by the Runtime API, and it never launched an app
    assert "SuperExec authentication failed for /flwr.proto.Runtime/AcquireTask" in link_text
    assert '"POST /v1/runtime/acquire-task HTTP/1.1" 401' in link_text
    assert rogue.wait(timeout=60) is not None
    rogue_text = (work / "superexec-rogue.log").read_text(errors="replace")
    assert "flwr-serverapp" not in rogue_text and "flwr-clientapp" not in rogue_text
    # while the SuperExecs with the secret kept serving
    assert all(fed["named"][n].poll() is None
               for n in ("superexec-link", "superexec-0", "superexec-1", "superexec-2"))
