"""Model factory, checkpoints and BN-statistics hooks.

    create_model("resnet18", num_classes=10, in_chans=1, small_input=True, width=16)
    create_model("timm:resnet50", 1000)          # any timm architecture
    create_model("tv:resnet18", 1000)            # any torchvision classification model
    create_model("convnetd3", 10, in_chans=1, image_size=28)              # 128 channels per block
    create_model("convnetd3", 10, in_chans=1, image_size=28, width=64)    # a narrower ConvNet

ResNets come from timm (its ResNet takes per-stage channels, which gives the
narrow widths a CPU needs: width=16 -> 16-32-64-128). `small_input` swaps the
7x7/stride-2 stem and max-pool for a 3x3/stride-1 stem, for 28-64 px inputs.
`width` left at None gives each family its standard width: 64 for ResNets
(64-128-256-512), 128 channels per block for ConvNets; a ConvNet ignores
`small_input`.
"""
from __future__ import annotations

import torch
from torch import nn

from ..errors import ConfigError
from .convnet import ConvNet

RESNETS = {"resnet18", "resnet34", "resnet50", "resnet101"}
CONVNETS = {"convnetd3": 3, "convnetd4": 4, "convnetd5": 5}


def _small_input_stem(model: nn.Module, in_chans: int) -> None:
    out = model.conv1.out_channels
    model.conv1 = nn.Conv2d(in_chans, out, kernel_size=3, stride=1, padding=1, bias=False)
    model.maxpool = nn.Identity()


def _narrow_stem(model: nn.Module, width: int) -> None:
    """timm's plain stem is always 64 wide: make it `width` wide and fit the first shortcut."""
    c = model.conv1
    model.conv1 = nn.Conv2d(c.in_channels, width, c.kernel_size, c.stride, c.padding, bias=False)
    model.bn1 = nn.BatchNorm2d(width)
    first = model.layer1[0]
    out = first.conv1.out_channels * getattr(first, "expansion", 1)
    first.conv1 = nn.Conv2d(width, first.conv1.out_channels, first.conv1.kernel_size, first.conv1.stride,
                            first.conv1.padding, bias=False)
    if out == width:
        first.downsample = None
    else:
        first.downsample = nn.Sequential(nn.Conv2d(width, out, 1, bias=False), nn.BatchNorm2d(out))


def create_model(name: str, num_classes: int, in_chans: int = 3, small_input: bool = False,
                 width: int | None = None, image_size: int = 32, **kwargs) -> nn.Module:
    if num_classes < 1:
        raise ConfigError(f"model.num_classes: expected a positive number, got {num_classes}")
    lib, sep, arch = name.partition(":")
    if not sep:
        lib, arch = "", name
    arch = arch.lower()
    if width is not None and int(width) < 1:
        raise ConfigError(f"model.width: expected a positive number, got {width}")
    if lib == "" and arch in CONVNETS:
        return ConvNet(in_chans, num_classes, depth=CONVNETS[arch], width=128 if width is None else int(width),
                       image_size=image_size, **kwargs)
    if lib in ("", "timm") and arch in RESNETS:
        import timm

        width = 64 if width is None else int(width)
        channels = tuple(width * m for m in (1, 2, 4, 8))
        model = timm.create_model(arch, pretrained=False, num_classes=num_classes, in_chans=in_chans,
                                  channels=channels, **kwargs)
        if width != 64:
            _narrow_stem(model, width)
        if small_input:
            _small_input_stem(model, in_chans)
        return model
    if lib == "timm":
        import timm

        if not timm.is_model(arch):
            raise ConfigError(f"model.name '{name}': timm has no such architecture")
        return timm.create_model(arch, pretrained=False, num_classes=num_classes, in_chans=in_chans, **kwargs)
    if lib == "tv":
        import torchvision

        try:
            model = torchvision.models.get_model(arch, weights=None, num_classes=num_classes, **kwargs)
        except ValueError:
            raise ConfigError(f"model.name '{name}': torchvision has no such model") from None
        if in_chans != 3 or small_input:
            if not hasattr(model, "conv1"):
                raise ConfigError(f"model.name '{name}': in_chans/small_input only supported for ResNets")
            if small_input:
                _small_input_stem(model, in_chans)
            else:
                c = model.conv1
                model.conv1 = nn.Conv2d(in_chans, c.out_channels, c.kernel_size, c.stride, c.padding, bias=False)
        return model
    known = sorted(RESNETS | set(CONVNETS)) + ["timm:<arch>", "tv:<arch>"]
    raise ConfigError(f"model.name '{name}': unknown model (expected one of {', '.join(known)})")


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


from .bn_hooks import BNStatsHook, bn_layers  # noqa: E402,F401
from .checkpoint import load_checkpoint, save_checkpoint  # noqa: E402,F401
