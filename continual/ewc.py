"""Elastic Weight Consolidation (Kirkpatrick et al. 2017) and online EWC (Schwarz et al. 2018).

Penalty, with the ½ convention of the original paper:
    Ω(θ) = (λ/2) · Σ_t Σ_i F_t,i (θ_i − θ*_t,i)²
`separate` keeps one (anchor θ*_t, Fisher F_t) pair per finished task; `online` keeps one
pair whose Fisher is γ·F_old + F_new and whose anchor is the latest parameters.
The Fisher is the diagonal of E_x[(∇ log p(y|x))²], with y the true label (`empirical`) or
drawn from the model's own prediction (`sampled`, the true Fisher), estimated in eval mode
so batch-norm statistics and dropout stay frozen during the pass. For regression p(y|x) is
a unit-variance Gaussian around the output (targets are z-scores; the MSE loss), whose
Fisher is exactly (∇f)², for either setting of `labels`, always per sample (the squared
batch mean of ∇f is near 0 for first-layer weights of standardised inputs).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call, grad, vmap

from atoll.continual.base import BaseStrategy, Batch, placed
from atoll.core.spec import EwcSpec

Params = dict[str, torch.Tensor]


def fisher_diagonal(model: nn.Module, batches: Iterable[Batch], *, max_samples: int,
                    labels: str = "empirical", per_sample: bool = False,
                    generator: torch.Generator | None = None) -> Params:
    """Diagonal Fisher estimate over up to `max_samples` samples of `batches`.

    per_sample=True squares each sample's gradient (exact, via torch.func.vmap);
    otherwise each batch's mean gradient is squared and weighted by its size, the cheaper
    approximation most EWC implementations use.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    params = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    buffers = dict(model.named_buffers())
    fisher = {n: torch.zeros_like(p) for n, p in params.items()}

    def nll(p: Params, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        out = functional_call(model, (p, buffers), (x,))
        if y.is_floating_point():
            # regression: a unit-variance Gaussian around the output (targets are
            # z-scores), whose Fisher E_y[(∇ log p)²] is exactly (∇f)²; the residual
            # (y − f)·∇f of the empirical version vanishes once a task is fitted
            return out.reshape(len(y)).mean()
        return F.cross_entropy(out, y)

    per_sample_grad = vmap(grad(lambda p, x, y: nll(p, x[None], y[None])),
                           in_dims=(None, 0, 0))
    seen = 0
    for x, y in batches:
        if seen >= max_samples:
            break
        x, y = x[: max_samples - seen].to(device), y[: max_samples - seen].to(device)
        if labels == "sampled" and not y.is_floating_point():  # regression: exact already
            with torch.no_grad():
                probs = F.softmax(functional_call(model, (params, buffers), (x,)), dim=1)
            y = torch.multinomial(probs.cpu(), 1, generator=generator).squeeze(1).to(device)
        if per_sample or y.is_floating_point():  # regression: a batch-mean ∇f cancels out
            grads = per_sample_grad(params, x, y)
            for n in fisher:
                fisher[n] += grads[n].pow(2).sum(0)
        else:
            grads = grad(nll)(params, x, y)
            for n in fisher:
                fisher[n] += grads[n].pow(2) * len(y)
        seen += len(y)
    model.train(was_training)
    return {n: f / max(seen, 1) for n, f in fisher.items()}


class EWC(BaseStrategy):
    name = "ewc"

    def __init__(self, cfg: EwcSpec, seed: int = 0):
        self.cfg = cfg
        self.anchors: list[Params] = []
        self.fishers: list[Params] = []
        self.generator = torch.Generator().manual_seed(seed)

    def penalty(self, model: nn.Module) -> torch.Tensor | None:
        if not self.anchors or self.cfg.lam == 0:
            return None
        params = dict(model.named_parameters())
        device = next(model.parameters()).device
        self.anchors = [placed(a, device) for a in self.anchors]
        self.fishers = [placed(f, device) for f in self.fishers]
        total = torch.zeros((), device=device)
        for anchor, fisher in zip(self.anchors, self.fishers, strict=True):
            for n, f in fisher.items():
                total = total + (f * (params[n] - anchor[n]).pow(2)).sum()
        return 0.5 * self.cfg.lam * total

    def after_task(self, model: nn.Module, task: Any, loader: Iterable[Batch]) -> None:
        fisher = fisher_diagonal(model, loader, max_samples=self.cfg.fisher_samples,
                                 labels=self.cfg.fisher_labels, per_sample=self.cfg.per_sample,
                                 generator=self.generator)
        fisher = {n: self._mean(f) for n, f in fisher.items()}  # cluster: over every shard
        anchor = {n: p.detach().clone() for n, p in model.named_parameters() if n in fisher}
        if self.cfg.mode == "online" and self.fishers:
            old = self.fishers[0]
            fisher = {n: self.cfg.gamma * old[n] + fisher[n] for n in fisher}
            self.anchors, self.fishers = [anchor], [fisher]
        else:
            self.anchors.append(anchor)
            self.fishers.append(fisher)

    def state_dict(self) -> dict[str, Any]:
        return {"anchors": self.anchors, "fishers": self.fishers,
                "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.anchors = list(state.get("anchors", []))
        self.fishers = list(state.get("fishers", []))
        if "generator" in state:
            self.generator.set_state(state["generator"])
