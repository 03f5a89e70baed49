"""`mode: cluster`: Ray Train data-parallel training (DDP, FSDP2) and job submission.

The only package besides Flower's simulation that imports ray. `runner.py` is the driver,
`worker.py` the per-worker glue around core/loop.py, `parallel.py` the layouts,
`jobs.py` the Job API behind `atoll submit` / `atoll jobs`.
"""
