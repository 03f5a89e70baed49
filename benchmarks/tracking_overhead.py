"""Tracking overhead on training: the same local run with NullTracker and with MlflowTracker
(sqlite store, metrics at every optimizer step). Target: ratio <= 1.03.

The workload is configs/cnn.yaml (the >=97 % digits CNN) with `log_every_n_steps=1`.
`ratio` compares the median wall time of the training loop, which contains every
per-step and per-epoch logging call and every store write that happens during training.
One-time costs per run (creating the run, params, the curve plot, the final flush) are
reported separately as `end_to_end_ratio`. Runs alternate null/mlflow in one process so
machine noise hits both alike.

    .venv/bin/python benchmarks/tracking_overhead.py [--repeats 5] [--config configs/cnn.yaml]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--config", default=str(ROOT / "configs" / "cnn.yaml"))
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)

    from atoll.core.runner import run_local
    from atoll.core.spec import load_spec
    from atoll.tracking import make_tracker
    from atoll.tracking.base import NullTracker

    os.chdir(tempfile.mkdtemp(prefix="atoll-bench-"))
    spec = load_spec(args.config, ["train.log_every_n_steps=1", "train.progress=off",
                                   "train.resume=false", "tracking.log_model=false",
                                   "tracking.experiment=bench", *args.overrides])
    loop: dict[str, list[float]] = {"null": [], "mlflow": []}
    total: dict[str, list[float]] = {"null": [], "mlflow": []}
    steps = 0
    run_local(spec, tracker=NullTracker())  # warm-up: imports, data, allocator
    for _ in range(args.repeats):
        for kind in ("null", "mlflow"):
            t0 = time.perf_counter()
            tracker = NullTracker() if kind == "null" else make_tracker(
                spec.tracking, spec.name, mode="local")
            result = run_local(spec, tracker=tracker)
            total[kind].append(time.perf_counter() - t0)
            loop[kind].append(result.train_seconds)
            steps = result.epochs
    med = {k: statistics.median(v) for k, v in loop.items()}
    med_total = {k: statistics.median(v) for k, v in total.items()}
    print(json.dumps({
        "benchmark": "tracking_overhead", "config": Path(args.config).name,
        "epochs": steps, "repeats": args.repeats, "metrics_every_n_steps": 1,
        "loop_null_s": round(med["null"], 4), "loop_mlflow_s": round(med["mlflow"], 4),
        "total_null_s": round(med_total["null"], 4),
        "total_mlflow_s": round(med_total["mlflow"], 4),
        "end_to_end_ratio": round(med_total["mlflow"] / med_total["null"], 4),
        "loop_null_all_s": [round(t, 3) for t in loop["null"]],
        "loop_mlflow_all_s": [round(t, 3) for t in loop["mlflow"]],
        "peer": "NullTracker"}))
    print(f"ratio: {med['mlflow'] / med['null']:.3f}")


if __name__ == "__main__":
    main()
