"""Cluster-mode failure semantics on real Ray and real MLflow sqlite stores.

One `ray start --head` for the module (test_cluster's fixture); the in-process driver joins
it with a worker setup hook that can put a NaN into rank 1's forward once (a flag file),
so a deterministic failure meets a worker group that would succeed if Ray retried it.
Ctrl-C runs a driver in its own session with its own Ray; plain `ray job submit` runs
against the head. Every process a test starts is stopped by its own pid.
"""

from __future__ import annotations

import logging
import math
import os
import pickle
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from atoll.core.checkpoint import rng_state, set_rng_state
from atoll.core.loop import NonFiniteLoss
from atoll.core.procs import start, stop
from atoll.core.runner import RunFailed
from atoll.core.spec import SpecError, load_spec
from tests.conftest import CONFIGS, ROOT
from tests.integration.test_cluster import BIN, ray_head  # noqa: F401 - the module's head

pytestmark = pytest.mark.integration

NAN_FLAG = "ATOLL_TEST_NAN_FLAG"  # while this file exists, rank 1 emits one NaN
NAN_AT = "ATOLL_TEST_NAN_AT"  # at its n-th training forward
EXPERIMENT = "tests-faults"


class _NanOnce(torch.nn.Module):
    """Identity, except rank 1's `at`-th training forward while the flag file exists."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        if self.training and dist.is_initialized() and dist.get_rank() == 1:
            self.calls += 1
            flag = Path(os.environ[NAN_FLAG])
            if self.calls == int(os.environ[NAN_AT]) and flag.exists():
                flag.with_name("fired").write_text(repr(time.time()))
                flag.unlink()
                return x * float("nan")
        return x


def inject_nan_hook() -> None:
    """Ray worker setup hook: the mlp of this job's workers ends in a _NanOnce block
    (no parameters, so checkpoints and the driver's model are unchanged)."""
    from atoll.models.mlp import build_mlp
    from atoll.models.registry import MODELS

    def nan_mlp(spec, shape, classes):
        model = build_mlp(spec, shape, classes)
        model.append(_NanOnce())
        return model

    MODELS["mlp"] = nan_mlp


def _steps_per_epoch(per_rank: int) -> int:
    from atoll.core.data import load_data

    n = len(load_data(load_spec(CONFIGS / "demo.yaml").data, 0).train)
    shard = -(-n // 2)  # rank 1's share of the (padded) epoch
    return -(-shard // per_rank)


@pytest.fixture(scope="module")
def driver(ray_head):  # noqa: F811
    """This process as a driver of the head, its workers carrying the NaN hook."""
    import ray

    flag = Path(tempfile.mkdtemp(prefix="atoll-nan-")) / "fire"
    at = _steps_per_epoch(16) + 3  # epoch 2, step 3
    ray.init(address=ray_head["gcs"], runtime_env={
        "worker_process_setup_hook": inject_nan_hook,
        "env_vars": {NAN_FLAG: str(flag), NAN_AT: str(at), "PYTHONPATH": str(ROOT)}})
    try:
        yield {"flag": flag, "at": at, **ray_head}
    finally:
        ray.shutdown()
        shutil.rmtree(flag.parent, ignore_errors=True)


def _spec(name: str, *extra: str):
    return load_spec(CONFIGS / "demo.yaml", [
        "mode=cluster", f"name={name}", "train.epochs=3", "train.progress=off",
        f"tracking.experiment={EXPERIMENT}", "tracking.log_model=false",
        "train.log_every_n_steps=1", "cluster.max_failures=2",
        "train.checkpoint_every=1 epoch", *extra])


def _run_of(client: MlflowClient, name: str):
    exp = client.get_experiment_by_name(EXPERIMENT)
    runs = client.search_runs([exp.experiment_id], f"attributes.run_name = '{name}'")
    assert len(runs) == 1, [r.info.run_id for r in runs]
    return runs[0]


def test_non_finite_loss_survives_pickling():
    """Ray ships a worker's exception to the driver by pickle."""
    e = pickle.loads(pickle.dumps(NonFiniteLoss(2, 43, math.nan)))
    assert (type(e), e.epoch, e.step) == (NonFiniteLoss, 2, 43) and math.isnan(e.value)
    assert "non-finite loss nan at epoch 2, step 43" in str(e)


# the NaN run's model is chosen by the lowest val_accuracy (item 8 rides along)
BY_METRIC = ("cluster.checkpoint_metric=val_accuracy", "cluster.checkpoint_mode=min",
             "train.keep_checkpoints=1", "tracking.log_model=true",
             "tracking.registered_model=faults-metric")


def test_nan_on_rank_1_fails_without_retry_then_resumes_exactly_once(driver, tmp_path):
    """Items 5, 7, 10, 8: NaN on rank 1 → FAILED at once (a retry would succeed: the NaN
    fires once); a resume with changed settings is refused; the resumed run logs every
    step and epoch once and registers the best checkpoint by cluster.checkpoint_metric."""
    from atoll.cluster.runner import run_cluster

    driver["flag"].touch()
    with pytest.raises(RunFailed) as failed:
        run_cluster(_spec("nan", *BY_METRIC))
    # from the NaN to FAILED (the whole run's start-up depends on the machine's load)
    seconds = time.time() - float(driver["flag"].with_name("fired").read_text())
    message = str(failed.value)
    print(f"NaN to FAILED: {seconds:.1f}s")
    assert seconds < 60, seconds
    assert "\n" not in message and "non-finite loss nan at epoch 2" in message, message
    assert "last good checkpoint:" in message and "(epoch 1)" in message, message
    assert not driver["flag"].exists()  # fired exactly once
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlruns.db'}")
    run = _run_of(client, "nan")
    assert run.info.status == "FAILED"
    assert "non-finite loss" in run.data.tags["atoll.failure"]

    for change in ("train.grad_accum_steps=2", "train.loss.label_smoothing=0.1",
                   "train.precision=bf16", "cluster.num_workers=1",
                   "train.resume=false"):  # never deletes an unfinished run's checkpoints
        with pytest.raises(SpecError, match=change.split("=")[0]):
            run_cluster(_spec("nan", *BY_METRIC, change))

    out = run_cluster(_spec("nan", *BY_METRIC))  # the same spec resumes from epoch 1
    assert out.epochs == 3
    run = _run_of(client, "nan")
    assert run.info.status == "FINISHED"
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "step_loss")]
    assert steps == list(range(1, 3 * (driver["at"] - 3) + 1))  # each step once, in order
    for key in ("train_loss", "lr"):  # epoch rows; the per-step lr is step_lr
        assert [m.step for m in client.get_metric_history(run.info.run_id, key)] == [1, 2, 3]
    assert [m.step for m in client.get_metric_history(run.info.run_id, "step_lr")] == steps
    _selected_epoch(client, run, out, "faults-metric")


def _selected_epoch(client: MlflowClient, run, out, registered: str) -> int:
    """The lowest val_accuracy's epoch (a choice the newest epoch rarely makes) must be
    the weights tested and registered, and the run and the version say so."""
    history = client.get_metric_history(run.info.run_id, "val_accuracy")
    best = min(history, key=lambda m: (m.value, m.step)).step
    tags = run.data.tags
    assert (tags["atoll.selected_epoch"], tags["atoll.selected_by"],
            tags["atoll.selection"]) == (str(best), "val_accuracy", "best")
    version = client.get_model_version(registered, out.registered.version)
    assert (version.tags["epoch"], version.tags["selected_by"]) == (str(best), "val_accuracy")
    assert out.details["selected"]["epoch"] == best
    return best


def test_early_stopping_registers_the_best_epoch(driver, tmp_path):
    """Item 8: train.early_stopping.restore_best (default) in cluster mode."""
    from atoll.cluster.runner import run_cluster

    out = run_cluster(_spec("early", "tracking.log_model=true", "train.keep_checkpoints=1",
                            "tracking.registered_model=faults-early",
                            "train.early_stopping.metric=val_accuracy",
                            "train.early_stopping.mode=min", "train.early_stopping.patience=1"))
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlruns.db'}")
    run = _run_of(client, "early")
    _selected_epoch(client, run, out, "faults-early")
    assert out.epochs == len(client.get_metric_history(run.info.run_id, "val_accuracy")) <= 3


def test_ctrl_c_ends_killed_with_a_resume_hint_and_removes_private_ray(tmp_path):
    """Items 12, 13: Ctrl-C (SIGINT to the driver's process group, as a terminal sends
    it) on a run with its own Ray: KILLED, how to resume, Ray's session folder gone."""
    short = Path(tempfile.mkdtemp(prefix="atoll-t-"))  # Ray's socket paths stay short
    log = tmp_path / "driver.log"
    env = {"TMPDIR": str(short), "RAY_TMPDIR": str(short), "RAY_ADDRESS": "",
           "PYTHONPATH": str(ROOT), "RAY_USAGE_STATS_ENABLED": "0"}
    sets = ["mode=cluster", "name=ctrlc", "train.epochs=40", "train.progress=off",
            f"tracking.experiment={EXPERIMENT}", "train.checkpoint_every=1 epoch"]
    proc = start([str(BIN / "atoll"), "run", str(CONFIGS / "demo.yaml"),
                  *(a for s in sets for a in ("--set", s))], log, env=env, cwd=tmp_path)
    try:
        run_dir = tmp_path / ".atoll" / "ray_results" / "ctrlc"
        deadline = time.monotonic() + 240
        while not list(run_dir.glob("checkpoint_*")) and time.monotonic() < deadline:
            assert proc.poll() is None, log.read_text()[-3000:]
            time.sleep(0.2)
        os.killpg(proc.pid, signal.SIGINT)
        assert proc.wait(timeout=120) == 130, log.read_text()[-3000:]
    finally:
        stop(proc)
        # torch's kernel cache (fused CPU optimizers write it to $TMPDIR/torchinductor_$USER)
        # is shared by every torch process and kept by design; Ray's session folder is not
        left = [str(p) for p in short.rglob("*") if "torchinductor_" not in str(p)]
        shutil.rmtree(short, ignore_errors=True)
    text = log.read_text()
    assert "atoll: interrupted; re-run the same name (ctrlc) to resume from epoch" in text, \
        text[-3000:]
    run = _run_of(MlflowClient(f"sqlite:///{tmp_path / 'mlruns.db'}"), "ctrlc")
    assert run.info.status == "KILLED"
    assert not left, left[:10]  # Ray's session folder went with the run


def test_plain_ray_job_submit_with_relative_stores_is_refused(ray_head, tmp_path):  # noqa: F811
    """Item 14: default (relative) stores inside a Ray job would land in the job's
    working_dir, which Ray deletes: exit 2 naming the settings, before any work."""
    out = subprocess.run(
        [str(BIN / "ray"), "job", "submit", "--address", ray_head["http"],
         "--working-dir", str(tmp_path), "--", "atoll", "run", str(CONFIGS / "demo.yaml"),
         "--set", "mode=cluster", "--set", "name=relative", "--set", "train.epochs=1"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300, check=False,
        env={**os.environ, "RAY_ADDRESS": ""})
    text = out.stdout + out.stderr
    assert out.returncode != 0, text[-3000:]
    assert "atoll: cluster.storage_path: None is relative" in text, text[-3000:]
    assert "ATOLL_STORAGE_PATH" in text and "MLFLOW_TRACKING_URI" in text
    assert "exit code 2" in text.lower() or "code 2" in text.lower(), text[-2000:]


def test_cuda_rng_of_more_gpus_than_visible_restores_what_applies(caplog):
    """Item 9: a checkpoint from a node with more GPUs than are visible here."""
    state = rng_state()
    visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
    state["cuda"] = [torch.get_rng_state() if not visible else torch.cuda.get_rng_state(0)
                     for _ in range(visible + 1)]
    expected = state["cuda"][0].clone()
    with caplog.at_level(logging.WARNING, logger="atoll"):
        set_rng_state(state)
    assert f"CUDA RNG state of {visible + 1} GPU(s) but {visible} are visible" in caplog.text
    if visible:
        assert torch.equal(torch.cuda.get_rng_state(0), expected)
