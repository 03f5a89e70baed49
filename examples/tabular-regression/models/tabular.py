"""A small residual MLP for tables; atoll calls it with the spec's model.kwargs plus
input_shape (features after one-hot encoding) and num_outputs (1 for regression)."""

from __future__ import annotations

import math

import torch
import torch.nn as nn


class ResidualMLP(nn.Module):
    def __init__(self, input_shape: tuple[int, ...], num_outputs: int, width: int = 32):
        super().__init__()
        self.inp = nn.Linear(math.prod(input_shape), width)
        self.block = nn.Sequential(nn.ReLU(), nn.Linear(width, width), nn.ReLU())
        self.out = nn.Linear(width, num_outputs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x.flatten(1))
        return self.out(h + self.block(h))
