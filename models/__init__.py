"""Model zoo: every model is an `nn.Sequential` of blocks so it can be split into stages."""

from atoll.models.registry import MODELS, build_model, count_parameters
from atoll.models.stages import split_stages

__all__ = ["MODELS", "build_model", "count_parameters", "split_stages"]
