"""Local mode end to end: real training on digits, tracked in a real sqlite MLflow store."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from core.data import load_data
from core.runner import RunFailed, run_local
from core.spec import load_spec
from tests.conftest import CONFIGS

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """`configs/demo.yaml` as shipped, tracked into a module-owned sqlite store."""
    import os

    where = tmp_path_factory.mktemp("demo")
    cwd = os.getcwd()
    os.chdir(where)
    try:
        spec = load_spec(CONFIGS / "demo.yaml", ["train.progress=off"])
        yield spec, run_local(spec), where
    finally:
        os.chdir(cwd)


def test_demo_mlp_reaches_95_percent(demo_run):
    _, result, _ = demo_run
    assert result.metrics["test_accuracy"] >= 0.95
    assert result.epochs == 15


def test_cnn_config_reaches_97_percent():
    spec = load_spec(CONFIGS / "cnn.yaml", ["train.progress=off", "tracking.enabled=false"])
    assert run_local(spec).metrics["test_accuracy"] >= 0.97


def test_run_is_fully_recorded_in_mlflow(demo_run):
    from mlflow.tracking import MlflowClient

    spec, result, where = demo_run
    client = MlflowClient(f"sqlite:///{where / 'mlruns.db'}")
    run = client.get_run(result.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["model.name"] == "mlp"
    assert run.data.params["optim.scheduler.name"] == "cosine"
    assert int(run.data.params["model.parameters"]) > 0
    assert run.data.tags["atoll.mode"] == "local"
    assert run.data.tags["torch.version"].startswith("2.13.0")
    history = client.get_metric_history(result.run_id, "val_accuracy")
    assert [m.step for m in history] == list(range(1, 16))
    steps = client.get_metric_history(result.run_id, "step_loss")
    assert len(steps) > 20 and steps == sorted(steps, key=lambda m: m.step)
    assert run.data.metrics["test_accuracy"] == pytest.approx(result.metrics["test_accuracy"])
    names = {a.path for a in client.list_artifacts(result.run_id)}
    assert {"spec.yaml", "plots"} <= names
    plots = {a.path for a in client.list_artifacts(result.run_id, "plots")}
    assert plots == {"plots/curves.png"}
    png = client.download_artifacts(result.run_id, "plots/curves.png", str(where))
    assert Path(png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (where / "mlartifacts").is_dir()  # artifacts next to the store, not elsewhere


def test_registered_model_loads_by_alias_and_reproduces_accuracy(demo_run):
    import mlflow
    import mlflow.pytorch
    from mlflow.tracking import MlflowClient

    spec, result, where = demo_run
    uri = f"sqlite:///{where / 'mlruns.db'}"
    client = MlflowClient(uri)
    version = client.get_model_version_by_alias("digits-mlp", "candidate")
    assert str(version.version) == result.registered.version
    assert version.tags["mode"] == "local" and version.tags["epoch"] == "15"
    mlflow.set_tracking_uri(uri)
    try:
        model = mlflow.pytorch.load_model("models:/digits-mlp@candidate")
    finally:
        mlflow.set_tracking_uri(None)  # it also exported MLFLOW_TRACKING_URI; undo both
    data = load_data(spec.data, spec.seed)
    with torch.no_grad():
        acc = (model(data.test.x).argmax(1) == data.test.y).float().mean().item()
    assert acc == pytest.approx(result.metrics["test_accuracy"], abs=1e-6)


def test_nan_loss_stops_cleanly_and_keeps_the_last_good_checkpoint(tmp_path):
    from mlflow.tracking import MlflowClient

    from core.checkpoint import load

    # plain SGD at lr=1 diverges in epoch 3 on this seed (single-threaded: deterministic)
    spec = load_spec(CONFIGS / "demo.yaml", [
        "name=diverge", "optim.name=sgd", "optim.lr=1", "optim.scheduler.name=none",
        "model.dropout=0", "train.epochs=6", "train.threads=1", "train.progress=off",
        "tracking.registered_model=null"])
    with pytest.raises(RunFailed) as e:
        run_local(spec)
    msg = str(e.value)
    assert "non-finite loss nan at epoch 3" in msg
    kept = tmp_path / ".atoll/checkpoints/diverge/epoch-000002.ckpt"
    assert f"last good checkpoint kept: {kept.relative_to(tmp_path)}" in msg
    payload = load(kept)
    assert payload["state"]["epoch"] == 2
    assert all(torch.isfinite(v).all() for v in payload["model"].values())
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlruns.db'}")
    run = client.get_run(payload["run_id"])
    assert run.info.status == "FAILED"
    assert "non-finite loss" in run.data.tags["atoll.failure"]


def test_resumed_run_continues_the_same_mlflow_run(tiny_spec, tmp_path):
    from mlflow.tracking import MlflowClient

    from core.checkpoint import CheckpointDir

    spec = tiny_spec("train.epochs=4", "train.keep_checkpoints=4", "data.limit=300")
    first = run_local(spec)
    ckpts = CheckpointDir(tmp_path / ".atoll/checkpoints/atoll")
    for p in ckpts.all()[2:]:
        p.unlink()  # as if the process died after epoch 2
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlruns.db'}")
    client.set_terminated(first.run_id, status="KILLED")
    second = run_local(spec)
    assert second.run_id == first.run_id
    steps = [m.step for m in client.get_metric_history(first.run_id, "train_loss")]
    assert sorted(set(steps)) == [1, 2, 3, 4]
    assert client.get_run(first.run_id).info.status == "FINISHED"
