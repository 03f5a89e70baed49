"""The `compress:` section: what to make of the registered model once training is done.

A list of steps, each one `atoll compress` call (`models/compress.py` does the work,
`tracking/compress.py` registers the result as a new version of the same model). Each
field belongs to one method; a field set for another method is an error rather than a setting
that silently does nothing; a step is dumped with its own method's fields only.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_serializer, model_validator

from atoll.core.model_spec import ModelSpec

METHODS = ("int8-dynamic", "int8-static", "prune", "distill", "onnx")
# which method reads which field (the rest are common to none)
OWNERS = {"amount": "prune", "structured": "prune", "finetune_epochs": "prune",
          "finetune_lr": "prune",
          "calibration": "int8-static", "student": "distill", "temperature": "distill",
          "alpha": "distill", "epochs": "distill"}


class CompressStep(BaseModel):
    """One compression of the trained model, registered as a new version of it."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    method: Literal["int8-dynamic", "int8-static", "prune", "distill", "onnx"]
    amount: float = Field(0.5, gt=0, lt=1, description="prune: share of weights removed "
                          "(structured: of each layer's neurons/channels)")
    structured: bool = Field(False, description="prune whole output neurons/channels")
    finetune_epochs: int = Field(0, ge=0, description="prune: epochs trained afterwards on "
                                 "the training split, pruned weights held at zero")
    finetune_lr: float | None = Field(None, gt=0, description="prune: the fine-tuning "
                                      "learning rate (default optim.lr / 10, no warm-up)")
    calibration: int = Field(512, ge=1, description="int8-static: training samples that "
                             "set the activations' ranges")
    student: ModelSpec | None = Field(None, description="distill: the smaller model, a "
                                      "`model:` section")
    temperature: float = Field(4.0, gt=0, description="distill: softmax temperature of "
                               "the teacher's and student's logits")
    alpha: float = Field(0.7, ge=0, le=1, description="distill: weight of the teacher's "
                         "soft targets; 1 - alpha weighs the labels")
    epochs: int | None = Field(None, ge=1, description="distill: the student's epochs "
                               "(default train.epochs)")

    @model_validator(mode="after")
    def _fields_of_the_method(self) -> CompressStep:
        for name in sorted(self.model_fields_set):
            owner = OWNERS.get(name)
            if owner is not None and owner != self.method:
                raise ValueError(f"{name}: read by method {owner} only; this step's method "
                                 f"is {self.method}")
        if self.method == "distill" and self.student is None:
            raise ValueError("student: method distill needs the student's `model:` section, "
                             "e.g. {name: mlp, hidden: [32]}")
        return self

    @model_serializer(mode="wrap")
    def _own_fields(self, handler: Any) -> dict[str, Any]:
        """Dumped (spec.yaml, params) with the fields its method reads only, so that a dump
        reads back under the check above."""
        return {k: v for k, v in handler(self).items()
                if OWNERS.get(k, self.method) == self.method}

    @property
    def tag(self) -> str:
        """The `compression` tag of the registered version."""
        if self.method == "prune":
            return (f"pruned-{round(self.amount * 100)}"
                    f"{'-structured' if self.structured else ''}"
                    f"{f'-ft{self.finetune_epochs}' if self.finetune_epochs else ''}")
        return {"int8-dynamic": "int8", "distill": "distilled"}.get(self.method, self.method)
