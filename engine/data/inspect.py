"""Describe (and with verify=True, fully decode) a shard directory or a .beton."""
from __future__ import annotations

import collections
import os

from .. import store
from ..errors import DataError
from ..progress import progress


def _inspect_wds(path: str, verify: bool, show_progress: bool) -> dict:
    from .wds_reader import decode_to_tensor, iter_shard
    from .wds_writer import read_index

    index, classes = read_index(path)
    out = {"format": "webdataset", "path": path, "num_classes": len(classes), "classes": classes,
           "splits": {}}
    for split, entry in index["splits"].items():
        info = {"num_samples": entry["num_samples"], "num_shards": entry["num_shards"],
                "per_class": entry["per_class"], "image_sizes": entry.get("image_sizes", {})}
        for s in entry["shards"]:
            if not store.exists(store.join(path, s["name"])):
                raise DataError(f"{store.join(path, s['name'])}: listed in index.json but missing")
        if verify:
            counts: collections.Counter = collections.Counter()
            sizes: collections.Counter = collections.Counter()
            bar = progress(total=entry["num_samples"], desc=f"verify {split}", unit="img", disable=not show_progress)
            for s in entry["shards"]:
                url = store.join(path, s["name"])
                n = 0
                for u, key, sample in iter_shard(url):
                    ext = next((e for e in ("png", "jpg", "jpeg") if e in sample), None)
                    if ext is None or "cls" not in sample:
                        raise DataError(f"{u}: member {key} lacks an image or a .cls label")
                    t = decode_to_tensor(sample[ext], 3, f"{u} member {key}.{ext}")
                    try:
                        label = int(sample["cls"])
                    except ValueError:
                        raise DataError(f"{u}: member {key}.cls is not an integer label") from None
                    if not 0 <= label < len(classes):
                        raise DataError(f"{u}: member {key}.cls = {label}, outside 0..{len(classes) - 1}")
                    counts[classes[label]] += 1
                    sizes[f"{t.shape[2]}x{t.shape[1]}"] += 1
                    n += 1
                    bar.update(1)
                if n != s["num_samples"]:
                    raise DataError(f"{url}: holds {n} samples, index.json says {s['num_samples']}")
            bar.close()
            if dict(counts) != {k: v for k, v in entry["per_class"].items() if v}:
                raise DataError(f"{path}: per-class counts of split '{split}' differ from index.json")
            info["verified"] = True
        out["splits"][split] = info
    total = collections.Counter()
    for info in out["splits"].values():
        total.update(info["per_class"])
    out["num_samples"] = sum(i["num_samples"] for i in out["splits"].values())
    out["per_class"] = {c: int(total.get(c, 0)) for c in classes}
    return out


def _inspect_ffcv(path: str, verify: bool, show_progress: bool) -> dict:
    import numpy as np
    from ffcv.reader import Reader

    from .ffcv_io import read_meta

    meta = read_meta(path)
    try:
        reader = Reader(path)
    except Exception as exc:
        raise DataError(f"{path}: not a readable .beton file ({type(exc).__name__}: {exc})") from None
    md = reader.metadata
    n = int(reader.num_samples)
    if n != meta["num_samples"]:
        raise DataError(f"{path}: holds {n} samples, its sidecar says {meta['num_samples']}")
    if list(getattr(reader, "field_names", [])) != ["image", "label"]:
        raise DataError(f"{path}: expected fields image, label (written by tools/make_ffcv.py)")
    labels = np.asarray(md["f1"])
    classes = meta["classes"]
    counts = collections.Counter(labels.tolist())
    per_class = {c: int(counts.get(i, 0)) for i, c in enumerate(classes)}
    hw = collections.Counter(f"{int(w)}x{int(h)}" for w, h in zip(md["f0"]["width"], md["f0"]["height"]))
    out = {"format": "ffcv", "path": path, "num_samples": n, "num_classes": len(classes), "classes": classes,
           "per_class": per_class, "image_sizes": dict(hw.most_common()), "write_mode": meta.get("write_mode")}
    if verify:
        from .ffcv_io import FFCVReader

        seen = 0
        bar = progress(total=n, desc="verify", unit="img", disable=not show_progress)
        try:
            # A fixed-size centre crop decodes every record whatever its size.
            for x, y in FFCVReader(path, batch_size=64, preset="eval", size=16, crop_pct=1.0, channels=3,
                                   normalize=False):
                seen += len(y)
                bar.update(len(y))
        except DataError:
            raise
        except Exception as exc:
            raise DataError(f"{path}: record {seen} cannot be decoded ({type(exc).__name__}: {exc})") from None
        bar.close()
        if seen != n:
            raise DataError(f"{path}: decoded {seen} of {n} records")
        out["verified"] = True
    return out


def inspect_shards(path: str, verify: bool = False, show_progress: bool = True) -> dict:
    from . import parse_location

    fmt, url = parse_location(path)
    if fmt == "ffcv":
        return _inspect_ffcv(url, verify, show_progress)
    if not store.exists(url):
        raise DataError(f"{url}: no such shard directory or .beton file")
    return _inspect_wds(url, verify, show_progress)


def format_report(info: dict) -> str:
    lines = [f"{info['path']}: {info['format']}, {info['num_samples']} samples, {info['num_classes']} classes"]
    if info["format"] == "webdataset":
        for split, s in info["splits"].items():
            sizes = ", ".join(f"{k} ({v})" for k, v in list(s["image_sizes"].items())[:3])
            lines.append(f"  split {split}: {s['num_samples']} samples in {s['num_shards']} shards; sizes {sizes}"
                         + ("; verified" if s.get("verified") else ""))
    else:
        sizes = ", ".join(f"{k} ({v})" for k, v in list(info["image_sizes"].items())[:3])
        lines.append(f"  write mode {info['write_mode']}; sizes {sizes}" + ("; verified" if info.get("verified") else ""))
    counts = list(info["per_class"].items())
    shown = counts if len(counts) <= 12 else counts[:6] + [("...", "")] + counts[-3:]
    lines.append("  per class: " + ", ".join(f"{c} {n}".strip() for c, n in shown))
    return "\n".join(lines)
