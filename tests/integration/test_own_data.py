"""A user's own data in every format, and a user's own model, trained in local mode
(cluster and federated runs of them are in test_cluster.py and test_federated.py)."""

from __future__ import annotations

import sys

import pytest
from mlflow.tracking import MlflowClient

from atoll.core.runner import run_local
from atoll.core.spec import load_spec
from tests import datagen

pytestmark = pytest.mark.integration

TRAIN = ["train.progress=off", "train.epochs=12", "optim.lr=0.01", "data.batch_size=32",
         "model.hidden=[32]"]
FORMATS = {  # format -> (writer, overrides)
    "csv": (lambda p: datagen.write_csv(p, split=True),
            ["data.format=csv", "data.path=trees", "data.label=tree",
             "data.categorical=[soil]"]),
    "parquet": (datagen.write_parquet, ["data.format=parquet", "data.path=trees.parquet",
                                        "data.label=tree", "data.categorical=[soil]"]),
    "npz": (datagen.write_npz, ["data.format=npz", "data.path=trees.npz"]),
    "imagefolder": (lambda p: datagen.write_imagefolder(p / "bands", n_per_class=60),
                    ["data.format=imagefolder", "data.path=bands"]),
    "hf-disk": (lambda p: datagen.write_hf_disk(p, image=True),
                ["data.format=hf-disk", "data.path=hf_images"]),
    "python": (datagen.write_python, ["data.format=python", "data.target=treedata:make"]),
}


@pytest.fixture
def project(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    yield tmp_path
    for name in ("treedata", "mynets", "mynets.nets"):
        sys.modules.pop(name, None)
    while str(tmp_path) in sys.path:
        sys.path.remove(str(tmp_path))


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_each_format_trains_locally(project, fmt):
    write, overrides = FORMATS[fmt]
    write(project)
    spec = load_spec(None, [f"name=own-{fmt}", "tracking.enabled=false", *TRAIN, *overrides])
    result = run_local(spec)
    assert result.epochs == 12
    assert result.metrics["test_accuracy"] >= 0.85, result.metrics


def test_a_user_model_on_a_table_is_tracked_as_the_users(project):
    """model.target from the user's own package, on a csv table, in a real MLflow store."""
    datagen.write_csv(project)
    module = datagen.write_user_models(project)
    store = project / "mlruns.db"
    spec = load_spec(None, ["name=own-model", *TRAIN[:4], "data.format=csv",
                            "data.path=trees.csv", "data.label=tree", "data.categorical=[soil]",
                            f"model.target={module}:Net", "model.kwargs.width=24",
                            f"tracking.uri=sqlite:///{store}", "tracking.registered_model=trees"])
    result = run_local(spec)
    assert result.metrics["test_accuracy"] >= 0.85, result.metrics
    run = MlflowClient(f"sqlite:///{store}").get_run(result.run_id)
    p = run.data.params
    assert (p["model.class"], p["model.target"], p["model.kwargs.width"]) == \
        ("mynets.nets.Net", "mynets.nets:Net", "24")
    assert (p["data.format"], p["data.label"], p["model.parameters"]) == \
        ("csv", "tree", str(7 * 24 + 24 + 24 * 3 + 3))
    assert result.registered is not None and result.registered.version == "1"


REGRESSION = ["data.format=csv", "data.path=prices.csv", "data.label=price",
              "data.categorical=[region]", "optim.lr=0.01", "data.batch_size=32",
              "model.hidden=[32]", "train.progress=off"]


def test_a_float_label_is_regression_to_r2_above_0_9(project):
    """No `task:` given: the float column makes it regression (MSE, MAE/RMSE/R², no
    accuracy), stated in the run's params, and the registered version carries its R²."""
    datagen.write_regression_csv(project)
    store = project / "mlruns.db"
    spec = load_spec(None, ["name=prices", "train.epochs=15", *REGRESSION,
                            f"tracking.uri=sqlite:///{store}", "tracking.registered_model=prices"])
    result = run_local(spec)
    m = result.metrics
    assert m["test_r2"] >= 0.9 and "test_accuracy" not in m, m
    assert 0 < m["test_mae"] < m["test_rmse"] < 1.0
    client = MlflowClient(f"sqlite:///{store}")
    run = client.get_run(result.run_id)
    assert run.data.params["data.task"] == "regression"
    assert "val_r2" in run.data.metrics and "val_accuracy" not in run.data.metrics
    mv = client.get_model_version_by_alias("prices", "candidate")
    assert (mv.tags["data.task"], float(mv.tags["test_r2"])) == ("regression",
                                                                 pytest.approx(m["test_r2"],
                                                                               abs=1e-4))
