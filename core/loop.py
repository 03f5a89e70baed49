"""THE training loop: `train_epoch`, `evaluate` and `train_task`.

Local runs, Ray Train workers and Flower clients all call these functions; a harness that
needs something more gets a parameter or a hook here, never a loop of its own.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import torch
import torch.nn as nn

from atoll.core import interrupts
from atoll.core.metrics import (
    confusion,
    from_confusion,
    from_regression_sums,
    is_regression,
    regression_sums,
)
from atoll.core.progress import Progress

if TYPE_CHECKING:  # the protocol lives in continual/, which depends on core/, not back
    from atoll.continual.base import Strategy

log = logging.getLogger("atoll")

Batch = tuple[torch.Tensor, torch.Tensor]
# Sums a tensor across ranks in place (cluster mode); identity in a single process.
Reducer = Callable[[torch.Tensor], torch.Tensor]
StepHook = Callable[[int, dict[str, float]], None]
# Per-sample allowed classes (task-incremental learning): labels -> bool[batch, classes].
MaskFn = Callable[[torch.Tensor], torch.Tensor]


class PipelineStep(Protocol):
    """A model split over ranks (cluster/pipeline.py): the schedule runs forward+backward.

    Every rank of a pipeline calls these with the same batches; only the last stage gets
    logits back (others None).
    """

    def train(self, x: torch.Tensor, y: torch.Tensor,
              crit: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
              ) -> tuple[torch.Tensor | None, torch.Tensor]: ...

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor | None: ...

    def agree(self, values: torch.Tensor) -> torch.Tensor: ...


# The label of an evaluation row that only pads a rank's shard to the common length
# (cluster.parallel.even_shard): it runs through the forward, so every rank makes the same
# collective calls, and is left out of every count.
PAD_LABEL = -1


class NonFiniteLoss(RuntimeError):
    """The loss (or a gradient) became NaN/inf; the optimizer never applied it, so the
    weights stay finite (see train_epoch for when it is raised)."""

    def __init__(self, epoch: int, step: int, value: float, what: str = "loss"):
        self.epoch, self.step, self.value, self.what = epoch, step, value, what
        found = f"non-finite loss {value}" if what == "loss" else \
            "non-finite gradient (this rank's loss was finite; under DDP it may be another " \
            "rank's loss)"
        super().__init__(
            f"{found} at epoch {epoch}, step {step}; training stopped. "
            "Lower optim.lr, set optim.grad_clip, or check the data for NaNs")

    def __reduce__(self) -> tuple[type, tuple[int, int, float, str]]:
        # Ray pickles a worker's exception to the driver; the default reduce would call
        # __init__ with the message alone and turn this into a TypeError.
        return type(self), (self.epoch, self.step, self.value, self.what)


@dataclass
class LoopConfig:
    """How to step, taken from spec.optim/spec.train by the harness."""

    epochs: int = 1
    grad_accum_steps: int = 1
    grad_clip: float | None = None
    log_every_n_steps: int = 10
    autocast_dtype: torch.dtype | None = None
    progress: str = "auto"
    early_stopping_metric: str = "val_loss"
    early_stopping_mode: str = "min"
    patience: int = 0
    min_delta: float = 0.0


@dataclass
class TrainState:
    """Counters that a checkpoint must carry for an exact resume."""

    epoch: int = 0  # completed epochs
    global_step: int = 0  # optimizer steps taken
    best_metric: float | None = None
    best_epoch: int = -1
    bad_epochs: int = 0
    stopped_early: bool = False
    history: list[dict[str, float]] = field(default_factory=list)

    def state_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)


def unwrap(model: nn.Module) -> nn.Module:
    """The user's module under DDP/other wrappers (penalties use its parameter names)."""
    return model.module if hasattr(model, "module") else model


def _device_of(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def _masked(logits: torch.Tensor, y: torch.Tensor, mask: MaskFn | None) -> torch.Tensor:
    """Logits of classes outside a sample's task set to -inf (they get no probability)."""
    if mask is None:
        return logits
    return logits.masked_fill(~mask(y).to(logits.device), float("-inf"))


def _autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def train_epoch(
    model: nn.Module,
    batches: Iterable[Batch],
    optimizer: torch.optim.Optimizer,
    loss_fn: nn.Module,
    cfg: LoopConfig,
    state: TrainState,
    *,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
    strategy: Strategy | None = None,
    task: Any = None,
    reduce: Reducer | None = None,
    on_step: StepHook | None = None,
    no_sync: Callable[[], contextlib.AbstractContextManager] | None = None,
    logit_mask: MaskFn | None = None,
    pipe: PipelineStep | None = None,
) -> dict[str, float]:
    """One pass over `batches`; returns train_loss/train_accuracy/samples/seconds.

    No host sync per step: loss sums, hits and a non-finite flag stay on the device and are
    read once per logging interval (`cfg.log_every_n_steps` optimizer steps) and at the end.
    A non-finite loss or gradient sets the flag and the optimizer skips that step and every
    later one on the device (a fused optimizer's `found_inf`, as GradScaler does), so NaN
    never reaches the weights; the next read raises NonFiniteLoss naming the first bad step.
    Under DDP a bad loss NaNs its rank's gradient, which the all-reduce spreads: every rank
    flags the same step without a collective of its own, and all of them stop together.
    An optimizer without a fused kernel, FSDP2 and pipelines are checked on the host at
    every step instead (the ranks agree on the loss and on the gradients).
    `no_sync` (DDP's `model.no_sync`) skips the gradient all-reduce on accumulation
    micro-steps.
    """
    if pipe is not None and cfg.grad_accum_steps > 1:
        raise ValueError("train.grad_accum_steps: pipelines accumulate over "
                         "cluster.microbatches; allowed: 1")
    model.train()
    device = _device_of(model)
    source = strategy.batches(batches, task) if strategy is not None else batches
    total = len(batches) if hasattr(batches, "__len__") else 0
    bar = Progress(total, f"epoch {state.epoch + 1}/{cfg.epochs}", cfg.progress)
    guard = _Guard(optimizer, device, deferred=pipe is None, start=state.global_step,
                   reduce=reduce)
    stats = torch.zeros(2, dtype=torch.float64, device=device)  # loss·n, correct
    sums = [0.0, 0.0]  # the same on the host (guard.host)
    count = 0  # samples: a host number, known without asking the device
    regression = is_regression(loss_fn)
    accum = cfg.grad_accum_steps
    t0 = time.perf_counter()
    optimizer.zero_grad(set_to_none=True)
    # made once: a small model's step is short enough for per-step Python to show
    amp = _autocast(device, cfg.autocast_dtype)  # the precision evaluate uses
    nothing = contextlib.nullcontext()
    group, last_micro = 1, True
    for i, (x, y) in enumerate(source):
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        if accum > 1:
            group_start = (i // accum) * accum
            group = min(accum, total - group_start) if total else accum
            last_micro = (i - group_start) == group - 1
        ctx = no_sync() if (no_sync is not None and not last_micro) else nothing
        if pipe is not None:
            with amp:
                logits, loss, value = _pipe_step(pipe, model, x, y, loss_fn, strategy,
                                                 logit_mask)
            if not math.isfinite(value):  # every rank agrees: all stop before the step
                raise NonFiniteLoss(state.epoch + 1, state.global_step, value)
            objective = torch.tensor(value)
        else:
            with ctx:
                with amp:
                    logits = _masked(model(x).float(), y, logit_mask)
                    loss = loss_fn(logits, y)
                    extra = strategy.penalty(unwrap(model)) if strategy is not None else None
                    objective = loss + extra if extra is not None else loss
                objective = guard.loss(objective, state)
                (objective / group if group > 1 else objective).backward()
        if logits is not None:  # a pipeline's earlier stages count nothing (no graph: argmax
            n = y.shape[0]      # and a detached loss)
            count += n
            if guard.host:  # the same float64 sums, in host numbers
                sums[0] += (guard.last if loss is objective else float(loss.detach())) * n
                if not regression:
                    sums[1] += int((logits.argmax(1) == y).sum())
            else:
                stats[0] += loss.detach().double() * n
                if not regression:
                    stats[1] += (logits.argmax(1) == y).sum()
        if not last_micro:
            bar.update(1)
            continue
        if strategy is not None:
            strategy.after_backward(unwrap(model))
        if cfg.grad_clip is not None:
            _clip(model, cfg.grad_clip, pipe)
        guard.step(model, state)
        optimizer.zero_grad(set_to_none=True)
        if scheduler is not None:
            scheduler.step()
        state.global_step += 1
        if state.global_step % cfg.log_every_n_steps == 0:
            value = guard.check(state, objective)  # the interval's one host read
            bar.update(1, loss=value)
            if on_step is not None:
                # step_*: the epoch rows hold train_loss and lr, at step = epoch; one key
                # for both would mix two series (and collide where a step equals an epoch)
                on_step(state.global_step, {"step_loss": value,
                                            "step_lr": optimizer.param_groups[0]["lr"]})
        else:
            bar.update(1)
    guard.check(state, None)
    stats = torch.cat([stats.cpu() + torch.tensor(sums, dtype=torch.float64),
                       torch.tensor([float(count)], dtype=torch.float64)])
    if reduce is not None:
        stats = reduce(stats)
    seconds = time.perf_counter() - t0
    loss_sum, correct, count = stats.tolist()
    n = max(count, 1.0)
    out = {"train_loss": loss_sum / n, "train_accuracy": correct / n, "samples": count,
           "seconds": seconds, "samples_per_s": count / max(seconds, 1e-9)}
    if regression:
        del out["train_accuracy"]
    bar.close()
    return out


class _Guard:
    """Keeps non-finite losses and gradients out of the weights without a per-step sync.

    `bad` is a sticky device flag; `first` holds the step, the objective and the kind
    (0 loss, 1 gradient) of the first bad step. A fused optimizer (torch's
    `_step_supports_amp_scaling`) takes the flag as `found_inf` and leaves parameters and
    state untouched when it is set. A non-finite loss also makes its backward NaN (a loss
    can overflow while its gradient stays finite), so under DDP the all-reduced gradient
    carries it to every rank: all of them flag the same step with no collective of their
    own.

    On a CPU the same bookkeeping is kept in host numbers (`host`): reading a CPU tensor
    waits for nothing, and the device flags' dozen small ops per step cost a small model
    about as much as its own forward and backward (benchmarks/ddp_overhead.py); a bad
    step is skipped on the host.
    """

    LOSS, GRADIENT = 0.0, 1.0

    def __init__(self, optimizer: torch.optim.Optimizer, device: torch.device, deferred: bool,
                 start: int, reduce: Reducer | None):
        self.optimizer, self.reduce = optimizer, reduce
        self.deferred = deferred and _fused(optimizer)
        self.host = self.deferred and _reads_are_free(device)
        self.start = start  # the global step this epoch began at
        # host: the sticky flag, (step, value, kind) of the first bad step, steps, last value
        self.h_bad, self.h_first, self.h_steps = False, (math.nan,) * 3, 0
        self.last = math.nan
        self.bad = torch.zeros((), dtype=torch.float32, device=device)
        self.first = torch.full((3,), math.nan, dtype=torch.float64, device=device)
        self.steps = torch.zeros((), dtype=torch.float64, device=device)
        self.one = torch.ones((), dtype=torch.float32, device=device)
        self.found = torch.zeros((), dtype=torch.float32, device=device)
        self.params: list[torch.Tensor] | None = None
        self.nan = torch.full((), math.nan, dtype=torch.float32, device=device)

    def loss(self, objective: torch.Tensor, state: TrainState) -> torch.Tensor:
        """Check `objective`; returns what to back-propagate (NaN-scaled when it is bad)."""
        if not self.deferred:  # the host check before every backward (see train_epoch)
            value = float(objective.detach())
            if self.reduce is not None:  # any rank's NaN/inf makes the sum non-finite
                agreed = float(self.reduce(torch.tensor([value], dtype=torch.float64))[0])
                if not math.isfinite(agreed):
                    value = value if not math.isfinite(value) else agreed
                    raise NonFiniteLoss(state.epoch + 1, state.global_step, value)
            elif not math.isfinite(value):
                raise NonFiniteLoss(state.epoch + 1, state.global_step, value)
            return objective
        if self.host:
            self.last = value = float(objective.detach())
            if math.isfinite(value):
                return objective
            self._host_flag(value, self.LOSS)
            return objective * math.nan  # its backward NaNs this rank's gradients
        now = ~torch.isfinite(objective.detach())
        self._flag(now, objective, self.LOSS)
        return objective * torch.where(now, self.nan, self.one)

    def _flag(self, now: torch.Tensor, objective: torch.Tensor, kind: float) -> None:
        new = now & (self.bad == 0)
        here = torch.stack([self.steps, objective.detach().double().reshape(()),
                            torch.full((), kind, dtype=torch.float64, device=self.bad.device)])
        self.first.copy_(torch.where(new, here, self.first))
        self.bad.copy_(torch.maximum(self.bad, now.float()))

    def _host_flag(self, value: float, kind: float) -> None:
        if not self.h_bad:
            self.h_bad, self.h_first = True, (float(self.h_steps), value, kind)

    def _grads_bad(self, model: nn.Module) -> torch.Tensor:
        """1.0 where any gradient is NaN/inf (0-dim, on the device), else 0.0."""
        if self.params is None:  # walking the module tree costs more than the check
            self.params = [p for p in model.parameters() if p.requires_grad]
        by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
        for p in self.params:
            if p.grad is not None:
                by_dtype.setdefault(p.grad.dtype, []).append(p.grad)
        found = self.found.zero_()
        for grads in by_dtype.values():
            torch._amp_foreach_non_finite_check_and_unscale_(grads, found, self.one)
        return found

    def step(self, model: nn.Module, state: TrainState) -> None:
        if not self.deferred:  # this path syncs every step anyway: the gradients too
            found = self._grads_bad(model).double().reshape(1)
            if self.reduce is not None:  # sharded (FSDP2) or staged (pipeline) gradients:
                found = self.reduce(found)  # every rank stops, or none does
            if float(found[0]) > 0:
                raise NonFiniteLoss(state.epoch + 1, state.global_step, math.nan, "gradient")
            self.optimizer.step()
            return
        if self.host:  # an overflowing gradient (a NaN on any rank, after the all-reduce)
            if float(self._grads_bad(model)) > 0:
                self._host_flag(math.nan, self.GRADIENT)
            if not self.h_bad:
                self.optimizer.step()
            self.h_steps += 1
            return
        # an overflowing gradient (a NaN on any rank, after DDP's all-reduce)
        self._flag(self._grads_bad(model) > 0, torch.full((), math.nan, device=self.bad.device),
                   self.GRADIENT)
        self.optimizer.found_inf = self.bad  # type: ignore[attr-defined]
        try:
            self.optimizer.step()
        finally:
            del self.optimizer.found_inf  # type: ignore[attr-defined]
        self.steps += 1

    def check(self, state: TrainState, objective: torch.Tensor | None) -> float:
        """Read the flag (and the current objective) once; raise if any rank saw a bad
        step. Returns the objective's value (NaN when none is given)."""
        if not self.deferred:
            return float(objective.detach()) if objective is not None else math.nan
        if self.host:
            bad, (first_step, first_value, kind) = float(self.h_bad), self.h_first
            value = self.last if objective is not None else math.nan
        else:
            packed = torch.cat([self.bad.double().reshape(1), self.first,
                                (objective.detach().double().reshape(1) if objective is not None
                                 else torch.full((1,), math.nan, dtype=torch.float64,
                                                 device=self.bad.device))]).cpu()
            bad, first_step, first_value, kind, value = packed.tolist()
        if self.reduce is not None:  # which rank's loss it was: every rank names it
            lossy = bad > 0 and kind == self.LOSS
            agreed = self.reduce(torch.tensor([bad, float(lossy), first_value if lossy else 0.0],
                                              dtype=torch.float64)).tolist()
            bad = agreed[0]
            if agreed[1] > 0:
                kind, first_value = self.LOSS, agreed[2]
        if bad > 0:
            step = self.start + int(first_step) if math.isfinite(first_step) \
                else state.global_step
            raise NonFiniteLoss(state.epoch + 1, step, first_value,
                                "gradient" if kind == self.GRADIENT else "loss")
        return value


def _reads_are_free(device: torch.device) -> bool:
    """A CPU tensor's value is read without waiting for a queue of kernels."""
    return device.type == "cpu"


def _fused(optimizer: torch.optim.Optimizer) -> bool:
    """Whether `optimizer.step` honours `found_inf` (torch's fused kernels)."""
    return bool(getattr(optimizer, "_step_supports_amp_scaling", False)) and all(
        g.get("fused") for g in optimizer.param_groups)


def _clip(model: nn.Module, max_norm: float, pipe: PipelineStep | None) -> None:
    """Clip by the global gradient norm; a pipeline sums its stages' squared norms."""
    if pipe is None:
        torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
        return
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    local = sum((g.detach().double().pow(2).sum().cpu() for g in grads),
                torch.zeros((), dtype=torch.float64))
    total = float(pipe.agree(local.reshape(1))[0]) ** 0.5
    if total > max_norm:
        torch._foreach_mul_(grads, max_norm / (total + 1e-6))


def _pipe_step(pipe: PipelineStep, model: nn.Module, x: torch.Tensor, y: torch.Tensor,
               loss_fn: nn.Module, strategy: Strategy | None, mask: MaskFn | None
               ) -> tuple[torch.Tensor | None, torch.Tensor, float]:
    """One pipelined step; the objective every rank agrees on (loss + all stages' penalties).

    A stage's penalty covers its own parameters; its gradient is added to `.grad` directly
    (autograd.grad), outside the wrapped module's backward hooks.
    """
    logits, loss = pipe.train(x, y, lambda out, t: loss_fn(_masked(out.float(), t, mask), t))
    extra = strategy.penalty(unwrap(model)) if strategy is not None else None
    penalty = torch.zeros((), dtype=torch.float64)
    if extra is not None:
        params = [p for p in unwrap(model).parameters() if p.requires_grad]
        for p, g in zip(params, torch.autograd.grad(extra, params, allow_unused=True),
                        strict=True):
            if g is not None:
                p.grad = g if p.grad is None else p.grad + g
        penalty = extra.detach().to("cpu", torch.float64)
    value = float(pipe.agree(torch.stack([loss.reshape(()), penalty])).sum())
    return logits, loss, value


@torch.no_grad()
def evaluate(
    model: nn.Module,
    batches: Iterable[Batch],
    loss_fn: nn.Module,
    num_classes: int,
    *,
    prefix: str = "val",
    reduce: Reducer | None = None,
    autocast_dtype: torch.dtype | None = None,
    logit_mask: MaskFn | None = None,
    pipe: PipelineStep | None = None,
) -> dict[str, float]:
    """Loss, accuracy and macro precision/recall/F1 of `model` on `batches`.

    Under a `pipe` only the last stage sees logits; `reduce` brings the counts together.
    Rows labelled PAD_LABEL (a rank's shard padded to the common length) are run through
    the model and then dropped.
    """
    was_training = model.training
    model.eval()
    device = _device_of(model)
    regression = is_regression(loss_fn)
    # sums stay on the device; the only per-batch read is whether a batch holds padding
    sums = torch.zeros(5, dtype=torch.float64, device=device)  # metrics.regression_sums
    cm = torch.zeros(num_classes, num_classes, dtype=torch.float64, device=device)
    loss_sum = torch.zeros(1, dtype=torch.float64, device=device)
    for x, y in batches:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with _autocast(device, autocast_dtype):
            out = pipe.forward(x, y) if pipe is not None else model(x)
        if out is None:
            continue
        real = ~torch.isnan(y) if y.is_floating_point() else y != PAD_LABEL
        if not bool(real.all()):
            out, y = out[real], y[real]
            if y.numel() == 0:
                continue
        logits = _masked(out.float(), y, logit_mask)
        loss_sum += loss_fn(logits, y).double() * y.shape[0]
        if regression:
            sums += regression_sums(logits, y, loss_fn.y_std)
        else:
            cm += confusion(logits.argmax(1), y, num_classes).double()
    loss_sum, sums, cm = loss_sum.cpu(), sums.cpu(), cm.cpu()
    if reduce is not None:
        packed = reduce(torch.cat([loss_sum, sums, cm.flatten()]))
        loss_sum, sums, cm = packed[:1], packed[1:6], packed[6:].reshape(num_classes,
                                                                          num_classes)
    model.train(was_training)
    n = sums[4].item() if regression else cm.sum().item()
    if n == 0:
        return {}
    out = {f"{prefix}_loss": loss_sum.item() / n}
    found = from_regression_sums(sums, loss_fn.y_std) if regression else from_confusion(cm)
    out.update({f"{prefix}_{k}": v for k, v in found.items()})
    return out


def _improved(cfg: LoopConfig, value: float, best: float | None) -> bool:
    if best is None:
        return True
    if cfg.early_stopping_mode == "min":
        return value < best - cfg.min_delta
    return value > best + cfg.min_delta


def train_task(
    model: nn.Module,
    train: Any,
    val: Iterable[Batch] | None,
    optimizer: torch.optim.Optimizer,
    loss_fn: nn.Module,
    cfg: LoopConfig,
    state: TrainState,
    num_classes: int,
    *,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
    strategy: Strategy | None = None,
    task: Any = None,
    reduce: Reducer | None = None,
    on_step: StepHook | None = None,
    on_epoch_end: Callable[[TrainState, dict[str, float]], None] | None = None,
    no_sync: Callable[[], contextlib.AbstractContextManager] | None = None,
    logit_mask: MaskFn | None = None,
    task_boundaries: bool = True,
    pipe: PipelineStep | None = None,
) -> TrainState:
    """Epochs `state.epoch .. cfg.epochs` on one task, with validation and early stopping.

    `train` is a Batches-like object (`set_epoch(e)` reshuffles). `on_epoch_end` runs after
    the state is updated: the harness checkpoints and logs there, so a checkpoint always
    holds a consistent (model, optimizer, state) triple. `task_boundaries=False` leaves
    the strategy's before_task/after_task to the harness (a federated client trains a task
    over many rounds).
    """
    if strategy is not None and state.epoch == 0 and task_boundaries:
        strategy.before_task(unwrap(model), task)
    while state.epoch < cfg.epochs and not state.stopped_early:
        if hasattr(train, "set_epoch"):
            train.set_epoch(state.epoch)
        metrics = train_epoch(model, train, optimizer, loss_fn, cfg, state, scheduler=scheduler,
                              strategy=strategy, task=task, reduce=reduce, on_step=on_step,
                              no_sync=no_sync, logit_mask=logit_mask, pipe=pipe)
        if val is not None:
            metrics.update(evaluate(model, val, loss_fn, num_classes, reduce=reduce,
                                    autocast_dtype=cfg.autocast_dtype, logit_mask=logit_mask,
                                    pipe=pipe))
        metrics["lr"] = optimizer.param_groups[0]["lr"]
        state.epoch += 1
        watched = metrics.get(cfg.early_stopping_metric)
        if watched is None and cfg.patience > 0:
            raise ValueError(
                f"train.early_stopping.metric: {cfg.early_stopping_metric!r} is not a metric "
                f"this run produces; allowed: {', '.join(sorted(metrics))}")
        if watched is not None:
            if _improved(cfg, watched, state.best_metric):
                state.best_metric, state.best_epoch, state.bad_epochs = watched, state.epoch, 0
            else:
                state.bad_epochs += 1
                state.stopped_early = 0 < cfg.patience <= state.bad_epochs
        state.history.append({"epoch": float(state.epoch), **metrics})
        if cfg.progress != "off":
            shown = ("train_loss", "train_accuracy", "val_loss", "val_accuracy", "lr")
            log.info("epoch %d/%d %s (%.1fs)", state.epoch, cfg.epochs,
                     " ".join(f"{k}={metrics[k]:.4g}" for k in shown if k in metrics),
                     metrics["seconds"])
        if on_epoch_end is not None:
            on_epoch_end(state, metrics)
        interrupts.check()  # a Ctrl-C that a library swallowed mid-epoch
    if strategy is not None and task_boundaries:
        strategy.after_task(unwrap(model), task, train)
    return state
