"""Ctrl-C and SIGTERM as one remembered request to stop.

The handler raises KeyboardInterrupt where the main thread happens to be, as Python's own
does; but code that catches BaseException there (a `__del__`, a library's cleanup) can
swallow it, and the run would go on to its last epoch. The request is therefore also
remembered, and the training loop calls `check()` at each epoch end.
"""

from __future__ import annotations

import threading
from types import FrameType

_requested = threading.Event()


def handle(signum: int, frame: FrameType | None) -> None:
    """The signal handler for SIGINT and SIGTERM."""
    _requested.set()
    raise KeyboardInterrupt


def requested() -> bool:
    return _requested.is_set()


def stopped_by(error: BaseException) -> bool:
    """Whether `error` ends a run as a stop (KILLED, resumable) rather than a failure: a
    KeyboardInterrupt, or any error raised once a stop was asked for (a library caught the
    interrupt and raised its own, e.g. pydantic's serializer)."""
    return isinstance(error, KeyboardInterrupt) or (isinstance(error, Exception)
                                                     and _requested.is_set())


def check() -> None:
    """Raise KeyboardInterrupt if a stop was asked for (and possibly swallowed) earlier."""
    if _requested.is_set():
        raise KeyboardInterrupt


def reset() -> None:
    """Forget a request: a new command in the same process starts clean."""
    _requested.clear()
