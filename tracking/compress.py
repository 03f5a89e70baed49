"""`atoll compress`: a registered model version, compressed, as a new version of the
same registered model.

The parent version's run holds the spec it trained with (`spec.yaml`) and the model's
weights (its torch.export program): the network is rebuilt from the spec and loaded with
those weights, compressed (`models/compress.py`), measured on the spec's test split next
to the parent, and logged as a new run in the parent's experiment whose pyfunc serves the
compressed network (a TorchScript archive) with the parent's preprocessing. The new
version carries the tags `compression`, `parent_version` and `parent_run`; its run logs
`test_accuracy` (or `test_r2`), `size_bytes`, `size_bytes_zipped`, `sparsity` and
`latency_ms_p50/p95` at batch 1 and 64, for the parent (`parent_*`) too. Aliases are
left where they are: promoting a compressed version is a person's decision.
"""

from __future__ import annotations

import json
import re
import tempfile
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
import mlflow.pyfunc
import numpy as np
import pandas as pd
import torch
import torch.nn as nn
import yaml
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from atoll.core.compress_spec import METHODS, CompressStep
from atoll.core.data import load_data
from atoll.core.imports import first_line
from atoll.core.interrupts import stopped_by
from atoll.core.loop import evaluate
from atoll.core.metrics import build_loss
from atoll.core.serving import preprocess, raw_example
from atoll.core.spec import SpecError, flatten, validate
from atoll.models import build_model, check_model, count_parameters
from atoll.models import compress as C
from atoll.models.retrain import retrain
from atoll.tracking.mlflow_tracker import PREDICTOR, _fluent_uri

URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[A-Za-z_][\w-]*)|/(?P<version>\d+))$")


class OnnxModule(nn.Module):
    """An ONNX graph run by onnxruntime, callable like the torch model (for evaluation and
    latency next to it)."""

    def __init__(self, graph: bytes):
        super().__init__()
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.log_severity_level = 3
        self.session = ort.InferenceSession(graph, options, providers=["CPUExecutionProvider"])
        self.input = self.session.get_inputs()[0].name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.session.run(None, {self.input: x.detach().cpu().numpy()})[0]
        return torch.from_numpy(out)


def _version_of(package: str) -> str:
    from importlib.metadata import version

    return version(package)


class CompressError(ValueError):
    """Something the user gave that cannot be compressed (exit 2, one line)."""


@dataclass
class Compressed:
    name: str
    version: str
    tag: str
    metrics: dict[str, float]


def _version(client: MlflowClient, uri: str) -> Any:
    m = URI.match(uri)
    if m is None:
        raise CompressError(f"model: {uri!r} is not a registered model URI; allowed: "
                            "models:/NAME@ALIAS or models:/NAME/VERSION")
    try:
        if m.group("alias"):
            return client.get_model_version_by_alias(m.group("name"), m.group("alias"))
        return client.get_model_version(m.group("name"), m.group("version"))
    except MlflowException as e:
        raise CompressError(f"model: {uri} is not in this store ({str(e)[:160]})") from None


def _measure(model: torch.nn.Module, data: Any, loss_fn: torch.nn.Module, archive: bytes,
             prefix: str = "", dense: bool = True) -> dict[str, float]:
    """The figures of one network; `dense`: its weights are float parameters (counted as
    `parameters`; a quantised network packs them elsewhere)."""
    test = [(data.test.x[i:i + 256], data.test.y[i:i + 256])
            for i in range(0, len(data.test), 256)]
    m = evaluate(model, test, loss_fn, data.num_classes)
    key = "test_r2" if data.task == "regression" else "test_accuracy"
    raw, zipped = C.size(archive)
    out = {key: m["val_r2" if key == "test_r2" else "val_accuracy"],
           "size_bytes": float(raw), "size_bytes_zipped": float(zipped),
           "sparsity": C.sparsity(model)}
    if dense:
        out["parameters"] = sum(p.numel() for p in model.parameters())
    for batch in (1, 64):
        x = data.test.x[torch.arange(batch) % len(data.test)]
        out[f"latency_ms_p50_b{batch}"], out[f"latency_ms_p95_b{batch}"] = \
            C.latency_ms(model, x)
    return {prefix + k: float(v) for k, v in out.items()}


def _calibration(data: Any, n: int, seed: int) -> list[torch.Tensor]:
    """`n` training samples in a seeded order, in batches of 64: the ranges int8-static
    fixes for its activations."""
    order = torch.randperm(len(data.train), generator=torch.Generator().manual_seed(seed))
    idx = order[:n]
    return [data.train.x[idx[i:i + 64]] for i in range(0, len(idx), 64)]


def _apply(step: CompressStep, model: nn.Module, spec: Any, data: Any
           ) -> tuple[nn.Module, bytes, dict[str, float]]:
    """(the compressed network, the archive its version serves, what training it took)."""
    extra: dict[str, float] = {}
    if step.method == "onnx":
        archive = C.onnx_bytes(model, data.test.x[:4])
        return OnnxModule(archive), archive, extra
    if step.method == "int8-dynamic":
        small = C.int8_dynamic(model)
    elif step.method == "int8-static":
        small = C.int8_static(model, _calibration(data, step.calibration, spec.seed))
    elif step.method == "prune":
        small = C.prune(model, step.amount, step.structured, keep_masks=True)
        if step.finetune_epochs:
            extra = retrain(small, spec, data, step.finetune_epochs,
                            lr=step.finetune_lr or spec.optim.lr / 10)
        small = C.unmask(small)
    else:  # distill
        small = _student(step, spec, data)
        extra = retrain(small, spec, data, step.epochs or spec.train.epochs, teacher=model,
                        temperature=step.temperature, alpha=step.alpha)
    extra = {k: v for k, v in extra.items()
             if k in ("train_loss", "val_loss", "val_accuracy", "val_r2")}
    return small, C.scripted(small), extra


def compress_registered(uri: str, tracking_uri: str, steps: list[CompressStep] | None = None,
                        report: Callable[[Compressed], None] | None = None
                        ) -> list[Compressed]:
    """Compress the registered version `uri` by each of `steps` (default: the `compress:`
    section of the spec it trained with); returns the new versions, each also handed to
    `report` as soon as it is registered (a later step's failure leaves it said). Every
    step is checked before the first one runs."""
    client = MlflowClient(tracking_uri)
    parent = _version(client, uri)
    out = []
    with _fluent_uri(tracking_uri), tempfile.TemporaryDirectory(prefix="atoll-compress-") as tmp:
        spec_file = mlflow.artifacts.download_artifacts(run_id=parent.run_id,
                                                        artifact_path="spec.yaml", dst_path=tmp)
        model_dir = Path(mlflow.artifacts.download_artifacts(artifact_uri=parent.source,
                                                             dst_path=tmp))
        spec = validate(yaml.safe_load(Path(spec_file).read_text()))
        if steps is None:
            steps = spec.compress
            if not steps:
                raise CompressError(f"--method: not given, and the spec of {uri} has no "
                                    f"compress: section; allowed: {', '.join(METHODS)}")
        data = load_data(spec.data, spec.seed, spec.project_dir, spec.task)
        programs = list((model_dir / "artifacts").glob("*.pt2"))
        if not programs:
            raise CompressError(f"model: {uri} has no torch.export program; a compressed "
                                "version cannot be compressed again")
        model = build_model(spec.model, data.input_shape, data.num_classes, spec.project_dir,
                            data.embedded)
        model.load_state_dict(torch.export.load(programs[0]).state_dict, strict=True)
        model.eval()
        loss_fn = build_loss(spec.train.loss, data.train.y, data.num_classes, data.task,
                             data.y_mean, data.y_std)
        _check(steps, spec, data)
        theirs = _measure(model, data, loss_fn, C.scripted(model), "parent_")
        for i, step in enumerate(steps):
            try:
                small, archive, trained = _apply(step, model, spec, data)
            except C.NotApplicable as e:
                raise CompressError(f"--method {step.method}: {e}") from None
            dense = step.method in ("prune", "distill")
            metrics = {**theirs, **_measure(small, data, loss_fn, archive, dense=dense),
                       **trained}
            if step.method == "onnx":  # the same function in another runtime: how close
                metrics["onnx_max_abs_diff"] = C.parity(model, small, data.test.x[:256])
            out.append(_register(client, parent, step, small, archive, metrics, data,
                                 Path(tmp) / str(i), pooled=_reads_training_data(step)
                                 and spec.mode == "federated"))
            if report is not None:
                report(out[-1])
    return out


def _reads_training_data(step: CompressStep) -> bool:
    """Calibration, fine-tuning and distillation read the training split itself."""
    return step.method in ("int8-static", "distill") or (
        step.method == "prune" and step.finetune_epochs > 0)


def _check(steps: list[CompressStep], spec: Any, data: Any) -> None:
    """What would fail in a later step, said before the first one registers anything."""
    for step in steps:
        privacy = spec.federated.privacy.mode
        if spec.mode == "federated" and privacy != "none" and _reads_training_data(step):
            raise CompressError(
                f"--method {step.method}: reads the pooled training split, which the "
                f"federation's differential privacy (federated.privacy.mode {privacy!r}) "
                "keeps from the server; allowed: int8-dynamic, prune without "
                "finetune_epochs, onnx")
        if step.method == "int8-static" and step.calibration > len(data.train):
            raise CompressError(f"--calibration: {step.calibration} samples, but the "
                                f"training split has {len(data.train)}; allowed: 1 to "
                                f"{len(data.train)}")
        if step.method == "distill":
            _student(step, spec, data)


def _student(step: CompressStep, spec: Any, data: Any) -> nn.Module:
    """The student a distill step describes, built for the data (exit 2 if it cannot be)."""
    try:
        check_model(step.student, data.input_shape, data.num_classes, spec.project_dir,
                    embedded=data.embedded)
        torch.manual_seed(spec.seed)
        return build_model(step.student, data.input_shape, data.num_classes,
                           spec.project_dir, data.embedded)
    except (SpecError, ValueError) as e:
        raise CompressError(f"--student: {first_line(e)}") from None


def _register(client: MlflowClient, parent: Any, step: CompressStep, small: nn.Module,
              archive: bytes, metrics: dict[str, float], data: Any, tmp: Path,
              pooled: bool = False) -> Compressed:
    """A run in the parent's experiment holding the figures and a pyfunc serving `archive`,
    registered as a new version of the parent's model. `pooled`: the step read the
    federation's training data in one place (tagged `data=pooled-training-split`)."""
    tag = step.tag
    tmp.mkdir()
    kind = "onnx" if step.method == "onnx" else "scripted"
    path = tmp / ("model.onnx" if step.method == "onnx" else "model.ts")
    path.write_bytes(archive)
    pre = tmp / "preprocess.json"
    pre.write_text(json.dumps(preprocess(data)))
    run = client.create_run(client.get_run(parent.run_id).info.experiment_id,
                            run_name=f"{parent.name}-v{parent.version}-{tag}",
                            tags={"atoll.compression": tag,
                                  "atoll.parent_version": str(parent.version)})
    try:
        params = {f"compression.{k}": v for k, v in flatten(step.model_dump(mode="json")).items()}
        params["compression.parent"] = f"models:/{parent.name}/{parent.version}"
        if step.method == "distill":
            params["compression.student.parameters"] = count_parameters(small)
        client.log_batch(run.info.run_id,
                         params=[mlflow.entities.Param(k, str(v)) for k, v in params.items()],
                         metrics=[mlflow.entities.Metric(k, v, 0, 0) for k, v in metrics.items()])
        with mlflow.start_run(run_id=run.info.run_id), warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=UserWarning)
            info = mlflow.pyfunc.log_model(
                name="model", python_model=str(PREDICTOR),
                artifacts={kind: str(path), "preprocess": str(pre)},
                input_example=(raw_example(data), {"probabilities": False}),
                pip_requirements=[f"torch=={torch.__version__.split('+')[0]}",
                                  f"numpy=={np.__version__}", f"pandas=={pd.__version__}",
                                  *([f"onnxruntime=={_version_of('onnxruntime')}"]
                                    if step.method == "onnx" else [])])
            version = mlflow.register_model(info.model_uri, parent.name, tags={
                "compression": tag, "parent_version": str(parent.version),
                "parent_run": parent.run_id,
                **({"data": "pooled-training-split"} if pooled else {})})
    except BaseException as e:  # the run says how it ended: FAILED, or KILLED by a stop
        client.set_terminated(run.info.run_id, "KILLED" if stopped_by(e) else "FAILED")
        raise
    return Compressed(parent.name, str(version.version), tag, metrics)
