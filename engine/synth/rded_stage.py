"""RDED as a synthesis stage: settings, and the unit factory the coordinator runs.

    rded_worker(config, out, locs) -> work(unit) -> ({"images", "labels"}, info)

A unit is (class block, IPC range) as for SC-DD (engine.cluster.plan.plan_units). Per unit the
worker takes, for each class of the block, a seeded choice of `synth.rded.num_real` training
images (engine.data.realsets.pick_per_class, purpose "rded-real": the same images whichever unit or
worker asks), reads them from the training shards and runs engine.synth.rded.rded_unit. Every unit
selects over all IPC indices of its classes (so that patches stay distinct across units), then
stitches only its own range: units of one class block repeat the crop scoring, so
synth.ipc_per_unit = synth.ipc is the cheapest split for this method.

The unit's info (its manifest) records, per image, the key, box and score of every patch, the pool
of real keys per class, per-class statistics (teacher agreement of the stitched images, mean scores)
and the seconds spent reading images and selecting.

Settings: `synth.rded` (engine.config.RdedConfig).
"""
from __future__ import annotations

import time

from ..errors import ConfigError

REAL_PURPOSE = "rded-real"


def check_rded_config(cfg):
    """Fail with one line before any worker starts: the rded settings against data.image_size and synth.ipc."""
    from .rded import check_rded_args

    rcfg = cfg.synth.rded
    check_rded_args(rcfg.factor, int(cfg.data.image_size), rcfg.candidates_per_image, rcfg.crop_scale,
                    rcfg.crop_ratio, rcfg.score_input, num_real=rcfg.num_real, ipc=int(cfg.synth.ipc))
    if rcfg.score_batch_size < 1:
        raise ConfigError(f"synth.rded.score_batch_size: expected a positive number, got {rcfg.score_batch_size}")
    return rcfg


def settings_for_hash(cfg) -> dict:
    """What decides rded's images (for run_synthesize's settings_hash): the unit split, IPC and synth.rded."""
    return {"synth": {"ipc": int(cfg.synth.ipc), "class_block": int(cfg.synth.class_block),
                      "ipc_per_unit": int(cfg.synth.ipc_per_unit), "rded": cfg.synth.rded},
            "seed": int(cfg.seed), "method": "rded"}


def real_pool(labels, keys: list[str], classes: list[int], num_real: int, seed: int) -> dict[int, list[str]]:
    """The `num_real` training keys of each class RDED draws its patches from (a seeded choice)."""
    import numpy as np

    from ..data.realsets import pick_per_class

    for c in classes:
        have = int(np.count_nonzero(labels == c))
        if have < num_real:
            raise ConfigError(f"synth.rded.num_real: class {c} has {have} training images, {num_real} requested")
    picks = pick_per_class(labels, classes, num_real, seed, REAL_PURPOSE)
    return {c: [keys[i] for i in picks[c]] for c in classes}


def rded_worker(config: dict, out: str, locs: dict):
    """Unit factory (engine.cluster.workers): load the teacher once, return `work(unit)`."""
    import torch

    from ..data import shard_info
    from ..data.realsets import cached_labels, load_images
    from ..runtime import pick_device
    from ..teacher import load_teacher
    from .rded import rded_unit

    from ..config import from_dict, to_dict

    cfg = from_dict(config)
    rcfg = check_rded_config(cfg)
    device = pick_device(cfg.device)
    classes = shard_info(locs["train"], cfg.data.train_split)["classes"]
    teacher, _ = load_teacher(out, len(classes), device)
    labels_cache = cached_labels(locs["train"], cfg.data.train_split)

    def work(unit):
        t0 = time.perf_counter()
        keys, labels = labels_cache()
        pool = real_pool(labels, keys, unit.classes, rcfg.num_real, cfg.seed)
        imgs = load_images(locs["train"], cfg.data.train_split, [k for c in unit.classes for k in pool[c]],
                           cfg.data.channels)
        t1 = time.perf_counter()
        res = rded_unit(teacher, {c: [imgs[k] for k in pool[c]] for c in unit.classes}, unit.classes,
                        (unit.ipc_start, unit.ipc_end), ipc=int(cfg.synth.ipc), factor=rcfg.factor,
                        candidates_per_image=rcfg.candidates_per_image, num_real=rcfg.num_real,
                        crop_scale=tuple(rcfg.crop_scale), crop_ratio=tuple(rcfg.crop_ratio),
                        image_size=int(cfg.data.image_size), mean=list(cfg.data.mean), std=list(cfg.data.std),
                        seed=int(cfg.seed), device=device, score_batch_size=rcfg.score_batch_size,
                        score_input=rcfg.score_input)
        t2 = time.perf_counter()
        images = [{"class": e["class"], "ipc": e["ipc"],
                   "patches": [{"key": pool[e["class"]][p["real"]], **{k: v for k, v in p.items() if k != "real"}}
                               for p in e["patches"]]} for e in res["provenance"]]
        info = {"method": "rded", "seed": int(cfg.seed), "settings": to_dict(rcfg),
                "images": images, "real_keys": {str(c): pool[c] for c in unit.classes},
                "classes": {str(c): s for c, s in res["stats"].items()},
                "teacher_agreement": round(sum(s["teacher_agreement"] for s in res["stats"].values())
                                           / len(res["stats"]), 4),
                "load_seconds": round(t1 - t0, 3), "select_seconds": round(t2 - t1, 3),
                "threads": torch.get_num_threads(), "device": str(device)}
        return {"images": res["images"], "labels": res["labels"]}, info

    return work
