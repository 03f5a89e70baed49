"""Local mode end to end: real training on digits, tracked in a real sqlite MLflow store."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from atoll.core.data import load_data
from atoll.core.runner import RunFailed, run_local
from atoll.core.spec import load_spec
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
        spec = load_spec(CONFIGS / "demo.yaml", ["train.progress=off",
                                                 "tracking.system_metrics_interval=1"])
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
    # the machine's figures, sampled every second while the run lasted (MLflow's monitor)
    cpu = client.get_metric_history(result.run_id, "system/cpu_utilization_percentage")
    assert cpu and all(0 <= m.value <= 100 * (os.cpu_count() or 1) for m in cpu)
    assert run.data.metrics["system/system_memory_usage_megabytes"] > 0


def test_registered_model_loads_by_alias_and_reproduces_accuracy(demo_run):
    import mlflow
    import mlflow.pyfunc
    from mlflow.tracking import MlflowClient

    spec, result, where = demo_run
    uri = f"sqlite:///{where / 'mlruns.db'}"
    client = MlflowClient(uri)
    version = client.get_model_version_by_alias("digits-mlp", "candidate")
    assert str(version.version) == result.registered.version
    assert version.tags["mode"] == "local" and version.tags["epoch"] == "15"
    # the metric the version was selected by (no early stopping: the last epoch's val_loss)
    assert version.tags["selected_by"] == "val_loss" and version.tags["selection"] == "last"
    assert version.tags["selected_epoch"] == "15"
    assert float(version.tags["selected_value"]) == pytest.approx(
        result.history[-1]["val_loss"], rel=1e-5)
    mlflow.set_tracking_uri(uri)
    try:  # the pyfunc takes raw (un-normalised) images and returns the digit
        model = mlflow.pyfunc.load_model("models:/digits-mlp@candidate")
    finally:
        mlflow.set_tracking_uri(None)  # it also exported MLFLOW_TRACKING_URI; undo both
    data = load_data(spec.data, spec.seed, spec.project_dir, spec.task)
    raw = (data.test.x * data.std + data.mean).numpy()
    assert raw.min() >= -1e-6 and raw.max() <= 1 + 1e-6  # digits pixels as read, in [0, 1]
    labels = model.predict(raw)
    acc = float((labels == data.test.y.numpy()).mean())
    assert acc == pytest.approx(result.metrics["test_accuracy"], abs=1e-6)
    probs = model.predict(raw[:5], params={"probabilities": True})
    assert list(probs.columns) == list(range(10))
    assert probs.to_numpy().sum(1) == pytest.approx([1.0] * 5, abs=1e-5)
    assert (probs.to_numpy().argmax(1) == labels[:5]).all()


def test_nan_loss_stops_cleanly_and_keeps_the_last_good_checkpoint(tmp_path):
    from mlflow.tracking import MlflowClient

    from atoll.core.checkpoint import load

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


class InterruptingTracker:
    """A real MlflowTracker whose process is interrupted right after epoch `epoch`'s
    metrics are logged, before its checkpoint is written."""

    def __new__(cls, spec, epoch: int):
        from atoll.tracking import make_tracker

        tracker = make_tracker(spec.tracking, spec.name, mode="local")
        log_metrics = tracker.log_metrics

        def interrupting(metrics: dict[str, float], step: int) -> None:
            log_metrics(metrics, step)
            if "train_loss" in metrics and step == epoch:
                raise KeyboardInterrupt

        tracker.log_metrics = interrupting
        return tracker


def test_resumed_run_continues_the_same_mlflow_run_logging_each_step_once(tiny_spec, tmp_path):
    """Item 10: the epoch re-trained after a resume (and its steps) is in MLflow once."""
    from mlflow.tracking import MlflowClient

    spec = tiny_spec("train.epochs=4", "data.limit=300", "train.log_every_n_steps=1")
    with pytest.raises(KeyboardInterrupt):
        run_local(spec, tracker=InterruptingTracker(spec, epoch=3))
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlruns.db'}")
    (first,) = client.search_runs([client.get_experiment_by_name("tests").experiment_id])
    assert first.info.status == "KILLED"
    assert [m.step for m in client.get_metric_history(first.info.run_id, "train_loss")] == [
        1, 2, 3]  # epoch 3 was logged but never checkpointed
    second = run_local(spec)
    assert second.run_id == first.info.run_id
    history = client.get_metric_history(first.info.run_id, "train_loss")
    assert sorted(m.step for m in history) == [1, 2, 3, 4]
    steps = [m.step for m in client.get_metric_history(first.info.run_id, "step_loss")]
    assert len(steps) == len(set(steps)) and max(steps) == 4 * 5  # 270 samples / 64 per step
    assert client.get_run(first.info.run_id).info.status == "FINISHED"


def test_finished_run_with_a_corrupt_final_checkpoint_is_a_new_mlflow_run(tiny_spec, tmp_path):
    """Item 16: re-running a finished name trains anew even when its last checkpoint is
    damaged; the finished MLflow run gets nothing more and its model version stays alone."""
    from mlflow.tracking import MlflowClient

    spec = tiny_spec("train.epochs=2", "data.limit=200", "tracking.registered_model=t16")
    first = run_local(spec)
    first.checkpoint.write_bytes(first.checkpoint.read_bytes()[:-100])
    second = run_local(spec)
    assert second.run_id != first.run_id
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlruns.db'}")
    for run_id in (first.run_id, second.run_id):
        assert len(client.get_metric_history(run_id, "test_accuracy")) == 1
        assert [m.step for m in client.get_metric_history(run_id, "train_loss")] == [1, 2]
    versions = client.search_model_versions("name='t16'")
    assert sorted((v.run_id, str(v.version)) for v in versions) == sorted(
        [(first.run_id, "1"), (second.run_id, "2")])


def test_finished_run_from_before_markers_is_not_resumed(tiny_spec, tmp_path):
    """A complete checkpoint without a marker whose MLflow run FINISHED (a run written
    before the marker existed) starts anew rather than logging into the finished run."""
    spec = tiny_spec("train.epochs=2", "data.limit=200")
    first = run_local(spec)
    (tmp_path / ".atoll/checkpoints/atoll/atoll-finished-epoch.json").unlink()
    assert run_local(spec).run_id != first.run_id


def test_early_stopping_registers_the_best_epoch_tagged_with_its_metric(tiny_spec, tmp_path):
    """Item 8 and 2: the registered version holds epoch 1's weights (the best by the
    early-stopping metric), and says so."""
    import mlflow
    import mlflow.pyfunc
    from mlflow.tracking import MlflowClient

    spec = tiny_spec("train.epochs=6", "data.limit=300", "tracking.registered_model=best",
                     "train.early_stopping.metric=train_loss", "train.early_stopping.mode=max",
                     "train.early_stopping.patience=2")
    result = run_local(spec)
    assert result.epochs == 3
    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    client = MlflowClient(uri)
    version = client.get_model_version("best", result.registered.version)
    assert version.tags["selected_by"] == "train_loss" and version.tags["selection"] == "best"
    assert version.tags["selected_epoch"] == "1" and version.tags["epoch"] == "1"
    assert version.tags["epochs_trained"] == "3"
    assert float(version.tags["selected_value"]) == pytest.approx(
        result.history[0]["train_loss"], rel=1e-5)
    run = client.get_run(result.run_id)
    assert run.data.tags["atoll.selected_epoch"] == "1"
    assert run.data.tags["atoll.selected_by"] == "train_loss"
    mlflow.set_tracking_uri(uri)
    try:
        model = mlflow.pyfunc.load_model("models:/best@candidate")
    finally:
        mlflow.set_tracking_uri(None)
    data = load_data(spec.data, spec.seed, spec.project_dir, spec.task)
    labels = model.predict((data.test.x * data.std + data.mean).numpy())
    acc = float((labels == data.test.y.numpy()).mean())
    assert acc == pytest.approx(result.metrics["test_accuracy"], abs=1e-6)


def test_a_model_that_completed_nothing_is_never_registered(tmp_path):
    """Item 2, in tracking/: every harness registers through log_model with a Selection."""
    from mlflow.tracking import MlflowClient

    from atoll.core.spec import TrackingSpec
    from atoll.tracking import NothingToRegister, Selection, make_tracker

    tracker = make_tracker(TrackingSpec(experiment="tests"), "nothing", mode="federated")
    with pytest.raises(NothingToRegister, match="no round completed"):
        tracker.log_model(torch.nn.Linear(2, 2), None,
                          registered_name="never", alias="candidate", tags={},
                          selection=Selection("central_accuracy", None, 0, "round"))
    tracker.finish("FAILED")
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlruns.db'}")
    assert client.search_registered_models("name='never'") == []


def test_a_compiled_run_trains_like_an_eager_one_and_registers(tiny_spec, tmp_path):
    """train.compile compiles the model in place: the same weights as eager (to rounding),
    checkpoints with the eager keys (a resume or another mode can load them), and a
    registered model exported from the compiled module."""
    common = ["data.limit=300", "train.epochs=2", "tracking.log_model=false"]
    eager = run_local(tiny_spec(*common, "name=eager"))
    compiled = run_local(tiny_spec(*common, "name=compiled", "train.compile=true",
                                   "tracking.log_model=true",
                                   "tracking.registered_model=compiled"))
    from atoll.core.checkpoint import load

    a, b = load(eager.checkpoint)["model"], load(compiled.checkpoint)["model"]
    assert list(a) == list(b)
    for k, v in a.items():
        torch.testing.assert_close(b[k], v, rtol=1e-4, atol=1e-5)
    assert compiled.registered is not None and compiled.registered.version == "1"


def test_a_tracker_that_joined_a_run_closes_without_ending_it(tmp_path):
    """A Ray Train rank 0 logs into the driver's run: `close()` stops its system-metrics
    monitor with the last samples written and every metric landed, and leaves the run's
    status to the driver."""
    import threading
    import time

    from mlflow.tracking import MlflowClient

    from atoll.tracking import make_tracker

    spec = load_spec(None, [f"tracking.uri=sqlite:///{tmp_path / 'm.db'}",
                            "tracking.system_metrics_interval=1"]).tracking
    driver = make_tracker(spec, "joined", mode="cluster")
    worker = make_tracker(spec, "joined", mode="cluster", run_id=driver.run_id, trains=True)
    worker.log_metrics({"train_loss": 0.5}, step=1)
    time.sleep(2.5)
    worker.close()
    assert not [t for t in threading.enumerate() if t.name == "SystemMetricsMonitor"]
    client = MlflowClient(f"sqlite:///{tmp_path / 'm.db'}")
    run = client.get_run(driver.run_id)
    assert run.info.status == "RUNNING"
    assert "train_loss" in run.data.metrics
    assert any(k.startswith("system/") for k in run.data.metrics), run.data.metrics
    driver.finish("FINISHED")
