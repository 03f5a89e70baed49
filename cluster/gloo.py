"""A gloo process group for a rank that this code spawned itself (tests, benchmarks).

Ray Train owns the process group of a cluster-mode worker; this is for processes started
by `torch.multiprocessing.spawn` or `torchrun`, which run to the end of the interpreter.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager

import torch.distributed as dist


@contextmanager
def spawned_rank(rank: int | None = None, world: int | None = None,
                 init: str | None = None) -> Iterator[None]:
    """Join the group, run the body, destroy the group; a rank that succeeded then exits.

    Why the exit: after `destroy_process_group`, gloo's worker threads can still hold the
    last reference to a finished all-reduce whose tensors are Python objects. If the
    interpreter is finalising when the thread drops it, taking the GIL ends the thread
    and libstdc++ aborts the process ("terminate called without an active exception";
    seen about once in 20 two-rank runs with torch 2.13, pytorch/pytorch#179291). The
    rank's work is done and its files are closed by then, so it leaves with `os._exit(0)`
    instead of finalising. A failing body still raises normally. Without `init`, the
    group comes from torchrun's environment (RANK, WORLD_SIZE, MASTER_ADDR/PORT).
    """
    kwargs = {"init_method": init, "rank": rank, "world_size": world} if init else {}
    dist.init_process_group("gloo", **kwargs)
    try:
        yield
    finally:
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
