"""Every aggregation strategy on the same non-IID federation (configs/federated.yaml).

10 clients, Dirichlet α = 0.5 over digits, MLP, 20 rounds (override with --set). Prints a
markdown table of final centralized test accuracy, best round accuracy and seconds, plus a
JSON line; the last line is `ratio: X` = the best robust strategy's accuracy / FedAvg's.

    .venv/bin/python benchmarks/fl_strategies.py [--set federated.rounds=10 ...]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from atoll.core.spec import FL_STRATEGIES, load_spec  # noqa: E402
from atoll.federated.simulation import run_federated  # noqa: E402

ROBUST = ("fedmedian", "fedtrimmedavg", "krum", "multikrum", "bulyan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--strategies", default=",".join(FL_STRATEGIES))
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="atoll-bench-strat-"))
    rows = {}
    for name in args.strategies.split(","):
        spec = load_spec(ROOT / "configs" / "federated.yaml", [
            f"name=strat-{name}", f"federated.strategy={name}", "train.progress=off",
            f"train.checkpoint_dir={work / 'ckpt'}", "tracking.log_model=false",
            f"tracking.uri=sqlite:///{work / 'mlruns.db'}",
            *args.overrides])
        r = run_federated(spec)
        acc = [h["central_accuracy"] for h in r.history]
        rows[name] = {"test_accuracy": r.metrics["test_accuracy"], "best": max(acc),
                      "seconds": r.seconds}
        print(f"{name}: {rows[name]}", file=sys.stderr)
    print("| strategy | test accuracy | best round | seconds |\n|---|---|---|---|")
    for name, row in rows.items():
        print(f"| {name} | {row['test_accuracy']:.4f} | {row['best']:.4f} | "
              f"{row['seconds']:.0f} |")
    print(json.dumps(rows))
    robust = [rows[n]["test_accuracy"] for n in ROBUST if n in rows]
    if robust and "fedavg" in rows:
        print(f"ratio: {max(robust) / rows['fedavg']['test_accuracy']:.3f}")


if __name__ == "__main__":
    main()
