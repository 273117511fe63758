"""Differentiable siamese augmentation (DSA), with draws that can be replayed.

    draw = sample_dsa("color_crop_cutout_flip_scale_rotate", 32, 28, run_seed, "tesla", it, step)
    y = apply_dsa(x, draw)        # differentiable in x; same draw -> same transform, bit for bit

As in the reference DSA code (aug mode 'S'), one call applies ONE family of the
strategy string, chosen at random: color (brightness, then saturation, then
contrast), crop (a zero-filled integer shift of up to 1/8 of the size),
cutout (a zero square of 1/2 the size), flip (horizontal, p 0.5), scale
(1/1.2-1.2 per axis) or rotate (+-15 degrees). The random numbers live in the
`DSADraw`, not in a global RNG, so a draw is a value: apply it again (TESLA's
second pass, the exact mode's reverse walk) and the augmented batch is the same.

A per-sample draw (`per_batch=False`, the default) holds one parameter row per
sample and applies to batches of exactly that size. A per-batch draw
(`per_batch=True`, the reference's siamese "seed" mode) holds one row that every
sample shares: it applies to a batch of any size, so a real and a synthetic
batch of one class get the same geometric and colour transform (DataDAM).

Two deliberate differences from the reference implementation: the x and y
parameters of scale, crop and cutout are drawn independently (the reference
re-seeds before each draw when it runs in siamese mode, which makes them
equal), and the random numbers come from `engine.seeding` generators rather
than the global torch RNG.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..errors import ConfigError, EngineError
from ..seeding import torch_gen

DEFAULT_STRATEGY = "color_crop_cutout_flip_scale_rotate"
FAMILIES = ("color", "crop", "cutout", "flip", "scale", "rotate")


@dataclass(frozen=True)
class DSAParams:
    """Ranges of the reference ParamDiffAug."""

    prob_flip: float = 0.5
    scale: float = 1.2          # per-axis factor in [1/scale, scale]
    rotate_deg: float = 15.0    # angle in [-rotate_deg, rotate_deg]
    crop_pad: float = 0.125     # shift of up to round(size * crop_pad) pixels
    cutout: float = 0.5         # square of round(size * cutout) pixels
    brightness: float = 1.0     # x + (u - 0.5) * brightness
    saturation: float = 2.0     # channel-mean blend with factor u * saturation
    contrast: float = 0.5       # image-mean blend with factor u + contrast


@dataclass(frozen=True)
class DSADraw:
    """One replayable augmentation: a family and its parameter rows (CPU tensors, n rows)."""

    family: str                      # one of FAMILIES, or "none"
    n: int                           # rows: the batch size, or 1 for a per-batch draw
    size: tuple[int, int]            # (H, W) the draw was made for
    params: dict = field(default_factory=dict)

    @property
    def per_batch(self) -> bool:
        return self.n == 1


def parse_strategy(strategy: str | None) -> tuple[str, ...]:
    """'color_crop_flip' -> ('color', 'crop', 'flip'); None, '' or 'none' -> ()."""
    if strategy is None or strategy.strip().lower() in ("", "none"):
        return ()
    fams = tuple(strategy.strip().split("_"))
    bad = [f for f in fams if f not in FAMILIES]
    if bad:
        raise ConfigError(f"dsa strategy '{strategy}': unknown famil{'y' if len(bad) == 1 else 'ies'} "
                          f"{', '.join(bad)} (expected '_'-joined names from {', '.join(FAMILIES)})")
    return fams


def _size(image_size) -> tuple[int, int]:
    if isinstance(image_size, int):
        return (image_size, image_size)
    h, w = image_size
    return (int(h), int(w))


def sample_dsa(strategy: str | None, batch: int, image_size, *seed, per_batch: bool = False,
               params: DSAParams | None = None) -> DSADraw:
    """Draw one augmentation for a batch of `batch` images of `image_size` (int or (H, W)).

    `seed` is any sequence of parts for `engine.seeding.derive_seed` (run seed, stage, iteration, ...):
    the same parts give the same draw in every process."""
    p = params or DSAParams()
    fams = parse_strategy(strategy)
    h, w = _size(image_size)
    if batch < 1:
        raise EngineError(f"dsa: batch size must be at least 1, got {batch}")
    n = 1 if per_batch else int(batch)
    if not fams:
        return DSADraw("none", n, (h, w))
    g = torch_gen("dsa", *seed)
    fam = fams[int(torch.randint(len(fams), (1,), generator=g))]

    def u():
        return torch.rand(n, generator=g, dtype=torch.float64)

    if fam == "color":
        prm = {"brightness": (u() - 0.5) * p.brightness, "saturation": u() * p.saturation,
               "contrast": u() + p.contrast}
    elif fam == "crop":
        sh, sw = int(h * p.crop_pad + 0.5), int(w * p.crop_pad + 0.5)
        prm = {"shift_h": torch.randint(-sh, sh + 1, (n,), generator=g),
               "shift_w": torch.randint(-sw, sw + 1, (n,), generator=g)}
    elif fam == "cutout":
        ch, cw = int(h * p.cutout + 0.5), int(w * p.cutout + 0.5)
        # centre in [0, size] for even cutout sizes, [0, size) for odd ones (as the reference)
        oh = torch.randint(0, h + (1 - ch % 2), (n,), generator=g)
        ow = torch.randint(0, w + (1 - cw % 2), (n,), generator=g)
        prm = {"top": oh - ch // 2, "left": ow - cw // 2, "height": ch, "width": cw}
    elif fam == "flip":
        prm = {"flip": u() < p.prob_flip}
    elif fam == "scale":
        lo = 1.0 / p.scale
        prm = {"sx": u() * (p.scale - lo) + lo, "sy": u() * (p.scale - lo) + lo}
    else:  # rotate
        prm = {"angle": (u() - 0.5) * 2 * p.rotate_deg / 180 * math.pi}
    return DSADraw(fam, n, (h, w), prm)


def _rows(t: torch.Tensor, n: int, x: torch.Tensor, *, cast: bool = True) -> torch.Tensor:
    t = t.to(device=x.device, dtype=x.dtype if cast else t.dtype)
    return t.expand(n) if t.shape[0] == 1 else t


def apply_dsa(x: torch.Tensor, draw: DSADraw | None) -> torch.Tensor:
    """Apply `draw` to the batch x (N, C, H, W); differentiable in x."""
    if draw is None or draw.family == "none":
        return x
    n = x.shape[0]
    if draw.n not in (1, n):
        raise EngineError(f"dsa: a per-sample draw for {draw.n} images cannot augment a batch of {n} "
                          f"(draw one per batch with per_batch=True to share it)")
    if tuple(x.shape[-2:]) != draw.size:
        raise EngineError(f"dsa: draw made for {draw.size[0]}x{draw.size[1]} images, batch is "
                          f"{x.shape[-2]}x{x.shape[-1]}")
    p = draw.params
    fam = draw.family
    if fam == "color":
        b = _rows(p["brightness"], n, x).view(n, 1, 1, 1)
        s = _rows(p["saturation"], n, x).view(n, 1, 1, 1)
        c = _rows(p["contrast"], n, x).view(n, 1, 1, 1)
        x = x + b
        m = x.mean(dim=1, keepdim=True)
        x = (x - m) * s + m
        m = x.mean(dim=(1, 2, 3), keepdim=True)
        return (x - m) * c + m
    if fam == "crop":
        pad = (int(p["shift_h"].abs().max()), int(p["shift_w"].abs().max()))    # from the CPU draw: no sync
        return _shift(x, _rows(p["shift_h"], n, x, cast=False), _rows(p["shift_w"], n, x, cast=False), pad)
    if fam == "cutout":
        h, w = draw.size
        top = _rows(p["top"], n, x, cast=False).view(n, 1, 1)
        left = _rows(p["left"], n, x, cast=False).view(n, 1, 1)
        hh = torch.arange(h, device=x.device).view(1, h, 1)
        ww = torch.arange(w, device=x.device).view(1, 1, w)
        cut = (hh >= top) & (hh < top + p["height"]) & (ww >= left) & (ww < left + p["width"])
        return x * (~cut).to(x.dtype).unsqueeze(1)
    if fam == "flip":
        f = _rows(p["flip"], n, x, cast=False).view(n, 1, 1, 1)
        return torch.where(f, x.flip(3), x)
    if fam == "scale":
        sx, sy = _rows(p["sx"], n, x), _rows(p["sy"], n, x)
        z = torch.zeros_like(sx)
        theta = torch.stack([torch.stack([sx, z, z], 1), torch.stack([z, sy, z], 1)], 1)
        return _warp(x, theta)
    if fam == "rotate":
        a = _rows(p["angle"], n, x)
        cos, sin, z = torch.cos(a), torch.sin(a), torch.zeros_like(a)
        theta = torch.stack([torch.stack([cos, -sin, z], 1), torch.stack([sin, cos, z], 1)], 1)
        return _warp(x, theta)
    raise EngineError(f"dsa: unknown family '{fam}' in draw")


def _warp(x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    grid = F.affine_grid(theta, list(x.shape), align_corners=True)
    return F.grid_sample(x, grid, align_corners=True)


def _shift(x: torch.Tensor, dh: torch.Tensor, dw: torch.Tensor, pad: tuple[int, int]) -> torch.Tensor:
    """out[n, :, i, j] = x[n, :, i + dh[n], j + dw[n]], zero outside the image; pad >= max |shift|."""
    n, _, h, w = x.shape
    ph, pw = pad
    xp = F.pad(x, [pw, pw, ph, ph])
    rows = torch.arange(h, device=x.device).view(1, h) + dh.view(n, 1) + ph      # (N, H)
    cols = torch.arange(w, device=x.device).view(1, w) + dw.view(n, 1) + pw      # (N, W)
    bi = torch.arange(n, device=x.device).view(n, 1, 1)
    out = xp.permute(0, 2, 3, 1)[bi, rows.view(n, h, 1), cols.view(n, 1, w)]     # (N, H, W, C)
    return out.permute(0, 3, 1, 2)


def augment(x: torch.Tensor, strategy: str | None, *seed, per_batch: bool = False,
            params: DSAParams | None = None) -> tuple[torch.Tensor, DSADraw]:
    """Draw and apply in one call; returns (augmented batch, the draw for replaying it)."""
    draw = sample_dsa(strategy, x.shape[0], tuple(x.shape[-2:]), *seed, per_batch=per_batch, params=params)
    return apply_dsa(x, draw), draw
