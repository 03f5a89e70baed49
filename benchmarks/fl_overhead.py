"""atoll's federated mode vs a minimal plain-Flower app on the same FedAvg workload.

Both run the same way (a private SuperLink in simulation mode + `flwr run`), with the
same clients, rounds, model (MLP 64-128-64-10 on digits), local epochs, batch size and
centralized evaluation each round; they alternate, and the median of `--repeats` is
reported. Prints one JSON line of figures and a last line `ratio: X` = atoll's mean
seconds per round (after the first) / plain Flower's. Target: ≤ 1.10.

    .venv/bin/python benchmarks/fl_overhead.py [--clients 50 --rounds 5 --repeats 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from atoll.core.spec import load_spec  # noqa: E402
from atoll.federated.server import RESULT_FILE, run_dir_for  # noqa: E402
from atoll.federated.simulation import Federation, run_federated  # noqa: E402

PLAIN = ROOT / "benchmarks" / "plain_flower"


def atoll_once(clients: int, rounds: int, work: Path, i: int, local_epochs: int = 3,
               extra: tuple[str, ...] = ()) -> dict:
    """One atoll federation; its clients evaluate on their validation split each round,
    as the plain app's evaluate on theirs (federated evaluation on both sides)."""
    spec = load_spec(None, [
        f"name=bench-{i}", "mode=federated", "data.name=digits", "data.batch_size=32",
        "data.val_fraction=0", "data.test_fraction=0.2", "model.name=mlp",
        "model.hidden=[128, 64]", "optim.name=sgd", "optim.lr=0.05", "optim.momentum=0.9",
        f"federated.num_clients={clients}", f"federated.rounds={rounds}",
        f"federated.local_epochs={local_epochs}", "federated.partition.method=iid",
        "federated.min_fit_clients=2", "train.progress=off",
        f"train.checkpoint_dir={work / 'ckpt'}",
        f"tracking.uri=sqlite:///{work / 'mlruns.db'}", "tracking.log_model=false", *extra])
    t0 = time.perf_counter()
    result = run_federated(spec)
    wall = time.perf_counter() - t0
    per_round = [h["round_seconds"] for h in result.history]
    timing = json.loads((run_dir_for(spec, {}) / RESULT_FILE).read_text()).get("timing", {})
    return {"wall": wall, "first_round": per_round[0], "rounds": per_round[1:],
            "accuracy": result.metrics["test_accuracy"], "history": result.history,
            "timing": timing,
            "peak_rss_mb": result.history[-1].get("server_peak_rss_mb", float("nan"))}


def plain_once(clients: int, rounds: int, work: Path, i: int, local_epochs: int = 3) -> dict:
    out = work / f"plain-{i}.json"
    t0 = time.perf_counter()
    with Federation(num_clients=clients, client_cpus=1) as fed:
        fed.run(PLAIN, {"num-server-rounds": rounds, "local-epochs": local_epochs,
                        "result-file": str(out)},
                work / f"plain-{i}.log", quiet=True)
    wall = time.perf_counter() - t0
    r = json.loads(out.read_text())
    return {"wall": wall, "first_round": r["round_seconds"][0], "rounds": r["round_seconds"][1:],
            "accuracy": r["accuracy"], "peak_rss_mb": r["peak_rss_mb"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, default=50)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="atoll-bench-fl-"))
    runs: dict[str, list[dict]] = {"atoll": [], "plain": []}
    for i in range(args.repeats):
        runs["plain"].append(plain_once(args.clients, args.rounds, work, i))
        runs["atoll"].append(atoll_once(args.clients, args.rounds, work, i))
        print(f"repeat {i + 1}/{args.repeats}: plain {runs['plain'][-1]['wall']:.1f}s, "
              f"atoll {runs['atoll'][-1]['wall']:.1f}s", file=sys.stderr)

    def summary(rs: list[dict]) -> dict:
        return {"round_s": statistics.median(statistics.mean(r["rounds"]) for r in rs),
                "first_round_s": statistics.median(r["first_round"] for r in rs),
                "wall_s": statistics.median(r["wall"] for r in rs),
                "accuracy": statistics.median(r["accuracy"] for r in rs),
                "server_peak_rss_mb": statistics.median(r["peak_rss_mb"] for r in rs)}

    a, p = summary(runs["atoll"]), summary(runs["plain"])
    figures = {"clients": args.clients, "rounds": args.rounds, "repeats": args.repeats,
               "atoll": a, "plain_flower": p, "wall_ratio": a["wall_s"] / p["wall_s"]}
    print(json.dumps(figures))
    print(f"ratio: {a['round_s'] / p['round_s']:.3f}")


if __name__ == "__main__":
    main()
