"""Raw data sources: ImageFolder trees, IDX files (Fashion-MNIST), sklearn digits.

A source is an indexed collection of (encoded image bytes, extension, class
index) with class names. ImageFolder files are passed through unchanged;
array sources are encoded as PNG (lossless). Choose one with a URI:

    imagefolder:DIR | DIR          one folder per class (ImageNet's nXXXXXXXX kept)
    fashion-mnist:DIR              the IDX files (train / t10k), .gz or plain
    digits:                        sklearn's 8x8 digits (train/val split 4:1)
"""
from __future__ import annotations

import gzip
import io
import os
import struct
from dataclasses import dataclass

import numpy as np
from PIL import Image

from ..errors import DataError

IMAGE_EXTS = {".jpg": "jpg", ".jpeg": "jpg", ".png": "png"}
FASHION_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                   "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]


@dataclass(frozen=True)
class Sample:
    key: str  # stable id within the source (relative path or index)
    data: bytes  # encoded image
    ext: str  # "jpg" | "png"
    label: int


def encode_png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG", optimize=False, compress_level=1)
    return buf.getvalue()


def decode_image(data: bytes, where: str) -> Image.Image:
    """Fully decode (not just the header), so a truncated file is caught here."""
    try:
        im = Image.open(io.BytesIO(data))
        im.load()
        return im
    except Exception as exc:
        raise DataError(f"{where}: cannot decode image ({type(exc).__name__}: {exc})") from None


class Source:
    name: str = "source"
    classes: list[str]
    location: str

    def __len__(self) -> int:
        raise NotImplementedError

    def label(self, i: int) -> int:
        raise NotImplementedError

    def __getitem__(self, i: int) -> Sample:
        raise NotImplementedError

    def describe(self) -> str:
        return f"{self.name}:{self.location}"

    def where(self, key: str) -> str:
        """How error messages name one sample (a file path for ImageFolder)."""
        return f"{self.describe()}#{key}"


class ArraySource(Source):
    """Images held in memory as uint8 arrays (N, H, W) or (N, H, W, 3)."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, classes: list[str], name: str, location: str):
        self.images, self.labels, self.classes = images, labels.astype(np.int64), classes
        self.name, self.location = name, location

    def __len__(self) -> int:
        return len(self.labels)

    def label(self, i: int) -> int:
        return int(self.labels[i])

    def __getitem__(self, i: int) -> Sample:
        return Sample(key=f"{i:08d}", data=encode_png(self.images[i]), ext="png", label=int(self.labels[i]))


def _read_idx(path: str) -> np.ndarray:
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        raise DataError(f"{path}: no such IDX file") from None
    except (OSError, EOFError) as exc:
        raise DataError(f"{path}: cannot read IDX file ({exc})") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise DataError(f"{path}: not an IDX file of unsigned bytes (bad magic number)")
    ndim = raw[3]
    dims = struct.unpack(f">{ndim}I", raw[4:4 + 4 * ndim])
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise DataError(f"{path}: IDX header says {dims} but holds {data.size} bytes (truncated?)")
    return data.reshape(dims)


def _find(directory: str, stem: str) -> str:
    for name in (stem, stem + ".gz"):
        p = os.path.join(directory, name)
        if os.path.exists(p):
            return p
    raise DataError(f"{directory}: no {stem}[.gz] (expected the Fashion-MNIST IDX files)")


def fashion_mnist(directory: str, split: str) -> ArraySource:
    prefix = {"train": "train", "test": "t10k", "val": "t10k"}.get(split)
    if prefix is None:
        raise DataError(f"fashion-mnist:{directory}: unknown split '{split}' (expected train, test or val)")
    if not os.path.isdir(directory):
        raise DataError(f"{directory}: no such directory (install Debian's dataset-fashion-mnist or set the path)")
    images = _read_idx(_find(directory, f"{prefix}-images-idx3-ubyte"))
    labels = _read_idx(_find(directory, f"{prefix}-labels-idx1-ubyte"))
    if len(images) != len(labels):
        raise DataError(f"{directory}: {len(images)} images but {len(labels)} labels in split {split}")
    return ArraySource(images, labels, list(FASHION_CLASSES), "fashion-mnist", directory)


def digits(split: str) -> ArraySource:
    from sklearn.datasets import load_digits

    d = load_digits()
    images = np.round(d.images * (255.0 / 16.0)).astype(np.uint8)
    idx = np.arange(len(images))
    if split == "train":
        keep = idx % 5 != 0
    elif split in ("val", "test"):
        keep = idx % 5 == 0
    else:
        raise DataError(f"digits: unknown split '{split}' (expected train, val or test)")
    return ArraySource(images[keep], d.target[keep], [str(c) for c in range(10)], "digits", "sklearn")


class ImageFolderSource(Source):
    """One folder per class; class index = position of the folder name in sorted order."""

    name = "imagefolder"

    def __init__(self, root: str):
        self.location = root
        if not os.path.isdir(root):
            raise DataError(f"{root}: no such directory (expected an ImageFolder tree: one folder per class)")
        classes = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
        if not classes:
            raise DataError(f"{root}: no class folders (expected one folder per class)")
        files: list[tuple[str, int]] = []
        for ci, cname in enumerate(classes):
            cdir = os.path.join(root, cname)
            names = sorted(n for n in os.listdir(cdir)
                           if os.path.splitext(n)[1].lower() in IMAGE_EXTS and not n.startswith("."))
            if not names:
                raise DataError(f"{cdir}: class folder has no images (expected .jpg, .jpeg or .png files)")
            files.extend((f"{cname}/{n}", ci) for n in names)
        self.classes, self.files = classes, files

    def __len__(self) -> int:
        return len(self.files)

    def where(self, key: str) -> str:
        return os.path.join(self.location, key)

    def label(self, i: int) -> int:
        return self.files[i][1]

    def __getitem__(self, i: int) -> Sample:
        rel, label = self.files[i]
        path = os.path.join(self.location, rel)
        try:
            with open(path, "rb") as f:
                data = f.read()
        except OSError as exc:
            raise DataError(f"{path}: cannot read ({exc.strerror})") from None
        return Sample(key=rel, data=data, ext=IMAGE_EXTS[os.path.splitext(rel)[1].lower()], label=label)


class SubsetSource(Source):
    """A view of `parent` at the given positions (keys, labels and classes kept)."""

    def __init__(self, parent: Source, indices, part: str):
        self.parent, self.indices = parent, np.asarray(indices, dtype=np.int64)
        self.classes, self.name = parent.classes, parent.name
        self.location = f"{parent.location}[{part}]"

    def __len__(self) -> int:
        return len(self.indices)

    def where(self, key: str) -> str:
        return self.parent.where(key)

    def label(self, i: int) -> int:
        return self.parent.label(int(self.indices[i]))

    def __getitem__(self, i: int) -> Sample:
        return self.parent[int(self.indices[i])]


def carve_holdout(source: Source, per_class: int, seed: int) -> tuple[Source, Source]:
    """(rest, holdout): `per_class` images of every class moved to a held-out split, a seeded,
    class-stratified choice. Settings are chosen on the holdout so the test split is read once."""
    from ..seeding import np_rng

    labels = np.asarray([source.label(i) for i in range(len(source))], dtype=np.int64)
    held = []
    for c in range(len(source.classes)):
        pool = np.flatnonzero(labels == c)
        if len(pool) <= per_class:
            raise DataError(f"{source.describe()}: class '{source.classes[c]}' has {len(pool)} training images; "
                            f"data.holdout_per_class={per_class} would leave none to train on")
        held.append(np_rng(seed, "holdout", c).choice(pool, size=per_class, replace=False))
    held_idx = np.sort(np.concatenate(held))
    rest_idx = np.setdiff1d(np.arange(len(source)), held_idx)
    return SubsetSource(source, rest_idx, "train"), SubsetSource(source, held_idx, "holdout")


SOURCE_KINDS = ("imagefolder", "fashion-mnist", "digits")


def create_source(uri: str, split: str = "train") -> Source:
    """A source from its URI; `split` selects the split of multi-split sources."""
    kind, sep, rest = uri.partition(":")
    if sep and kind in SOURCE_KINDS:
        if kind == "fashion-mnist":
            return fashion_mnist(rest, split)
        if kind == "digits":
            return digits(split)
        return ImageFolderSource(rest)
    if os.path.isdir(uri):
        return ImageFolderSource(uri)
    if not os.path.exists(uri):
        raise DataError(f"{uri}: no such source (expected a directory or one of "
                        f"{', '.join(k + ':' for k in SOURCE_KINDS)})")
    raise DataError(f"{uri}: not a supported source (expected an ImageFolder directory or one of "
                    f"{', '.join(k + ':' for k in SOURCE_KINDS)})")
