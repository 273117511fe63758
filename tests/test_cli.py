import json

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
