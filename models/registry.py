"""`build_model(spec.model, input_shape, num_outputs)`: the one way models are made.

Built-ins are looked up by name; a user's model comes from `model.target` or from a name
another package registers in the `atoll.models` entry-point group, and is called with
`model.kwargs` plus what the data says (`input_shape`, `num_outputs`) where its
signature takes them.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from atoll.core.data import Embedded
from atoll.core.imports import first_line, import_target
from atoll.core.model_spec import AnyModelSpec, UserModelSpec
from atoll.core.spec import SpecError
from atoll.models.cnn import build_cnn
from atoll.models.common import init_weights
from atoll.models.embedding import EmbeddedModel, with_embeddings
from atoll.models.mlp import build_mlp
from atoll.models.resnet import build_resnet
from atoll.models.transformer import build_transformer

log = logging.getLogger(__name__)

Builder = Callable[[Any, tuple[int, ...], int], nn.Sequential]

MODELS: dict[str, Builder] = {
    "mlp": build_mlp,
    "cnn": build_cnn,
    "resnet": build_resnet,
    "transformer": build_transformer,
}
DATA_ARGS = ("input_shape", "num_outputs")


def build_model(spec: AnyModelSpec, input_shape: tuple[int, ...], num_outputs: int,
                project_dir: Path | None = None, embedded: Embedded | None = None
                ) -> nn.Module:
    """The model `spec` names for samples of `input_shape` and `num_outputs` outputs;
    with `embedded` (a table's categorical codes, `DataBundle.embedded`), behind learned
    embeddings, the model itself built for their `width` dense features."""
    if embedded is not None:
        inner = build_model(spec, (embedded.width,), num_outputs, project_dir)
        return with_embeddings(inner, embedded)
    if isinstance(spec, UserModelSpec):
        return _build_user(spec, tuple(input_shape), num_outputs, project_dir)
    model = MODELS[spec.name](spec, tuple(input_shape), num_outputs)
    init_weights(model, spec.init, spec.activation)
    return model


def _field(spec: UserModelSpec) -> str:
    return "model.target" if spec.target else "model.name"


def _data_args(factory: Callable[..., Any], input_shape: tuple[int, ...], num_outputs: int
               ) -> dict[str, Any]:
    """`input_shape`/`num_outputs` for the factory parameters that name them. Not for a
    bare **kwargs: factories like torchvision's pass those on to a constructor that
    takes neither."""
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):  # a builtin without a signature: give only the kwargs
        return {}
    given = {"input_shape": input_shape, "num_outputs": num_outputs}
    return {k: v for k, v in given.items() if k in params and
            params[k].kind is not inspect.Parameter.VAR_POSITIONAL}


def _build_user(spec: UserModelSpec, input_shape: tuple[int, ...], num_outputs: int,
                project_dir: Path | None, factory: Callable[..., Any] | None = None
                ) -> nn.Module:
    field = _field(spec)
    factory = factory or import_target(spec.factory, field, project_dir)
    clash = sorted(set(spec.kwargs) & set(DATA_ARGS))
    if clash:
        raise SpecError([f"model.kwargs.{clash[0]}: {spec.kwargs[clash[0]]!r} — atoll passes "
                         f"{clash[0]} from the data; allowed: leave it out of model.kwargs"])
    call = f"{spec.factory}(**model.kwargs)"
    try:
        model = factory(**spec.kwargs, **_data_args(factory, input_shape, num_outputs))
    except TypeError as e:
        log.debug("building %s failed", spec.factory, exc_info=True)
        raise SpecError([f"model.kwargs: {spec.kwargs} — {call} raised TypeError: {e}; "
                         "allowed: the factory's own parameters"]) from None
    except Exception as e:
        log.debug("building %s failed", spec.factory, exc_info=True)
        if spec.kwargs:  # most likely a value the factory cannot take
            raise SpecError([f"model.kwargs: {spec.kwargs} — {call} raised {type(e).__name__}: "
                             f"{first_line(e)}; allowed: values the factory accepts"]
                            ) from None
        raise SpecError([f"{field}: {call} raised {type(e).__name__}: {first_line(e)}"]
                        ) from None
    if not isinstance(model, nn.Module):
        raise SpecError([f"{field}: {spec.factory!r} returned a {type(model).__name__}; "
                         "allowed: a factory that returns a torch.nn.Module"])
    return model


def check_model(spec: AnyModelSpec, input_shape: tuple[int, ...], num_outputs: int,
                project_dir: Path | None = None, export: bool = False,
                embedded: Embedded | None = None) -> None:
    """Build a user's model on the meta device (no memory) and run a batch of two through
    it, so a bad target, kwargs or output shape is exit 2 before any worker or client.
    `export`: the run will register the model, so torch.export must trace it too (else
    it would fail only after the last epoch)."""
    if not isinstance(spec, UserModelSpec):
        return  # the built-ins are tested for every input shape
    if embedded is not None:  # the user's model sees the embeddings' dense features
        input_shape = (embedded.width,)
    field = _field(spec)
    # imported outside the meta device: tensors the module makes at import stay real
    factory = import_target(spec.factory, field, project_dir)
    with torch.device("meta"):
        model = _build_user(spec, tuple(input_shape), num_outputs, project_dir, factory)
        x = torch.empty(2, *input_shape)
        try:
            out = model(x)
        except NotImplementedError:  # an op without a meta kernel: the real run tells
            return
        except Exception as e:
            if isinstance(e, RuntimeError) and "meta" in str(e):  # data-dependent (.item(),
                if export:  # a real tensor): cannot tell here, but registration must trace it
                    _check_export(model, x, field, spec.factory)
                return
            raise SpecError([f"{field}: {spec.factory!r} fails on a batch of shape "
                             f"{tuple(x.shape)} (input_shape {tuple(input_shape)}): "
                             f"{type(e).__name__}: {first_line(e)}; allowed: a model that "
                             "takes the data's input_shape"]) from None
    shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
    if shape != (2, num_outputs):
        raise SpecError([f"{field}: {spec.factory!r} returns {shape} for a batch of 2; "
                         f"allowed: a (batch, {num_outputs}) tensor (use num_outputs: the "
                         "number of classes, 1 for regression)"])
    if export:
        _check_export(model, x, field, spec.factory)


def _check_export(model: nn.Module, x: torch.Tensor, field: str, factory: str) -> None:
    quiet = logging.getLogger("torch.fx.experimental.symbolic_shapes")
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # its warnings print the whole traced graph
    try:
        torch.export.export(model, (x,), dynamic_shapes=({0: torch.export.Dim.AUTO},))
    except Exception as e:
        raise SpecError([f"{field}: {factory!r} cannot be traced by torch.export, which the "
                         f"registered model needs ({type(e).__name__}: {first_line(e)}); "
                         "allowed: a forward without data-dependent Python control flow, or "
                         "tracking.log_model: false"]) from None
    finally:
        quiet.setLevel(level)


def model_class(model: nn.Module) -> str:
    """`module.Class` of the built model: a run's params say whose model it trained."""
    if isinstance(model, EmbeddedModel):
        return model.inner_class
    cls = type(model)
    return f"{cls.__module__}.{cls.__qualname__}"


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
