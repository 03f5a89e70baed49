"""The training loop, losses, metrics and schedules against hand-computed expectations."""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from sklearn.metrics import f1_score, precision_score, recall_score

from atoll.continual.base import BaseStrategy
from atoll.core import loop as loop_module
from atoll.core.data import Batches, Split
from atoll.core.loop import LoopConfig, NonFiniteLoss, TrainState, evaluate, train_epoch, train_task
from atoll.core.metrics import FocalLoss, build_loss, class_weights, confusion, from_confusion
from atoll.core.optim import build_optimizer, lr_factor
from atoll.core.spec import LossSpec, OptimSpec, SchedulerSpec


def _toy(n: int = 32, d: int = 5, k: int = 3, seed: int = 0) -> Split:
    g = torch.Generator().manual_seed(seed)
    return Split(torch.randn(n, d, generator=g), torch.randint(0, k, (n,), generator=g))


def test_macro_metrics_match_scikit_learn():
    g = torch.Generator().manual_seed(1)
    y = torch.randint(0, 4, (200,), generator=g)
    p = torch.where(torch.rand(200, generator=g) < 0.7, y, torch.randint(0, 4, (200,),
                                                                          generator=g))
    m = from_confusion(confusion(p, y, 4))
    assert m["accuracy"] == pytest.approx((p == y).float().mean().item())
    assert m["precision"] == pytest.approx(precision_score(y, p, average="macro"))
    assert m["recall"] == pytest.approx(recall_score(y, p, average="macro"))
    assert m["f1"] == pytest.approx(f1_score(y, p, average="macro"))


def test_confusion_by_hand():
    cm = confusion(torch.tensor([0, 1, 1, 2]), torch.tensor([0, 1, 2, 2]), 3)
    assert cm.tolist() == [[1, 0, 0], [0, 1, 0], [0, 1, 1]]
    m = from_confusion(cm)
    assert m["accuracy"] == 0.75
    assert m["recall"] == pytest.approx((1 + 1 + 0.5) / 3)
    assert m["precision"] == pytest.approx((1 + 0.5 + 1) / 3)


def test_focal_with_gamma_zero_is_cross_entropy():
    logits, y = torch.randn(8, 4), torch.randint(0, 4, (8,))
    torch.testing.assert_close(FocalLoss(0.0)(logits, y), F.cross_entropy(logits, y))
    assert FocalLoss(2.0)(logits, y) < F.cross_entropy(logits, y)


def test_balanced_class_weights():
    y = torch.tensor([0, 0, 0, 1])
    w = class_weights(LossSpec(class_weights="balanced"), y, 2)
    torch.testing.assert_close(w, torch.tensor([4 / 6, 4 / 2]))
    with pytest.raises(ValueError, match="exactly 2"):
        build_loss(LossSpec(class_weights=[1.0]), y, 2)
    loss = build_loss(LossSpec(label_smoothing=0.1, class_weights=[1.0, 3.0]), y, 2)
    assert isinstance(loss, nn.CrossEntropyLoss) and loss.label_smoothing == 0.1


def test_schedules():
    cos = SchedulerSpec(name="cosine", warmup_epochs=1)
    assert lr_factor(cos, 0, 10, 5) == pytest.approx(0.1)
    assert lr_factor(cos, 9, 10, 5) == pytest.approx(1.0)
    assert lr_factor(cos, 10, 10, 5) == pytest.approx(1.0)
    assert lr_factor(cos, 30, 10, 5) == pytest.approx(0.5)
    assert lr_factor(cos, 50, 10, 5) == pytest.approx(0.0)
    step = SchedulerSpec(name="step", step_epochs=2, gamma=0.5)
    assert [lr_factor(step, s, 10, 6) for s in (0, 19, 20, 45)] == [1, 1, 0.5, 0.25]
    lin = SchedulerSpec(name="linear", min_lr_ratio=0.2)
    assert lr_factor(lin, 25, 10, 5) == pytest.approx(0.2 + 0.8 * 0.5)
    assert lr_factor(SchedulerSpec(), 123, 10, 5) == 1.0


def test_optimizers():
    p = [nn.Parameter(torch.zeros(2))]
    sgd = build_optimizer(p, OptimSpec(name="sgd", lr=0.1, momentum=0.9, nesterov=True))
    assert isinstance(sgd, torch.optim.SGD) and sgd.defaults["nesterov"]
    assert isinstance(build_optimizer(p, OptimSpec(name="adamw")), torch.optim.AdamW)


def _sgd_run(model: nn.Module, batch: int, accum: int, clip: float | None = None) -> nn.Module:
    model = copy.deepcopy(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    cfg = LoopConfig(grad_accum_steps=accum, grad_clip=clip, progress="off")
    train_epoch(model, Batches(_toy(), batch, shuffle=False), opt, nn.CrossEntropyLoss(), cfg,
                TrainState())
    return model


def test_gradient_accumulation_equals_the_large_batch():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3))
    big = _sgd_run(model, 16, 1)
    small = _sgd_run(model, 8, 2)
    for a, b in zip(big.parameters(), small.parameters(), strict=True):
        torch.testing.assert_close(a, b)
    uneven = _sgd_run(model, 6, 3)  # 32 = 18 + 14: the last group is shorter
    assert all(torch.isfinite(p).all() for p in uneven.parameters())


def test_grad_clip_limits_the_update():
    torch.manual_seed(0)
    model = nn.Linear(5, 3)
    clipped = _sgd_run(model, 32, 1, clip=1e-3)
    delta = torch.cat([(a - b).flatten() for a, b in zip(clipped.parameters(),
                                                         model.parameters(), strict=True)])
    assert delta.norm().item() == pytest.approx(0.1 * 1e-3, rel=1e-3)


def test_non_finite_loss_raises_before_the_step():
    model = nn.Linear(5, 3)
    before = copy.deepcopy(model.state_dict())
    data = _toy()
    data.x[3] = float("nan")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    state = TrainState(epoch=2, global_step=7)
    with pytest.raises(NonFiniteLoss, match="epoch 3, step 7"):
        train_epoch(model, Batches(data, 4, shuffle=False), opt, nn.CrossEntropyLoss(),
                    LoopConfig(progress="off"), state)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, before[k])


class _Recorder(BaseStrategy):
    """Counts hook calls and adds a known penalty: 0.5·||w||²."""

    def __init__(self):
        self.calls: list[str] = []

    def before_task(self, model, task):
        self.calls.append("before_task")

    def batches(self, loader, task):
        self.calls.append("batches")
        return loader

    def penalty(self, model):
        return 0.5 * sum((p**2).sum() for p in model.parameters())

    def after_backward(self, model):
        self.calls.append("after_backward")

    def after_task(self, model, task, loader):
        self.calls.append("after_task")


def test_strategy_hooks_and_penalty_gradient():
    torch.manual_seed(0)
    model = nn.Linear(5, 3)
    ref = copy.deepcopy(model)
    s = _Recorder()
    data = _toy(8)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    cfg = LoopConfig(epochs=1, progress="off")
    train_task(model, Batches(data, 8, shuffle=False), None, opt, nn.CrossEntropyLoss(), cfg,
               TrainState(), 3, strategy=s)
    assert s.calls == ["before_task", "batches", "after_backward", "after_task"]
    # one SGD step on CE + 0.5||w||² moves w by -lr·(∇CE + w)
    loss = F.cross_entropy(ref(data.x), data.y)
    grads = torch.autograd.grad(loss, list(ref.parameters()))
    for p, p0, g in zip(model.parameters(), ref.parameters(), grads, strict=True):
        torch.testing.assert_close(p, p0 - 0.1 * (g + p0))


def test_early_stopping_and_history():
    torch.manual_seed(0)
    model = nn.Linear(5, 3)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)  # nothing improves
    cfg = LoopConfig(epochs=10, patience=2, progress="off")
    val = Batches(_toy(seed=1), 16, shuffle=False)
    state = train_task(model, Batches(_toy(), 8), val, opt, nn.CrossEntropyLoss(), cfg,
                       TrainState(), 3)
    assert state.stopped_early and state.epoch == 3 and state.best_epoch == 1
    assert [h["epoch"] for h in state.history] == [1.0, 2.0, 3.0]
    assert {"train_loss", "val_loss", "val_f1", "lr"} <= set(state.history[0])


def test_evaluate_reports_all_metrics_and_restores_mode():
    model = nn.Sequential(nn.Linear(5, 3), nn.Dropout(0.5)).train()
    out = evaluate(model, Batches(_toy(), 10, shuffle=False), nn.CrossEntropyLoss(), 3,
                   prefix="test")
    assert set(out) == {"test_loss", "test_accuracy", "test_precision", "test_recall",
                        "test_f1"}
    assert model.training


def test_an_interrupt_a_library_swallowed_still_stops_the_loop():
    """Ctrl-C raises KeyboardInterrupt wherever the main thread is; code that catches
    BaseException (a __del__, a library's cleanup) can swallow it, and the run went on to
    its last epoch. The request is remembered: the loop stops after the epoch it is in,
    with that epoch's checkpoint hook run."""
    import signal

    from atoll.core import interrupts

    model = nn.Linear(5, 3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ended: list[int] = []

    def swallow(*_: object) -> None:
        with contextlib.suppress(BaseException):  # what the library did
            interrupts.handle(signal.SIGINT, None)

    try:
        with pytest.raises(KeyboardInterrupt):
            train_task(model, Batches(_toy(), 8), None, opt, nn.CrossEntropyLoss(),
                       LoopConfig(epochs=5, progress="off", log_every_n_steps=1), TrainState(), 3,
                       on_step=swallow,
                       on_epoch_end=lambda s, m: ended.append(s.epoch))
    finally:
        interrupts.reset()
    assert ended == [1]


def _count_host_reads(monkeypatch) -> list[str]:
    """Every Tensor → Python read (each one waits for the device to finish)."""
    reads: list[str] = []
    for name in ("item", "tolist", "__float__", "__int__", "__bool__"):
        original = getattr(torch.Tensor, name)

        def counted(self, *a, _original=original, _name=name, **k):
            reads.append(_name)
            return _original(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, name, counted)
    return reads


@pytest.fixture(params=["device", "host"])
def guard_path(request, monkeypatch) -> str:
    """Both ways the loop keeps its sums and non-finite flag: on the device (what a GPU
    runs; forced here on the CPU) and in host numbers (a CPU's own way, where a read waits
    for nothing)."""
    if request.param == "device":
        monkeypatch.setattr(loop_module, "_reads_are_free", lambda device: False)
    return request.param


@pytest.mark.parametrize("interval", [4, 64])
def test_train_epoch_reads_the_device_per_logging_interval_not_per_step(monkeypatch, interval):
    """The hot path keeps loss sums, hits and the non-finite flag on the device: host reads
    grow with logging intervals, not with steps (64 steps here)."""
    monkeypatch.setattr(loop_module, "_reads_are_free", lambda device: False)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 3))
    opt = build_optimizer(model.parameters(), OptimSpec(name="sgd", lr=0.05, momentum=0.9))
    batches = Batches(_toy(n=256), 4)
    logged: list[int] = []
    reads = _count_host_reads(monkeypatch)
    train_epoch(model, batches, opt, nn.CrossEntropyLoss(),
                LoopConfig(progress="off", log_every_n_steps=interval), TrainState(),
                on_step=lambda step, m: logged.append(step))
    monkeypatch.undo()
    intervals = 64 // interval
    assert logged == [interval * (k + 1) for k in range(intervals)]
    assert len(reads) <= 2 * intervals + 4, reads  # one read per interval, a few per epoch


def test_the_host_path_trains_and_reports_exactly_what_the_device_path_does(monkeypatch):
    """On a CPU the loop reads its numbers per step instead of keeping device flags: the
    same weights, optimizer state and epoch sums, bit for bit."""
    out = {}
    for path in ("device", "host"):
        monkeypatch.setattr(loop_module, "_reads_are_free", lambda device, p=path: p == "host")
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 3))
        opt = build_optimizer(model.parameters(), OptimSpec(name="sgd", lr=0.05, momentum=0.9))
        metrics = train_epoch(model, Batches(_toy(n=256), 4, seed=1), opt,
                              nn.CrossEntropyLoss(), LoopConfig(progress="off"), TrainState())
        out[path] = (metrics, model.state_dict(), opt.state_dict()["state"])
    (m_dev, w_dev, o_dev), (m_host, w_host, o_host) = out["device"], out["host"]
    assert {k: v for k, v in m_dev.items() if "seconds" not in k and k != "samples_per_s"} == \
        {k: v for k, v in m_host.items() if "seconds" not in k and k != "samples_per_s"}
    for k in w_dev:
        assert torch.equal(w_dev[k], w_host[k]), k
    for i in o_dev:
        assert torch.equal(o_dev[i]["momentum_buffer"], o_host[i]["momentum_buffer"])


def test_a_fused_optimizer_skips_non_finite_steps_without_a_per_step_check(guard_path):
    """NaN in the 3rd batch: no check stops the step, yet no weight or optimizer state sees
    it, and the error names the step where it happened (read at the interval's end)."""
    torch.manual_seed(0)
    model = nn.Linear(5, 3)
    opt = build_optimizer(model.parameters(), OptimSpec(name="adamw", lr=0.1))
    data = _toy()
    data.x[9] = float("nan")  # batch 3 of 8 (batch size 4)
    state = TrainState(epoch=0, global_step=10)
    train_epoch(model, Batches(Split(data.x[:8], data.y[:8]), 4, shuffle=False), opt,
                nn.CrossEntropyLoss(), LoopConfig(progress="off"), state)
    state.epoch += 1
    after_two = copy.deepcopy(model.state_dict())
    moments = copy.deepcopy(opt.state_dict()["state"])
    with pytest.raises(NonFiniteLoss, match="non-finite loss nan at epoch 2, step 14"):
        train_epoch(model, Batches(data, 4, shuffle=False), opt, nn.CrossEntropyLoss(),
                    LoopConfig(progress="off", log_every_n_steps=8), state)
    assert all(torch.isfinite(v).all() for v in model.state_dict().values())
    assert not torch.equal(model.weight, after_two["weight"])  # steps 1-2 of the epoch ran
    step_count = opt.state_dict()["state"][0]["step"]
    assert float(step_count) == float(moments[0]["step"]) + 2  # later steps were skipped


class _FiniteLossNanGradient(nn.Module):
    """0 everywhere, with a NaN gradient: d√|x|/dx at x = 0."""

    def forward(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return (logits - logits.detach()).abs().sqrt().mean()


@pytest.mark.parametrize("fused", [True, False])
def test_a_non_finite_gradient_under_a_finite_loss_never_reaches_the_weights(fused, guard_path):
    """Fused (skipped on the device, read at the interval) or not (checked on the host at
    every step, e.g. an optimizer restored from a checkpoint written without `fused`):
    either way the weights stay as they were and the error says it was a gradient."""
    model = nn.Linear(5, 3)
    before = copy.deepcopy(model.state_dict())
    opt = torch.optim.SGD(model.parameters(), lr=0.1, fused=fused)
    with pytest.raises(NonFiniteLoss, match="non-finite gradient .* at epoch 1, step 0"):
        train_epoch(model, Batches(_toy(), 4, shuffle=False), opt, _FiniteLossNanGradient(),
                    LoopConfig(progress="off"), TrainState())
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_gathered_state_goes_through_the_cpu():
    """What ranks gather as objects (pipeline optimizer state, strategy state) holds CPU
    tensors only: a pickled CUDA tensor lands on the receiving rank's GPU."""
    from atoll.cluster.parallel import on_cpu

    state = {"a": [torch.ones(2, dtype=torch.bfloat16), (torch.zeros(1), 3)],
             "b": {"step": torch.tensor(4.0)}, "lr": 0.1}
    moved = on_cpu(state)
    assert moved["a"][0].device.type == "cpu" and moved["a"][0].dtype == torch.bfloat16
    assert isinstance(moved["a"][1], tuple) and moved["a"][1][1] == 3 and moved["lr"] == 0.1
    assert torch.equal(moved["b"]["step"], torch.tensor(4.0))
    if torch.cuda.is_available():  # the case it exists for
        assert on_cpu({"m": torch.ones(2, device="cuda")})["m"].device.type == "cpu"
