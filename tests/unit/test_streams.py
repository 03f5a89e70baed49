"""Task streams from the bundled digits: split, permuted, rotated."""

from __future__ import annotations

import pytest
import torch

from atoll.continual.streams import build_stream
from atoll.core.data import load_data
from atoll.core.spec import ContinualSpec, DataSpec, SpecError, load_spec


@pytest.fixture(scope="module")
def digits():
    return load_data(DataSpec(), 0)


def test_split_tasks_partition_the_classes(digits):
    tasks = build_stream(digits, ContinualSpec(stream="split", n_tasks=5), 0)
    assert len(tasks) == 5
    seen = [c for t in tasks for c in t.classes]
    assert sorted(seen) == list(range(10))
    for t in tasks:
        for split in (t.train, t.val, t.test):
            assert set(split.y.unique().tolist()) <= set(t.classes)
    assert sum(len(t.test) for t in tasks) == len(digits.test)
    again = build_stream(digits, ContinualSpec(stream="split", n_tasks=5), 0)
    assert [t.classes for t in again] == [t.classes for t in tasks]  # seeded order


def test_split_with_explicit_order_and_bad_orders(digits):
    order = list(range(9, -1, -1))
    tasks = build_stream(digits, ContinualSpec(stream="split", n_tasks=2, class_order=order), 0)
    assert tasks[0].classes == (9, 8, 7, 6, 5)
    with pytest.raises(ValueError, match="not a permutation"):
        build_stream(digits, ContinualSpec(stream="split", class_order=[0, 1]), 0)
    with pytest.raises(ValueError, match="allowed: 1..10"):
        build_stream(digits, ContinualSpec(stream="split", n_tasks=11), 0)


def test_permuted_tasks_shuffle_pixels_with_a_fixed_permutation(digits):
    tasks = build_stream(digits, ContinualSpec(stream="permuted", scenario="domain",
                                               n_tasks=3), 0)
    assert torch.equal(tasks[0].test.x, digits.test.x)
    for t in tasks[1:]:
        assert not torch.equal(t.test.x, digits.test.x)
        torch.testing.assert_close(t.test.x.flatten(1).sort(1).values,
                                   digits.test.x.flatten(1).sort(1).values)
        assert torch.equal(t.test.y, digits.test.y)
    # the same permutation for train and test of a task
    first_train = tasks[1].train.x.flatten(1)[0]
    assert torch.equal(first_train.sort().values, digits.train.x.flatten(1)[0].sort().values)


def test_rotated_tasks(digits):
    tasks = build_stream(digits, ContinualSpec(stream="rotated", scenario="domain", n_tasks=3,
                                               max_angle=90), 0)
    assert [t.name for t in tasks] == ["rotated 0°", "rotated 45°", "rotated 90°"]
    assert torch.equal(tasks[0].train.x, digits.train.x)
    # a 90° rotation of an 8×8 grid is a transpose + flip, up to interpolation error
    torch.testing.assert_close(tasks[2].test.x, torch.rot90(digits.test.x, 1, (2, 3)),
                               atol=1e-4, rtol=0)


def test_rotated_needs_images():
    tab = load_data(DataSpec(name="synthetic"), 0)
    with pytest.raises(ValueError, match="needs image data"):
        build_stream(tab, ContinualSpec(stream="rotated", scenario="domain"), 0)


def test_scenario_must_fit_the_stream():
    with pytest.raises(SpecError, match="scenario: 'class' does not fit stream 'permuted'"):
        load_spec(None, ["continual.stream=permuted"])
    assert build_stream(load_data(DataSpec(), 0), ContinualSpec(), 0)[0].name == "all"
