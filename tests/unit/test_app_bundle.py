"""The Flower App `atoll run` submits holds what a SuperNode runs and nothing else."""

import io
import zipfile

from flwr.cli.build import build_fab_from_disk

from federated.app_bundle import stage_app


def test_staged_app_builds_a_bundle_of_the_runtime_packages_only(tmp_path):
    app = stage_app(tmp_path / "app")
    names = set(zipfile.ZipFile(io.BytesIO(build_fab_from_disk(app))).namelist())
    # the components pyproject names, the spec files it defaults to, every package
    assert {"pyproject.toml", "federated/server_app.py", "federated/client_app.py",
            "configs/federated.yaml", "core/spec.py", "models/registry.py",
            "continual/ewc.py", "tracking/mlflow_tracker.py"} <= names
    assert not [n for n in names if n.startswith(("tests/", "benchmarks/", "docker/",
                                                   ".venv/"))]
    assert not [n for n in names if "__pycache__" in n]
