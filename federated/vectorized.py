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
masked out of that step (its parameters, moments and step count stay). Nothing is
padded: at each step the clients are grouped by the size of their batch (full, or a
client's short last one) and each group is one vmap call, so the loss is the client's
own loss function and batch norm sees exactly the client's batch.

Continual clients (`Strategies`) bring what `core.loop` takes from a strategy: their
batches (replay and joint mix stored samples in: a batch of another size is just another
group), the EWC and SI penalties (element-wise: stacked anchors and importances), and
SI's path integral (stacked ω, accumulated after each step). LwF and A-GEM need a second
model's outputs or a per-client gradient projection and are not vectorized.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call, vmap

from atoll.continual.ewc import EWC
from atoll.continual.si import SI
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
    kind: str = ""  # nonfinite | error


@dataclass
class Strategies:
    """Each client's continual strategy (already entered: its task's `before_task` done),
    the task it trains and the task-incremental logit mask, as `task.local_train` hands
    them to `core.loop.train_task`."""

    strategies: list[Any]
    tasks: list[Any]
    mask: Callable[[torch.Tensor], torch.Tensor] | None = None


def _epoch_batches(splits: Sequence[Split], seeds: Sequence[int], batch_size: int,
                   epoch: int, shift: int, noise_std: float, cl: Strategies | None = None
                   ) -> list[list[tuple[torch.Tensor, torch.Tensor]]]:
    """Every client's batches of one epoch, exactly as `Batches` gives them to the client
    (its seeded order, its augmentation draws), through its strategy's `batches` (replay's
    draws in the same order as the client's loop makes them)."""
    out = []
    for c, (split, seed) in enumerate(zip(splits, seeds, strict=True)):
        b = Batches(split, batch_size, shuffle=True, seed=seed, shift=shift,
                    noise_std=noise_std)
        b.set_epoch(epoch)
        out.append(list(cl.strategies[c].batches(b, cl.tasks[c]) if cl else b))
    return out


def parts_of(strategy: Any, kind: type) -> list[Any]:
    """The parts of a (possibly composite) strategy that are `kind`."""
    return [s for s in getattr(strategy, "parts", [strategy]) if isinstance(s, kind)]


def _stack(values: list[torch.Tensor | None], like: torch.Tensor, device: torch.device
           ) -> torch.Tensor:
    """Per-client tensors along dim 0 (zeros where a client has none); one tensor shared by
    every client (the server's FedEWC pairs) is broadcast, not copied K times."""
    if values and all(v is values[0] for v in values) and values[0] is not None:
        return values[0].to(device, like.dtype).unsqueeze(0)
    return torch.stack([torch.zeros_like(like) if v is None else v.to(device, like.dtype)
                        for v in values])


class _Penalties:
    """EWC's and SI's penalties of every client at once, on the stacked parameters:
    (λ/2)·Σ_t F_t(θ − θ*_t)² and c·Ω(θ − θ*)², one value per client (a client without
    the strategy, or before its first task ends, adds zero)."""

    def __init__(self, cl: Strategies, params: dict[str, torch.Tensor], device: torch.device):
        self.terms: list[tuple[float, str, torch.Tensor, torch.Tensor]] = []
        k = len(cl.strategies)
        ewcs = [next(iter(parts_of(s, EWC)), None) for s in cl.strategies]
        ewcs = [e if e is not None and e.anchors and e.cfg.lam else None for e in ewcs]
        for t in range(max((len(e.fishers) for e in ewcs if e), default=0)):
            lam = next(e.cfg.lam for e in ewcs if e)
            names = {n for e in ewcs if e and t < len(e.fishers) for n in e.fishers[t]}
            for n in sorted(names):
                pick = [(e.anchors[t][n], e.fishers[t][n]) if e and t < len(e.fishers) else
                        (None, None) for e in ewcs]
                self.terms.append((0.5 * lam, n, _stack([a for a, _ in pick], params[n][0],
                                                        device),
                                   _stack([f for _, f in pick], params[n][0], device)))
        sis = [next(iter(parts_of(s, SI)), None) for s in cl.strategies]
        for n in params:
            pick = [(si.anchor.get(n), si.omega.get(n)) if si and si.omega and si.cfg.c
                    else (None, None) for si in sis]
            if any(o is not None for _, o in pick):
                c = next(si.cfg.c for si in sis if si and si.omega and si.cfg.c)
                self.terms.append((c, n, _stack([a for a, _ in pick], params[n][0], device),
                                   _stack([o for _, o in pick], params[n][0], device)))
        self.k = k

    def __call__(self, params: dict[str, torch.Tensor]) -> torch.Tensor | None:
        if not self.terms:
            return None
        return sum(scale * (weight * (params[n] - anchor).pow(2)).reshape(self.k, -1).sum(1)
                   for scale, n, anchor, weight in self.terms)


class _PathIntegral:
    """SI's running ω of every client that has SI, stacked: ω −= g·Δθ after each step (g
    the gradient before clipping, as SI's `after_backward` records it); written back into
    each client's SI at the end, its round closed (`pause`)."""

    def __init__(self, cl: Strategies, params: dict[str, torch.Tensor], device: torch.device):
        self.sis = [next(iter(parts_of(s, SI)), None) for s in cl.strategies]
        self.on = any(self.sis)
        if not self.on:
            return
        self.has = torch.tensor([si is not None for si in self.sis], device=device)
        self.w = {n: _stack([si._w.get(n) if si else None for si in self.sis], t[0], device)
                  for n, t in params.items()}
        self.w = {n: w.expand_as(params[n]).clone() for n, w in self.w.items()}
        self.before: dict[str, torch.Tensor] = {}
        self.grad: dict[str, torch.Tensor] = {}

    def record(self, params: dict[str, torch.Tensor]) -> None:
        """Before the optimizer step: θ and g of this step."""
        if self.on:
            self.before = {n: t.detach().clone() for n, t in params.items()}
            self.grad = {n: t.grad.detach().clone() for n, t in params.items()
                         if t.grad is not None}

    def close(self, params: dict[str, torch.Tensor], active: torch.Tensor) -> None:
        if not self.on:
            return
        on = active & self.has
        for n, g in self.grad.items():
            shape = (-1, *[1] * (g.dim() - 1))
            step = g * (params[n].detach() - self.before[n])
            self.w[n] = torch.where(on.reshape(shape), self.w[n] - step, self.w[n])

    def write_back(self, ok: list[bool]) -> None:
        if not self.on:
            return
        for c, si in enumerate(self.sis):
            if si is not None and ok[c]:
                si._w = {n: w[c].detach().cpu().clone() for n, w in self.w.items()
                         if n in si._w or not si._w}
                si._prev, si._grad = {}, {}


def _vmappable(loss_fn: nn.Module):
    """`loss_fn` as a function vmap can batch: torch's weighted, label-smoothed
    cross-entropy selects with a mask inside its mean (no batching rule), so that one case
    is written as its own definition — the weighted terms over the targets' weights."""
    if isinstance(loss_fn, nn.CrossEntropyLoss) and loss_fn.weight is not None and \
            loss_fn.label_smoothing > 0:
        w, smooth = loss_fn.weight, loss_fn.label_smoothing

        def weighted(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            terms = F.cross_entropy(out, y, weight=w, label_smoothing=smooth,
                                    reduction="none")
            return terms.sum() / w[y].sum()
        return weighted
    return loss_fn


def _groups(sizes: list[int], live: list[bool]) -> dict[int, list[int]]:
    """Clients that take a step, by the size of their batch at this step: each group is
    one vmap call, so no batch is padded — batch norm sees exactly the client's batch."""
    out: dict[int, list[int]] = {}
    for c, (n, ok) in enumerate(zip(sizes, live, strict=True)):
        if n and ok:
            out.setdefault(n, []).append(c)
    return out


def train_clients(model: nn.Module, global_state: dict[str, torch.Tensor],
                  splits: Sequence[Split], seeds: Sequence[int], loss_fn: nn.Module,
                  rule: LocalRule, *, shift: int = 0, noise_std: float = 0.0,
                  device: torch.device | str = "cpu", continual: Strategies | None = None
                  ) -> list[ClientResult]:
    """Train one client per split from `global_state`, all at once; `seeds[k]` is the seed
    `task.local_train` would give client k's `Batches` in this round. `continual`: each
    client's strategy (its state is updated as the client's loop would update it)."""
    device = torch.device(device)
    regression = bool(getattr(loss_fn, "regression", False))
    k = len(splits)
    own = model.state_dict(keep_vars=True)
    names = [n for n, p in model.named_parameters() if p.requires_grad]

    def stacked(n: str) -> torch.Tensor:
        # in the model's dtype, as load_state_dict casts it (FedAdam sends float64)
        t = global_state.get(n, own[n]).to(device, own[n].dtype)
        return t.unsqueeze(0).repeat(k, *[1] * t.dim())

    params = {n: stacked(n).requires_grad_(True) for n in names}
    # buffers and frozen parameters: stacked, never stepped
    buffers = {n: stacked(n) for n in own if n not in params}
    anchor = {n: global_state[n].to(device) for n in names} if rule.proximal_mu > 0 else None
    opt = _Stacked(list(params.values()), rule, k, device)
    model = model.to(device)
    loss_fn = loss_fn.to(device)
    criterion = _vmappable(loss_fn)
    penalties = _Penalties(continual, params, device) if continual else None
    path = _PathIntegral(continual, params, device) if continual else None
    mask = continual.mask if continual else None

    def one(p: dict[str, torch.Tensor], b: dict[str, torch.Tensor], x: torch.Tensor,
            y: torch.Tensor, allowed: torch.Tensor | None
            ) -> tuple[torch.Tensor, torch.Tensor]:
        out = functional_call(model, (p, b), (x,)).float()
        if allowed is not None:  # task-incremental: other tasks' classes get no probability
            out = out.masked_fill(~allowed, float("-inf"))
        hits = (out.argmax(-1) == y).sum() if not regression else torch.zeros((), device=x.device)
        return criterion(out, y), hits

    forward = vmap(one, randomness="different",
                   in_dims=(0, 0, 0, 0, 0 if mask is not None else None))
    bad = [False] * k
    first_bad = [""] * k  # a non-finite loss or gradient
    errors = [""] * k  # anything else the client's training raised
    sums, hits_sum, counts = [0.0] * k, [0.0] * k, [0] * k
    for epoch in range(rule.epochs):
        batches = _epoch_batches(splits, seeds, rule.batch_size, epoch, shift, noise_std,
                                 continual)
        sums, hits_sum, counts = [0.0] * k, [0.0] * k, [0] * k  # the last epoch's metrics
        for s in range(max(len(b) for b in batches)):
            sizes = [len(b[s][1]) if s < len(b) else 0 for b in batches]
            groups = _groups(sizes, [not x for x in bad])
            if not groups:
                continue
            losses = torch.zeros(k, device=device)
            objective = torch.zeros(k, device=device)
            hits = torch.zeros(k, device=device)
            for idx in groups.values():
                whole = len(idx) == k
                at = torch.tensor(idx, device=device)
                p = params if whole else {n: t[at] for n, t in params.items()}
                b = buffers if whole else {n: t[at] for n, t in buffers.items()}
                x = torch.stack([batches[c][s][0] for c in idx]).to(device, non_blocking=True)
                y = torch.stack([batches[c][s][1] for c in idx]).to(device, non_blocking=True)
                allowed = mask(y).to(device) if mask is not None else None
                try:
                    loss, hit = forward(p, b, x, y, allowed)
                except Exception as e:  # noqa: BLE001 - what the ClientApp would fail with
                    if out_of_memory(e):  # the chunk's, not the clients': a smaller chunk
                        raise
                    for c in idx:  # (e.g. batch norm on a batch of one): these clients fail
                        bad[c], errors[c] = True, f"{type(e).__name__}: {e}"
                    continue
                if not whole:  # running statistics the forward updated, back in place
                    for n, t in b.items():
                        buffers[n][at] = t
                losses = losses.index_put((at,), loss)
                hits = hits.index_put((at,), hit.float())
            objective = losses
            if anchor is not None:
                objective = objective + 0.5 * rule.proximal_mu * sum(
                    ((params[n] - anchor[n]) ** 2).reshape(k, -1).sum(1) for n in names)
            extra = penalties(params) if penalties is not None else None
            if extra is not None:
                objective = objective + extra
            active = torch.zeros(k, dtype=torch.bool, device=device)
            active[[c for idx in groups.values() for c in idx if not bad[c]]] = True
            value = objective.detach()
            finite = torch.isfinite(value)
            for c in torch.nonzero(active & ~finite).flatten().tolist():
                first_bad[c] = f"non-finite loss {float(value[c])} at epoch {epoch + 1}, " \
                               f"step {s}"
                bad[c] = True
            active &= finite
            if not bool(active.any()):  # every client of this step failed
                continue
            torch.where(active, objective, torch.zeros_like(objective)).sum().backward()
            grads = [p.grad if p.grad is not None else torch.zeros_like(p)
                     for p in params.values()]
            finite_grads = torch.stack([torch.isfinite(g).reshape(k, -1).all(1)
                                        for g in grads]).all(0)
            for c in torch.nonzero(active & ~finite_grads).flatten().tolist():
                first_bad[c] = f"non-finite gradient at epoch {epoch + 1}, step {s}"
                bad[c] = True
            active &= finite_grads
            if path is not None:
                path.record(params)
            if rule.grad_clip is not None:
                _clip(grads, rule.grad_clip)
            opt.step(active)
            if path is not None:
                path.close(params, active)
            for t in params.values():
                t.grad = None
            step_losses, step_hits = losses.detach().tolist(), hits.tolist()
            for c in torch.nonzero(active).flatten().tolist():
                sums[c] += step_losses[c] * sizes[c]
                hits_sum[c] += step_hits[c]
                counts[c] += sizes[c]
    if path is not None:
        path.write_back([not x for x in bad])
    out = []
    for c in range(k):
        if bad[c]:
            out.append(ClientResult(None, error=first_bad[c] or errors[c],
                                    kind="nonfinite" if first_bad[c] else "error"))
            continue
        state = {n: t[c].detach().cpu().clone() for n, t in {**params, **buffers}.items()}
        total = max(float(counts[c]), 1.0)
        metrics = {"train_loss": sums[c] / total}
        if not regression:
            metrics["train_accuracy"] = hits_sum[c] / total
        out.append(ClientResult({n: state[n] for n in global_state}, metrics))
    return out


@torch.no_grad()
def evaluate_clients(model: nn.Module, splits: Sequence[Split], loss_fn: nn.Module,
                     num_classes: int, eval_batch_size: int,
                     device: torch.device | str = "cpu") -> list[dict[str, float]]:
    """The loss and accuracy (regression: `core.loop.evaluate`'s figures) of one model on
    every client's split, from one pass over all of their rows (in slices of
    `eval_batch_size`): each client's logits are then cut into its evaluation batches, the
    loss averaged per batch as `evaluate` does."""
    from atoll.core.loop import evaluate

    device = torch.device(device)
    was_training = model.training
    model.eval()
    sizes = [len(sp) for sp in splits]
    rows = torch.cat([sp.x for sp in splits])
    # in evaluation-sized slices: activations never hold the whole federation's rows
    logits = torch.cat([model(part.to(device)).float()
                        for part in torch.split(rows, max(eval_batch_size, 1))])
    model.train(was_training)
    regression = bool(getattr(loss_fn, "regression", False))
    out = []
    for sp, part in zip(splits, torch.split(logits, sizes), strict=True):
        chunks = list(zip(torch.split(part, eval_batch_size),
                          torch.split(sp.y.to(device), eval_batch_size), strict=True))
        if regression:  # R² and friends: evaluate's own sums
            out.append(evaluate(_Given(), chunks, loss_fn, num_classes))
            continue
        # what evaluate reports a client's loss and accuracy as, without its confusion
        # matrix and macro averages (a client reports loss and accuracy only)
        loss_sum, correct = 0.0, 0
        for x, y in chunks:
            loss_sum += float(loss_fn(x, y).double()) * y.shape[0]
            correct += int((x.argmax(1) == y).sum())
        n = max(len(sp), 1)
        out.append({"val_loss": loss_sum / n, "val_accuracy": correct / n})
    return out


class _Given(nn.Module):
    """A "model" whose output is its input: `evaluate` on logits already computed."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def probe(model: nn.Module, global_state: dict[str, torch.Tensor], split: Split,
          loss_fn: nn.Module, rule: LocalRule, device: torch.device | str = "cpu"
          ) -> str | None:
    """Why `model` cannot be trained by this engine, or None: one step of two clients on
    one batch, at start-up (a model that reads values in its forward — `.item()`,
    data-dependent `if` — or updates a buffer vmap cannot batch fails here, not in round
    1)."""
    n = min(len(split), rule.batch_size)
    sample = Split(split.x[:n], split.y[:n])
    try:
        out = train_clients(model, global_state, [sample, sample], [0, 1], loss_fn,
                            replace(rule, epochs=1), device=device)
    except Exception as e:  # noqa: BLE001 - whatever vmap refuses, in the user's words
        text = str(e).strip().splitlines()
        return f"{type(e).__name__}: {text[0] if text else ''}"[:300]
    # a client's training that raised (vmap's refusals land here); a non-finite first step
    # is the data's business, not the engine's
    failed = [r.error for r in out if r.kind == "error"]
    return failed[0][:300] if failed else None


def out_of_memory(e: BaseException) -> bool:
    """A failed allocation: CUDA's OutOfMemoryError, or the CPU allocator's RuntimeError
    (which torch does not raise as OutOfMemoryError)."""
    return isinstance(e, torch.OutOfMemoryError) or (
        isinstance(e, RuntimeError) and "can't allocate memory" in str(e))


def client_bytes(model: nn.Module, x: torch.Tensor, rule: LocalRule, extra_copies: int = 0
                 ) -> int:
    """What one more client adds to a batched round's peak memory, estimated: its stacked
    parameters with their gradient, optimizer state and the update's temporaries
    (`extra_copies` more for continual state: EWC pairs, SI's path integral), its buffers,
    and one batch's activations — measured by running the model on `x` (one batch),
    counted three times (saved for backward, their gradients, the forward's temporaries)."""
    params = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    states = {"sgd": 1 if rule.momentum else 0}.get(rule.optimizer, 2)
    copies = 2 + states + 2 + extra_copies  # θ and g, optimizer, temporaries, continual
    seen = [0]

    def count(_m: nn.Module, _i: Any, out: Any) -> None:
        for t in out if isinstance(out, tuple | list) else [out]:
            if isinstance(t, torch.Tensor):
                seen[0] += t.numel() * t.element_size()

    leaves = [m for m in model.modules() if not any(True for _ in m.children())]
    hooks = [m.register_forward_hook(count) for m in leaves]
    was_training = model.training
    try:
        with torch.no_grad():
            model.eval()  # batch norm's running statistics stay as they are
            model(x)
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()
    return params * copies + buffers + 3 * seen[0] + x.numel() * x.element_size()


def auto_chunk(per_client: int, device: torch.device, fraction: float = 0.5) -> tuple[int, int]:
    """(clients per batched computation, free bytes): `fraction` of the memory free now —
    on a GPU its free memory, on a CPU what the OS reports available — over one client's
    estimate. A CPU process past its memory is killed, not told: hence an estimate
    before the first round, and out-of-memory halving as the fallback."""
    if device.type == "cuda":
        free = torch.cuda.mem_get_info(device)[0]
    else:
        import psutil

        free = psutil.virtual_memory().available
    return max(1, int(free * fraction) // max(per_client, 1)), int(free)


def _clip(grads: list[torch.Tensor], max_norm: float) -> None:
    """Each client's gradient clipped by its own global norm (`clip_grad_norm_`'s rule)."""
    k = grads[0].shape[0]
    total = torch.stack([g.reshape(k, -1).pow(2).sum(1) for g in grads]).sum(0).sqrt()
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
        """One step of the clients in `active`. When every client steps (most steps of a
        round) the update is in place, with no masking: the same arithmetic, less memory
        traffic."""
        r = self.rule
        every = bool(active.all())
        self.steps += active.double()
        started = bool(self.started.all())
        for i, p in enumerate(self.params):
            shape = (-1, *[1] * (p.dim() - 1))
            on = active.reshape(shape)
            g = p.grad
            if g is None:  # unused by the forward: torch's optimizers skip it
                continue
            if r.optimizer == "sgd":
                d = g.add(p, alpha=r.weight_decay) if r.weight_decay else g
                if r.momentum:
                    if every and started:
                        buf = self.m[i].mul_(r.momentum).add_(d)
                    else:
                        first = (~self.started).reshape(shape)
                        buf = torch.where(first, d, r.momentum * self.m[i] + d)
                        self.m[i] = torch.where(on, buf, self.m[i])
                    d = d.add(buf, alpha=r.momentum) if r.nesterov else buf
                if every:
                    p.add_(d, alpha=-r.lr)
                else:
                    p.copy_(torch.where(on, p - r.lr * d, p))
                continue
            b1, b2 = r.betas
            t = self.steps.clamp_min(1).to(p.dtype).reshape(shape)
            step_size = r.lr / (1 - b1 ** t)
            bc2 = (1 - b2 ** t).sqrt()
            if every:
                if r.optimizer == "adamw" and r.weight_decay:
                    p.mul_(1 - r.lr * r.weight_decay)
                elif r.weight_decay:
                    g = g.add(p, alpha=r.weight_decay)
                self.m[i].lerp_(g, 1 - b1)
                self.v[i].mul_(b2).addcmul_(g, g, value=1 - b2)
                denom = (self.v[i].sqrt() / bc2).add_(r.eps)
                p.sub_(step_size * self.m[i] / denom)
                continue
            if r.optimizer == "adamw" and r.weight_decay:
                decayed = p * (1 - r.lr * r.weight_decay)
            else:
                decayed = p
                if r.weight_decay:
                    g = g + r.weight_decay * p
            m = torch.where(on, self.m[i] * b1 + g * (1 - b1), self.m[i])
            v = torch.where(on, self.v[i] * b2 + g * g * (1 - b2), self.v[i])
            self.m[i], self.v[i] = m, v
            denom = v.sqrt() / bc2 + r.eps
            p.copy_(torch.where(on, (decayed - step_size * m / denom).to(p.dtype), p))
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

