"""The baseline for benchmarks/ddp_overhead.py: a plain `torchrun` DDP script.

What a PyTorch user writes by hand (DistributedDataParallel, a DistributedSampler,
SGD), on the same model, data, global batch and epochs as the atoll run. Rank 0 prints
one JSON line: wall-clock time of the first training step (for start-up) and each epoch's
training seconds and samples. `train` is also run inside a bare Ray Train TorchTrainer by
the benchmark, to separate Ray's own cost from atoll's.

    torchrun --nproc-per-node 2 benchmarks/plain_ddp/train.py --config configs/demo.yaml
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the model and the data only


def main() -> None:
    ap = argparse.ArgumentParser(description="plain torchrun DDP baseline")
    ap.add_argument("--config", required=True)
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    args = ap.parse_args()
    from atoll.cluster.gloo import spawned_rank
    from atoll.core.spec import load_spec

    spec = load_spec(args.config, args.overrides)
    with spawned_rank():
        report = train(spec)
        if dist.get_rank() == 0:
            print(json.dumps(report), flush=True)


def train(spec: Any) -> dict[str, Any]:
    """The hand-written DDP loop on an initialised process group."""
    from atoll.core.data import load_data
    from atoll.models import build_model

    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(spec.cluster.cpus_per_worker)
    data = load_data(spec.data, spec.seed, spec.project_dir, spec.task)
    torch.manual_seed(spec.seed)
    model = DDP(build_model(spec.model, data.input_shape, data.num_classes, spec.project_dir,
                            data.embedded))
    opt = torch.optim.SGD(model.parameters(), lr=spec.optim.lr, momentum=spec.optim.momentum,
                          weight_decay=spec.optim.weight_decay)
    dataset = TensorDataset(data.train.x, data.train.y)
    sampler = DistributedSampler(dataset, world, rank, shuffle=True, seed=spec.seed)
    loader = DataLoader(dataset, batch_size=spec.data.batch_size // world, sampler=sampler)
    first_step, epochs = None, []
    for epoch in range(spec.train.epochs):
        sampler.set_epoch(epoch)
        model.train()
        t0, n = time.perf_counter(), 0
        for x, y in loader:
            if first_step is None:
                first_step = time.time()
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            n += y.shape[0]
        epochs.append({"seconds": time.perf_counter() - t0, "samples": n * world,
                       "steps": len(loader)})
    return {"first_step": first_step, "epochs": epochs, "end": time.time()}


if __name__ == "__main__":
    main()
