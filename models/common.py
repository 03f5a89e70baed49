"""Pieces shared by the model files: activations and weight initialisation."""

from __future__ import annotations

import torch.nn as nn

ACTIVATIONS: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU,
    "leaky_relu": nn.LeakyReLU,
    "gelu": nn.GELU,
    "silu": nn.SiLU,
    "swish": nn.SiLU,  # swish with beta=1 is SiLU
    "tanh": nn.Tanh,
    "sigmoid": nn.Sigmoid,
}


def activation(name: str) -> nn.Module:
    return ACTIVATIONS[name]()


def init_weights(model: nn.Module, scheme: str, nonlinearity: str = "relu") -> None:
    """Xavier or He (Kaiming) init for linear/conv weights, zero biases; 'default' keeps torch's."""
    if scheme == "default":
        return
    gain_name = "leaky_relu" if nonlinearity == "leaky_relu" else "relu"
    for m in model.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            if scheme == "xavier":
                nn.init.xavier_uniform_(m.weight)
            else:
                nn.init.kaiming_normal_(m.weight, nonlinearity=gain_name)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
