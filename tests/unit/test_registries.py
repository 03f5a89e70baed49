"""The names the spec accepts are exactly the ones the registries build."""

from atoll.core import model_spec, spec
from atoll.core.data import DATASETS
from atoll.core.spec import EPOCH_METRICS
from atoll.models import MODELS
from atoll.models.common import ACTIVATIONS


def test_spec_names_match_registries():
    from atoll.continual import STRATEGIES

    assert set(spec.DATASETS) == set(DATASETS)
    assert set(model_spec.BUILTIN_MODELS) == set(MODELS)
    assert set(model_spec.MODEL_SECTIONS) - {model_spec.USER} == set(MODELS)
    assert set(model_spec.ACTIVATIONS) == set(ACTIVATIONS)
    assert set(spec.STRATEGIES) == set(STRATEGIES)
    assert set(spec.IMAGE_SHAPES) == set(DATASETS) - {"synthetic"}
    assert {"val_loss", "val_accuracy", "val_f1"} <= set(EPOCH_METRICS)
