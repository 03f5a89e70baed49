"""Flower ServerApp: glue between Flower's Grid and `federated/server.py`.

Import-safe (no work at import time). Run by `atoll run SPEC` (mode: federated) and by
`flwr run .` from the project root.
"""

from __future__ import annotations

import logging

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from atoll.federated.server import serve

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    atoll_log = logging.getLogger("atoll")
    if not atoll_log.handlers:  # this process is Flower's; show atoll's lines, not httpx's
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        atoll_log.addHandler(handler)
        atoll_log.setLevel(logging.INFO)
        atoll_log.propagate = False
    logging.getLogger("flwr").propagate = False  # it has its own handler; no duplicates
    serve(grid, dict(context.run_config))
