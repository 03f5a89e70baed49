"""FSDP2 built on the meta device, in one gloo process (the 2-rank training equivalence is
tests/integration/test_parallel_equivalence.py)."""

from __future__ import annotations

import logging

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn

from atoll.cluster.parallel import build


@pytest.fixture
def one_rank(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rdzv'}", rank=0,
                            world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


class _WithBuffers(nn.Module):
    """A parameter, a persistent buffer and a non-persistent one (no state dict holds it)."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 3)
        self.register_buffer("count", torch.arange(3.0))
        self.register_buffer("table", torch.randn(5), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x) + self.table[:3] + self.count


class _ReadsAValue(nn.Module):
    """Construction reads a weight's value: impossible on the meta device."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 3)
        self.scale = float(self.lin.weight.detach().abs().max())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x) * self.scale


def _plain(cls: type[nn.Module]) -> tuple[nn.Module, torch.Tensor]:
    """What every rank used to do: build after the seed; and the next draw after it."""
    torch.manual_seed(7)
    model = cls()
    return model, torch.rand(4)


@pytest.mark.parametrize(("cls", "init"), [(_WithBuffers, "meta"), (_ReadsAValue, "full")])
def test_fsdp_builds_on_meta_with_the_values_a_plain_build_draws(one_rank, caplog, cls, init):
    reference, next_draw = _plain(cls)
    torch.manual_seed(7)
    with caplog.at_level(logging.WARNING, logger="atoll.cluster.parallel"):
        layout = build("fsdp", cls, torch.device("cpu"))
    assert layout.description["init"] == init
    assert torch.equal(torch.rand(4), next_draw)  # the RNG goes on as before
    full = layout.full_state()
    for k, v in reference.state_dict().items():
        assert torch.equal(full[k], v), k
    x = torch.randn(2, 4)
    torch.testing.assert_close(layout.model(x), reference(x), rtol=0, atol=0)
    warned = [r.getMessage() for r in caplog.records]
    if init == "full":
        assert any("cannot be built on the meta device" in m for m in warned), warned
    else:
        assert not warned, warned


def test_sharded_checkpoints_round_trip_and_refuse_damage(one_rank, tmp_path):
    """DCP shards: what is saved is loaded back (model and optimizer), the driver's
    consolidation equals the model, and a missing manifest or a changed shard byte is a
    CheckpointError (the checkpoint is skipped, never half-loaded)."""
    from atoll.cluster import shards
    from atoll.core.checkpoint import CheckpointError

    torch.manual_seed(0)
    layout = build("fsdp", _WithBuffers, torch.device("cpu"))
    opt = torch.optim.AdamW(layout.model.parameters(), lr=0.1)
    layout.model(torch.randn(8, 4)).sum().backward()
    opt.step()
    saved_model = layout.full_state()
    saved_moment = opt.state_dict()["state"][0]["exp_avg"].full_tensor().clone()
    d = tmp_path / "ckpt"
    d.mkdir()
    shards.save(d, layout.model, opt, rank=0)
    shards.verify(d, world=1)

    opt.step()  # move away from what was saved, then come back
    shards.load(d, layout.model, opt)
    for k, v in layout.full_state().items():
        assert torch.equal(v, saved_model[k]), k
    assert torch.equal(opt.state_dict()["state"][0]["exp_avg"].full_tensor(), saved_moment)
    whole = shards.consolidate(d, _WithBuffers())
    for k, v in saved_model.items():
        assert torch.equal(whole[k], v), k

    shard = next(d.glob("*.distcp"))
    raw = bytearray(shard.read_bytes())
    raw[-1] ^= 0xFF
    shard.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match="rank 0's shard is missing or damaged"):
        shards.verify(d, world=1)
    raw[-1] ^= 0xFF
    shard.write_bytes(bytes(raw))  # intact again: now only rank 1's files are missing
    with pytest.raises(CheckpointError, match="rank 1's shards are missing"):
        shards.verify(d, world=2)


def test_an_async_save_holds_the_state_of_its_call_while_training_goes_on(one_rank, tmp_path):
    """`shards.AsyncWriter`: the state is copied when the save starts, so steps taken while
    the shards are written do not leak into them; the manifest is written on `finish`, and
    the checkpoint loads back and verifies like a synchronous one."""
    from atoll.cluster import shards

    torch.manual_seed(0)
    layout = build("fsdp", _WithBuffers, torch.device("cpu"))
    opt = torch.optim.AdamW(layout.model.parameters(), lr=0.1)
    layout.model(torch.randn(8, 4)).sum().backward()
    opt.step()
    saved_model = {k: v.clone() for k, v in layout.full_state().items()}  # not views
    d = tmp_path / "ckpt"
    d.mkdir()
    writer = shards.AsyncWriter()
    writer.start(d, layout.model, opt)
    for _ in range(3):  # training goes on while the shards are written
        layout.model(torch.randn(8, 4)).sum().backward()
        opt.step()
    moved = layout.full_state()
    assert not torch.equal(moved["lin.weight"], saved_model["lin.weight"])
    writer.finish(rank=0)
    assert writer.pending is None
    shards.verify(d, world=1)
    shards.load(d, layout.model, opt)
    for k, v in layout.full_state().items():
        assert torch.equal(v, saved_model[k]), k
    writer.close()
