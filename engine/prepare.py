"""The `prepare` stage: turn the configured raw source into shards under OUT/data.

Writes OUT/data/wds/ (splits train and val, plus holdout when
data.holdout_per_class > 0: images carved out of the training source before
any stage trains on it) and, on local outputs, the FFCV files
OUT/data/ffcv/{train,val,holdout}.beton, then a manifest. A finished prepare
whose manifest matches the data settings is skipped on re-run.
"""
from __future__ import annotations

import time

from . import store
from .config import config_hash
from .data.inspect import inspect_shards
from .data.sources import carve_holdout, create_source
from .errors import DataError

DATA_KEYS = ("source", "source_train_split", "source_val_split", "shard_size", "ffcv", "holdout_per_class")


def data_dir(out: str) -> str:
    return store.join(out, "data")


def prepared_locations(cfg, out: str) -> dict[str, str]:
    """Where the train/val shards are: the config's URIs or what prepare wrote."""
    d = data_dir(out)
    fmt = cfg.data.format
    if fmt not in ("wds", "ffcv"):
        raise DataError(f"config key 'data.format': expected wds or ffcv, got '{fmt}'")
    train = cfg.data.train or (store.join(d, "ffcv", "train.beton") if fmt == "ffcv" else store.join(d, "wds"))
    # an FFCV file per split (val.beton, holdout.beton); the shard directory holds every split
    val = cfg.data.val or (store.join(d, "ffcv", f"{cfg.data.val_split}.beton") if fmt == "ffcv"
                           else store.join(d, "wds"))
    return {"train": train, "val": val}


def _settings(cfg) -> dict:
    return {k: getattr(cfg.data, k) for k in DATA_KEYS}


def run_prepare(cfg, out: str, show_progress: bool = True) -> dict:
    d = data_dir(out)
    if cfg.data.train and cfg.data.val:
        return {"skipped": True, "reason": "data.train and data.val are given", **prepared_locations(cfg, out)}
    mpath = store.join(d, store.MANIFEST)
    if store.exists(mpath):
        m = store.read_json(mpath)
        if {"holdout_per_class": 0, **m.get("settings", {})} == _settings(cfg):  # older manifests lack the key
            return {"skipped": True, "reason": "already prepared", "manifest": m}
        raise DataError(f"{mpath}: prepared with other data settings ({m.get('settings')}); "
                        f"use another --out or delete {d}")
    t0 = time.time()
    from .data.wds_writer import write_wds

    wds_dir = store.join(d, "wds")
    sources = {"train": create_source(cfg.data.source, cfg.data.source_train_split),
               "val": create_source(cfg.data.source, cfg.data.source_val_split)}
    if cfg.data.holdout_per_class:
        sources["train"], sources["holdout"] = carve_holdout(sources["train"], int(cfg.data.holdout_per_class),
                                                             cfg.seed)
    splits = list(sources)
    written = {}
    for split, src in sources.items():
        write_wds(src, wds_dir, split, cfg.data.shard_size, cfg.data.write_workers, shuffle=(split == "train"),
                  seed=cfg.seed, overwrite=True, show_progress=show_progress)
        written[f"wds/{split}"] = len(src)
        if cfg.data.ffcv and store.is_local(d):
            from .data.ffcv_io import write_ffcv

            path = store.join(d, "ffcv", f"{split}.beton")
            write_ffcv(src, path, workers=cfg.data.write_workers, overwrite=True, show_progress=show_progress)
            written[f"ffcv/{split}.beton"] = len(src)
    info = {"stage": "prepare", "settings": _settings(cfg), "config_hash": config_hash(cfg), "seed": cfg.seed,
            "written": written, "timing_s": round(time.time() - t0, 2),
            "inspect": {k: _summary(inspect_shards(store.join(d, k), show_progress=False))
                        for k in (["wds"] + [f"ffcv/{s}.beton" for s in splits if f"ffcv/{s}.beton" in written])}}
    store.write_json(mpath, {"engine_stage": "prepare", **info})
    return {"skipped": False, "manifest": info}


def _summary(info: dict) -> dict:
    keep = ("format", "num_samples", "num_classes", "per_class", "image_sizes")
    out = {k: info[k] for k in keep if k in info}
    if "splits" in info:
        out["splits"] = {s: {"num_samples": v["num_samples"], "num_shards": v["num_shards"]}
                         for s, v in info["splits"].items()}
    return out
