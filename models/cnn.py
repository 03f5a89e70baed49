"""LeNet-style convolutional network for 8×8, 28×28 and 32×32 (RGB) images."""

from __future__ import annotations

import torch.nn as nn

from atoll.core.model_spec import CnnSpec
from atoll.models.common import activation


def build_cnn(spec: CnnSpec, input_shape: tuple[int, ...], num_classes: int) -> nn.Sequential:
    """[Conv3×3 → (BN) → act → MaxPool2]* → AdaptivePool(2×2) → MLP head.

    Pooling stops once the feature map is 2×2, so the same config runs on 8×8 digits and
    on 32×32 CIFAR; the adaptive pool fixes the head's input size.
    """
    if len(input_shape) != 3:
        raise ValueError(f"model cnn needs image input (C, H, W), got shape {input_shape}; "
                         "use model.name: mlp for tabular data")
    c, h, _ = input_shape
    blocks: list[nn.Module] = []
    side = h
    for out in spec.channels:
        layer: list[nn.Module] = [nn.Conv2d(c, out, 3, padding=1, bias=not spec.batch_norm)]
        if spec.batch_norm:
            layer.append(nn.BatchNorm2d(out))
        layer.append(activation(spec.activation))
        if side >= 4:
            layer.append(nn.MaxPool2d(2))
            side //= 2
        blocks.append(nn.Sequential(*layer))
        c = out
    head: list[nn.Module] = [nn.AdaptiveAvgPool2d(2), nn.Flatten()]
    width = c * 4
    for hdim in spec.hidden:
        head += [nn.Linear(width, hdim), activation(spec.activation)]
        if spec.dropout > 0:
            head.append(nn.Dropout(spec.dropout))
        width = hdim
    head.append(nn.Linear(width, num_classes))
    blocks.append(nn.Sequential(*head))
    return nn.Sequential(*blocks)
