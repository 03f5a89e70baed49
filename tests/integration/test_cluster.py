"""Cluster mode against a real `ray start --head` on 127.0.0.1 that this module starts.

The head runs in its own session with its own ports and temp dir, with the venv first on
PATH (a job's `atoll` is whatever the head's PATH has), and is stopped by its own pid.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from atoll.cluster import jobs
from atoll.core.procs import free_port, stop, wait_http
from atoll.core.spec import load_spec
from tests import datagen
from tests.conftest import CONFIGS
from tests.integration.conftest import start_ray

pytestmark = pytest.mark.integration

BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory):
    tmp = tempfile.mkdtemp(prefix="atoll-rc-")  # short: Ray's socket paths
    port, dash, agent, agent_grpc, env_agent, metrics = (free_port() for _ in range(6))
    log = Path(tmp) / "head.log"
    env = {"PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "RAY_USAGE_STATS_ENABLED": "0",
           # the dashboard's modules get 30 s to start, too few on a loaded 2-core machine
           # (two xdist workers starting heads at once: /api/version never answered)
           "RAY_DASHBOARD_SUBPROCESS_MODULE_WAIT_READY_TIMEOUT": "180"}
    head = start_ray(["--head", "--num-cpus=2", "--node-ip-address=127.0.0.1", f"--port={port}",
                      "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
                      f"--temp-dir={tmp}", "--disable-usage-stats",
                      # own ports for every agent: another Ray on this machine (a Flower
                      # simulation, a second test run) must not take the job agent's default
                      f"--dashboard-agent-listen-port={agent}",
                      f"--dashboard-agent-grpc-port={agent_grpc}",
                      f"--runtime-env-agent-port={env_agent}", f"--metrics-export-port={metrics}"],
                     log, lambda p: wait_http(f"http://127.0.0.1:{dash}/api/version", p, log,
                                              timeout=240), env=env, cwd=Path(tmp))
    try:
        yield {"gcs": f"127.0.0.1:{port}", "http": f"http://127.0.0.1:{dash}", "tmp": tmp}
    finally:
        stop(head)
        # the head's own logs outlive it in pytest's kept temp dirs (a refused job's
        # cause is in dashboard_agent.log / raylet.out, not in the job's output)
        logs = Path(tmp) / "session_latest" / "logs"
        if logs.is_dir():
            shutil.copytree(logs, tmp_path_factory.mktemp("ray-head-logs"),
                            dirs_exist_ok=True, ignore=shutil.ignore_patterns("*.sock"))
        shutil.rmtree(tmp, ignore_errors=True)


def _store(cwd: Path) -> MlflowClient:
    return MlflowClient(f"sqlite:///{cwd / 'mlruns.db'}")


def _run_of(client: MlflowClient, name: str):
    exp = client.get_experiment_by_name("tests-cluster")
    runs = client.search_runs([exp.experiment_id], f"attributes.run_name = '{name}'")
    assert len(runs) == 1, [r.info.run_id for r in runs]
    return runs[0]


def test_submitted_job_trains_tracks_and_registers(ray_head, tmp_path):
    """`atoll submit --wait` of examples/tabular-regression (its csv, its own
    models.tabular:ResidualMLP, uploaded as the job's working_dir) on 2 FSDP2 workers:
    regression to R² >= 0.9, tracked and registered. DDP runs in the killed-worker tests,
    the pipeline through plain `ray job submit` below: one job per layout keeps the
    module's wall time down."""
    strategy = "fsdp"
    root = datagen.example("tabular-regression", tmp_path)
    out = subprocess.run(
        [str(BIN / "atoll"), "submit", "spec.yaml", "--set", "mode=cluster",
         "--set", f"name=job-{strategy}", "--set", f"cluster.strategy={strategy}",
         "--set", "train.progress=off", "--set", "tracking.experiment=tests-cluster",
         "--address", ray_head["http"], "--wait"],
        cwd=root, capture_output=True, text=True, timeout=600, check=False)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-3000:]
    assert "SUCCEEDED" in out.stdout and "registered: prices version 1" in out.stdout
    job_id = out.stdout.split("submitted: ")[1].split()[0]
    assert any(r["id"] == job_id and r["status"] == "SUCCEEDED"
               for r in jobs.listing(ray_head["http"]))
    client = _store(root)
    run = _run_of(client, f"job-{strategy}")
    assert run.info.status == "FINISHED"
    p = run.data.params
    assert p["cluster.per_rank_batch"] == "16"  # the global 32 over 2 replicas
    assert (p["cluster.layout.parallel"], p["model.class"], p["data.task"]) == \
        ("fsdp2", "models.tabular.ResidualMLP", "regression")
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "val_r2")]
    assert steps == list(range(1, 16))
    assert run.data.metrics["test_r2"] > 0.9 and "test_accuracy" not in run.data.metrics
    assert run.data.metrics["samples_per_s"] > 0
    mv = client.get_model_version_by_alias("prices", "candidate")
    assert mv.run_id == run.info.run_id and mv.tags["mode"] == "cluster"


def _submit_and_kill_rank_1(ray_head, spec, tmp_path: Path, after_checkpoints: int
                            ) -> tuple[Path, str]:
    """Submit `spec`, SIGKILL rank 1 once `after_checkpoints` checkpoints exist, and wait:
    the job must succeed with a new process in rank 1. Returns the run's storage dir and
    the job's log."""
    job = jobs.submit(spec, ray_head["http"], working_dir=tmp_path,
                      entrypoint_cmd=str(BIN / "atoll"))
    run_dir = tmp_path / ".atoll" / "ray_results" / spec.name
    pid_file = run_dir / "workers" / "rank-1.pid"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and \
            len(list(run_dir.glob("checkpoint_*"))) < after_checkpoints:
        assert jobs.status(ray_head["http"], job) in ("PENDING", "RUNNING"), \
            jobs.client(ray_head["http"]).get_job_logs(job)[-3000:]
        time.sleep(0.1)
    victim = int(pid_file.read_text())
    os.kill(victim, signal.SIGKILL)
    final = jobs.wait(ray_head["http"], job, timeout=600)
    assert final == "SUCCEEDED", jobs.client(ray_head["http"]).get_job_logs(job)[-4000:]
    assert int(pid_file.read_text()) != victim  # a new worker took rank 1
    return run_dir, jobs.client(ray_head["http"]).get_job_logs(job)


def test_killed_worker_recovers_from_its_checkpoint(ray_head, tmp_path):
    """FSDP2 (built on the meta device, sharded DCP checkpoints): SIGKILL rank 1
    mid-training; the worker group restarts from the last checkpoint, every rank reading
    its shards back, and the run ends as a clean one would, the driver consolidating the
    model once to test it. (That a resumed loop equals an uninterrupted one is
    test_checkpoint's and test_faults_cluster's; a second, clean cluster run here cost
    ~40 s of suite time and showed nothing more.)"""
    from atoll.core.checkpoint import load

    overrides = ["mode=cluster", "train.epochs=6", "train.progress=off",
                 "cluster.strategy=fsdp",
                 "tracking.experiment=tests-cluster", "tracking.log_model=false",
                 "cluster.max_failures=2", "train.checkpoint_every=1 epoch"]
    spec = load_spec(CONFIGS / "demo.yaml", [*overrides, "name=killed"])
    run_dir, logs = _submit_and_kill_rank_1(ray_head, spec, tmp_path, after_checkpoints=2)
    client = _store(tmp_path)
    run = _run_of(client, "killed")
    assert run.info.status == "FINISHED"
    assert run.data.params["cluster.layout.init"] == "meta"
    kept = sorted(d for d in run_dir.glob("checkpoint_*") if d.is_dir())
    assert kept
    for d in kept:  # both ranks' shards, merged by Ray Train; no gathered model
        names = {p.name for p in d.iterdir()}
        assert {"state.ckpt", ".metadata", "shards-0.json", "shards-1.json"} <= names, names
        assert sum(n.endswith(".distcp") for n in names) == 2, names
        payload = load(d / "state.ckpt")
        assert "model" not in payload and "optimizer" not in payload
        assert payload["sharded"] == {"world": 2}
    assert "the worker group resumed from checkpoint_" in logs and "sharded)" in logs, \
        logs[-3000:]
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "train_loss")]
    assert steps == list(range(1, 7))  # every epoch once, in order: no gaps, no repeats
    assert run.data.metrics["test_accuracy"] >= 0.9  # the demo MLP: ~0.96 after 6 epochs
    assert json.loads((run_dir / "atoll-finished.json").read_text())["epoch"] == 6


def _user_project(root: Path) -> Path:
    """examples/own-model, plus a `core/` package of the user's own: on a Ray worker the
    job's working_dir comes first on sys.path, so atoll must never import it (atoll's
    packages are atoll.core, atoll.models; the project's models/ holds its model)."""
    project = datagen.example("own-model", root)
    (project / "core").mkdir()
    (project / "core" / "__init__.py").write_text(
        "raise ImportError('the user project\\'s own core package was imported')\n")
    return project


def test_plain_ray_job_submit(ray_head, tmp_path):
    """The README's `ray job submit ... -- atoll run SPEC`, with a 2-stage 1F1B pipeline,
    from a user project (examples/own-model) that has its own `core/` and `models/`
    packages: the model trained is the user's (`models.convnet:BandNet`, cut at its
    declared stages), atoll's own packages are `atoll.core`, `atoll.models`."""
    strategy = "pipeline"
    store, storage = tmp_path / "mlruns.db", tmp_path / "ray_results"
    project = _user_project(tmp_path / "project")
    out = subprocess.run(
        [str(BIN / "ray"), "job", "submit", "--address", ray_head["http"],
         "--working-dir", str(project), "--", "atoll", "run", "spec.yaml",
         "--set", "mode=cluster", "--set", "name=job-pipe",
         "--set", f"cluster.strategy={strategy}", "--set", "cluster.schedule=1f1b",
         "--set", "train.progress=off", "--set", "tracking.experiment=tests-cluster",
         "--set", f"tracking.uri=sqlite:///{store}", "--set", f"cluster.storage_path={storage}"],
        cwd=tmp_path, capture_output=True, text=True, timeout=600, check=False,
        env={**os.environ, "RAY_ADDRESS": ""})
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-3000:]
    assert "succeeded" in out.stdout.lower()
    client = _store(tmp_path)
    run = _run_of(client, "job-pipe")
    assert run.info.status == "FINISHED"
    p = run.data.params
    assert (p["cluster.layout.parallel"], p["cluster.layout.pp"],
            p["cluster.layout.schedule"]) == ("pipeline", "2", "1f1b")
    assert p["cluster.per_rank_batch"] == "16"  # the global batch, whole through the stages
    assert (p["model.class"], p["model.kwargs.channels"], p["cluster.layout.stage_blocks"]) \
        == ("models.convnet.BandNet", "6", "features|head")
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train_loss")] == \
        list(range(1, 9))
    assert run.data.metrics["test_accuracy"] > 0.85
    assert client.get_model_version_by_alias("bands", "candidate").run_id == run.info.run_id
    assert (storage / "job-pipe" / "atoll-finished.json").is_file()


def test_continual_stream_on_workers_survives_a_killed_worker(ray_head, tmp_path):
    """EWC + replay over 3 permuted tasks on 2 DDP workers; rank 1 dies after task 1."""
    spec = load_spec(CONFIGS / "continual.yaml", [
        "mode=cluster", "name=cl-killed", "continual.n_tasks=3", "train.progress=off",
        "tracking.experiment=tests-cluster", "cluster.max_failures=2"])
    run_dir, _ = _submit_and_kill_rank_1(ray_head, spec, tmp_path, after_checkpoints=1)
    client = _store(tmp_path)
    run = _run_of(client, "cl-killed")
    history = {k: [m.step for m in client.get_metric_history(run.info.run_id, k)]
               for k in ("acc_seen", "train_loss")}
    assert history == {"acc_seen": [1, 2, 3], "train_loss": list(range(1, 10))}  # each once
    assert run.data.metrics["cl_acc"] > 0.8 and "cl_bwt" in run.data.metrics
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "plots")}
    assert "plots/accuracy_matrix.png" in artifacts
    # the final checkpoint: both ranks' strategy state, EWC's Fisher shared, replay per rank
    from atoll.cluster.runner import _checkpoints

    payload = _checkpoints(run_dir)[-1][2]
    assert payload["next_task"] == 3 and len(payload["r"]) == 3
    ranks = payload["strategy_per_rank"]
    assert len(ranks) == 2
    (ewc0, replay0), (ewc1, replay1) = (ranks[0]["0"], ranks[0]["1"]), (ranks[1]["0"],
                                                                         ranks[1]["1"])
    for f0, f1 in zip(ewc0["fishers"], ewc1["fishers"], strict=True):
        for k in f0:
            assert torch.equal(f0[k], f1[k])
    assert not torch.equal(replay0["x"], replay1["x"])
