import io
import os
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("ENGINE_NO_PROGRESS", "1")
FASHION_DIR = "/usr/share/datasets/fashion-mnist"


def write_image_folder(root: Path, classes=("n01440764", "n01443537", "n01484850"), per_class=7,
                       size=(12, 10), mode="RGB", ext="png", seed=0) -> dict:
    """A tiny ImageFolder tree of random images; returns {relative path: (pixels, label)}."""
    rng = np.random.default_rng(seed)
    truth = {}
    for ci, c in enumerate(classes):
        (root / c).mkdir(parents=True, exist_ok=True)
        for k in range(per_class):
            shape = (size[1], size[0], 3) if mode == "RGB" else (size[1], size[0])
            arr = rng.integers(0, 256, shape, dtype=np.uint8)
            p = root / c / f"img_{k:03d}.{ext}"
            Image.fromarray(arr, mode=mode).save(p, quality=95)
            truth[f"{c}/{p.name}"] = (np.asarray(Image.open(p).convert(mode)), ci)
    return truth


@pytest.fixture(scope="module")
def one_thread():
    """Tiny kernels run fastest on one intra-op thread, and ~10x slower when another process holds a
    core (METHODS section 6). Modules opt in with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def digits_prepared_run(tmp_path_factory):
    """An --out with sklearn digits prepared (8 px shards) and a 1-epoch supervised teacher, made
    through the CLI with the demo recipe and the DIGITS overrides; shared by the unit-factory tests."""
    from engine.cli import main
    from tests_digits import DIGITS

    out = tmp_path_factory.mktemp("digits") / "run"
    base = ["--config", "configs/demo/fashion_scdd.yaml", "--out", str(out), "--quiet", *DIGITS, "teacher.epochs=1"]
    assert main(["prepare", *base]) == 0 and main(["squeeze", *base]) == 0
    return out


@pytest.fixture
def image_folder(tmp_path):
    root = tmp_path / "imagefolder"
    truth = write_image_folder(root)
    return root, truth


def run_tool(*args, cwd=ROOT, timeout=300):
    import subprocess

    return subprocess.run([sys.executable, *map(str, args)], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "ENGINE_NO_PROGRESS": "1"})


def png_bytes(arr) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()
