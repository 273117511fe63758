"""Real training images by key: label scans and seeded per-class subsets.

Used for the random-real control and for initialising synthesis from real
images. Reads WebDataset shards; a label scan touches only the `.cls`
members, and only the chosen images are decoded.
"""
from __future__ import annotations

import numpy as np
import torch

from ..errors import DataError
from ..seeding import np_rng
from . import parse_location
from .wds_reader import decode_to_tensor, iter_shard
from .wds_writer import read_index


def _shards(uri: str, split: str) -> list[str]:
    from .. import store

    fmt, url = parse_location(uri)
    if fmt != "wds":
        raise DataError(f"{uri}: real-image selection reads WebDataset shards (set data.train to a shard directory)")
    index, _ = read_index(url)
    if split not in index["splits"]:
        raise DataError(f"{url}: no split '{split}'")
    return [store.join(url, s["name"]) for s in index["splits"][split]["shards"]]


def scan_labels(uri: str, split: str) -> tuple[list[str], np.ndarray]:
    """(keys, labels) of every sample of the split, in shard order."""
    keys, labels = [], []
    for shard in _shards(uri, split):
        for _, key, sample in iter_shard(shard):
            keys.append(key)
            labels.append(int(sample["cls"]))
    return keys, np.asarray(labels, dtype=np.int64)


def pick_per_class(labels: np.ndarray, classes: list[int], count: int, seed: int, purpose: str,
                   replace: bool = False) -> dict[int, list[int]]:
    """`count` distinct sample positions per class, a seeded choice (same seed -> same picks)."""
    out = {}
    for c in classes:
        pool = np.flatnonzero(labels == c)
        if len(pool) < count and not replace:
            raise DataError(f"class {c}: has {len(pool)} training images, {count} requested")
        rng = np_rng(seed, purpose, c)
        out[c] = [int(i) for i in rng.choice(pool, size=count, replace=replace)]
    return out


def load_images(uri: str, split: str, keys: list[str], channels: int) -> dict[str, torch.Tensor]:
    """uint8 (C, H, W) images for the given keys (one pass over the shards)."""
    want = set(keys)
    found: dict[str, torch.Tensor] = {}
    for shard in _shards(uri, split):
        for url, key, sample in iter_shard(shard):
            if key in want:
                ext = next(e for e in ("png", "jpg", "jpeg") if e in sample)
                found[key] = decode_to_tensor(sample[ext], channels, f"{url} member {key}.{ext}")
        if len(found) == len(want):
            break
    missing = want - set(found)
    if missing:
        raise DataError(f"{uri}: {len(missing)} requested images not found (e.g. key {sorted(missing)[0]})")
    return found


def cached_labels(url: str, split: str):
    """A callable returning `scan_labels(url, split)`, scanned on first use only (a worker's units share it)."""
    cache: dict = {}

    def get():
        if "labels" not in cache:
            cache["labels"] = scan_labels(url, split)
        return cache["labels"]

    return get
