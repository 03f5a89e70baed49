"""flwr-datasets' partitioners without paying for its plotting at import.

`flwr_datasets/__init__.py` imports its `visualization` and `metrics` subpackages, which
import seaborn, scipy.stats and matplotlib: ~2.7 s of CPU in every process that only
wants a partitioner — the ServerApp and each Flower client actor of every federation.
Those two subpackages are bound as deferred modules instead: the first attribute anyone
reads from one (e.g. `flwr_datasets.visualization.plot_label_distributions`) executes the
real subpackage into it, so nothing changes for code that does use them.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import threading
import types
from pathlib import Path
from typing import Any

DEFERRED = ("visualization", "metrics")
_lock = threading.RLock()  # re-entered when loading reads the module it loads


class _Deferred(types.ModuleType):
    """A subpackage whose code runs on first attribute access (not on `import`)."""

    def __getattr__(self, name: str) -> Any:  # only for names not yet in the module
        with _lock:
            spec = self.__dict__.pop("__deferred_spec__", None)
            if spec is not None:
                try:
                    spec.loader.exec_module(self)
                except BaseException:  # the next access tries again and shows the cause
                    self.__dict__["__deferred_spec__"] = spec
                    raise
        try:
            return self.__dict__[name]
        except KeyError:
            raise AttributeError(f"module {self.__name__!r} has no attribute {name!r}") from None


def _defer(package: str, sub: str, root: Path) -> None:
    name = f"{package}.{sub}"
    init = root / sub / "__init__.py"
    if name in sys.modules or not init.is_file():
        return
    spec = importlib.util.spec_from_file_location(name, init,
                                                  submodule_search_locations=[str(init.parent)])
    if spec is None or spec.loader is None:
        return
    module = _Deferred(name)
    for attr, value in (("__spec__", spec), ("__file__", str(init)), ("__loader__", spec.loader),
                        ("__path__", [str(init.parent)]), ("__package__", name),
                        ("__deferred_spec__", spec)):
        module.__dict__[attr] = value
    sys.modules[name] = module


def partitioner_module() -> types.ModuleType:
    """`flwr_datasets.partitioner`, imported with its package's plotting deferred."""
    if "flwr_datasets" not in sys.modules:
        found = importlib.util.find_spec("flwr_datasets")  # locates; imports nothing
        if found is not None and found.submodule_search_locations:
            root = Path(next(iter(found.submodule_search_locations)))
            for sub in DEFERRED:
                _defer("flwr_datasets", sub, root)
    return importlib.import_module("flwr_datasets.partitioner")
