"""RDED: realistic, diverse patches of real images, selected by the teacher and stitched
(Sun et al., "On the Diversity and Realism of Distilled Dataset", CVPR 2024; METHODS.md section 5).

Per class, from `num_real` real images of the class:

1. every real image gives `candidates_per_image` random resized crops (area `crop_scale` of the
   image, aspect `crop_ratio` -- square in the reference), each resized to a patch of
   image_size / factor pixels (bilinear, antialias) and rounded to uint8;
2. the teacher scores every crop by its cross-entropy to the class (lower = more realistic /
   representative for the teacher). For factor > 1 a patch is zero-padded in normalised space to
   image_size before the forward pass, as the reference does (`score_input="pad"`), or upsampled
   to image_size (`score_input="resize"`);
3. each real image keeps its best crop; the images are ranked by that score (stable: ties keep the
   order of the given images) and the best ipc * factor^2 are used, so no two patches of a class come
   from the same real image, hence never the same crop;
4. each synthetic image is a factor x factor grid of patches. As in the reference's `mix_images`,
   grid cell q (row-major) of IPC index t holds rank q * ipc + t: every image gets one patch from
   each quality tier, and image t depends only on (class, t, seed) and the given real images, not on
   which IPC indices share its unit. factor = 1 is RDED's factor-1 mode: the selected crop, resized
   to image_size, is the image.

Reference settings (LINs-lab/RDED, scripts/*.sh and argument.py): `--num-crop 5` candidates per
image, `--mipc 300` real images per class (argparse default 600), `--factor 2` at ImageNet scale
(224 px) and 1 for CIFAR-10/100 and Tiny-ImageNet, RandomResizedCrop with scale (0.08, 1) and
ratio (1, 1). The soft labels come later from the relabel / online-teacher stage, on crops of the
stitched images.

Determinism: crop boxes derive from (seed, "rded-crop", class, position of the real image among the
given ones, candidate index) through torchvision's RandomResizedCrop algorithm
(engine.labels.crops.crop_box); nothing depends on a global RNG or on scheduling order.
"""
from __future__ import annotations

import time
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.transforms.v2 import functional as TF

from ..errors import ConfigError, EngineError
from ..labels.crops import box_pixels, crop_box, normalise_images
from ..seeding import derive_seed

SCORE_INPUTS = ("pad", "resize")


# ---------------------------------------------------------------------------
# checks
# ---------------------------------------------------------------------------

def check_rded_args(factor: int, image_size: int, candidates_per_image: int = 1, crop_scale=(0.08, 1.0),
                    crop_ratio=(1.0, 1.0), score_input: str = "pad", num_real: int | None = None,
                    ipc: int | None = None) -> None:
    """One-line ConfigErrors (named by their synth.rded.* key) for settings RDED cannot use."""
    if int(factor) != factor or factor < 1:
        raise ConfigError(f"synth.rded.factor: expected an integer >= 1, got {factor}")
    if image_size < 1 or image_size % int(factor):
        raise ConfigError(f"synth.rded.factor: data.image_size {image_size} is not divisible by factor {factor} "
                          f"(the {factor} x {factor} patches must tile the image)")
    if int(candidates_per_image) != candidates_per_image or candidates_per_image < 1:
        raise ConfigError(f"synth.rded.candidates_per_image: expected an integer >= 1, got {candidates_per_image}")
    s = [float(v) for v in crop_scale]
    if len(s) != 2 or not (0.0 < s[0] <= s[1] <= 1.0):
        raise ConfigError(f"synth.rded.crop_scale: expected [min, max] with 0 < min <= max <= 1, got {list(crop_scale)}")
    r = [float(v) for v in crop_ratio]
    if len(r) != 2 or not (0.0 < r[0] <= r[1]):
        raise ConfigError(f"synth.rded.crop_ratio: expected [min, max] with 0 < min <= max, got {list(crop_ratio)}")
    if score_input not in SCORE_INPUTS:
        raise ConfigError(f"synth.rded.score_input '{score_input}': expected one of {', '.join(SCORE_INPUTS)}")
    if num_real is not None and ipc is not None and num_real < ipc * int(factor) ** 2:
        raise ConfigError(f"synth.rded.num_real: {num_real} real images per class give at most {num_real} distinct "
                          f"patches, IPC {ipc} x factor {factor}^2 needs {ipc * int(factor) ** 2}")


# ---------------------------------------------------------------------------
# 1. crops
# ---------------------------------------------------------------------------

def _image_list(images) -> list[torch.Tensor]:
    if isinstance(images, torch.Tensor):
        if images.dim() != 4:
            raise EngineError(f"rded: expected real images as (N, C, H, W), got shape {tuple(images.shape)}")
        images = list(images)
    out = list(images)
    for k, x in enumerate(out):
        if x.dtype != torch.uint8 or x.dim() != 3:
            raise EngineError(f"rded: real image {k}: expected a uint8 (C, H, W) tensor, got {x.dtype} "
                              f"{tuple(x.shape)}")
    return out


def crop_seed(seed: int, class_index: int) -> int:
    """The seed of a class's crop boxes (box of real image j, candidate m: crop_box(crop_seed, j, m, ...))."""
    return derive_seed(seed, "rded-crop", int(class_index))


def sample_crops(images, num_crops: int, patch_size: int, *, scale=(0.08, 1.0), ratio=(1.0, 1.0),
                 seed: int = 0, class_index: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """`num_crops` seeded random resized crops of every real image.

    `images`: uint8 (N, C, H, W) or a list of uint8 (C, H, W) of any sizes. Returns
    (crops, boxes): uint8 (N, num_crops, C, patch_size, patch_size), each crop resized from its box
    (bilinear, antialias) and rounded; int64 (N, num_crops, 4) boxes (top, left, height, width) in
    pixels of their source image. Box (j, m) is torchvision's RandomResizedCrop drawn from
    (seed, "rded-crop", class_index, j, m): the same arguments give the same boxes and bytes."""
    imgs = _image_list(images)
    if num_crops < 1 or patch_size < 1:
        raise EngineError(f"rded: expected num_crops >= 1 and patch_size >= 1, got {num_crops} and {patch_size}")
    cseed = crop_seed(seed, class_index)
    sc, ra = tuple(float(v) for v in scale), tuple(float(v) for v in ratio)
    crops, boxes = [], []
    for j, x in enumerate(imgs):
        _, h_img, w_img = x.shape
        xf = x.to(torch.float32)
        for m in range(num_crops):
            rel, _ = crop_box(cseed, j, m, h_img, w_img, sc, ra, flip=False)
            top, left, h, w = box_pixels(rel, h_img, w_img)
            c = TF.resized_crop(xf, top, left, h, w, [patch_size, patch_size], antialias=True)
            crops.append(c.round_().clamp_(0, 255).to(torch.uint8))
            boxes.append((top, left, h, w))
    n, ch = len(imgs), (imgs[0].shape[0] if imgs else 1)
    if not crops:
        return (torch.zeros(0, num_crops, ch, patch_size, patch_size, dtype=torch.uint8),
                torch.zeros(0, num_crops, 4, dtype=torch.int64))
    return (torch.stack(crops).view(n, num_crops, ch, patch_size, patch_size),
            torch.tensor(boxes, dtype=torch.int64).view(n, num_crops, 4))


# ---------------------------------------------------------------------------
# 2. scores
# ---------------------------------------------------------------------------

def _teacher_input(x: torch.Tensor, image_size: int | None, score_input: str) -> torch.Tensor:
    if image_size is None or x.shape[-1] == image_size:
        return x
    if score_input == "resize":
        return F.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False, antialias=True)
    dh, dw = image_size - x.shape[-2], image_size - x.shape[-1]  # reference `pad`: zeros around, centred
    return F.pad(x, (dw // 2, dw - dw // 2, dh // 2, dh - dh // 2))


@torch.no_grad()
def score_crops(teacher: nn.Module, crops: torch.Tensor, class_index: int, mean: Sequence[float],
                std: Sequence[float], batch_size: int = 256, device="cpu", *, image_size: int | None = None,
                score_input: str = "pad") -> torch.Tensor:
    """Cross-entropy of the teacher to `class_index` for every crop (lower = better), float32 (M,) on the CPU.

    `crops`: uint8 (M, C, p, p) (or any leading shape ending in C, p, p: flattened). They are
    normalised with (mean, std) and, when `image_size` is given and larger than p, zero-padded
    (`score_input="pad"`, the reference) or upsampled ("resize") to image_size. The teacher is used
    as given (call it in eval mode); a teacher whose logits do not cover the class is refused."""
    if score_input not in SCORE_INPUTS:
        raise ConfigError(f"synth.rded.score_input '{score_input}': expected one of {', '.join(SCORE_INPUTS)}")
    if batch_size < 1:
        raise ConfigError(f"synth.rded.score_batch_size: expected a positive number, got {batch_size}")
    flat = crops.reshape(-1, *crops.shape[-3:])
    out = []
    for i in range(0, len(flat), batch_size):
        x = normalise_images(flat[i:i + batch_size].to(device), mean, std)
        logits = teacher(_teacher_input(x, image_size, score_input)).float()
        if logits.dim() != 2 or logits.shape[1] <= class_index:
            raise EngineError(f"rded: the teacher outputs {logits.shape[-1]} classes, class {class_index} is not "
                              f"among them (teacher and data disagree on the class count)")
        ce = -torch.log_softmax(logits, 1)[:, class_index]
        out.append(ce.cpu())
    return torch.cat(out) if out else torch.zeros(0)


# ---------------------------------------------------------------------------
# 3. + 4. selection and stitching
# ---------------------------------------------------------------------------

def select_patches(scores: torch.Tensor, count: int, class_index: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """From (N, m) crop scores: each real image's best candidate (lowest CE, first on ties), the images
    ranked by it (stable sort), the best `count`. Returns (image positions, candidate indices), both (count,)."""
    n = scores.shape[0]
    if n < count:
        raise EngineError(f"rded: class {class_index} has {n} real images, {count} needed "
                          f"(one patch each: IPC x factor^2 distinct patches)")
    best, cand = scores.min(1)  # first minimum on ties
    order = torch.sort(best, stable=True).indices[:count]
    return order, cand[order]


def stitch(patches: torch.Tensor, factor: int) -> torch.Tensor:
    """(factor^2, C, p, p) patches -> one (C, factor*p, factor*p) image, patch q at grid cell
    (q // factor, q % factor)."""
    k = int(factor)
    q, c, p, _ = patches.shape
    if q != k * k:
        raise EngineError(f"rded: stitching needs {k * k} patches for factor {k}, got {q}")
    return patches.view(k, k, c, p, p).permute(2, 0, 3, 1, 4).reshape(c, k * p, k * p)


def select_and_stitch(crops: torch.Tensor, boxes: torch.Tensor, scores: torch.Tensor, class_index: int,
                      ipc_range: tuple[int, int], *, ipc: int, factor: int) -> tuple[torch.Tensor, list]:
    """The class's images for IPC indices ipc_range from its scored crops.

    crops (N, m, C, p, p) uint8, boxes (N, m, 4), scores (N, m). Ranks the best ipc * factor^2 real
    images (select_patches); IPC index t gets ranks q * ipc + t for q = 0 .. factor^2 - 1, patch q at
    grid cell (q // factor, q % factor). Returns uint8 (len(range), C, factor*p, factor*p) and per
    image the provenance of its patches in cell order: {"real", "candidate", "box", "score", "rank", "cell"}."""
    i0, i1 = int(ipc_range[0]), int(ipc_range[1])
    if not (0 <= i0 < i1 <= ipc):
        raise EngineError(f"rded: IPC range [{i0}, {i1}) is not inside [0, {ipc})")
    factor = int(factor)
    k2 = factor ** 2
    order, cand = select_patches(scores, ipc * k2, class_index)
    images, prov = [], []
    for t in range(i0, i1):
        ranks = [q * ipc + t for q in range(k2)]
        js, ms = order[ranks], cand[ranks]
        images.append(stitch(crops[js, ms], factor))
        prov.append([{"real": int(j), "candidate": int(m), "box": [int(v) for v in boxes[j, m].tolist()],
                      "score": round(float(scores[j, m]), 6), "rank": r, "cell": [q // factor, q % factor]}
                     for q, (j, m, r) in enumerate(zip(js.tolist(), ms.tolist(), ranks))])
    return torch.stack(images), prov


# ---------------------------------------------------------------------------
# a class, a unit
# ---------------------------------------------------------------------------

def rded_class(teacher: nn.Module, real_images_uint8, class_index: int, ipc_range: tuple[int, int], *, ipc: int,
               factor: int = 2, candidates_per_image: int = 5, num_real: int | None = None,
               crop_scale=(0.08, 1.0), crop_ratio=(1.0, 1.0), image_size: int, mean: Sequence[float],
               std: Sequence[float], seed: int, device="cpu", score_batch_size: int = 256,
               score_input: str = "pad") -> dict:
    """RDED images of one class for IPC indices ipc_range (of `ipc` per class).

    `real_images_uint8`: uint8 (N, C, H, W) or a list of uint8 (C, H, W) of any sizes, the class's
    real images; the first `num_real` are used (None: all), in the given order (it breaks ties).
    Returns {"images": uint8 (len(range), C, image_size, image_size), "labels": int64 (= class_index),
    "provenance": per image a list of its factor^2 patches (real image position, candidate, box,
    score, rank, grid cell), "stats": {...}}. The images of IPC index t are the same whichever
    ipc_range they are made in (the selection covers all `ipc` indices of the class)."""
    check_rded_args(factor, image_size, candidates_per_image, crop_scale, crop_ratio, score_input)
    factor, candidates_per_image = int(factor), int(candidates_per_image)
    imgs = _image_list(real_images_uint8)
    if num_real is not None:
        if len(imgs) < num_real:
            raise EngineError(f"rded: class {class_index} has {len(imgs)} real images, synth.rded.num_real "
                              f"asks for {num_real}")
        imgs = imgs[:num_real]
    if len(imgs) < ipc * factor ** 2:
        raise EngineError(f"rded: class {class_index} has {len(imgs)} real images, IPC {ipc} x factor {factor}^2 "
                          f"needs {ipc * factor ** 2} (one patch per real image)")
    patch = image_size // factor
    t0 = time.perf_counter()
    crops, boxes = sample_crops(imgs, candidates_per_image, patch, scale=crop_scale, ratio=crop_ratio, seed=seed,
                                class_index=class_index)
    t1 = time.perf_counter()
    scores = score_crops(teacher, crops, class_index, mean, std, score_batch_size, device, image_size=image_size,
                         score_input=score_input).view(len(imgs), candidates_per_image)
    t2 = time.perf_counter()
    images, prov = select_and_stitch(crops, boxes, scores, class_index, ipc_range, ipc=ipc, factor=factor)
    with torch.no_grad():  # how the teacher sees the stitched images (soft labels come from relabelling)
        pred = teacher(normalise_images(images.to(device), mean, std)).argmax(1).cpu()
    sel = [p["score"] for ps in prov for p in ps]
    stats = {"real_images": len(imgs), "crops_scored": int(scores.numel()),
             "mean_selected_score": round(sum(sel) / len(sel), 6), "mean_candidate_score": round(float(scores.mean()), 6),
             "teacher_agreement": round(float((pred == class_index).float().mean()), 4),
             "crop_seconds": round(t1 - t0, 3), "score_seconds": round(t2 - t1, 3),
             "crops_per_s": round(scores.numel() / max(t2 - t1, 1e-9), 1)}
    return {"images": images, "labels": torch.full((len(images),), int(class_index), dtype=torch.int64),
            "provenance": prov, "stats": stats}


def rded_unit(teacher: nn.Module, real_images_by_class: dict, classes: Sequence[int], ipc_range: tuple[int, int],
              *, ipc: int, factor: int = 2, candidates_per_image: int = 5, num_real: int | None = None,
              crop_scale=(0.08, 1.0), crop_ratio=(1.0, 1.0), image_size: int, mean: Sequence[float],
              std: Sequence[float], seed: int, device="cpu", score_batch_size: int = 256,
              score_input: str = "pad") -> dict:
    """A unit (class block, IPC range): rded_class per class, class-major (for c in classes: for t in range).

    Returns {"images", "labels", "provenance" (one entry per image, with "class" and "ipc"), "stats"
    (per class)}."""
    check_rded_args(factor, image_size, candidates_per_image, crop_scale, crop_ratio, score_input)
    teacher.eval()
    images, labels, prov, stats = [], [], [], {}
    for c in classes:
        if c not in real_images_by_class:
            raise EngineError(f"rded: no real images given for class {c}")
        res = rded_class(teacher, real_images_by_class[c], c, ipc_range, ipc=ipc, factor=factor,
                         candidates_per_image=candidates_per_image, num_real=num_real, crop_scale=crop_scale,
                         crop_ratio=crop_ratio, image_size=image_size, mean=mean, std=std, seed=seed, device=device,
                         score_batch_size=score_batch_size, score_input=score_input)
        images.append(res["images"])
        labels.append(res["labels"])
        prov.extend({"class": int(c), "ipc": int(ipc_range[0]) + t, "patches": p}
                    for t, p in enumerate(res["provenance"]))
        stats[int(c)] = res["stats"]
    return {"images": torch.cat(images), "labels": torch.cat(labels), "provenance": prov, "stats": stats}
