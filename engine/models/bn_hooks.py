"""Forward hooks that record per-channel statistics of every BatchNorm layer's input."""
from __future__ import annotations

import torch
from torch import nn


def bn_layers(model: nn.Module) -> list[tuple[str, nn.BatchNorm2d]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)]


class BNStatsHook:
    """Collects (mean, biased variance) over (N, H, W) of each BN layer's input.

    Use as a context manager; `stats` holds one (mean, var) pair per BN layer
    in module order after each forward pass (cleared by `clear()`)."""

    def __init__(self, model: nn.Module):
        self.layers = bn_layers(model)
        self.stats: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._handles = []

    def _hook(self, module, inputs, output):
        x = inputs[0]
        mean = x.mean(dim=(0, 2, 3))
        var = x.var(dim=(0, 2, 3), unbiased=False)
        self.stats.append((mean, var))

    def clear(self) -> None:
        self.stats = []

    def __enter__(self):
        self._handles = [m.register_forward_hook(self._hook) for _, m in self.layers]
        return self

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()
        self._handles = []
