"""`build_model(spec.model, input_shape, num_classes)`: the one way models are made."""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch.nn as nn

from atoll.core.spec import ModelSpec
from atoll.models.cnn import build_cnn
from atoll.models.common import init_weights
from atoll.models.mlp import build_mlp
from atoll.models.resnet import build_resnet
from atoll.models.transformer import build_transformer

Builder = Callable[[ModelSpec, tuple[int, ...], int], nn.Sequential]

MODELS: dict[str, Builder] = {
    "mlp": build_mlp,
    "cnn": build_cnn,
    "resnet": build_resnet,
    "transformer": build_transformer,
}

# Which ModelSpec fields each model reads; a changed field outside this set is ignored,
# and we say so rather than silently skipping user configuration.
_USES = {
    "mlp": {"hidden", "activation", "dropout", "batch_norm", "init"},
    "cnn": {"hidden", "activation", "dropout", "batch_norm", "init", "channels"},
    "resnet": {"activation", "init", "depth", "width"},
    "transformer": {"activation", "dropout", "init", "patch_size", "dim", "heads", "layers"},
}


def build_model(spec: ModelSpec, input_shape: tuple[int, ...], num_classes: int
                ) -> nn.Sequential:
    ignored = sorted(spec.model_fields_set - _USES[spec.name] - {"name"})
    if ignored:
        warnings.warn(f"model {spec.name} ignores model.{', model.'.join(ignored)}",
                      stacklevel=2)
    model = MODELS[spec.name](spec, tuple(input_shape), num_classes)
    init_weights(model, spec.init, spec.activation)
    return model


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
