"""Data-parallel layouts against the single-process loop, on real gloo process groups.

One DDP step on 2 ranks with half batches equals one single-process step on the full
batch; FSDP2 training matches DDP. Processes are spawned by torch (no Ray needed for the
math); each test owns its rendezvous file.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from core.data import Batches, Split
from core.loop import LoopConfig, TrainState, train_epoch

pytestmark = pytest.mark.integration

N, BATCH = 64, 32


def _data() -> Split:
    g = torch.Generator().manual_seed(0)
    return Split(torch.randn(N, 10, generator=g), torch.randint(0, 3, (N,), generator=g))


def _model() -> torch.nn.Module:
    torch.manual_seed(1)
    return torch.nn.Sequential(torch.nn.Linear(10, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))


def _train(model, batches, reduce=None, no_sync=None, steps_epochs: int = 1) -> TrainState:
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    state = TrainState()
    for e in range(steps_epochs):
        batches.set_epoch(e)
        train_epoch(model, batches, opt, torch.nn.CrossEntropyLoss(),
                    LoopConfig(progress="off"), state, reduce=reduce, no_sync=no_sync)
    return state


def _worker(rank: int, world: int, init: str, layout: str, out: str, epochs: int) -> None:
    from cluster.parallel import build

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        lay = build(layout, _model(), torch.device("cpu"))
        batches = Batches(_data(), BATCH // world, shuffle=True, seed=3, rank=rank, world=world)
        _train(lay.model, batches, lay.reduce, lay.no_sync, epochs)
        full = lay.full_state()
        if rank == 0:
            torch.save(full, out)
    finally:
        dist.destroy_process_group()


def _spawn(tmp_path: Path, layout: str, epochs: int) -> dict[str, torch.Tensor]:
    out = tmp_path / f"{layout}.pt"
    init = f"file://{tmp_path / f'rdzv-{layout}'}"
    mp.spawn(_worker, args=(2, init, layout, str(out), epochs), nprocs=2, join=True)
    return torch.load(out, weights_only=True)


def test_ddp_step_on_two_ranks_equals_one_full_batch_step(tmp_path):
    reference = _model()
    single = Batches(_data(), BATCH, shuffle=True, seed=3)
    # the 2-rank permutation is the same (seed, epoch) one, split like DistributedSampler:
    # rank r takes every 2nd index, so global batch b = the union of both ranks' batch b
    idx = single._indices()
    per_rank = [idx[r::2] for r in range(2)]
    order = torch.cat([torch.cat([p[i:i + BATCH // 2] for p in per_rank])
                       for i in range(0, N // 2, BATCH // 2)])
    data = _data()
    fixed = Batches(Split(data.x[order], data.y[order]), BATCH, shuffle=False)
    _train(reference, fixed)
    ddp = _spawn(tmp_path, "ddp", epochs=1)
    for k, v in reference.state_dict().items():
        torch.testing.assert_close(ddp[k], v, rtol=1e-5, atol=1e-6)


def test_fsdp2_matches_ddp(tmp_path):
    ddp = _spawn(tmp_path, "ddp", epochs=3)
    fsdp = _spawn(tmp_path, "fsdp", epochs=3)
    assert set(ddp) == set(fsdp)
    for k in ddp:
        torch.testing.assert_close(fsdp[k], ddp[k], rtol=1e-4, atol=1e-5)
