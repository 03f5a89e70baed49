"""Replay's default memory is balanced by (task, class): an equal share per task, then per
class inside it. Class-only balancing lets the newest task of a domain-incremental stream
(every task holds the same classes) crowd out the older ones."""

from __future__ import annotations

import pytest
import torch

from atoll.continual.replay import Replay
from atoll.continual.streams import Task, build_stream
from atoll.core.checkpoint import load, save
from atoll.core.data import Batches, load_data
from atoll.core.spec import ContinualSpec, DataSpec, ReplaySpec


def _stream(kind: str) -> list[Task]:
    scenario = "domain" if kind == "permuted" else "class"
    return build_stream(load_data(DataSpec(), seed=0),
                        ContinualSpec(stream=kind, scenario=scenario, n_tasks=5), seed=0)


def _origin(x: torch.Tensor, tasks: list[Task]) -> torch.Tensor:
    """The task each stored sample came from, found by its (permuted) pixels."""
    where: dict[bytes, int] = {}
    for t in tasks:
        for row in t.train.x.flatten(1):
            key = row.numpy().tobytes()
            where[key] = t.index if where.get(key, t.index) == t.index else -1
    got = torch.tensor([where.get(row.numpy().tobytes(), -1) for row in x.flatten(1)])
    assert (got >= 0).all(), "a stored sample matches no task, or more than one"
    return got


def _fill(tasks: list[Task], r: Replay) -> Replay:
    for t in tasks:
        r.after_task(None, t, Batches(t.train, 32))
    return r


def test_default_memory_after_5_permuted_tasks_holds_every_task_equally():
    tasks = _stream("permuted")
    r = _fill(tasks, Replay(ReplaySpec(size=200)))  # the default policy
    assert len(r) == 200
    per_task = torch.bincount(_origin(r.x, tasks), minlength=5)
    assert (per_task - 200 / 5).abs().max() <= 1, per_task.tolist()
    for k in range(5):  # and inside each task, every class
        per_class = torch.bincount(r.y[_origin(r.x, tasks) == k], minlength=10)
        assert (per_class - 40 / 10).abs().max() <= 1, (k, per_class.tolist())


def test_default_memory_after_5_split_tasks_holds_every_class_equally():
    tasks = _stream("split")
    r = _fill(tasks, Replay(ReplaySpec(size=200)))
    assert len(r) == 200
    per_class = torch.bincount(r.y, minlength=10)
    assert (per_class - 200 / 10).abs().max() <= 1, per_class.tolist()


def test_class_balanced_policy_keeps_the_class_only_share():
    tasks = _stream("permuted")
    r = _fill(tasks, Replay(ReplaySpec(size=200, policy="class_balanced")))
    per_class = torch.bincount(r.y, minlength=10)
    assert (per_class - 20).abs().max() <= 1, per_class.tolist()
    # which task the samples come from is left to chance: the newest task, whose ~1,250
    # samples meet 200 in memory, takes most of them
    assert torch.bincount(_origin(r.x, tasks), minlength=5)[-1] > 100


def test_a_short_task_hands_its_unused_share_on():
    r = Replay(ReplaySpec(size=30))
    r.add(torch.zeros(4, 2), torch.tensor([0, 1, 0, 1]), task=0)
    r.add(torch.ones(40, 2), torch.tensor([0, 1]).repeat(20), task=1)
    assert len(r) == 30 and torch.bincount(r.state_dict()["task"]).tolist() == [4, 26]


def test_unnamed_tasks_count_as_new_ones():
    r = Replay(ReplaySpec(size=20))
    for k in range(2):
        r.after_task(None, None, [(torch.full((30, 1), float(k)), torch.zeros(30).long())])
    assert torch.bincount(r.state_dict()["task"]).tolist() == [10, 10]


@pytest.mark.parametrize("policy", ["balanced", "class_balanced", "reservoir"])
def test_task_ids_survive_a_weights_only_checkpoint(tmp_path, policy):
    r = Replay(ReplaySpec(size=12, policy=policy))
    for k in range(3):
        r.add(torch.randn(10, 2), torch.arange(10) % 2, task=k)
    back = Replay(ReplaySpec(size=12, policy=policy))
    back.load_state_dict(load(save({"replay": r.state_dict()}, tmp_path / "r.ckpt"))["replay"])
    assert torch.equal(back.state_dict()["task"], r.state_dict()["task"])
    assert torch.equal(back.x, r.x) and len(back.state_dict()["task"]) == len(back) == 12


def test_a_state_from_before_task_ids_loads_as_one_task():
    old = Replay(ReplaySpec(size=20))
    old.add(torch.zeros(30, 1), torch.arange(30) % 2, task=0)
    state = {k: v for k, v in old.state_dict().items() if k != "task"}
    r = Replay(ReplaySpec(size=20))
    r.load_state_dict(state)
    r.add(torch.ones(30, 1), torch.arange(30) % 2, task=3)
    kept_old = int((r.x == 0).sum())
    assert len(r) == 20 and kept_old == 10  # half for the old memory, as one task


def test_regression_targets_are_balanced_by_task_only():
    """Found in review: float targets were split into 'classes' by int(value), none of
    which matched, so the default memory kept nothing."""
    r = Replay(ReplaySpec(size=200), seed=0)
    g = torch.Generator().manual_seed(0)
    for task in range(2):
        r.add(torch.randn(500, 4, generator=g), torch.randn(500, generator=g) * 3, task=task)
    assert len(r) == 200 and r.y.is_floating_point()
    assert torch.bincount(r.task).tolist() == [100, 100]
