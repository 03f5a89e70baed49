"""The dependency direction of DESIGN.md §1, checked on the source and on real imports."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

from tests.conftest import ROOT

HEAVY = ("ray", "flwr", "mlflow")


def _imports(path: Path, module_level_only: bool) -> set[str]:
    tree = ast.parse(path.read_text())
    nodes = tree.body if module_level_only else list(ast.walk(tree))
    found: set[str] = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            found |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module.split(".")[0])
    return found


def _package_imports(pkg: str, module_level_only: bool = True) -> dict[str, set[str]]:
    return {str(p.relative_to(ROOT)): _imports(p, module_level_only)
            for p in (ROOT / pkg).rglob("*.py")}


def test_core_never_imports_ray_flwr_or_mlflow():
    for path, names in _package_imports("core", module_level_only=False).items():
        assert not names & set(HEAVY), f"{path} imports {names & set(HEAVY)}"


def test_models_and_continual_import_only_core_and_torch():
    allowed_pkgs = {"core", "torch", "models", "continual", "numpy"}
    project = {"core", "models", "continual", "cluster", "federated", "tracking"}
    for pkg in ("models", "continual"):
        for path, names in _package_imports(pkg, module_level_only=False).items():
            third_party = {n for n in names if n not in sys.stdlib_module_names}
            assert third_party <= allowed_pkgs, f"{path} imports {third_party - allowed_pkgs}"
            assert not names & (project - allowed_pkgs), path


def test_only_tracking_imports_mlflow():
    for pkg in ("core", "models", "continual", "cluster", "federated"):
        for path, names in _package_imports(pkg, module_level_only=False).items():
            assert "mlflow" not in names, path


def test_importing_core_and_the_cli_pulls_in_no_heavy_package():
    code = (
        "import sys, core.cli, core.spec, core.data, core.loop, core.checkpoint, "
        "core.runner, core.components, models, continual\n"
        "core.cli.build_parser()\n"
        f"bad = [m for m in sys.modules if m.split('.')[0] in {HEAVY!r}]\n"
        "assert not bad, bad\n"
        "print('ok')"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=ROOT, check=False)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_help_is_fast_and_light():
    code = ("import sys, runpy\nsys.argv=['atoll','--help']\n"
            "try:\n    runpy.run_module('core.cli', run_name='__main__')\n"
            "except SystemExit:\n    pass\n"
            "heavy = [m for m in sys.modules if m.split('.')[0] in "
            f"{HEAVY + ('torch',)!r}]\nassert not heavy, heavy[:5]")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=ROOT, check=False)
    assert out.returncode == 0, out.stderr
    assert "atoll" in out.stdout and "validate" in out.stdout
