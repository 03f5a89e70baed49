"""A small ViT-style encoder classifier over non-overlapping image patches."""

from __future__ import annotations

import torch
import torch.nn as nn

from atoll.core.model_spec import TransformerSpec
from atoll.models.common import activation


class PatchEmbed(nn.Module):
    """Patches → tokens, with a learned class token and position embeddings."""

    def __init__(self, channels: int, side: int, patch: int, dim: int):
        super().__init__()
        self.proj = nn.Conv2d(channels, dim, patch, patch)
        self.cls = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos = nn.Parameter(torch.randn(1, (side // patch) ** 2 + 1, dim) * 0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.proj(x).flatten(2).transpose(1, 2)
        cls = self.cls.expand(x.shape[0], -1, -1)
        return torch.cat([cls, tokens], dim=1) + self.pos


class ClassHead(nn.Module):
    def __init__(self, dim: int, num_classes: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.norm(x[:, 0]))


def build_transformer(spec: TransformerSpec, input_shape: tuple[int, ...], num_classes: int
                      ) -> nn.Sequential:
    if len(input_shape) != 3 or input_shape[1] != input_shape[2]:
        raise ValueError(f"model transformer needs square images (C, H, H), got {input_shape}")
    c, side, _ = input_shape
    if side % spec.patch_size:
        ok = [p for p in range(1, side + 1) if side % p == 0]
        raise ValueError(f"model.patch_size: {spec.patch_size} does not divide the image side "
                         f"{side}; allowed: {ok}")
    # torch takes "relu"/"gelu" by name (fast path); other activations as modules
    act_fn = spec.activation if spec.activation in ("relu", "gelu") else activation(spec.activation)
    blocks: list[nn.Module] = [PatchEmbed(c, side, spec.patch_size, spec.dim)]
    for _ in range(spec.layers):
        # norm_first + batch_first: the pre-LN layout; it also keeps each layer a plain module
        blocks.append(nn.TransformerEncoderLayer(
            spec.dim, spec.heads, dim_feedforward=4 * spec.dim, dropout=spec.dropout,
            activation=act_fn, batch_first=True, norm_first=True))
    blocks.append(ClassHead(spec.dim, num_classes))
    return nn.Sequential(*blocks)
