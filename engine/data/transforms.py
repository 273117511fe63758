"""Resolution presets shared by both readers, on uint8 CHW tensors.

    train: random resized crop (scale 0.08-1) + horizontal flip
    eval:  resize the short side to size / crop_pct, centre crop to size
    raw:   no geometry (images must share one size to be batched)

then, when `normalize`, float32 in [0, 1] and per-channel (x - mean) / std.
"""
from __future__ import annotations

import torch
from torchvision.transforms import v2

from ..errors import ConfigError

PRESETS = ("train", "eval", "raw")


def eval_resize(size: int, crop_pct: float) -> int:
    return int(round(size / crop_pct))


def image_size_ok(size) -> bool:
    return isinstance(size, int) and size > 0


def build_transform(preset: str, size: int, crop_pct: float = 0.875, mean=None, std=None,
                    normalize: bool = True, scale=(0.08, 1.0)):
    if preset not in PRESETS:
        raise ConfigError(f"data preset '{preset}': expected one of {', '.join(PRESETS)}")
    if preset != "raw" and not image_size_ok(size):
        raise ConfigError(f"data.image_size: a positive size is needed for preset '{preset}', got {size}")
    ops: list = []
    if preset == "train":
        ops += [v2.RandomResizedCrop(size, scale=tuple(scale), antialias=True), v2.RandomHorizontalFlip()]
    elif preset == "eval":
        ops += [v2.Resize(eval_resize(size, crop_pct), antialias=True), v2.CenterCrop(size)]
    if normalize:
        ops.append(normalizer(mean, std))
    return v2.Compose(ops) if ops else None


def normalizer(mean, std):
    """uint8 -> float [0, 1] -> (x - mean) / std, for one image or a batch (both readers)."""
    return v2.Compose([v2.ToDtype(torch.float32, scale=True), Normalize(mean, std)])


class Normalize(torch.nn.Module):
    """(x - mean) / std with mean/std broadcast over the channel axis (CHW or NCHW)."""

    def __init__(self, mean, std):
        super().__init__()
        self.register_buffer("mean", torch.tensor(list(mean), dtype=torch.float32).view(-1, 1, 1))
        self.register_buffer("std", torch.tensor(list(std), dtype=torch.float32).view(-1, 1, 1))

    def forward(self, x):
        return (x - self.mean) / self.std


def to_channels(chw: torch.Tensor, channels: int) -> torch.Tensor:
    """uint8 (.., C, H, W) to `channels` channels; RGB -> grey with PIL's integer
    ITU-R 601 formula so both readers give identical grey pixels."""
    c = chw.shape[-3]
    if c == channels:
        return chw
    if channels == 3 and c == 1:
        return chw.expand(*chw.shape[:-3], 3, *chw.shape[-2:]).contiguous()
    if channels == 1 and c == 3:
        r, g, b = (chw.narrow(-3, i, 1).to(torch.int32) for i in range(3))
        return ((r * 19595 + g * 38470 + b * 7471 + 0x8000) >> 16).to(torch.uint8)
    raise ConfigError(f"data.channels: cannot convert {c} channels to {channels} (expected 1 or 3)")
