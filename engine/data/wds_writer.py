"""Write a source as WebDataset tar shards, in parallel processes.

Layout of DEST (any fsspec URL; several splits may share it):
    {split}-000000.tar ...   members {key}.png|.jpg, {key}.cls, {key}.json
    classes.json             ["n01440764", ...]: class index -> name
    index.json               per split: shards, samples per shard and class, sizes

Shards are first written into a hidden staging folder inside DEST and moved
into place only when every shard of the split is complete, then index.json is
replaced atomically: an interrupted run leaves no shard that looks complete
and does not damage a split written before.
"""
from __future__ import annotations

import collections
import concurrent.futures as cf
import io
import json
import tarfile
import multiprocessing as mp
import time
import uuid

import numpy as np
import webdataset as wds

from .. import store
from ..errors import DataError
from ..progress import progress
from .sources import Source, decode_image

INDEX = "index.json"
CLASSES = "classes.json"
_SOURCE: Source | None = None  # the worker processes' copy (inherited by fork)


def shard_name(split: str, k: int) -> str:
    return f"{split}-{k:06d}.tar"


def plan_shards(n: int, shard_size: int, shuffle: bool, seed: int) -> list[np.ndarray]:
    """Sample order (optionally a seeded permutation) cut into shards."""
    if shard_size < 1:
        raise DataError(f"--shard-size: expected a positive number of samples, got {shard_size}")
    order = np.random.default_rng(seed).permutation(n) if shuffle else np.arange(n)
    return [order[i:i + shard_size] for i in range(0, n, shard_size)]


def _write_one(url: str, indices: np.ndarray, skip_bad: bool, metadata: bool, offset: int) -> dict:
    src = _SOURCE
    counts: collections.Counter = collections.Counter()
    sizes: collections.Counter = collections.Counter()
    skipped: list[str] = []
    written = 0
    with store.atomic_open(url, "wb") as f:
        # An integer mtime and USTAR: a float mtime makes tarfile add a pax header to every
        # member, doubling the bytes (and the parsing) per sample.
        sink = wds.TarWriter(f, encoder=False, mtime=0, format=tarfile.USTAR_FORMAT)
        try:
            for j, i in enumerate(indices):
                s = src[int(i)]
                try:
                    im = decode_image(s.data, src.where(s.key))
                except DataError:
                    if not skip_bad:
                        raise
                    skipped.append(s.key)
                    continue
                key = f"{offset + j:09d}"
                sample = {"__key__": key, s.ext: s.data, "cls": str(s.label).encode()}
                if metadata:
                    sample["json"] = json.dumps({"source_key": s.key, "label": s.label,
                                                 "width": im.width, "height": im.height, "mode": im.mode}).encode()
                sink.write(sample)
                counts[s.label] += 1
                sizes[f"{im.width}x{im.height}"] += 1
                written += 1
        finally:
            sink.close()  # on failure the temporary file is discarded anyway
    return {"num_samples": written, "per_class": dict(counts), "sizes": dict(sizes), "skipped": skipped}


def _init_worker(source: Source) -> None:
    global _SOURCE
    _SOURCE = source


def _check_dest(dest: str, split: str, classes: list[str], overwrite: bool) -> dict:
    """The existing index (or a new one); refuse to clobber unless asked."""
    if not store.exists(dest):
        return {"format": "webdataset", "version": 1, "splits": {}}
    if not store.isdir(dest):
        raise DataError(f"{dest}: exists and is not a directory (use another DEST or --overwrite)")
    names = store.listdir(dest)
    if INDEX not in names:
        if names and not overwrite:
            raise DataError(f"{dest}: exists and is not a shard directory (use another DEST or --overwrite)")
        return {"format": "webdataset", "version": 1, "splits": {}}
    index = store.read_json(store.join(dest, INDEX))
    has_split = split in index.get("splits", {}) or any(n.startswith(f"{split}-") for n in names)
    if has_split and not overwrite:
        raise DataError(f"{dest}: already holds split '{split}' (refusing to overwrite; pass --overwrite)")
    if CLASSES in names and not overwrite:
        old = store.read_json(store.join(dest, CLASSES))
        if old != classes:
            raise DataError(f"{store.join(dest, CLASSES)}: holds {len(old)} classes that differ from the "
                            f"source's {len(classes)} (write to another DEST or pass --overwrite)")
    return index


def write_wds(source: Source, dest: str, split: str = "train", shard_size: int = 5000, workers: int = 1,
              shuffle: bool = False, seed: int = 0, overwrite: bool = False, skip_bad: bool = False,
              metadata: bool = True, show_progress: bool = True) -> dict:
    """Write `source` as split `split` of the shard directory `dest`; returns its index entry."""
    index = _check_dest(dest, split, source.classes, overwrite)
    plan = plan_shards(len(source), shard_size, shuffle, seed)
    staging = store.join(dest, f".{split}{store.TMP_MARK}{uuid.uuid4().hex[:8]}")
    store.makedirs(dest)
    t0 = time.time()
    offsets = np.cumsum([0] + [len(p) for p in plan])
    results: list[dict | None] = [None] * len(plan)
    bar = progress(total=len(source), desc=f"wds {split}", unit="img", disable=not show_progress)
    try:
        if workers <= 1 or len(plan) == 1 or not store.is_local(dest):
            _init_worker(source)
            for k, idx in enumerate(plan):
                results[k] = _write_one(store.join(staging, shard_name(split, k)), idx, skip_bad, metadata, offsets[k])
                bar.update(len(idx))
        else:
            ctx = mp.get_context("fork")  # workers inherit the source (and its arrays) without pickling
            with cf.ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker,
                                        initargs=(source,)) as pool:
                futs = {pool.submit(_write_one, store.join(staging, shard_name(split, k)), idx, skip_bad,
                                    metadata, int(offsets[k])): k for k, idx in enumerate(plan)}
                for fut in cf.as_completed(futs):
                    k = futs[fut]
                    results[k] = fut.result()
                    bar.update(len(plan[k]))
        bar.close()
        # Every shard is complete: move them into place, then publish the index.
        old_shards = set(n for n in store.listdir(dest) if n.startswith(f"{split}-") and n.endswith(".tar"))
        shards = []
        for k, res in enumerate(results):
            name = shard_name(split, k)
            _move(store.join(staging, name), store.join(dest, name))
            old_shards.discard(name)
            shards.append({"name": name, "num_samples": res["num_samples"]})
        per_class: collections.Counter = collections.Counter()
        sizes: collections.Counter = collections.Counter()
        skipped: list[str] = []
        for res in results:
            per_class.update(res["per_class"])
            sizes.update(res["sizes"])
            skipped.extend(res["skipped"])
        entry = {
            "num_samples": int(sum(s["num_samples"] for s in shards)),
            "num_shards": len(shards),
            "shards": shards,
            "per_class": {source.classes[c]: int(per_class.get(c, 0)) for c in range(len(source.classes))},
            "image_sizes": dict(sorted(sizes.items(), key=lambda kv: -kv[1])),
            "skipped": {"count": len(skipped), "keys": skipped[:100]},
            "source": source.describe(),
            "shuffled": bool(shuffle),
            "seed": int(seed),
            "shard_size": int(shard_size),
            "write_seconds": round(time.time() - t0, 2),
        }
        index.setdefault("splits", {})[split] = entry
        store.write_json(store.join(dest, CLASSES), list(source.classes))
        store.write_json(store.join(dest, INDEX), index)
        for name in old_shards:  # shards of an overwritten split beyond the new count
            store.remove(store.join(dest, name))
        return entry
    finally:
        bar.close()
        store.remove(staging, recursive=True)


def _move(src: str, dst: str) -> None:
    fs, sp = store._fs(src)
    _, dp = store._fs(dst)
    fs.mv(sp, dp)


def read_index(dest: str) -> tuple[dict, list[str]]:
    """(index.json, classes) of a shard directory, with a clear error if it is not one."""
    iu, cu = store.join(dest, INDEX), store.join(dest, CLASSES)
    if not store.exists(dest):
        raise DataError(f"{dest}: no such shard directory")
    if not store.exists(iu):
        raise DataError(f"{iu}: missing (not a shard directory written by tools/make_wds.py, or an interrupted write)")
    index = store.read_json(iu)
    classes = store.read_json(cu) if store.exists(cu) else None
    if not isinstance(index, dict) or "splits" not in index:
        raise DataError(f"{iu}: expected an object with 'splits'")
    if classes is None:
        raise DataError(f"{cu}: missing (expected the class names of the shard directory)")
    return index, classes
