"""The benchmarks stay alive: `gpu_throughput.py --smoke` runs atoll's loop and the plain
PyTorch loop end to end on this machine (CPU in CI) and prints its figures and ratio."""

from __future__ import annotations

import math
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
# side, model, strategy, compile, samples/s, ...: one row of the table per side and case
ROW = re.compile(r"^(atoll|plain)\s+\w+\s+(?:ddp|fsdp)\s+(?:on|off)\s+(\S+)\s")


def test_gpu_throughput_smoke_prints_both_sides_and_the_ratio():
    done = subprocess.run([sys.executable, "benchmarks/gpu_throughput.py", "--smoke"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    lines = done.stdout.strip().splitlines()
    last = re.fullmatch(r"ratio: (\d+\.\d{3})", lines[-1])
    assert last, lines[-1]
    ratio = float(last.group(1))
    assert math.isfinite(ratio) and ratio > 0
    rows: dict[str, list[float]] = {}
    for line in lines:
        if m := ROW.match(line):
            rows.setdefault(m.group(1), []).append(float(m.group(2)))
    assert set(rows) == {"atoll", "plain"}, done.stdout
    assert all(math.isfinite(v) and v > 0 for values in rows.values() for v in values), rows


def test_checkpoint_save_benchmark_times_both_writers():
    """benchmarks/checkpoint_save.py on a small model: both modes timed, a ratio printed."""
    done = subprocess.run([sys.executable, "benchmarks/checkpoint_save.py", "--width", "64",
                           "--steps", "2", "--rounds", "1"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    lines = done.stdout.strip().splitlines()
    timed = {m.group(1): (float(m.group(2)), float(m.group(3))) for line in lines
             if (m := re.match(r"\s*(sync|async): blocked s (\S+)\s+round s (\S+)", line))}
    assert set(timed) == {"sync", "async"}, done.stdout
    assert all(0 < blocked <= whole for blocked, whole in timed.values()), timed
    assert re.fullmatch(r"ratio: \d+\.\d{3}", lines[-1]), lines[-1]


def test_fl_vectorized_benchmark_prints_its_table():
    """benchmarks/fl_vectorized.py, vectorized engine only (the Flower paths need a
    SuperNode per client): a row per size, and the ratio line (nan without plain Flower)."""
    done = subprocess.run([sys.executable, "benchmarks/fl_vectorized.py", "--clients", "10",
                           "--rounds", "2", "--repeats", "1", "--flower-max-clients", "0",
                           "--long-rounds", "0"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    lines = done.stdout.strip().splitlines()
    row = next(line for line in lines if line.split()[:1] == ["10"])
    cells = row.split()
    assert cells[1:3] == ["skipped", "skipped"] and float(cells[3]) > 0, row
    assert lines[-1] == "ratio: nan"


def test_compression_benchmark_prints_its_table_and_ratio(tmp_path):
    """benchmarks/compression.py for two rounds and two methods: a row each, bytes that
    shrink; the CNN for one epoch and each of its compressed versions; both tables logged
    to MLflow, and the ratio line."""
    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    done = subprocess.run([sys.executable, "benchmarks/compression.py", "--rounds", "2",
                           "--cases", "none,int8 + EF", "--cnn-epochs", "1",
                           "--tracking-uri", uri],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    lines = done.stdout.strip().splitlines()
    rows = {m.group(1): float(m.group(2)) for line in lines
            if (m := re.match(r"\| (none|int8 \+ EF) \| [\d.]+ \| ([\d.]+) \|", line))}
    assert set(rows) == {"none", "int8 + EF"}, done.stdout
    assert rows["none"] / rows["int8 + EF"] > 3.5
    assert re.fullmatch(r"ratio: (\d+\.\d{3}|nan)", lines[-1]), lines[-1]
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("atoll-benchmarks")
                                 .experiment_id], "attributes.run_name = 'compression'")
    assert {"compression_fl.md", "compression_deploy.md"} <= {
        a.path for a in client.list_artifacts(run.info.run_id)}
    deployed = {cells[1]: cells for line in lines if line.startswith("| ")
                and (cells := [c.strip() for c in line.split("|")])[1] in (
                    "fp32", "int8", "int8-static", "pruned-50-ft2", "distilled", "onnx")}
    assert list(deployed) == ["fp32", "int8", "int8-static", "pruned-50-ft2", "distilled",
                              "onnx"], done.stdout
    size = {tag: float(cells[4]) for tag, cells in deployed.items()}  # kB
    assert size["int8-static"] < size["fp32"] / 2 and size["distilled"] < size["fp32"] / 4
    # one epoch: the teacher and its compressions are good already, the student not yet
    assert all(float(cells[2]) > 0.5 for tag, cells in deployed.items()
               if tag != "distilled"), deployed
    assert 0.1 < float(deployed["distilled"][2]) <= 1, deployed
    params = {tag: int(cells[3].replace(",", "")) for tag, cells in deployed.items()
              if cells[3] != "–"}
    assert params["distilled"] < params["fp32"] / 10 and set(params) == {
        "fp32", "pruned-50-ft2", "distilled"}, params
