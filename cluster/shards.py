"""Sharded checkpoints of FSDP2 runs, written with `torch.distributed.checkpoint` (DCP).

Why: a full checkpoint gathers the whole model and optimizer state onto rank 0 at every
checkpoint, which a model sharded because it does not fit one device cannot afford. Here
every rank writes only its own shards (`dcp.save`) into a folder of its own and reports
it; Ray Train merges the ranks' folders into the run's one checkpoint folder. Rank 0 adds
`state.ckpt` (everything but the model and optimizer, SHA-256-sealed as always) and
every rank a `shards-RANK.json` with the SHA-256 of each file it wrote, so a checkpoint
that lacks a rank's files or holds a damaged shard is skipped like a damaged state.ckpt.

Resume loads the shards back on every rank (DCP reshards if the world size changed); the
driver consolidates the model once, at the end, to test and register it (`dcp.load` into
the whole module in one process, no process group).
"""

from __future__ import annotations

import json
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import torch.nn as nn
from torch.optim import Optimizer

from atoll.core.checkpoint import CheckpointError
from atoll.core.sources import sha256_file

MANIFEST = "shards-{rank}.json"


def save(directory: Path, model: nn.Module, optimizer: Optimizer, rank: int) -> None:
    """Every rank, together: this rank's shards of the model and optimizer into
    `directory` (its own), then its manifest."""
    import torch.distributed.checkpoint as dcp

    dcp.save(_state(model, optimizer), checkpoint_id=directory)
    _manifest(directory, rank)


def _state(model: nn.Module, optimizer: Optimizer) -> dict[str, Any]:
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optim_state = get_state_dict(model, optimizer)
    return {"model": model_state, "optim": optim_state}


def _manifest(directory: Path, rank: int) -> None:
    written = {p.name: sha256_file(p) for p in sorted(directory.iterdir())
               if p.is_file() and (p.suffix == ".distcp" or p.name == ".metadata")}
    (directory / MANIFEST.format(rank=rank)).write_text(json.dumps(written, indent=1))


class AsyncWriter:
    """Sharded checkpoints written while training goes on (`dcp.async_save`).

    `start` copies this rank's shards to host memory and returns; a thread writes them.
    `finish` waits for the files and writes the manifest — only then may the folder be
    reported to Ray Train, so a checkpoint is durable one check later than with `save`
    (the worker checks every epoch). The writes' own collectives run on a gloo group of
    their own: a second thread must not share training's group, and an NCCL-only default
    group could not carry them.
    """

    def __init__(self) -> None:
        self.group: Any = None  # made at the first start: a collective, every rank at once
        self.pending: tuple[Path, Future] | None = None

    def start(self, directory: Path, model: nn.Module, optimizer: Optimizer) -> None:
        import torch.distributed as dist
        import torch.distributed.checkpoint as dcp

        if self.pending is not None:
            raise RuntimeError("finish() the previous checkpoint first")
        if self.group is None:
            self.group = dist.new_group(backend="gloo")
        started = dcp.async_save(_state(model, optimizer), checkpoint_id=directory,
                                 process_group=self.group)
        # a stager that stages in the background answers with both futures
        written = getattr(started, "upload_completion", started)
        self.pending = (directory, written)

    def done(self) -> bool:
        """This rank's files are written (or the write failed: `finish` raises)."""
        return self.pending is None or self.pending[1].done()

    def finish(self, rank: int) -> Path:
        """Wait for the files, then seal them with the manifest; the folder."""
        if self.pending is None:
            raise RuntimeError("no checkpoint is being written")
        directory, written = self.pending
        self.pending = None
        written.result()
        _manifest(directory, rank)
        return directory

    def close(self) -> None:
        import torch.distributed as dist

        if self.group is not None:
            dist.destroy_process_group(self.group)
            self.group = None


def verify(directory: Path, world: int) -> None:
    """Raise CheckpointError unless every rank's files are there and intact."""
    for rank in range(world):
        manifest = directory / MANIFEST.format(rank=rank)
        try:
            written = json.loads(manifest.read_text())
        except (OSError, ValueError) as e:
            raise CheckpointError(f"{directory}: rank {rank}'s shards are missing or "
                                  f"unreadable ({manifest.name}: {e})") from None
        for name, digest in written.items():
            path = directory / name
            if not path.is_file() or sha256_file(path) != digest:
                raise CheckpointError(f"{path}: rank {rank}'s shard is missing or damaged "
                                      "(SHA-256 mismatch)")


def load(directory: Path, model: nn.Module, optimizer: Optimizer) -> None:
    """Every rank, together: the model's and optimizer's shards from `directory`."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_state, optim_state = get_state_dict(model, optimizer)
    state: dict[str, Any] = {"model": model_state, "optim": optim_state}
    dcp.load(state, checkpoint_id=directory)
    set_state_dict(model, optimizer, model_state_dict=state["model"],
                   optim_state_dict=state["optim"])


def consolidate(directory: Path, model: nn.Module) -> dict[str, Any]:
    """The whole model's state from the shards, in this one process (the driver)."""
    import torch.distributed.checkpoint as dcp

    state = {"model": model.state_dict()}
    dcp.load(state, checkpoint_id=directory)
    return state["model"]
