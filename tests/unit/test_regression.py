"""Regression: the task comes from the label's dtype, metrics equal scikit-learn's, a
sharded evaluation sums to the whole, and `quantity` skews sizes without looking at labels."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import mean_absolute_error, mean_squared_error, r2_score

from atoll.core.formats import encode_labels
from atoll.core.loop import evaluate
from atoll.core.metrics import RegressionLoss, from_regression_sums, regression_sums
from atoll.core.spec import PartitionSpec
from atoll.federated.partition import partition_indices

WHERE = {"train": "t.csv", "test": "t.csv"}


def test_the_label_dtype_decides_the_task_unless_given():
    floats = {"train": np.array([0.5, 1.0, 2.25]), "test": np.array([1.0])}
    ys, task, classes = encode_labels(floats, None, WHERE)
    assert task == "regression" and classes is None and ys["train"].dtype == np.float32
    ints = {"train": np.array([3, 1, 1]), "test": np.array([0])}
    assert encode_labels(ints, None, WHERE)[1:] == ("classification", [0, 1, 3])
    whole = {"train": np.array([0.0, 1.0, 1.0]), "test": np.array([0.0])}
    ys, task, classes = encode_labels(whole, "classification", WHERE)
    assert (task, classes, ys["train"].tolist()) == ("classification", [0, 1], [0, 1, 1])
    text = {"train": np.array(["b", "a", "c"], dtype=object), "test": np.array(["a"])}
    ys, task, classes = encode_labels(text, None, WHERE)
    assert classes == ["a", "b", "c"] and ys["train"].tolist() == [1, 0, 2]


def test_metrics_equal_scikit_learns_and_shards_sum_to_the_whole():
    g = torch.Generator().manual_seed(0)
    y = torch.randn(101, generator=g) * 3 + 1
    pred = y + torch.randn(101, generator=g)
    got = from_regression_sums(regression_sums(pred[:, None], y))
    want = {"mae": mean_absolute_error(y, pred), "rmse": mean_squared_error(y, pred) ** 0.5,
            "r2": r2_score(y, pred)}
    assert got == pytest.approx(want, rel=1e-6)  # scikit-learn sums float32 in float32
    model = torch.nn.Linear(1, 1)
    with torch.no_grad():
        model.weight.fill_(1.0)
        model.bias.zero_()
    batches = [(pred[i:i + 16, None], y[i:i + 16]) for i in range(0, 101, 16)]
    m = evaluate(model, batches, RegressionLoss("mse"), 1)
    assert (m["val_r2"], m["val_mae"]) == (pytest.approx(want["r2"], rel=1e-6),
                                          pytest.approx(want["mae"], rel=1e-6))
    assert m["val_loss"] == pytest.approx(want["rmse"] ** 2, rel=1e-5)
    assert "val_accuracy" not in m


def test_quantity_partition_skews_sizes_of_float_labels():
    labels = np.random.default_rng(0).standard_normal(500)
    spec = PartitionSpec(method="quantity", alpha=0.5, min_partition_size=20)
    parts = partition_indices(labels, spec, 5, seed=3)
    sizes = sorted(len(p) for p in parts)
    assert sum(sizes) == 500 and min(sizes) >= 20 and sizes[-1] > 2 * sizes[0]
    assert len(np.unique(np.concatenate(parts))) == 500  # disjoint, covering
    again = partition_indices(labels, spec, 5, seed=3)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again, strict=True))


def test_integer_labels_map_to_indices_and_keep_their_values_as_names():
    """Found in review: int labels in one split and whole floats in another (pandas after
    dropna) became different classes; negative ints turned into strings; sparse ints
    {1990, 2000} gave 2001 outputs."""
    mixed = {"train": np.array([1, 2, 2]), "test": np.array([1.0, 2.0])}
    ys, task, classes = encode_labels(mixed, None, WHERE)
    assert (task, classes) == ("classification", [1, 2])
    assert ys["train"].tolist() == [0, 1, 1] and ys["test"].tolist() == [0, 1]
    sparse = {"train": np.array([2000, 1990, 2000]), "test": np.array([1990])}
    ys, _, classes = encode_labels(sparse, None, WHERE)
    assert classes == [1990, 2000] and ys["train"].tolist() == [1, 0, 1]
    signed = {"train": np.array([-1, 1, 1]), "test": np.array([-1])}
    ys, _, classes = encode_labels(signed, None, WHERE)
    assert classes == [-1, 1] and all(isinstance(c, int) for c in classes)
    dense = {"train": np.array([0, 2, 1]), "test": np.array([2])}
    assert encode_labels(dense, None, WHERE)[0]["train"].tolist() == [0, 2, 1]


def test_large_targets_are_standardised_and_metrics_stay_in_their_units(tmp_path,
                                                                         monkeypatch):
    """Found in review: targets were never standardised (prices around 1e5 did not fit
    with MSE and Adam's default lr) and R² from raw sums lost all precision around 1e8."""
    from atoll.core.runner import run_local
    from atoll.core.spec import load_spec
    from tests import datagen

    monkeypatch.chdir(tmp_path)
    frame = datagen.regression_table(400)
    frame["price"] = 1e8 + 2e4 * frame["price"]
    frame.to_csv(tmp_path / "big.csv", index=False)
    spec = load_spec(None, ["data.format=csv", "data.path=big.csv", "data.label=price",
                            "data.categorical=[region]", "train.epochs=15",
                            "train.progress=off", "tracking.enabled=false",
                            "model.hidden=[32]", "data.batch_size=32", "optim.lr=0.01"])
    m = run_local(spec).metrics
    assert m["test_r2"] >= 0.9, m
    assert 1e3 < m["test_mae"] < m["test_rmse"] < 2e4  # in the target's units (noise 6e3)
