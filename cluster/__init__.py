"""`mode: cluster`: Ray Train data-parallel training (DDP, FSDP2) and job submission.

The only package besides Flower's simulation that imports ray. `runner.py` is the driver,
`worker.py` the per-worker glue around core/loop.py, `parallel.py` the layouts,
`jobs.py` the Job API behind `atoll submit` / `atoll jobs`.
`auth.py` finds Ray's token (RAY_AUTH_TOKEN_PATH / RAY_AUTH_TOKEN) for clusters with token
authentication on; importing this package turns on RAY_AUTH_MODE=token for a configured
token before ray is imported (see `cluster.auth`).
"""

from atoll.cluster.auth import token_mode_for_ray

token_mode_for_ray()
