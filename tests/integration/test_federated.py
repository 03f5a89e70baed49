"""Real Flower simulations (SuperLink + flwr run + Ray), tracked in a real sqlite MLflow.

Each `run_federated` call starts and stops its own SuperLink; the clients run on one Ray
head the module shares (`shared_ray`); every test checks that no process it started is
left behind.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from atoll.core.checkpoint import load
from atoll.core.procs import free_port, start, stop, wait_http
from atoll.core.runner import RunFailed
from atoll.core.spec import load_spec
from atoll.federated.simulation import run_federated
from tests import datagen
from tests.conftest import CONFIGS, ROOT

# one Ray head for the module's federations, an initialised ./mlruns.db for each test
# (tests/integration/conftest.py)
pytestmark = [pytest.mark.integration,
              pytest.mark.usefixtures("shared_ray", "warm_store")]

def fl_spec(*overrides: str):
    base = ["train.progress=off", "tracking.experiment=tests-fl"]
    return load_spec(CONFIGS / "federated.yaml", base + list(overrides))


def metric_history(run_id: str, key: str) -> list[tuple[int, float]]:
    client = MlflowClient(f"sqlite:///{Path('mlruns.db').resolve()}")
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def test_fedavg_dirichlet_reaches_90_percent(shared_ray, no_leftovers):
    """Also: with RAY_ADDRESS set (the module's head), the clients run on that cluster,
    which outlives the federation."""
    spec = fl_spec("train.keep_checkpoints=20")  # 10 clients, Dirichlet α=0.5, FedAvg,
    result = run_federated(spec)                  # 20 rounds
    assert shared_ray.head.poll() is None
    assert "ClientAppActor" in shared_ray.log_text()
    assert result.metrics["test_accuracy"] >= 0.90, result.metrics
    central = metric_history(result.run_id, "central_accuracy")
    assert [s for s, _ in central] == list(range(1, 21))
    assert len(metric_history(result.run_id, "federated_val_accuracy")) == 20
    assert all(v == 10 for _, v in metric_history(result.run_id, "participants"))
    assert all(v > 0 for _, v in metric_history(result.run_id, "bytes_received"))
    client = MlflowClient(f"sqlite:///{Path('mlruns.db').resolve()}")
    arts = {a.path for a in client.list_artifacts(result.run_id, "plots")}
    assert {"plots/partition.png", "plots/rounds.png"} <= arts
    mv = client.get_model_version_by_alias("digits-fed", "candidate")
    assert mv.run_id == result.run_id
    assert mv.tags["strategy"] == "fedavg" and mv.tags["partition"] == "dirichlet"
    assert mv.tags["rounds"] == "20"
    assert mv.tags["selected_by"] == "central_accuracy" and mv.tags["selected_round"] == "20"
    assert float(mv.tags["selected_value"]) == pytest.approx(result.metrics["test_accuracy"])

    # the vectorized engine (every client of a round in one batched computation, in this
    # process): the same global model after 5 rounds (within 1e-4); after 20 rounds of 3
    # local epochs float rounding (another summation order) has grown, not the model
    fast = run_federated(fl_spec("federated.engine=vectorized", "name=digits-fedavg-vec",
                                 "tracking.registered_model=null", "train.keep_checkpoints=20"))

    assert _max_diff(_at_round(fast, 5), _at_round(result, 5)) < 1e-4
    assert _max_diff(_final_model(fast), _final_model(result)) < 1e-2
    assert fast.metrics["test_accuracy"] == pytest.approx(result.metrics["test_accuracy"],
                                                          abs=1e-3)
    assert _keys(fast.run_id) == _keys(result.run_id)


def _keys(run_id: str) -> set[str]:
    """A run's metric keys, but system/* (sampled every few seconds of a run)."""
    client = MlflowClient(f"sqlite:///{Path('mlruns.db').resolve()}")
    return {k for k in client.get_run(run_id).data.metrics if not k.startswith("system/")}


def _at_round(result, n: int) -> dict:
    return load(result.checkpoint.parent / f"round-{n:06d}.ckpt")["model"]


def _final_model(result) -> dict:
    return load(result.checkpoint)["model"]


SAME = ["federated.rounds=5", "federated.local_epochs=1", "federated.partition.alpha=0.3",
        "federated.fraction_evaluate=0", "tracking.log_model=false"]


@pytest.mark.parametrize("sets", [
    pytest.param(["federated.strategy=fedprox", "federated.proximal_mu=0.1",
                  "federated.privacy.mode=client-fixed", "federated.privacy.noise_multiplier=0",
                  "federated.privacy.clipping_norm=0.5", "federated.byzantine.fraction=0.2",
                  "federated.byzantine.attack=sign_flip"], id="fedprox-client-dp-sign-flip"),
    pytest.param(["federated.strategy=fedmedian", "federated.byzantine.fraction=0.2",
                  "federated.byzantine.attack=label_flip"], id="fedmedian-label-flip"),
])
def test_both_engines_reach_the_same_global_model(sets, no_leftovers):
    """5 rounds on a Dirichlet α = 0.3 partition (unequal shards): Flower's simulation and
    the vectorized engine end with the same global model (within 1e-4) and log the same
    MLflow keys. (FedAvg: the 20-round test above; Krum: the robust-aggregation test;
    FedAdam: tests/integration/test_faults.py's continual resume.) DP's noise is off so
    the two runs are comparable; the clipping mod runs on every reply. Local SGD here:
    Adam's normalised step turns rounding-level differences of near-zero gradients into
    lr-sized steps — the vectorized engine against itself with another chunk size ends
    3e-3 apart after these 5 rounds — so Adam's replies are compared per round instead
    (tests/unit/test_vectorized_grid.py, 1e-5)."""
    name = "eq-" + "-".join(s.split("=")[1] for s in sets[:1])
    flower = run_federated(fl_spec(*SAME, *sets, f"name={name}"))
    fast = run_federated(fl_spec(*SAME, *sets, f"name={name}-vec",
                                 "federated.engine=vectorized"))
    assert _max_diff(_final_model(fast), _final_model(flower)) < 1e-4
    assert [h["participants"] for h in fast.history] == [h["participants"]
                                                          for h in flower.history]
    assert _keys(fast.run_id) == _keys(flower.run_id)


def _max_diff(a: dict, b: dict) -> float:
    assert set(a) == set(b)
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


def test_failing_clients_are_counted_and_rounds_complete(no_leftovers):
    """Crashed clients fail part-way (an error reply); dropped-out clients never reply and
    the round closes at round_timeout without them."""
    from atoll.federated.faults import round_fault

    spec = fl_spec("federated.rounds=4", "federated.faults.dropout=0.15",
                   "federated.faults.crash=0.15", "federated.round_timeout=10",
                   "federated.fraction_evaluate=0", "tracking.registered_model=null")
    result = run_federated(spec)
    assert result.epochs == 4
    h = result.history
    drawn = [[round_fault(spec.federated.faults, spec.seed, r, c) for c in range(10)]
             for r in range(1, 5)]
    crashed = [d.count("crash") for d in drawn]
    dropped = [d.count("dropout") for d in drawn]
    assert sum(crashed) > 0 and sum(dropped) > 0
    # a crash is reported as one when the client got to run before round_timeout; on a
    # loaded machine (round 1 also starts the client actors) it may be a timeout instead
    seen = [r.get("failures_crash", 0) for r in h]
    assert all(s <= c for s, c in zip(seen, crashed, strict=True)) and sum(seen) > 0
    # every dropout and every crash failed the round (clients queued behind them may too)
    assert all(r["failures_timeout"] + s >= d + c
               for r, s, d, c in zip(h, seen, dropped, crashed, strict=True))
    assert [r["failures"] for r in h] == [r.get("failures_crash", 0) + r["failures_timeout"]
                                          for r in h]
    assert [r["participants"] for r in h] == [10 - r["failures"] for r in h]
    assert all(r["round_seconds"] < 10 + 5 for r in h)  # closed at the timeout, not later
    assert [v for _, v in metric_history(result.run_id, "failures")] == \
        [r["failures"] for r in h]
    assert result.metrics["test_accuracy"] > 0.6  # rounds completed with who answered


def test_stragglers_miss_the_round_timeout(no_leftovers):
    """The server closes each round at round_timeout and never waits for a straggler.

    In the simulation a sleeping straggler can hold the workers the others queue behind,
    so whether any round aggregates depends on the machine; when none does, the run must
    FAIL with that cause (never FINISH with the untrained model)."""
    spec = fl_spec("federated.rounds=2", "federated.num_clients=4", "federated.local_epochs=1",
                   "federated.faults.straggler=0.3", "federated.faults.straggler_delay=6",
                   "federated.round_timeout=2", "federated.fraction_evaluate=0",
                   "federated.max_failed_rounds=5", "tracking.log_model=false")
    try:
        history = run_federated(spec).history
    except RunFailed as e:
        assert "no round aggregated an update in 2 rounds" in str(e), e
        ckpts = sorted(Path(".atoll/checkpoints/digits-fedavg/checkpoints").glob("*.ckpt"))
        history = load(ckpts[-1])["history"]
    assert len(history) == 2
    assert sum(r["failures_timeout"] for r in history) > 0
    assert all(r["round_seconds"] < 2 + 4 for r in history)  # the server did not wait


ATTACKED = ["federated.rounds=8", "federated.local_epochs=2", "federated.fraction_evaluate=0",
            "tracking.log_model=false", "federated.byzantine.scale=4",
            "federated.partition.method=dirichlet", "federated.partition.alpha=0.5",
            "federated.byzantine.fraction=0.2", "federated.byzantine.attack=sign_flip"]


def test_robust_aggregation_under_sign_flip_on_non_iid_data():
    """20 % sign-flip attackers on a Dirichlet α = 0.5 partition: honest updates disagree
    too, so robust rules pay for their robustness (Krum keeps one client's update); they
    must still beat attacked FedAvg (clean FedAvg: ≥ 0.90, the test above). The
    comparison runs on the vectorized engine; Krum also runs on Flower's and ends with
    the same global model."""
    accuracy, models = {}, {}
    for rule in ("fedavg", "fedmedian", "krum"):
        try:
            r = run_federated(fl_spec(*ATTACKED, f"federated.strategy={rule}",
                                      "federated.engine=vectorized", f"name=byz-{rule}"))
            accuracy[rule], models[rule] = r.metrics["test_accuracy"], _final_model(r)
        except RunFailed as e:  # the attack drove the model to NaN: the run FAILED
            assert "non-finite" in str(e), e
            accuracy[rule] = 0.0
    print(f"\ntest accuracy under 20% sign-flip, Dirichlet 0.5: {accuracy}")
    assert accuracy["fedavg"] < 0.6  # the attack works
    assert accuracy["fedmedian"] > accuracy["fedavg"] + 0.05
    assert accuracy["krum"] > accuracy["fedavg"] + 0.05
    on_flower = run_federated(fl_spec(*ATTACKED, "federated.strategy=krum",
                                      "name=byz-krum-flower"))
    assert _max_diff(_final_model(on_flower), models["krum"]) < 1e-4


def test_flwr_run_dot_works_and_leaves_nothing_behind(tmp_path, no_leftovers):
    """The plain Flower CLI path: our SuperLink, `flwr run .` from the project root."""
    port = free_port()
    home = tmp_path / "flwr-home"
    home.mkdir()
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "t"\n\n[superlink.t]\naddress = "127.0.0.1:{port}"\n'
        "insecure = true\n")
    bin_dir = Path(sys.executable).parent
    ray_tmp = tempfile.mkdtemp(prefix="atoll-ray-")  # Ray's socket paths must stay short
    env = {"FLWR_HOME": str(home), "RAY_TMPDIR": ray_tmp,
           "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
           "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    log = tmp_path / "superlink.log"
    link = start([str(bin_dir / "flower-superlink"), "--insecure", "--simulation", "--host",
                  "127.0.0.1", "--port", str(port)], log, env=env, cwd=tmp_path)
    try:
        wait_http(f"http://127.0.0.1:{port}/health", link, log)
        uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
        run_dir = tmp_path / "run"
        cfg = (f'num-server-rounds=2 run-dir="{run_dir}" tracking-uri="{uri}" '
               'overrides="federated.local_epochs=1;tracking.log_model=false"')
        out = subprocess.run(
            [str(bin_dir / "flwr"), "run", ".", "t", "--stream", "--run-config", cfg,
             "--federation-config", "num-supernodes=4 client-resources-num-cpus=1"],
            cwd=ROOT, env={**os.environ, **env}, capture_output=True, text=True, timeout=300)
        assert (run_dir / "result.json").is_file(), out.stdout[-3000:] + out.stderr[-3000:]
        result = json.loads((run_dir / "result.json").read_text())
    finally:
        stop(link)
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert result["status"] == "FINISHED" and result["rounds"] == 2
    assert result["history"][-1]["participants"] == 4  # the federation's size, not the spec's
    runs = MlflowClient(uri).search_runs(
        [MlflowClient(uri).get_experiment_by_name("atoll-federated").experiment_id])
    assert [r.info.run_id for r in runs] == [result["run_id"]]


def test_federated_continual_ewc_beats_naive(no_leftovers):
    """5 clients, 3 permuted tasks, strategy state kept in Context.state across rounds;
    FedEWC: each client's EWC, with the Fishers averaged by the server. (Client-side EWC
    alone is the same penalty with the client's own Fisher: its federation is resumed in
    test_faults, and EWC's effect is measured in local mode in test_continual_runs.)"""
    base = ["train.progress=off", "tracking.log_model=false", "continual.ewc.lam=1000",
            "train.keep_checkpoints=20"]
    runs = {}
    for name in ("naive", "fedewc"):
        extra = ["continual.ewc.aggregate=server"] if name == "fedewc" else []
        spec = load_spec(CONFIGS / "fcl.yaml", [
            *base, *extra, f"continual.strategy={name.removeprefix('fed')}",
            f"name=fcl-{name}"])
        runs[name] = run_federated(spec)
    acc = {k: r.metrics["cl_acc"] for k, r in runs.items()}
    print(f"\nfederated continual ACC: {acc}")
    assert acc["fedewc"] >= acc["naive"] + 0.04
    # FedEWC: every client that closes a task sends its Fisher in the next round; from then
    # on the server sends one averaged (anchor, Fisher) pair per finished task
    fed = runs["fedewc"].history
    received = [h["fedewc_fishers_received"] for h in fed]
    assert received[4] == fed[4]["participants"] > 0 and received[8] == fed[8]["participants"]
    assert sum(received) == received[4] + received[8]
    assert [h["fedewc_tasks"] for h in fed] == [0.0] * 4 + [1.0] * 4 + [2.0] * 4
    r = runs["fedewc"].details["matrix"]
    assert len(r) == 3 and all(len(row) == 3 for row in r)
    client = MlflowClient(f"sqlite:///{Path('mlruns.db').resolve()}")
    run = client.get_run(runs["fedewc"].run_id)
    assert {"cl_acc", "cl_bwt", "cl_forgetting", "cl_fwt"} <= set(run.data.metrics)
    arts = {a.path for a in client.list_artifacts(runs["fedewc"].run_id, "plots")}
    assert "plots/accuracy_matrix.png" in arts
    # the task advances on the round schedule: 4 rounds per task
    assert [h["task"] for h in runs["fedewc"].history] == [0.0] * 4 + [1.0] * 4 + [2.0] * 4

    # FedEWC on the vectorized engine: the same global model through the task boundaries
    # (round 5: the first with the server's pair; round 9: two pairs), the same Fishers
    # received, the same accuracy matrix and the same MLflow keys
    fast = run_federated(load_spec(CONFIGS / "fcl.yaml", [
        *base, "continual.ewc.aggregate=server", "continual.strategy=ewc",
        "federated.engine=vectorized", "name=fcl-fedewc-vec"]))
    for n in (5, 9):
        assert _max_diff(_at_round(fast, n), _at_round(runs["fedewc"], n)) < 1e-4, n
    assert _max_diff(_final_model(fast), _final_model(runs["fedewc"])) < 1e-3
    assert [h["fedewc_fishers_received"] for h in fast.history] == received
    assert np.allclose(fast.details["matrix"], r, atol=2e-3)
    assert _keys(fast.run_id) == _keys(runs["fedewc"].run_id)


def test_client_specific_streams_train_different_tasks_in_one_round(no_leftovers):
    """`continual.client_order: shuffled`: each client meets the tasks in its own order."""
    spec = load_spec(CONFIGS / "fcl.yaml", [
        "train.progress=off", "tracking.log_model=false", "continual.client_order=shuffled",
        "federated.rounds=6", "name=fcl-shuffled"])
    result = run_federated(spec)
    in_round = [h["tasks_in_round"] for h in result.history]
    assert max(in_round) > 1  # clients trained different tasks in the same round
    assert len(result.details["matrix"]) == 3
    assert result.metrics["cl_acc"] > 0.5


def _example_spec(root: Path, *overrides: str):
    """An example's spec as `atoll run` in its folder would have it (project_dir: there)."""
    return load_spec(root / "spec.yaml", ["mode=federated", "train.progress=off",
                                          "tracking.experiment=tests-fl",
                                          f"project_dir={root}", *overrides])


def test_own_model_example_federated(tmp_path, no_leftovers):
    """examples/own-model on 3 Dirichlet clients: PNG class folders and the project's own
    CNN (models.convnet:BandNet, not an nn.Sequential). The server and the client actors
    (on the shared Ray head, in other working directories) read the data and import the
    model from project_dir; the project's `models` never shadows atoll's."""
    root = datagen.example("own-model", tmp_path)
    result = run_federated(_example_spec(root))
    assert result.epochs == 3 and result.metrics["test_accuracy"] >= 0.8, result.metrics
    client = MlflowClient(f"sqlite:///{Path('mlruns.db').resolve()}")
    p = client.get_run(result.run_id).data.params
    assert (p["model.class"], p["data.format"], p["data.name"]) == \
        ("models.convnet.BandNet", "imagefolder", "bands")
    assert client.get_model_version_by_alias("bands", "candidate").run_id == result.run_id


def test_tabular_regression_example_federated(tmp_path, no_leftovers):
    """examples/tabular-regression on 3 clients holding Dirichlet-skewed shares of the
    rows (`quantity`): FedAvg of MSE-trained models, central and federated R²."""
    root = datagen.example("tabular-regression", tmp_path)
    result = run_federated(_example_spec(root, "tracking.log_model=false"))
    assert result.metrics["test_r2"] >= 0.9 and "test_accuracy" not in result.metrics, \
        result.metrics
    r2 = metric_history(result.run_id, "federated_val_r2")
    assert [s for s, _ in r2] == [1, 2, 3, 4]
    client = MlflowClient(f"sqlite:///{Path('mlruns.db').resolve()}")
    p = client.get_run(result.run_id).data.params
    sizes = [int(v) for v in p["federated.partition_sizes"].split(",")]
    assert p["data.task"] == "regression" and len(set(sizes)) == 3  # skewed, not equal
    assert p["model.class"] == "models.tabular.ResidualMLP"


def test_a_server_process_that_dies_is_reported_with_flowers_reason(tmp_path, no_leftovers):
    """The simulation process (ServerApp and clients) is SIGKILLed after round 1: it writes
    no result, Flower marks the run failed once its heartbeats stop and `flwr run` exits 0.
    The error names Flower's reason, the server process's stderr (Flower sends it to
    /dev/null) and the SuperLink's log are kept beside federation.log, and round 1's
    checkpoint is still there to resume from."""
    import threading

    import psutil

    spec = fl_spec("federated.rounds=50", "federated.num_clients=2", "tracking.enabled=false",
                   "tracking.registered_model=null", f"train.checkpoint_dir={tmp_path}")
    run_dir = tmp_path / spec.name
    killed: list[int] = []

    def kill_after_round_1() -> None:
        while not (run_dir / "checkpoints" / "round-000001.ckpt").is_file():
            time.sleep(0.2)
        for p in psutil.Process().children(recursive=True):  # this test's own processes
            if any("flwr-simulation" in part for part in p.cmdline()[:2]):
                p.kill()
                killed.append(p.pid)

    threading.Thread(target=kill_after_round_1, daemon=True).start()
    with pytest.raises(RunFailed) as failed:
        run_federated(spec)
    assert killed
    message = str(failed.value)
    assert "finished:failed" in message and "heartbeat" in message.lower(), message
    for kept in ("superlink.log", "server.log"):  # the dead process's stderr, Flower's log
        assert (run_dir / kept).is_file() and str(run_dir / kept) in message, message
    assert (run_dir / "checkpoints" / "round-000001.ckpt").is_file()


def test_the_suites_ray_heads_hand_out_ports_the_os_picks(shared_ray):
    """A Ray node hands its workers and drivers ports from 10002 up, after checking they
    are free: two nodes on one machine (the other xdist worker's head) can hand out the
    same port at once, and the process that binds second aborts in C++ ("Failed to start
    the grpc server" — seen in CI as a federation whose simulation died without a word).
    The suite's nodes ask the OS instead (conftest.start_ray). A driver and a task on the
    module's head; every listening socket of this process and its children is checked."""
    import psutil
    import ray

    ray.init(address=shared_ray.address, log_to_driver=False)
    try:
        assert ray.get(ray.remote(lambda: 1).remote()) == 1
        ports = set()
        for proc in [psutil.Process(), *psutil.Process().children(recursive=True)]:
            with contextlib.suppress(psutil.Error):
                ports.update(c.laddr.port for c in proc.net_connections("tcp")
                             if c.status == psutil.CONN_LISTEN)
    finally:
        ray.shutdown()
    assert ports
    assert not {p for p in ports if 10002 <= p <= 19999}, sorted(ports)


def test_compressed_updates_on_flower_supernodes(no_leftovers):
    """Top-k 10 % with error feedback and an fp16 downlink on Flower's simulation: every
    client's compressed reply is expanded and aggregated, the uplink is ≥ 8× smaller
    than the model, the downlink half of it, and each client's residual is kept in the
    run dir for a resume."""
    spec = fl_spec("federated.rounds=3", "federated.num_clients=4", "federated.local_epochs=1",
                   "data.limit=600", "federated.fraction_evaluate=0", "tracking.log_model=false",
                   "federated.compression.method=topk", "federated.compression.fraction=0.1",
                   "federated.compression.error_feedback=true",
                   "federated.compression.downlink=fp16", "name=fl-topk")
    result = run_federated(spec)
    assert [h["participants"] for h in result.history] == [4, 4, 4]
    assert all(h["compression_ratio"] >= 8 for h in result.history), result.history
    params = 64 * 128 + 128 + 128 * 64 + 64 + 64 * 10 + 10
    assert spec.model.hidden == [128, 64]  # what params counts
    for h in result.history:  # 4 models in fp16 (2 bytes a value, plus npy headers)
        assert 4 * params * 2 <= h["bytes_down"] <= 4 * (params * 2 + 6 * 200)
        assert h["bytes_up"] * 8 <= 4 * params * 4
    # it learns: 3 rounds of 10 % of each update on 600 samples (chance: 0.1)
    assert result.metrics["test_accuracy"] > 0.2
    kept = result.checkpoint.parent.parent / "client-feedback"
    assert sorted(p.name for p in kept.iterdir()) == [f"partition-{p}" for p in range(4)]
