"""Data layer: sources, shard writers, and readers chosen by URI.

    create_source("fashion-mnist:/usr/share/datasets/fashion-mnist", "train")
    create_loader("wds:/data/fmnist", split="train", preset="train", ...)
    create_loader("/data/fmnist_train.beton", preset="eval", ...)

A shard location is `wds:URL` / `ffcv:PATH`, or a bare URL: `.beton` means
FFCV, anything else a WebDataset shard directory.
"""
from __future__ import annotations

import torch

from ..errors import DataError
from .sources import Source, create_source  # noqa: F401
from .transforms import build_transform

FORMATS = ("wds", "ffcv")


def parse_location(uri: str) -> tuple[str, str]:
    """(format, url) of a shard location."""
    for fmt in FORMATS:
        if uri.startswith(fmt + ":") and not uri.startswith(fmt + "://"):
            return fmt, uri[len(fmt) + 1:]
    if not uri:
        raise DataError("data location: empty (expected a shard directory or a .beton file)")
    return ("ffcv" if uri.endswith(".beton") else "wds"), uri


def create_dataset(uri: str, split: str = "train", preset: str = "eval", image_size: int | None = None,
                   crop_pct: float = 0.875, channels: int = 1, mean=None, std=None, normalize: bool = True,
                   shuffle_buffer: int = 0, seed: int = 0, rank=None, world_size=None, return_key=False,
                   scale=(0.08, 1.0)):
    """A WebDataset reader (IterableDataset of single samples)."""
    from .wds_reader import WebDatasetReader

    fmt, url = parse_location(uri)
    if fmt != "wds":
        raise DataError(f"{uri}: create_dataset reads WebDataset shards; use create_loader for .beton files")
    reader = WebDatasetReader(url, split, channels=channels, shuffle_buffer=shuffle_buffer,
                              seed=seed, rank=rank, world_size=world_size, return_key=return_key)
    reader.transform = build_transform(preset, image_size, crop_pct, mean, std, normalize, scale)
    return reader


def create_loader(uri: str, batch_size: int, split: str = "train", preset: str = "eval",
                  image_size: int | None = None, crop_pct: float = 0.875, channels: int = 1, mean=None,
                  std=None, normalize: bool = True, shuffle: bool = False, shuffle_buffer: int = 2000,
                  seed: int = 0, rank=None, world_size=None, num_workers: int = 0, drop_last: bool = False,
                  scale=(0.08, 1.0)):
    """Batches (images NCHW, labels int64) from either format, identical for the same order.

    `split` names the split of a shard directory; a .beton holds one split."""
    fmt, url = parse_location(uri)
    if normalize and (mean is None or std is None):
        raise DataError("data.mean/data.std: needed to normalise")
    if normalize and len(mean) != channels:
        raise DataError(f"data.mean: expected {channels} values for {channels} channels, got {len(mean)}")
    if fmt == "ffcv":
        from .ffcv_io import FFCVReader

        return FFCVReader(url, batch_size, preset=preset, size=image_size, crop_pct=crop_pct,
                          channels=channels, mean=mean, std=std, normalize=normalize, shuffle=shuffle,
                          seed=seed, rank=rank, world_size=world_size, num_workers=max(1, num_workers),
                          drop_last=drop_last, scale=scale)
    ds = create_dataset(uri, split, preset, image_size, crop_pct, channels, mean, std, normalize,
                        shuffle_buffer if shuffle else 0, seed, rank, world_size, scale=scale)
    return torch.utils.data.DataLoader(ds, batch_size=batch_size, num_workers=num_workers,
                                       drop_last=drop_last, persistent_workers=False)


def loader_from_config(data_cfg, uri: str, split: str, train: bool, rank=None, world_size=None, seed: int = 0):
    """create_loader with the `data` config section's settings."""
    return create_loader(uri, data_cfg.batch_size, split=split,
                         preset=data_cfg.train_preset if train else data_cfg.eval_preset,
                         image_size=data_cfg.image_size, crop_pct=data_cfg.crop_pct, channels=data_cfg.channels,
                         mean=list(data_cfg.mean), std=list(data_cfg.std), shuffle=train,
                         shuffle_buffer=data_cfg.shuffle_buffer, seed=seed, rank=rank, world_size=world_size,
                         num_workers=data_cfg.num_workers, scale=tuple(data_cfg.train_scale))


def shard_info(uri: str, split: str = "train") -> dict:
    """num_samples and classes of a shard location without reading any image."""
    fmt, url = parse_location(uri)
    if fmt == "ffcv":
        from .ffcv_io import read_meta

        m = read_meta(url)
        return {"num_samples": int(m["num_samples"]), "classes": m["classes"],
                "labels_per_class": m["per_class"]}
    from .wds_writer import read_index

    index, classes = read_index(url)
    if split not in index["splits"]:
        raise DataError(f"{url}: no split '{split}' (has: {', '.join(index['splits']) or 'none'})")
    e = index["splits"][split]
    return {"num_samples": int(e["num_samples"]), "classes": classes, "labels_per_class": e["per_class"]}
