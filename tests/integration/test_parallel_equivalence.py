"""Data-parallel layouts against the single-process loop, on real gloo process groups.

One DDP step on 2 ranks with half batches equals one single-process step on the full
batch; FSDP2 training matches DDP. Processes are spawned by torch (no Ray needed for the
math); each test owns its rendezvous file.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from atoll.cluster.gloo import spawned_rank
from atoll.core.data import Batches, Split
from atoll.core.loop import LoopConfig, TrainState, evaluate, train_epoch

pytestmark = pytest.mark.integration

N, BATCH = 64, 32


def _data() -> Split:
    g = torch.Generator().manual_seed(0)
    return Split(torch.randn(N, 10, generator=g), torch.randint(0, 3, (N,), generator=g))


def _model() -> torch.nn.Module:
    torch.manual_seed(1)
    return torch.nn.Sequential(torch.nn.Linear(10, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))


def _train(model, batches, reduce=None, no_sync=None, steps_epochs: int = 1,
           accum: int = 1) -> TrainState:
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    state = TrainState()
    for e in range(steps_epochs):
        batches.set_epoch(e)
        train_epoch(model, batches, opt, torch.nn.CrossEntropyLoss(),
                    LoopConfig(progress="off", grad_accum_steps=accum), state, reduce=reduce,
                    no_sync=no_sync)
    return state


def _worker(rank: int, world: int, init: str, layout: str, out: str, epochs: int) -> None:
    from atoll.cluster.parallel import build

    with spawned_rank(rank, world, init):
        strategy, *options = layout.split("+")
        built: list[str] = []  # the device each build of the model allocated on

        def make() -> torch.nn.Module:
            built.append(torch.empty(()).device.type)
            return _model()

        lay = build(strategy, make if "meta" in options else _model(), torch.device("cpu"),
                    compile="compile" in options)
        if "meta" in options and strategy == "fsdp":  # only rank 0 ever holds it whole
            assert built == (["cpu", "meta"] if rank == 0 else ["meta"]), built
            assert lay.description["init"] == "meta"
        assert lay.no_sync is not None or strategy != "fsdp"  # micro-steps skip the sync
        batches = Batches(_data(), BATCH // world, shuffle=True, seed=3, rank=rank, world=world)
        _train(lay.model, batches, lay.reduce, lay.no_sync, epochs,
               accum=2 if "accum" in options else 1)
        full = lay.full_state()
        if rank == 0:
            torch.save(full, out)


def _spawn(tmp_path: Path, layout: str, epochs: int) -> dict[str, torch.Tensor]:
    out = tmp_path / f"{layout}.pt"
    init = f"file://{tmp_path / f'rdzv-{layout}'}"
    mp.spawn(_worker, args=(2, init, layout, str(out), epochs), nprocs=2, join=True)
    return torch.load(out, weights_only=True)


def _failing_rank(rank: int, world: int, init: str) -> None:
    with spawned_rank(rank, world, init):
        dist.all_reduce(torch.ones(1))
        if rank == 1:
            raise ValueError("rank 1 failed on purpose")


def test_a_failing_spawned_rank_still_reports_its_error(tmp_path):
    """`spawned_rank` exits early only on success: an error reaches the parent."""
    with pytest.raises(mp.ProcessRaisedException, match="rank 1 failed on purpose"):
        mp.spawn(_failing_rank, args=(2, f"file://{tmp_path / 'rdzv'}"), nprocs=2, join=True)


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


@pytest.mark.parametrize("accum", ["", "+accum+meta"])
def test_fsdp2_matches_ddp(tmp_path, accum):
    """Also with gradient accumulation: FSDP2's micro-steps skip the reduce-scatter
    (set_requires_gradient_sync), DDP's the all-reduce (no_sync); the step is the same.
    `meta`: FSDP2 builds the model on the meta device and materialises only each rank's
    shard (rank 0 draws the values once on the CPU): the same training, and no rank but 0
    ever builds the whole model."""
    ddp = _spawn(tmp_path, f"ddp{accum}", epochs=3)
    fsdp = _spawn(tmp_path, f"fsdp{accum}", epochs=3)
    assert set(ddp) == set(fsdp)
    for k in ddp:
        torch.testing.assert_close(fsdp[k], ddp[k], rtol=1e-4, atol=1e-5)


def _sharded_then_killed(rank: int, world: int, init: str, out: str, resume: bool) -> None:
    """FSDP2 built on meta, 3 epochs. First attempt, as the worker does: after epoch 1
    every rank starts writing its DCP shards into a folder of its own (`AsyncWriter`),
    epoch 2 trains while they are written; then the writes are finished, rank 0 merges the
    folders as Ray Train does, and rank 1 is SIGKILLed. Resume (a new process group):
    read the epoch-1 shards, train epochs 2-3."""
    import shutil

    from atoll.cluster import shards
    from atoll.cluster.parallel import build

    with spawned_rank(rank, world, init):
        lay = build("fsdp", _model, torch.device("cpu"))
        opt = torch.optim.SGD(lay.model.parameters(), lr=0.1, momentum=0.9)  # as _train
        writer = shards.AsyncWriter()
        merged = Path(out) / "checkpoint"
        first = 0
        if resume:
            shards.verify(merged, world)
            shards.load(merged, lay.model, opt)
            first = 1
        batches = Batches(_data(), BATCH // world, shuffle=True, seed=3, rank=rank, world=world)
        state = TrainState(epoch=first)
        for e in range(first, 3):
            batches.set_epoch(e)
            train_epoch(lay.model, batches, opt, torch.nn.CrossEntropyLoss(),
                        LoopConfig(progress="off"), state, reduce=lay.reduce,
                        no_sync=lay.no_sync)
            state.epoch += 1
            if not resume and e == 0:
                own = Path(out) / f"rank-{rank}"
                own.mkdir(parents=True)
                writer.start(own, lay.model, opt)
            if not resume and e == 1:
                writer.finish(rank)
                dist.barrier()
                if rank == 0:
                    for r in range(world):
                        shutil.copytree(Path(out) / f"rank-{r}", merged, dirs_exist_ok=True)
                dist.barrier()
                if rank == 1:
                    os.kill(os.getpid(), signal.SIGKILL)
        full = lay.full_state()
        if rank == 0:
            torch.save(full, Path(out) / "final.pt")


def test_fsdp2_resumed_from_its_shards_after_a_sigkill_equals_ddp(tmp_path):
    """FSDP2 with meta init and DCP checkpoints written in the background: rank 1 is
    SIGKILLed after the epoch-1 checkpoint (written while epoch 2 trained); a new group
    resumes from the merged shards and ends with the weights of
    3 uninterrupted DDP epochs (within 1e-5)."""
    out = tmp_path / "fsdp"
    with pytest.raises(mp.ProcessExitedException, match="signal SIGKILL"):
        mp.spawn(_sharded_then_killed, args=(2, f"file://{tmp_path / 'rdzv-1'}", str(out),
                                             False), nprocs=2, join=True)
    assert not (out / "final.pt").exists()
    mp.spawn(_sharded_then_killed, args=(2, f"file://{tmp_path / 'rdzv-2'}", str(out), True),
             nprocs=2, join=True)
    resumed = torch.load(out / "final.pt", weights_only=True)
    ddp = _spawn(tmp_path, "ddp", epochs=3)
    assert set(resumed) == set(ddp)
    for k in ddp:
        torch.testing.assert_close(resumed[k], ddp[k], rtol=1e-5, atol=1e-5)


def _task_shard(task: int, rank: int, world: int) -> Batches:
    """Task t of a toy stream: the same inputs, labels moved on by t (tasks conflict)."""
    data = _data()
    return Batches(Split(data.x, (data.y + task) % 3), BATCH // world, shuffle=True, seed=3,
                   rank=rank, world=world)


def _save_from_all(obj: object, world: int, out: str) -> None:
    """Every rank's `obj`, gathered and saved by rank 0."""
    gathered: list = [None] * world
    dist.all_gather_object(gathered, obj)
    if dist.get_rank() == 0:
        torch.save(gathered, out)


def _on_two_ranks(worker, tmp_path: Path, tag: str) -> list:
    """Spawn `worker(rank, world, init, out)` on 2 gloo ranks; what `_save_from_all` saved."""
    out = tmp_path / f"{tag}.pt"
    mp.spawn(worker, args=(2, f"file://{tmp_path / f'rdzv-{tag}'}", str(out)), nprocs=2,
             join=True)
    return torch.load(out, weights_only=False)


def _pipe_worker(rank: int, world: int, init: str, strategy: str, schedule: str, out: str,
                 epochs: int, clip: float | None) -> None:
    from atoll.cluster.parallel import build

    with spawned_rank(rank, world, init):
        stages = 2
        dp = world // stages
        lay = build(strategy, _model(), torch.device("cpu"), stages=stages, schedule=schedule,
                    microbatches=4, batch=BATCH // dp)
        # one step by hand: the loss and this stage's gradients
        x, y = _data().x[:BATCH], _data().y[:BATCH]
        logits, loss = lay.pipe.train(x, y, torch.nn.CrossEntropyLoss())
        grads = {n: p.grad.clone() for n, p in lay.base.named_parameters()}
        first = {"loss": float(loss), "logits": logits, "index": lay.pipe.index, "grads": grads}
        gathered: list = [None] * world
        dist.all_gather_object(gathered, first)
        for p in lay.model.parameters():
            p.grad = None
        # then whole epochs through the one loop (a fresh model: same seed, same split)
        lay = build(strategy, _model(), torch.device("cpu"), stages=stages, schedule=schedule,
                    microbatches=4, batch=BATCH // dp)
        batches = Batches(_data(), BATCH // dp, shuffle=True, seed=3, rank=lay.dp_rank,
                          world=dp, drop_last=True)
        opt = torch.optim.SGD(lay.model.parameters(), lr=0.1, momentum=0.9)
        state = TrainState()
        metrics = {}
        for e in range(epochs):
            batches.set_epoch(e)
            metrics = train_epoch(lay.model, batches, opt, torch.nn.CrossEntropyLoss(),
                                  LoopConfig(progress="off", grad_clip=clip), state,
                                  reduce=lay.reduce, pipe=lay.pipe)
        # evaluation through the schedule, with a short last batch (padded inside)
        data = _data()
        held_out = Split(data.x[:50], data.y[:50])
        metrics |= evaluate(lay.model, Batches(held_out, BATCH // dp, shuffle=False),
                            torch.nn.CrossEntropyLoss(), 3, reduce=lay.reduce, pipe=lay.pipe,
                            prefix="eval")
        full = lay.full_state()
        if rank == 0:
            torch.save({"step": gathered, "state": full, "metrics": metrics}, out)


def _spawn_pipe(tmp_path: Path, strategy: str, schedule: str, world: int, epochs: int,
                clip: float | None = None) -> dict:
    out = tmp_path / f"{strategy}-{schedule}.pt"
    init = f"file://{tmp_path / f'rdzv-{strategy}-{schedule}'}"
    mp.spawn(_pipe_worker, args=(world, init, strategy, schedule, str(out), epochs, clip),
             nprocs=world, join=True)
    return torch.load(out, weights_only=False)


@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
def test_pipeline_loss_and_gradients_equal_the_unsplit_model(tmp_path, schedule):
    got = _spawn_pipe(tmp_path, "pipeline", schedule, world=2, epochs=2, clip=0.5)
    reference = _model()
    x, y = _data().x[:BATCH], _data().y[:BATCH]
    logits = reference(x)
    loss = torch.nn.functional.cross_entropy(logits, y)
    loss.backward()
    last = next(s for s in got["step"] if s["logits"] is not None)
    torch.testing.assert_close(last["loss"], float(loss.detach()), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(last["logits"], logits.detach(), rtol=1e-5, atol=1e-6)
    stage_grads = {}
    for s in got["step"]:  # stage modules number their blocks from 0: map back by stage
        stage_grads.update({(s["index"], k): v for k, v in s["grads"].items()})
    ref_grads = dict(reference.named_parameters())
    assert len(stage_grads) == len(ref_grads)
    from atoll.models.stages import split_stages

    for index, part in enumerate(split_stages(reference, 2)):
        for name, p in part.named_parameters():
            torch.testing.assert_close(stage_grads[(index, name)], p.grad, rtol=1e-5, atol=1e-6)
    # two epochs through the loop (gradient clipping over both stages) = the single process
    single = _model()
    batches = Batches(_data(), BATCH, shuffle=True, seed=3, drop_last=True)
    opt = torch.optim.SGD(single.parameters(), lr=0.1, momentum=0.9)
    state, metrics = TrainState(), {}
    for e in range(2):
        batches.set_epoch(e)
        metrics = train_epoch(single, batches, opt, torch.nn.CrossEntropyLoss(),
                              LoopConfig(progress="off", grad_clip=0.5), state)
    for k, v in single.state_dict().items():
        torch.testing.assert_close(got["state"][k], v, rtol=1e-5, atol=1e-6)
    assert got["metrics"]["samples"] == metrics["samples"] == N
    assert abs(got["metrics"]["train_loss"] - metrics["train_loss"]) < 1e-5
    data = _data()
    single_eval = evaluate(single, Batches(Split(data.x[:50], data.y[:50]), BATCH,
                                           shuffle=False), torch.nn.CrossEntropyLoss(), 3,
                           prefix="eval")
    for k, v in single_eval.items():
        assert abs(got["metrics"][k] - v) < 1e-5, k


@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
def test_hybrid_dp2_pp2_equals_ddp(tmp_path, schedule):
    """4 ranks as 2 replicas × 2 stages train exactly like 2 DDP ranks."""
    hybrid = _spawn_pipe(tmp_path, "hybrid", schedule, world=4, epochs=2)
    ddp = _spawn(tmp_path, "ddp", epochs=2)
    assert set(hybrid["state"]) == set(ddp)
    for k in ddp:
        torch.testing.assert_close(hybrid["state"][k], ddp[k], rtol=1e-5, atol=1e-6)


def _importance_worker(rank: int, world: int, init: str, out: str) -> None:
    """EWC + SI + A-GEM on DDP with a different data shard per rank."""
    from atoll.cluster.parallel import build
    from atoll.continual.agem import AGEM
    from atoll.continual.base import Composite, distribute
    from atoll.continual.ewc import EWC, fisher_diagonal
    from atoll.continual.si import SI
    from atoll.core.spec import AgemSpec, EwcSpec, SiSpec

    with spawned_rank(rank, world, init):
        lay = build("ddp", _model(), torch.device("cpu"))
        ewc, si, agem = EWC(EwcSpec(lam=10.0)), SI(SiSpec()), AGEM(AgemSpec(size=16, batch=8))
        strategy = Composite([ewc, si, agem])
        distribute(strategy, lambda t: lay.reduce(t) / world)
        opt = torch.optim.SGD(lay.model.parameters(), lr=0.1)
        state = TrainState()
        for task in range(2):  # the second task (labels moved on) conflicts with the first
            shard = _task_shard(task, rank, world)
            strategy.before_task(lay.base, task)
            train_epoch(lay.model, shard, opt, torch.nn.CrossEntropyLoss(),
                        LoopConfig(progress="off"), state, strategy=strategy,
                        reduce=lay.reduce, no_sync=lay.no_sync)
            if task == 0:
                first_fisher = fisher_diagonal(lay.base, shard, max_samples=N)
            strategy.after_task(lay.base, task, shard)
        penalty = float(strategy.penalty(lay.base))
        _save_from_all({"first_fisher": first_fisher,
                        "ewc": ewc.fishers[0], "omega": si.omega, "penalty": penalty,
                        "projected": agem.projected, "memory": agem.memory.x.clone(),
                        "weights": lay.full_state()}, world, out)


def test_importances_are_averaged_so_every_rank_holds_the_same_penalty(tmp_path):
    a, b = _on_two_ranks(_importance_worker, tmp_path, "importance")
    # the shards differ, so their own Fishers differ ...
    assert any(not torch.allclose(a["first_fisher"][k], b["first_fisher"][k]) for k in a["ewc"])
    for k in a["ewc"]:
        # ... and EWC holds their mean on both ranks
        mean = (a["first_fisher"][k] + b["first_fisher"][k]) / 2
        torch.testing.assert_close(a["ewc"][k], mean, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(b["ewc"][k], a["ewc"][k], rtol=0, atol=0)
        torch.testing.assert_close(b["omega"][k], a["omega"][k], rtol=0, atol=0)
    assert a["penalty"] == b["penalty"] > 0
    assert a["projected"] == b["projected"] > 0  # the same projection decision every step
    assert not torch.equal(a["memory"], b["memory"])  # replay memory is per rank
    for k in a["weights"]:  # and the replicas never drift apart
        torch.testing.assert_close(a["weights"][k], b["weights"][k], rtol=0, atol=0)


def _every_strategy_worker(rank: int, world: int, init: str, out: str) -> None:
    """Each registered strategy over 2 tasks on DDP, as cluster/continual.py runs them."""
    from atoll.cluster.parallel import build
    from atoll.continual import STRATEGIES, build_strategy
    from atoll.continual.base import distribute
    from atoll.core.loop import train_task
    from atoll.core.spec import load_spec

    with spawned_rank(rank, world, init):
        drift = {}
        for name in STRATEGIES:
            spec = load_spec(None, [f"continual.strategy={name}", "continual.replay.size=16",
                                    "continual.agem.size=16", "continual.ewc.fisher_samples=32"])
            lay = build("ddp", _model(), torch.device("cpu"))
            strategy = build_strategy(spec)
            distribute(strategy, lambda t, lay=lay: lay.reduce(t) / world)
            for task in range(2):
                opt = torch.optim.SGD(lay.model.parameters(), lr=0.1)
                train_task(lay.model, _task_shard(task, rank, world), None, opt,
                           torch.nn.CrossEntropyLoss(), LoopConfig(epochs=1, progress="off"),
                           TrainState(), 3,
                           strategy=strategy, task=task, reduce=lay.reduce, no_sync=lay.no_sync)
            drift[name] = lay.full_state()
        _save_from_all(drift, world, out)


def test_every_strategy_trains_on_ddp_without_replicas_drifting_apart(tmp_path):
    from atoll.continual import STRATEGIES

    a, b = _on_two_ranks(_every_strategy_worker, tmp_path, "every")
    assert set(a) == set(STRATEGIES)
    for name in STRATEGIES:
        for k in a[name]:
            torch.testing.assert_close(a[name][k], b[name][k], rtol=0, atol=0, msg=name)


# ---------------------------------------------------------------- evaluation shards, precision

VAL = 1025  # odd: the ranks' every-other-row shards differ by one row


def _val() -> Split:
    g = torch.Generator().manual_seed(5)
    return Split(torch.randn(VAL, 10, generator=g), torch.randint(0, 3, (VAL,), generator=g))


def _eval_worker(rank: int, world: int, init: str, strategy: str, out: str) -> None:
    """Evaluation of an odd-sized validation set as cluster/worker.py shards it."""
    from atoll.cluster.parallel import build, even_shard

    with spawned_rank(rank, world, init):
        pipeline = strategy == "hybrid"
        lay = build(strategy, _model(), torch.device("cpu"), stages=2, schedule="gpipe",
                    microbatches=4, batch=BATCH // 2)
        shard = even_shard(_val(), lay.dp_rank, lay.dp_size)
        # FSDP at the default eval_batch_size 512: 513 rows (2 batches) on rank 0 and 512
        # (1 batch) on rank 1 unless padded; hybrid: 33 and 32 batches per replica
        batches = Batches(shard, BATCH // 2 if pipeline else 512, shuffle=False)
        metrics = evaluate(lay.model, batches, torch.nn.CrossEntropyLoss(), 3,
                           reduce=lay.reduce, pipe=lay.pipe)
        if rank == 0:
            torch.save(metrics, out)


def _spawn_with_deadline(fn, args: tuple, nprocs: int, seconds: float) -> None:
    """mp.spawn that fails (and kills its ranks by pid) instead of hanging on a deadlock."""
    ctx = mp.spawn(fn, args=args, nprocs=nprocs, join=False)
    deadline = time.monotonic() + seconds
    while not ctx.join(timeout=1):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                if p.is_alive():
                    os.kill(p.pid, signal.SIGKILL)
            pytest.fail(f"{fn.__name__} did not finish in {seconds:.0f}s (deadlock)")


@pytest.mark.parametrize(("strategy", "world"), [("fsdp", 2), ("hybrid", 4)])
def test_sharded_evaluation_of_an_odd_validation_set_counts_every_sample_once(
        tmp_path, strategy, world):
    """Item 6: every rank runs the same number of evaluation batches (FSDP2's forward is
    collective); the padding is left out, so the metrics equal one process's."""
    out = tmp_path / f"eval-{strategy}.pt"
    _spawn_with_deadline(_eval_worker, (world, f"file://{tmp_path / 'rdzv'}", strategy,
                                        str(out)), world, 120)
    got = torch.load(out, weights_only=False)
    single = evaluate(_model(), Batches(_val(), 100, shuffle=False),
                      torch.nn.CrossEntropyLoss(), 3)
    assert set(got) == set(single)
    for k, v in single.items():
        assert abs(got[k] - v) < 1e-5, (k, got[k], v)


def _precision_worker(rank: int, world: int, init: str, out: str) -> None:
    """Dtypes a pipeline stage computes in, in training and in evaluation, under bf16."""
    from atoll.cluster.parallel import build

    with spawned_rank(rank, world, init):
        lay = build("pipeline", _model(), torch.device("cpu"), stages=2, schedule="1f1b",
                    microbatches=4, batch=BATCH)
        seen: dict[bool, set] = {True: set(), False: set()}
        for m in lay.base.modules():
            if isinstance(m, torch.nn.Linear):
                m.register_forward_hook(
                    lambda mod, i, o: seen[mod.training].add(str(o.dtype)))
        cfg = LoopConfig(progress="off", autocast_dtype=torch.bfloat16)
        batches = Batches(_data(), BATCH, shuffle=True, seed=3, drop_last=True)
        opt = torch.optim.SGD(lay.model.parameters(), lr=0.1)
        train_epoch(lay.model, batches, opt, torch.nn.CrossEntropyLoss(), cfg, TrainState(),
                    reduce=lay.reduce, pipe=lay.pipe)
        evaluate(lay.model, Batches(_data(), BATCH, shuffle=False),
                 torch.nn.CrossEntropyLoss(), 3, reduce=lay.reduce, pipe=lay.pipe,
                 autocast_dtype=torch.bfloat16)
        _save_from_all({"train": sorted(seen[True]), "eval": sorted(seen[False])}, world, out)


def test_pipeline_trains_and_evaluates_in_one_precision(tmp_path):
    """Item 11: `train.precision: bf16` on a pipeline: training ran in fp32 (the schedule
    was outside autocast) while evaluation ran in bf16."""
    for stage in _on_two_ranks(_precision_worker, tmp_path, "precision"):
        assert stage["train"] == stage["eval"] == ["torch.bfloat16"], stage


def _inf_loss_worker(rank: int, world: int, init: str, out: str) -> None:
    """DDP, fused SGD, regression: rank 1's 3rd batch holds a target whose squared error
    overflows to inf while its gradient stays finite."""
    from atoll.cluster.parallel import build
    from atoll.core.loop import NonFiniteLoss
    from atoll.core.optim import build_optimizer
    from atoll.core.spec import OptimSpec

    with spawned_rank(rank, world, init):
        torch.manual_seed(1)
        lay = build("ddp", torch.nn.Linear(4, 1), torch.device("cpu"))
        g = torch.Generator().manual_seed(rank)
        x, y = torch.randn(32, 4, generator=g), torch.randn(32, 1, generator=g)
        if rank == 1:
            y[9] = 3e19  # batch 3 of 8 (batch size 4)
        opt = build_optimizer(lay.model.parameters(), OptimSpec(name="sgd", lr=0.01))
        try:
            train_epoch(lay.model, Batches(Split(x, y), 4, shuffle=False), opt,
                        torch.nn.MSELoss(), LoopConfig(progress="off", log_every_n_steps=8),
                        TrainState(), reduce=lay.reduce)
            raised = None
        except NonFiniteLoss as e:
            raised = str(e)
        torch.save({"raised": raised, "state": lay.full_state()}, f"{out}.{rank}")


def test_a_non_finite_loss_on_one_rank_stops_every_rank_at_its_step(tmp_path):
    """The ranks agree on the non-finite flag at the step it happens (not only when it is
    read): every rank skips from there, the replicas never drift apart, and every rank
    names that step."""
    out = tmp_path / "inf.pt"
    _spawn_with_deadline(_inf_loss_worker, (2, f"file://{tmp_path / 'rdzv-inf'}", str(out)), 2, 180)
    ranks = [torch.load(f"{out}.{r}", weights_only=True) for r in range(2)]
    for r in ranks:
        assert r["raised"] is not None and "at epoch 1, step 2" in r["raised"], r["raised"]
        assert "non-finite loss inf" in r["raised"], r["raised"]
    for k, v in ranks[0]["state"].items():
        assert torch.equal(v, ranks[1]["state"][k]), k


def test_compiled_ddp_trains_like_ddp(tmp_path):
    """train.compile under DDP compiles the DDP module (graphs split at its buckets): the
    same weights as eager DDP, and the state dict keeps its keys."""
    eager = _spawn(tmp_path, "ddp", epochs=2)
    compiled = _spawn(tmp_path, "ddp+compile", epochs=2)
    assert list(compiled) == list(eager)
    for k, v in eager.items():
        torch.testing.assert_close(compiled[k], v, rtol=1e-4, atol=1e-5)


def test_sync_batchnorm_on_gpus_only():
    from atoll.cluster.parallel import sync_batchnorm

    def net() -> torch.nn.Module:
        return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8))

    on_gpu = sync_batchnorm(net(), torch.device("cuda", 0))  # a module swap: no GPU needed
    assert isinstance(on_gpu[1], torch.nn.SyncBatchNorm)
    assert list(on_gpu.state_dict()) == list(net().state_dict())
    assert type(sync_batchnorm(net(), torch.device("cpu"))[1]) is torch.nn.BatchNorm1d
