"""Read WebDataset shards as an IterableDataset, each sample exactly once per epoch.

Partitioning: the consumers are (rank, DataLoader worker) pairs, G of them.
With at least G shards each consumer takes every G-th shard of the epoch's
shard order ("shard" mode); with fewer shards every consumer scans all shards
and keeps every G-th sample ("sample" mode). Either way each sample goes to
exactly one consumer. The epoch's shard order and each consumer's shuffle
buffer are seeded by (seed, epoch[, consumer]), so an epoch replays exactly.
Ranks then differ by at most one shard's (or one sample's) worth of samples:
trainers that need equal steps use `samples_for(rank)` to drop to the minimum.
"""
from __future__ import annotations

import io
import tarfile

import numpy as np
import torch
from PIL import Image
from webdataset import tariterators

from .. import store
from ..seeding import py_rng
from ..errors import DataError
from .distributed import rank_world, worker_slot
from .transforms import to_channels
from .wds_writer import read_index

SPLIT_MODES = ("auto", "shard", "sample")


def decode_to_tensor(data: bytes, channels: int, where: str) -> torch.Tensor:
    try:
        im = Image.open(io.BytesIO(data))
        im.load()
    except Exception as exc:
        raise DataError(f"{where}: cannot decode image ({type(exc).__name__}: {exc})") from None
    if im.mode not in ("L", "RGB"):
        im = im.convert("RGB")
    arr = np.asarray(im)
    t = torch.from_numpy(arr.copy())
    t = t.unsqueeze(0) if t.ndim == 2 else t.permute(2, 0, 1).contiguous()
    return to_channels(t, channels)


def iter_shard(url: str):
    """(shard url, key, {ext: bytes}) per sample of one shard; a corrupt shard is named in the error."""
    try:
        with store.open_read(url) as stream:
            files = ({**f, "__url__": url} for f in tariterators.tar_file_iterator(stream))
            for sample in tariterators.group_by_keys(files):
                yield url, sample["__key__"], sample
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise DataError(f"{url}: corrupt or truncated shard ({type(exc).__name__}: {exc})") from None


class WebDatasetReader(torch.utils.data.IterableDataset):
    """(image, label[, key]) from split `split` of the shard directory `url`."""

    def __init__(self, url: str, split: str = "train", transform=None, channels: int = 1,
                 shuffle_buffer: int = 0, shuffle_shards: bool | None = None, seed: int = 0,
                 rank: int | None = None, world_size: int | None = None, split_by: str = "auto",
                 return_key: bool = False):
        index, classes = read_index(url)
        if split not in index["splits"]:
            raise DataError(f"{url}: no split '{split}' (has: {', '.join(index['splits']) or 'none'})")
        if split_by not in SPLIT_MODES:
            raise DataError(f"split_by '{split_by}': expected one of {', '.join(SPLIT_MODES)}")
        if channels not in (1, 3):
            raise DataError(f"data.channels: expected 1 or 3, got {channels}")
        entry = index["splits"][split]
        self.url, self.split, self.classes = url, split, classes
        self.shards = [store.join(url, s["name"]) for s in entry["shards"]]
        self.shard_sizes = [int(s["num_samples"]) for s in entry["shards"]]
        self.num_samples = int(entry["num_samples"])
        self.transform, self.channels = transform, channels
        self.shuffle_buffer = int(shuffle_buffer)
        self.shuffle_shards = bool(shuffle_buffer) if shuffle_shards is None else shuffle_shards
        self.seed, self.epoch = int(seed), 0
        self._rank, self._world = rank, world_size
        self.split_by, self.return_key = split_by, return_key

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def shard_order(self) -> list[int]:
        order = list(range(len(self.shards)))
        if self.shuffle_shards:
            py_rng(self.seed, self.epoch, "shards").shuffle(order)
        return order

    def mode(self, consumers: int) -> str:
        if self.split_by != "auto":
            return self.split_by
        return "shard" if len(self.shards) >= consumers else "sample"

    def _samples(self):
        rank, world = rank_world(self._rank, self._world)
        worker, workers = worker_slot()
        me, consumers = rank * workers + worker, world * workers
        order = self.shard_order()
        if self.mode(consumers) == "shard":
            for k in order[me::consumers]:
                yield from iter_shard(self.shards[k])
        else:
            j = 0
            for k in order:
                for item in iter_shard(self.shards[k]):
                    if j % consumers == me:
                        yield item
                    j += 1

    def _shuffled(self, it):
        if self.shuffle_buffer <= 1:
            yield from it
            return
        rank, world = rank_world(self._rank, self._world)
        worker, _ = worker_slot()
        rng = py_rng(self.seed, self.epoch, "buffer", rank, worker)
        buf = []
        for item in it:
            if len(buf) < self.shuffle_buffer:
                buf.append(item)
                continue
            j = rng.randrange(len(buf))
            buf[j], item = item, buf[j]
            yield item
        rng.shuffle(buf)
        yield from buf

    def __iter__(self):
        for url, key, sample in self._shuffled(self._samples()):
            ext = next((e for e in ("png", "jpg", "jpeg") if e in sample), None)
            if ext is None or "cls" not in sample:
                raise DataError(f"{url}: sample '{key}' lacks an image (.png/.jpg) or a .cls member")
            img = decode_to_tensor(sample[ext], self.channels, f"{url} member {key}.{ext}")
            label = int(sample["cls"])
            if self.transform is not None:
                img = self.transform(img)
            yield (img, label, key) if self.return_key else (img, label)

    def samples_for(self, rank: int, world: int, workers: int = 1) -> int:
        """How many samples rank `rank` receives per epoch (for equal-step trainers)."""
        consumers = world * workers
        order = self.shard_order()
        total = 0
        for w in range(workers):
            me = rank * workers + w
            if self.mode(consumers) == "shard":
                total += sum(self.shard_sizes[k] for k in order[me::consumers])
            else:
                total += len(range(me, self.num_samples, consumers))
        return total
