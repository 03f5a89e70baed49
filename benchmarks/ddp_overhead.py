"""atoll cluster mode vs a plain `torchrun` DDP script: per-step cost and start-up.

The same model, data, global batch, optimizer and epochs run on 2 gloo workers (a) with
`torchrun --nproc-per-node 2 benchmarks/plain_ddp/train.py` and (b) with atoll cluster
mode on a local Ray (2 CPUs) it starts for the purpose; (c) the same hand-written loop in
a bare Ray Train TorchTrainer shows what Ray itself costs. All report each epoch's training
seconds (the training pass only: no validation, checkpoint or logging after the epoch);
time per step is the median over epochs after the first (warm-up). atoll's per-step work
includes its metric accumulation, the per-step MLflow logging of rank 0 and the
non-finite-loss check. Start-up is the time from launch to the first training step:
torchrun's process start, or atoll's Ray worker group, process group, data and MLflow
run (Ray itself is started before the clock, as a cluster would already be running).
Runs alternate so machine noise hits both alike. Target: ratio <= 1.05.

Two cases: `large` (MLP 64-512-512-10, 12 epochs: per-step cost where compute dominates)
and `small` (MLP 64-128-10, 32 samples per rank, 20 epochs: where per-step and per-epoch
overhead shows). For each, `training s` is the time from the first step to the end of the
last epoch, everything atoll does per epoch included (validation, checkpoints at
`train.checkpoint_every`, tracking); target for the small case: ≤ 1.5× the plain script.

    .venv/bin/python benchmarks/ddp_overhead.py [--case small|large|both] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


CASES = {"large": {"epochs": 12, "sets": ["model.hidden=[512,512]", "data.batch_size=32"]},
         "small": {"epochs": 20, "sets": ["model.hidden=[128]", "data.batch_size=64"]}}


def _overrides(epochs: int, case: str) -> list[str]:
    return ["mode=cluster", "cluster.num_workers=2", "optim.name=sgd", "optim.lr=0.05",
            "optim.weight_decay=0", "optim.scheduler.name=none", f"train.epochs={epochs}",
            "train.progress=off", "train.resume=false", "tracking.log_model=false",
            "tracking.experiment=bench-ddp", "model.dropout=0", *CASES[case]["sets"]]


def _per_step(epochs: list[dict[str, float]]) -> float:
    return statistics.median(e["seconds"] / e["steps"] for e in epochs[1:])


def run_torchrun(config: str, overrides: list[str], workdir: Path) -> dict[str, float]:
    sets = [a for o in overrides for a in ("--set", o)]
    launch = time.time()
    out = subprocess.run(
        [str(BIN / "torchrun"), "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
         "--master-port", str(_free_port()), str(ROOT / "benchmarks" / "plain_ddp" / "train.py"),
         "--config", config, *sets], cwd=workdir, capture_output=True, text=True, check=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"})
    wall = time.time() - launch
    report = json.loads(out.stdout.strip().splitlines()[-1])
    return {"per_step": _per_step(report["epochs"]), "startup": report["first_step"] - launch,
            "samples_per_s": _throughput(report["epochs"]), "wall": wall,
            "training": report["end"] - report["first_step"]}


def run_bare_ray(config: str, overrides: list[str]) -> dict[str, float]:
    """The torchrun script's loop inside a bare Ray Train TorchTrainer: Ray's own cost."""
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from atoll.core.spec import load_spec

    spec = load_spec(config, overrides)

    def loop(cfg: dict) -> None:
        import ray.train

        sys.path.insert(0, cfg["root"])
        from atoll.core.spec import validate
        from benchmarks.plain_ddp.train import train

        report = train(validate(cfg["spec"]))
        if ray.train.get_context().get_world_rank() == 0:  # metrics need a checkpoint: a file
            Path(cfg["out"]).write_text(json.dumps(report))

    out = Path(tempfile.mkdtemp(prefix="atoll-bench-ray-", dir=Path.cwd()))  # in `work`
    launch = time.time()
    TorchTrainer(
        loop, train_loop_config={"spec": spec.model_dump(mode="json"), "root": str(ROOT),
                                 "out": str(out / "report.json")},
        scaling_config=ScalingConfig(num_workers=2, resources_per_worker={"CPU": 1}),
        run_config=RunConfig(storage_path=str(out))).fit()
    wall = time.time() - launch
    report = json.loads((out / "report.json").read_text())
    return {"per_step": _per_step(report["epochs"]), "startup": report["first_step"] - launch,
            "samples_per_s": _throughput(report["epochs"]), "wall": wall,
            "training": report["end"] - report["first_step"]}


def run_atoll(config: str, overrides: list[str], name: str) -> dict[str, float]:
    from mlflow.tracking import MlflowClient

    from atoll.cluster.runner import run_cluster
    from atoll.core.spec import load_spec

    spec = load_spec(config, [*overrides, f"name={name}"])
    per_rank = -(-_train_size(spec) // 2)  # padded like DistributedSampler
    steps = -(-per_rank // (spec.data.batch_size // 2))
    launch = time.time()
    result = run_cluster(spec)
    wall = time.time() - launch
    client = MlflowClient(spec.tracking.uri)
    seconds = client.get_metric_history(result.run_id, "seconds")
    epochs = [{"seconds": m.value, "steps": steps} for m in sorted(seconds, key=lambda m: m.step)]
    first_epoch_end = min(m.timestamp for m in seconds if m.step == 1) / 1000
    # the first epoch's metrics are logged after its checkpoint: subtract that epoch only
    first_step = first_epoch_end - epochs[0]["seconds"]
    last_epoch_end = max(m.timestamp for m in seconds) / 1000  # logged at the epoch's end
    samples = client.get_metric_history(result.run_id, "samples_per_s")
    return {"per_step": _per_step(epochs), "startup": first_step - launch,
            "samples_per_s": statistics.median(m.value for m in samples if m.step > 1),
            "wall": wall, "training": last_epoch_end - first_step}


def _throughput(epochs: list[dict[str, float]]) -> float:
    return statistics.median(e["samples"] / e["seconds"] for e in epochs[1:])


def _train_size(spec) -> int:
    from atoll.core.data import load_data

    return len(load_data(spec.data, spec.seed, spec.project_dir, spec.task).train)


def _free_port() -> int:
    from atoll.core.procs import free_port

    return free_port()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--case", choices=["small", "large", "both"], default="both")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=None, help="default: the case's own")
    ap.add_argument("--config", default=str(ROOT / "configs" / "demo.yaml"))
    ap.add_argument("--set", dest="overrides", action="append", default=[],
                    help="extra spec overrides for both runs")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    sys.path.insert(0, str(ROOT))
    import ray

    work = Path(tempfile.mkdtemp(prefix="atoll-bench-ddp-"))
    os.chdir(work)
    cases = ["large", "small"] if args.case == "both" else [args.case]
    ray_tmp = tempfile.mkdtemp(prefix="atoll-rb-", dir="/tmp")  # short: Ray's socket paths
    ray.init(num_cpus=2, include_dashboard=False, _temp_dir=ray_tmp)
    ratios: dict[str, float] = {}
    try:
        for case in cases:
            epochs = args.epochs or CASES[case]["epochs"]
            overrides = [*_overrides(epochs, case),
                         f"tracking.uri=sqlite:///{work / 'mlruns.db'}", *args.overrides]
            ratios[case] = _case(case, epochs, args, overrides, work)
    finally:
        ray.shutdown()
        os.chdir(ROOT)
        for d in (work, ray_tmp):  # stores, checkpoints, Ray's session: nothing stays
            shutil.rmtree(d, ignore_errors=True)
    # the last line: the small model's per-step ratio, where atoll's overhead shows most
    print(f"ratio: {ratios['small' if 'small' in ratios else cases[0]]:.3f}")


def _case(case: str, epochs: int, args: argparse.Namespace, overrides: list[str],
          work: Path) -> float:
    runs: dict[str, list[dict[str, float]]] = {"torchrun": [], "ray-train": [], "atoll": []}
    for i in range(args.repeats):
        runs["torchrun"].append(run_torchrun(args.config, overrides, work))
        runs["ray-train"].append(run_bare_ray(args.config, overrides))
        runs["atoll"].append(run_atoll(args.config, overrides, f"bench-{case}-{i}"))
        print(f"{case} repeat {i + 1}/{args.repeats}: " + ", ".join(
            f"{k} {v[-1]['per_step'] * 1e3:.2f} ms/step" for k, v in runs.items()), flush=True)
    med = {k: {m: statistics.median(r[m] for r in v) for m in v[0]} for k, v in runs.items()}
    print(f"\n{case}: 2 gloo workers, {epochs} epochs, median of {args.repeats} runs "
          f"(per step: steady-state epochs 2..{epochs})")
    print(f"{'':10}{'ms/step':>10}{'samples/s':>12}{'start-up s':>12}{'training s':>12}"
          f"{'wall s':>9}")
    for k in runs:
        m = med[k]
        print(f"{k:10}{m['per_step'] * 1e3:10.2f}{m['samples_per_s']:12.0f}"
              f"{m['startup']:12.1f}{m['training']:12.1f}{m['wall']:9.1f}")
    per_step = med["atoll"]["per_step"] / med["torchrun"]["per_step"]
    print(f"{case}: atoll / bare Ray Train per step: "
          f"{med['atoll']['per_step'] / med['ray-train']['per_step']:.3f}")
    print(f"{case}: atoll / torchrun training time ({epochs} epochs): "
          f"{med['atoll']['training'] / med['torchrun']['training']:.2f}")
    print(f"{case}: atoll / torchrun per step: {per_step:.3f}\n", flush=True)
    return per_step


if __name__ == "__main__":
    main()
