"""Export any engine Source as an ImageFolder tree (torchvision / timm layout).

    DEST/<class folder>/<source index>.jpg|png
    DEST/classes.json   {"classes": [original names], "folders": [folder names]}

Class folder names are made filesystem-safe (Fashion-MNIST's "T-shirt/top"
becomes "T-shirt-top"); classes.json keeps the original names, both lists in
the source's class order (class i of the source is classes[i], written to
folders[i]). Note that ImageFolder readers number classes by sorted folder
name, which may differ from the source's order. A class that gets no image
(a --limit below the number of classes) gets no folder, since ImageFolder
readers reject empty class folders.

Each image is written under a temporary name and renamed into place, so an
interrupted export never leaves a truncated image under an image name.
"""
from __future__ import annotations

import io
import json
import os
import shutil
import uuid

from PIL import Image

from ..errors import DataError
from ..progress import progress
from ..store import TMP_MARK, is_temporary
from .sources import IMAGE_EXTS, Source, decode_image

FORMATS = ("jpg", "png")
CLASSES = "classes.json"
_UNSAFE = set('/\\:*?"<>|')


def safe_folder_names(classes: list[str]) -> list[str]:
    """One filesystem-safe, unique, non-hidden folder name per class, in order."""
    out: list[str] = []
    seen: set[str] = set()
    for i, name in enumerate(classes):
        s = "".join("-" if (c in _UNSAFE or ord(c) < 32) else c for c in str(name)).strip()
        if s.startswith("."):
            s = "_" + s[1:]  # hidden folders are skipped by ImageFolder readers
        if not s:
            s = f"class_{i}"
        base, k = s, 1
        while s in seen:  # two names that differ only in unsafe characters
            k += 1
            s = f"{base}_{k}"
        seen.add(s)
        out.append(s)
    return out


def select_indices(source: Source, limit: int | None = None, per_class: int | None = None) -> list[int]:
    """Source indices to export: at most `per_class` of each class (first in source order), then the
    first `limit` taken round-robin over classes (class 0's first, class 1's first, ..., class 0's
    second, ...), so a limit gives balanced classes. Returned in source order."""
    if limit is not None and limit < 0:
        raise DataError(f"--limit: expected a non-negative number of samples, got {limit}")
    if per_class is not None and per_class < 0:
        raise DataError(f"--per-class: expected a non-negative number of samples, got {per_class}")
    n = len(source)
    if limit is None and per_class is None:
        return list(range(n))
    by_class: list[list[int]] = [[] for _ in source.classes]
    for i in range(n):
        c = source.label(i)
        if not 0 <= c < len(by_class):
            raise DataError(f"{source.describe()}: sample {i} has label {c} outside 0..{len(by_class) - 1}")
        by_class[c].append(i)
    if per_class is not None:
        by_class = [idx[:per_class] for idx in by_class]
    if limit is None:
        return sorted(i for idx in by_class for i in idx)
    chosen: list[int] = []
    r = 0
    while len(chosen) < limit:
        took = False
        for idx in by_class:
            if r < len(idx):
                chosen.append(idx[r])
                took = True
                if len(chosen) == limit:
                    break
        if not took:  # every class exhausted
            break
        r += 1
    return sorted(chosen)


def _looks_like_class_folder(path: str) -> bool:
    for e in os.scandir(path):
        if not e.is_file():
            return False
        if os.path.splitext(e.name)[1].lower() not in IMAGE_EXTS and not is_temporary(e.name):
            return False
    return True


def _prepare_dest(dest: str, overwrite: bool) -> None:
    """Refuse a non-empty DEST unless `overwrite`; then clear a previous export's class folders."""
    if os.path.exists(dest) and not os.path.isdir(dest):
        if not overwrite:
            raise DataError(f"{dest}: exists and is not a directory (use another DEST or --overwrite)")
        os.remove(dest)
    if os.path.isdir(dest) and os.listdir(dest):
        if not overwrite:
            raise DataError(f"{dest}: exists and is not empty (refusing to overwrite; pass --overwrite)")
        # Stale class folders would be read as classes: remove them, but only folders that hold
        # nothing but images, so a mistaken DEST does not lose unrelated data.
        entries = list(os.scandir(dest))
        for e in entries:
            if e.is_dir(follow_symlinks=False) and not _looks_like_class_folder(e.path):
                raise DataError(f"{e.path}: holds more than images, so {dest} does not look like an ImageFolder "
                                f"export (refusing to clear it; remove it yourself or use another DEST)")
        for e in entries:
            if e.is_dir(follow_symlinks=False):
                shutil.rmtree(e.path)
            elif e.name == CLASSES or is_temporary(e.name):
                os.remove(e.path)
    try:
        os.makedirs(dest, exist_ok=True)
    except OSError as exc:
        raise DataError(f"{dest}: cannot create the folder ({exc.strerror or exc})") from None


def _encode(im: Image.Image, size: int | None, fmt: str, quality: int) -> bytes:
    if im.mode == "P":
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
    elif im.mode not in ("L", "LA", "RGB", "RGBA"):
        im = im.convert("RGB")
    if size is not None and im.size != (size, size):
        im = im.resize((size, size), Image.Resampling.BICUBIC)  # antialiased when shrinking
    buf = io.BytesIO()
    if fmt == "jpg":
        if im.mode in ("LA", "RGBA"):  # JPEG has no alpha: composite on white
            base = Image.new("RGB" if im.mode == "RGBA" else "L", im.size, "white")
            base.paste(im.convert(base.mode), mask=im.getchannel("A"))
            im = base
        im.save(buf, format="JPEG", quality=quality)
    else:
        im.save(buf, format="PNG", compress_level=6)
    return buf.getvalue()


def _write_atomic(path: str, data: bytes) -> None:
    d, name = os.path.split(path)
    tmp = os.path.join(d, f".{name}{TMP_MARK}{uuid.uuid4().hex[:8]}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except OSError as exc:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise DataError(f"{path}: cannot write ({exc.strerror or exc})") from None


def export_imagefolder(source: Source, dest: str, size: int | None = None, fmt: str = "jpg",
                       quality: int = 90, limit: int | None = None, per_class: int | None = None,
                       overwrite: bool = False, show_progress: bool = True) -> dict:
    """Write `source` as DEST/<class folder>/<index>.<fmt>; returns a summary."""
    fmt = {"jpeg": "jpg"}.get(fmt.lower(), fmt.lower())
    if fmt not in FORMATS:
        raise DataError(f"--format '{fmt}': expected one of {', '.join(FORMATS)}")
    if not 1 <= int(quality) <= 100:
        raise DataError(f"--quality: expected 1-100, got {quality}")
    if size is not None and int(size) < 1:
        raise DataError(f"--size: expected a positive number of pixels, got {size}")
    if not source.classes:
        raise DataError(f"{source.describe()}: source has no classes")
    indices = select_indices(source, limit, per_class)
    _prepare_dest(dest, overwrite)
    folders = safe_folder_names(source.classes)
    width = max(8, len(str(max(len(source) - 1, 0))))
    counts = [0] * len(folders)
    bar = progress(total=len(indices), desc="export", unit="img", disable=not show_progress)
    try:
        for i in indices:
            s = source[i]
            if not 0 <= s.label < len(folders):
                raise DataError(f"{source.describe()}: sample {s.key} has label {s.label} outside "
                                f"0..{len(folders) - 1}")
            data = _encode(decode_image(s.data, source.where(s.key)), size, fmt, int(quality))
            if counts[s.label] == 0:  # folders only for classes that get images (readers reject empty ones)
                os.makedirs(os.path.join(dest, folders[s.label]), exist_ok=True)
            _write_atomic(os.path.join(dest, folders[s.label], f"{i:0{width}d}.{fmt}"), data)
            counts[s.label] += 1
            bar.update(1)
    finally:
        bar.close()
    # Written last: a tree with classes.json is a complete export.
    meta = {"classes": list(source.classes), "folders": folders}
    _write_atomic(os.path.join(dest, CLASSES), (json.dumps(meta, indent=2) + "\n").encode("utf-8"))
    return {"num_samples": len(indices), "num_classes": sum(1 for c in counts if c), "dest": dest,
            "format": fmt, "size": size,
            "per_class": {folders[c]: counts[c] for c in range(len(folders)) if counts[c]},
            "source": source.describe()}
