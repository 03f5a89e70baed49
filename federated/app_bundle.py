"""The Flower App that `atoll run` submits: only the files a SuperNode runs, staged apart.

`flwr run DIR` walks every file under DIR before it filters (Flower 1.41
`collect_files`): from the project root that is the whole `.venv` — about 55,000
files, 8 s of CPU per run — and the bundle it builds ships tests/, benchmarks/ and
docker/ to every SuperNode. Staging `pyproject.toml` plus what its
`[tool.flwr.app] fab-include` names into a small directory makes the walk instant and
the bundle exactly the app.
"""

from __future__ import annotations

import shutil
import tomllib
from pathlib import Path

from federated.records import app_dir


def app_files(root: Path | None = None) -> list[Path]:
    """The app's files, relative to `root`: pyproject.toml and its fab-include globs."""
    root = root or app_dir()
    config = tomllib.loads((root / "pyproject.toml").read_text())
    patterns = config["tool"]["flwr"]["app"]["fab-include"]
    found = {Path("pyproject.toml")}
    for pattern in patterns:
        found.update(p.relative_to(root) for p in root.glob(pattern)
                     if p.is_file() and "__pycache__" not in p.parts)
    return sorted(found)


def stage_app(dest: Path, root: Path | None = None) -> Path:
    """Copy the app into `dest` (created; must not hold another app) and return it."""
    root = root or app_dir()
    for rel in app_files(root):
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(root / rel, target)
    return dest
