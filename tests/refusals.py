"""`atoll run` as a user runs it, for inputs it must refuse: exit 2, one line, no run."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from atoll.core.cli import main


def refused(project: Path, capsys: Any, overrides: list[str]) -> str:
    """Run a minimal spec in `project` with `--set` overrides through the real CLI entry
    point; assert exit 2 with one `atoll: ` line on stderr and no MLflow store written,
    and return that line."""
    (project / "spec.yaml").write_text("name: refused\n")
    args = ["run", "spec.yaml", "--set", "train.epochs=1", "--set", "train.progress=off",
            "--set", f"tracking.uri=sqlite:///{project}/never.db"]
    for o in overrides:
        args += ["--set", o]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("atoll: "), err
    assert not (project / "never.db").exists()  # refused before any MLflow run
    assert not (project / ".atoll").exists(), "a refused run left folders behind"
    return err[0]
