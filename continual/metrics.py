"""Continual-learning metrics from the accuracy matrix.

R[i][j] is the accuracy on task j after training on task i (every task is evaluated after
each task, so R is T×T, and entries above the diagonal measure zero-shot transfer).
"""

from __future__ import annotations

from collections.abc import Sequence

Matrix = Sequence[Sequence[float]]


def _check(r: Matrix) -> int:
    t = len(r)
    if t == 0 or any(len(row) != t for row in r):
        raise ValueError(f"accuracy matrix must be square and non-empty, got {len(r)} rows")
    return t


def average_accuracy(r: Matrix) -> float:
    """ACC = (1/T) Σ_j R[T-1][j]: mean accuracy over all tasks after the last one
    (Lopez-Paz & Ranzato 2017, GEM)."""
    t = _check(r)
    return sum(r[t - 1]) / t


def backward_transfer(r: Matrix) -> float:
    """BWT = 1/(T-1) Σ_{j<T-1} (R[T-1][j] − R[j][j]): how learning later tasks changed
    earlier ones; negative means forgetting (Lopez-Paz & Ranzato 2017). 0 for T = 1."""
    t = _check(r)
    if t == 1:
        return 0.0
    return sum(r[t - 1][j] - r[j][j] for j in range(t - 1)) / (t - 1)


def forward_transfer(r: Matrix, baseline: Sequence[float]) -> float:
    """FWT = 1/(T-1) Σ_{j≥1} (R[j-1][j] − b_j), b_j the accuracy of a randomly initialised
    model on task j: how much earlier tasks help a task before it is trained
    (Lopez-Paz & Ranzato 2017). 0 for T = 1."""
    t = _check(r)
    if len(baseline) != t:
        raise ValueError(f"baseline has {len(baseline)} entries; expected {t} (one per task)")
    if t == 1:
        return 0.0
    return sum(r[j - 1][j] - baseline[j] for j in range(1, t)) / (t - 1)


def forgetting(r: Matrix) -> float:
    """Average forgetting (Chaudhry et al. 2018, RWalk): for each task j < T-1,
    f_j = max_{i<T-1} R[i][j] − R[T-1][j], the drop from its best accuracy; mean over j.
    Unlike BWT it uses the best accuracy ever reached, not the one right after training."""
    t = _check(r)
    if t == 1:
        return 0.0
    return sum(max(r[i][j] for i in range(t - 1)) - r[t - 1][j] for j in range(t - 1)) / (t - 1)


def summary(r: Matrix, baseline: Sequence[float] | None = None) -> dict[str, float]:
    out = {"cl_acc": average_accuracy(r), "cl_bwt": backward_transfer(r),
           "cl_forgetting": forgetting(r)}
    if baseline is not None:
        out["cl_fwt"] = forward_transfer(r, baseline)
    return out
