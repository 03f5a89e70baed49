"""Continual-learning metrics against matrices worked out by hand."""

import pytest

from atoll.continual.metrics import (
    average_accuracy,
    backward_transfer,
    forgetting,
    forward_transfer,
    summary,
)

# R[i][j]: accuracy on task j after training task i
R = [
    [0.90, 0.20, 0.10],
    [0.70, 0.80, 0.30],
    [0.60, 0.85, 0.95],
]
BASE = [0.10, 0.10, 0.10]


def test_acc():
    assert average_accuracy(R) == pytest.approx((0.60 + 0.85 + 0.95) / 3)


def test_bwt():
    # task 0: 0.60 - 0.90 = -0.30; task 1: 0.85 - 0.80 = +0.05
    assert backward_transfer(R) == pytest.approx((-0.30 + 0.05) / 2)


def test_fwt():
    # task 1 before training: 0.20 - 0.10; task 2: 0.30 - 0.10
    assert forward_transfer(R, BASE) == pytest.approx((0.10 + 0.20) / 2)


def test_forgetting_uses_the_best_past_accuracy():
    # task 0: max(0.90, 0.70) - 0.60 = 0.30; task 1: max(0.20, 0.80) - 0.85 = -0.05
    assert forgetting(R) == pytest.approx((0.30 - 0.05) / 2)
    peak_later = [[0.5, 0.0], [0.9, 0.9]]
    assert forgetting([[0.5, 0.0, 0.0], [0.9, 0.9, 0.0], [0.4, 0.9, 0.9]]) == pytest.approx(
        ((0.9 - 0.4) + (0.9 - 0.9)) / 2)
    assert backward_transfer(peak_later) == pytest.approx(0.9 - 0.5)


def test_single_task_and_bad_shapes():
    assert summary([[0.7]], [0.1]) == {"cl_acc": 0.7, "cl_bwt": 0.0, "cl_forgetting": 0.0,
                                       "cl_fwt": 0.0}
    with pytest.raises(ValueError, match="square"):
        average_accuracy([[0.1, 0.2]])
    with pytest.raises(ValueError, match="one per task"):
        forward_transfer(R, [0.1])
