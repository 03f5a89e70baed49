"""atoll's streamed cluster training vs a plain Ray Data + TorchTrainer script, on a
Parquet table several times larger than a per-worker memory budget.

A table of `--rows` rows × `--features` float32 columns and an integer label is written in
row groups (its size is printed; by default more than 3× the budget). Both sides train an
MLP (features-256-10, SGD) for one epoch on 2 gloo workers of one local Ray (3 CPUs), the
file read by Ray Data and never loaded whole:

- atoll: `mode: cluster`, `data.streaming: true` (its statistics passes, hash splits and
  `iter_torch_batches` shards; see README "Data larger than memory");
- plain: `ray.data.read_parquet` → `TorchTrainer(datasets=...)` → `iter_torch_batches`, the
  same model, global batch and optimizer, no normalisation, no validation, no tracking.

Printed per side: rows/s of the training pass (rows trained ÷ its seconds), the wall time
from launch to the end (atoll's includes its statistics passes, its validation and test
evaluation and MLflow), and each worker's peak RSS growth: its high-water RSS above its RSS
before it read data (atoll: sampled from /proc of the pids its workers record; plain:
measured in the worker). RSS counts the Ray object store's shared pages a worker maps
while it reads blocks (bounded by the store's own size, a cluster-wide budget), so the
budget is checked on the private part (RssAnon, sampled every 50 ms): the growth of
what the worker itself holds must stay under `--budget-mib`; the last line is
`ratio: X` = atoll rows/s ÷ plain rows/s. Runs alternate (`--repeats`).

    .venv/bin/python benchmarks/streaming.py [--rows 2000000] [--budget-mib 128]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
ROOT = Path(__file__).resolve().parents[1]


def write_table(path: Path, rows: int, features: int, seed: int = 0) -> int:
    """A classification table (10 classes, linearly separable plus noise) written in row
    groups of 100k rows, never whole in memory; returns its size in bytes."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(10, features)).astype(np.float32)
    names = [f"f{i}" for i in range(features)]
    schema = pa.schema([*(pa.field(n, pa.float32()) for n in names),
                        pa.field("label", pa.int64())])
    with pq.ParquetWriter(path, schema) as writer:
        for start in range(0, rows, 100_000):
            n = min(100_000, rows - start)
            y = rng.integers(0, 10, n)
            x = centres[y] + rng.normal(scale=2.0, size=(n, features)).astype(np.float32)
            cols = [pa.array(x[:, i]) for i in range(features)] + [pa.array(y)]
            writer.write_table(pa.Table.from_arrays(cols, schema=schema))
    return path.stat().st_size


def _status_kib(pid: int, key: str) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


class WorkerWatch:
    """Samples the RSS of the processes whose pids appear in `workers/rank-N.pid`: the
    first sample is the baseline (a worker records its pid before it reads data), the
    high-water mark (VmHWM) the peak."""

    def __init__(self, workers: Path, ranks: int):
        self.workers, self.ranks = workers, ranks
        self.base: dict[int, int] = {}
        self.peak: dict[int, int] = {}
        self.anon_base: dict[int, int] = {}  # RssAnon: the process's own (private) pages
        self.anon_peak: dict[int, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> WorkerWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.is_set():
            for rank in range(self.ranks):
                try:
                    pid = int((self.workers / f"rank-{rank}.pid").read_text())
                except (OSError, ValueError):
                    continue
                rss, hwm = _status_kib(pid, "VmRSS"), _status_kib(pid, "VmHWM")
                anon = _status_kib(pid, "RssAnon")
                if rss is None or hwm is None or anon is None:
                    continue
                self.base.setdefault(pid, rss)
                self.anon_base.setdefault(pid, anon)
                self.peak[pid] = max(self.peak.get(pid, 0), hwm)
                self.anon_peak[pid] = max(self.anon_peak.get(pid, 0), anon)
            time.sleep(0.05)

    def growth_mib(self) -> list[float]:
        return [(self.peak[p] - self.base[p]) / 1024 for p in sorted(self.peak)]

    def private_mib(self) -> list[float]:
        return [(self.anon_peak[p] - self.anon_base[p]) / 1024 for p in sorted(self.anon_peak)]


def run_atoll(table: Path, work: Path, features: int, batch: int, name: str
              ) -> dict[str, object]:
    from mlflow.tracking import MlflowClient

    from atoll.cluster.runner import run_cluster
    from atoll.core.spec import load_spec

    spec = load_spec(None, [
        f"name={name}", "mode=cluster", "cluster.num_workers=2", "cluster.cpus_per_worker=1",
        "data.format=parquet", f"data.path={table}", "data.label=label",
        "data.streaming=true", f"data.batch_size={batch}", "model.name=mlp",
        "model.hidden=[256]", "model.dropout=0", "optim.name=sgd", "optim.lr=0.05",
        "optim.scheduler.name=none", "train.epochs=1", "train.progress=off",
        "train.resume=false", "tracking.log_model=false", "tracking.experiment=bench-stream",
        f"tracking.uri=sqlite:///{work / 'mlruns.db'}",
        f"cluster.storage_path={work / 'ray_results'}"])
    launch = time.time()
    with WorkerWatch(work / "ray_results" / name / "workers", 2) as watch:
        result = run_cluster(spec)
    wall = time.time() - launch
    client = MlflowClient(spec.tracking.uri)
    seconds = client.get_metric_history(result.run_id, "seconds")[0].value
    rate = client.get_metric_history(result.run_id, "samples_per_s")[0].value
    return {"rows_per_s": rate, "rows": round(rate * seconds), "wall": wall,
            "growth": watch.growth_mib(), "private": watch.private_mib(),
            "accuracy": result.metrics["test_accuracy"]}


def _plain_loop(cfg: dict) -> None:
    """The plain script's per-worker function: Ray Data shard → DDP MLP, one epoch."""
    import resource

    import ray.train
    import ray.train.torch
    import torch

    base = _status_kib(os.getpid(), "VmRSS") or 0
    anon_base = _status_kib(os.getpid(), "RssAnon") or 0
    anon_peak = [anon_base]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            anon_peak[0] = max(anon_peak[0], _status_kib(os.getpid(), "RssAnon") or 0)
            time.sleep(0.05)

    threading.Thread(target=sample, daemon=True).start()
    torch.manual_seed(0)
    model = ray.train.torch.prepare_model(torch.nn.Sequential(
        torch.nn.Linear(cfg["features"], 256), torch.nn.ReLU(), torch.nn.Linear(256, 10)))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    loss_fn = torch.nn.CrossEntropyLoss()
    shard = ray.train.get_dataset_shard("train")
    names = [f"f{i}" for i in range(cfg["features"])]
    rows, t0 = 0, time.perf_counter()
    for batch in shard.iter_torch_batches(batch_size=cfg["per_rank"], prefetch_batches=2,
                                          local_shuffle_buffer_size=4 * cfg["per_rank"]):
        x = torch.stack([batch[n] for n in names], dim=1)
        loss = loss_fn(model(x), batch["label"])
        opt.zero_grad()
        loss.backward()
        opt.step()
        rows += len(x)
    seconds = time.perf_counter() - t0
    done.set()
    peak = max(_status_kib(os.getpid(), "VmHWM") or 0,
               resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
    rank = ray.train.get_context().get_world_rank()
    Path(cfg["out"], f"rank-{rank}.json").write_text(json.dumps(
        {"rows": rows, "seconds": seconds, "growth": (peak - base) / 1024,
         "private": (anon_peak[0] - anon_base) / 1024}))


def run_plain(table: Path, work: Path, features: int, batch: int) -> dict[str, object]:
    import ray.data
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    out = Path(tempfile.mkdtemp(prefix="plain-", dir=work))
    launch = time.time()
    TorchTrainer(_plain_loop,
                 train_loop_config={"features": features, "per_rank": batch // 2,
                                    "out": str(out)},
                 datasets={"train": ray.data.read_parquet(str(table))},
                 scaling_config=ScalingConfig(num_workers=2, resources_per_worker={"CPU": 1}),
                 run_config=RunConfig(storage_path=str(work / "plain_results"))).fit()
    wall = time.time() - launch
    ranks = [json.loads((out / f"rank-{r}.json").read_text()) for r in (0, 1)]
    rows = sum(r["rows"] for r in ranks)
    return {"rows_per_s": rows / max(r["seconds"] for r in ranks), "rows": rows,
            "wall": wall, "growth": [r["growth"] for r in ranks],
            "private": [r["private"] for r in ranks], "accuracy": None}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=2_000_000)
    ap.add_argument("--features", type=int, default=64)
    ap.add_argument("--batch", type=int, default=1024, help="global batch (2 workers)")
    ap.add_argument("--budget-mib", type=float, default=128.0,
                    help="per-worker RSS growth allowed while training")
    ap.add_argument("--repeats", type=int, default=1)
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    sys.path.insert(0, str(ROOT))
    import ray

    work = Path(tempfile.mkdtemp(prefix="atoll-bench-stream-"))
    os.chdir(work)
    table = work / "table.parquet"
    size = write_table(table, args.rows, args.features)
    print(f"table: {args.rows:,} rows × {args.features} features, {size / 2**20:.0f} MiB "
          f"on disk ({size / 2**20 / args.budget_mib:.1f}× the {args.budget_mib:.0f} MiB "
          "per-worker budget)", flush=True)
    # 2 training workers of 1 CPU each, and one CPU for Ray Data's read tasks: on 2 CPUs
    # the plain script's reads wait forever behind its workers (atoll runs its reads with
    # num_cpus=0 then, cluster/streaming.task_args; here both get the same cluster)
    ray_tmp = tempfile.mkdtemp(prefix="atoll-rs-", dir="/tmp")  # short: Ray's socket paths
    ray.init(num_cpus=3, include_dashboard=False, _temp_dir=ray_tmp)
    runs: dict[str, list[dict[str, object]]] = {"plain": [], "atoll": []}
    try:
        for i in range(args.repeats):
            runs["plain"].append(run_plain(table, work, args.features, args.batch))
            runs["atoll"].append(run_atoll(table, work, args.features, args.batch,
                                           f"stream-{i}"))
            print(f"repeat {i + 1}/{args.repeats}: " + ", ".join(
                f"{k} {v[-1]['rows_per_s']:,.0f} rows/s" for k, v in runs.items()), flush=True)
    finally:
        ray.shutdown()
        os.chdir(ROOT)
        for d in (work, ray_tmp):  # the table is hundreds of MiB: nothing stays behind
            shutil.rmtree(d, ignore_errors=True)
    print(f"\n{'':8}{'rows/s':>10}{'rows':>11}{'wall s':>9}  per worker, MiB: peak RSS "
          "growth (object-store pages included) | private (RssAnon) growth")
    over = []
    for k, v in runs.items():
        rate = statistics.median(r["rows_per_s"] for r in v)
        wall = statistics.median(r["wall"] for r in v)
        growth = [max(g) for g in zip(*(r["growth"] for r in v), strict=True)]
        private = [max(g) for g in zip(*(r["private"] for r in v), strict=True)]
        over += [g for g in private if g > args.budget_mib]
        print(f"{k:8}{rate:10,.0f}{v[-1]['rows']:11,}{wall:9.1f}  "
              + ", ".join(f"{g:.0f}" for g in growth) + " | "
              + ", ".join(f"{g:.0f}" for g in private))
    acc = runs["atoll"][-1]["accuracy"]
    print(f"atoll test accuracy: {acc:.3f}; budget {args.budget_mib:.0f} MiB: "
          + ("kept by every worker" if not over else f"EXCEEDED ({over})"))
    ratio = statistics.median(r["rows_per_s"] for r in runs["atoll"]) / \
        statistics.median(r["rows_per_s"] for r in runs["plain"])
    print(f"ratio: {ratio:.3f}")


if __name__ == "__main__":
    main()
