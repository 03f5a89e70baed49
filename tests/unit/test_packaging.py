"""What `pip install` puts into site-packages: one top-level package, `atoll`."""

import shutil
import subprocess
import sys
import zipfile

from tests.conftest import ROOT

FOLDERS = ("core", "models", "continual", "cluster", "federated", "tracking", "configs")


def test_the_wheel_holds_only_the_atoll_package(tmp_path):
    src = tmp_path / "src"  # a copy: building in the checkout would leave build/ there
    for name in FOLDERS:
        shutil.copytree(ROOT / name, src / name,
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps",
                    "--no-build-isolation", str(src), "-w", str(tmp_path / "dist")],
                   check=True, capture_output=True)
    (wheel,) = (tmp_path / "dist").glob("atoll-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names if ".dist-info/" not in n}
    assert top == {"atoll"}
    assert {n.split("/")[1] for n in names if n.startswith("atoll/")} == set(FOLDERS)
    assert "atoll/configs/federated.yaml" in names  # the specs the app's defaults name
    assert "atoll/__init__.py" not in names  # a namespace package, by design
