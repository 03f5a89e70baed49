"""Cut a model into N contiguous stages for pipeline parallelism.

A model's blocks are an `nn.Sequential`'s children, or, for any other module, the
submodules its spec lists in `model.stages` (checked: applied in order they compute the
model's forward, and every parameter lies in one of them).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from atoll.core.spec import SpecError
from atoll.models.embedding import EmbeddedModel

Block = tuple[str, nn.Module]


def _balanced_cuts(costs: list[int], n: int) -> list[int]:
    """Boundaries of n contiguous groups minimising the largest group cost (DP, small n)."""
    m = len(costs)
    prefix = [0]
    for c in costs:
        prefix.append(prefix[-1] + c)
    inf = float("inf")
    best = [[inf] * (m + 1) for _ in range(n + 1)]
    cut = [[0] * (m + 1) for _ in range(n + 1)]
    best[0][0] = 0
    for k in range(1, n + 1):
        for j in range(k, m + 1):
            for i in range(k - 1, j):
                cost = max(best[k - 1][i], prefix[j] - prefix[i])
                if cost < best[k][j]:
                    best[k][j], cut[k][j] = cost, i
    bounds, j = [m], m
    for k in range(n, 0, -1):
        j = cut[k][j]
        bounds.append(j)
    return bounds[::-1]


def stage_names(spec: Any, model: nn.Module) -> list[str] | None:
    """The spec's `model.stages` as names in `model`: behind categorical embeddings, the
    embeddings are a stage block of their own and the model's names move under it."""
    names = getattr(spec, "stages", None)
    if names is None or not isinstance(model, EmbeddedModel):
        return names
    return ["embed", *(model.prefix + n for n in names)]


def model_blocks(model: nn.Module, names: list[str] | None, label: str = "the model"
                 ) -> list[Block]:
    """The blocks a pipeline may cut between, in order; SpecError when there are none."""
    if names is None:
        if isinstance(model, nn.Sequential):
            return list(model.named_children())
        raise SpecError([f"cluster.strategy: pipeline needs the stages of model {label}, a "
                         f"{type(model).__name__} (not an nn.Sequential); allowed: list its "
                         "submodules in forward order as model.stages, return an "
                         "nn.Sequential, or cluster.strategy ddp/fsdp"])
    blocks: list[Block] = []
    for name in names:
        try:
            blocks.append((name, model.get_submodule(name)))
        except AttributeError:
            top = ", ".join(n for n, _ in model.named_children())
            raise SpecError([f"model.stages: {name!r} is not a submodule of {label}; allowed: "
                             f"dotted names of its submodules ({top}, ...)"]) from None
    for a, _ in blocks:
        inner = [b for b, _ in blocks if b != a and b.startswith(a + ".")]
        if inner:
            raise SpecError([f"model.stages: {inner[0]!r} lies inside {a!r}; allowed: "
                             "submodules that do not contain each other"])
    covered = {id(p) for _, m in blocks for p in m.parameters()}
    loose = [n for n, p in model.named_parameters() if id(p) not in covered]
    if loose:
        raise SpecError([f"model.stages: parameter {loose[0]!r} of {label} is in no stage "
                         f"({len(loose)} such); allowed: stages that hold every parameter"])
    return blocks


def check_blocks_compose(model: nn.Module, blocks: list[Block], x: torch.Tensor,
                         label: str = "the model") -> None:
    """Refuse stages that, applied in order, do not compute `model(x)`."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            want = model(x)
            out = x
            for _, block in blocks:
                out = block(out)
    except Exception as e:
        raise SpecError([f"model.stages: applying {[n for n, _ in blocks]} in order to a batch "
                         f"of {tuple(x.shape)} fails ({type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else ''}); allowed: the "
                         "submodules the model's forward calls, in order"]) from None
    finally:
        model.train(was_training)
    if not isinstance(out, torch.Tensor) or out.shape != want.shape or \
            not torch.allclose(out, want, rtol=1e-4, atol=1e-5):
        raise SpecError([f"model.stages: applying {[n for n, _ in blocks]} in order does not "
                         f"compute the forward of {label}; allowed: the submodules its "
                         "forward calls, in order, with nothing computed between them"])


def split_blocks(blocks: list[Block], n: int) -> list[list[Block]]:
    """N contiguous groups of blocks, balanced by parameter count."""
    if not 1 <= n <= len(blocks):
        raise ValueError(f"cannot split a model of {len(blocks)} blocks into {n} stages; "
                         f"allowed: 1..{len(blocks)}")
    costs = [max(1, sum(p.numel() for p in b.parameters())) for _, b in blocks]
    bounds = _balanced_cuts(costs, n)
    return [blocks[a:b] for a, b in zip(bounds[:-1], bounds[1:], strict=True)]


def split_stages(model: nn.Sequential, n: int) -> list[nn.Sequential]:
    """N sequential stages sharing the model's modules, balanced by parameter count.

    Composing the stages in order computes exactly `model(x)` (tests check every model).
    """
    groups = split_blocks(list(model.named_children()), n)
    return [nn.Sequential(*(m for _, m in g)) for g in groups]
