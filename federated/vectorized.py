"""Local training of many clients as one batched computation (`federated.engine: vectorized`).

Why: Flower's simulation pays, per client and round, for an actor call, message
serialisation and a Python loop over a few tiny batches. Here the sampled clients'
parameters are stacked along a leading client dimension, the forward is
`torch.func.functional_call` under `vmap`, the clients' losses are summed and
back-propagated once (each client's slice of the gradient is its own gradient), and the
optimizer update — element-wise for SGD, momentum, Nesterov, Adam, AdamW and weight decay —
is applied to the stacked tensors with a per-client mask and per-client step counts.

What each client trains on is what `federated.task.local_train` gives it: the same batch
order (`core.data.Batches`' seeded permutation per client, round and epoch), the same
loss (`federation_loss`: class weights and label smoothing included) and the same update
rules, so the result equals training the clients one by one (to float rounding).
Clients with fewer samples have fewer steps: a client without a batch at a step is
masked out of that step (its parameters, moments and step count stay), and the last,
short batch of a client is padded with samples of weight zero.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call, vmap

from atoll.core.data import Batches, Split


@dataclass
class LocalRule:
    """How every client of a round trains: what `task.local_train` takes from the spec
    and the server's round config."""

    optimizer: str  # sgd | adam | adamw
    lr: float
    epochs: int
    batch_size: int
    weight_decay: float = 0.0
    momentum: float = 0.0
    nesterov: bool = False
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    grad_clip: float | None = None
    proximal_mu: float = 0.0


@dataclass
class ClientResult:
    """One client's trained state and its last epoch's metrics; `error` if it failed."""

    state: dict[str, torch.Tensor] | None
    metrics: dict[str, float] = field(default_factory=dict)
    error: str = ""


def _per_sample(loss_fn: nn.Module) -> tuple[object, bool]:
    """(f(logits, y) -> (terms, weights), regression?): per-sample terms whose sum over a
    batch divided by the sum of the weights is `loss_fn`'s mean (a weighted cross-entropy
    divides by the weights of the targets, torch's `reduction="mean"`)."""
    if isinstance(loss_fn, nn.CrossEntropyLoss):
        w, smooth = loss_fn.weight, loss_fn.label_smoothing

        def ce(logits: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            values = F.cross_entropy(logits, y, weight=w, label_smoothing=smooth,
                                     reduction="none")
            return values, (w[y] if w is not None else torch.ones_like(values))
        return ce, False
    if getattr(loss_fn, "regression", False):
        kind, delta = loss_fn.kind, loss_fn.delta

        def reg(out: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            out = out.reshape(y.shape)
            values = F.huber_loss(out, y, delta=delta, reduction="none") if kind == "huber" \
                else F.mse_loss(out, y, reduction="none")
            return values, torch.ones_like(values)
        return reg, True
    raise NotImplementedError(f"train.loss: {type(loss_fn).__name__} has no vectorized form; "
                              "allowed with federated.engine: vectorized: cross_entropy, mse, "
                              "huber (or federated.engine: flower)")


def _batches(splits: Sequence[Split], seeds: Sequence[int], batch_size: int, epoch: int,
             shift: int, noise_std: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Every client's batches of one epoch, in `Batches`' order, padded to the longest
    client: x (S, K, B, ...), y (S, K, B) and the sample mask (S, K, B)."""
    per_client = []
    for split, seed in zip(splits, seeds, strict=True):
        b = Batches(split, batch_size, shuffle=True, seed=seed, shift=shift,
                    noise_std=noise_std)
        b.set_epoch(epoch)
        per_client.append(list(b))
    steps = max(len(c) for c in per_client)
    first = splits[0]
    k = len(splits)
    x = torch.zeros((steps, k, batch_size, *first.x.shape[1:]), dtype=first.x.dtype)
    y = torch.zeros((steps, k, batch_size), dtype=first.y.dtype)
    mask = torch.zeros((steps, k, batch_size), dtype=torch.bool)
    for c, batches in enumerate(per_client):
        for s, (bx, by) in enumerate(batches):
            n = by.shape[0]
            x[s, c, :n], y[s, c, :n], mask[s, c, :n] = bx, by, True
    return x, y, mask


def train_clients(model: nn.Module, global_state: dict[str, torch.Tensor],
                  splits: Sequence[Split], seeds: Sequence[int], loss_fn: nn.Module,
                  rule: LocalRule, *, shift: int = 0, noise_std: float = 0.0,
                  device: torch.device | str = "cpu") -> list[ClientResult]:
    """Train one client per split from `global_state`, all at once; `seeds[k]` is the seed
    `task.local_train` would give client k's `Batches` in this round."""
    device = torch.device(device)
    per_sample, regression = _per_sample(loss_fn)
    k = len(splits)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    params = {n: global_state[n].to(device).unsqueeze(0).repeat(k, *[1] * global_state[n].dim())
              .requires_grad_(True) for n in names}
    buffers = {n: global_state[n].to(device).unsqueeze(0).repeat(
        k, *[1] * global_state[n].dim()) for n, _ in model.named_buffers()}
    anchor = {n: global_state[n].to(device) for n in names} if rule.proximal_mu > 0 else None
    opt = _Stacked(list(params.values()), rule, k, device)
    model = model.to(device)

    def one(p: dict[str, torch.Tensor], b: dict[str, torch.Tensor], x: torch.Tensor,
            y: torch.Tensor, m: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = functional_call(model, (p, b), (x,)).float()
        terms, weights = per_sample(out, y)
        loss = (terms * m).sum() / (weights * m).sum().clamp_min(1e-12)
        hits = ((out.argmax(1) == y) & m).sum() if not regression else torch.zeros(())
        return loss, hits

    forward = vmap(one, in_dims=(0, 0, 0, 0, 0), randomness="different")
    bad = torch.zeros(k, dtype=torch.bool, device=device)
    first_bad = [""] * k
    sums = torch.zeros(k, dtype=torch.float64)
    hits_sum = torch.zeros(k, dtype=torch.float64)
    counts = torch.zeros(k, dtype=torch.float64)
    for epoch in range(rule.epochs):
        x, y, mask = _batches(splits, seeds, rule.batch_size, epoch, shift, noise_std)
        sums.zero_(), hits_sum.zero_(), counts.zero_()
        for s in range(x.shape[0]):
            xs, ys, ms = x[s].to(device), y[s].to(device), mask[s].to(device)
            active = ms.any(1) & ~bad
            loss, hits = forward(params, buffers, xs, ys, ms)
            objective = loss
            if anchor is not None:
                objective = objective + 0.5 * rule.proximal_mu * sum(
                    ((params[n] - anchor[n]) ** 2).flatten(1).sum(1) for n in names)
            value = objective.detach()
            finite = torch.isfinite(value)
            for c in torch.nonzero(active & ~finite).flatten().tolist():
                first_bad[c] = f"non-finite loss {float(value[c])} at epoch {epoch + 1}, " \
                               f"step {s}"
            bad |= active & ~finite
            active &= finite
            torch.where(active, objective, torch.zeros_like(objective)).sum().backward()
            grads = [p.grad for p in params.values()]
            finite_grads = torch.stack([torch.isfinite(g).flatten(1).all(1) for g in grads]
                                       ).all(0)
            for c in torch.nonzero(active & ~finite_grads).flatten().tolist():
                first_bad[c] = f"non-finite gradient at epoch {epoch + 1}, step {s}"
            bad |= active & ~finite_grads
            active &= finite_grads
            if rule.grad_clip is not None:
                _clip(grads, rule.grad_clip)
            opt.step(active)
            for p in params.values():
                p.grad = None
            n = ms.sum(1).double().cpu()
            live = active.cpu()
            sums += torch.where(live, loss.detach().double().cpu() * n, 0.0)
            hits_sum += torch.where(live, hits.detach().double().cpu(), 0.0)
            counts += torch.where(live, n, 0.0)
    out = []
    for c in range(k):
        if bad[c]:
            out.append(ClientResult(None, error=first_bad[c]))
            continue
        state = {n: t[c].detach().cpu().clone() for n, t in {**params, **buffers}.items()}
        total = max(float(counts[c]), 1.0)
        metrics = {"train_loss": float(sums[c]) / total}
        if not regression:
            metrics["train_accuracy"] = float(hits_sum[c]) / total
        out.append(ClientResult({n: state[n] for n in global_state}, metrics))
    return out


def _clip(grads: list[torch.Tensor], max_norm: float) -> None:
    """Each client's gradient clipped by its own global norm (`clip_grad_norm_`'s rule)."""
    total = torch.stack([g.flatten(1).pow(2).sum(1) for g in grads]).sum(0).sqrt()
    coef = (max_norm / (total + 1e-6)).clamp(max=1.0)
    for g in grads:
        g.mul_(coef.reshape(-1, *[1] * (g.dim() - 1)))


class _Stacked:
    """torch's SGD/Adam/AdamW update rules on stacked tensors, one step count per client;
    a client outside `active` keeps its parameters and optimizer state unchanged."""

    def __init__(self, params: list[torch.Tensor], rule: LocalRule, k: int,
                 device: torch.device):
        self.params, self.rule = params, rule
        self.steps = torch.zeros(k, dtype=torch.float64, device=device)
        self.m = [torch.zeros_like(p) for p in params]
        self.v = [torch.zeros_like(p) for p in params] if rule.optimizer != "sgd" else []
        self.started = torch.zeros(k, dtype=torch.bool, device=device)  # momentum buffers

    @torch.no_grad()
    def step(self, active: torch.Tensor) -> None:
        r = self.rule
        self.steps += active.double()
        for i, p in enumerate(self.params):
            shape = (-1, *[1] * (p.dim() - 1))
            on = active.reshape(shape)
            g = p.grad
            if r.optimizer == "sgd":
                d = g + r.weight_decay * p if r.weight_decay else g
                if r.momentum:
                    first = (~self.started).reshape(shape)
                    buf = torch.where(first, d, r.momentum * self.m[i] + d)
                    self.m[i] = torch.where(on, buf, self.m[i])
                    d = d + r.momentum * buf if r.nesterov else buf
                p.copy_(torch.where(on, p - r.lr * d, p))
                continue
            if r.optimizer == "adamw" and r.weight_decay:
                decayed = p * (1 - r.lr * r.weight_decay)
            else:
                decayed = p
                if r.weight_decay:
                    g = g + r.weight_decay * p
            b1, b2 = r.betas
            m = torch.where(on, self.m[i] * b1 + g * (1 - b1), self.m[i])
            v = torch.where(on, self.v[i] * b2 + g * g * (1 - b2), self.v[i])
            self.m[i], self.v[i] = m, v
            t = self.steps.clamp_min(1).to(p.dtype).reshape(shape)
            bc1 = 1 - b1 ** t
            bc2 = (1 - b2 ** t).sqrt()
            denom = v.sqrt() / bc2 + r.eps
            new = decayed - (r.lr / bc1) * m / denom
            p.copy_(torch.where(on, new.to(p.dtype), p))
        if r.optimizer == "sgd" and r.momentum:
            self.started |= active


def rule_of(spec: object, lr: float, local_epochs: int, batch_size: int,
            proximal_mu: float = 0.0) -> LocalRule:
    """The `LocalRule` of a spec and a round's config, as `task.local_train` applies them."""
    o = spec.optim  # type: ignore[attr-defined]
    return LocalRule(optimizer=o.name, lr=lr, epochs=local_epochs, batch_size=batch_size,
                     weight_decay=o.weight_decay, momentum=o.momentum if o.name == "sgd" else 0,
                     nesterov=o.nesterov, betas=tuple(o.betas), grad_clip=o.grad_clip,
                     proximal_mu=proximal_mu)

