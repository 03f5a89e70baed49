"""Model zoo: the built-ins are `nn.Sequential`s of blocks (splittable into pipeline stages);
a user's model comes by import path or entry point (`registry`)."""

from atoll.models.registry import MODELS, build_model, check_model, count_parameters, model_class
from atoll.models.stages import split_stages

__all__ = ["MODELS", "build_model", "check_model", "count_parameters", "model_class",
           "split_stages"]
