"""ConvNetD{3,4,5}: the dataset-distillation ConvNet (METHODS.md section 2).

depth x [3x3 conv (width ch) + instance norm + ReLU + 2x2 average pool], then
a linear head on the flattened features. Instance norm is GroupNorm with one
group per channel (affine), as in the reference code; norm='batch' gives a BN
variant, norm='none' none.
"""
from __future__ import annotations

import torch
from torch import nn

from ..errors import ConfigError


def _norm(kind: str, ch: int) -> nn.Module:
    if kind == "instance":
        return nn.GroupNorm(ch, ch, affine=True)
    if kind == "batch":
        return nn.BatchNorm2d(ch)
    if kind == "none":
        return nn.Identity()
    raise ConfigError(f"model.norm '{kind}': expected instance, batch or none")


class ConvNet(nn.Module):
    def __init__(self, in_chans: int, num_classes: int, depth: int = 3, width: int = 128,
                 image_size: int = 32, norm: str = "instance"):
        super().__init__()
        if image_size >> depth < 1:
            raise ConfigError(f"model: ConvNet depth {depth} needs images of at least {2 ** depth} px, got {image_size}")
        blocks = []
        ch = in_chans
        for _ in range(depth):
            blocks.append(nn.Sequential(nn.Conv2d(ch, width, 3, padding=1), _norm(norm, width), nn.ReLU(inplace=True),
                                        nn.AvgPool2d(2)))
            ch = width
        self.blocks = nn.ModuleList(blocks)
        self.feat_dim = width * (image_size >> depth) ** 2
        self.fc = nn.Linear(self.feat_dim, num_classes)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        for b in self.blocks:
            x = b(x)
        return x.flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.embed(x))
