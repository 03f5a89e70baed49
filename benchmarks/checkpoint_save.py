"""FSDP2 sharded checkpoints: how long training waits for one, written in the foreground
(`dcp.save`) against in the background (`cluster.shards.AsyncWriter`, what atoll's
workers use).

Two gloo ranks (one process each, started here) shard an MLP of `--width` (default 1536:
4 layers, 4.8 M parameters; with AdamW's moments 58 MB of state, half per rank) and train
`--steps` steps after each checkpoint, as the steps of the next epoch would. Each round
times, on rank 0: (a) the checkpoint written with `shards.save`, then the steps; (b) the
write started with `AsyncWriter.start`, the same steps, then `finish` (waiting for the
files if they are not yet written). `blocked s` is the time training could not go on (a:
the save; b: start + the wait in finish); `round s` is the whole round. Rounds alternate
and the medians are shown. On a machine whose cores are busy with training the writing
thread competes with it; with a GPU the steps run on the device and the write is hidden.

    .venv/bin/python benchmarks/checkpoint_save.py [--width 1536] [--steps 10] [--rounds 4]

Last line: `ratio: X` = async round time / sync round time (lower is better).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn


def _model(width: int) -> nn.Module:
    return nn.Sequential(nn.Linear(64, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(),
                         nn.Linear(width, width), nn.ReLU(), nn.Linear(width, 10))


def _rank(rank: int, world: int, init: str, args: argparse.Namespace, out: str) -> None:
    from atoll.cluster import shards
    from atoll.cluster.parallel import build

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        lay = build("fsdp", lambda: _model(args.width), torch.device("cpu"))
        opt = torch.optim.AdamW(lay.model.parameters(), lr=1e-3)
        x, y = torch.randn(32, 64), torch.randint(0, 10, (32,))

        def steps() -> None:
            for _ in range(args.steps):
                opt.zero_grad(set_to_none=True)
                nn.functional.cross_entropy(lay.model(x), y).backward()
                opt.step()

        steps()  # optimizer state exists before the first checkpoint
        writer = shards.AsyncWriter()
        rows = []
        for r in range(args.rounds * 2):
            d = Path(out) / f"round-{r}" / f"rank-{rank}"
            d.mkdir(parents=True)
            dist.barrier()
            t0 = time.perf_counter()
            if r % 2 == 0:
                shards.save(d, lay.model, opt, rank)
                blocked = time.perf_counter() - t0
                steps()
            else:
                writer.start(d, lay.model, opt)
                blocked = time.perf_counter() - t0
                steps()
                t1 = time.perf_counter()
                writer.finish(rank)
                blocked += time.perf_counter() - t1
            dist.barrier()
            rows.append({"mode": "sync" if r % 2 == 0 else "async", "blocked": blocked,
                         "round": time.perf_counter() - t0})
            shutil.rmtree(d.parent, ignore_errors=True)
        writer.close()
        if rank == 0:
            size = sum(p.numel() for p in _model(args.width).parameters())
            (Path(out) / "rows.json").write_text(json.dumps({"params": size, "rows": rows}))
    finally:
        dist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--width", type=int, default=1536)
    ap.add_argument("--steps", type=int, default=10, help="training steps per round")
    ap.add_argument("--rounds", type=int, default=4, help="rounds of each mode")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="atoll-bench-ckpt-"))
    try:
        mp.spawn(_rank, args=(2, f"file://{work / 'rdzv'}", args, str(work)), nprocs=2,
                 join=True)
        found = json.loads((work / "rows.json").read_text())
    finally:
        shutil.rmtree(work, ignore_errors=True)
    med = {m: {k: statistics.median(r[k] for r in found["rows"] if r["mode"] == m)
               for k in ("blocked", "round")} for m in ("sync", "async")}
    print(f"FSDP2 on 2 gloo ranks, MLP width {args.width} ({found['params'] / 1e6:.1f} M "
          f"parameters, AdamW), {args.steps} steps per round, {args.rounds} rounds each")
    for m in ("sync", "async"):
        print(f"{m:>5}: blocked s {med[m]['blocked']:.3f}   round s {med[m]['round']:.3f}")
    print(f"ratio: {med['async']['round'] / med['sync']['round']:.3f}")


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
