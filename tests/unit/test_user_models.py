"""A user's own model: model.target + kwargs, the atoll.models entry points, pipeline stages,
and every way a user's model can be wrong is exit 2 with one line naming the field."""

from __future__ import annotations

import sys
import textwrap

import pytest
import torch
import torch.nn as nn

from atoll.core.model_spec import UserModelSpec, parse_model
from atoll.core.spec import SpecError, load_spec
from atoll.models import build_model
from atoll.models.stages import check_blocks_compose, model_blocks, split_blocks
from tests.refusals import refused

USERNETS = '''
import math

import torch.nn as nn

CONSTANT = 3


def build(input_shape, num_outputs, width=16):
    return nn.Sequential(nn.Flatten(), nn.Linear(math.prod(input_shape), width), nn.ReLU(),
                         nn.Linear(width, num_outputs))


class Net(nn.Module):
    """Not a Sequential: a pipeline needs model.stages (body, head)."""

    def __init__(self, input_shape, num_outputs, width=16):
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(math.prod(input_shape), width),
                                  nn.Tanh())
        self.head = nn.Linear(width, num_outputs)

    def forward(self, x):
        return self.head(self.body(x))


def takes_only_kwargs(width):
    return nn.Sequential(nn.Flatten(), nn.Linear(64, width))


def not_a_module(**kwargs):
    return "a string"


def ignores_num_outputs(input_shape):
    return nn.Sequential(nn.Flatten(), nn.Linear(math.prod(input_shape), 3))


def fixed_input(num_outputs):
    return nn.Sequential(nn.Flatten(), nn.Linear(10, num_outputs))


def raises(**kwargs):
    raise RuntimeError("no GPU budget for this one")
'''


@pytest.fixture
def project(tmp_path, monkeypatch):
    """A user's project directory, the cwd, with its own `usernets` module (and a `models`
    package of its own, which must not shadow atoll's)."""
    root = tmp_path / "proj"
    (root / "models").mkdir(parents=True)
    (root / "models" / "__init__.py").write_text("raise ImportError('the user models/')\n")
    (root / "usernets.py").write_text(USERNETS)
    (root / "broken.py").write_text("raise RuntimeError('half-edited file')\n")
    (root / "needs_dep.py").write_text("import atoll_no_such_dependency  # noqa\n")
    monkeypatch.chdir(root)
    yield root
    for name in ("usernets", "broken", "needs_dep", "tinyplug"):
        sys.modules.pop(name, None)
    while str(root.resolve()) in sys.path:
        sys.path.remove(str(root.resolve()))


def test_target_gets_kwargs_and_what_the_data_says(project):
    spec = load_spec(None, ["model.target=usernets:build", "model.kwargs.width=7"])
    assert isinstance(spec.model, UserModelSpec) and spec.model.label == "usernets:build"
    model = build_model(spec.model, (1, 8, 8), 10, project)
    assert [m.out_features for m in model if isinstance(m, nn.Linear)] == [7, 10]
    assert model(torch.randn(3, 1, 8, 8)).shape == (3, 10)


def test_a_class_is_a_factory_and_data_args_go_only_where_taken(project):
    net = build_model(parse_model(target="usernets:Net", name="mine"), (20,), 4, project)
    assert type(net).__name__ == "Net" and net(torch.randn(2, 20)).shape == (2, 4)
    only = build_model(parse_model(target="usernets:takes_only_kwargs", kwargs={"width": 5}),
                       (1, 8, 8), 10, project)
    assert only[1].out_features == 5


def test_entry_point_group_adds_model_names(project, monkeypatch):
    """A third-party package registers `tiny` under atoll.models (real package metadata on
    sys.path: importlib.metadata reads it as it would an installed wheel's)."""
    site = project.parent / "site"
    dist = site / "tinyplug-0.1.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: tinyplug\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[atoll.models]\ntiny = tinyplug:make\n")
    (site / "tinyplug.py").write_text(textwrap.dedent("""
        import math
        import torch.nn as nn

        def make(input_shape, num_outputs, depth=1):
            return nn.Sequential(nn.Flatten(), nn.Linear(math.prod(input_shape), num_outputs))
    """))
    with pytest.raises(SpecError, match="'tiny' is not a model"):
        load_spec(None, ["model.name=tiny"])
    monkeypatch.syspath_prepend(str(site))
    spec = load_spec(None, ["model.name=tiny", "model.kwargs.depth=2"])
    assert spec.model.factory == "tinyplug:make"
    assert build_model(spec.model, (4,), 3)(torch.randn(2, 4)).shape == (2, 3)
    with pytest.raises(SpecError, match=r"'tinu' is not a model \(did you mean 'tiny'\?\).*"
                                        r"mlp, cnn, resnet, transformer, tiny"):
        load_spec(None, ["model.name=tinu"])


def test_stages_of_a_non_sequential_model(project):
    net = build_model(parse_model(target="usernets:Net"), (1, 8, 8), 10, project)
    x = torch.randn(4, 1, 8, 8)
    blocks = model_blocks(net, ["body", "head"])
    check_blocks_compose(net, blocks, x)
    (first,), (second,) = split_blocks(blocks, 2)
    assert (first[0], second[0]) == ("body", "head")
    with pytest.raises(SpecError, match="does not compute"):
        check_blocks_compose(net, model_blocks(net, ["body.0", "body.1", "head"]), x)
    with pytest.raises(SpecError, match=r"model.stages: parameter 'body.1.weight' .* is in no "
                                        "stage"):
        model_blocks(net, ["body.0", "head"])
    with pytest.raises(SpecError, match="'tail' is not a submodule of the model; allowed: "
                                        "dotted names of its submodules \\(body, head"):
        model_blocks(net, ["body", "tail"])
    with pytest.raises(SpecError, match="'body.1' lies inside 'body'"):
        model_blocks(net, ["body", "body.1", "head"])
    with pytest.raises(SpecError, match="list its submodules in forward order as model.stages"):
        model_blocks(net, None, "'usernets:Net'")


BAD = [  # (--set overrides, what the one line must say)
    (["model.target=nosuch.mod:build"], "model.target: 'nosuch.mod:build' — no module named "
     "'nosuch' in the project"),
    (["model.target=usernets:nope"], "'usernets' has no 'nope'; allowed: Net, build,"),
    (["model.target=usernets:CONSTANT"],
     "'usernets:CONSTANT' is not callable (an object of type int)"),
    (["model.target=usernets:build", "model.kwargs.widht=8"],
     "model.kwargs: {'widht': 8} — usernets:build(**model.kwargs) raised TypeError"),
    (["model.target=usernets:not_a_module"], "returned a str; allowed: a factory that returns "
     "a torch.nn.Module"),
    (["model.target=usernets:ignores_num_outputs"], "returns (2, 3) for a batch of 2; allowed: "
     "a (batch, 10) tensor"),
    (["model.target=usernets:fixed_input"], "fails on a batch of shape (2, 1, 8, 8)"),
    (["model.target=broken:build"], "importing 'broken' raised RuntimeError: half-edited file"),
    (["model.target=needs_dep:build"], "needs 'atoll_no_such_dependency', which is not "
     "installed"),
    (["model.target=usernets:build", "model.kwargs.num_outputs=3"],
     "model.kwargs.num_outputs: 3 — atoll passes num_outputs from the data"),
    (["model.target=usernets:raises"], "model.target: usernets:raises(**model.kwargs) raised "
     "RuntimeError: no GPU budget for this one"),
    (["model.target=usernets"], "model.target: 'usernets' is not valid; allowed: "
     "'package.module:factory'"),
    (["model.name=mpl"], "model.name: 'mpl' is not a model (did you mean 'mlp'?)"),
    (["model.target=usernets:build", "model.hidden=[8]"], "model.hidden: unknown key for a "
     "model given by model.target; allowed: name, target, kwargs, stages"),
    (["model.target=usernets:Net", "mode=cluster", "cluster.strategy=pipeline"],
     "cluster.strategy: pipeline needs the stages of model 'usernets:Net', a Net (not an "
     "nn.Sequential)"),
    (["model.target=usernets:Net", "model.stages=[head, body]", "mode=cluster",
      "cluster.strategy=pipeline"], "model.stages: applying ['head', 'body'] in order to a "
     "batch of (4, 1, 8, 8) fails"),
    # found by the bad-input probe: stages are checked whenever given; a factory failing
    # on the user's kwargs names model.kwargs
    (["model.target=usernets:Net", "model.stages=[head, body]"], "model.stages: applying "
     "['head', 'body'] in order to a batch of (4, 1, 8, 8) fails"),
    (["model.target=usernets:build", "model.kwargs.width=-3"], "model.kwargs: {'width': -3} — "
     "usernets:build(**model.kwargs) raised RuntimeError"),
]


@pytest.mark.parametrize(("overrides", "says"), BAD, ids=[" ".join(o) for o, _ in BAD])
def test_a_bad_user_model_is_exit_2_with_one_line(project, capsys, overrides, says):
    assert says in refused(project, capsys, overrides)


MODULE_STATE = '''
import math

import torch
import torch.nn as nn

SCALE = torch.tensor([2.0])  # a tensor made at import: must not become a meta tensor


class Scaled(nn.Module):
    def __init__(self, input_shape, num_outputs):
        super().__init__()
        self.fc = nn.Linear(math.prod(input_shape), num_outputs)

    def forward(self, x):
        return self.fc(x.flatten(1)) * SCALE


class Branchy(nn.Module):
    """Data-dependent control flow: fine to train, impossible on the meta device."""

    def __init__(self, input_shape, num_outputs):
        super().__init__()
        self.fc = nn.Linear(math.prod(input_shape), num_outputs)

    def forward(self, x):
        return self.fc(x.flatten(1)) * (2.0 if float(x.sum()) > 0 else 1.0)


def passes_on(**kwargs):
    """Like torchvision's factories: **kwargs go on to a constructor that takes few."""
    return nn.Sequential(nn.Flatten(), nn.Linear(64, kwargs.get("classes", 10)))
'''


def test_the_preflight_neither_poisons_the_module_nor_refuses_what_trains(project):
    """Found in review: the meta-device check imported the user's module under the meta
    device (its import-time tensors became meta: the real build then failed), refused
    data-dependent forwards, and passed input_shape/num_outputs into **kwargs."""
    from atoll.models import check_model

    (project / "state_nets.py").write_text(MODULE_STATE)
    for target in ("state_nets:Scaled", "state_nets:Branchy"):
        spec = parse_model(target=target)
        check_model(spec, (1, 8, 8), 10, project)
        assert build_model(spec, (1, 8, 8), 10, project)(torch.ones(2, 1, 8, 8)).shape == \
            (2, 10)
    spec = parse_model(target="state_nets:passes_on", kwargs={"classes": 10})
    check_model(spec, (1, 8, 8), 10, project, export=True)
    # ... but a model that registration's torch.export cannot trace is refused up front
    with pytest.raises(SpecError, match="'state_nets:Branchy' cannot be traced by "
                                        "torch.export, which the registered model needs"):
        check_model(parse_model(target="state_nets:Branchy"), (1, 8, 8), 10, project,
                    export=True)
    sys.modules.pop("state_nets", None)


def test_two_projects_with_a_models_package_in_one_process(tmp_path, monkeypatch):
    """Found running both examples in one test process: the first project's `models`
    stayed in sys.modules, so the second project's `models.tabular` was 'not found'."""
    from atoll.core.imports import import_target

    for name, body in (("a", "def build():\n    return 'a'\n"),
                       ("b", "def make():\n    return 'b'\n")):
        (tmp_path / name / "models").mkdir(parents=True)
        (tmp_path / name / "models" / "__init__.py").write_text("")
        (tmp_path / name / "models" / f"{name}.py").write_text(body)
    try:
        assert import_target("models.a:build", "model.target", tmp_path / "a")() == "a"
        assert import_target("models.b:make", "model.target", tmp_path / "b")() == "b"
    finally:
        for n in [n for n in sys.modules if n == "models" or n.startswith("models.")]:
            del sys.modules[n]
        for d in ("a", "b"):
            while str((tmp_path / d).resolve()) in sys.path:
                sys.path.remove(str((tmp_path / d).resolve()))
