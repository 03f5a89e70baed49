"""Pipeline-parallel throughput vs a single process: 2 stages, 1/4/8 microbatches.

A wide MLP on digits is trained through the one loop (`core.loop.train_epoch`) three
ways: one process (1 thread, and 2 threads = the same cores as the pipeline), and a
2-stage pipeline (`cluster/pipeline.py`, gloo, 1 thread per stage) under GPipe and 1F1B
with 1, 4 and 8 microbatches. Processes are spawned by torch (no Ray: this measures the
schedule, not the cluster). Throughput is the median training samples/s over epochs after
the first. With 1 microbatch a 2-stage pipeline is sequential (one stage idles while the
other works); more microbatches fill the pipeline, minus the bubble (p−1)/(m+p−1) and the
activation transfers.

    .venv/bin/python benchmarks/pipeline_scaling.py [--epochs 4] [--hidden 1024] [--batch 256]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from pathlib import Path

import torch
import torch.multiprocessing as mp

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _setup(hidden: int, layers: int) -> tuple[torch.nn.Sequential, object]:
    from atoll.core.data import load_data
    from atoll.core.spec import load_spec
    from atoll.models import build_model

    spec = load_spec(ROOT / "configs" / "demo.yaml",
                     [f"model.hidden=[{','.join([str(hidden)] * layers)}]", "model.dropout=0"])
    data = load_data(spec.data, spec.seed, spec.project_dir, spec.task)
    torch.manual_seed(0)
    return build_model(spec.model, data.input_shape, data.num_classes, spec.project_dir,
                       data.embedded), data


def _epochs(model, batches, epochs: int, pipe=None, reduce=None) -> float:
    from atoll.core.loop import LoopConfig, TrainState, train_epoch

    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    state, rates = TrainState(), []
    for e in range(epochs):
        batches.set_epoch(e)
        m = train_epoch(model, batches, opt, torch.nn.CrossEntropyLoss(),
                        LoopConfig(progress="off"), state, pipe=pipe, reduce=reduce)
        rates.append(m["samples_per_s"])
    return statistics.median(rates[1:])


def single(threads: int, hidden: int, layers: int, epochs: int, batch: int) -> float:
    from atoll.core.data import Batches

    torch.set_num_threads(threads)
    model, data = _setup(hidden, layers)
    return _epochs(model, Batches(data.train, batch, seed=0, drop_last=True), epochs)


def _stage(rank: int, init: str, schedule: str, micro: int, hidden: int, layers: int,
           epochs: int, batch: int, out: str) -> None:
    from atoll.cluster.gloo import spawned_rank
    from atoll.cluster.parallel import build
    from atoll.core.data import Batches

    torch.set_num_threads(1)
    with spawned_rank(rank, 2, init):
        model, data = _setup(hidden, layers)
        lay = build("pipeline", model, torch.device("cpu"), stages=2, schedule=schedule,
                    microbatches=micro, batch=batch)
        rate = _epochs(lay.model, Batches(data.train, batch, seed=0, drop_last=True), epochs,
                       pipe=lay.pipe, reduce=lay.reduce)
        if rank == 0:
            Path(out).write_text(str(rate))


def pipeline(schedule: str, micro: int, hidden: int, layers: int, epochs: int,
             batch: int) -> float:
    d = tempfile.mkdtemp(prefix="atoll-bench-pp-")
    out = os.path.join(d, "rate")
    mp.spawn(_stage, args=(f"file://{d}/rdzv", schedule, micro, hidden, layers, epochs, batch,
                               out),
             nprocs=2, join=True)
    return float(Path(out).read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=4, help="≥ 2: the first is warm-up")
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--batch", type=int, default=256)
    args = ap.parse_args()
    if args.epochs < 2:
        ap.error(f"--epochs {args.epochs}: need at least 2 (the first is warm-up)")
    shape = (args.hidden, args.layers, args.epochs, args.batch)
    base1 = single(1, *shape)
    base2 = single(2, *shape)
    print(f"MLP {args.layers}×{args.hidden} on digits, batch {args.batch}, median samples/s of "
          f"epochs 2..{args.epochs}")
    print(f"{'layout':32}{'samples/s':>11}{'vs 1 proc':>11}")
    print(f"{'single process, 1 thread':32}{base1:11.0f}{1.0:11.2f}")
    print(f"{'single process, 2 threads':32}{base2:11.0f}{base2 / base1:11.2f}")
    best = 0.0
    for schedule in ("gpipe", "1f1b"):
        for micro in (1, 4, 8):
            if schedule == "1f1b" and micro < 2:  # 1F1B needs microbatches >= stages
                continue
            rate = pipeline(schedule, micro, *shape)
            best = max(best, rate)
            print(f"{f'2 stages {schedule}, {micro} microbatches':32}{rate:11.0f}"
                  f"{rate / base1:11.2f}", flush=True)
    print(f"ratio: {best / base1:.3f}  (best pipeline / single process, 1 thread each)")


if __name__ == "__main__":
    main()
