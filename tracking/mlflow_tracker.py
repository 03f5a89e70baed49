"""MLflow implementation of the Tracker: one run per job, batched metric writes.

Per-step metrics are buffered and written with one `log_batch` call per flush, so a
sqlite store costs one transaction per epoch instead of one per step (see
benchmarks/tracking_overhead.py).
"""

from __future__ import annotations

import json
import os
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import mlflow
import mlflow.pyfunc
import numpy as np
import pandas as pd
import torch
import torch.nn as nn
from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient

from atoll.core.data import DataBundle
from atoll.core.serving import preprocess, raw_example
from atoll.tracking.base import RegisteredModel, Selection

PREDICTOR = Path(__file__).with_name("pyfunc_model.py")  # logged as the model's code
MAX_BATCH = 1000  # MLflow's per-request limit on metrics
PARAM_VALUE_LIMIT = 6000


@contextmanager
def _fluent_uri(uri: str) -> Iterator[None]:
    """Point MLflow's fluent API (log_model needs it) at `uri` only for the block.

    `mlflow.set_tracking_uri` also exports MLFLOW_TRACKING_URI into os.environ, which
    would leak this run's store into every later run in the process and its children.
    """
    previous = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(previous)  # None unsets both the global and the variable


class MlflowTracker:
    def __init__(self, uri: str, experiment: str, run_name: str, *, run_id: str | None = None,
                 artifact_root: Path | None = None, tags: dict[str, str] | None = None,
                 flush_every_s: float = 5.0, system_metrics: float | None = None):
        self.uri = uri
        self.client = MlflowClient(uri)
        self.experiment_id = self._experiment(experiment, artifact_root)
        # (key, step) pairs the run already holds: a resumed run re-trains from its last
        # checkpoint, and what the interrupted attempt logged past it must not appear twice.
        self._logged: set[tuple[str, int]] = set()
        resumed = run_id is not None
        if run_id is None:
            run = self.client.create_run(self.experiment_id, run_name=run_name, tags=tags or {})
            run_id = run.info.run_id
        else:  # a resumed run / retried worker group keeps writing into the same run
            self.client.update_run(run_id, status="RUNNING")
            self._logged = self._logged_steps(run_id)
        self.run_id: str | None = run_id
        self._buffer: list[Metric] = []
        # Each store write has a fixed cost (~8 ms on sqlite): batch by time, not by epoch,
        # so fast epochs do not pay it every time; the UI still sees data within seconds.
        self.flush_every_s = flush_every_s
        self._last_flush = time.time()
        # One writer thread keeps store latency (a sqlite transaction, an HTTP round trip)
        # off the training loop; writes stay in order because there is only one.
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="atoll-mlflow")
        self._pending: list[Future] = []
        self._system = self._system_metrics(system_metrics, resumed) \
            if system_metrics else None

    def _system_metrics(self, interval: float, resumed: bool) -> Any:
        """MLflow's own monitor (psutil; pynvml when there is an NVIDIA GPU): the UI's
        System metrics tab. A resumed run continues its steps."""
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        monitor = SystemMetricsMonitor(self.run_id, sampling_interval=interval,
                                       resume_logging=resumed, tracking_uri=self.uri)
        monitor.start()
        return monitor

    def _experiment(self, name: str, artifact_root: Path | None) -> str:
        found = self.client.get_experiment_by_name(name)
        if found is not None:
            return found.experiment_id
        location = None
        if not self.uri.startswith(("http://", "https://", "databricks")):
            # A local store: put artifacts at an absolute path, not relative to the cwd of
            # whichever process happens to log first (MLflow's Default-experiment pitfall).
            root = (artifact_root or Path("mlartifacts")).resolve()
            location = root.as_uri()
        try:
            return self.client.create_experiment(name, artifact_location=location)
        except mlflow.exceptions.MlflowException:  # created concurrently
            return self.client.get_experiment_by_name(name).experiment_id

    def _logged_steps(self, run_id: str) -> set[tuple[str, int]]:
        keys = self.client.get_run(run_id).data.metrics
        return {(k, m.step) for k in keys for m in self.client.get_metric_history(run_id, k)}

    # ------------------------------------------------------------------ logging

    def log_params(self, params: dict[str, Any]) -> None:
        items = [Param(k, str(v)[:PARAM_VALUE_LIMIT]) for k, v in params.items()]
        for i in range(0, len(items), 100):
            self.client.log_batch(self.run_id, params=items[i : i + 100])

    def set_tags(self, tags: dict[str, str]) -> None:
        self.client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        now = time.time()
        ts = int(now * 1000)
        self._buffer.extend(Metric(k, float(v), ts, step) for k, v in metrics.items()
                            if (k, step) not in self._logged)
        if len(self._buffer) >= MAX_BATCH or now - self._last_flush >= self.flush_every_s:
            self.flush()

    def flush(self) -> None:
        """Hand buffered metrics to the writer thread; `wait` makes them durable."""
        self._last_flush = time.time()
        while self._buffer:
            chunk, self._buffer = self._buffer[:MAX_BATCH], self._buffer[MAX_BATCH:]
            self._pending.append(
                self._writer.submit(self.client.log_batch, self.run_id, metrics=chunk))

    def wait(self) -> None:
        """Block until every queued write has landed; re-raise the first failure."""
        self.flush()
        pending, self._pending = self._pending, []
        for fut in pending:
            fut.result()

    def log_text(self, text: str, artifact_file: str) -> None:
        self.client.log_text(self.run_id, text, artifact_file)

    def log_plot(self, artifact_file: str, make: Callable[[], Any]) -> None:
        """Draw (only now), save as an artifact, and free the figure."""
        from atoll.tracking.plots import close

        fig = make()
        try:
            self.client.log_figure(self.run_id, fig, artifact_file)
        finally:
            close(fig)

    def log_model(self, model: nn.Module, data: DataBundle, *, registered_name: str | None,
                  alias: str, tags: dict[str, str], selection: Selection | None = None
                  ) -> RegisteredModel | None:
        """Log the model as a pyfunc that takes raw input, and register a version with an
        alias.

        The network goes in as a torch.export program (loads without unpickling code) with
        a dynamic batch dimension; `tracking/pyfunc_model.py` is logged as the model's code
        with the data's preprocessing (`core.serving.preprocess`), so
        `mlflow.pyfunc.load_model(uri).predict(rows_or_images)` normalises, encodes and
        returns labels/probabilities or values, with no atoll import. A `selection`
        (refused when it completed nothing) tags the version and the run with the metric
        and epoch/round that chose these weights.
        """
        if selection is not None:
            selection.check()
            tags = {**tags, **selection.tags()}
            self.set_tags({f"atoll.{k}": v for k, v in selection.tags().items()})
        self.wait()
        model = model.eval()
        example = data.test.x[:4] if len(data.test) else data.train.x[:4]
        with tempfile.TemporaryDirectory(prefix="atoll-model-") as tmp:
            program = Path(tmp) / "model.pt2"
            auto = torch.export.Dim.AUTO
            torch.export.save(torch.export.export(model, (example,),
                                                  dynamic_shapes=({0: auto},)), program)
            pre = Path(tmp) / "preprocess.json"
            pre.write_text(json.dumps(preprocess(data)))
            with _fluent_uri(self.uri), mlflow.start_run(run_id=self.run_id), \
                    warnings.catch_warnings():
                # the signature comes from the input example, not predict's type hints
                warnings.filterwarnings("ignore", message=".*type hints", category=UserWarning)
                info = mlflow.pyfunc.log_model(
                    name="model", python_model=str(PREDICTOR),
                    artifacts={"program": str(program), "preprocess": str(pre)},
                    input_example=(raw_example(data), {"probabilities": False}),
                    pip_requirements=[f"torch=={torch.__version__.split('+')[0]}",
                                      f"numpy=={np.__version__}",
                                      f"pandas=={pd.__version__}"])
                if registered_name is not None:
                    version = mlflow.register_model(info.model_uri, registered_name, tags=tags)
        self.client.update_run(self.run_id, status="RUNNING")  # start_run's exit closed it
        if registered_name is None:
            return None
        self.client.set_registered_model_alias(registered_name, alias, version.version)
        return RegisteredModel(registered_name, str(version.version), alias,
                               f"models:/{registered_name}@{alias}", self.uri)

    def close(self) -> None:
        """Stop this process's share of a run another process ends (a Ray Train rank 0
        logging into the driver's run): the system-metrics monitor writes its last samples
        and every queued metric lands; the run stays open."""
        try:
            if self._system is not None:
                self._system.finish()
                self._system = None
            self.wait()
        finally:
            self._writer.shutdown(wait=True)

    def finish(self, status: str = "FINISHED") -> None:
        try:
            if self._system is not None:
                self._system.finish()  # its last samples, before the run closes
            self.wait()
        finally:
            self._writer.shutdown(wait=True)
            self.client.set_terminated(self.run_id, status=status)

