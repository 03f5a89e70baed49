"""Seconds per federated round: plain Flower vs atoll's `flower` and `vectorized` engines.

The workload of `fl_overhead.py` (digits, MLP 64-128-64-10, IID partition, SGD with
momentum, batch 32, `--local-epochs` 1, FedAvg, federated evaluation by every client and a
central evaluation each round) at 10, 100 and 1,000 clients, `--rounds` rounds, median of
`--repeats`. A round's time is the mean of rounds 2.. (the first pays for start-up: Ray
actors, data loading); atoll's includes its checkpoint and MLflow logging, spread over the
rounds. The Flower paths (plain and atoll's) start one simulated SuperNode per client: past
`--flower-max-clients` (default 100) they are skipped, and the table says so.

Then, for the vectorized engine at 100 clients, where a round's time goes (the server's
per-round `seconds_*` figures and its checkpoint/tracking totals; client compute timed by
calling the engine directly on the same clients), and the wall time of a 200-round,
100-client FedAvg run (`--long-rounds`).

    .venv/bin/python benchmarks/fl_vectorized.py [--clients 10,100,1000] [--rounds 5]

Last line: `ratio: X` = plain Flower's seconds per round / the vectorized engine's, at 100
clients. Target: >= 50.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import fl_overhead  # noqa: E402

VECTORIZED = ("federated.engine=vectorized",)


def per_round(run: dict, rounds: int) -> float:
    """Mean seconds of rounds 2.., with the run's checkpoint and tracking time spread over
    its rounds (atoll); plain Flower reports its rounds as they are."""
    extra = sum(run.get("timing", {}).values()) / rounds
    return statistics.mean(run["rounds"]) + extra


def measure(kind: str, clients: int, rounds: int, repeats: int, local_epochs: int,
            work: Path) -> dict:
    secs, acc = [], []
    for i in range(repeats):
        tag = f"{kind}-{clients}-{i}"
        if kind == "plain":
            run = fl_overhead.plain_once(clients, rounds, work, tag, local_epochs)
        else:
            extra = VECTORIZED if kind == "vectorized" else ()
            run = fl_overhead.atoll_once(clients, rounds, work, tag, local_epochs, extra)
        secs.append(per_round(run, rounds))
        acc.append(run["accuracy"])
        last = run
    return {"round_s": statistics.median(secs), "accuracy": statistics.median(acc),
            "last": last}


def breakdown(run: dict, rounds: int) -> dict[str, float]:
    rows = run["history"][1:]
    mean = {k: statistics.mean(r[k] for r in rows)
            for k in ("seconds_train", "seconds_aggregate", "seconds_evaluate",
                      "seconds_central", "round_seconds")}
    timing = run.get("timing", {})
    return {**mean, "checkpoint": timing.get("checkpoint_s", 0.0) / rounds,
            "tracking": timing.get("tracking_s", 0.0) / rounds}


def client_compute(clients: int, local_epochs: int) -> float:
    """The engine alone on the benchmark's clients (what `seconds_train` spends training)."""
    import torch

    from atoll.core.spec import load_spec
    from atoll.federated import task
    from atoll.federated.vectorized import rule_of, train_clients
    from atoll.models import build_model

    spec = load_spec(None, [
        "mode=federated", "data.name=digits", "data.val_fraction=0", "data.test_fraction=0.2",
        "model.name=mlp", "model.hidden=[128, 64]", "optim.name=sgd", "optim.lr=0.05",
        f"federated.num_clients={clients}", "federated.partition.method=iid",
        "tracking.enabled=false"])
    data = [task.client_data(spec, c, clients) for c in range(clients)]
    b = data[0].bundle
    torch.manual_seed(0)
    model = build_model(spec.model, b.input_shape, b.num_classes, spec.project_dir)
    state = model.state_dict()
    args = (model, state, [d.train for d in data], [task._seed(spec, 1, c)
                                                     for c in range(clients)],
            task.federation_loss(spec), rule_of(spec, 0.05, local_epochs, 32))
    train_clients(*args)  # warm
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        train_clients(*args)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", default="10,100,1000")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--local-epochs", type=int, default=1)
    ap.add_argument("--flower-max-clients", type=int, default=100)
    ap.add_argument("--long-rounds", type=int, default=200, help="0: skip the long run")
    args = ap.parse_args()
    sizes = [int(c) for c in args.clients.split(",")]
    work = Path(tempfile.mkdtemp(prefix="atoll-bench-flvec-"))
    table: dict[int, dict[str, dict]] = {}
    try:
        for n in sizes:
            table[n] = {}
            for kind in ("plain", "flower", "vectorized"):
                if kind != "vectorized" and n > args.flower_max_clients:
                    continue
                table[n][kind] = measure(kind, n, args.rounds, args.repeats,
                                         args.local_epochs, work)
                print(f"{n} clients, {kind}: {table[n][kind]['round_s']:.3f} s/round",
                      file=sys.stderr)
        parts = None
        if 100 in table:
            parts = breakdown(table[100]["vectorized"]["last"], args.rounds)
            parts["client_compute"] = client_compute(100, args.local_epochs)
        long_wall = None
        if args.long_rounds:
            t0 = time.perf_counter()
            fl_overhead.atoll_once(100, args.long_rounds, work, "long", args.local_epochs,
                                   VECTORIZED)
            long_wall = time.perf_counter() - t0
    finally:
        shutil.rmtree(work, ignore_errors=True)

    print(f"seconds per round, {args.rounds} rounds, median of {args.repeats}, "
          f"{args.local_epochs} local epoch(s):")
    print(f"{'clients':>8} {'plain Flower':>13} {'atoll flower':>13} {'vectorized':>11} "
          f"{'plain/vec':>10} {'accuracy (vec)':>15}")
    def cell(row: dict, kind: str) -> str:
        return f"{row[kind]['round_s']:.3f}" if kind in row else "skipped"

    for n, row in table.items():
        speedup = row["plain"]["round_s"] / row["vectorized"]["round_s"] \
            if "plain" in row else float("nan")
        print(f"{n:>8} {cell(row, 'plain'):>13} {cell(row, 'flower'):>13} "
              f"{cell(row, 'vectorized'):>11} "
              f"{speedup:>10.1f} {row['vectorized']['accuracy']:>15.4f}")
    if any(n > args.flower_max_clients for n in table):
        print(f"(Flower paths skipped above {args.flower_max_clients} clients: one simulated "
              "SuperNode per client)")
    if parts:
        print("vectorized, 100 clients, seconds per round: " + ", ".join(
            f"{k} {v:.4f}" for k, v in parts.items()))
    if long_wall is not None:
        print(f"vectorized, 100 clients, {args.long_rounds} rounds: wall {long_wall:.1f} s")
    figures = {str(n): {k: {"round_s": v["round_s"], "accuracy": v["accuracy"]}
                        for k, v in row.items()} for n, row in table.items()}
    print(json.dumps({"table": figures, "breakdown_100": parts, "long_wall_s": long_wall}))
    if 100 in table and "plain" in table[100]:
        print(f"ratio: {table[100]['plain']['round_s'] / table[100]['vectorized']['round_s']:.1f}")
    else:
        print("ratio: nan")


if __name__ == "__main__":
    main()
