import pytest
import torch

from engine import store
from engine.errors import ConfigError, EngineError
from engine.models import BNStatsHook, bn_layers, count_params, create_model, load_checkpoint, save_checkpoint


def test_narrow_small_input_resnet18_matches_the_cpu_teacher():
    m = create_model("resnet18", 10, in_chans=1, small_input=True, width=16)
    assert 0.69e6 < count_params(m) < 0.72e6 and len(bn_layers(m)) == 20
    assert m(torch.randn(2, 1, 28, 28)).shape == (2, 10)


@pytest.mark.parametrize("name,kw,shape", [
    ("resnet50", dict(small_input=True, width=8), (2, 7)),
    ("tv:resnet18", dict(in_chans=1, small_input=True), (2, 7)),
    ("timm:resnet18", {}, (2, 7)),
    ("convnetd3", dict(image_size=32), (2, 7)),
    ("convnetd4", dict(image_size=32), (2, 7)),
])
def test_factory_builds_each_family(name, kw, shape):
    in_chans = kw.pop("in_chans", 3)
    m = create_model(name, 7, in_chans=in_chans, **kw)
    assert m(torch.randn(2, in_chans, 32, 32)).shape == shape


def test_unknown_model_name_is_a_clear_error():
    with pytest.raises(ConfigError, match="unknown model"):
        create_model("resnet19", 10)
    with pytest.raises(ConfigError, match="torchvision has no such model"):
        create_model("tv:nonet", 10)


def test_bn_hook_records_input_moments():
    m = create_model("resnet18", 3, in_chans=1, small_input=True, width=8).eval()
    x = torch.randn(4, 1, 12, 12)
    with BNStatsHook(m) as h:
        m(x)
    mean, var = h.stats[0]
    first = m.conv1(x)  # the first BN's input
    assert torch.allclose(mean, first.mean((0, 2, 3)), atol=1e-6)
    assert torch.allclose(var, first.var((0, 2, 3), unbiased=False), atol=1e-6)


def test_module_prefixed_checkpoint_loads(tmp_path):
    src = create_model("resnet18", 5, in_chans=1, small_input=True, width=8)
    url = str(tmp_path / "ddp.pt")
    torch.save({f"module.{k}": v for k, v in src.state_dict().items()}, url)  # a DDP-style bare state dict
    dst = create_model("resnet18", 5, in_chans=1, small_input=True, width=8)
    load_checkpoint(url, dst)
    x = torch.randn(2, 1, 10, 10)
    assert torch.equal(src.eval()(x), dst.eval()(x))


def test_checkpoint_roundtrip_through_a_url():
    m = create_model("convnetd3", 4, in_chans=1, image_size=16)
    save_checkpoint("memory://ckpt/t.pt", m, {"name": "convnetd3"})
    m2 = create_model("convnetd3", 4, in_chans=1, image_size=16)
    assert load_checkpoint("memory://ckpt/t.pt", m2)["model"] == {"name": "convnetd3"}
    store.remove("memory://ckpt", recursive=True)


def test_checkpoint_that_does_not_fit_lists_the_keys(tmp_path):
    url = str(tmp_path / "c.pt")
    save_checkpoint(url, create_model("resnet18", 5, in_chans=1, small_input=True, width=8), {})
    with pytest.raises(EngineError) as e:
        load_checkpoint(url, create_model("resnet18", 7, in_chans=1, small_input=True, width=8))
    assert "fc.weight" in str(e.value) and "shape mismatch" in str(e.value)
    with pytest.raises(EngineError) as e:
        load_checkpoint(url, create_model("resnet50", 5, in_chans=1, small_input=True, width=8))
    assert "missing keys" in str(e.value) and "layer1.0.conv3.weight" in str(e.value)
    with pytest.raises(EngineError) as e:
        load_checkpoint(url, create_model("convnetd3", 5, in_chans=1, image_size=16))
    assert "missing keys blocks.0.0.weight" in str(e.value) and "unexpected keys conv1.weight" in str(e.value)
    with pytest.raises(EngineError, match="checkpoint not found"):
        load_checkpoint(str(tmp_path / "none.pt"), create_model("resnet18", 5))
