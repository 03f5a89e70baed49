"""FedProx's client-side proximal term, as a loop penalty (no second loop)."""

from __future__ import annotations

import torch
import torch.nn as nn

from atoll.continual.base import BaseStrategy


class Proximal(BaseStrategy):
    """penalty = μ/2 · Σ‖w − w_global‖² over trainable parameters (Li et al., 2020)."""

    name = "proximal"

    def __init__(self, mu: float, global_state: dict[str, torch.Tensor]):
        self.mu = mu
        self.anchor = {k: v.detach().clone() for k, v in global_state.items()}

    def penalty(self, model: nn.Module) -> torch.Tensor | None:
        terms = [((p - self.anchor[n].to(p.device)) ** 2).sum()
                 for n, p in model.named_parameters() if p.requires_grad]
        return 0.5 * self.mu * torch.stack(terms).sum() if terms else None
