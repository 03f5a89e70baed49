"""The dependency direction of DESIGN.md §1, checked on the source and on real imports."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

from tests.conftest import ROOT

HEAVY = ("ray", "flwr", "mlflow")


PROJECT = ("core", "models", "continual", "cluster", "federated", "tracking")


def _top(module: str) -> str:
    """The package an import names: `atoll.core.spec` -> core, `torch.nn` -> torch."""
    parts = module.split(".")
    return parts[1] if parts[0] == "atoll" and len(parts) > 1 else parts[0]


def _imported(path: Path, module_level_only: bool) -> list[str]:
    tree = ast.parse(path.read_text())
    nodes = tree.body if module_level_only else list(ast.walk(tree))
    found: list[str] = []
    for node in nodes:
        if isinstance(node, ast.Import):
            found += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append(node.module)
    return found


def _imports(path: Path, module_level_only: bool) -> set[str]:
    return {_top(m) for m in _imported(path, module_level_only)}


def _package_imports(pkg: str, module_level_only: bool = True) -> dict[str, set[str]]:
    return {str(p.relative_to(ROOT)): _imports(p, module_level_only)
            for p in (ROOT / pkg).rglob("*.py")}


def test_core_never_imports_ray_flwr_or_mlflow():
    for path, names in _package_imports("core", module_level_only=False).items():
        assert not names & set(HEAVY), f"{path} imports {names & set(HEAVY)}"


def test_models_and_continual_import_only_core_and_torch():
    allowed_pkgs = {"core", "torch", "models", "continual", "numpy"}
    project = set(PROJECT)
    for pkg in ("models", "continual"):
        for path, names in _package_imports(pkg, module_level_only=False).items():
            third_party = {n for n in names if n not in sys.stdlib_module_names}
            assert third_party <= allowed_pkgs, f"{path} imports {third_party - allowed_pkgs}"
            assert not names & (project - allowed_pkgs), path


def test_the_project_imports_itself_only_through_the_atoll_namespace():
    """A bare `import models` would find a user's own models/ first on a Ray worker or
    SuperNode (`ray job submit --working-dir` puts it first on sys.path)."""
    for pkg in (*PROJECT, "tests", "benchmarks"):
        for p in (ROOT / pkg).rglob("*.py"):
            bare = [m for m in _imported(p, module_level_only=False)
                    if m.split(".")[0] in PROJECT]
            assert not bare, f"{p.relative_to(ROOT)} imports {bare}; allowed: atoll.<package>"


def test_only_tracking_imports_mlflow():
    for pkg in ("core", "models", "continual", "cluster", "federated"):
        for path, names in _package_imports(pkg, module_level_only=False).items():
            assert "mlflow" not in names, path


def test_importing_core_and_the_cli_pulls_in_no_heavy_package():
    code = (
        "import sys, atoll.core.cli, atoll.core.spec, atoll.core.data, atoll.core.loop, "
        "atoll.core.checkpoint, atoll.core.runner, atoll.core.components, atoll.models, "
        "atoll.continual\n"
        "atoll.core.cli.build_parser()\n"
        f"bad = [m for m in sys.modules if m.split('.')[0] in {HEAVY!r}]\n"
        "assert not bad, bad\n"
        "print('ok')"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=ROOT, check=False)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_help_is_fast_and_light():
    code = ("import sys, runpy\nsys.argv=['atoll','--help']\n"
            "try:\n    runpy.run_module('atoll.core.cli', run_name='__main__')\n"
            "except SystemExit:\n    pass\n"
            "heavy = [m for m in sys.modules if m.split('.')[0] in "
            f"{HEAVY + ('torch',)!r}]\nassert not heavy, heavy[:5]")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=ROOT, check=False)
    assert out.returncode == 0, out.stderr
    assert "atoll" in out.stdout and "validate" in out.stdout


def test_partitioning_does_not_import_flwr_datasets_plotting():
    """A client actor that partitions skips seaborn/scipy/matplotlib (~2.7 s of CPU per
    process, every federation); flwr_datasets.visualization still works when used."""
    code = (
        "import sys, numpy as np\n"
        "from atoll.core.spec import load_spec\n"
        "from atoll.federated.partition import partition_indices\n"
        "spec = load_spec(None, ['mode=federated', 'federated.partition.method=dirichlet'])\n"
        "parts = partition_indices(np.arange(200) % 4, spec.federated.partition, 4, 0)\n"
        "assert sum(map(len, parts)) == 200\n"
        "plotting = [m for m in ('seaborn', 'scipy.stats', 'matplotlib.pyplot') "
        "if m in sys.modules]\n"
        "assert not plotting, plotting\n"
        "import flwr_datasets\n"
        "assert callable(flwr_datasets.visualization.plot_label_distributions)\n"
        "from flwr_datasets.metrics import compute_counts\n"
        "print('ok')"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=ROOT, check=False)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]
