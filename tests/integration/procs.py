"""Start and stop real server processes for tests: the product's own helpers (core/procs.py).

Kept as a module so tests say `procs.start(...)`; a process runs in its own session and is
stopped with everything below it, by pid.
"""

from atoll.core.procs import free_port, start, stop, wait_http

__all__ = ["free_port", "start", "stop", "wait_http"]
