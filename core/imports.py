"""Import a user's `package.module:callable` from their project, with errors a user can act on.

`project_dir` goes first on `sys.path` (as `python -m` does with the current directory),
so a spec's `model.target` resolves in `atoll run` from the project, on Ray workers and in
Flower clients alike, and a user's `models/` package never shadows atoll's (atoll is
`atoll.models`). Every way the import can fail is one SpecError line naming the field.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path
from typing import Any

from atoll.core.spec import SpecError


def on_path(project_dir: Path | None) -> Path:
    """Put the project first on sys.path (once); returns the directory used."""
    where = (project_dir or Path.cwd()).resolve()
    if str(where) not in sys.path:
        sys.path.insert(0, str(where))
    return where


def import_target(target: str, field: str, project_dir: Path | None = None) -> Any:
    """The object `target` ("package.module:attr.sub") names; SpecError if it cannot be had."""
    module_name, _, attr = target.partition(":")
    where = on_path(project_dir)
    _forget_other_projects(module_name.split(".")[0], where)
    try:
        obj: Any = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        missing = e.name or module_name
        if module_name == missing or module_name.startswith(missing + "."):
            raise SpecError([f"{field}: {target!r} — no module named {missing!r} in the "
                             f"project ({where}) or the installed packages; allowed: a module "
                             "importable from project_dir, or an installed package"]) from None
        raise SpecError([f"{field}: {target!r} — importing {module_name!r} needs {missing!r}, "
                         "which is not installed; allowed: install it next to atoll"]) from None
    except Exception as e:  # the user's module raised while importing
        raise SpecError([f"{field}: {target!r} — importing {module_name!r} raised "
                         f"{type(e).__name__}: {first_line(e)}"]) from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            public = sorted(n for n in dir(obj) if not n.startswith("_") and
                            callable(getattr(obj, n, None)))[:12]
            raise SpecError([f"{field}: {target!r} — {module_name!r} has no {part!r}; "
                             f"allowed: {', '.join(public) or 'a callable it defines'}"])
        obj = getattr(obj, part)
    if not callable(obj):
        raise SpecError([f"{field}: {target!r} is not callable (an object of type "
                         f"{type(obj).__name__}); allowed: a function or class that builds "
                         "the object"])
    return obj


def _forget_other_projects(top: str, where: Path) -> None:
    """If `top` is a package of this project but a same-named one from elsewhere (another
    project run earlier in this process) is imported, drop that one: the project wins."""
    if not ((where / top).is_dir() or (where / f"{top}.py").is_file()):
        return
    loaded = sys.modules.get(top)
    if loaded is None:
        return
    origins = [getattr(loaded, "__file__", None), *list(getattr(loaded, "__path__", []))]
    if any(o and Path(o).resolve().is_relative_to(where) for o in origins):
        return
    for name in [n for n in sys.modules if n == top or n.startswith(top + ".")]:
        del sys.modules[name]
    importlib.invalidate_caches()


def first_line(e: BaseException) -> str:
    """An exception's first line (at most 300 characters) for a one-line message."""
    text = str(e).strip().splitlines()
    return (text[0] if text else "")[:300]
