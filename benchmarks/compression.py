"""Update compression in federated rounds: test accuracy after N rounds against the bytes
the clients sent.

The digits federation of `configs/federated.yaml` (10 clients, Dirichlet α = 0.5, FedAvg,
3 local epochs, `--rounds` rounds) once per method — none, fp16, int8, qsgd (4 levels),
top-k 1 % and 10 %, each quantiser and sparsifier with and without error feedback — on
the vectorized engine (the same global model as Flower's simulation, in seconds). Bytes
are what the server received: the serialised ArrayRecords of every reply, summed over the
rounds (`bytes_up`), and what it sent (`bytes_down`). The table is printed and logged to
MLflow (experiment `atoll-benchmarks`, run `compression`, artifact `compression_fl.md`).

    .venv/bin/python benchmarks/compression.py [--rounds 20] [--tracking-uri URI]

Last line: `ratio: X` = uncompressed bytes up / int8 + error feedback's, printed when
int8 + EF ends within 1 point of the uncompressed accuracy (else `ratio: nan`).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CASES: list[tuple[str, list[str]]] = [
    ("none", []),
    ("fp16", ["method=fp16"]),
    ("int8", ["method=int8"]),
    ("int8 + EF", ["method=int8", "error_feedback=true"]),
    ("qsgd-4", ["method=qsgd", "levels=4"]),
    ("qsgd-4 + EF", ["method=qsgd", "levels=4", "error_feedback=true"]),
    ("topk 10%", ["method=topk", "fraction=0.1"]),
    ("topk 10% + EF", ["method=topk", "fraction=0.1", "error_feedback=true"]),
    ("topk 1%", ["method=topk", "fraction=0.01"]),
    ("topk 1% + EF", ["method=topk", "fraction=0.01", "error_feedback=true"]),
]


def run_case(sets: list[str], rounds: int, uri: str, work: Path, name: str) -> dict:
    from atoll.core.spec import load_spec
    from atoll.federated.simulation import run_federated

    spec = load_spec(ROOT / "configs" / "federated.yaml", [
        "federated.engine=vectorized", f"federated.rounds={rounds}", "train.progress=off",
        "tracking.log_model=false", "tracking.experiment=atoll-benchmarks",
        "tracking.system_metrics=false",
        f"tracking.uri={uri}", f"train.checkpoint_dir={work}", f"name={name}",
        *[f"federated.compression.{s}" for s in sets]])
    t0 = time.perf_counter()
    result = run_federated(spec)
    return {"accuracy": result.metrics["test_accuracy"],
            "up": sum(h["bytes_up"] for h in result.history),
            "down": sum(h["bytes_down"] for h in result.history),
            "seconds": time.perf_counter() - t0}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--tracking-uri", default=None, help="default: a temporary sqlite store")
    p.add_argument("--cases", default="", help="comma-separated case names (default: all)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")  # a quiet table
    work = Path(tempfile.mkdtemp(prefix="atoll-bench-compression-"))
    uri = args.tracking_uri or f"sqlite:///{work / 'mlruns.db'}"
    wanted = [c for c in args.cases.split(",") if c]
    rows = {}
    for label, sets in CASES:
        if wanted and label not in wanted:
            continue
        rows[label] = run_case(sets, args.rounds, uri, work, "bench-" + label.replace(" ", "")
                               .replace("%", "pct").replace("+", "-"))
        print(f"  {label:<15} done in {rows[label]['seconds']:.1f}s", flush=True)
    base = rows.get("none")
    lines = [f"digits, 10 clients, Dirichlet 0.5, FedAvg, {args.rounds} rounds, 3 local epochs",
             "", "| method | test accuracy | MB up | MB down | up ÷ none's |",
             "|---|---:|---:|---:|---:|"]
    for label, r in rows.items():
        times = base["up"] / r["up"] if base else float("nan")
        lines.append(f"| {label} | {r['accuracy']:.4f} | {r['up'] / 1e6:.3f} | "
                     f"{r['down'] / 1e6:.3f} | {times:.2f}× |")
    table = "\n".join(lines)
    print(table)
    _log(uri, table, rows)
    ef = rows.get("int8 + EF")
    ratio = float("nan")
    if base and ef and ef["accuracy"] >= base["accuracy"] - 0.01:
        ratio = base["up"] / ef["up"]
    print(f"ratio: {ratio:.3f}")
    return 0


def _log(uri: str, table: str, rows: dict) -> None:
    """The table as an MLflow artifact, and each method's figures as metrics."""
    import mlflow

    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment("atoll-benchmarks")
    with mlflow.start_run(run_name="compression"):
        mlflow.log_text(table, "compression_fl.md")
        for label, r in rows.items():
            key = label.replace(" ", "_").replace("%", "pct").replace("+", "and")
            mlflow.log_metrics({f"{key}.accuracy": r["accuracy"], f"{key}.bytes_up": r["up"]})


if __name__ == "__main__":
    sys.exit(main())
