"""`atoll compress` on registered models in a real sqlite MLflow store: new versions of the
same registered model with their figures, loadable with mlflow.pyfunc; bad input exits 2
with one line."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from mlflow.tracking import MlflowClient

from tests import datagen
from tests.conftest import CONFIGS

pytestmark = pytest.mark.integration
ATOLL = [sys.executable, "-m", "atoll.core.cli"]


def _atoll(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([*ATOLL, *args], capture_output=True, text=True, cwd=cwd,
                          timeout=300, check=False)


def _pyfunc(uri: str, model: str):
    import mlflow

    mlflow.set_tracking_uri(uri)
    try:
        return mlflow.pyfunc.load_model(model)
    finally:
        mlflow.set_tracking_uri(None)


def test_int8_pruned_and_onnx_versions_register_with_their_figures(tmp_path):
    uri = f"sqlite:///{tmp_path / 'm.db'}"
    out = _atoll("run", str(CONFIGS / "demo.yaml"), "--set", "train.epochs=3", "--set",
                 f"tracking.uri={uri}", "--set", "train.progress=off", cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    for method in (["int8-dynamic"], ["prune", "--amount", "0.5"], ["onnx"]):
        out = _atoll("compress", "models:/digits-mlp@candidate", "--method", *method,
                     "--uri", uri, cwd=tmp_path)
        assert out.returncode == 0, out.stderr[-3000:]
        assert "Traceback" not in out.stderr
    client = MlflowClient(uri)
    parent = client.get_model_version_by_alias("digits-mlp", "candidate")
    assert str(parent.version) == "1"  # aliases stay where they were
    figures = {}
    for version, tag in (("2", "int8"), ("3", "pruned-50"), ("4", "onnx")):
        mv = client.get_model_version("digits-mlp", version)
        assert mv.tags["compression"] == tag and mv.tags["parent_version"] == "1"
        assert mv.tags["parent_run"] == parent.run_id
        m = client.get_run(mv.run_id).data.metrics
        figures[tag] = m
        for key in ("test_accuracy", "size_bytes", "size_bytes_zipped", "latency_ms_p50_b1",
                    "latency_ms_p95_b1", "latency_ms_p50_b64", "latency_ms_p95_b64"):
            assert m[key] > 0 and m["parent_" + key] > 0, key
        assert m["test_accuracy"] >= m["parent_test_accuracy"] - 0.02
    assert figures["int8"]["size_bytes"] < figures["int8"]["parent_size_bytes"] / 2.5
    assert figures["pruned-50"]["sparsity"] == pytest.approx(0.5, abs=0.01)
    assert figures["pruned-50"]["size_bytes_zipped"] < \
        0.8 * figures["pruned-50"]["parent_size_bytes_zipped"]
    # ONNX in onnxruntime computes the torch model's function: logits within 1e-4
    assert figures["onnx"]["onnx_max_abs_diff"] <= 1e-4
    assert figures["onnx"]["test_accuracy"] == pytest.approx(
        figures["onnx"]["parent_test_accuracy"], abs=1e-3)
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = (digits.images[:300] / 16).astype(np.float32)[:, None]
    for version in ("2", "3", "4"):  # raw images in, class labels out
        labels = _pyfunc(uri, f"models:/digits-mlp/{version}").predict(images)
        assert (labels == digits.target[:300]).mean() >= 0.85


def test_a_regression_model_prunes_and_reports_r2(tmp_path):
    root = datagen.example("tabular-regression", tmp_path)
    uri = f"sqlite:///{tmp_path / 'r.db'}"
    out = _atoll("run", "spec.yaml", "--set", "train.epochs=8", "--set",
                 f"tracking.uri={uri}", "--set", "train.progress=off", cwd=root)
    assert out.returncode == 0, out.stderr[-2000:]
    out = _atoll("compress", "models:/prices@candidate", "--method", "prune", "--amount",
                 "0.3", "--structured", "--uri", uri, cwd=root)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "compression=pruned-30-structured" in out.stdout and "test_r2=" in out.stdout
    m = MlflowClient(uri).get_run(MlflowClient(uri).get_model_version("prices", "2").run_id
                                  ).data.metrics
    assert "test_r2" in m and "test_accuracy" not in m and m["sparsity"] > 0.2


@pytest.mark.parametrize("args,line", [
    (["models:/nothing@candidate", "--method", "int8-dynamic"],
     "atoll: model: models:/nothing@candidate is not in this store"),
    (["runs:/abc/model", "--method", "int8-dynamic"],
     "atoll: model: 'runs:/abc/model' is not a registered model URI"),
])
def test_bad_input_exits_2_with_one_line(tmp_path, args, line):
    out = _atoll("compress", *args, "--uri", f"sqlite:///{tmp_path / 'e.db'}", cwd=tmp_path)
    assert out.returncode == 2, out.stderr[-2000:]
    assert out.stderr.strip().splitlines()[-1].startswith(line), out.stderr
    assert "Traceback" not in out.stderr


def test_a_compress_section_runs_after_training_and_again_on_request(tmp_path):
    """The spec's compress: steps (int8-static, pruning with fine-tuning, distillation into
    a smaller student) run after `atoll run` registers the model, and `atoll compress`
    without --method runs them again on any version of it."""
    spec = yaml.safe_load((CONFIGS / "demo.yaml").read_text())
    spec["compress"] = [{"method": "int8-static", "calibration": 256},
                        {"method": "prune", "amount": 0.5, "finetune_epochs": 1},
                        {"method": "distill", "student": {"name": "mlp", "hidden": [32]},
                         "epochs": 4}]
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec))
    uri = f"sqlite:///{tmp_path / 'm.db'}"
    out = _atoll("run", "spec.yaml", "--set", "train.epochs=3", "--set", f"tracking.uri={uri}",
                 "--set", "train.progress=off", cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    for tag in ("int8-static", "pruned-50-ft1", "distilled"):
        assert f"(compression={tag})" in out.stdout, out.stdout
    client = MlflowClient(uri)
    m = {}
    for version, tag in (("2", "int8-static"), ("3", "pruned-50-ft1"), ("4", "distilled")):
        mv = client.get_model_version("digits-mlp", version)
        assert mv.tags["compression"] == tag and mv.tags["parent_version"] == "1"
        run = client.get_run(mv.run_id)
        m[tag] = run.data.metrics
        assert m[tag]["test_accuracy"] > 0.8, (tag, m[tag])
    assert m["int8-static"]["size_bytes"] < m["int8-static"]["parent_size_bytes"] / 2.5
    assert m["pruned-50-ft1"]["sparsity"] == pytest.approx(0.5, abs=0.01)
    assert "train_loss" in m["pruned-50-ft1"] and "val_accuracy" in m["distilled"]
    assert m["distilled"]["parameters"] < m["distilled"]["parent_parameters"] / 10
    assert client.get_run(client.get_model_version("digits-mlp", "4").run_id).data.params[
        "compression.student.hidden"] == "[32]"
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = (digits.images[:300] / 16).astype(np.float32)[:, None]
    for version in ("2", "4"):  # a statically quantised and a distilled network serve
        labels = _pyfunc(uri, f"models:/digits-mlp/{version}").predict(images)
        assert (labels == digits.target[:300]).mean() >= 0.8
    out = _atoll("compress", "models:/digits-mlp/1", "--uri", uri, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert [client.get_model_version("digits-mlp", v).tags["compression"]
            for v in ("5", "6", "7")] == ["int8-static", "pruned-50-ft1", "distilled"]
    assert str(client.get_model_version_by_alias("digits-mlp", "candidate").version) == "1"


def test_static_quantisation_of_attention_is_refused_naming_the_layer(tmp_path):
    """A compress: section whose second step cannot apply: the first step's version is
    registered and said, the second is refused with one line naming the layer."""
    uri = f"sqlite:///{tmp_path / 'm.db'}"
    spec = yaml.safe_load((CONFIGS / "demo.yaml").read_text())
    spec["model"] = {"name": "transformer", "dim": 32, "layers": 1}
    spec["compress"] = [{"method": "prune"}, {"method": "int8-static"}]
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec))
    out = _atoll("run", "spec.yaml", "--set", "train.epochs=1", "--set",
                 f"tracking.uri={uri}", "--set", "train.progress=off", cwd=tmp_path)
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr[-3000:]
    assert "registered: digits-mlp version 2 (compression=pruned-50)" in out.stdout, out.stdout
    line = out.stderr.strip().splitlines()[-1]
    assert line.startswith("atoll: --method int8-static: int8-static cannot quantise "), line
    assert "(MultiheadAttention)" in line and line.endswith(
        "allowed: --method int8-dynamic or onnx (the trained model is registered: "
        "models:/digits-mlp/1)"), line
    assert sorted(str(v.version) for v in MlflowClient(uri).search_model_versions(
        "name='digits-mlp'")) == ["1", "2"]


def test_a_run_that_registers_nothing_says_its_compress_section_was_skipped(tmp_path):
    out = _atoll("run", str(CONFIGS / "cnn.yaml"), "--set", "train.epochs=1", "--set",
                 "tracking.enabled=false", "--set", "train.progress=off", cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "atoll: compress: skipped, this run registered no model" in out.stderr
    assert "compression=" not in out.stdout


def test_the_compress_section_follows_a_run_that_fell_back_to_the_local_store(tmp_path):
    """tracking.fallback: local — the server is down, the model is registered in
    ./mlruns.db, and the compress: steps find it there."""
    import socket

    with socket.socket() as s:  # a loopback port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    spec = yaml.safe_load((CONFIGS / "demo.yaml").read_text())
    spec["tracking"].update({"uri": f"http://127.0.0.1:{port}", "fallback": "local"})
    spec["compress"] = [{"method": "int8-dynamic"}]
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec))
    out = _atoll("run", "spec.yaml", "--set", "train.epochs=1", "--set", "train.progress=off",
                 cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "registered: digits-mlp version 2 (compression=int8)" in out.stdout, out.stdout
    local = MlflowClient(f"sqlite:///{tmp_path / 'mlruns.db'}")
    assert local.get_model_version("digits-mlp", "2").tags["compression"] == "int8"
