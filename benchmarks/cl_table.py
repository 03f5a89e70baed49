"""Continual-learning strategies × scenarios on digits: ACC, BWT, forgetting, time overhead.

Local: every strategy on permuted/domain and split/class (5 tasks, configs/continual.yaml),
`--seeds` seeds each; federated: naive / EWC / replay on configs/fcl.yaml. Prints markdown
tables of mean ± std and each strategy's training time relative to naive, logs the table
to MLflow, and ends with `ratio: X` = best continual strategy's ACC / naive's on permuted.

    .venv/bin/python benchmarks/cl_table.py [--seeds 3] [--no-federated]
        [--strategies naive replay agem] [--set continual.replay.policy=class_balanced]

`--strategies` reruns only some rows (keep naive: it is the time column's baseline and the
ratio's denominator); `--set` applies spec overrides to every run, e.g. to compare policies.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from atoll.core.continual_runner import run_continual  # noqa: E402
from atoll.core.spec import STRATEGIES, load_spec  # noqa: E402

SCENARIOS = {"permuted/domain": ["continual.stream=permuted", "continual.scenario=domain"],
             "split/class": ["continual.stream=split", "continual.scenario=class"]}


def _fmt(values: list[float]) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.3f} ± {sd:.3f}"


def _collect(rows: dict[str, dict[str, list[float]]], name: str, result) -> None:
    row = rows.setdefault(name, {k: [] for k in ("cl_acc", "cl_bwt", "cl_forgetting",
                                                 "seconds")})
    for k in ("cl_acc", "cl_bwt", "cl_forgetting"):
        row[k].append(result.metrics[k])
    row["seconds"].append(result.seconds)


def table(title: str, rows: dict[str, dict[str, list[float]]]) -> str:
    base = statistics.mean(rows["naive"]["seconds"]) if "naive" in rows else None
    out = [f"### {title}", "", "| strategy | ACC | BWT | forgetting | time vs naive |",
           "|---|---|---|---|---|"]
    for name, r in rows.items():
        rel = f"{statistics.mean(r['seconds']) / base:.2f}×" if base else "—"
        out.append(f"| {name} | {_fmt(r['cl_acc'])} | {_fmt(r['cl_bwt'])} | "
                   f"{_fmt(r['cl_forgetting'])} | {rel} |")
    return "\n".join(out) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--no-federated", action="store_true")
    ap.add_argument("--strategies", nargs="+", choices=STRATEGIES, default=list(STRATEGIES),
                    help="rows to run (default: all); the federated table runs those of naive, "
                         "ewc and replay named here")
    ap.add_argument("--set", dest="overrides", action="append", default=[],
                    metavar="KEY=VALUE", help="spec override for every run (repeatable)")
    args = ap.parse_args()
    if "naive" not in args.strategies or len(args.strategies) < 2:
        ap.error("--strategies: name naive (the baseline) and at least one other")
    work = Path(tempfile.mkdtemp(prefix="atoll-bench-cl-"))
    common = ["train.progress=off", "tracking.log_model=false", "tracking.enabled=false",
              f"train.checkpoint_dir={work / 'ckpt'}", *args.overrides]
    report, figures = [], {}
    for scenario, extra in SCENARIOS.items():
        rows: dict[str, dict[str, list[float]]] = {}
        for name in args.strategies:
            for seed in range(args.seeds):
                spec = load_spec(ROOT / "configs" / "continual.yaml", [
                    *common, *extra, f"continual.strategy={name}", f"seed={seed}",
                    f"name=cl-{scenario.replace('/', '-')}-{name}-{seed}"])
                _collect(rows, name, run_continual(spec))
            print(f"{scenario} {name}: ACC {_fmt(rows[name]['cl_acc'])}", file=sys.stderr)
        figures[scenario] = rows
        report.append(table(f"local, {scenario} (5 tasks, {args.seeds} seeds)", rows))
    if not args.no_federated:
        from atoll.federated.simulation import run_federated

        rows = {}
        for name in (n for n in ("naive", "ewc", "replay") if n in args.strategies):
            for seed in range(args.seeds):
                spec = load_spec(ROOT / "configs" / "fcl.yaml", [
                    *common, f"continual.strategy={name}", f"seed={seed}",
                    f"name=fcl-{name}-{seed}"])
                _collect(rows, name, run_federated(spec))
            print(f"federated {name}: ACC {_fmt(rows[name]['cl_acc'])}", file=sys.stderr)
        figures["federated"] = rows
        report.append(table(f"federated, permuted/domain (5 clients, 3 tasks, {args.seeds} "
                            "seeds)", rows))
    text = "\n".join(report)
    print(text)
    _log(text, figures)
    print(json.dumps({k: {n: {m: statistics.mean(v) for m, v in r.items()}
                          for n, r in rows.items()} for k, rows in figures.items()}))
    perm = figures["permuted/domain"]
    best = max(statistics.mean(r["cl_acc"]) for n, r in perm.items() if n not in
               ("naive", "joint"))
    print(f"ratio: {best / statistics.mean(perm['naive']['cl_acc']):.3f}")


def _log(text: str, figures: dict) -> None:
    """The table as an MLflow run of its own (default store), so it sits with the runs."""
    from atoll.core.spec import TrackingSpec
    from atoll.tracking import make_tracker

    tracker = make_tracker(TrackingSpec(experiment="atoll-benchmarks"), "cl_table",
                           mode="benchmark")
    tracker.log_text(text, "cl_table.md")
    tracker.log_text(json.dumps(figures), "cl_table.json")
    tracker.finish("FINISHED")


if __name__ == "__main__":
    main()
