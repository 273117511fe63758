import json

import numpy as np

from conftest import run_tool
from engine import store
from engine.cli import STAGES, main


def test_help_lists_every_stage():
    r = run_tool("-m", "engine", "--help")
    assert r.returncode == 0
    for stage in STAGES:
        assert stage in r.stdout


def test_unbuilt_stage_is_a_clear_error(tmp_path, capsys, monkeypatch):
    # every stage is built now (experts came with issue 5): mark one as unbuilt to check the message
    monkeypatch.setitem(STAGES, "experts", ("train expert trajectories", 5))
    rc = main(["experts", "--out", str(tmp_path)])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "not built yet" in err and "issue 5" in err


def test_prepare_writes_shards_config_and_manifest_then_skips(tmp_path, capsys):
    out = tmp_path / "run"
    args = ["prepare", "--out", str(out), "--quiet", "data.source=digits:", "data.source_val_split=val",
            "data.shard_size=500", "data.image_size=8", "data.write_workers=1"]
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "1437 samples in 3 shards" in text and "360 samples in 1 shards" in text
    cfg = (out / "config.yaml").read_text()
    assert "source: 'digits:'" in cfg or "source: digits:" in cfg
    m = store.read_json(str(out / "data" / "manifest.json"))
    assert m["written"] == {"wds/train": 1437, "ffcv/train.beton": 1437, "wds/val": 360, "ffcv/val.beton": 360}
    assert (out / "data" / "ffcv" / "val.beton").exists()
    mtime = (out / "data" / "wds" / "train-000000.tar").stat().st_mtime_ns
    assert main(args) == 0
    assert "skipped, already prepared" in capsys.readouterr().out
    assert (out / "data" / "wds" / "train-000000.tar").stat().st_mtime_ns == mtime
    # Other data settings on the same --out: refused, nothing rewritten.
    assert main(args[:-1] + ["data.shard_size=100"]) == 2
    assert "prepared with other data settings" in capsys.readouterr().err
    assert (out / "data" / "wds" / "train-000000.tar").stat().st_mtime_ns == mtime


def test_unwritable_out_fails_before_work(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    rc = main(["prepare", "--out", str(blocker / "out"), "data.source=digits:"])
    assert rc == 2 and str(blocker) in capsys.readouterr().err


def test_holdout_split_is_carved_from_train_before_any_stage(tmp_path, capsys):
    """data.holdout_per_class moves a seeded, class-stratified set of training images into their own
    split: no image is in both, the train split shrinks by exactly that, and every class keeps the count."""
    from engine.data.realsets import scan_labels
    from engine.data.wds_reader import iter_shard

    out = tmp_path / "run"
    args = ["prepare", "--out", str(out), "--quiet", "data.source=digits:", "data.source_val_split=val",
            "data.shard_size=500", "data.image_size=8", "data.write_workers=1", "data.ffcv=false",
            "data.holdout_per_class=7"]
    assert main(args) == 0
    wds = str(out / "data" / "wds")
    tkeys, tlab = scan_labels(f"wds:{wds}", "train")
    hkeys, hlab = scan_labels(f"wds:{wds}", "holdout")
    assert len(hkeys) == 70 and len(tkeys) == 1437 - 70
    assert sorted(np.bincount(hlab).tolist()) == [7] * 10
    # the two splits share no source image, and together they are the whole training source
    src = {split: [json.loads(smp["json"])["source_key"] for shard in sorted((out / "data" / "wds").glob(f"{split}-*.tar"))
                   for _, _, smp in iter_shard(str(shard))] for split in ("train", "holdout")}
    assert not set(src["train"]) & set(src["holdout"])
    assert len(set(src["train"]) | set(src["holdout"])) == 1437
    m = store.read_json(str(out / "data" / "manifest.json"))
    assert m["written"] == {"wds/train": 1367, "wds/holdout": 70, "wds/val": 360}
    # a carve that would empty a class is refused with one line, before anything is written
    bad = tmp_path / "bad"
    assert main(["prepare", "--out", str(bad)] + args[3:-1] + ["data.holdout_per_class=500"]) == 2
    err = capsys.readouterr().err.strip()
    assert "holdout_per_class=500" in err and "\n" not in err
    assert not (bad / "data" / "manifest.json").exists()
