import pytest

from engine.cli import main
from engine.config import load_config
from engine.errors import ConfigError


def test_defaults_yaml_and_overrides(tmp_path):
    f = tmp_path / "r.yaml"
    f.write_text("seed: 3\ndata:\n  channels: 3\n  mean: [0.5, 0.5, 0.5]\n")
    cfg = load_config(str(f), ["data.image_size=64", "data.crop_pct=0.875"])
    assert cfg.seed == 3 and cfg.data.channels == 3 and cfg.data.image_size == 64
    assert cfg.data.crop_pct == 0.875 and list(cfg.data.mean) == [0.5, 0.5, 0.5]
    assert cfg.data.batch_size == 256  # schema default kept


@pytest.mark.parametrize("text,overrides,needle", [
    ("data:\n  chanels: 3\n", [], "data.chanels"),
    ("", ["data.nope=1"], "data.nope"),
    ("", ["data.channels=three"], "data.channels"),
    ("seed: [1, 2]\n", [], "seed"),
    ("", ["data.channels"], "key=value"),
])
def test_bad_keys_and_types_named_in_one_line(tmp_path, text, overrides, needle):
    f = tmp_path / "r.yaml"
    f.write_text(text)
    with pytest.raises(ConfigError) as e:
        load_config(str(f), overrides)
    msg = str(e.value)
    assert needle in msg and "\n" not in msg


def test_missing_config_file(tmp_path):
    with pytest.raises(Exception) as e:
        load_config(str(tmp_path / "nope.yaml"))
    assert "nope.yaml" in str(e.value)


def test_cli_rejects_unknown_key_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / "out"
    rc = main(["prepare", "--out", str(out), "data.source=digits:", "data.colour=1"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc != 0 and len(err) == 1 and "data.colour" in err[0]
    assert not (out / "config.yaml").exists()
