"""The federated fault matrix, end to end: real Flower simulations (SuperLink + flwr run +
Ray) tracked in a real sqlite MLflow store in the test's directory.

A federation that never aggregates must fail (exit 1, cause named, nothing registered);
DP must actually run; an interrupted federation must end KILLED with its metrics and
resume to log every round exactly once; a resumed continual federation must end equal to
an uninterrupted one.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from atoll.core.checkpoint import load
from atoll.core.runner import RunFailed
from atoll.core.spec import SpecError, load_spec
from atoll.federated.simulation import run_federated
from tests.conftest import CONFIGS

# one Ray head for the module's federations, an initialised ./mlruns.db for each test
# (tests/integration/conftest.py)
pytestmark = [pytest.mark.integration,
              pytest.mark.usefixtures("shared_ray", "warm_store")]

ATOLL = Path(sys.executable).parent / "atoll"
SMALL = ["train.progress=off", "tracking.experiment=tests-faults", "federated.num_clients=4",
         "federated.local_epochs=1", "data.limit=600"]


def fl(*overrides: str, config: str = "federated.yaml"):
    return load_spec(CONFIGS / config, [*SMALL, *overrides])


def _store() -> MlflowClient:
    return MlflowClient(f"sqlite:///{Path('mlruns.db').resolve()}")


def _runs(name: str):
    client = _store()
    exp = client.get_experiment_by_name("tests-faults")
    return client.search_runs([exp.experiment_id], f"attributes.run_name = '{name}'")


def _steps(run_id: str, key: str) -> list[int]:
    return sorted(m.step for m in _store().get_metric_history(run_id, key))


@pytest.mark.usefixtures("no_leftovers")
def test_federation_that_never_aggregates_fails_and_registers_nothing():
    spec = fl("name=all-drop", "federated.rounds=5", "federated.max_failed_rounds=2",
              "federated.faults.dropout=1.0", "federated.round_timeout=2",
              "federated.fraction_evaluate=0")
    with pytest.raises(RunFailed) as e:
        run_federated(spec)
    msg = str(e.value)
    assert "2 consecutive rounds aggregated no update" in msg
    assert "no sampled client replied within federated.round_timeout" in msg
    assert "round-000002.ckpt" in msg  # the last good checkpoint, kept
    (run,) = _runs("all-drop")
    assert run.info.status == "FAILED"
    assert _steps(run.info.run_id, "aggregated") == [1, 2]
    assert not _store().search_model_versions("name='digits-fed'")  # nothing registered
    assert Path(".atoll/checkpoints/all-drop/checkpoints/round-000002.ckpt").is_file()
    with pytest.raises(RunFailed, match="had already failed 2 consecutive rounds"):
        run_federated(spec)  # re-running the name resumes it, and it is still FAILED
    assert not _store().search_model_versions("name='digits-fed'")


def test_non_finite_clients_fail_the_run_with_one_line(tmp_path):
    out = subprocess.run(
        [str(ATOLL), "run", str(CONFIGS / "federated.yaml"), "--set", "name=nan-fl",
         *[f"--set={o}" for o in SMALL], "--set", "federated.rounds=3",
         "--set", "optim.lr=1e12", "--set", "federated.fraction_evaluate=0"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300, check=False)
    assert out.returncode == 1, out.stdout[-2000:] + out.stderr[-2000:]
    assert "Traceback" not in out.stderr
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("atoll: error:") and "every client reported a non-finite loss" in last
    (run,) = _runs("nan-fl")
    assert run.info.status == "FAILED"
    assert not _store().search_model_versions("name='digits-fed'")


@pytest.mark.usefixtures("no_leftovers")
@pytest.mark.parametrize("mode", ["client-fixed", "client-adaptive"])
def test_client_side_dp_clips_every_update(mode):
    spec = fl(f"name=cdp-{mode}", "federated.rounds=3", f"federated.privacy.mode={mode}",
              "federated.privacy.clipping_norm=0.5", "federated.privacy.noise_multiplier=0.1",
              "federated.fraction_evaluate=0", "tracking.log_model=false")
    result = run_federated(spec)
    h = result.history
    assert [r["participants"] for r in h] == [4, 4, 4]  # every client trained every round
    assert all(r["aggregated"] == 1 for r in h)
    for r in h:  # what each client sent is its clipped update
        assert r["clients_update_norm_max"] <= r["dp_clipping_norm"] * (1 + 1e-4), r
    if mode == "client-fixed":
        eps = [r["dp_epsilon"] for r in h]
        assert eps[0] > 0 and eps == sorted(eps) and eps[-1] > eps[0]
        assert all(r["dp_clipping_norm"] == 0.5 for r in h)


@pytest.mark.usefixtures("no_leftovers")
def test_server_dp_refuses_rounds_with_failed_clients():
    """Flower's rule: noise and ε are calibrated for every sampled client, so a round with
    a crashed client is not aggregated and charges no privacy."""
    spec = fl("name=sdp-crash", "federated.rounds=5", "federated.privacy.mode=server-fixed",
              "federated.privacy.noise_multiplier=0.1", "federated.faults.crash=0.25",
              "federated.max_failed_rounds=5", "federated.fraction_evaluate=0",
              "tracking.log_model=false")
    result = run_federated(spec)
    h = result.history
    crashed = [r.get("failures_crash", 0) > 0 for r in h]
    assert any(crashed) and not all(crashed)
    assert [r["aggregated"] for r in h] == [0.0 if c else 1.0 for c in crashed]
    eps = 0.0
    for r, c in zip(h, crashed, strict=True):
        if c:  # refused: no release, ε unchanged
            assert r.get("dp_epsilon", 0.0) == eps
        else:  # every release spends privacy: ε grows
            assert r["dp_epsilon"] > eps
            eps = r["dp_epsilon"]
    params = _store().get_run(result.run_id).data.params
    assert params["federated.privacy.noise_multiplier"] == "0.1"


def test_ctrl_c_ends_the_federation_killed_and_resume_logs_every_round_once(tmp_path):
    args = [str(ATOLL), "run", str(CONFIGS / "federated.yaml"), "--set", "name=intr",
            *[f"--set={o}" for o in SMALL], "--set", "federated.rounds=8",
            "--set", "federated.faults.straggler=1.0", "--set",
            "federated.faults.straggler_delay=1", "--set", "federated.fraction_evaluate=0",
            "--set", "federated.checkpoint_every=3",  # a stop between two checkpoints
            "--set", "tracking.log_model=false", "--set", "train.progress=log"]
    proc = subprocess.Popen(args, cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    seen = ""
    deadline = time.monotonic() + 240
    while "round 2/8" not in seen and time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        seen += line
    assert "round 2/8" in seen, seen
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-3000:]
    assert "Traceback" not in err
    assert "resume" in err.strip().splitlines()[-1]
    (run,) = _runs("intr")
    assert run.info.status == "KILLED"
    done = _steps(run.info.run_id, "central_accuracy")
    assert done and done == list(range(1, len(done) + 1)) and len(done) < 8
    ckpt = load(sorted((tmp_path / ".atoll/checkpoints/intr/checkpoints").glob("*.ckpt"))[-1])
    assert ckpt["round"] == len(done)  # everything logged is checkpointed, and vice versa

    again = subprocess.run(args, cwd=tmp_path, capture_output=True, text=True, timeout=300,
                           check=False)
    assert again.returncode == 0, again.stderr[-3000:]
    (run,) = _runs("intr")
    assert run.info.status == "FINISHED"
    assert _steps(run.info.run_id, "central_accuracy") == list(range(1, 9))
    assert _steps(run.info.run_id, "round_seconds") == list(range(1, 9))


@pytest.mark.usefixtures("no_leftovers")
def test_resumed_continual_federation_equals_an_uninterrupted_one():
    """Resuming restores everything a round depends on: the model, FedAdam's moments, the
    client sampler, and the clients' EWC/replay memories, which outlive the Flower run
    (client-states/). Resumed by MLflow run id, into the same MLflow run, each round
    logged once; a resume with another strategy is refused before anything starts."""
    common = ["federated.rounds_per_task=2", "continual.n_tasks=2", "federated.num_clients=3",
              "federated.fraction_fit=0.6", "federated.strategy=fedadam",
              "federated.server_lr=0.05", "tracking.log_model=false",
              "federated.local_epochs=1"]
    full = run_federated(fl("name=fcl-full", "federated.rounds=4", *common,
                            config="fcl.yaml"))
    part = run_federated(fl("name=fcl-part", "federated.rounds=2", *common,
                            config="fcl.yaml"))
    assert [h["participants"] for h in part.history] == [2, 2]  # sampled 2 of 3
    changed = fl("name=fcl-part", "federated.rounds=4", *common, "federated.strategy=fedavg",
                 config="fcl.yaml")
    with pytest.raises(SpecError, match="federated.strategy"):
        run_federated(changed, resume="latest")
    resumed = run_federated(fl("name=fcl-part", "federated.rounds=4", *common,
                               config="fcl.yaml"), resume=part.run_id)
    assert resumed.run_id == part.run_id  # the same MLflow run continues
    a, b = load(full.checkpoint)["model"], load(resumed.checkpoint)["model"]
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)
    assert resumed.details["matrix"] == full.details["matrix"]
    assert _steps(resumed.run_id, "round_seconds") == [1, 2, 3, 4]

    # the vectorized engine: the same federation (FedAdam, sampled clients, EWC + replay
    # memories) ends with the same global model, and its clients' memories outlive an
    # interruption too (the run dir's client states): resumed equals uninterrupted
    vec = [*common, "federated.engine=vectorized"]
    fast = run_federated(fl("name=fcl-vfull", "federated.rounds=4", *vec, config="fcl.yaml"))
    c = load(fast.checkpoint)["model"]
    assert max(float((a[k] - c[k]).abs().max()) for k in a) < 1e-4
    run_federated(fl("name=fcl-vpart", "federated.rounds=2", *vec, config="fcl.yaml"))
    again = run_federated(fl("name=fcl-vpart", "federated.rounds=4", *vec, config="fcl.yaml"),
                          resume="latest")
    d = load(again.checkpoint)["model"]
    for k in c:
        torch.testing.assert_close(d[k], c[k], rtol=0, atol=0)
    assert again.details["matrix"] == fast.details["matrix"]


@pytest.mark.usefixtures("no_leftovers")
def test_resumed_error_feedback_equals_an_uninterrupted_run():
    """Each client's error-feedback residual outlives the run that made it (the run dir's
    client-feedback): a federation interrupted after round 2 and resumed ends with the
    uninterrupted one's model, bit for bit (vectorized engine: the same server and resume
    code, without a SuperLink per run)."""
    common = ["federated.engine=vectorized", "federated.compression.method=topk",
              "federated.compression.fraction=0.05", "federated.compression.error_feedback=true",
              "federated.fraction_fit=0.75", "tracking.log_model=false",
              "federated.fraction_evaluate=0"]
    full = run_federated(fl("name=ef-full", "federated.rounds=4", *common))
    run_federated(fl("name=ef-part", "federated.rounds=2", *common))
    resumed = run_federated(fl("name=ef-part", "federated.rounds=4", *common), resume="latest")
    a, b = load(full.checkpoint)["model"], load(resumed.checkpoint)["model"]
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)
    # without the residual the resumed rounds would send other updates
    run_federated(fl("name=ef-lost", "federated.rounds=2", *common))
    shutil.rmtree(resumed.checkpoint.parent.parent.parent / "ef-lost" / "client-feedback")
    lost = run_federated(fl("name=ef-lost", "federated.rounds=4", *common), resume="latest")
    c = load(lost.checkpoint)["model"]
    assert max(float((a[k] - c[k]).abs().max()) for k in a) > 1e-6


def test_changing_rounds_of_a_stream_on_resume_is_refused(tmp_path):
    """An interrupted 2-round stream (its checkpoint, no result file) resumed with 6
    rounds would move the task boundaries: refused before anything starts."""
    from atoll.core.checkpoint import save

    base = [f"--set={o}" for o in SMALL] + ["--set", "name=fcl-sched", "--set",
                                             "federated.num_clients=3", "--set",
                                             "tracking.log_model=false", "--set",
                                             "continual.n_tasks=2"]
    was = fl("name=fcl-sched", "federated.num_clients=3", "tracking.log_model=false",
             "continual.n_tasks=2", "federated.rounds=2", config="fcl.yaml")
    save({"round": 1, "spec": was.model_dump(mode="json")},
         tmp_path / ".atoll/checkpoints/fcl-sched/checkpoints/round-000001.ckpt")
    out = subprocess.run([str(ATOLL), "run", str(CONFIGS / "fcl.yaml"), *base, "--set",
                          "federated.rounds=6"], cwd=tmp_path, capture_output=True, text=True,
                         timeout=120, check=False)
    assert out.returncode == 2, out.stderr[-2000:]
    assert out.stderr.strip().splitlines()[-1].startswith("atoll: federated.rounds: 6 differs")
    assert "federated.rounds_per_task=1" in out.stderr


def _atoll(cwd: Path, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([str(ATOLL), "run", str(CONFIGS / "federated.yaml"),
                           *[f"--set={o}" for o in SMALL], *args], cwd=cwd,
                          capture_output=True, text=True, timeout=timeout, check=False)


def test_unwritable_run_dir_is_refused_before_the_federation_starts(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        if os.access(ro, os.W_OK) and os.geteuid() == 0:  # root ignores mode bits
            ro.chmod(0o700)
            (ro / "blocker").write_text("")
            target = ro / "blocker"  # a file where a directory must be: never writable
        else:
            target = ro
        out = _atoll(tmp_path, f"--set=train.checkpoint_dir={target}", "--set=name=ro",
                     timeout=60)
    finally:
        ro.chmod(0o700)
    assert out.returncode == 2, out.stderr[-2000:]
    assert out.stderr.strip().splitlines()[-1].startswith("atoll: train.checkpoint_dir:")
    assert "Traceback" not in out.stderr


def test_an_unfinished_federation_is_discarded_only_with_restart(tmp_path):
    ckpts = tmp_path / ".atoll/checkpoints/unf/checkpoints"
    ckpts.mkdir(parents=True)
    kept = ckpts / "round-000003.ckpt"
    kept.write_bytes(b"an interrupted run's checkpoint")
    out = _atoll(tmp_path, "--set=name=unf", "--set=train.resume=false", timeout=60)
    assert out.returncode == 2, out.stderr[-2000:]
    assert "atoll run --restart" in out.stderr and kept.is_file()
    out = _atoll(tmp_path, "--set=name=unf", "--set=train.resume=false", "--restart",
                 "--set=federated.rounds=1", "--set=federated.fraction_evaluate=0",
                 "--set=tracking.log_model=false")
    assert out.returncode == 0, out.stderr[-2000:]
    assert not kept.exists() and (ckpts / "round-000001.ckpt").is_file()
