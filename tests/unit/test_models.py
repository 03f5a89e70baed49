"""Models: every architecture builds for every input size, and its stages compose to it."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from atoll.core.model_spec import parse_model
from atoll.core.spec import SpecError, load_spec
from atoll.models import build_model, count_parameters, split_stages
from atoll.models.common import ACTIVATIONS

SHAPES = [(1, 8, 8), (1, 28, 28), (3, 32, 32)]
CASES = [("mlp", s) for s in SHAPES] + [("mlp", (20,))] + [
    (m, s) for m in ("cnn", "resnet", "transformer") for s in SHAPES]


@pytest.mark.parametrize(("name", "shape"), CASES, ids=[f"{n}-{'x'.join(map(str, s))}"
                                                         for n, s in CASES])
def test_split_stages_compose_to_the_whole_model(name, shape):
    torch.manual_seed(0)
    extra = {"batch_norm": True, "dropout": 0.1} if name in ("mlp", "cnn") else {}
    model = build_model(parse_model(name=name, **extra), shape, 10).eval()
    x = torch.randn(5, *shape)
    with torch.no_grad():
        want = model(x)
        assert want.shape == (5, 10)
        for n in range(1, min(4, len(model)) + 1):
            stages = split_stages(model, n)
            assert len(stages) == n
            out = x
            for stage in stages:
                out = stage(out)
            torch.testing.assert_close(out, want)
            # stages share the model's parameters rather than copying them
            assert sum(count_parameters(s) for s in stages) == count_parameters(model)


def test_split_balances_parameters():
    model = build_model(parse_model(name="resnet", depth=20), (3, 32, 32), 10)
    stages = split_stages(model, 3)
    sizes = [count_parameters(s) for s in stages]
    assert max(sizes) < 0.6 * sum(sizes)


def test_split_rejects_too_many_stages():
    model = build_model(parse_model(name="mlp", hidden=[8]), (4,), 2)
    with pytest.raises(ValueError, match="allowed: 1..3"):
        split_stages(model, 4)


@pytest.mark.parametrize("act", sorted(ACTIVATIONS))
def test_activations(act):
    model = build_model(parse_model(name="mlp", activation=act), (1, 8, 8), 10)
    assert model(torch.randn(2, 1, 8, 8)).shape == (2, 10)


@pytest.mark.parametrize("init", ["xavier", "he"])
def test_init_schemes_change_weights_and_zero_biases(init):
    torch.manual_seed(0)
    default = build_model(parse_model(name="cnn"), (1, 8, 8), 10)
    torch.manual_seed(0)
    custom = build_model(parse_model(name="cnn", init=init), (1, 8, 8), 10)
    conv_d, conv_c = default[0][0], custom[0][0]
    assert not torch.equal(conv_d.weight, conv_c.weight)
    assert torch.count_nonzero(conv_c.bias) == 0
    fan_in = conv_c.weight[0].numel()
    if init == "he":  # kaiming normal: std = sqrt(2 / fan_in)
        assert abs(conv_c.weight.std().item() - (2 / fan_in) ** 0.5) < 0.05


def test_parameter_count_of_a_known_mlp():
    model = build_model(parse_model(name="mlp", hidden=[16]), (1, 8, 8), 10)
    assert count_parameters(model) == 64 * 16 + 16 + 16 * 10 + 10


def test_resnet_depth_sets_block_count():
    model = build_model(parse_model(name="resnet", depth=20), (3, 32, 32), 10)
    assert sum(1 for m in model if type(m).__name__ == "BasicBlock") == 9


def test_a_field_the_named_model_does_not_read_is_an_error_naming_the_model():
    with pytest.raises(SpecError) as e:
        load_spec(None, ["model.name=resnet", "model.hidden=[8]"])
    assert e.value.problems == [
        "model.hidden: unknown key for model 'resnet'; allowed: activation, init, name, "
        "depth, width"]
    with pytest.raises(SpecError, match=r"model.chanels: unknown key for model 'cnn' \(did "
                       r"you mean 'channels'\?\)"):
        load_spec(None, ["model.name=cnn", "model.chanels=[8]"])


def test_image_models_reject_tabular_input():
    with pytest.raises(ValueError, match="image input"):
        build_model(parse_model(name="cnn"), (20,), 2)


def test_every_model_is_sequential():
    for name in ("mlp", "cnn", "resnet", "transformer"):
        assert isinstance(build_model(parse_model(name=name), (1, 8, 8), 10), nn.Sequential)
