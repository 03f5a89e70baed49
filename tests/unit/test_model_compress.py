"""Post-training compression by hand: which weights pruning removes, what int8 keeps,
what cannot be compressed, and ONNX's parity with torch."""

from __future__ import annotations

import io

import pytest
import torch

from atoll.models import compress as C


def _linear(weights: list[list[float]]) -> torch.nn.Sequential:
    layer = torch.nn.Linear(len(weights[0]), len(weights), bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor(weights))
    return torch.nn.Sequential(layer, torch.nn.Linear(len(weights), 2))


def test_unstructured_pruning_zeroes_the_smallest_magnitudes_over_all_layers():
    model = _linear([[0.1, -2.0], [0.3, -0.05]])
    with torch.no_grad():
        model[1].weight.copy_(torch.tensor([[1.0, -0.2], [0.01, 3.0]]))
    pruned = C.prune(model, 0.5)
    assert pruned[0].weight.detach().tolist() == [[0.0, -2.0], [0.30000001192092896, 0.0]]
    assert pruned[1].weight.detach().tolist() == [[1.0, 0.0], [0.0, 3.0]]
    assert C.sparsity(pruned) == 0.5
    assert float(model[0].weight[0, 0]) == pytest.approx(0.1)  # the original is left alone
    assert not any(n.endswith("_orig") for n, _ in pruned.named_parameters())  # permanent


def test_structured_pruning_removes_whole_neurons_but_never_an_output():
    model = _linear([[3.0, 4.0], [0.1, 0.1], [1.0, 0.0]])  # row norms 5, 0.14, 1
    pruned = C.prune(model, 0.34, structured=True)
    assert pruned[0].weight.detach().tolist()[1] == [0.0, 0.0]
    assert pruned[0].weight.detach().tolist()[0] == [3.0, 4.0]
    assert (pruned[1].weight != 0).all()  # the output layer is kept


def test_int8_keeps_the_function_and_refuses_a_model_without_linear_layers():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 256), torch.nn.ReLU(), torch.nn.Linear(256, 4))
    x = torch.randn(64, 16)
    q = C.int8_dynamic(model)
    assert (q(x) - model(x)).abs().max() < 0.05
    assert C.size(C.scripted(q))[0] < C.size(C.scripted(model))[0]
    with pytest.raises(C.NotApplicable, match="nn.Linear"):
        C.int8_dynamic(torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3)))


def test_onnx_in_onnxruntime_computes_the_torch_function():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 8), torch.nn.ReLU(),
                                torch.nn.Linear(8, 3))
    graph = C.onnx_bytes(model, torch.randn(2, 1, 4, 4))
    from atoll.tracking.compress import OnnxModule

    runtime = OnnxModule(graph)
    x = torch.randn(7, 1, 4, 4)  # another batch size: the batch dimension is dynamic
    assert runtime(x).shape == (7, 3)
    assert C.parity(model, runtime, x) < 1e-5


def _cnn() -> torch.nn.Sequential:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(1, 8, 3, padding=1), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
        torch.nn.Flatten(), torch.nn.Linear(8 * 16, 32), torch.nn.ReLU(),
        torch.nn.Linear(32, 4)).eval()


def test_int8_static_quantises_every_layer_with_ranges_from_the_calibration_batches():
    model = _cnn()
    x = torch.randn(256, 1, 4, 4)
    matched = C.int8_static(model, list(x.split(64)))
    kinds = {type(m).__module__ for m in matched.modules()
             if "Conv" in type(m).__name__ or "Linear" in type(m).__name__}
    assert kinds and all(k.startswith("torch.ao.nn.quantized") or ".intrinsic.quantized" in k
                         for k in kinds), kinds  # no float Conv/Linear left
    err = (matched(x) - model(x)).abs().max()
    assert err < 0.02 * model(x).abs().max()
    # ranges fixed by batches 100x wider: steps 100x coarser on the same data
    wide = C.int8_static(model, [t * 100 for t in x.split(64)])
    assert (wide(x) - model(x)).abs().max() > 5 * err
    assert C.size(C.scripted(matched))[0] < C.size(C.scripted(model))[0]


class _Attending(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(8, 8)
        self.attn = torch.nn.MultiheadAttention(8, 2, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc(x)
        return self.attn(h, h, h, need_weights=False)[0].mean(1)


class _Branching(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x) if x.sum() > 0 else -self.fc(x)


def test_int8_static_refuses_what_it_cannot_quantise_naming_it():
    with pytest.raises(C.NotApplicable, match=r"cannot quantise attn \(MultiheadAttention\) "
                                              r"and 1 more layer"):
        C.int8_static(_Attending().eval(), [torch.randn(4, 3, 8)])
    with pytest.raises(C.NotApplicable, match=r"torch.fx, which failed \(TraceError: "
                                              r"symbolically traced variables"):
        C.int8_static(_Branching(), [torch.randn(4, 4)])
    with pytest.raises(C.NotApplicable, match="Linear and Conv layers; the model has none"):
        C.int8_static(torch.nn.Sequential(torch.nn.ReLU()), [torch.randn(4, 4)])


class _Annotated(torch.nn.Module):
    """A user's module as most are written: `from __future__ import annotations` (this file
    has it), so the annotations torch.fx copies into its generated code are strings."""

    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(6, 16)
        self.out = torch.nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.relu(self.fc(x)))


def test_int8_static_of_an_annotated_module_serves_as_torchscript():
    torch.manual_seed(0)
    model = _Annotated().eval()
    x = torch.randn(128, 6)
    q = C.int8_static(model, [x])
    buffer = io.BytesIO(C.scripted(q))
    served = torch.jit.load(buffer)
    assert (served(x) - model(x)).abs().max() < 0.05


def test_a_neuron_pruned_whole_loses_its_bias_too_and_stays_silent_after_fine_tuning():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.ReLU(), torch.nn.Linear(6, 2))
    with torch.no_grad():
        model[0].bias.fill_(0.5)
    pruned = C.prune(model, 0.5, structured=True, keep_masks=True)
    optimizer = torch.optim.SGD(pruned.parameters(), lr=0.1)
    for _ in range(3):  # a few fine-tuning steps with the masks held
        optimizer.zero_grad()
        pruned(torch.randn(16, 4)).pow(2).sum().backward()
        optimizer.step()
    C.unmask(pruned)
    gone = (pruned[0].weight == 0).all(1)
    assert int(gone.sum()) == 3
    assert (pruned[0].bias[gone] == 0).all()  # a removed neuron outputs nothing
    assert (pruned[0].bias[~gone] != 0).all()


def test_steps_that_cannot_run_are_refused_before_the_first_registers():
    from atoll.core.compress_spec import CompressStep
    from atoll.core.data import load_data
    from atoll.core.spec import validate
    from atoll.tracking.compress import CompressError, _check

    spec = validate({"name": "f", "mode": "federated",
                     "federated": {"privacy": {"mode": "client-fixed"}}})
    data = load_data(spec.data, spec.seed, spec.project_dir, spec.task)
    fine = [CompressStep(method="int8-dynamic"), CompressStep(method="onnx"),
            CompressStep(method="prune")]
    _check(fine, spec, data)
    for step in (CompressStep(method="int8-static"),
                 CompressStep(method="prune", finetune_epochs=1),
                 CompressStep(method="distill", student={"name": "mlp"})):
        with pytest.raises(CompressError, match=rf"--method {step.method}: reads the pooled "
                                                r"training split.*privacy.mode 'client-fixed'"):
            _check([*fine, step], spec, data)
    plain = validate({"name": "p"})
    with pytest.raises(CompressError, match=rf"--calibration: 100000 samples, but the training "
                                            rf"split has {len(data.train)}"):
        _check([CompressStep(method="int8-static", calibration=100000)], plain, data)
    with pytest.raises(CompressError, match=r"--student: model cnn needs image"):
        _check([CompressStep(method="distill", student={"name": "cnn"})],
               validate({"name": "t", "data": {"name": "synthetic"}}),
               load_data(validate({"name": "t", "data": {"name": "synthetic"}}).data, 0,
                         None, None))


def test_a_compression_run_that_fails_while_registering_ends_failed(tmp_path):
    """The new version's run is created before its model is logged: an error after that
    (here MLflow refusing a metric's name) ends it FAILED, never left RUNNING."""
    from types import SimpleNamespace

    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    from atoll.core.compress_spec import CompressStep
    from atoll.core.data import load_data
    from atoll.core.spec import validate
    from atoll.tracking.compress import _register

    client = MlflowClient(f"sqlite:///{tmp_path / 'm.db'}")
    experiment = client.create_experiment("e", artifact_location=str(tmp_path / "art"))
    parent_run = client.create_run(experiment)
    parent = SimpleNamespace(run_id=parent_run.info.run_id, name="m", version="1")
    spec = validate({"name": "p"})
    data = load_data(spec.data, spec.seed, spec.project_dir, spec.task)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10))
    with pytest.raises(MlflowException):
        _register(client, parent, CompressStep(method="prune"), model, C.scripted(model),
                  {"bad?name": 1.0}, data, tmp_path / "t")
    (run,) = [r for r in client.search_runs([experiment])
              if r.info.run_id != parent.run_id]
    assert run.info.status == "FAILED"
