"""Figures a person would rather look at than read: training curves."""

from __future__ import annotations

import os
import tempfile
from typing import Any

os.environ.setdefault("MPLCONFIGDIR", os.path.join(tempfile.gettempdir(), "atoll-mpl"))

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def _two_panel(history: list[dict[str, float]], x: str, series: tuple[tuple[str, str], ...],
               title: str) -> Any:
    """Loss and accuracy (R² for regression) side by side, one line per (key prefix,
    label) in `series`."""
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    xs = [h[x] for h in history]
    second = "accuracy" if any(k.endswith("_accuracy") for h in history for k in h) else "r2"
    for ax, metric in ((ax_loss, "loss"), (ax_acc, second)):
        for prefix, label in series:
            ys = [h.get(f"{prefix}_{metric}") for h in history]
            if any(y is not None for y in ys):
                ax.plot(xs, [float("nan") if y is None else y for y in ys], marker="o",
                        label=label)
        ax.set_xlabel(x)
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def curves(history: list[dict[str, float]], title: str) -> Any:
    """Loss and accuracy per epoch, train vs validation, side by side."""
    return _two_panel(history, "epoch", (("train", "train"), ("val", "val")), title)


def close(fig: Any) -> None:
    plt.close(fig)


def label_heatmap(hist: Any, title: str) -> Any:
    """clients × classes sample counts: how non-IID a partition is, at a glance."""
    import numpy as np

    hist = np.asarray(hist)
    fig, ax = plt.subplots(figsize=(1.2 + 0.45 * hist.shape[1], 1.2 + 0.3 * hist.shape[0]))
    im = ax.imshow(hist, aspect="auto", cmap="viridis")
    ax.set_xlabel("class")
    ax.set_ylabel("client")
    ax.set_xticks(range(hist.shape[1]))
    if hist.shape[0] <= 40:
        ax.set_yticks(range(hist.shape[0]))
    fig.colorbar(im, ax=ax, label="samples")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    return fig


def rounds(history: list[dict[str, float]], title: str) -> Any:
    """Per-round accuracy/loss: centralized (server test set) vs federated (client val)."""
    return _two_panel(history, "round", (("central", "central"),
                                         ("federated_val", "federated")), title)


def accuracy_matrix(r: list[list[float]], names: list[str], metrics: dict[str, float]) -> Any:
    """R[i][j] as a heatmap: rows = after training task i, columns = evaluated on task j."""
    import numpy as np

    m = np.asarray(r, dtype=float)
    t = m.shape[1]
    fig, ax = plt.subplots(figsize=(1.6 + 0.9 * t, 1.2 + 0.8 * m.shape[0]))
    im = ax.imshow(m, vmin=0.0, vmax=1.0, cmap="viridis")
    for i in range(m.shape[0]):
        for j in range(t):
            ax.text(j, i, f"{m[i, j]:.2f}", ha="center", va="center",
                    color="white" if m[i, j] < 0.6 else "black", fontsize=8)
    ax.set_xticks(range(t), [f"T{j}" for j in range(t)])
    ax.set_yticks(range(m.shape[0]), [f"after T{i}" for i in range(m.shape[0])])
    ax.set_xlabel("evaluated on")
    fig.colorbar(im, ax=ax, label="accuracy")
    shown = "  ".join(f"{k.removeprefix('cl_').upper()}={v:+.3f}" for k, v in metrics.items())
    ax.set_title(shown, fontsize=8)
    fig.tight_layout()
    return fig


def task_curves(r: list[list[float]], names: list[str]) -> Any:
    """Accuracy on each task as later tasks are learned (forgetting is a falling line)."""
    fig, ax = plt.subplots(figsize=(7, 4))
    steps = list(range(1, len(r) + 1))
    for j, name in enumerate(names):
        ax.plot(steps, [row[j] for row in r], marker="o", label=f"T{j}: {name}")
    ax.set_xlabel("tasks trained")
    ax.set_ylabel("test accuracy")
    ax.set_xticks(steps)
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig
