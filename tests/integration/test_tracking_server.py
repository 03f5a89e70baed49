"""A real `mlflow server` on 127.0.0.1 receives a run over HTTP; an unreachable server fails
fast before any training, or falls back to the local store when the spec says so."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from atoll.core.runner import run_local
from atoll.tracking import TrackingUnavailable
from tests.integration import procs

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    root = tmp_path_factory.mktemp("mlflow-server")
    port = procs.free_port()
    log = root / "server.log"
    proc = procs.start(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1", "--backend-store-uri", f"sqlite:///{root / 'server.db'}",
         "--artifacts-destination", str(root / "artifacts"), "--serve-artifacts"],
        log, env={"MLFLOW_DISABLE_TELEMETRY": "true"}, cwd=root)
    try:
        procs.wait_http(f"http://127.0.0.1:{port}/health", proc, log)
        yield f"http://127.0.0.1:{port}", root
    finally:
        procs.stop(proc)


def test_run_lands_on_the_server_over_http(mlflow_server, tiny_spec, tmp_path):
    from mlflow.tracking import MlflowClient

    uri, root = mlflow_server
    spec = tiny_spec(f"tracking.uri={uri}", "tracking.registered_model=server-mlp",
                     "data.limit=200")
    result = run_local(spec)
    client = MlflowClient(uri)
    run = client.get_run(result.run_id)
    assert run.info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(result.run_id, "train_loss")] == [1, 2]
    assert client.get_model_version_by_alias("server-mlp", "candidate").version is not None
    # artifacts went through the server into its own store, not into this directory
    assert any((root / "artifacts").rglob("curves.png"))
    assert not (tmp_path / "mlartifacts").exists() and not (tmp_path / "mlruns.db").exists()


def test_unreachable_server_fails_before_training(tiny_spec, tmp_path):
    port = procs.free_port()  # nothing listens here
    spec = tiny_spec(f"tracking.uri=http://127.0.0.1:{port}")
    t0 = time.monotonic()
    with pytest.raises(TrackingUnavailable, match=f"127.0.0.1:{port} is unreachable"):
        run_local(spec)
    assert time.monotonic() - t0 < 30
    assert not (tmp_path / ".atoll/checkpoints/atoll").exists() or not any(
        (tmp_path / ".atoll/checkpoints/atoll").iterdir())


def test_unreachable_server_cli_message_and_exit_code(tmp_path):
    port = procs.free_port()
    out = subprocess.run(
        [sys.executable, "-m", "atoll.core.cli", "run", str(Path(__file__).parents[2] /
                                                       "configs/demo.yaml"),
         "--set", f"tracking.uri=http://127.0.0.1:{port}"],
        capture_output=True, text=True, cwd=tmp_path, timeout=120, check=False)
    assert out.returncode == 1
    assert f"atoll: error: tracking server http://127.0.0.1:{port} is unreachable" in out.stderr
    assert "epoch 1/" not in out.stderr  # nothing trained


def test_fallback_local_keeps_the_metrics(tiny_spec, tmp_path, caplog):
    from mlflow.tracking import MlflowClient

    port = procs.free_port()
    spec = tiny_spec(f"tracking.uri=http://127.0.0.1:{port}", "tracking.fallback=local",
                     "data.limit=200")
    result = run_local(spec)
    assert "logging to the local store" in caplog.text
    run = MlflowClient(f"sqlite:///{tmp_path / 'mlruns.db'}").get_run(result.run_id)
    assert run.data.metrics["test_accuracy"] == pytest.approx(result.metrics["test_accuracy"])
