"""Soft labels for the distilled images: `online` (the teacher runs on the batch
the student sees) or `stored` (per epoch: crop parameters + top-k logits).

Stored format (a dict saved with torch.save; `format` = FORMAT). A part covers
the rectangle epochs [e0, e1) x images [a, b) of the full (epoch, image) grid;
a merged, complete set covers [0, epochs) x [0, num_images). Per (epoch, image)
of the part, in that order of axes:

    values   (E', N', k) float16   teacher logits: the top-k in descending order,
                                   or all num_classes in class order when k == num_classes
    indices  (E', N', k) int16     class of each value (int32 beyond 32767 classes);
                                   None when k == num_classes (nothing to index)
    boxes    (E', N', 4) float32   crop box (i/H, j/W, h/H, w/W)
    flips    (E', N')    bool      horizontal flip
    mix      None (mix: none) or {"lam": (E', NB) float32, "boxes": (E', NB, 4) float32
             (CutMix box, zeros for Mixup), "partner": (E', N') int32 global index of the
             image mixed into this one} -- NB = batches per epoch; every part records
             lam/box for all batches of its epochs (they are tiny and seed-derived)

plus metadata: num_images, num_classes, top_k, epochs, batch_size, seed,
image_size [H, W], relabel (the config section), image_range, epoch_range,
fill_value.

Dense replay (`StoredLabeler.labels`): the top-k values are scattered into a
(n, num_classes) float32 tensor whose other entries are FILL_VALUE (-1e9).
exp(-1e9 / T) underflows to exactly 0 in float32 for any T < 1e7, so
softmax(dense / T) *is* the teacher's softmax restricted to its top-k classes and
renormalised over them (the probability mass of the other classes is dropped).

Bytes per image-epoch (`stored_bytes_per_image_epoch`): 2k (fp16 values)
+ 2k (int16 indices, 0 when k == num_classes) + 17 (box 4 x float32 + flip) [+ 4
for the mix partner + 20 / batch_size for lam and box when mixing]; the naive
format keeps 2 x num_classes bytes of fp16 logits (crop parameters not counted).
"""
from __future__ import annotations

import io
import math
from typing import Any

import torch

from ..config import to_dict
from ..errors import EngineError
from ..progress import progress as progress_bar
from .crops import (apply_crops, apply_mix, check_relabel_config, crop_boxes, epoch_batches, mix_params,
                    normalise_images)

FORMAT = "engine-stored-labels/1"
FILL_VALUE = -1e9
FP16_MAX = 65504.0
CROP_BYTES = 4 * 4 + 1  # float32 box + bool flip
_META_KEYS = ("format", "num_images", "num_classes", "top_k", "epochs", "batch_size", "seed", "image_size",
              "relabel", "fill_value")
_IMAGE_TENSORS = ("values", "indices", "boxes", "flips")


# --------------------------------------------------------------------------- sizes
def index_dtype(num_classes: int) -> torch.dtype:
    return torch.int16 if num_classes <= 32767 else torch.int32


def stored_bytes_per_image_epoch(num_classes: int, top_k: int, mix: str = "none",
                                 batch_size: int | None = None, include_crop: bool = True) -> float:
    """Bytes one (image, epoch) costs in the stored format (tensor payload)."""
    k = min(int(top_k), int(num_classes))
    n = 2 * k
    if k < num_classes:
        n += k * torch.empty((), dtype=index_dtype(num_classes)).element_size()
    if include_crop:
        n += CROP_BYTES
        if mix != "none":
            n += 4 + (20.0 / batch_size if batch_size else 0.0)
    return n


def full_logits_bytes_per_image_epoch(num_classes: int) -> int:
    """The naive format: every class's logit in fp16."""
    return 2 * int(num_classes)


def _nbytes(obj) -> int:
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_nbytes(v) for v in obj.values())
    return 0


def measured_bytes_per_image_epoch(labels: dict) -> float:
    """Tensor bytes held by a stored-labels dict (or part) per (image, epoch) it covers."""
    a, b = labels["image_range"]
    e0, e1 = labels["epoch_range"]
    total = sum(_nbytes(labels[k]) for k in _IMAGE_TENSORS) + _nbytes(labels.get("mix"))
    return total / ((b - a) * (e1 - e0))


# --------------------------------------------------------------------------- online
class OnlineLabeler:
    """Runs the frozen teacher (eval mode, no grad) on exactly the augmented batch
    the student sees. Puts `teacher` in eval mode and freezes its parameters."""

    def __init__(self, teacher: torch.nn.Module):
        self.teacher = teacher.eval()
        for p in self.teacher.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def labels(self, augmented: torch.Tensor) -> torch.Tensor:
        return self.teacher(augmented).float()


# --------------------------------------------------------------------------- stored
def _check_range(name: str, rng, limit: int) -> tuple[int, int]:
    if rng is None:
        return 0, limit
    a, b = (int(v) for v in rng)
    if not (0 <= a < b <= limit):
        raise EngineError(f"relabel {name} [{a}, {b}): out of bounds (expected 0 <= start < end <= {limit})")
    return a, b


def _relabel_dict(cfg) -> dict:
    keys = ("mode", "top_k", "crop_scale", "flip", "mix", "cutmix_alpha", "mixup_alpha")
    try:
        d = to_dict(cfg)
    except Exception:
        d = {k: getattr(cfg, k) for k in keys if hasattr(cfg, k)}
    return {k: (list(v) if isinstance(v, (list, tuple)) else v) for k, v in d.items()}


def relabel_stored(teacher: torch.nn.Module, images: torch.Tensor, mean, std, epochs: int, batch_size: int,
                   seed: int, cfg, device, image_range=None, epoch_range=None,
                   values_dtype: torch.dtype = torch.float16, progress: bool = True) -> dict:
    """Record, per epoch and batch, the crop (+ mix) parameters and the teacher's
    top-k logits (cfg.top_k; fp16 values by default) for the images in
    `image_range` over the epochs in `epoch_range` (both [start, end), default all).

    `images`: all N images (uint8, normalised with mean/std, or normalised float).
    Batches are those of `epoch_batches(N, batch_size, seed, epoch)`, the ones the
    student replays. With the full image range the teacher sees exactly the
    student's batches; a partial range runs the teacher only on the batch members
    it owns (same crops, a smaller batch: logits then agree with the online ones
    to float tolerance, not bit for bit). With mixing the partners are
    augmented too, since a mixed image needs both."""
    check_relabel_config(cfg)
    if int(cfg.top_k) < 1:
        raise EngineError(f"relabel.top_k: expected a positive number, got {cfg.top_k}")
    if values_dtype not in (torch.float16, torch.float32):
        raise EngineError(f"relabel values_dtype: expected float16 or float32, got {values_dtype}")
    device = torch.device(device)
    n_img, _, height, width = images.shape
    a, b = _check_range("image_range", image_range, n_img)
    e0, e1 = _check_range("epoch_range", epoch_range, int(epochs))
    labeler = OnlineLabeler(teacher.to(device))
    n_batches = math.ceil(n_img / batch_size)
    ep, npart = e1 - e0, b - a
    boxes = torch.zeros(ep, npart, 4, dtype=torch.float32)
    flips = torch.zeros(ep, npart, dtype=torch.bool)
    mixing = cfg.mix != "none"
    mix = None
    if mixing:
        mix = {"lam": torch.ones(ep, n_batches, dtype=torch.float32),
               "boxes": torch.zeros(ep, n_batches, 4, dtype=torch.float32),
               "partner": torch.full((ep, npart), -1, dtype=torch.int32)}
    values = indices = None
    num_classes = top_k = None
    bar = progress_bar(total=ep * n_batches, desc="relabel", unit="batch", disable=not progress)
    for e in range(e0, e1):
        for bi, idx in enumerate(epoch_batches(n_img, batch_size, seed, e)):
            bar.update(1)
            m = mix_params(seed, e, bi, len(idx), height, width, cfg)
            if m is not None:
                mix["lam"][e - e0, bi] = m["lam"]
                if m["box"] is not None:
                    mix["boxes"][e - e0, bi] = torch.tensor(m["box"], dtype=torch.float32)
            own = (idx >= a) & (idx < b)
            if not bool(own.any()):
                continue
            run = idx if mixing else idx[own]  # images that must be augmented
            bx, fl = crop_boxes(seed, run, e, height, width, cfg)
            x = normalise_images(images[run].to(device), mean, std)
            aug = apply_mix(apply_crops(x, bx, fl), m)
            if mixing:
                aug, bx, fl = aug[own.to(aug.device)], bx[own], fl[own]
                mix["partner"][e - e0, idx[own] - a] = idx[m["perm"]][own].to(torch.int32)
            logits = labeler.labels(aug).cpu()
            if values is None:
                num_classes = logits.shape[1]
                top_k = min(int(cfg.top_k), num_classes)
                values = torch.zeros(ep, npart, top_k, dtype=values_dtype)
                if top_k < num_classes:
                    indices = torch.zeros(ep, npart, top_k, dtype=index_dtype(num_classes))
            rows = idx[own] - a
            if top_k < num_classes:
                v, k = logits.topk(top_k, dim=1)
                indices[e - e0, rows] = k.to(indices.dtype)
            else:
                v = logits
            values[e - e0, rows] = v.clamp(-FP16_MAX, FP16_MAX).to(values_dtype)
            boxes[e - e0, rows] = bx
            flips[e - e0, rows] = fl
    bar.close()
    return {"format": FORMAT, "num_images": n_img, "num_classes": num_classes, "top_k": top_k,
            "epochs": int(epochs), "batch_size": int(batch_size), "seed": int(seed),
            "image_size": [int(height), int(width)], "relabel": _relabel_dict(cfg), "fill_value": FILL_VALUE,
            "image_range": [a, b], "epoch_range": [e0, e1],
            "values": values, "indices": indices, "boxes": boxes, "flips": flips, "mix": mix}


def _check_format(labels: Any, where: str = "stored labels") -> None:
    if not isinstance(labels, dict) or labels.get("format") != FORMAT:
        raise EngineError(f"{where}: not a stored-labels file (expected format '{FORMAT}')")


def merge_labels(parts: list[dict]) -> dict:
    """Merge parts (any split of epochs x images) into one complete set; every
    (image, epoch) must be covered exactly once, else EngineError."""
    if not parts:
        raise EngineError("merge stored labels: no parts given")
    for p in parts:
        _check_format(p)
    first = parts[0]
    for i, p in enumerate(parts[1:], 1):
        for key in _META_KEYS:
            if p[key] != first[key]:
                raise EngineError(f"merge stored labels: part {i} has {key}={p[key]!r}, part 0 has {first[key]!r}")
    n_img, epochs = first["num_images"], first["epochs"]
    count = torch.zeros(epochs, n_img, dtype=torch.int32)
    for p in parts:
        (a, b), (e0, e1) = p["image_range"], p["epoch_range"]
        count[e0:e1, a:b] += 1
    if bool((count != 1).any()):
        missing, dup = int((count == 0).sum()), int((count > 1).sum())
        e, i = (int(v) for v in (count != 1).nonzero()[0])
        raise EngineError(f"merge stored labels: {missing} (image, epoch) pairs missing and {dup} covered more "
                          f"than once (first: image {i}, epoch {e} covered {int(count[e, i])} times)")
    out = {k: first[k] for k in _META_KEYS}
    out.update(image_range=[0, n_img], epoch_range=[0, epochs])
    for key in _IMAGE_TENSORS:
        t = first[key]
        out[key] = None if t is None else torch.zeros((epochs, n_img) + tuple(t.shape[2:]), dtype=t.dtype)
    mixing = first["mix"] is not None
    if mixing:
        nb = first["mix"]["lam"].shape[1]
        out["mix"] = {"lam": torch.ones(epochs, nb), "boxes": torch.zeros(epochs, nb, 4),
                      "partner": torch.full((epochs, n_img), -1, dtype=torch.int32)}
        seen = torch.zeros(epochs, dtype=torch.bool)
    else:
        out["mix"] = None
    for p in parts:
        (a, b), (e0, e1) = p["image_range"], p["epoch_range"]
        for key in _IMAGE_TENSORS:
            if out[key] is not None:
                out[key][e0:e1, a:b] = p[key]
        if mixing:
            out["mix"]["partner"][e0:e1, a:b] = p["mix"]["partner"]
            for j, e in enumerate(range(e0, e1)):
                if seen[e]:
                    if not (torch.equal(out["mix"]["lam"][e], p["mix"]["lam"][j])
                            and torch.equal(out["mix"]["boxes"][e], p["mix"]["boxes"][j])):
                        raise EngineError(f"merge stored labels: parts disagree on the mix parameters of epoch {e}")
                else:
                    out["mix"]["lam"][e] = p["mix"]["lam"][j]
                    out["mix"]["boxes"][e] = p["mix"]["boxes"][j]
                    seen[e] = True
    return out


class StoredLabeler:
    """Replays stored labels: the batches, the augmented images and the dense
    teacher logits of (epoch, batch index). Needs every image (a merged set)."""

    def __init__(self, labels: dict, device="cpu"):
        _check_format(labels)
        if list(labels["image_range"]) != [0, labels["num_images"]]:
            raise EngineError(f"stored labels: cover images {labels['image_range']} only, expected all "
                              f"{labels['num_images']} (merge the parts first)")
        self.stored = labels
        self.device = torch.device(device)
        self.num_images, self.num_classes = labels["num_images"], labels["num_classes"]
        self.batch_size, self.seed = labels["batch_size"], labels["seed"]
        self.epoch_range = tuple(labels["epoch_range"])
        self._batches: dict[int, list[torch.Tensor]] = {}

    def _row(self, epoch: int) -> int:
        e0, e1 = self.epoch_range
        if not e0 <= epoch < e1:
            raise EngineError(f"stored labels: no labels for epoch {epoch} (they cover epochs [{e0}, {e1}))")
        return epoch - e0

    def batches(self, epoch: int) -> list[torch.Tensor]:
        if epoch not in self._batches:
            self._batches = {epoch: epoch_batches(self.num_images, self.batch_size, self.seed, epoch)}
        return self._batches[epoch]

    def mix(self, epoch: int, batch_idx: int, indices: torch.Tensor) -> dict | None:
        m = self.stored["mix"]
        if m is None:
            return None
        e = self._row(epoch)
        partner = m["partner"][e, indices].long()
        pos = {int(g): k for k, g in enumerate(indices.tolist())}
        try:
            perm = torch.tensor([pos[int(p)] for p in partner.tolist()], dtype=torch.int64)
        except KeyError:
            raise EngineError(f"stored labels: the mix partners of epoch {epoch} batch {batch_idx} are not in the "
                              "batch (batch size or seed differ from the stored ones)") from None
        mode = self.stored["relabel"]["mix"]
        box = tuple(m["boxes"][e, batch_idx].tolist()) if mode == "cutmix" else None
        return {"mode": mode, "lam": float(m["lam"][e, batch_idx]), "perm": perm, "box": box}

    def augment(self, images: torch.Tensor, indices: torch.Tensor, epoch: int,
                batch_idx: int) -> tuple[torch.Tensor, dict | None]:
        """The stored crops (+ mix) applied to the batch's normalised images (row k = image indices[k])."""
        e = self._row(epoch)
        out = apply_crops(images, self.stored["boxes"][e, indices], self.stored["flips"][e, indices])
        mix = self.mix(epoch, batch_idx, indices)
        return apply_mix(out, mix), mix

    def labels(self, epoch: int, batch_idx: int, indices: torch.Tensor | None = None) -> torch.Tensor:
        """Dense (n, num_classes) float32 teacher logits; see the module docstring for the fill."""
        e = self._row(epoch)
        if indices is None:
            indices = self.batches(epoch)[batch_idx]
        vals = self.stored["values"][e, indices].float()
        if self.stored["indices"] is None:
            return vals.to(self.device)
        dense = torch.full((len(indices), self.num_classes), float(self.stored["fill_value"]), dtype=torch.float32)
        dense.scatter_(1, self.stored["indices"][e, indices].long(), vals)
        return dense.to(self.device)


# --------------------------------------------------------------------------- store
def save_labels(url: str, labels: dict) -> None:
    """Write stored labels (a torch file) atomically to a path or URL."""
    from .. import store

    _check_format(labels)
    buf = io.BytesIO()
    torch.save(labels, buf)
    store.write_bytes(url, buf.getvalue())


def load_labels(url: str) -> dict:
    from .. import store

    data = store.read_bytes(url)
    try:
        labels = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise EngineError(f"{url}: cannot read stored labels ({type(exc).__name__}: "
                          f"{str(exc).splitlines()[0] if str(exc) else ''})") from None
    _check_format(labels, url)
    return labels
