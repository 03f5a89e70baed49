"""Multi-layer perceptron over flattened inputs."""

from __future__ import annotations

import math

import torch.nn as nn

from atoll.core.model_spec import MlpSpec
from atoll.models.common import activation


def build_mlp(spec: MlpSpec, input_shape: tuple[int, ...], num_classes: int) -> nn.Sequential:
    """Flatten → [Linear → (BatchNorm) → act → (Dropout)]* → Linear; one block per layer."""
    blocks: list[nn.Module] = [nn.Flatten()]
    width = math.prod(input_shape)
    for h in spec.hidden:
        layer: list[nn.Module] = [nn.Linear(width, h)]
        if spec.batch_norm:
            layer.append(nn.BatchNorm1d(h))
        layer.append(activation(spec.activation))
        if spec.dropout > 0:
            layer.append(nn.Dropout(spec.dropout))
        blocks.append(nn.Sequential(*layer))
        width = h
    blocks.append(nn.Linear(width, num_classes))
    return nn.Sequential(*blocks)
