"""Task streams trained end to end in local mode, tracked in a real sqlite MLflow store."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from atoll.core.checkpoint import load
from atoll.core.continual_runner import run_continual
from atoll.core.spec import load_spec
from tests.conftest import CONFIGS

pytestmark = pytest.mark.integration


def cl_spec(*overrides: str):
    return load_spec(CONFIGS / "continual.yaml", ["train.progress=off",
                                                  "tracking.log_model=false", *overrides])


@pytest.fixture(scope="module")
def permuted(tmp_path_factory):
    """Domain-IL on permuted digits, 5 tasks: naive vs EWC vs replay (same seed)."""
    where = tmp_path_factory.mktemp("permuted")
    db = f"tracking.uri=sqlite:///{where / 'mlruns.db'}"
    base = ["continual.stream=permuted", "continual.scenario=domain", db,
            f"train.checkpoint_dir={where / 'ckpt'}"]
    runs = {name: run_continual(cl_spec(*base, f"continual.strategy={name}", f"name=p-{name}"))
            for name in ("naive", "ewc", "replay")}
    return runs | {"db": where / "mlruns.db"}


def test_ewc_and_replay_beat_naive_on_permuted_digits(permuted):
    runs = {k: v for k, v in permuted.items() if k != "db"}
    acc = {k: r.metrics["cl_acc"] for k, r in runs.items()}
    print(f"\npermuted digits ACC: {acc}")
    assert acc["ewc"] >= acc["naive"] + 0.05, acc
    assert acc["replay"] >= acc["naive"] + 0.05, acc
    forgetting = {k: r.metrics["cl_forgetting"] for k, r in runs.items()}
    assert forgetting["ewc"] < forgetting["naive"] and forgetting["replay"] < forgetting["naive"]


def test_the_matrix_and_its_plots_land_in_mlflow(permuted):
    result = permuted["ewc"]
    client = MlflowClient(f"sqlite:///{permuted['db']}")
    run = client.get_run(result.run_id)
    assert {"cl_acc", "cl_bwt", "cl_fwt", "cl_forgetting"} <= set(run.data.metrics)
    for j in range(5):
        hist = client.get_metric_history(result.run_id, f"acc_task_{j}")
        assert [m.step for m in hist] == [1, 2, 3, 4, 5]
        assert [m.value for m in hist] == [row[j] for row in result.details["matrix"]]
    arts = {a.path for a in client.list_artifacts(result.run_id, "plots")}
    assert {"plots/accuracy_matrix.png", "plots/task_accuracy.png"} <= arts
    text = client.download_artifacts(result.run_id, "continual/accuracy_matrix.txt")
    assert "after \\ on" in Path(text).read_text()


def test_replay_beats_naive_by_30_points_on_class_incremental_split(tmp_path):
    base = ["continual.stream=split", "continual.scenario=class", "continual.replay.size=200"]
    naive = run_continual(cl_spec(*base, "continual.strategy=naive", "name=s-naive"))
    replay = run_continual(cl_spec(*base, "continual.strategy=replay", "name=s-replay"))
    print(f"\nsplit digits class-IL ACC: naive {naive.metrics['cl_acc']:.3f}, "
          f"replay {replay.metrics['cl_acc']:.3f}")
    assert replay.metrics["cl_acc"] >= naive.metrics["cl_acc"] + 0.30


def test_task_incremental_masks_logits_to_the_task(tmp_path):
    spec = cl_spec("continual.stream=split", "continual.scenario=task", "name=til")
    result = run_continual(spec)
    # with the task's classes known, even fine-tuning keeps old tasks well above chance
    assert min(result.details["matrix"][-1]) > 0.7


def test_interrupted_stream_resumes_to_the_same_result(tmp_path):
    """SIGKILL after the second task's checkpoint; re-running the name finishes the
    stream and matches an uninterrupted run."""
    args = ["--set", "continual.stream=permuted", "--set", "continual.scenario=domain",
            "--set", "continual.strategy=[ewc, replay]", "--set", "train.progress=off",
            "--set", "tracking.log_model=false"]
    clean = subprocess.run([sys.executable, "-m", "atoll.core.cli", "run",
                            str(CONFIGS / "continual.yaml"), *args, "--set", "name=clean"],
                           cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert clean.returncode == 0, clean.stderr[-3000:]
    proc = subprocess.Popen([sys.executable, "-m", "atoll.core.cli", "run",
                             str(CONFIGS / "continual.yaml"), *args, "--set", "name=cut"],
                            cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    second = tmp_path / ".atoll" / "checkpoints" / "cut" / "task-000002.ckpt"
    deadline = time.monotonic() + 300
    while not second.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert second.exists()
    again = subprocess.run([sys.executable, "-m", "atoll.core.cli", "run",
                            str(CONFIGS / "continual.yaml"), *args, "--set", "name=cut"],
                           cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resumed cut at task" in again.stderr
    ckpt = tmp_path / ".atoll" / "checkpoints"
    a, b = load(ckpt / "clean" / "task-000005.ckpt"), load(ckpt / "cut" / "task-000005.ckpt")
    assert a["r"] == b["r"]
    for k in a["model"]:
        assert (a["model"][k] == b["model"][k]).all(), k


def _short(*more: str):
    return cl_spec("continual.n_tasks=2", "train.epochs=1", "continual.strategy=naive",
                   "name=short", *more)


def test_finished_stream_with_a_corrupt_final_checkpoint_trains_anew(tmp_path, caplog):
    """Item 16 for streams: "finished" is recorded outside the newest checkpoint."""
    caplog.set_level("INFO", "atoll")
    first = run_continual(_short())
    first.checkpoint.write_bytes(first.checkpoint.read_bytes()[:-100])
    second = run_continual(_short())
    assert "already completed 2 tasks; starting a new run" in caplog.text
    assert second.run_id != first.run_id and len(second.details["matrix"]) == 2
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlruns.db'}")
    assert len(client.get_metric_history(first.run_id, "cl_acc")) == 1


def test_unfinished_stream_is_kept_unless_restarted(tmp_path, caplog):
    """Item 15 for streams: train.resume: false never deletes an unfinished stream; --restart
    discards it and starts a new MLflow run."""
    from atoll.core.spec import SpecError

    caplog.set_level("INFO", "atoll")
    first = run_continual(_short())
    root = tmp_path / ".atoll/checkpoints/short"
    (root / "task-000002.ckpt").unlink()  # as if killed after the first task
    (root / "atoll-finished-task.json").unlink()
    with pytest.raises(SpecError, match="train.resume: false, but run 'short' has an "
                       "unfinished checkpoint"):
        run_continual(_short("train.resume=false"))
    assert (root / "task-000001.ckpt").is_file()
    again = run_continual(_short(), restart=True)
    assert "discarding 1 checkpoint of run short (--restart)" in caplog.text
    assert again.run_id != first.run_id and len(again.details["matrix"]) == 2


def test_registered_stream_model_carries_its_selecting_metric(tmp_path):
    """Item 2 for streams: the version says it is the model after the last task, by ACC."""
    result = run_continual(_short("tracking.log_model=true", "tracking.registered_model=cl"))
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlruns.db'}")
    version = client.get_model_version("cl", result.registered.version)
    assert version.tags["selected_by"] == "cl_acc" and version.tags["selection"] == "last"
    assert version.tags["selected_task"] == "2"
    assert float(version.tags["selected_value"]) == pytest.approx(result.metrics["cl_acc"],
                                                                  rel=1e-5)
