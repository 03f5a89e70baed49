"""Task streams built from any registered dataset: split, permuted, rotated.

Every task carries its own train/val/test splits, so the accuracy matrix R[i][j] can be
filled by evaluating on each task's test split after training on task i.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from atoll.core.data import DataBundle, Split
from atoll.core.spec import ContinualSpec


@dataclass
class Task:
    index: int
    name: str
    train: Split
    val: Split
    test: Split
    classes: tuple[int, ...]  # labels that occur in this task


def _select(split: Split, classes: np.ndarray) -> Split:
    keep = torch.isin(split.y, torch.as_tensor(classes))
    return Split(split.x[keep], split.y[keep])


def _permute(split: Split, perm: torch.Tensor) -> Split:
    flat = split.x.flatten(1)[:, perm]
    return Split(flat.view_as(split.x), split.y)


def _rotate(split: Split, degrees: float) -> Split:
    if split.x.dim() != 4:
        raise ValueError("continual.stream: 'rotated' needs image data; allowed for tabular "
                         "data: split, permuted")
    if degrees == 0:
        return split
    a = math.radians(degrees)
    theta = torch.tensor([[math.cos(a), -math.sin(a), 0.0], [math.sin(a), math.cos(a), 0.0]])
    grid = F.affine_grid(theta.expand(len(split), 2, 3), list(split.x.shape), align_corners=False)
    # border padding repeats the (background) edge instead of inventing a zero frame
    x = F.grid_sample(split.x, grid, padding_mode="border", align_corners=False)
    return Split(x, split.y)


def _permutable(data: DataBundle) -> int:
    """The leading features a permuted stream shuffles: embedded categoricals are codes,
    not values, so only a table's numeric columns move."""
    return data.embedded.numeric if data.embedded is not None else math.prod(data.input_shape)


def check_stream(data: DataBundle, spec: ContinualSpec) -> None:
    """What the data must allow for `spec.stream`, without building a task: the cluster
    and federated drivers refuse here (exit 2) before any worker or client starts."""
    if spec.stream == "rotated" and not data.is_image:
        raise ValueError("continual.stream: 'rotated' needs image data; allowed for tabular "
                         "data: split, permuted")
    if spec.stream == "permuted":
        moved = _permutable(data)
        if moved < 2:
            raise ValueError("continual.stream: 'permuted' shuffles numeric features, and the "
                             f"table has {moved}; allowed: split, or more numeric columns")


def build_stream(data: DataBundle, spec: ContinualSpec, seed: int) -> list[Task]:
    """The tasks of `spec.stream`; `none` is one task holding the whole dataset."""
    check_stream(data, spec)
    all_classes = tuple(range(data.num_classes))
    if spec.stream == "none":
        return [Task(0, "all", data.train, data.val, data.test, all_classes)]
    n = spec.n_tasks
    if spec.stream == "split":
        order = (np.asarray(spec.class_order) if spec.class_order is not None
                 else np.random.default_rng(seed).permutation(data.num_classes))
        if sorted(order.tolist()) != list(all_classes):
            raise ValueError(f"continual.class_order: {order.tolist()} is not a permutation of "
                             f"the {data.num_classes} classes; allowed: each of "
                             f"0..{data.num_classes - 1} exactly once")
        if n > data.num_classes:
            raise ValueError(f"continual.n_tasks: {n} split tasks need at least {n} classes; "
                             f"allowed: 1..{data.num_classes}")
        groups = np.array_split(order, n)
        return [Task(i, f"classes {'-'.join(map(str, g.tolist()))}",
                     _select(data.train, g), _select(data.val, g), _select(data.test, g),
                     tuple(int(c) for c in g)) for i, g in enumerate(groups)]
    tasks = []
    for i in range(n):
        if spec.stream == "permuted":
            dims = math.prod(data.input_shape)
            moved = _permutable(data)
            g = torch.Generator().manual_seed(seed * 7_919 + i)
            perm = torch.arange(dims)
            if i > 0:
                perm[:moved] = torch.randperm(moved, generator=g)
            make = lambda s, p=perm: _permute(s, p)  # noqa: E731
            name = "original" if i == 0 else f"permutation {i}"
        else:
            angle = spec.max_angle * i / max(1, n - 1)
            make = lambda s, a=angle: _rotate(s, a)  # noqa: E731
            name = f"rotated {angle:g}°"
        tasks.append(Task(i, name, make(data.train), make(data.val), make(data.test),
                          all_classes))
    return tasks
