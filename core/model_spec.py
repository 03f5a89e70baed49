"""The `model:` section: one section per built-in model, or a user's model by import path.

A discriminated union keyed by `name`, so a field the named model does not read is an
error naming that model (`model.channels: unknown key for model 'mlp'`) rather than a
setting that silently does nothing. `model.target` (or a name some installed package
registers in the `atoll.models` entry-point group) builds any `nn.Module`.
"""

from __future__ import annotations

import difflib
import re
from importlib.metadata import entry_points
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    field_validator,
    model_validator,
)

BUILTIN_MODELS = ("mlp", "cnn", "resnet", "transformer")
ACTIVATIONS = ("relu", "leaky_relu", "gelu", "silu", "swish", "tanh", "sigmoid")
ENTRY_POINT_GROUP = "atoll.models"
USER = "user"  # the union's tag for model.target and entry-point models
TARGET_PATTERN = r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*(\.[A-Za-z_]\w*)*$"

Width = Annotated[int, Field(ge=1)]


def target_syntax(cls: type, v: str | None) -> str | None:
    """A `package.module:factory` field (model.target, data.target): shape only, no import."""
    if v is not None and not re.match(TARGET_PATTERN, v):
        raise ValueError("allowed: 'package.module:factory' (a dotted module path, a colon, a "
                         "callable's name)")
    return v


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    @property
    def label(self) -> str:
        """How runs, logs and errors name the model."""
        return str(getattr(self, "name", None) or getattr(self, "target", "model"))


def one_of(value: str, allowed: tuple[str, ...]) -> str:
    if value in allowed:
        return value
    hint = difflib.get_close_matches(value, allowed, n=1)
    near = f" (did you mean '{hint[0]}'?)" if hint else ""
    raise ValueError(f"allowed: {', '.join(allowed)}{near}")


class _Builtin(_Model):
    activation: str = "relu"
    init: Literal["default", "xavier", "he"] = "default"

    @field_validator("activation")
    @classmethod
    def _known_activation(cls, v: str) -> str:
        return one_of(v, ACTIVATIONS)


class MlpSpec(_Builtin):
    """Flatten → [Linear → (BatchNorm) → act → (Dropout)]* → Linear."""

    name: Literal["mlp"] = "mlp"
    hidden: list[Width] = Field([128, 64], description="hidden layer widths")
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    batch_norm: bool = False


class CnnSpec(_Builtin):
    name: Literal["cnn"] = "cnn"
    channels: list[Width] = Field([32, 64], description="conv widths")
    hidden: list[Width] = Field([128, 64], description="head widths")
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    batch_norm: bool = False


class ResnetSpec(_Builtin):
    name: Literal["resnet"] = "resnet"
    depth: int = Field(8, ge=8, description="6n+2 (8, 14, 20, ...)")
    width: int = Field(16, ge=1, description="base width")

    @field_validator("depth")
    @classmethod
    def _depth(cls, v: int) -> int:
        if (v - 2) % 6:
            raise ValueError("not 6n+2; allowed: 8, 14, 20, 32, ...")
        return v


class TransformerSpec(_Builtin):
    name: Literal["transformer"] = "transformer"
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    patch_size: int = Field(4, ge=1, description="patch side")
    dim: int = Field(64, ge=8, description="embedding width")
    heads: int = Field(4, ge=1)
    layers: int = Field(2, ge=1, description="encoder layers")

    @model_validator(mode="after")
    def _heads(self) -> TransformerSpec:
        if self.dim % self.heads:
            raise ValueError(f"model.dim: {self.dim} is not divisible by model.heads "
                             f"{self.heads}; allowed: a multiple of {self.heads}")
        return self


def registered_models() -> dict[str, str]:
    """Names other packages add through the `atoll.models` entry-point group → their
    `module:attr` (read from package metadata; nothing is imported)."""
    return {ep.name: ep.value for ep in entry_points(group=ENTRY_POINT_GROUP)}


class UserModelSpec(_Model):
    """Any `nn.Module`: `target` is `package.module:factory`, called with `kwargs` plus,
    where its signature takes them, `input_shape` (per sample) and `num_outputs`."""

    name: str | None = Field(None, description="an atoll.models entry point, or a label "
                             "for model.target")
    target: str | None = Field(None, description="package.module:factory, imported from "
                               "project_dir first")
    kwargs: dict[str, Any] = Field({}, description="keyword arguments for the factory")
    stages: list[str] | None = Field(
        None, description="pipeline: submodule names whose composition in order is the "
        "model (not needed for an nn.Sequential)")

    _target_syntax = field_validator("target")(target_syntax)

    @field_validator("stages")
    @classmethod
    def _stages(cls, v: list[str] | None) -> list[str] | None:
        if v is not None and (len(v) < 2 or len(set(v)) != len(v)):
            raise ValueError(f"{v} — allowed: two or more distinct submodule names, in the "
                             "order the model applies them")
        return v

    @model_validator(mode="after")
    def _resolvable(self) -> UserModelSpec:
        if self.target is not None:
            if self.name in BUILTIN_MODELS:
                raise ValueError(f"model.name: {self.name!r} is a built-in model, but "
                                 f"model.target {self.target!r} is given; allowed: another "
                                 "name (a label) or none")
            return self
        found = registered_models()
        if self.name not in found:
            names = BUILTIN_MODELS + tuple(sorted(found))
            hint = difflib.get_close_matches(str(self.name), names, n=1)
            near = f" (did you mean '{hint[0]}'?)" if hint else ""
            raise ValueError(f"model.name: {self.name!r} is not a model{near}; allowed: "
                             f"{', '.join(names)} (built-in or from the {ENTRY_POINT_GROUP} "
                             "entry points), or model.target: 'package.module:factory'")
        return self

    @property
    def factory(self) -> str:
        """The `module:attr` to import."""
        return self.target or registered_models()[str(self.name)]


def _tag(v: Any) -> str:
    if isinstance(v, BaseModel):
        return v.name if isinstance(v, _Builtin) else USER  # type: ignore[attr-defined]
    if isinstance(v, dict):
        name = v.get("name", "mlp")
        return name if "target" not in v and name in BUILTIN_MODELS else USER
    return USER  # not a mapping: UserModelSpec reports it


ModelSpec = Annotated[
    Annotated[MlpSpec, Tag("mlp")] | Annotated[CnnSpec, Tag("cnn")]
    | Annotated[ResnetSpec, Tag("resnet")] | Annotated[TransformerSpec, Tag("transformer")]
    | Annotated[UserModelSpec, Tag(USER)],
    Discriminator(_tag)]
MODEL_SECTIONS: dict[str, type[_Model]] = {
    "mlp": MlpSpec, "cnn": CnnSpec, "resnet": ResnetSpec, "transformer": TransformerSpec,
    USER: UserModelSpec}
AnyModelSpec = MlpSpec | CnnSpec | ResnetSpec | TransformerSpec | UserModelSpec


def parse_model(**fields: Any) -> AnyModelSpec:
    """A `model:` section from its fields (the union picks the member), as a spec would."""
    from pydantic import TypeAdapter

    return TypeAdapter(ModelSpec).validate_python(fields)
