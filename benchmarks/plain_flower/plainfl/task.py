"""Model, data and train/test for the baseline (the Flower quickstart's task.py)."""

from __future__ import annotations

import functools

import numpy as np
import torch
import torch.nn as nn
from sklearn.datasets import load_digits


def model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64),
                         nn.ReLU(), nn.Linear(64, 10))


@functools.lru_cache(maxsize=1)
def digits() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    x, y = load_digits(return_X_y=True)
    rng = np.random.default_rng(0)
    order = rng.permutation(len(y))
    x, y = x[order].astype(np.float32), y[order]
    n_test = len(y) // 5
    mean, std = x[n_test:].mean(0), x[n_test:].std(0) + 1e-6
    x = (x - mean) / std
    t = torch.from_numpy
    return t(x[n_test:]), t(y[n_test:]), t(x[:n_test]), t(y[:n_test])


def partition(pid: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    x, y, _, _ = digits()
    idx = np.array_split(np.arange(len(y)), n)[pid]
    return x[idx], y[idx]


def train(net: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int, lr: float,
          batch_size: int) -> float:
    opt = torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9)
    loss_fn = nn.CrossEntropyLoss()
    net.train()
    total = 0.0
    for _ in range(epochs):
        perm = torch.randperm(len(y))
        for i in range(0, len(y), batch_size):
            sel = perm[i:i + batch_size]
            opt.zero_grad()
            loss = loss_fn(net(x[sel]), y[sel])
            loss.backward()
            opt.step()
            total += float(loss) * len(sel)
    return total / (epochs * len(y))


@torch.no_grad()
def test(net: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    net.eval()
    logits = net(x)
    return float(nn.functional.cross_entropy(logits, y)), float((logits.argmax(1) == y).float()
                                                                .mean())
