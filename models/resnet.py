"""CIFAR-style ResNet (He et al. 2016, §4.2): depth 6n+2, three stages of basic blocks."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from atoll.core.model_spec import ResnetSpec
from atoll.models.common import activation


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, act: str):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.act = activation(act)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                          nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.act(out + self.shortcut(x))


class Head(nn.Module):
    def __init__(self, width: int, num_classes: int):
        super().__init__()
        self.fc = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def build_resnet(spec: ResnetSpec, input_shape: tuple[int, ...], num_classes: int
                 ) -> nn.Sequential:
    if len(input_shape) != 3:
        raise ValueError(f"model resnet needs image input (C, H, W), got shape {input_shape}")
    n = (spec.depth - 2) // 6
    w = spec.width
    blocks: list[nn.Module] = [nn.Sequential(
        nn.Conv2d(input_shape[0], w, 3, 1, 1, bias=False), nn.BatchNorm2d(w),
        activation(spec.activation))]
    cin = w
    for stage, cout in enumerate((w, 2 * w, 4 * w)):
        for i in range(n):
            stride = 2 if stage > 0 and i == 0 else 1
            blocks.append(BasicBlock(cin, cout, stride, spec.activation))
            cin = cout
    blocks.append(Head(cin, num_classes))
    return nn.Sequential(*blocks)
