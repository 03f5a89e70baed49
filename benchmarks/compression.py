"""Compression, both halves: update compression in federated rounds (test accuracy after
N rounds against the bytes the clients sent), and compressed versions of a trained CNN for
deployment (accuracy, size and latency of each).

The digits federation of `configs/federated.yaml` (10 clients, Dirichlet α = 0.5, FedAvg,
3 local epochs, `--rounds` rounds) once per method — none, fp16, int8, qsgd (4 levels),
top-k 1 % and 10 %, each quantiser and sparsifier with and without error feedback — on
the vectorized engine (the same global model as Flower's simulation, in seconds). Bytes
are what the server received: the serialised ArrayRecords of every reply, summed over the
rounds (`bytes_up`), and what it sent (`bytes_down`). The table is printed and logged to
MLflow (experiment `atoll-benchmarks`, run `compression`, artifact `compression_fl.md`).

Deployment: `configs/cnn.yaml` trained for `--cnn-epochs` and registered, then
`atoll compress`'s steps on it — int8 dynamic, int8 static (512 calibration samples),
pruned 50 % and fine-tuned 2 epochs, distilled into a CNN a tenth of its size, ONNX — each
a registered version; accuracy on the test split, TorchScript (or ONNX) archive size raw
and zipped, and the median latency of a forward at batch 1 and 64 on this CPU
(`compression_deploy.md` in the same run; `--cnn-epochs 0` skips it).

    .venv/bin/python benchmarks/compression.py [--rounds 20] [--cnn-epochs 20]
                                              [--tracking-uri URI]

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


STUDENT = {"name": "cnn", "channels": [8, 16], "hidden": [32], "batch_norm": True}


def deployment(epochs: int, uri: str, work: Path) -> tuple[str, dict]:
    """The CNN trained and compressed every way; (the table, each version's figures)."""
    import torch

    from atoll.core.compress_spec import CompressStep
    from atoll.core.runner import run_local
    from atoll.core.spec import load_spec
    from atoll.tracking.compress import compress_registered

    spec = load_spec(ROOT / "configs" / "cnn.yaml", [
        f"train.epochs={epochs}", "train.progress=off", "tracking.experiment=atoll-benchmarks",
        "tracking.system_metrics=false", f"tracking.uri={uri}", f"train.checkpoint_dir={work}",
        "name=bench-cnn", "tracking.registered_model=bench-cnn"])
    t0 = time.perf_counter()
    result = run_local(spec)
    print(f"  cnn trained ({epochs} epochs) in {time.perf_counter() - t0:.1f}s", flush=True)
    steps = [CompressStep(method="int8-dynamic"), CompressStep(method="int8-static"),
             CompressStep(method="prune", amount=0.5, finetune_epochs=2),
             CompressStep(method="distill", student=STUDENT, epochs=epochs),
             CompressStep(method="onnx")]
    rows: dict[str, dict] = {}
    for step in steps:
        t0 = time.perf_counter()
        (done,) = compress_registered(f"models:/bench-cnn/{result.registered.version}", uri,
                                      [step])
        m = done.metrics
        if not rows:
            rows["fp32"] = {k.removeprefix("parent_"): v for k, v in m.items()
                            if k.startswith("parent_")}
        rows[done.tag] = m
        print(f"  {done.tag:<15} done in {time.perf_counter() - t0:.1f}s", flush=True)
    lines = [f"configs/cnn.yaml, {epochs} epochs; this CPU ({os.cpu_count()} cores, "
             f"{torch.get_num_threads()} torch threads)", "",
             "| version | test accuracy | parameters | size kB | zipped kB | p50 ms b1 | "
             "p50 ms b64 |", "|---|---:|---:|---:|---:|---:|---:|"]
    for tag, m in rows.items():
        params = f"{m['parameters']:,.0f}" if "parameters" in m else "–"
        lines.append(f"| {tag} | {m['test_accuracy']:.4f} | {params} | "
                     f"{m['size_bytes'] / 1e3:.1f} | {m['size_bytes_zipped'] / 1e3:.1f} | "
                     f"{m['latency_ms_p50_b1']:.3f} | {m['latency_ms_p50_b64']:.3f} |")
    if "onnx" in rows:
        lines += ["", f"ONNX against torch: max |logit difference| "
                      f"{rows['onnx']['onnx_max_abs_diff']:.1e}"]
    return "\n".join(lines), rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--tracking-uri", default=None, help="default: a temporary sqlite store")
    p.add_argument("--cases", default="", help="comma-separated case names (default: all)")
    p.add_argument("--cnn-epochs", type=int, default=20,
                   help="deployment half: the CNN's epochs (and the student's); 0 skips it")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")  # a quiet table
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
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
    deploy = ""
    if args.cnn_epochs:
        deploy, _ = deployment(args.cnn_epochs, uri, work)
        print("\n" + deploy + "\n")
    _log(uri, table, rows, deploy)
    ef = rows.get("int8 + EF")
    ratio = float("nan")
    if base and ef and ef["accuracy"] >= base["accuracy"] - 0.01:
        ratio = base["up"] / ef["up"]
    print(f"ratio: {ratio:.3f}")
    return 0


def _log(uri: str, table: str, rows: dict, deploy: str) -> None:
    """The tables as MLflow artifacts, and each method's figures as metrics (the deployed
    versions' are in their own runs, beside their registered versions)."""
    import mlflow

    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment("atoll-benchmarks")
    with mlflow.start_run(run_name="compression"):
        mlflow.log_text(table, "compression_fl.md")
        if deploy:
            mlflow.log_text(deploy, "compression_deploy.md")
        for label, r in rows.items():
            key = label.replace(" ", "_").replace("%", "pct").replace("+", "and")
            mlflow.log_metrics({f"{key}.accuracy": r["accuracy"], f"{key}.bytes_up": r["up"]})


if __name__ == "__main__":
    sys.exit(main())
