"""The `atoll` command as a user runs it: real processes, real stores."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import CONFIGS
from tests.integration import procs

pytestmark = pytest.mark.integration

ATOLL = [sys.executable, "-m", "atoll.core.cli"]


def _atoll(*args: str, cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([*ATOLL, *args], capture_output=True, text=True, cwd=cwd,
                          timeout=timeout, check=False)


def test_demo_trains_registers_and_explains_the_ui(tmp_path):
    out = _atoll("demo", "--set", "train.epochs=3", "--set", "federated.rounds=3",
                 "--set", "federated.num_clients=3", cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "registered: digits-mlp version 1 as @candidate" in out.stdout
    assert "== digits-fedavg: federated" in out.stdout  # the federated part follows
    assert "registered: digits-fed version 1 as @candidate" in out.stdout
    assert "rounds: 3" in out.stdout
    assert "== digits-fcl: federated" in out.stdout  # the headline: continual + federated
    assert "after T2:" in out.stdout  # its accuracy matrix is printed
    assert "mlflow run id: " in out.stdout and "make ui" in out.stdout
    assert "epoch 3/3" in out.stderr  # plain log lines when not on a terminal
    # a large population on the vectorized engine closes the demo
    assert "== digits-population: federated" in out.stdout
    assert "registered: digits-population version 1 as @candidate" in out.stdout
    assert "vectorized engine" in out.stderr
    # a quiet console: no library warnings or download bars between atoll's lines
    for noise in ("Warning:", "warnings.warn", "Downloading artifacts"):
        assert noise not in out.stderr + out.stdout, noise
    assert (tmp_path / "mlruns.db").is_file() and (tmp_path / "mlartifacts").is_dir()
    # (a second demo trains anew as version 2: test_checkpoint's finished-run tests)


def test_federated_spec_errors_exit_2_before_anything_starts(tmp_path):
    out = _atoll("run", str(CONFIGS / "federated.yaml"), "--set", "federated.strategy=fedmean",
                 cwd=tmp_path)
    assert out.returncode == 2
    assert "federated.strategy: 'fedmean' is not valid" in out.stderr
    assert "did you mean 'fedmedian'?" in out.stderr


BRANCHY = """
import math

import torch.nn as nn


class Branchy(nn.Module):
    \"\"\"Picks a head by the batch's values: data-dependent control flow.\"\"\"

    def __init__(self, input_shape, num_outputs):
        super().__init__()
        self.a = nn.Linear(math.prod(input_shape), num_outputs)
        self.b = nn.Linear(math.prod(input_shape), num_outputs)

    def forward(self, x):
        x = x.flatten(1)
        return self.a(x) if x.sum() > 0 else self.b(x)
"""


def test_the_vectorized_engine_refuses_a_model_vmap_cannot_run(tmp_path):
    """One step of two clients at start-up: exit 2, one line naming the engine and the way
    out, before any round (nothing trained, no federation folder written)."""
    import yaml

    (tmp_path / "branchy.py").write_text(BRANCHY)
    spec = yaml.safe_load((CONFIGS / "federated.yaml").read_text())
    spec["model"] = {"target": "branchy:Branchy"}
    (tmp_path / "branchy.yaml").write_text(yaml.safe_dump(spec))
    out = _atoll("run", "branchy.yaml", "--set", "federated.engine=vectorized",
                 "--set", "tracking.enabled=false", cwd=tmp_path)
    assert out.returncode == 2, out.stderr[-2000:]
    line = out.stderr.strip().splitlines()[-1]
    assert line.startswith("atoll: federated.engine: 'vectorized' cannot train model Branchy"), \
        line
    assert "allowed:" in line and "federated.engine: flower" in line
    assert "Traceback" not in out.stderr
    assert not (tmp_path / ".atoll").exists()


def test_resume_flag_is_for_federated_runs(tmp_path):
    out = _atoll("run", str(CONFIGS / "demo.yaml"), "--resume", "latest", cwd=tmp_path)
    assert out.returncode == 2 and "--resume: applies to federated runs" in out.stderr


def test_run_refuses_more_stages_than_model_blocks(tmp_path):
    out = _atoll("run", str(CONFIGS / "demo.yaml"), "--set", "mode=cluster",
                 "--set", "cluster.strategy=pipeline", "--set", "cluster.num_workers=8",
                 "--set", "data.batch_size=64", cwd=tmp_path)
    assert out.returncode == 2
    assert "cluster.num_workers: 8 needs 8 pipeline stages but model 'mlp' has 4 blocks" \
        in out.stderr
    assert not (tmp_path / "mlruns.db").exists()  # refused before anything started


def test_every_command_has_help(tmp_path):
    for cmd in ([], ["run"], ["validate"], ["demo"], ["ui"], ["submit"], ["jobs"],
                ["jobs", "logs"]):
        out = _atoll(*cmd, "--help", cwd=tmp_path)
        assert out.returncode == 0 and "usage: atoll" in out.stdout, cmd


def test_validate_prints_the_resolved_spec(tmp_path):
    out = _atoll("validate", str(CONFIGS / "cnn.yaml"), "--set", "train.epochs=3", cwd=tmp_path)
    assert out.returncode == 0
    assert "valid" in out.stdout and "epochs: 3" in out.stdout


def _listen_addresses(port: int) -> set[str]:
    """IPv4 addresses with a socket listening on `port`, read from /proc/net/tcp(6)."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            addr, hex_port = local.split(":")
            if state == "0A" and int(hex_port, 16) == port:
                if len(addr) == 8:
                    found.add(".".join(str(int(addr[i:i + 2], 16)) for i in (6, 4, 2, 0)))
                else:
                    found.add(f"ipv6:{addr}")
    return found


def test_ui_serves_the_default_store_on_loopback(tmp_path):
    shutil.copy(CONFIGS / "demo.yaml", tmp_path)
    port = procs.free_port()
    log = tmp_path / "ui.log"
    proc = procs.start([*ATOLL, "ui", "--port", str(port)], log, cwd=tmp_path)
    try:
        procs.wait_http(f"http://127.0.0.1:{port}/health", proc, log)
        assert _listen_addresses(port) == {"127.0.0.1"}
    finally:
        procs.stop(proc)
    assert proc.poll() is not None


def test_task_streams_in_cluster_mode_need_ddp(tmp_path):
    out = _atoll("run", str(CONFIGS / "continual.yaml"), "--set", "mode=cluster",
                 "--set", "cluster.strategy=pipeline", cwd=tmp_path)
    assert out.returncode == 2
    assert "cluster.strategy: 'pipeline' with a task stream (continual.stream 'permuted'); " \
           "allowed with a stream: ddp" in out.stderr


FAST = ["--set", "train.progress=off", "--set", "tracking.enabled=false", "--set",
        "data.limit=200", "--set", "model.hidden=[16]"]


def _one_line(out: subprocess.CompletedProcess) -> str:
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in out.stderr, out.stderr[-3000:]
    return lines[0]


def test_fewer_epochs_keeps_an_unfinished_run_and_restart_discards_it(tmp_path):
    """Item 15: lowering train.epochs on an interrupted run refuses (exit 2) and deletes
    nothing; `--restart` is the explicit way to start over."""
    spec = str(CONFIGS / "demo.yaml")
    out = _atoll("run", spec, *FAST, "--set", "name=i4", "--set", "train.epochs=3", cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    root = tmp_path / ".atoll/checkpoints/i4"
    (root / "epoch-000003.ckpt").unlink()  # as if interrupted during epoch 3
    (root / "atoll-finished-epoch.json").unlink()
    fewer = _atoll("run", spec, *FAST, "--set", "name=i4", "--set", "train.epochs=1",
                   cwd=tmp_path)
    assert fewer.returncode == 2
    assert _one_line(fewer).startswith(
        "atoll: train.epochs: 1 is fewer than the 2 epochs run 'i4' has already trained")
    assert sorted(p.name for p in root.glob("*.ckpt")) == ["epoch-000002.ckpt"]
    restarted = _atoll("run", spec, *FAST, "--set", "name=i4", "--set", "train.epochs=1",
                       "--restart", cwd=tmp_path)
    assert restarted.returncode == 0, restarted.stderr[-3000:]
    assert "discarding 1 checkpoint of run i4 (--restart)" in restarted.stderr
    assert "epochs: 1" in restarted.stdout


def test_restart_and_resume_together_are_refused(tmp_path):
    out = _atoll("run", str(CONFIGS / "federated.yaml"), "--restart", "--resume", "latest",
                 cwd=tmp_path)
    assert out.returncode == 2
    assert "--restart" in _one_line(out) and "--resume" in _one_line(out)


def test_unwritable_checkpoint_dir_is_refused_before_training(tmp_path):
    """Item 17: one line, exit 2, before anything (MLflow run, training) starts."""
    (tmp_path / "blocker").write_text("a file where a directory should be")
    out = _atoll("run", str(CONFIGS / "demo.yaml"), "--set", "train.progress=off",
                 "--set", "train.checkpoint_dir=blocker/ckpts", cwd=tmp_path)
    assert out.returncode == 2
    assert _one_line(out).startswith(
        "atoll: train.checkpoint_dir: cannot write to blocker/ckpts/demo-digits-mlp (")
    assert not (tmp_path / "mlruns.db").exists()


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_read_only_checkpoint_dir_is_refused_before_training(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        out = _atoll("run", str(CONFIGS / "demo.yaml"), *FAST, "--set",
                     "train.checkpoint_dir=ro", cwd=tmp_path)
    finally:
        ro.chmod(0o755)
    assert out.returncode == 2 and "Permission denied" in _one_line(out)


def test_unknown_tracking_uri_scheme_from_the_environment_is_one_line(tmp_path):
    """Item 27: MLFLOW_TRACKING_URI=foo://bar (the spec field is checked on validation)."""
    env = {**os.environ, "MLFLOW_TRACKING_URI": "foo://bar"}
    out = subprocess.run([*ATOLL, "run", str(CONFIGS / "demo.yaml"), "--set",
                          "train.progress=off"], capture_output=True, text=True, cwd=tmp_path,
                         timeout=300, check=False, env=env)
    assert out.returncode == 2
    assert _one_line(out).startswith("atoll: MLFLOW_TRACKING_URI: 'foo://bar' is not valid; "
                                     "allowed: ")
    spec = _atoll("run", str(CONFIGS / "demo.yaml"), "--set", "tracking.uri=foo://bar",
                  cwd=tmp_path)
    assert spec.returncode == 2 and "tracking.uri: 'foo://bar' is not valid" in _one_line(spec)


def test_missing_sqlite_directory_says_so(tmp_path):
    out = _atoll("run", str(CONFIGS / "demo.yaml"), "--set", "train.progress=off",
                 "--set", "tracking.uri=sqlite:///nowhere/runs.db", cwd=tmp_path)
    assert out.returncode == 2
    line = _one_line(out)
    assert line.startswith("atoll: tracking.uri: sqlite:///")
    assert "nowhere does not exist" in line and "not writable" not in line


def test_jobs_against_an_unreachable_address_is_one_line(tmp_path):
    """Item 27: no traceback, and submit leaves no spec file behind."""
    address = f"http://127.0.0.1:{procs.free_port()}"
    listed = _atoll("jobs", "list", "--address", address, cwd=tmp_path)
    assert listed.returncode == 1
    assert _one_line(listed).startswith(f"atoll: error: cannot reach the Ray Job API at "
                                        f"{address}")
    submitted = _atoll("submit", str(CONFIGS / "demo.yaml"), "--address", address,
                       cwd=tmp_path)
    assert submitted.returncode == 1 and "cannot reach the Ray Job API" in _one_line(submitted)
    assert list((tmp_path / ".atoll").rglob("*.yaml")) == []


def test_run_says_which_epoch_it_ends_with(tmp_path):
    """Item 8: a run that restores its best epoch says so."""
    out = _atoll("run", str(CONFIGS / "demo.yaml"), *FAST, "--set", "train.epochs=6",
                 "--set", "train.early_stopping.metric=train_loss", "--set",
                 "train.early_stopping.mode=max", "--set", "train.early_stopping.patience=2",
                 cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "weights: epoch 1 of 3, the best by train_loss" in out.stdout


def test_sigint_stops_a_run_started_with_sigint_ignored(tmp_path):
    """A job started in the background of a script inherits SIGINT ignored (POSIX); a
    later `kill -INT` must still end it as Ctrl-C does: KILLED, a resume hint, exit 130
    (found when the suite itself ran in the background: the federated Ctrl-C test's run
    finished all its rounds and exited 0)."""
    import signal
    import time

    from mlflow.tracking import MlflowClient

    proc = subprocess.Popen(
        [*ATOLL, "run", str(CONFIGS / "demo.yaml"), "--set", "name=bg", "--set",
         "train.epochs=200", "--set", "train.progress=log", "--set", "tracking.log_model=false"],
        cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        start_new_session=True,  # its own group: procs.stop can end it if this test fails
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    try:
        seen, deadline = "", time.monotonic() + 120
        while "epoch 2/200" not in seen and time.monotonic() < deadline:
            line = proc.stderr.readline()
            if not line:
                break
            seen += line
        assert "epoch 2/200" in seen, seen[-3000:]
        proc.send_signal(signal.SIGINT)
        try:
            err = seen + proc.communicate(timeout=120)[1]
        except subprocess.TimeoutExpired:
            procs.stop(proc)
            pytest.fail("still running 120 s after SIGINT:\n" + (seen + proc.stderr.read())[-3000:])
    finally:
        procs.stop(proc)
    assert proc.returncode == 130, err[-3000:]
    assert "atoll: interrupted; re-run the same command to resume from" in err, err[-3000:]
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlruns.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("atoll-demo").experiment_id])
    assert run.info.status == "KILLED"
