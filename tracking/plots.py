"""Figures a person would rather look at than read: training curves."""

from __future__ import annotations

import os
import tempfile
from typing import Any

os.environ.setdefault("MPLCONFIGDIR", os.path.join(tempfile.gettempdir(), "atoll-mpl"))

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def curves(history: list[dict[str, float]], title: str) -> Any:
    """Loss and accuracy per epoch, train vs validation, side by side."""
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    epochs = [h["epoch"] for h in history]
    for ax, metric in ((ax_loss, "loss"), (ax_acc, "accuracy")):
        for split in ("train", "val"):
            ys = [h.get(f"{split}_{metric}") for h in history]
            if any(y is not None for y in ys):
                ax.plot(epochs, [float("nan") if y is None else y for y in ys], marker="o",
                        label=split)
        ax.set_xlabel("epoch")
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def close(fig: Any) -> None:
    plt.close(fig)
