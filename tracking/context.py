"""Run tags that say where a run came from: versions, git commit, host, mode."""

from __future__ import annotations

import importlib.metadata as md
import socket
import subprocess
from pathlib import Path


def _version(dist: str) -> str:
    try:
        return md.version(dist)
    except md.PackageNotFoundError:
        return "not installed"


def git_commit(cwd: Path | None = None) -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True,
                             text=True, timeout=5, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def run_tags(mode: str) -> dict[str, str]:
    tags = {
        "atoll.version": _version("atoll"),
        "atoll.mode": mode,
        "torch.version": _version("torch"),
        "ray.version": _version("ray"),
        "flwr.version": _version("flwr"),
        "host": socket.gethostname(),
    }
    commit = git_commit(Path(__file__).resolve().parent)
    if commit:
        tags["mlflow.source.git.commit"] = commit
    return tags
