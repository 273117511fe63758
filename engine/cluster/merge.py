"""Merge unit results into OUT/distilled/: WebDataset shards in class order + manifest."""
from __future__ import annotations

import torch

from .. import store
from ..data.sources import ArraySource
from ..data.wds_writer import write_wds
from ..errors import EngineError
from .plan import Unit
from .unitstore import load_unit

DISTILLED = "distilled"


def gather_units(out: str, units: list[Unit]) -> tuple[torch.Tensor, torch.Tensor, list[dict]]:
    """All units' images in (class, IPC index) order, each exactly once."""
    by_key: dict[tuple[int, int], tuple[torch.Tensor, int, dict]] = {}
    for u in units:
        res, manifest = load_unit(out, u)
        imgs, labels = res["images"], res["labels"]
        k = 0
        for c in u.classes:
            for i in range(u.ipc_start, u.ipc_end):
                if int(labels[k]) != c:
                    raise EngineError(f"unit {u.id}: image {k} has label {int(labels[k])}, expected class {c}")
                if (c, i) in by_key:
                    raise EngineError(f"unit {u.id}: class {c} IPC index {i} already made by another unit")
                by_key[(c, i)] = (imgs[k], c, {"class": c, "ipc": i, "unit": u.id,
                                               "unit_seconds": manifest.get("seconds")})
                k += 1
    keys = sorted(by_key)
    images = torch.stack([by_key[k][0] for k in keys])
    labels = torch.tensor([by_key[k][1] for k in keys], dtype=torch.int64)
    return images, labels, [by_key[k][2] for k in keys]


def merge_distilled(out: str, units: list[Unit], classes: list[str], ipc: int, info: dict) -> dict:
    images, labels, provenance = gather_units(out, units)
    counts = torch.bincount(labels, minlength=len(classes))
    if not bool((counts == ipc).all()):
        raise EngineError(f"merge: expected {ipc} images for each of {len(classes)} classes, got {counts.tolist()}")
    arr = images.permute(0, 2, 3, 1).numpy()
    arr = arr[..., 0] if arr.shape[-1] == 1 else arr
    src = ArraySource(arr, labels.numpy(), classes, "distilled", out)
    dest = store.join(out, DISTILLED)
    write_wds(src, dest, split="train", shard_size=10000, overwrite=True, show_progress=False)
    store.write_manifest(dest, {"stage": "synthesize", "ipc": ipc, "num_classes": len(classes),
                                "num_images": len(labels), "images": provenance, **info})
    return {"dest": dest, "num_images": len(labels)}


def read_distilled(out_or_dir: str) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """uint8 images (N, C, H, W), labels and class names of a distilled/ artifact, in class order."""
    from ..data.wds_reader import WebDatasetReader

    d = out_or_dir if store.exists(store.join(out_or_dir, "index.json")) else store.join(out_or_dir, DISTILLED)
    store.read_manifest(d, verify=True)
    # every image, also inside a data-parallel worker (the reader would otherwise take its rank's share)
    reader = WebDatasetReader(d, "train", channels=_channels(d), return_key=True, rank=0, world_size=1)
    items = sorted(((k, x, y) for x, y, k in reader), key=lambda t: t[0])
    return torch.stack([x for _, x, _ in items]), torch.tensor([y for _, _, y in items]), reader.classes


def _channels(d: str) -> int:
    m = store.read_json(store.join(d, store.MANIFEST))
    return int(m.get("channels", 1))
