"""A small CNN that is not an nn.Sequential. Pipeline parallelism cuts it at the
submodules the spec lists as model.stages (features, head): atoll checks that applying
them in order computes this forward."""

from __future__ import annotations

import torch
import torch.nn as nn


class BandNet(nn.Module):
    def __init__(self, input_shape: tuple[int, ...], num_outputs: int, channels: int = 8):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(input_shape[0], channels, 3, padding=1), nn.ReLU(),
            nn.AdaptiveAvgPool2d((4, 1)), nn.Flatten())
        self.head = nn.Linear(channels * 4, num_outputs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))
