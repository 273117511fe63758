import io
import os
import tarfile

import numpy as np
import pytest
import torch

from conftest import run_tool, write_image_folder
from engine import store
from engine.data import create_dataset, create_loader
from engine.data.sources import ArraySource, create_source
from engine.data.wds_reader import WebDatasetReader
from engine.data.wds_writer import write_wds
from engine.errors import DataError


def test_imagefolder_to_wds_keeps_labels_and_png_pixels(image_folder, tmp_path):
    root, truth = image_folder
    dest = tmp_path / "shards"
    r = run_tool("tools/make_wds.py", root, dest, "--shard-size", "5", "--workers", "2", "--shuffle")
    assert r.returncode == 0, r.stderr
    reader = WebDatasetReader(str(dest), "train", channels=3, return_key=True)
    seen = {}
    for img, label, key in reader:
        seen[key] = (img, label)
    assert len(seen) == len(truth)
    # Map back to the source file through the per-sample .json metadata.
    import json
    for shard in sorted(dest.glob("train-*.tar")):
        with tarfile.open(shard) as tf:
            for m in tf.getmembers():
                if m.name.endswith(".json"):
                    meta = json.load(tf.extractfile(m))
                    key = m.name[:-5]
                    pixels, label = truth[meta["source_key"]]
                    img, got = seen[key]
                    assert got == label == meta["label"]
                    assert torch.equal(img, torch.from_numpy(pixels).permute(2, 0, 1))
    classes = store.read_json(str(dest / "classes.json"))
    assert classes == ["n01440764", "n01443537", "n01484850"]
    index = store.read_json(str(dest / "index.json"))["splits"]["train"]
    assert index["num_shards"] == 5 and sum(s["num_samples"] for s in index["shards"]) == 21
    assert index["per_class"] == {c: 7 for c in classes}


def _source(n=60, classes=4):
    rng = np.random.default_rng(1)
    imgs = rng.integers(0, 256, (n, 6, 6), dtype=np.uint8)
    labels = np.arange(n) % classes
    return ArraySource(imgs, labels, [f"c{i}" for i in range(classes)], "arrays", "test")


@pytest.mark.parametrize("shard_size,mode", [(5, "shard"), (60, "sample")])
def test_exactly_once_across_2_workers_x_2_ranks(tmp_path, shard_size, mode):
    dest = str(tmp_path / "s")
    write_wds(_source(), dest, shard_size=shard_size, show_progress=False)
    keys = []
    for rank in range(2):
        ds = WebDatasetReader(dest, "train", shuffle_buffer=7, seed=3, rank=rank, world_size=2, return_key=True)
        assert ds.mode(4) == mode
        ds.set_epoch(1)
        dl = torch.utils.data.DataLoader(ds, batch_size=4, num_workers=2)
        rank_keys = [k for _, _, ks in dl for k in ks]
        assert len(rank_keys) == ds.samples_for(rank, 2, workers=2)
        keys += rank_keys
    assert len(keys) == 60 and len(set(keys)) == 60


def test_shuffle_is_seeded_by_epoch(tmp_path):
    dest = str(tmp_path / "s")
    write_wds(_source(), dest, shard_size=10, show_progress=False)

    def order(epoch, seed=0):
        ds = WebDatasetReader(dest, "train", shuffle_buffer=16, seed=seed, return_key=True)
        ds.set_epoch(epoch)
        return [k for _, _, k in ds]

    assert order(0) == order(0)
    assert order(0) != order(1)
    assert sorted(order(0)) == sorted(order(1))


def test_memory_url_roundtrip():
    dest = "memory://wds-test/shards"
    write_wds(_source(20), dest, shard_size=8, show_progress=False)
    ds = create_dataset(dest, "train", preset="raw", normalize=False, return_key=True)
    got = sorted((k, int(y)) for _, y, k in ds)
    assert [y for _, y in got] == [i % 4 for i in range(20)]
    store.remove("memory://wds-test", recursive=True)


def test_truncated_tar_is_named(tmp_path):
    dest = tmp_path / "s"
    write_wds(_source(), str(dest), shard_size=30, show_progress=False)
    shard = dest / "train-000001.tar"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2 + 100])
    with pytest.raises(DataError) as e:
        list(WebDatasetReader(str(dest), "train"))
    assert "train-000001.tar" in str(e.value)
    r = run_tool("tools/inspect_shards.py", dest, "--verify")
    assert r.returncode != 0 and "train-000001.tar" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_corrupt_member_named_by_verify(tmp_path, image_folder):
    root, _ = image_folder
    dest = tmp_path / "s"
    write_wds(create_source(str(root)), str(dest), shard_size=100, show_progress=False)
    shard = dest / "train-000000.tar"
    # Rewrite one image member with garbage bytes of the same length.
    with tarfile.open(shard) as tf:
        members = [(m, tf.extractfile(m).read()) for m in tf.getmembers()]
    with tarfile.open(shard, "w") as tf:
        for m, b in members:
            if m.name == "000000003.png":
                b = b"\x89PNG garbage".ljust(len(b), b"x")
            m.size = len(b)
            tf.addfile(m, io.BytesIO(b))
    r = run_tool("tools/inspect_shards.py", dest, "--verify")
    assert r.returncode == 2 and "train-000000.tar member 000000003.png" in r.stderr


def test_dest_exists_refused_unless_overwrite(tmp_path, image_folder):
    root, _ = image_folder
    dest = tmp_path / "s"
    assert run_tool("tools/make_wds.py", root, dest).returncode == 0
    before = {p.name: p.read_bytes() for p in dest.iterdir()}
    r = run_tool("tools/make_wds.py", root, dest, "--shard-size", "4")
    assert r.returncode == 2 and "--overwrite" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert {p.name: p.read_bytes() for p in dest.iterdir()} == before
    r = run_tool("tools/make_wds.py", root, dest, "--shard-size", "4", "--overwrite")
    assert r.returncode == 0
    assert len(list(dest.glob("train-*.tar"))) == 6  # stale shard of the old layout removed
    other = tmp_path / "notshards"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    r = run_tool("tools/make_wds.py", root, other)
    assert r.returncode == 2 and "not a shard directory" in r.stderr
    assert (other / "keep.txt").read_text() == "mine"


def test_unreadable_image_fails_or_is_skipped(tmp_path):
    root = tmp_path / "src"
    write_image_folder(root, per_class=3)
    bad = root / "n01443537" / "img_001.png"
    bad.write_bytes(bad.read_bytes()[:40])  # truncated PNG
    r = run_tool("tools/make_wds.py", root, tmp_path / "a")
    assert r.returncode == 2 and "img_001.png" in r.stderr and "cannot decode" in r.stderr
    assert not (tmp_path / "a" / "index.json").exists() and not list((tmp_path / "a").glob("*.tar"))
    r = run_tool("tools/make_wds.py", root, tmp_path / "b", "--skip-bad")
    assert r.returncode == 0 and "1 skipped" in r.stdout
    idx = store.read_json(str(tmp_path / "b" / "index.json"))["splits"]["train"]
    assert idx["num_samples"] == 8 and idx["skipped"]["count"] == 1


class _DiesHalfway(ArraySource):
    def __getitem__(self, i):
        if i == 37:
            raise KeyboardInterrupt  # the user pressed Ctrl-C in the middle of shard 3
        return super().__getitem__(i)


def test_interrupted_write_leaves_no_complete_looking_shard(tmp_path):
    src = _source()
    dest = tmp_path / "s"
    write_wds(src, str(dest), split="val", shard_size=10, show_progress=False)
    before = {p.name: p.read_bytes() for p in dest.iterdir()}
    dying = _DiesHalfway(src.images, src.labels, src.classes, "arrays", "test")
    with pytest.raises(KeyboardInterrupt):
        write_wds(dying, str(dest), split="train", shard_size=10, show_progress=False)
    # Neither train shards nor staging leftovers; the val split is untouched.
    assert {p.name: p.read_bytes() for p in dest.iterdir()} == before
    assert "train" not in store.read_json(str(dest / "index.json"))["splits"]


def test_missing_split_and_bad_location(tmp_path):
    dest = str(tmp_path / "s")
    write_wds(_source(), dest, show_progress=False)
    with pytest.raises(DataError, match="no split 'val'"):
        WebDatasetReader(dest, "val")
    with pytest.raises(DataError, match="index.json"):
        create_loader(str(tmp_path), 4, normalize=False)
