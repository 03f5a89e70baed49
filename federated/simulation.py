"""`atoll run` for `mode: federated`: the same path as `flwr run .`, managed end to end.

`flwr.simulation.run_simulation` is deprecated in the pinned Flower; the supported path
is a SuperLink in simulation mode plus `flwr run`. This module starts a private SuperLink
(free loopback port, its own FLWR_HOME and Ray temp dir), submits the app with the spec
as run config, streams the logs, reads the server's result file, and stops every process
it started — the SuperLink, Flower's SuperExec and the simulation's Ray — by pid.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from atoll.core.procs import free_port, start, stop, wait_http
from atoll.core.runner import RunFailed, RunResult, check_writable
from atoll.core.spec import ExperimentSpec, SpecError
from atoll.federated import records as R
from atoll.federated.app_bundle import stage_app
from atoll.federated.server import RESULT_FILE, run_dir_for
from atoll.federated.task import rounds_per_task

log = logging.getLogger("atoll.federated")
FEDERATION = "atoll-local"


def _bin(name: str) -> str:
    """A console script from this interpreter's environment (the venv), else PATH."""
    here = Path(sys.executable).parent / name
    return str(here) if here.exists() else (shutil.which(name) or name)


def _tracking_uri(spec: ExperimentSpec) -> str | None:
    """Resolved (absolute) before anything starts, so an unreachable server fails fast."""
    if not spec.tracking.enabled:
        return None
    from atoll.tracking import TrackingUnavailable, default_uri, resolve_uri
    from atoll.tracking.uri import check_reachable

    uri = resolve_uri(spec.tracking.uri)
    try:
        check_reachable(uri)
    except TrackingUnavailable as e:
        if spec.tracking.fallback != "local":
            raise
        log.warning("%s — logging to the local store %s instead", e, default_uri())
        uri = default_uri()
    return uri


def _resume_mode(run_dir: Path, spec: ExperimentSpec, explicit: str | None,
                 restart: bool = False) -> str:
    """'' (fresh), 'latest' or a path. An unfinished run under this name resumes; its
    checkpoints are discarded (by the server, on a fresh start) only with --restart."""
    if explicit:
        return explicit
    if restart or not (run_dir / "checkpoints").is_dir():
        return ""
    result = run_dir / RESULT_FILE
    if result.is_file():
        try:
            if json.loads(result.read_text()).get("status") == "FINISHED":
                return ""
        except (OSError, json.JSONDecodeError):
            pass
    if not any((run_dir / "checkpoints").glob("round-*.ckpt")):
        return ""
    if not spec.train.resume:
        raise SpecError([f"train.resume: false, but run {spec.name!r} has an unfinished "
                         f"federation in {run_dir / 'checkpoints'}; allowed: atoll run "
                         "--restart to discard it, train.resume: true to continue it, or "
                         "another name"])
    return "latest"


def _check_compatible(run_dir: Path, spec: ExperimentSpec, mode: str) -> None:
    """Refuse (exit 2) before starting anything if the resumed run trained another spec."""
    from atoll.core.checkpoint import CheckpointDir
    from atoll.core.runner import check_resume_compatible, latest_valid

    where = run_dir / "checkpoints" if mode == "latest" else Path(mode)
    found = latest_valid(CheckpointDir(where if where.is_dir() else where.parent, 1, "round"))
    if found is None:
        raise ValueError(f"--resume: no round checkpoint in {where}; allowed: a directory "
                         "holding round-*.ckpt files")
    saved = found[1].get("spec", {})
    check_resume_compatible(saved, spec, found[0])
    f, was = spec.federated, saved.get("federated", {})
    if spec.continual.stream != "none" and f.rounds_per_task is None and \
            was.get("rounds") not in (None, f.rounds):
        frozen = rounds_per_task(spec.model_copy(update={"federated": f.model_copy(
            update={"rounds": was["rounds"]})}))
        raise ValueError(f"federated.rounds: {f.rounds} differs from {was['rounds']} in the "
                         f"checkpointed task stream and would move its task boundaries; "
                         f"allowed: {was['rounds']}, or set federated.rounds_per_task="
                         f"{frozen} to keep the schedule")


def _resolve_resume(resume: str | None, uri: str | None) -> str | None:
    """A checkpoint dir/file, 'latest', or an MLflow run id (its `atoll.run_dir` tag)."""
    if not resume or resume == "latest" or Path(resume).exists():
        return str(Path(resume).resolve()) if resume and resume != "latest" else resume
    if uri is None:
        raise ValueError(f"--resume: {resume!r} is not a path and tracking is off; allowed: "
                         "a checkpoint directory or file, or 'latest'")
    from atoll.tracking import run_tag

    try:
        where = run_tag(uri, resume, "atoll.run_dir")
    except KeyError:
        raise ValueError(f"--resume: {resume!r} is neither a path nor an MLflow run id in "
                         f"{uri}; allowed: a checkpoint directory or file, 'latest', or a "
                         "run id") from None
    if not where:
        raise ValueError(f"--resume: run {resume} has no atoll.run_dir tag; allowed: a "
                         "federated run's id")
    return str(Path(where) / "checkpoints")


class Federation:
    """A private simulation SuperLink on a free loopback port; `run()` submits apps to it.

    Its FLWR_HOME and Ray temp dir live in a temp directory that is removed on exit, and
    on exit every process below the SuperLink (SuperExec, flwr-simulation, Ray) is stopped.
    """

    def __init__(self, num_clients: int, client_cpus: int = 1, client_gpus: float = 0.0,
                 concurrency: int | None = None, cwd: Path | None = None,
                 ray_address: str | None = None):
        self.num_clients, self.client_cpus, self.client_gpus = num_clients, client_cpus, \
            client_gpus
        self.concurrency, self.cwd = concurrency, cwd or Path.cwd()
        # An existing Ray cluster hosts the clients (Flower's backend calls ray.init(),
        # which connects to RAY_ADDRESS); otherwise the simulation starts its own Ray.
        self.ray_address = ray_address or os.environ.get("RAY_ADDRESS") or None
        self.work = Path(tempfile.mkdtemp(prefix="atoll-flwr-"))  # short: Ray socket paths
        self.port = free_port()
        self.log = self.work / "superlink.log"
        home = self.work / "home"
        home.mkdir()
        (home / "config.toml").write_text(
            f'[superlink]\ndefault = "{FEDERATION}"\n\n[superlink.{FEDERATION}]\n'
            f'address = "127.0.0.1:{self.port}"\ninsecure = true\n')
        (self.work / "ray").mkdir()
        self.env = {
            "FLWR_HOME": str(home), "RAY_TMPDIR": str(self.work / "ray"),
            "FLWR_DISABLE_UPDATE_CHECK": "1", "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
            "RAY_USAGE_STATS_ENABLED": "0", "RAY_DEDUP_LOGS": "0",
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
        if self.ray_address:
            self.env["RAY_ADDRESS"] = self.ray_address
        self.server_stderr = self.work / "server.log"
        self.env[R.SERVER_STDERR_ENV] = str(self.server_stderr)
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> Federation:
        self.proc = start([_bin("flower-superlink"), "--insecure", "--simulation", "--host",
                           "127.0.0.1", "--port", str(self.port),
                           "--disable-runtime-dependency-installation"],
                          self.log, env=self.env, cwd=self.cwd)
        try:
            wait_http(f"http://127.0.0.1:{self.port}/health", self.proc, self.log, timeout=60)
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None:
            stop(self.proc)
        shutil.rmtree(self.work, ignore_errors=True)

    def federation_config(self) -> str:
        cfg = (f"num-supernodes={self.num_clients} client-resources-num-cpus={self.client_cpus} "
               f"client-resources-num-gpus={self.client_gpus}")
        if self.ray_address:  # the cluster's resources are what they are
            return cfg
        cpus = max(self.concurrency or os.cpu_count() or 1, self.client_cpus)
        return f"{cfg} init-args-num-cpus={cpus}"

    def run(self, app: Path, run_config: dict, log_file: Path, quiet: bool = False,
            stop_file: Path | None = None, result_file: Path | None = None) -> int:
        """`flwr run APP --stream` with `run_config`; returns flwr's exit status.

        Everything the federation prints goes to `log_file`; the console shows atoll's
        own lines and every warning or error (unless `quiet`). On Ctrl-C (or SIGTERM
        turned into KeyboardInterrupt by the CLI) the server is asked to stop through
        `stop_file`: it flushes its metrics, checkpoints and ends the MLflow run KILLED;
        then KeyboardInterrupt propagates.
        """
        cfg = self.work / f"run_config-{time.monotonic_ns()}.toml"
        cfg.write_text(R.to_toml(run_config))
        cmd = [_bin("flwr"), "run", str(app), FEDERATION, "--stream", "--run-config", str(cfg),
               "--federation-config", self.federation_config()]
        # its own session: a terminal's Ctrl-C reaches atoll, which stops the run in order
        proc = subprocess.Popen(cmd, env={**os.environ, **self.env}, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)
        started: list[int] = []  # the run id, once flwr run prints it
        pump = threading.Thread(target=_pump, args=(proc.stdout, log_file, quiet, started),
                                daemon=True)
        pump.start()
        try:
            code = proc.wait()
            pump.join(timeout=5)
            if result_file is not None and not result_file.is_file() and started:
                self._settle(started[0], result_file, log_file)
        except KeyboardInterrupt:
            if stop_file is not None:
                stop_file.touch()
                _wait_for(result_file, proc, STOP_GRACE_S)
            stop(proc, timeout=5)
            raise
        finally:
            pump.join(timeout=5)
        return code

    def _settle(self, run_id: int, result_file: Path, log_file: Path) -> None:
        """`flwr run` returned but the server wrote no result. Its log stream may have
        ended while the run goes on (then wait for the run), or the server's process died
        without a word (Flower fails the run once its heartbeats stop): the log file gets
        Flower's status and reason, and the server process's stderr and the SuperLink's
        log are kept beside it, since this federation's folder is removed."""
        waited = False
        while not result_file.is_file():
            status, details = self.run_status(run_id)
            if status.startswith("finished") or self.proc is None or \
                    self.proc.poll() is not None:
                break
            if not waited:
                _note(log_file, f"flwr run stopped streaming while run {run_id} is {status}; "
                                "atoll waits for it to finish")
                waited = True
            time.sleep(2)
        else:
            return
        kept = []
        for src in (self.server_stderr, self.log):
            with contextlib.suppress(OSError):
                kept.append(Path(shutil.copyfile(src, log_file.with_name(src.name))))
        _note(log_file, f"Flower reports run {run_id} {status or 'unknown'}"
                        f"{': ' + details if details else ''}; the server process's stderr "
                        f"and the SuperLink's log are kept in {', '.join(map(str, kept))}")

    def run_status(self, run_id: int) -> tuple[str, str]:
        """Flower's status of `run_id` on this SuperLink and its details, e.g.
        ("finished:failed", "No heartbeat received from the task"); ("", "") if unknown."""
        try:
            out = subprocess.run([_bin("flwr"), "ls", FEDERATION, "--run-id", str(run_id),
                                  "--format", "json"], env={**os.environ, **self.env},
                                 capture_output=True, text=True, timeout=60,
                                 stdin=subprocess.DEVNULL)
            runs = json.loads(out.stdout).get("runs") or [{}]
        except (OSError, subprocess.TimeoutExpired, ValueError, AttributeError):
            return "", ""
        return str(runs[0].get("status", "")), str(runs[0].get("status-details", ""))


def _note(log_file: Path, text: str) -> None:
    with open(log_file, "a", encoding="utf-8") as out:
        out.write(f"atoll: {text}\n")


STOP_GRACE_S = 60.0  # how long an interrupted server may take to flush and checkpoint


def _wait_for(result_file: Path | None, proc: subprocess.Popen, seconds: float) -> None:
    """Until the server has written its result (it stopped cleanly) or `seconds` pass;
    further Ctrl-Cs while waiting are ignored — the second one would lose the metrics."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            if (result_file is not None and result_file.is_file()) or proc.poll() is not None:
                return
            time.sleep(0.2)
        except KeyboardInterrupt:
            print("atoll: stopping the federation (saving metrics and a checkpoint)…",
                  file=sys.stderr, flush=True)


_OURS = re.compile(r"^(DEBUG|INFO|WARNING|ERROR|CRITICAL)\s+atoll[.:]")
_LOUD = re.compile(r"^(WARNING|ERROR|CRITICAL)\b")  # tracebacks stay in the log file
# Flower warns about its default SuperNode count on every run; atoll always sets it
_IRRELEVANT = ("default simulated SuperNodes changed",)


def _shown(line: str) -> bool:
    """atoll's own lines and anything at WARNING or above reach the console."""
    if any(s in line for s in _IRRELEVANT):
        return False
    return bool(_OURS.match(line) or _LOUD.match(line))


_STARTED = re.compile(r"Successfully started run (\d+)")


def _pump(stream: Any, log_file: Path, quiet: bool, started: list[int]) -> None:
    """Copy the federation's output to `log_file` (and the console), noting the run id in
    `started`. It must never stop reading: a full pipe would block flwr, and the run would
    hang."""
    log_file.parent.mkdir(parents=True, exist_ok=True)
    with open(log_file, "a", encoding="utf-8", errors="replace") as out:
        for raw in iter(stream.readline, b""):
            line = raw.decode("utf-8", errors="replace")
            if not started and (m := _STARTED.search(line)):
                started.append(int(m.group(1)))
            out.write(line)
            out.flush()
            if not quiet and _shown(_plain(line)):
                sys.stdout.write(line)
                sys.stdout.flush()


_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def _plain(line: str) -> str:
    return _ANSI.sub("", line).lstrip()


def run_federated(spec: ExperimentSpec, resume: str | None = None, restart: bool = False
                  ) -> RunResult:
    """Simulate the federation in `spec`; returns once every process is gone again.

    `restart` discards an unfinished run's checkpoints and starts anew (`--restart`)."""
    t0 = time.perf_counter()
    f = spec.federated
    _preflight(spec)
    run_dir = run_dir_for(spec, {})
    check_writable(run_dir, "train.checkpoint_dir")  # before anything starts, not at round 1
    uri = _tracking_uri(spec)
    mode = _resume_mode(run_dir, spec, _resolve_resume(resume, uri), restart)
    if mode:
        _check_compatible(run_dir, spec, mode)
    (run_dir / RESULT_FILE).unlink(missing_ok=True)  # only this run's result counts
    (run_dir / R.STOP_FILE).unlink(missing_ok=True)  # a Ctrl-C from here on is this run's
    # a fresh start here is decided: the name finished, has no checkpoints, or --restart
    run_config = R.run_config_for(spec, run_dir=run_dir, tracking_uri=uri, mlflow_run_id=None,
                                  resume=mode, restart=not mode)
    log_file = run_dir / "federation.log"
    run_dir.mkdir(parents=True, exist_ok=True)  # every refusal is behind us: now it may exist
    run = _run_in_process if f.engine == "vectorized" else _run_on_flower
    result = run(spec, run_config, run_dir, log_file, mode)
    registered = None
    if result.get("registered"):
        from atoll.tracking.base import RegisteredModel

        registered = RegisteredModel(**result["registered"])
    out = RunResult(result.get("run_id"), result.get("metrics", {}), int(result["rounds"]),
                    time.perf_counter() - t0,
                    Path(result["checkpoint"]) if result.get("checkpoint") else None,
                    registered, result.get("history", []))
    if result.get("matrix"):
        out.details = {"matrix": result["matrix"], "baseline": result.get("baseline", [])}
    return out


def _run_on_flower(spec: ExperimentSpec, run_config: dict, run_dir: Path, log_file: Path,
                   mode: str) -> dict:
    """A private SuperLink, `flwr run`, the clients on Ray; the result file's contents."""
    f = spec.federated
    with Federation(f.num_clients, f.client_cpus, f.client_gpus, f.concurrency,
                    ray_address=os.environ.get("RAY_ADDRESS") or spec.cluster.address) as fed:
        log.info("federation: %d clients, %d rounds, %s (SuperLink 127.0.0.1:%d, Ray %s%s); "
                 "Flower and Ray output in %s", f.num_clients, f.rounds, f.strategy, fed.port,
                 fed.ray_address or "started for this run",
                 f", resuming {mode}" if mode else "", log_file)
        try:
            code = fed.run(stage_app(fed.work / "app"), run_config, log_file,
                           quiet=spec.train.progress == "off",
                           stop_file=run_dir / R.STOP_FILE, result_file=run_dir / RESULT_FILE)
        except KeyboardInterrupt:
            raise KeyboardInterrupt(_resume_hint(run_dir, spec)) from None
        return _read_result(run_dir, code, log_file)


def _run_in_process(spec: ExperimentSpec, run_config: dict, run_dir: Path, log_file: Path,
                    mode: str) -> dict:
    """The same server in this process, its clients answered by the vectorized engine
    (federated/vectorized_grid.py): no SuperLink, no Ray. Flower's own log lines go to
    `log_file`, as with `flwr run`; the result file says how the run ended."""
    from atoll.federated.server import serve
    from atoll.federated.vectorized_grid import VectorizedGrid

    f = spec.federated
    log.info("federation: %d clients, %d rounds, %s, vectorized engine (this process)%s; "
             "Flower's output in %s", f.num_clients, f.rounds, f.strategy,
             f", resuming {mode}" if mode else "", log_file)
    with _flower_logs_to(log_file):
        try:
            serve(VectorizedGrid(spec, run_config), run_config)
        except KeyboardInterrupt:
            raise KeyboardInterrupt(_resume_hint(run_dir, spec)) from None
        except Exception:  # noqa: BLE001 - serve wrote FAILED and the cause in the result
            log.debug("the in-process federation ended with an error", exc_info=True)
    return _read_result(run_dir, 0, log_file)


@contextlib.contextmanager
def _flower_logs_to(log_file: Path) -> Iterator[None]:
    """Flower's logger writes to the console; during an in-process run its lines go to
    `log_file` instead (a quiet console, as on the Flower path)."""
    flwr_log = logging.getLogger("flwr")
    handler = logging.FileHandler(log_file, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    saved = flwr_log.handlers[:], flwr_log.propagate
    flwr_log.handlers, flwr_log.propagate = [handler], False
    try:
        yield
    finally:
        flwr_log.handlers, flwr_log.propagate = saved
        handler.close()


def _preflight(spec: ExperimentSpec) -> None:
    """A user's data and model are read and built (the model on the meta device) before any
    client starts: a missing file, a bad column, target or output shape is exit 2 here, not
    a failed round in every client. The vectorized engine tries one step on the model."""
    from atoll.core.model_spec import UserModelSpec

    if spec.federated.engine == "vectorized":
        _probe_vectorized(spec)

    if spec.data.format != "builtin" or isinstance(spec.model, UserModelSpec) or spec.task:
        from atoll.continual.streams import check_stream
        from atoll.core.data import load_data
        from atoll.core.spec import check_task
        from atoll.models import check_model

        data = load_data(spec.data, spec.seed, spec.project_dir, spec.task)
        check_task(spec, data.task)
        check_stream(data, spec.continual)
        check_model(spec.model, data.input_shape, data.num_classes, spec.project_dir,
                    export=spec.tracking.enabled and spec.tracking.log_model,
                    embedded=data.embedded)


def _probe_vectorized(spec: ExperimentSpec) -> None:
    """Exit 2 naming the fix if the model cannot be trained under vmap (client 0's data,
    read through the same per-process cache the in-process clients use)."""
    from atoll.core.components import pick_device
    from atoll.federated import task
    from atoll.federated.vectorized import probe, rule_of
    from atoll.models import build_model, check_model

    data = task.client_data(spec, 0, spec.federated.num_clients)
    b = data.bundle
    check_model(spec.model, b.input_shape, b.num_classes, spec.project_dir, export=False,
                embedded=b.embedded)
    torch.manual_seed(spec.seed)
    model = build_model(spec.model, b.input_shape, b.num_classes, spec.project_dir,
                        b.embedded)
    device = pick_device(spec)
    batch = spec.federated.batch_size or spec.data.batch_size
    why = probe(model, model.state_dict(), data.train, task.federation_loss(spec, device),
                rule_of(spec, spec.optim.lr, 1, batch), device)
    if why is not None:
        raise SpecError([f"federated.engine: 'vectorized' cannot train model "
                         f"{type(model).__name__} under torch.func.vmap ({why}); allowed: a "
                         "model without value reads (.item(), data-dependent if) or in-place "
                         "updates of unbatched tensors in its forward, or federated.engine: "
                         "flower"])


def _resume_hint(run_dir: Path, spec: ExperimentSpec) -> str:
    """What an interrupted federation tells its user (the CLI prints it on one line)."""
    done = 0
    result = run_dir / RESULT_FILE
    if result.is_file():
        with contextlib.suppress(OSError, json.JSONDecodeError, ValueError, TypeError):
            done = int(json.loads(result.read_text()).get("rounds", 0))
    return (f"re-run the same name ({spec.name}) to resume after round {done}; checkpoints in "
            f"{run_dir / 'checkpoints'}")


def _read_result(run_dir: Path, returncode: int, log_file: Path) -> dict:
    path = run_dir / RESULT_FILE
    if not path.is_file():
        tail = log_file.read_text(errors="replace")[-2000:] if log_file.is_file() else ""
        raise RunFailed(f"the federation ended (flwr run exit {returncode}) without a result; "
                        f"see {log_file}; its tail:\n{tail}")
    result = json.loads(path.read_text())
    if result.get("status") == "KILLED":
        raise KeyboardInterrupt(f"the federation was stopped after round "
                                f"{result.get('rounds', 0)}; re-run the same name to resume")
    if result.get("status") != "FINISHED":
        raise RunFailed(f"federated run failed: {result.get('error')}; checkpoints kept in "
                        f"{run_dir / 'checkpoints'}")
    return result
