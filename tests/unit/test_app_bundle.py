"""The Flower App `atoll run` submits names the installed atoll and nothing else."""

import io
import tomllib
import zipfile

from flwr.cli.build import build_fab_from_disk

from atoll.federated import records as R
from atoll.federated.app_bundle import CLIENTAPP, SERVERAPP, stage_app
from tests.conftest import ROOT


def test_staged_app_is_a_pyproject_naming_the_installed_components(tmp_path):
    fab = zipfile.ZipFile(io.BytesIO(build_fab_from_disk(stage_app(tmp_path / "app"))))
    assert set(fab.namelist()) == {"pyproject.toml", ".info/CONTENT"}  # no code, no tests
    app = tomllib.loads(fab.read("pyproject.toml").decode())["tool"]["flwr"]["app"]
    assert app["components"] == {"serverapp": SERVERAPP, "clientapp": CLIENTAPP}
    assert app["config"] == R.RUN_CONFIG_DEFAULTS


def test_the_projects_own_flower_app_is_the_same_app():
    """`flwr run .` from the project root and `atoll run` must run one app."""
    app = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]
    assert app["components"] == {"serverapp": SERVERAPP, "clientapp": CLIENTAPP}
    assert app["config"] == R.RUN_CONFIG_DEFAULTS
