"""A user's own data in every format, and the examples (a user's own model and data),
trained in local mode; test_cluster.py and test_federated.py run the examples there."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from atoll.core.runner import run_local
from atoll.core.spec import load_spec
from tests import datagen

pytestmark = pytest.mark.integration

BIN = Path(sys.executable).parent

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
    "csv-embedding": (datagen.write_csv, ["data.format=csv", "data.path=trees.csv",
                                          "data.label=tree", "data.categorical=[soil]",
                                          "data.categorical_encoding=embedding"]),
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


# csv and imagefolder run on workers and clients through the examples (test_cluster,
# test_federated). Workers and client actors read with the same load_data as a local run
# (each format's reader: test_each_format_trains_locally); what a mode adds is where the
# files are found (project_dir, the process's working directory, sys.path for a python
# source), so each of the other formats runs in one of the two modes and the python
# source, which needs the project on sys.path, in both.
MODES = {
    "cluster": ["mode=cluster", "cluster.strategy=ddp", "cluster.num_workers=2",
                "train.epochs=5"],
    "federated": ["mode=federated", "federated.num_clients=2", "federated.rounds=2",
                  "federated.local_epochs=4", "federated.partition.method=iid",
                  "federated.fraction_evaluate=0"],
}
CASES = [("parquet", "cluster"), ("hf-disk", "cluster"), ("python", "cluster"),
         ("npz", "federated"), ("csv-embedding", "federated"), ("python", "federated")]


@pytest.mark.parametrize(("fmt", "mode"), CASES, ids=[f"{f}-{m}" for f, m in CASES])
def test_each_format_trains_on_ray_workers_and_flower_clients(shared_ray, warm_store,
                                                              project, fmt, mode):
    """Ray Train workers and Flower client actors (on the module's Ray head, in working
    directories of their own) read the user's files from project_dir; the model trains."""
    from atoll.cluster.runner import run_cluster
    from atoll.federated.simulation import run_federated

    write, overrides = FORMATS[fmt]
    write(project)
    spec = load_spec(None, [f"name={mode}-{fmt}", *TRAIN, *overrides, *MODES[mode],
                            f"project_dir={project}", "tracking.log_model=false",
                            "tracking.experiment=own-data"])
    result = (run_cluster if mode == "cluster" else run_federated)(spec)
    print(f"\n{fmt} {mode}: test_accuracy {result.metrics['test_accuracy']:.3f}")
    assert result.metrics["test_accuracy"] >= 0.8, result.metrics
    params = MlflowClient(f"sqlite:///{warm_store}").get_run(result.run_id).data.params
    assert f"data.format={params['data.format']}" in overrides


def test_a_users_table_as_a_class_incremental_stream(project):
    """Class-incremental tasks of a parquet file, with replay."""
    from atoll.core.continual_runner import run_continual

    datagen.write_parquet(project)
    spec = load_spec(None, ["name=stream", *TRAIN, "train.epochs=6", "tracking.enabled=false",
                            *FORMATS["parquet"][1], "continual.stream=split",
                            "continual.n_tasks=3", "continual.strategy=replay"])
    result = run_continual(spec)
    assert result.epochs == 18 and result.metrics["cl_acc"] >= 0.6, result.metrics


def test_ewc_remembers_a_permuted_regression_stream(project):
    """Permuted tasks of a regression csv: the matrix holds R², each task is learnt, and
    EWC (the Gaussian Fisher, its default λ) forgets far less than naive fine-tuning."""
    from atoll.core.continual_runner import run_continual

    datagen.write_regression_csv(project)
    base = [*TRAIN, "train.epochs=6", "tracking.enabled=false", "data.format=csv",
            "data.path=prices.csv", "data.label=price", "data.categorical=[region]",
            "continual.stream=permuted", "continual.n_tasks=2", "continual.scenario=domain"]
    naive = run_continual(load_spec(None, ["name=naive", *base, "continual.strategy=naive"]))
    ewc = run_continual(load_spec(None, ["name=ewc", *base, "continual.strategy=ewc"]))
    for r in (naive, ewc):
        matrix = r.details["matrix"]
        assert matrix[0][0] >= 0.9 and matrix[1][1] >= 0.8, matrix  # R² right after each
    assert ewc.metrics["cl_forgetting"] < naive.metrics["cl_forgetting"] - 0.3, \
        (ewc.metrics, naive.metrics)
    assert ewc.metrics["cl_acc"] > naive.metrics["cl_acc"] + 0.1


def _atoll_run(root, store, *overrides):
    args = [str(BIN / "atoll"), "run", "spec.yaml", "--set", "train.progress=off",
            "--set", f"tracking.uri=sqlite:///{store}"]
    for o in overrides:
        args += ["--set", o]
    out = subprocess.run(args, cwd=root, capture_output=True, text=True, timeout=600,
                         check=False)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    client = MlflowClient(f"sqlite:///{store}")
    exp = client.get_experiment_by_name("examples")
    (run,) = client.search_runs([exp.experiment_id])
    return out.stdout, client, run


def test_tabular_regression_example_with_atoll_run(tmp_path):
    """examples/tabular-regression as a user runs it: its csv, its own models/ package
    (models.tabular:ResidualMLP); the float label makes it regression, stated in the
    params and on the registered version, which carries its R²."""
    root = datagen.example("tabular-regression", tmp_path)
    stdout, client, run = _atoll_run(root, tmp_path / "mlruns.db")
    assert "r2=" in stdout and "accuracy" not in stdout
    m, p = run.data.metrics, run.data.params
    assert m["test_r2"] >= 0.9 and 0 < m["test_mae"] < m["test_rmse"] < 1.0, m
    assert "val_r2" in m and "val_accuracy" not in m
    assert (p["data.task"], p["model.class"], p["model.kwargs.width"]) == \
        ("regression", "models.tabular.ResidualMLP", "32")
    mv = client.get_model_version_by_alias("prices", "candidate")
    assert mv.run_id == run.info.run_id and mv.tags["data.task"] == "regression"
    assert float(mv.tags["test_r2"]) == pytest.approx(m["test_r2"], abs=1e-4)


def test_own_model_example_with_atoll_run(tmp_path):
    """examples/own-model: PNG class folders and the project's own CNN (models.convnet)."""
    root = datagen.example("own-model", tmp_path)
    _, client, run = _atoll_run(root, tmp_path / "mlruns.db")
    assert run.data.metrics["test_accuracy"] >= 0.9, run.data.metrics
    assert (run.data.params["model.class"], run.data.params["data.format"]) == \
        ("models.convnet.BandNet", "imagefolder")
    assert client.get_model_version_by_alias("bands", "candidate").run_id == run.info.run_id


def _pyfunc(store, name):
    import mlflow
    import mlflow.pyfunc

    mlflow.set_tracking_uri(f"sqlite:///{store}")
    try:
        return mlflow.pyfunc.load_model(f"models:/{name}@candidate")
    finally:
        mlflow.set_tracking_uri(None)  # it also exported MLFLOW_TRACKING_URI; undo both


def test_registered_models_predict_from_raw_rows_and_images(tmp_path):
    """mlflow.pyfunc.load_model("models:/name@alias").predict(...) on raw input: csv rows
    with their text column (encoded and normalised inside) give values; PNG pixels give
    class names, or probabilities on request."""
    import numpy as np
    import pandas as pd
    from PIL import Image

    root = datagen.example("tabular-regression", tmp_path)
    _atoll_run(root, tmp_path / "t.db", "train.epochs=8")
    rows = pd.read_csv(root / "data" / "prices.csv")
    values = _pyfunc(tmp_path / "t.db", "prices").predict(rows.drop(columns=["price"]))
    y = rows["price"].to_numpy()
    assert values.shape == (len(rows),) and values.dtype.kind == "f"
    assert 1 - ((values - y) ** 2).sum() / ((y - y.mean()) ** 2).sum() >= 0.9

    root = datagen.example("own-model", tmp_path)
    _atoll_run(root, tmp_path / "i.db", "train.epochs=4")
    files = sorted((root / "data" / "bands").glob("*/*.png"))
    pixels = np.stack([np.asarray(Image.open(f), dtype=np.float32)[None] / 255 for f in files])
    model = _pyfunc(tmp_path / "i.db", "bands")
    names = model.predict(pixels)
    assert (names == np.array([f.parent.name for f in files])).mean() >= 0.9
    probs = model.predict(pixels[:3], params={"probabilities": True})
    assert list(probs.columns) == ["bottom", "middle", "top"]
    assert list(probs.idxmax(axis=1)) == list(names[:3])


def test_embedded_categoricals_register_and_predict_raw_rows(project):
    """A table with an embedded categorical, registered: the pyfunc turns raw rows'
    categories into codes (an unseen one into the spare row) and predicts class names."""
    import pandas as pd

    datagen.write_csv(project)
    store = project / "e.db"
    spec = load_spec(None, ["name=embedded", *TRAIN, *FORMATS["csv-embedding"][1],
                            f"tracking.uri=sqlite:///{store}", "tracking.experiment=own",
                            "tracking.registered_model=trees"])
    result = run_local(spec)
    assert result.registered is not None and result.metrics["test_accuracy"] >= 0.85
    run = MlflowClient(f"sqlite:///{store}").get_run(result.run_id)
    assert run.data.params["data.categorical_encoding"] == "embedding"
    rows = pd.read_csv(project / "trees.csv")
    model = _pyfunc(store, "trees")
    names = model.predict(rows.drop(columns=["tree"]))
    assert (names == rows["tree"].to_numpy()).mean() >= 0.85
    rows.loc[:4, "soil"] = "peat"  # never seen in training
    assert len(model.predict(rows.drop(columns=["tree"]).iloc[:5])) == 5


# --------------------------------------------------------------------------- streaming


def test_a_local_run_streams_its_table_through_dataloader_workers(project, monkeypatch):
    """data.streaming in local mode: DataLoader worker processes read parquet row groups
    and the training process never loads the table whole; statistics equal load_data's on
    the same rows; an epoch's batches depend only on (seed, epoch)."""
    from atoll.core import data as data_module
    from atoll.core import formats, loader
    from atoll.core.data import load_data, train_batches

    datagen.write_csv(project, split=True)
    spec = load_spec(None, ["data.streaming=true", "data.val_fraction=0", *FORMATS["csv"][1],
                            f"project_dir={project}"])
    streamed, memory = loader.prepare(spec), load_data(spec.data, spec.seed, project)
    assert (streamed.classes, streamed.features, len(streamed.train), len(streamed.test)) == \
        (memory.classes, memory.features, len(memory.train), len(memory.test))
    assert torch.allclose(streamed.mean, memory.mean, atol=1e-5)
    assert torch.allclose(streamed.std, memory.std, atol=1e-5)
    rows = torch.cat([x for x, _ in loader.LoaderBatches(streamed.train, 64, shuffle=False,
                                                          seed=0, workers=2)])
    assert torch.allclose(rows.sum(0), memory.train.x.sum(0), atol=1e-3)  # the same rows

    datagen.table(900).to_parquet(project / "trees.parquet", row_group_size=60)
    spec = load_spec(None, ["name=streamed-local", *TRAIN, *FORMATS["parquet"][1],
                            "train.epochs=5", "data.streaming=true", "data.workers=2",
                            "tracking.enabled=false"])
    batches = train_batches(loader.prepare(spec), spec.data, spec.seed)
    orders = []
    for epoch in (3, 3, 4):
        batches.set_epoch(epoch)
        orders.append([y.tolist() for _, y in batches])
        assert len(orders[-1]) == len(batches)
    assert orders[0] == orders[1] != orders[2]

    def whole(*_a, **_k):
        raise AssertionError("the training process loaded the data whole")

    for module, name in ((formats, "read"), (data_module, "load_data")):
        monkeypatch.setattr(module, name, whole)
    result = run_local(spec)
    assert result.epochs == 5 and result.metrics["test_accuracy"] >= 0.85, result.metrics


@pytest.fixture
def ray_driver(shared_ray):
    """This process as a driver of the module's Ray head (Ray Data runs its passes there)."""
    import ray

    ray.init(address=shared_ray.address, log_to_driver=False)
    yield shared_ray
    ray.shutdown()


def test_streamed_statistics_equal_the_in_memory_ones(ray_driver, project):
    """The streaming passes give what load_data gives on the same rows: normalisation of
    the training split, classes, features, row counts; and the pipeline's rows are the
    normalised rows. Regression targets too. Bad columns are one line before anything
    trains."""
    import numpy as np

    from atoll.cluster import streaming
    from atoll.core.data import load_data
    from atoll.core.spec import SpecError

    datagen.write_parquet(project)  # one file: hash-cut splits, every row in one of them
    spec = load_spec(None, ["mode=cluster", "data.streaming=true", f"project_dir={project}",
                            *FORMATS["parquet"][1]])
    streamed, memory = streaming.prepare(spec), load_data(spec.data, spec.seed, project)
    assert (streamed.classes, streamed.features, streamed.input_shape) == \
        (memory.classes, memory.features, memory.input_shape)
    assert len(streamed.train) + len(streamed.val) + len(streamed.test) == 300
    assert streamed.train.counts.sum() == len(streamed.train)

    datagen.write_csv(project, split=True)  # train.csv + test.csv: the same rows both ways
    datagen.write_regression_csv(project)
    for overrides in (FORMATS["csv"][1], ["data.format=csv", "data.path=prices.csv",
                                          "data.label=price", "data.categorical=[region]",
                                          "data.test_fraction=0.2"]):
        spec = load_spec(None, ["mode=cluster", "data.streaming=true", "data.val_fraction=0",
                                f"project_dir={project}", *overrides])
        streamed = streaming.prepare(spec)
        if "price" in overrides[2]:  # hash-cut test split: compare the training split only
            assert streamed.task == "regression" and len(streamed.test) > 0
            x = np.concatenate([b["x"] for b in streamed.train.dataset.iter_batches(
                batch_format="numpy")])
            assert abs(float(x.mean())) < 1e-5 and abs(float(x.std(axis=0).mean()) - 1) < 0.01
            continue
        memory = load_data(spec.data, spec.seed, project, spec.task)
        assert (streamed.task, streamed.classes, streamed.features, streamed.input_shape) == \
            (memory.task, memory.classes, memory.features, memory.input_shape)
        assert [len(streamed.train), len(streamed.test)] == [len(memory.train), len(memory.test)]
        assert torch.allclose(streamed.mean, memory.mean, atol=1e-5)
        assert torch.allclose(streamed.std, memory.std, atol=1e-5)
        rows = list(streaming.StreamBatches(streamed.train.dataset, len(streamed.train), 1000,
                                            shuffle=False, seed=0))
        assert torch.allclose(rows[0][0], memory.train.x, atol=1e-5)
        assert torch.equal(rows[0][1], memory.train.y)

    import pandas as pd

    frame = pd.read_csv(project / "trees" / "train.csv")
    frame["height"] = frame["height"].astype(str) + "m"
    frame.to_csv(project / "trees" / "train.csv", index=False)
    spec = load_spec(None, ["mode=cluster", "data.streaming=true", f"project_dir={project}",
                            *FORMATS["csv"][1]])
    with pytest.raises(SpecError, match=r"data.features: column 'height' of .*train.csv is "
                                        r"not numeric"):
        streaming.prepare(spec)
    # found by a Ray task: the same one line, not Ray's wrapped traceback
    datagen.write_imagefolder(project / "imgs", n_per_class=5)
    (project / "imgs" / "cedar" / "broken.png").write_bytes(b"not a png")
    spec = load_spec(None, ["mode=cluster", "data.streaming=true", f"project_dir={project}",
                            "data.format=imagefolder", "data.path=imgs"])
    with pytest.raises(SpecError, match=r"data.path: cannot decode image .*broken.png"):
        streaming.prepare(spec)


def test_what_the_driver_holds_of_a_streamed_table_does_not_grow_with_it(ray_driver,
                                                                         project):
    """The driver of a streamed run keeps statistics, a few head rows and Ray Data's lazy
    plans — never the rows. A table 8x longer leaves the same bytes on the driver: what
    workers are sent (`describe`), the tensors it holds and the pickled plans differ by
    the digits of their row counts at most."""
    import json
    import pickle

    from atoll.cluster import streaming

    held = {}
    for n in (600, 4800):
        datagen.write_parquet(project, n)
        spec = load_spec(None, ["mode=cluster", "data.streaming=true",
                                f"project_dir={project}", *FORMATS["parquet"][1]])
        bundle = streaming.prepare(spec)
        splits = (bundle.train, bundle.val, bundle.test)
        assert sum(len(s) for s in splits) == n
        tensors = [bundle.mean, bundle.std, bundle.train.counts,
                   *(t for s in splits for t in (s.x, s.y))]
        held[n] = (len(json.dumps(streaming.describe(bundle))),
                   sum(t.numel() * t.element_size() for t in tensors),
                   sum(len(pickle.dumps(s.dataset)) for s in splits))
    (sent, tensors, plans), (sent8, tensors8, plans8) = held.values()
    print(f"\ndriver holds (600 rows, 4800 rows): sent to workers {sent}, {sent8} B; "
          f"tensors {tensors}, {tensors8} B; plans {plans}, {plans8} B")
    assert tensors8 == tensors
    assert abs(sent8 - sent) <= 16 and abs(plans8 - plans) <= 64, held


def test_streamed_images_train_on_ray_workers_without_the_driver_reading_them(
        shared_ray, warm_store, project, monkeypatch):
    """data.streaming: Ray Data reads and decodes the image folder, Ray Train shards it
    over 2 FSDP2 workers, the class weights come from the streamed counts and the model is
    registered; the driver (this process) never loads the data whole — its in-memory
    readers fail here. (Tables take the same worker path: the statistics test reads them.)"""
    fmt = "imagefolder"
    from atoll.cluster import runner
    from atoll.core import data as data_module
    from atoll.core import formats

    def whole(*_a, **_k):
        raise AssertionError("the driver loaded the data whole")

    for module, name in ((formats, "read"), (data_module, "load_data"), (runner, "load_data")):
        monkeypatch.setattr(module, name, whole)
    datagen.write_imagefolder(project / "bands", n_per_class=60)
    overrides = [*FORMATS[fmt][1], "cluster.strategy=fsdp", "train.loss.class_weights=balanced",
                 "tracking.registered_model=bands"]
    spec = load_spec(None, [f"name=streamed-{fmt}", *TRAIN, *overrides, "mode=cluster",
                            "cluster.num_workers=2", "train.epochs=5", "data.streaming=true",
                            f"project_dir={project}", "tracking.experiment=own-data"])
    result = runner.run_cluster(spec)
    print(f"\nstreamed {fmt}: test_accuracy {result.metrics['test_accuracy']:.3f}")
    assert result.epochs == 5 and result.metrics["test_accuracy"] >= 0.8, result.metrics
    run = MlflowClient(f"sqlite:///{warm_store}").get_run(result.run_id)
    assert run.data.params["data.streamed"] == "True"
    assert result.registered is not None  # its input example: the streamed test split's rows
