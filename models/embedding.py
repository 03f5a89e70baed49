"""Learned embeddings for a table's categorical columns, in front of any model.

The data keeps one float code column per categorical (`data.categorical_encoding:
embedding`), so tensors stay one float matrix through batching, DDP sharding, Flower
messages and the registered program; this layer splits the codes off, looks each up in
its own table and hands the model dense features of width `Embedded.width`.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

from atoll.core.data import Embedded


class CategoricalEmbedding(nn.Module):
    """(batch, numeric + categoricals) codes -> (batch, numeric + sum(dims)) features.

    Each table has one row more than its column has categories: a category the model never
    saw (at inference: a code past the last, or negative) maps to that row, not to an
    index error.
    """

    def __init__(self, layout: Embedded):
        super().__init__()
        self.numeric = layout.numeric
        self.cardinalities = list(layout.cardinalities)
        self.tables = nn.ModuleList(nn.Embedding(n + 1, d)
                                    for n, d in zip(layout.cardinalities, layout.dims,
                                                    strict=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        parts = [x[:, :self.numeric]]
        for i, (table, n) in enumerate(zip(self.tables, self.cardinalities, strict=True)):
            code = x[:, self.numeric + i].round().long()
            unseen = (code < 0) | (code >= n)
            parts.append(table(torch.where(unseen, torch.full_like(code, n), code)))
        return torch.cat(parts, dim=1)


class EmbeddedModel(nn.Sequential):
    """`embed`, then the model: its children inline when it is a Sequential (names kept,
    so its blocks stay pipeline blocks), else as `net`. `prefix` maps the model's own
    submodule names (`model.stages`) to names in here."""

    def __init__(self, embed: CategoricalEmbedding, model: nn.Module):
        # only a plain Sequential is inlined: a subclass may have its own forward or
        # parameters of its own, and a child named `embed` would replace the embeddings
        inline = type(model) is nn.Sequential and "embed" not in dict(model.named_children())
        inner = list(model.named_children()) if inline else [("net", model)]
        super().__init__(OrderedDict([("embed", embed), *inner]))
        self.prefix = "" if inline else "net."
        cls = type(model)  # what the run's model.class param names
        self.inner_class = f"{cls.__module__}.{cls.__qualname__}"


def with_embeddings(model: nn.Module, layout: Embedded) -> EmbeddedModel:
    """`model` (built for `layout.width` dense features) behind the embeddings."""
    return EmbeddedModel(CategoricalEmbedding(layout), model)
