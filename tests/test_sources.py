import gzip
import os

import numpy as np
import pytest

from conftest import FASHION_DIR
from engine.data.sources import create_source
from engine.errors import DataError


def test_imagefolder_keeps_imagenet_folder_names_and_order(image_folder):
    root, truth = image_folder
    src = create_source(str(root))
    assert src.classes == ["n01440764", "n01443537", "n01484850"]
    assert len(src) == len(truth)
    for i in range(len(src)):
        s = src[i]
        assert truth[s.key][1] == s.label == src.label(i) and s.ext == "png"


def test_fashion_mnist_idx_from_debian():
    src = create_source(f"fashion-mnist:{FASHION_DIR}", "val")
    assert len(src) == 10000 and src.classes[0] == "T-shirt/top" and src.classes[9] == "Ankle boot"
    counts = np.bincount([src.label(i) for i in range(len(src))])
    assert counts.tolist() == [1000] * 10


def test_digits_split_is_disjoint_and_complete():
    tr, va = create_source("digits:", "train"), create_source("digits:", "val")
    assert len(tr) + len(va) == 1797 and len(va) == 360


@pytest.mark.parametrize("setup,needle", [
    ("missing", "no such"),
    ("empty_class", "class folder has no images"),
    ("no_classes", "no class folders"),
])
def test_bad_imagefolder(tmp_path, setup, needle):
    root = tmp_path / "src"
    if setup == "empty_class":
        (root / "a").mkdir(parents=True)
        (root / "b").mkdir()
        (root / "a" / "x.png").write_bytes(b"")
    elif setup == "no_classes":
        root.mkdir()
    with pytest.raises(DataError) as e:
        create_source(str(root))
    assert needle in str(e.value) and str(root) in str(e.value)


def test_bad_idx_magic(tmp_path):
    d = tmp_path / "fm"
    d.mkdir()
    for stem in ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
        with gzip.open(d / f"{stem}.gz", "wb") as f:
            f.write(b"\x01\x02\x03\x04" + bytes(16))
    with pytest.raises(DataError, match="bad magic"):
        create_source(f"fashion-mnist:{d}", "test")
