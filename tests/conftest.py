"""Test isolation: every test runs in its own temp directory, and tools that like to write
under $HOME (matplotlib, MLflow telemetry) are pointed at places the test session owns."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

os.environ["MLFLOW_DISABLE_TELEMETRY"] = "true"
os.environ.pop("MLFLOW_TRACKING_URI", None)
os.environ.pop("RAY_ADDRESS", None)

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
_session_tmp: list[Path] = []  # this pytest process's folder (each xdist worker has one)


def pytest_configure(config: pytest.Config) -> None:
    """The session's folder, made here and not at import: spawned ranks and Ray workers
    import test modules (and this one) without ever running pytest's hooks."""
    tmp = Path(tempfile.mkdtemp(prefix="atoll-tests-"))
    _session_tmp.append(tmp)
    os.environ["MPLCONFIGDIR"] = str(tmp / "mpl")


def pytest_unconfigure(config: pytest.Config) -> None:
    """Remove the session's folder. (An atexit hook never ran in xdist workers, which end
    with os._exit: every run left one /tmp/atoll-tests-* behind.)"""
    for tmp in _session_tmp:
        shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture(autouse=True)
def _in_tmp_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Default stores (./mlruns.db, ./.atoll) land in the test's own directory."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return tmp_path


@pytest.fixture
def tiny_spec():
    """A spec small enough for a few-second run, tracking to the test's sqlite store."""
    from atoll.core.spec import load_spec

    def make(*overrides: str):
        base = ["train.epochs=2", "train.progress=off", "model.hidden=[32]",
                "tracking.experiment=tests"]
        return load_spec(None, base + list(overrides))

    return make


def _checkout_store() -> tuple[float, int] | None:
    db = ROOT / "mlruns.db"
    return (db.stat().st_mtime, db.stat().st_size) if db.exists() else None


@pytest.fixture(scope="session", autouse=True)
def _checkout_store_untouched():
    """No test writes into the checkout's own ./mlruns.db (a user's runs live there)."""
    before = _checkout_store()
    yield
    assert _checkout_store() == before, f"a test wrote into {ROOT / 'mlruns.db'}"


# Longest modules first: under `pytest -n 2 --dist loadfile --no-loadscope-reorder`
# xdist hands out whole modules in collection order, so the long ones must not come last.
# Measured serial seconds on 2 cores (pytest --durations); unlisted modules are short.
HEAVY_MODULES = ("test_federated.py", "test_faults.py", "test_own_data.py", "test_cluster.py",
                 "test_cli.py", "test_deploy_flower.py", "test_faults_cluster.py",
                 "test_deploy_ray.py", "test_parallel_equivalence.py", "test_deploy_mlflow.py",
                 "test_continual_runs.py")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    def weight(item: pytest.Item) -> int:
        name = item.path.name
        return HEAVY_MODULES.index(name) if name in HEAVY_MODULES else len(HEAVY_MODULES)

    items.sort(key=weight)  # stable: a module's tests keep their order
