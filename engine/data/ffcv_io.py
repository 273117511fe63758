"""FFCV: write a source as a .beton file and read it as (image, label) batches.

FFCV stores RGB; grey sources are written with the grey value in all three
channels and the reader converts to `channels` with the same integer formula
PIL uses, so both readers give identical tensors. Class names and counts live
in a sidecar `DEST.beton.json` (FFCV files carry no class names).

The .beton is written under a temporary name and renamed when complete.
"""
from __future__ import annotations

import collections
import json
import os
import time

import numpy as np
import torch

from .. import store
from ..errors import DataError
from .sources import Source, decode_image
from .transforms import PRESETS, eval_resize, normalizer, to_channels

WRITE_MODES = ("auto", "raw", "jpg", "smart")


def sidecar(path: str) -> str:
    return path + ".json"


class _AsRGB:
    """Index -> (HWC uint8 RGB array, label) for ffcv's DatasetWriter.

    ffcv's writer waits forever when a worker process raises, so an image that
    cannot be decoded is logged to `bad_log` (one line per image, appended by
    whichever worker met it) and replaced by a placeholder; the caller then
    discards the file and reports the log."""

    def __init__(self, source: Source, bad_log: str):
        self.source, self.bad_log = source, bad_log

    def __len__(self):
        return len(self.source)

    def __getitem__(self, i):
        s = self.source[i]
        try:
            im = decode_image(s.data, self.source.where(s.key)).convert("RGB")
        except DataError as exc:
            with open(self.bad_log, "a") as f:
                f.write(f"{exc}\n")
            return np.zeros((1, 1, 3), np.uint8), s.label
        return np.asarray(im), s.label


def _auto_mode(source: Source) -> str:
    files = getattr(source, "files", None)
    if files is not None and any(os.path.splitext(f)[1].lower() in (".jpg", ".jpeg") for f, _ in files):
        return "jpg"  # already lossy: keep the file small
    return "raw"  # PNG / arrays: keep every pixel


def write_ffcv(source: Source, dest: str, max_res: int | None = None, jpeg_quality: int = 90,
               write_mode: str = "auto", workers: int = 1, overwrite: bool = False,
               show_progress: bool = True) -> dict:
    from ffcv.fields import IntField, RGBImageField
    from ffcv.writer import DatasetWriter

    if write_mode not in WRITE_MODES:
        raise DataError(f"--write-mode '{write_mode}': expected one of {', '.join(WRITE_MODES)}")
    if not dest.endswith(".beton"):
        raise DataError(f"{dest}: expected a path ending in .beton")
    if not store.is_local(dest):
        raise DataError(f"{dest}: FFCV files are written to a local path (copy it to shared storage afterwards)")
    if os.path.exists(dest) and not overwrite:
        raise DataError(f"{dest}: exists (refusing to overwrite; pass --overwrite)")
    if not 1 <= jpeg_quality <= 100:
        raise DataError(f"--jpeg-quality: expected 1-100, got {jpeg_quality}")
    mode = _auto_mode(source) if write_mode == "auto" else write_mode
    counts = collections.Counter(source.label(i) for i in range(len(source)))
    os.makedirs(os.path.dirname(os.path.abspath(dest)), exist_ok=True)
    tmp = f"{dest}{store.TMP_MARK}{os.getpid()}"
    t0 = time.time()
    fields = {"image": RGBImageField(write_mode=mode, max_resolution=max_res, jpeg_quality=jpeg_quality),
              "label": IntField()}
    bad_log = tmp + ".bad"
    try:
        writer = DatasetWriter(tmp, fields, num_workers=max(1, workers))
        if not show_progress:
            os.environ.setdefault("TQDM_DISABLE", "1")
        writer.from_indexed_dataset(_AsRGB(source, bad_log))
        if os.path.exists(bad_log):
            with open(bad_log) as f:
                bad = f.read().splitlines()
            raise DataError(f"{bad[0]} ({len(bad)} unreadable image(s); {dest} not written)")
        os.replace(tmp, dest)
    finally:
        for p in (tmp, bad_log):
            if os.path.exists(p):
                os.remove(p)
    meta = {"format": "ffcv", "version": 1, "num_samples": len(source), "classes": list(source.classes),
            "per_class": {source.classes[c]: int(counts.get(c, 0)) for c in range(len(source.classes))},
            "source": source.describe(), "write_mode": mode, "max_res": max_res,
            "jpeg_quality": jpeg_quality, "write_seconds": round(time.time() - t0, 2)}
    store.write_json(sidecar(dest), meta)
    return meta


def read_meta(path: str) -> dict:
    if not os.path.exists(path):
        raise DataError(f"{path}: no such .beton file")
    if not os.path.exists(sidecar(path)):
        raise DataError(f"{sidecar(path)}: missing (class names of {os.path.basename(path)}; written by tools/make_ffcv.py)")
    return store.read_json(sidecar(path))


class FFCVReader:
    """Batches (images NCHW, labels) from a .beton, matching WebDatasetReader + DataLoader.

    Each rank reads indices rank, rank + world, ...: every sample once per epoch."""

    def __init__(self, path: str, batch_size: int, preset: str = "eval", size: int | None = None,
                 crop_pct: float = 0.875, channels: int = 1, mean=None, std=None, normalize: bool = True,
                 shuffle: bool = False, seed: int = 0, rank: int | None = None, world_size: int | None = None,
                 num_workers: int = 1, drop_last: bool = False, scale=(0.08, 1.0)):
        from ffcv.fields.basics import IntDecoder
        from ffcv.fields.rgb_image import (CenterCropRGBImageDecoder, RandomResizedCropRGBImageDecoder,
                                           SimpleRGBImageDecoder)
        from ffcv.loader import Loader, OrderOption
        from ffcv.transforms import RandomHorizontalFlip, Squeeze, ToTensor, ToTorchImage

        from .distributed import rank_world

        meta = read_meta(path)
        if preset not in PRESETS:
            raise DataError(f"data preset '{preset}': expected one of {', '.join(PRESETS)}")
        if preset != "raw" and not size:
            raise DataError(f"data.image_size: needed for preset '{preset}'")
        if channels not in (1, 3):
            raise DataError(f"data.channels: expected 1 or 3, got {channels}")
        self.classes, self.num_samples = meta["classes"], int(meta["num_samples"])
        rank, world = rank_world(rank, world_size)
        self.indices = list(range(rank, self.num_samples, world))
        if preset == "train":
            dec = [RandomResizedCropRGBImageDecoder((size, size), scale=tuple(scale)), RandomHorizontalFlip()]
        elif preset == "eval":
            # FFCV's centre crop takes a square of side ratio * short side, then resizes to `size`:
            # the same window as torchvision's resize(size / crop_pct) + centre crop(size).
            dec = [CenterCropRGBImageDecoder((size, size), ratio=size / eval_resize(size, crop_pct))]
        else:
            dec = [SimpleRGBImageDecoder()]
        self.loader = Loader(path, batch_size=batch_size, num_workers=max(1, num_workers),
                             order=OrderOption.RANDOM if shuffle else OrderOption.SEQUENTIAL,
                             seed=seed, indices=self.indices, drop_last=drop_last,
                             pipelines={"image": dec + [ToTensor(), ToTorchImage(channels_last=False)],
                                        "label": [IntDecoder(), ToTensor(), Squeeze(1)]})
        self.channels, self.normalize = channels, normalize
        self.norm = normalizer(mean, std) if normalize else None

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        # FFCV reuses its batch buffers for later batches: hand out copies.
        for images, labels in self.loader:
            x = to_channels(images, self.channels)
            if self.norm is not None:
                x = self.norm(x)
            elif x is images:
                x = x.clone()
            yield x, labels.to(torch.int64, copy=True)
