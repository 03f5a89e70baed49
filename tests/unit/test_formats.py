"""Every data format reads into the same bundle, explicit splits win over fractions, and
every way a user's data can be wrong is exit 2 with one line naming file/column and fix."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

from atoll.core.data import load_data
from atoll.core.spec import load_spec
from tests import datagen
from tests.refusals import refused


def _load(project, *overrides):
    spec = load_spec(None, list(overrides))
    return load_data(spec.data, spec.seed, project)


@pytest.fixture
def project(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    yield tmp_path
    sys.modules.pop("treedata", None)
    while str(tmp_path) in sys.path:
        sys.path.remove(str(tmp_path))


def test_csv_one_hot_text_labels_and_train_only_statistics(project):
    datagen.write_csv(project)
    d = _load(project, "data.format=csv", "data.path=trees.csv", "data.label=tree",
              "data.categorical=[soil]")
    assert d.classes == list(datagen.CLASSES) and d.num_classes == 3
    assert d.features == ["height", "girth", "bark", "leaf", "soil=clay", "soil=loam",
                          "soil=sand"]
    assert d.input_shape == (7,) and d.task == "classification"
    assert len(d.train) + len(d.val) + len(d.test) == 300 and len(d.test) == 60
    torch.testing.assert_close(d.train.x.mean(0), torch.zeros(7), atol=1e-5, rtol=0)
    assert d.val.x.mean(0).abs().max() > 1e-3  # normalised with the train split's statistics


def test_embedded_categoricals_are_codes_in_front_of_any_model(project):
    """data.categorical_encoding: embedding keeps one code column per categorical (not
    normalised), and every model is built behind a learned table per column, for the
    dense width; a category never seen maps to the table's spare row."""
    from atoll.core.data import Embedded
    from atoll.core.model_spec import parse_model
    from atoll.models import build_model, model_class
    from atoll.models.stages import model_blocks, stage_names

    datagen.write_csv(project)
    d = _load(project, "data.format=csv", "data.path=trees.csv", "data.label=tree",
              "data.categorical=[soil]", "data.categorical_encoding=embedding")
    assert d.features == ["height", "girth", "bark", "leaf", "soil"]
    assert d.input_shape == (5,) and d.embedded == Embedded(4, (3,), (2,))
    assert set(d.train.x[:, 4].unique().tolist()) == {0.0, 1.0, 2.0}  # codes stay codes
    torch.testing.assert_close(d.train.x[:, :4].mean(0), torch.zeros(4), atol=1e-5, rtol=0)
    model = build_model(parse_model(name="mlp", hidden=[8]), d.input_shape, 3,
                        embedded=d.embedded)
    assert model.embed.tables[0].weight.shape == (4, 2)  # 3 categories + the unseen row
    assert next(m for m in model.modules() if isinstance(m, torch.nn.Linear)).in_features \
        == 6  # 4 numeric + 2 embedded
    assert model(d.train.x[:3]).shape == (3, 3)
    unseen = d.train.x[:2].clone()
    unseen[0, 4], unseen[1, 4] = 9.0, -1.0  # past the last category, and negative
    spare = model.embed.tables[0].weight[3]
    torch.testing.assert_close(model.embed(unseen)[:, 4:], torch.stack([spare, spare]))
    # a pipeline still finds the model's blocks, the embeddings the first of them
    blocks = model_blocks(model, stage_names(parse_model(name="mlp"), model))
    assert blocks[0][0] == "embed" and len(blocks) == 1 + len(
        build_model(parse_model(name="mlp", hidden=[8]), (6,), 3))
    assert model_class(model) == "torch.nn.modules.container.Sequential"


def test_a_folder_of_split_files_wins_over_the_fractions(project):
    datagen.write_csv(project, split=True)
    d = _load(project, "data.format=csv", "data.path=trees", "data.label=tree",
              "data.features=[height, girth, bark]", "data.test_fraction=0.5")
    assert len(d.test) == 75 and len(d.train) + len(d.val) == 225  # test.csv, not 50 %
    assert d.input_shape == (3,)


def test_parquet_npz_and_python_read_the_same_task(project):
    datagen.write_parquet(project)
    pq = _load(project, "data.format=parquet", "data.path=trees.parquet", "data.label=tree",
               "data.categorical=[soil]")
    assert pq.input_shape == (7,) and pq.classes == list(datagen.CLASSES)
    datagen.write_npz(project)
    npz = _load(project, "data.format=npz", "data.path=trees.npz")
    assert npz.input_shape == (4,) and len(npz.test) == 75 and npz.classes == [0, 1, 2]
    target = datagen.write_python(project)
    py = _load(project, "data.format=python", f"data.target={target}", "data.kwargs.n=200")
    assert py.input_shape == (3,) and len(py.test) == 50 and py.num_classes == 3
    assert py.train.y.dtype == torch.int64


def test_imagefolder_grey_and_rgb(project):
    datagen.write_imagefolder(project / "grey")
    d = _load(project, "data.format=imagefolder", "data.path=grey")
    assert d.input_shape == (1, 8, 8) and d.classes == list(datagen.CLASSES)
    assert d.is_image and len(d.train) + len(d.val) + len(d.test) == 90
    datagen.write_imagefolder(project / "rgb", rgb=True)
    d = _load(project, "data.format=imagefolder", "data.path=rgb", "data.image_size=[12, 10]")
    assert d.input_shape == (3, 12, 10)


def test_hf_disk_tables_and_images(project):
    datagen.write_hf_disk(project)
    d = _load(project, "data.format=hf-disk", "data.path=hf_trees", "data.label=tree",
              "data.categorical=[soil]")
    assert d.input_shape == (7,) and len(d.test) == 75 and d.classes == list(datagen.CLASSES)
    datagen.write_hf_disk(project, image=True)
    d = _load(project, "data.format=hf-disk", "data.path=hf_images")
    assert d.input_shape == (1, 8, 8) and d.classes == list(datagen.CLASSES)
    assert len(d.test) == 75  # the saved test split (25 % of 300)


def _bad_label_nan(p):
    f = datagen.table(50)
    f.loc[7, "tree"] = None
    f.to_csv(p / "t.csv", index=False)


def _text_feature(p):
    datagen.table(50).to_csv(p / "t.csv", index=False)


def _nan_feature(p):
    f = datagen.table(50)
    f.loc[3, "girth"] = np.nan
    f.to_csv(p / "t.csv", index=False)


def _mixed_sizes(p):
    from PIL import Image

    datagen.write_imagefolder(p / "imgs", n_per_class=3)
    Image.new("L", (10, 12)).save(p / "imgs" / "ash" / "big.png")


def _empty_class(p):
    datagen.write_imagefolder(p / "imgs", n_per_class=3)
    (p / "imgs" / "elm").mkdir()


def _corrupt_image(p):
    datagen.write_imagefolder(p / "imgs", n_per_class=3)
    (p / "imgs" / "ash" / "0000.png").write_bytes(b"not a png")


def _bad_npz(p):
    np.savez(p / "a.npz", features=np.zeros((4, 2)), labels=np.zeros(4))


def _not_hf(p):
    (p / "hf").mkdir()
    (p / "hf" / "data.txt").write_text("x")


def _python_bad(p):
    (p / "treedata.py").write_text("def make():\n    return 42\n")


def _cat_nan(p):
    f = datagen.table(50)
    f.loc[2, "soil"] = None
    f.to_csv(p / "t.csv", index=False)


def _inf_feature(p):
    f = datagen.table(50)
    f.loc[5, "bark"] = np.inf
    f.to_csv(p / "t.csv", index=False)


def _one_class(p):
    f = datagen.table(50)
    f["tree"] = "ash"
    f.to_csv(p / "t.csv", index=False)


def _test_only_class(p):
    datagen.write_csv(p, split=True)
    (p / "trees").rename(p / "s")
    f = datagen.table(20)
    f.loc[0, "tree"] = "elm"
    f.to_csv(p / "s" / "test.csv", index=False)


def _python_nan(p):
    (p / "treedata.py").write_text("import numpy as np\n\ndef make():\n    x = np.ones((30, "
                                   "2))\n    x[4, 1] = np.nan\n    return x, np.arange(30) % 2\n")


def _python_shapes(p):
    (p / "treedata.py").write_text(
        "import numpy as np\n\ndef make():\n    return {'train': (np.ones((30, 3)), "
        "np.arange(30) % 2), 'test': (np.ones((8, 2)), np.arange(8) % 2)}\n")


def _late_text(p):
    """A csv whose numeric column turns to text after pyarrow's first 4 MiB block."""
    f = datagen.table(120_000)
    f["height"] = f["height"].round(3).astype(object)
    f.loc[110_000, "height"] = "tall"
    f.to_csv(p / "t.csv", index=False)


def _empty_label(p):
    f = datagen.table(50)
    f.loc[7, "tree"] = ""
    f.to_csv(p / "t.csv", index=False)


def _header_only(p):
    datagen.table(50).iloc[:0].to_csv(p / "t.csv", index=False)


def _bad_png(p):
    datagen.write_imagefolder(p / "imgs", n_per_class=5)
    (p / "imgs" / "cedar" / "broken.png").write_bytes(b"not a png")


TAB = ["data.format=csv", "data.path=t.csv", "data.label=tree"]
STREAMED = ["data.streaming=true", "data.workers=0"]
BAD = [  # (writer, --set overrides, what the one line says)
    (None, ["data.format=csv", "data.path=nowhere.csv"], "data.path: {p}/nowhere.csv does not "
     "exist"),
    (_text_feature, ["data.format=csv", "data.path=t.csv", "data.label=tre"],
     "data.label: no column 'tre' in {p}/t.csv (did you mean 'tree'?); allowed: one of its "
     "columns: height"),
    (_bad_label_nan, [*TAB, "data.categorical=[soil]"], "data.label: column 'tree' of "
     "{p}/t.csv has 1 missing values (first in data row 8)"),
    (_text_feature, TAB, "data.features: column 'soil' of {p}/t.csv is not numeric (str, e.g. "
     "'"),
    (_nan_feature, [*TAB, "data.categorical=[soil]"], "data.features: column 'girth' of "
     "{p}/t.csv has 1 missing values (first in data row 4)"),
    (_text_feature, [*TAB, "data.features=[height, hieght]"], "data.features: no column "
     "'hieght' in {p}/t.csv (did you mean 'height'?)"),
    (_mixed_sizes, ["data.format=imagefolder", "data.path=imgs"], "data.image_size: images "
     "differ in size"),
    (_empty_class, ["data.format=imagefolder", "data.path=imgs"], "data.path: class folder "
     "{p}/imgs/elm holds no PNG/JPEG image"),
    (_corrupt_image, ["data.format=imagefolder", "data.path=imgs"], "data.path: cannot decode "
     "image {p}/imgs/ash/0000.png"),
    (_bad_npz, ["data.format=npz", "data.path=a.npz"], "data.path: {p}/a.npz holds features, "
     "labels; allowed: arrays x and y"),
    (_not_hf, ["data.format=hf-disk", "data.path=hf"], "data.path: {p}/hf is not a dataset "
     "saved with save_to_disk"),
    (_python_bad, ["data.format=python", "data.target=treedata:make"], "data.target: "
     "treedata:make (train) is a int; allowed: a map-style torch Dataset"),
    (lambda p: (p / "d").mkdir(), ["data.format=csv", "data.path=d"], "data.path: folder "
     "{p}/d has no train.csv"),
    (None, ["data.format=csv"], "data.path: required with data.format 'csv'"),
    (datagen.write_regression_csv, ["data.format=csv", "data.path=prices.csv",
                                    "data.label=price", "data.categorical=[region]",
                                    "train.loss.name=cross_entropy"],
     "train.loss.name: 'cross_entropy' needs classes; the task is regression (a float label, "
     "or task: regression); allowed: auto, mse, huber"),
    (datagen.write_regression_csv, ["data.format=csv", "data.path=prices.csv",
                                    "data.label=price", "data.categorical=[region]",
                                    "mode=federated", "federated.partition.method=dirichlet"],
     "federated.partition.method: 'dirichlet' partitions by label; the task is regression"),
    (None, ["task=regression"], "task: 'regression', but data.name 'digits' is a "
     "classification dataset"),
    (None, ["train.loss.name=huber"], "train.loss.name: 'huber' is a regression loss, but the "
     "task is classification"),
    # found by the bad-input probe
    (_cat_nan, [*TAB, "data.categorical=[soil]"], "data.categorical: column 'soil' of "
     "{p}/t.csv has 1 missing values (first in data row 3)"),
    (_text_feature, [*TAB, "data.features=[height, height]", "data.categorical=[]"],
     "data.features: 'height' is listed twice; allowed: distinct columns"),
    (_inf_feature, [*TAB, "data.categorical=[soil]"], "data.features: column 'bark' of "
     "{p}/t.csv has 1 infinite values"),
    (_python_nan, ["data.format=python", "data.target=treedata:make"], "data.target: x of "
     "treedata:make (train) has 1 NaN/inf values"),
    (_one_class, [*TAB, "data.categorical=[soil]"], "data.label: the labels of {p}/t.csv hold "
     "one class ('ash'); allowed: two or more classes"),
    (_test_only_class, ["data.format=csv", "data.path=s", "data.label=tree",
                        "data.categorical=[soil]"], "data.label: class 'elm' of {p}/s/test.csv "
     "is not in the training split"),
    (_text_feature, [*TAB, "data.features=[]"], "data.features: [] lists no column; allowed: "
     "at least one"),
    (_text_feature, [*TAB, "data.categorical=[soil]", "data.image_size=[8, 8]"],
     "data.image_size: set, but data.format 'csv' does not read it; allowed with csv: "
     "categorical, categorical_encoding, embedding_dim, features, label, path"),
    (_text_feature, [*TAB, "data.categorical_encoding=embedding"],
     "data.categorical_encoding: 'embedding', but data.categorical lists no column"),
    (_text_feature, [*TAB, "data.categorical=[soil]", "data.embedding_dim=4"],
     "data.embedding_dim: 4 is set, but data.categorical_encoding is 'onehot'"),
    (_text_feature, [*TAB, "data.features=[height, soil]", "data.categorical=[soil]",
                     "data.categorical_encoding=embedding", "continual.stream=permuted",
                     "continual.scenario=domain"],
     "continual.stream: 'permuted' shuffles numeric features, and the table has 1"),
    *((_text_feature, [*TAB, "data.features=[height, soil]", "data.categorical=[soil]",
                       "data.categorical_encoding=embedding", "continual.stream=permuted",
                       "continual.scenario=domain", *mode],
       "continual.stream: 'permuted' shuffles numeric features, and the table has 1")
      for mode in (["mode=cluster"], ["mode=federated", "federated.num_clients=2"])),
    (None, ["data.format=python", "data.target=treedata:make", "data.path=x.csv"],
     "data.path: set, but data.format 'python' does not read it"),
    (datagen.write_regression_csv, ["data.format=csv", "data.path=prices.csv",
                                    "data.label=price", "data.categorical=[region]",
                                    "continual.stream=split"],
     "continual.stream: 'split' splits classes; the task is regression"),
    (_python_shapes, ["data.format=python", "data.target=treedata:make"], "data.target: "
     "samples of treedata:make (test) have shape (2,)"),
    (lambda p: (p / "a.npz").write_text("not numpy"), ["data.format=npz", "data.path=a.npz"],
     "data.path: {p}/a.npz is not an npz archive"),
    # streamed (local mode: core.loader; the same checks as cluster mode's core.rows)
    (_late_text, [*TAB, *STREAMED, "data.categorical=[soil]"], "data.path: cannot read "
     "{p}/t.csv as csv (ArrowInvalid"),
    (_empty_label, [*TAB, *STREAMED, "data.categorical=[soil]"], "data.label: column 'tree' "
     "of {p}/t.csv has missing values"),
    (_header_only, [*TAB, *STREAMED, "data.categorical=[soil]"], "data.path: {p}/t.csv has no "
     "rows"),
    (_text_feature, [*TAB, *STREAMED], "data.features: column 'soil' of {p}/t.csv is not "
     "numeric"),
    (_cat_nan, [*TAB, *STREAMED, "data.categorical=[soil]"], "data.categorical: column 'soil' "
     "of {p}/t.csv has missing values"),
    (_inf_feature, [*TAB, *STREAMED, "data.categorical=[soil]"], "data.features: column "
     "'bark' of {p}/t.csv has 1 missing or infinite values"),
    (_bad_png, ["data.format=imagefolder", "data.path=imgs", *STREAMED], "data.path: cannot "
     "decode image {p}/imgs/cedar/broken.png"),
    (_text_feature, [*TAB, *STREAMED, "data.categorical=[soil]", "data.limit=10"],
     "data.limit: 10 with streamed data"),
]



@pytest.mark.parametrize(("write", "overrides", "says"), BAD,
                         ids=[" ".join(o[1:]) + f"-{i}" for i, (_, o, _) in enumerate(BAD)])
def test_bad_data_is_exit_2_with_one_line(project, capsys, write, overrides, says):
    if write is not None:
        write(project)
    assert says.format(p=project) in refused(project, capsys, overrides)


def test_built_in_image_models_take_a_users_images(project):
    """Found in review: cnn/resnet/transformer were refused on a user's image folder (only
    the built-in datasets' names counted as image data), and a user file named like a
    built-in dataset was checked against that dataset's shape."""
    from atoll.core.runner import run_local

    datagen.write_imagefolder(project / "bands", n_per_class=20)
    for name in ("cnn", "transformer"):
        spec = load_spec(None, ["data.format=imagefolder", "data.path=bands",
                                f"model.name={name}", "model.patch_size=2" if name ==
                                "transformer" else "model.init=default", "train.epochs=1",
                                "train.progress=off", "tracking.enabled=false",
                                f"name=img-{name}"])
        assert run_local(spec).epochs == 1
    datagen.write_npz(project)
    (project / "trees.npz").rename(project / "digits.npz")
    load_spec(None, ["data.format=npz", "data.path=digits.npz", "model.name=mlp"])


def test_class_only_settings_and_typos_in_the_model_section(project, capsys):
    """Found in review: task regression on a built-in (classification) dataset passed
    validation; `model: cnn` (a string) named an internal class."""
    assert "task: 'regression', but data.name 'digits' is a classification dataset" in \
        refused(project, capsys, ["task=regression"])
    assert refused(project, capsys, ["model=cnn"]) == (
        "atoll: model: 'cnn' is not valid; allowed: a mapping such as {name: cnn} or "
        "{target: package.module:factory, kwargs: {...}}")


def test_sixteen_bit_grey_images_scale_by_their_range(project):
    """Found in review: 16-bit PNGs went through convert('L'), which clips."""
    from PIL import Image

    from atoll.core.images import to_array

    ramp = np.linspace(0, 65535, 64).astype(np.uint16).reshape(8, 8)
    Image.fromarray(ramp).save(project / "ramp.png")
    x = to_array([project / "ramp.png"], ["ramp.png"], None, None)
    assert x.shape == (1, 1, 8, 8)
    np.testing.assert_allclose(x[0, 0], ramp / 65535.0, atol=1e-6)
    rgb = to_array([project / "ramp.png"], ["ramp.png"], (4, 4), 3)
    assert rgb.shape == (1, 3, 4, 4) and 0.4 < rgb.mean() < 0.6


def test_an_image_folder_cannot_be_a_regression(project, capsys):
    datagen.write_imagefolder(project / "imgs", n_per_class=3)
    assert "task: 'regression', but data.format 'imagefolder' holds classes" in refused(
        project, capsys, ["data.format=imagefolder", "data.path=imgs", "task=regression"])
