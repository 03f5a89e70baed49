"""Flower ServerApp: glue between Flower's Grid and `federated/server.py`.

Import-safe (no work at import time). Run by `atoll run SPEC` (mode: federated) and by
`flwr run .` from the project root.
"""

from __future__ import annotations

import faulthandler
import logging
import os

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from atoll.federated.records import SERVER_STDERR_ENV
from atoll.federated.server import serve

app = ServerApp()


def _keep_stderr() -> None:
    """Flower starts the simulation process with its output sent to /dev/null, so a hard
    death (a signal, a C++ abort in Ray) would leave no word. When `atoll run` names a
    file, this process's stderr goes there, with Python's fault handler on."""
    path = os.environ.get(SERVER_STDERR_ENV)
    if not path:
        return
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    os.dup2(fd, 2)
    os.close(fd)
    faulthandler.enable()


@app.main()
def main(grid: Grid, context: Context) -> None:
    _keep_stderr()
    atoll_log = logging.getLogger("atoll")
    if not atoll_log.handlers:  # this process is Flower's; show atoll's lines, not httpx's
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        atoll_log.addHandler(handler)
        atoll_log.setLevel(logging.INFO)
        atoll_log.propagate = False
    logging.getLogger("flwr").propagate = False  # it has its own handler; no duplicates
    serve(grid, dict(context.run_config))
