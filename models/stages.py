"""Split a sequential model into N contiguous stages for pipeline parallelism."""

from __future__ import annotations

import torch.nn as nn


def _balanced_cuts(costs: list[int], n: int) -> list[int]:
    """Boundaries of n contiguous groups minimising the largest group cost (DP, small n)."""
    m = len(costs)
    prefix = [0]
    for c in costs:
        prefix.append(prefix[-1] + c)
    inf = float("inf")
    best = [[inf] * (m + 1) for _ in range(n + 1)]
    cut = [[0] * (m + 1) for _ in range(n + 1)]
    best[0][0] = 0
    for k in range(1, n + 1):
        for j in range(k, m + 1):
            for i in range(k - 1, j):
                cost = max(best[k - 1][i], prefix[j] - prefix[i])
                if cost < best[k][j]:
                    best[k][j], cut[k][j] = cost, i
    bounds, j = [m], m
    for k in range(n, 0, -1):
        j = cut[k][j]
        bounds.append(j)
    return bounds[::-1]


def split_stages(model: nn.Sequential, n: int) -> list[nn.Sequential]:
    """N sequential stages sharing the model's modules, balanced by parameter count.

    Composing the stages in order computes exactly `model(x)` (tests check every model).
    """
    blocks = list(model.children())
    if not 1 <= n <= len(blocks):
        raise ValueError(f"cannot split a model of {len(blocks)} blocks into {n} stages; "
                         f"allowed: 1..{len(blocks)}")
    costs = [max(1, sum(p.numel() for p in b.parameters())) for b in blocks]
    bounds = _balanced_cuts(costs, n)
    return [nn.Sequential(*blocks[a:b]) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
