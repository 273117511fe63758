import json

import numpy as np
import pytest
import torch

from conftest import run_tool, write_image_folder
from engine.data import create_loader
from engine.data.ffcv_io import FFCVReader
from engine.data.wds_reader import WebDatasetReader
from engine.errors import DataError


@pytest.fixture(scope="module")
def both(tmp_path_factory):
    """One PNG ImageFolder tree written both ways through the command-line tools."""
    tmp = tmp_path_factory.mktemp("ffcv")
    root = tmp / "src"
    truth = write_image_folder(root, per_class=9, size=(10, 10))
    assert run_tool("tools/make_wds.py", root, tmp / "wds", "--shard-size", "10").returncode == 0
    r = run_tool("tools/make_ffcv.py", root, tmp / "train.beton", "--workers", "2")
    assert r.returncode == 0, r.stderr
    return root, truth, tmp / "wds", tmp / "train.beton"


def _all(loader):
    xs, ys = zip(*loader)
    return torch.cat(xs), torch.cat(ys)


def test_imagefolder_to_ffcv_keeps_labels_and_png_pixels(both):
    root, truth, _, beton = both
    x, y = _all(FFCVReader(str(beton), 4, preset="raw", channels=3, normalize=False))
    # The .beton keeps source order: sorted classes, sorted files.
    expected = [truth[k] for k in sorted(truth, key=lambda k: (truth[k][1], k))]
    assert len(y) == len(expected)
    for i, (pixels, label) in enumerate(expected):
        assert int(y[i]) == label
        assert torch.equal(x[i], torch.from_numpy(pixels.copy()).permute(2, 0, 1))


@pytest.mark.parametrize("preset,channels", [("raw", 3), ("eval", 3), ("eval", 1)])
def test_ffcv_and_wds_readers_give_the_same_batches(both, preset, channels):
    _, _, wds, beton = both
    kw = dict(split="train", preset=preset, image_size=10, crop_pct=1.0, channels=channels,
              mean=[0.5] * channels, std=[0.25] * channels)
    xa, ya = _all(create_loader(str(wds), 8, **kw))
    xb, yb = _all(create_loader(f"ffcv:{beton}", 8, **kw))
    assert xa.dtype == xb.dtype == torch.float32 and xa.shape == xb.shape == (27, channels, 10, 10)
    assert torch.equal(ya, yb) and torch.equal(xa, xb)


def test_ffcv_exactly_once_across_ranks_and_train_preset(both):
    _, _, _, beton = both
    labels = []
    for rank in range(2):
        r = FFCVReader(str(beton), 4, preset="train", size=8, channels=1, mean=[0.5], std=[0.5],
                       shuffle=True, seed=1, rank=rank, world_size=2)
        x, y = _all(r)
        assert x.shape[1:] == (1, 8, 8) and len(y) == len(r.indices)
        labels.append(sorted(r.indices))
    assert sorted(labels[0] + labels[1]) == list(range(27))


def test_inspect_json_for_both_formats(both):
    _, _, wds, beton = both
    for path in (wds, beton):
        r = run_tool("tools/inspect_shards.py", path, "--json", "--verify")
        assert r.returncode == 0, r.stderr
        info = json.loads(r.stdout)
        assert info["num_samples"] == 27 and info["num_classes"] == 3
        assert info["per_class"] == {"n01440764": 9, "n01443537": 9, "n01484850": 9}
        assert info["format"] in ("webdataset", "ffcv")


def test_ffcv_bad_inputs(tmp_path, both):
    root, _, _, beton = both
    r = run_tool("tools/make_ffcv.py", root, beton)
    assert r.returncode == 2 and "--overwrite" in r.stderr
    r = run_tool("tools/make_ffcv.py", root, tmp_path / "x.ffcv")
    assert r.returncode == 2 and ".beton" in r.stderr
    bad = tmp_path / "bad"
    write_image_folder(bad, per_class=2)
    p = bad / "n01440764" / "img_001.png"
    p.write_bytes(p.read_bytes()[:30])
    r = run_tool("tools/make_ffcv.py", bad, tmp_path / "bad.beton")
    assert r.returncode == 2 and "img_001.png" in r.stderr
    assert not (tmp_path / "bad.beton").exists()
    with pytest.raises(DataError, match="no such .beton"):
        FFCVReader(str(tmp_path / "none.beton"), 4)
