"""Losses, classification metrics (from a confusion matrix) and regression metrics (from
five sums): both are sums, so ranks and clients can add them up."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from atoll.core.spec import LossSpec


class FocalLoss(nn.Module):
    """Focal loss, Lin et al. 2017: mean of -α_y (1 - p_y)^γ log p_y (γ=0 is cross-entropy)."""

    def __init__(self, gamma: float, weight: torch.Tensor | None = None,
                 label_smoothing: float = 0.0):
        super().__init__()
        self.gamma, self.label_smoothing = gamma, label_smoothing
        self.register_buffer("weight", weight)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        ce = F.cross_entropy(logits, target, reduction="none",
                             label_smoothing=self.label_smoothing)
        p_t = torch.exp(-F.cross_entropy(logits, target, reduction="none"))
        loss = (1.0 - p_t) ** self.gamma * ce
        if self.weight is not None:
            w = self.weight[target]
            return (w * loss).sum() / w.sum()
        return loss.mean()


def class_weights(spec: LossSpec, labels: torch.Tensor, num_classes: int,
                  counts: torch.Tensor | None = None) -> torch.Tensor | None:
    """'balanced' is n / (k · count_c) as in scikit-learn; an explicit list is used as given.
    `counts` (rows per class, from a streaming pass) stands in for `labels`."""
    if spec.class_weights == "none":
        return None
    if isinstance(spec.class_weights, list):
        if len(spec.class_weights) != num_classes:
            raise ValueError(f"train.loss.class_weights has {len(spec.class_weights)} entries; "
                             f"allowed: exactly {num_classes} (one per class)")
        return torch.tensor(spec.class_weights, dtype=torch.float32)
    if counts is None:
        counts = torch.bincount(labels, minlength=num_classes)
    n = float(counts.sum())
    return n / (num_classes * counts.float().clamp_min(1.0))


class RegressionLoss(nn.Module):
    """MSE or Huber between a model's (N, 1) output and (N,) standardised targets.

    `y_mean`/`y_std` undo the standardisation for metrics (`regression_sums`), so MAE and
    RMSE are in the target's units; the loss itself stays on z-scores."""

    regression = True  # the loop reports MAE/RMSE/R² instead of accuracy

    def __init__(self, kind: str, delta: float = 1.0, y_mean: float = 0.0,
                 y_std: float = 1.0):
        super().__init__()
        self.kind, self.delta, self.y_mean, self.y_std = kind, delta, y_mean, y_std

    def forward(self, out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        out = out.reshape(target.shape)
        if self.kind == "huber":
            return F.huber_loss(out, target, delta=self.delta)
        return F.mse_loss(out, target)


def is_regression(loss_fn: nn.Module) -> bool:
    return bool(getattr(loss_fn, "regression", False))


def regression_sums(pred: torch.Tensor, target: torch.Tensor, scale: float = 1.0
                    ) -> torch.Tensor:
    """[Σ|e|, Σe², Σz, Σz², n] (float64) of standardised predictions and targets (errors
    times `scale`, the target's std, are in its units): what MAE, RMSE and R² are
    computed from. Sums of z-scores keep R²'s Σ(y - ȳ)² free of cancellation."""
    p, y = pred.reshape(target.shape).double(), target.double()
    e = (p - y) * scale
    return torch.stack([e.abs().sum(), (e * e).sum(), y.sum(), (y * y).sum(),
                        torch.tensor(float(y.numel()), dtype=torch.float64, device=y.device)])


def from_regression_sums(s: torch.Tensor, scale: float = 1.0) -> dict[str, float]:
    abs_sum, sq_sum, y_sum, y2_sum, n = (float(v) for v in s)
    n = max(n, 1.0)
    total = (y2_sum - y_sum * y_sum / n) * scale * scale  # Σ(y - ȳ)², in units
    return {"mae": abs_sum / n, "rmse": (sq_sum / n) ** 0.5,
            "r2": 1.0 - sq_sum / total if total > 0 else 0.0}


def build_loss(spec: LossSpec, labels: torch.Tensor, num_classes: int,
               task: str = "classification", y_mean: float = 0.0, y_std: float = 1.0,
               counts: torch.Tensor | None = None) -> nn.Module:
    if task == "regression":
        return RegressionLoss("huber" if spec.name == "huber" else "mse", spec.huber_delta,
                              y_mean, y_std)
    weight = class_weights(spec, labels, num_classes, counts)
    if spec.name == "focal":
        return FocalLoss(spec.focal_gamma, weight, spec.label_smoothing)
    return nn.CrossEntropyLoss(weight=weight, label_smoothing=spec.label_smoothing)


def confusion(pred: torch.Tensor, target: torch.Tensor, num_classes: int) -> torch.Tensor:
    """C[i, j] = number of samples of true class i predicted as j."""
    idx = target.to(torch.int64) * num_classes + pred.to(torch.int64)
    return torch.bincount(idx, minlength=num_classes**2).reshape(num_classes, num_classes)


def from_confusion(cm: torch.Tensor) -> dict[str, float]:
    """Accuracy and macro precision/recall/F1; classes absent from truth and predictions
    are left out of the macro averages (scikit-learn's `labels=present` behaviour)."""
    cm = cm.double()
    tp = cm.diag()
    support, predicted = cm.sum(1), cm.sum(0)
    present = (support + predicted) > 0
    precision = torch.where(predicted > 0, tp / predicted.clamp_min(1), torch.zeros_like(tp))
    recall = torch.where(support > 0, tp / support.clamp_min(1), torch.zeros_like(tp))
    denom = precision + recall
    f1 = torch.where(denom > 0, 2 * precision * recall / denom.clamp_min(1e-12),
                     torch.zeros_like(tp))
    total = cm.sum().clamp_min(1)
    k = present.sum().clamp_min(1)
    return {
        "accuracy": float(tp.sum() / total),
        "precision": float(precision[present].sum() / k),
        "recall": float(recall[present].sum() / k),
        "f1": float(f1[present].sum() / k),
    }
