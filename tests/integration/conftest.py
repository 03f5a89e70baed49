"""Fixtures for modules that run many federations: one Ray head they all share, and a
guard that a test leaves none of its Flower/Ray processes behind.

A Flower simulation started without RAY_ADDRESS starts (and stops) a Ray of its own, about
11 s of every run on two cores; `atoll run` with RAY_ADDRESS set runs the clients on that
cluster instead (a supported mode: test_federated checks that the clients ran on this
head and that it outlives the federation; `make demo`'s test covers a run's own Ray).
`shared_ray` starts one `ray start --head` for a module and points RAY_ADDRESS at it, so
the module's federations only connect. The head and the workers it forks stay in its
process group; `no_leftovers` ignores that group and nothing else.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from atoll.core.procs import free_port, start, stop

MARKERS = ("flower-superlink", "flower-superexec", "flwr-simulation", "flwr-serverapp",
           "raylet", "gcs_server", "ray::", "default_worker.py")
SHARED_GROUPS: set[int] = set()  # process groups of shared heads: not a test's leftovers


def ours() -> dict[int, str]:
    """Flower/Ray processes of this checkout's environment (its venv in their command line
    or PATH), by pid — not other checkouts' or other users' runs on the same machine, and
    under pytest-xdist not another worker's (each process inherits its worker's
    PYTEST_XDIST_WORKER)."""
    venv_bin = str(Path(sys.executable).parent).encode()
    worker = os.environ.get("PYTEST_XDIST_WORKER")
    mark = f"PYTEST_XDIST_WORKER={worker}\0".encode() if worker else None
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if entry.stat().st_uid != os.getuid():
                continue
            raw = (entry / "cmdline").read_bytes()
            cmd = raw.replace(b"\0", b" ").decode(errors="replace")
            if not any(m in cmd for m in MARKERS):
                continue
            environ = (entry / "environ").read_bytes()
            if venv_bin not in raw and venv_bin not in environ:
                continue
            if mark is not None and mark not in environ:
                continue
            if os.getpgid(int(entry.name)) in SHARED_GROUPS:
                continue
        except OSError:
            continue
        found[int(entry.name)] = cmd[:120]
    return found


@pytest.fixture
def no_leftovers():
    """Fail if a Flower/Ray process that the test started is still running afterwards."""
    before = set(ours())
    yield
    deadline = time.monotonic() + 10
    while (left := {p: c for p, c in ours().items() if p not in before}) and \
            time.monotonic() < deadline:
        time.sleep(0.5)
    assert not left, f"processes left behind: {left}"


def wait_ray(address: str, head: subprocess.Popen, log: Path, timeout: float = 90) -> None:
    """Until `ray start --block` says "Ray runtime started." — it prints that once the GCS
    is up and the raylet has registered, so a driver can connect to `address`. (A probe
    process that imports Ray and connects costs ~4 s of CPU per head on two cores.)"""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if "Ray runtime started." in log.read_text(errors="replace"):
            return
        if head.poll() is not None:
            raise RuntimeError(log.read_text()[-3000:])
        time.sleep(0.2)
    raise TimeoutError(f"no Ray head at {address}: " + log.read_text()[-3000:])


def start_ray(args: list[str], log: Path, ready: Callable[[subprocess.Popen], None],
              attempts: int = 3, **kw: Any) -> subprocess.Popen:
    """`ray start --block <args>` until `ready(process)` returns. Ray gives a starting
    raylet a fixed 30 s to register with the GCS (ray/_private/node.py), which a loaded
    2-core machine can exceed: `ray start` then exits, and it is tried again. `args` is
    called anew per attempt when it is a callable (fresh ports)."""
    for attempt in range(1, attempts + 1):
        # workers' and drivers' ports from the OS: two nodes on this machine handing out
        # ports from the same default range (10002-19999) can give one port twice
        cmd = [str(Path(sys.executable).parent / "ray"), "start", "--block",
               "--min-worker-port=0", "--max-worker-port=0",
               *(args() if callable(args) else args)]
        proc = start(cmd, log, **kw)
        try:
            ready(proc)
            return proc
        except BaseException:
            exited = proc.poll() is not None  # by itself, before stop() ends it
            stop(proc)
            if (attempt == attempts or not exited
                    or "timed out during startup" not in log.read_text(errors="replace")):
                raise
            log.write_text("")  # the next attempt's failure is its own
    raise AssertionError("unreachable")


def start_head(ray_tmp: str, log: Path) -> tuple[subprocess.Popen, str]:
    """A 2-CPU Ray head without a dashboard on free loopback ports; (process, address)."""
    port = free_port()
    address = f"127.0.0.1:{port}"
    head = start_ray(["--head", "--num-cpus=2", "--node-ip-address=127.0.0.1", f"--port={port}",
                      f"--temp-dir={ray_tmp}", f"--ray-client-server-port={free_port()}",
                      "--include-dashboard=false", "--disable-usage-stats",
                      # every agent on a port of its own: under xdist another worker's Ray (a
                      # head, a simulation's own) runs beside this one and takes the defaults
                      *(f"--{name}={free_port()}" for name in (
                          "dashboard-agent-listen-port", "dashboard-agent-grpc-port",
                          "runtime-env-agent-port", "metrics-export-port"))],
                     log, lambda p: wait_ray(address, p, log))
    return head, address


@dataclasses.dataclass
class SharedRay:
    address: str
    head: subprocess.Popen
    tmp: Path  # its --temp-dir: session logs

    def log_text(self) -> str:
        """Every log the cluster's processes wrote (which actors ran on it)."""
        return "\n".join(p.read_text(errors="replace")
                         for p in self.tmp.glob("session_*/logs/*")
                         if p.is_file() and p.suffix in (".out", ".err", ".log"))


@pytest.fixture(scope="module")
def shared_ray():
    """One Ray head for the module's federations (RAY_ADDRESS), stopped by its pid."""
    ray_tmp = tempfile.mkdtemp(prefix="atoll-rs-")  # short: Ray's socket paths
    head, address = start_head(ray_tmp, Path(ray_tmp) / "head.log")
    group = os.getpgid(head.pid)
    SHARED_GROUPS.add(group)
    was = os.environ.get("RAY_ADDRESS")
    os.environ["RAY_ADDRESS"] = address
    try:
        yield SharedRay(address, head, Path(ray_tmp))
    finally:
        if was is None:
            os.environ.pop("RAY_ADDRESS", None)
        else:
            os.environ["RAY_ADDRESS"] = was
        SHARED_GROUPS.discard(group)
        stop(head)
        shutil.rmtree(ray_tmp, ignore_errors=True)


@pytest.fixture(scope="session")
def _store_template(tmp_path_factory) -> Path:
    """An empty sqlite MLflow store, created once: MLflow builds a new store's tables by
    running its migrations, ~3.6 s of CPU that every federation's server would repeat."""
    from mlflow.tracking import MlflowClient

    db = tmp_path_factory.mktemp("store") / "mlruns.db"
    MlflowClient(f"sqlite:///{db}").search_experiments()
    return db


@pytest.fixture
def warm_store(_store_template: Path) -> Path:
    """./mlruns.db (the default store, in the test's directory) already initialised."""
    db = Path("mlruns.db").resolve()
    shutil.copyfile(_store_template, db)
    return db

