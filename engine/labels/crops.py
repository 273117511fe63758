"""A replayable augmentation stream for soft labels (FKD style, METHODS.md section 1).

Every random choice derives from content (DESIGN principle 5), never from a
global RNG or the order in which work runs:

- crop + flip of image `i` in epoch `e`: `derive_seed(seed, "crop", i, e)`;
- batch composition of epoch `e`: a permutation from `derive_seed(seed, "order", e)`;
- mix parameters (lambda, permutation within the batch, CutMix box) of batch
  `b` in epoch `e`: `derive_seed(seed, "mix", e, b)`.

So a labeler (relabel stage, any process, any split of the work) and a student
(post-training) regenerate exactly the same augmented batch from
(seed, epoch, batch index), and a crop can be stored as a few numbers.

A crop box is kept in relative coordinates `(i/H, j/W, h/H, w/W)` (float32;
the box is drawn in whole pixels of the image it is applied to, so
`round(rel * H)` recovers those pixels exactly). It is applied to normalised
float images with torchvision's `resized_crop` (bilinear, antialias) back to
the input size, then a horizontal flip where the flip bit is set. Mixing
(CutMix or Mixup) happens after the crops, across the batch.

Batches: `epoch_batches` splits the epoch's permutation into
`ceil(N / batch_size)` batches of near-equal size (at most `batch_size`, sizes
differ by at most one), so no batch is a lone image (BatchNorm in training
mode needs more than one value per channel). When `batch_size` divides N this
is the usual split.
"""
from __future__ import annotations

import math
from typing import Any

import torch
from torchvision.transforms.v2 import functional as TF

from ..errors import ConfigError
from ..seeding import np_rng, torch_gen

CROP_RATIO = (3.0 / 4.0, 4.0 / 3.0)
CROP_ATTEMPTS = 10  # torchvision's RandomResizedCrop tries 10 times, then falls back to a centre crop
MIX_MODES = ("none", "cutmix", "mixup")


# --------------------------------------------------------------------------- config checks
def check_relabel_config(cfg) -> None:
    scale = list(cfg.crop_scale)
    if len(scale) != 2 or not (0.0 < scale[0] <= scale[1] <= 1.0):
        raise ConfigError(f"relabel.crop_scale: expected [min, max] with 0 < min <= max <= 1, got {scale}")
    if cfg.mix not in MIX_MODES:
        raise ConfigError(f"relabel.mix '{cfg.mix}': expected one of {', '.join(MIX_MODES)}")
    if cfg.mix == "cutmix" and not cfg.cutmix_alpha > 0:
        raise ConfigError(f"relabel.cutmix_alpha: expected a positive number, got {cfg.cutmix_alpha}")
    if cfg.mix == "mixup" and not cfg.mixup_alpha > 0:
        raise ConfigError(f"relabel.mixup_alpha: expected a positive number, got {cfg.mixup_alpha}")


# --------------------------------------------------------------------------- batches
def epoch_batches(num_images: int, batch_size: int, seed: int, epoch: int) -> list[torch.Tensor]:
    """The batches (int64 index tensors) of one epoch, from a permutation derived
    from (seed, "order", epoch); see the module docstring for the size rule."""
    if num_images < 1:
        raise ConfigError(f"epoch_batches: expected at least one image, got {num_images}")
    if batch_size < 1:
        raise ConfigError(f"eval.batch_size: expected a positive number, got {batch_size}")
    perm = torch.randperm(num_images, generator=torch_gen(seed, "order", int(epoch)))
    return list(torch.tensor_split(perm, math.ceil(num_images / batch_size)))


# --------------------------------------------------------------------------- crops
def crop_box(seed: int, image_index: int, epoch: int, height: int, width: int, scale=(0.08, 1.0),
             ratio=CROP_RATIO, flip: bool = True) -> tuple[tuple[float, float, float, float], bool]:
    """Random resized crop of image `image_index` in `epoch`: ((i/H, j/W, h/H, w/W), flip).

    torchvision's RandomResizedCrop.get_params algorithm, with a fixed number of
    draws from a generator seeded by (seed, "crop", image_index, epoch)."""
    u = torch.rand(CROP_ATTEMPTS * 4 + 1, generator=torch_gen(seed, "crop", int(image_index), int(epoch)),
                   dtype=torch.float64).tolist()
    area = height * width
    log_r0, log_r1 = math.log(ratio[0]), math.log(ratio[1])
    box = None
    for a in range(CROP_ATTEMPTS):
        u0, u1, u2, u3 = u[4 * a:4 * a + 4]
        target = area * (scale[0] + (scale[1] - scale[0]) * u0)
        aspect = math.exp(log_r0 + (log_r1 - log_r0) * u1)
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            i = min(int(u2 * (height - h + 1)), height - h)
            j = min(int(u3 * (width - w + 1)), width - w)
            box = (i, j, h, w)
            break
    if box is None:  # centre crop at the nearest allowed aspect ratio (torchvision's fallback)
        in_ratio = width / height
        if in_ratio < ratio[0]:
            w, h = width, int(round(width / ratio[0]))
        elif in_ratio > ratio[1]:
            h, w = height, int(round(height * ratio[1]))
        else:
            w, h = width, height
        box = ((height - h) // 2, (width - w) // 2, h, w)
    i, j, h, w = box
    return (i / height, j / width, h / height, w / width), bool(flip and u[-1] < 0.5)


def crop_boxes(seed: int, indices, epoch: int, height: int, width: int, cfg) -> tuple[torch.Tensor, torch.Tensor]:
    """Boxes (n, 4) float32 in relative coordinates and flip bits (n,) bool for a batch."""
    boxes, flips = [], []
    scale = tuple(float(s) for s in cfg.crop_scale)
    for idx in torch.as_tensor(indices).tolist():
        b, f = crop_box(seed, idx, epoch, height, width, scale, CROP_RATIO, bool(cfg.flip))
        boxes.append(b)
        flips.append(f)
    return (torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4), torch.tensor(flips, dtype=torch.bool))


def box_pixels(box, height: int, width: int) -> tuple[int, int, int, int]:
    """Relative (i/H, j/W, h/H, w/W) -> whole pixels (top, left, h, w) of an H x W image."""
    i, j, h, w = (float(v) for v in box)
    top, left = int(round(i * height)), int(round(j * width))
    hh, ww = max(1, int(round(h * height))), max(1, int(round(w * width)))
    return top, left, min(hh, height - top), min(ww, width - left)


def apply_crops(images: torch.Tensor, boxes: torch.Tensor, flips: torch.Tensor) -> torch.Tensor:
    """Crop every image (N, C, H, W) to its box, resize back to (H, W) (bilinear,
    antialias) and flip where set."""
    n, _, height, width = images.shape
    if len(boxes) != n or len(flips) != n:
        raise ValueError(f"apply_crops: {n} images but {len(boxes)} boxes and {len(flips)} flips")
    out = []
    for k, (box, flip) in enumerate(zip(boxes.tolist(), flips.tolist())):
        top, left, h, w = box_pixels(box, height, width)
        x = TF.resized_crop(images[k], top, left, h, w, [height, width], antialias=True)
        out.append(TF.horizontal_flip(x) if flip else x)
    return torch.stack(out) if out else images[:0].clone()


# --------------------------------------------------------------------------- batch mixing
def mix_params(seed: int, epoch: int, batch_idx: int, batch_len: int, height: int, width: int,
               cfg) -> dict[str, Any] | None:
    """CutMix / Mixup parameters of one batch, from (seed, "mix", epoch, batch_idx).

    Returns None for `mix: none`, else {"mode", "lam", "perm", "box"}: `perm`
    (int64, positions within the batch) names each sample's partner, `lam` is the
    weight of the sample itself (for CutMix the share of pixels it keeps, after
    clipping the box), `box` the pasted region (i/H, j/W, h/H, w/W) or None."""
    if cfg.mix == "none":
        return None
    if cfg.mix not in MIX_MODES:
        raise ConfigError(f"relabel.mix '{cfg.mix}': expected one of {', '.join(MIX_MODES)}")
    rng = np_rng(seed, "mix", int(epoch), int(batch_idx))
    alpha = float(cfg.cutmix_alpha if cfg.mix == "cutmix" else cfg.mixup_alpha)
    lam = float(rng.beta(alpha, alpha))
    perm = torch.from_numpy(rng.permutation(batch_len).astype("int64"))
    box = None
    if cfg.mix == "cutmix":
        cut = math.sqrt(1.0 - lam)
        cut_h, cut_w = int(height * cut), int(width * cut)
        cy, cx = int(rng.integers(0, height)), int(rng.integers(0, width))
        y1, y2 = max(cy - cut_h // 2, 0), min(cy + cut_h // 2, height)
        x1, x2 = max(cx - cut_w // 2, 0), min(cx + cut_w // 2, width)
        lam = 1.0 - (y2 - y1) * (x2 - x1) / (height * width)
        box = (y1 / height, x1 / width, (y2 - y1) / height, (x2 - x1) / width)
    return {"mode": cfg.mix, "lam": lam, "perm": perm, "box": box}


def apply_mix(images: torch.Tensor, mix: dict[str, Any] | None) -> torch.Tensor:
    if mix is None:
        return images
    perm = mix["perm"].to(images.device)
    if mix["mode"] == "mixup":
        lam = mix["lam"]
        return lam * images + (1.0 - lam) * images[perm]
    if mix["mode"] == "cutmix":
        _, _, height, width = images.shape
        i, j, h, w = (float(v) for v in mix["box"])
        top, left = int(round(i * height)), int(round(j * width))
        bottom, right = top + int(round(h * height)), left + int(round(w * width))
        out = images.clone()
        out[:, :, top:bottom, left:right] = images[perm][:, :, top:bottom, left:right]
        return out
    raise ConfigError(f"relabel.mix '{mix['mode']}': expected one of {', '.join(MIX_MODES)}")


def augment_batch(images: torch.Tensor, indices, seed: int, epoch: int, batch_idx: int,
                  cfg) -> tuple[torch.Tensor, dict[str, Any] | None]:
    """Augment one batch from the replayable stream.

    `images` (n, C, H, W) normalised float are the batch's images in batch order:
    row k is image `indices[k]` (the caller gathers them). `cfg` is the `relabel`
    config section (crop_scale, flip, mix, cutmix_alpha, mixup_alpha). Returns
    the augmented batch at the same size and the mix info (None for no mixing)."""
    _, _, height, width = images.shape
    boxes, flips = crop_boxes(seed, indices, epoch, height, width, cfg)
    out = apply_crops(images, boxes, flips)
    mix = mix_params(seed, epoch, batch_idx, len(out), height, width, cfg)
    return apply_mix(out, mix), mix


# --------------------------------------------------------------------------- normalisation
def normalise_images(images: torch.Tensor, mean, std) -> torch.Tensor:
    """uint8 (N, C, H, W) -> float32 (x / 255 - mean) / std; float input is taken
    as already normalised and returned as float32. The one conversion every
    labeler and student uses, so their pixels agree bit for bit."""
    if images.dtype == torch.uint8:
        c = images.shape[1]
        if len(mean) != c or len(std) != c:
            raise ConfigError(f"data.mean/data.std: expected {c} values for {c}-channel images, "
                              f"got {len(mean)} and {len(std)}")
        m = torch.tensor(list(mean), dtype=torch.float32, device=images.device).view(1, -1, 1, 1)
        s = torch.tensor(list(std), dtype=torch.float32, device=images.device).view(1, -1, 1, 1)
        return (images.to(torch.float32) / 255.0 - m) / s
    if not images.is_floating_point():
        raise ConfigError(f"images: expected uint8 or normalised float tensors, got {images.dtype}")
    return images.to(torch.float32)
