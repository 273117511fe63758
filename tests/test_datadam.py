"""DataDAM (issue 8): the attention loss, class-block units, replayed DSA, real initialisation, bad input.

Fast tests run the demo recipe (configs/demo/fashion_datadam.yaml) on sklearn digits (8 px) in this
process with the local backend; the slow one runs the Fashion-MNIST recipe with size overrides."""
import json
import shutil

import pytest
import torch
import torch.nn.functional as F

from conftest import run_tool
from engine import store
from engine.cli import main
from engine.errors import ConfigError, EngineError
from tests_digits import DIGITS

pytestmark = pytest.mark.usefixtures("one_thread")

RECIPE = "configs/demo/fashion_datadam.yaml"
# IPC 2 in class blocks of 5; a 16-wide ConvNetD3 (8 px: blocks of 4x4, 2x2, 1x1), 4 iterations with
# real batches of 16; the ConvNet teacher 3 epochs; students 2 epochs, 2 seeds.
DATADAM_DIGITS = [*DIGITS, "teacher.model.name=convnetd3", "teacher.model.width=16", "synth.datadam.iterations=4",
                  "synth.datadam.real_batch=16", "synth.datadam.net.width=16", "synth.datadam.log_every=2",
                  "eval.student.width=16", "eval.seeds=[0,1]", "eval.datadam.epochs=2", "eval.datadam.batch_size=10",
                  "eval.datadam.width=16"]


def engine_main(stage, out, *overrides):
    return main([stage, "--config", RECIPE, "--out", str(out), "--quiet", *DATADAM_DIGITS, *overrides])


@pytest.fixture(scope="module")
def datadam_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("datadam") / "run"
    assert engine_main("run", out) == 0
    return out


def one_line_error(capsys, rc, needle):
    err = capsys.readouterr().err.strip()
    assert rc == 2 and needle in err, err
    assert len(err.splitlines()) == 1 and err.startswith("error: ")


def digits_cfg(out, *overrides):
    from engine.cli import _absolute_locations
    from engine.config import load_config

    cfg = load_config(RECIPE, [*DATADAM_DIGITS, *overrides])
    _absolute_locations(cfg)
    wds = f"wds:{out}/data/wds"
    return cfg, {"train": wds, "val": wds}


# --------------------------------------------------------------------------- the loss
def _hand_blocks(net, x):
    """The ConvNet's blocks written out: conv 3x3 + instance norm (per sample and channel, biased
    variance, affine) + ReLU + 2x2 average pool."""
    outs = []
    for b in net.blocks:
        conv, gn = b[0], b[1]
        x = F.conv2d(x, conv.weight, conv.bias, padding=1)
        mu = x.mean(dim=(2, 3), keepdim=True)
        var = ((x - mu) ** 2).mean(dim=(2, 3), keepdim=True)
        x = (x - mu) / torch.sqrt(var + gn.eps) * gn.weight.view(1, -1, 1, 1) + gn.bias.view(1, -1, 1, 1)
        x = torch.clamp(x, min=0)
        x = (x[:, :, 0::2, 0::2] + x[:, :, 1::2, 0::2] + x[:, :, 0::2, 1::2] + x[:, :, 1::2, 1::2]) / 4
        outs.append(x)
    return outs


@pytest.mark.parametrize("power", [1.0, 2.0, 4.0])
def test_attention_loss_equals_a_direct_computation(power):
    from engine.models.convnet import ConvNet
    from engine.synth.datadam import attention_matching_loss, block_features

    torch.manual_seed(0)
    net = ConvNet(2, 5, depth=3, width=4, image_size=8).double()
    for p in net.parameters():  # the affine norm parameters too (they start at 1 and 0)
        p.data.uniform_(-0.5, 0.5)
        p.requires_grad_(False)
    real = torch.randn(6, 2, 8, 8, dtype=torch.float64)
    syn = torch.randn(3, 2, 8, 8, dtype=torch.float64)
    lam, scale = 0.3, 100.0
    hr, hs = _hand_blocks(net, real), _hand_blocks(net, syn)
    want_att = 0.0
    for fr, fs in zip(hr[:-1], hs[:-1]):  # every block but the last
        means = []
        for f in (fr, fs):
            maps = []
            for n in range(f.shape[0]):
                a = sum(f[n, c].abs() ** power for c in range(f.shape[1])).reshape(-1)
                maps.append(a / torch.sqrt((a ** 2).sum()))
            means.append(sum(maps) / len(maps))
        want_att += scale * float(((means[0] - means[1]) ** 2).sum().detach())
    er, es = hr[-1].reshape(6, -1).mean(0), hs[-1].reshape(3, -1).mean(0)
    want_emb = scale * lam * float(((er - es) ** 2).sum())
    fr, fs = block_features(net, real), block_features(net, syn)
    assert [f.shape[-1] for f in fr] == [4, 2, 1]
    loss, att, emb = attention_matching_loss(fr, fs, power, lam, scale)
    assert float(att) == pytest.approx(want_att, rel=1e-9)
    assert float(emb) == pytest.approx(want_emb, rel=1e-9)
    assert float(loss) == pytest.approx(want_att + want_emb, rel=1e-9) and want_att > 0 and want_emb > 0


def test_identical_real_and_synthetic_sets_have_zero_loss_and_gradient_flows():
    from engine.models.convnet import ConvNet
    from engine.synth.datadam import attention_matching_loss, block_features

    net = ConvNet(1, 3, depth=3, width=4, image_size=8)
    x = torch.randn(4, 1, 8, 8)
    assert float(attention_matching_loss(block_features(net, x), block_features(net, x), 4, 0.01, 100)[0]) == 0
    syn = x[:2].clone().requires_grad_(True)
    loss = attention_matching_loss(block_features(net, x), block_features(net, syn), 4, 0.01, 100)[0]
    loss.backward()
    assert syn.grad is not None and float(syn.grad.abs().sum()) > 0


# --------------------------------------------------------------------------- stage + units
def test_run_writes_the_sc_dd_layout_and_both_protocols(datadam_run):
    out = datadam_run
    for rel in ("config.yaml", "teacher/manifest.json", "distilled/manifest.json", "distilled/index.json",
                "preview.png", "results.json"):
        assert (out / rel).exists(), rel
    m = store.read_manifest(str(out / "distilled"), verify=True)
    assert m["method"] == "datadam" and m["num_images"] == 20 and m["units"]["units"] == 2
    assert sorted({e["unit"] for e in m["images"]}) == ["c00000-00004_i0000-0002", "c00005-00009_i0000-0002"]
    r = json.loads((out / "results.json").read_text())
    assert r["method"] == "datadam" and r["ipc"] == 2 and r["num_classes"] == 10
    for name in ("distilled", "random_real"):
        s = r[name]
        assert len(s["runs"]) == 2 and "top1_mean" in s and "top1_std" in s  # soft-label protocol (online KD)
        assert len(s["hard"]["top1s"]) == 2 and "top1_mean" in s["hard"]  # DataDAM's hard-label protocol
    assert r["protocol"]["label_mode"] == "online" and r["protocol"]["student"]["name"] == "convnetd3"
    ph = r["protocol_hard"]
    assert ph["name"] == "datadam-hard" and ph["label_mode"] == "hard" and ph["optimizer"] == "sgd"
    assert ph["lr"] == 0.01 and ph["augment"].startswith("dsa ") and ph["student"] == {"name": "convnetd3",
                                                                                      "width": 16}
    assert "gain_over_random" in r and "gain_over_random_hard" in r and set(r["welch"]) == {"soft", "hard"}
    assert r["datadam"]["iterations"] == 4 and set(r["timing_s"]) >= {"squeeze", "synthesize", "evaluate"}
    um = store.read_json(str(out / "units/synthesize/c00000-00004_i0000-0002/manifest.json"))
    assert [h["iteration"] for h in um["losses"]] == [0, 2, 3] and um["iterations"] == 4
    assert um["real_pool"] == {str(c): n for c, n in zip(range(5), (136, 154, 151, 135, 143))}
    assert len(um["init_keys"]) == 10 and um["mean_abs_pixel_change"] > 0


def test_a_class_block_alone_gives_the_bytes_of_the_whole_run(datadam_run):
    """Units of 5 classes (the run), one unit of all 10 and a unit of classes 3-4 alone: the same bytes
    for the same classes (one thread, same seeds)."""
    from engine.cluster.merge import read_distilled
    from engine.cluster.plan import Unit
    from engine.config import to_dict
    from engine.synth.datadam_stage import datadam_worker

    cfg, locs = digits_cfg(datadam_run)
    work = datadam_worker(to_dict(cfg), str(datadam_run), locs)
    whole, _ = work(Unit("synthesize", 0, 9, 0, 2))
    part, info = work(Unit("synthesize", 3, 4, 0, 2))
    images, labels, _ = read_distilled(str(datadam_run))
    assert torch.equal(whole["images"], images) and torch.equal(whole["labels"], labels)
    assert torch.equal(part["images"], images[6:10]) and part["labels"].tolist() == [3, 3, 4, 4]
    assert info["block"] == "c00003-00004_i0000-0002" and info["mean_abs_pixel_change"] > 0


def test_real_and_synthetic_batches_of_a_class_share_one_replayed_draw(datadam_run, monkeypatch):
    import engine.synth.datadam as dd
    from engine.cluster.plan import Unit
    from engine.config import to_dict
    from engine.synth.datadam_stage import datadam_worker
    from engine.synth.dsa import sample_dsa

    calls = []
    real_apply = dd.apply_dsa

    def spy(x, draw):
        calls.append((x.shape[0], draw))
        return real_apply(x, draw)

    monkeypatch.setattr(dd, "apply_dsa", spy)
    cfg, locs = digits_cfg(datadam_run, "synth.datadam.iterations=3")
    work = datadam_worker(to_dict(cfg), str(datadam_run), locs)
    work(Unit("synthesize", 2, 4, 0, 2))
    assert len(calls) == 3 * 3 * 2  # iterations x classes x (real, synthetic)
    for k in range(0, len(calls), 2):
        (n_real, d_real), (n_syn, d_syn) = calls[k], calls[k + 1]
        assert (n_real, n_syn) == (16, 2) and d_real is d_syn and d_real.per_batch
        it, c = divmod(k // 2, 3)
        replay = sample_dsa(cfg.synth.datadam.dsa_strategy, 1, 8, *dd.dsa_seed(0, it, c + 2), per_batch=True)
        assert replay.family == d_real.family
        for key, v in replay.params.items():
            assert torch.equal(torch.as_tensor(v), torch.as_tensor(d_real.params[key]))
    # one draw transforms a real and a synthetic batch alike: an image present in both comes out equal
    x = torch.randn(5, 1, 8, 8)
    fams = set()
    for k in range(0, len(calls), 2):
        d = calls[k][1]
        fams.add(d.family)
        assert torch.equal(real_apply(x, d)[1:3], real_apply(x[1:3], d))
    assert len(fams) > 1  # the draws vary over iterations and classes
    # the draw of (iteration, class) does not depend on the block: it is a function of its seed only
    calls.clear()
    work(Unit("synthesize", 4, 4, 0, 2))
    assert len(calls) == 3 * 2 and all(calls[2 * i][1].family == sample_dsa(
        cfg.synth.datadam.dsa_strategy, 1, 8, *dd.dsa_seed(0, i, 4), per_batch=True).family for i in range(3))


def test_real_initialisation_uses_distinct_images_per_ipc_index(datadam_run):
    from engine.cluster.plan import Unit
    from engine.data.realsets import cached_labels, load_images
    from engine.synth.datadam_stage import initial_images
    from engine.synth.tesla_stage import normalise

    cfg, locs = digits_cfg(datadam_run, "synth.ipc=6")
    labels_cache = cached_labels(locs["train"], "train")
    init, keys = initial_images(cfg, locs, Unit("synthesize", 0, 9, 0, 6), labels_cache)
    all_keys, labels = labels_cache()
    label_of = dict(zip(all_keys, labels.tolist()))
    assert len(keys) == 60 and len(set(keys)) == 60  # distinct over every (class, IPC index)
    for c in range(10):
        ks = keys[6 * c:6 * c + 6]
        assert all(label_of[k] == c for k in ks)  # images of their own class
        found = load_images(locs["train"], "train", ks, 1)
        assert torch.equal(init[c], normalise(torch.stack([found[k] for k in ks]), cfg))
        assert len({tuple(x.flatten().tolist()) for x in init[c]}) == 6
    alone, keys3 = initial_images(cfg, locs, Unit("synthesize", 3, 3, 0, 6), labels_cache)
    assert keys3 == keys[18:24] and torch.equal(alone[3], init[3])  # the same choice whichever block asks
    other, _ = initial_images(digits_cfg(datadam_run, "synth.ipc=6", "seed=1")[0], locs,
                              Unit("synthesize", 3, 3, 0, 6), labels_cache)
    assert not torch.equal(other[3], init[3])  # seeded


def test_rerun_skips_and_a_lost_unit_comes_back_identical(datadam_run, tmp_path, capsys):
    out = tmp_path / "copy"
    shutil.copytree(datadam_run, out)
    shutil.rmtree(out / "distilled")
    shutil.rmtree(out / "units/synthesize/c00005-00009_i0000-0002")
    capsys.readouterr()
    assert engine_main("synthesize", out) == 0
    assert "(1 run, 1 already done)" in capsys.readouterr().out
    assert (out / "distilled/train-000000.tar").read_bytes() == (datadam_run / "distilled/train-000000.tar").read_bytes()
    assert engine_main("synthesize", out) == 0
    assert "synthesize: skipped" in capsys.readouterr().out
    one_line_error(capsys, engine_main("synthesize", out, "synth.datadam.power=2"), "other synthesis settings")


# --------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("overrides,needle", [
    (["synth.datadam.power=0.5"], "'synth.datadam.power': expected a finite number of at least 1"),
    (["synth.datadam.real_batch=150"], "'synth.datadam.real_batch' (150): class 0 has 136 real images "
                                       "(set synth.datadam.sample_with_replacement: true"),
    (["synth.datadam.real_per_class=20", "synth.datadam.real_batch=32"], "class 0 has 20 real images"),
    (["synth.datadam.net.name=convnet", "synth.datadam.net.depth=1"], "gives no spatial attention map"),
    (["synth.datadam.net.name=resnet18"], "'synth.datadam.net.name' is 'resnet18'"),
    (["synth.datadam.init=zeros"], "'synth.datadam.init' is 'zeros'"),
    (["synth.datadam.momentum=1"], "'synth.datadam.momentum': expected a value in [0, 1)"),
])
def test_bad_settings_fail_with_one_line_before_any_unit(datadam_run, tmp_path, capsys, overrides, needle):
    out = tmp_path / "copy"
    shutil.copytree(datadam_run, out)
    for d in ("distilled", "units"):
        shutil.rmtree(out / d)
    capsys.readouterr()
    one_line_error(capsys, engine_main("synthesize", out, *overrides), needle)
    assert not (out / "distilled").exists() and not (out / "units").exists()


def _tiny_problem(**kw):
    from engine.models.convnet import ConvNet

    g = torch.Generator().manual_seed(0)
    real = {c: torch.randint(0, 256, (10, 1, 8, 8), generator=g, dtype=torch.uint8) for c in (0, 1)}
    init = {c: torch.randn(2, 1, 8, 8, generator=g) for c in (0, 1)}
    args = dict(iterations=2, lr=1.0, momentum=0.5, power=4.0, lam=0.01, loss_scale=100.0, real_batch=4,
                sample_with_replacement=False, dsa_strategy="color_crop", seed=0, mean=[0.3], std=[0.4],
                block="c00000-00001_i0000-0002")
    args.update(kw)
    return ConvNet(1, 2, depth=3, width=4, image_size=8), real, init, args


def test_non_finite_loss_stops_naming_the_block_and_iteration():
    from engine.synth.datadam import distill_block

    net, real, init, args = _tiny_problem()
    init[1][0, 0, 3, 3] = float("nan")
    with pytest.raises(EngineError, match=r"non-finite loss in class block c00000-00001_i0000-0002 at iteration 0 "
                                          r"\(class 1\)"):
        distill_block(net, real, init, **args)
    net, real, init, args = _tiny_problem(lr=1e30, iterations=5)  # images blow up after the first step
    with pytest.raises(EngineError, match="non-finite loss in class block c00000-00001_i0000-0002 at iteration [1-4]"):
        distill_block(net, real, init, **args)


def test_real_batch_larger_than_a_class_needs_replacement_and_power_below_one_fails():
    from engine.synth.datadam import distill_block, real_batch_indices

    net, real, init, args = _tiny_problem(real_batch=12)
    with pytest.raises(ConfigError, match=r"class 0 has 10 real images \(set synth.datadam.sample_with_replacement"):
        distill_block(net, real, init, **args)
    res = distill_block(net, real, init, **{**args, "sample_with_replacement": True})
    assert res.images.shape == (4, 1, 8, 8) and len(res.history) == 2
    idx = real_batch_indices(10, 12, 0, 0, 0, True)
    assert len(idx) == 12 and len(set(idx.tolist())) < 12  # drawn with replacement
    assert len(set(real_batch_indices(10, 8, 0, 0, 0, False).tolist())) == 8  # distinct otherwise
    with pytest.raises(ConfigError, match="synth.datadam.power"):
        distill_block(net, real, init, **{**args, "power": 0.9})


def test_a_network_without_spatial_maps_is_refused():
    from torch import nn

    from engine.models.convnet import ConvNet
    from engine.synth.datadam import check_spatial

    with pytest.raises(ConfigError, match="gives no spatial attention map"):
        check_spatial(ConvNet(1, 2, depth=1, width=4, image_size=8), (1, 8, 8))
    flat = nn.Module()
    flat.blocks = nn.ModuleList([nn.Sequential(nn.Flatten(), nn.Linear(64, 8)), nn.Linear(8, 4)])
    with pytest.raises(ConfigError, match=r"block 0 of Module gives output \[8\], no spatial map"):
        check_spatial(flat, (1, 8, 8))
    with pytest.raises(EngineError, match="has no `blocks`"):
        check_spatial(nn.Linear(3, 3), (1, 8, 8))
    assert check_spatial(ConvNet(1, 2, depth=3, width=4, image_size=8), (1, 8, 8))[0] == (1, 4, 4, 4)


# --------------------------------------------------------------------------- recipes and launcher
def test_imagenet_recipe_is_the_reference_and_its_launcher_checks_locations():
    from engine.config import load_config
    from engine.synth.datadam_stage import check_datadam_config, hard_protocol_config, net_depth

    cfg = load_config("configs/imagenet1k/datadam_convd4_ipc50.yaml")
    d = cfg.synth.datadam
    assert (cfg.method, cfg.data.image_size, cfg.synth.ipc, net_depth(d.net), d.net.width) == \
        ("datadam", 64, 50, 4, 128)
    assert (d.iterations, d.lr, d.momentum, d.lam, d.loss_scale, d.init) == (8000, 1.0, 0.5, 0.01, 100.0, "real")
    assert 1 <= d.power <= 4
    check_datadam_config(cfg, 1000)
    assert hard_protocol_config(cfg).eval.student.name == "convnetd4"
    r = run_tool("launchers/imagenet_datadam.py", "--out", "relative/dir")
    assert r.returncode == 2 and "expected an absolute path or a URL" in r.stderr


# --------------------------------------------------------------------------- the real recipe
@pytest.mark.slow
def test_fashion_datadam_recipe_end_to_end_small(tmp_path):
    """configs/demo/fashion_datadam.yaml with size overrides: teacher 1 epoch, 30 iterations, students 30
    (soft) and 100 (hard) epochs, one seed, validation on 2,000 test images, local backend."""
    out = tmp_path / "demo"
    r = run_tool("-m", "engine", "run", "--config", RECIPE, "--out", out, "--quiet", "cluster.backend=local",
                 "threads=1", "teacher.epochs=1", "synth.datadam.iterations=30", "eval.epochs=30",
                 "eval.datadam.epochs=100", "eval.seeds=[0]", "eval.val_limit=2000", timeout=1800)
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads((out / "results.json").read_text())
    assert res["teacher"]["top1"] > 60
    for name in ("distilled", "random_real"):  # above chance (10 %) under both protocols
        assert res[name]["top1"] > 30 and res[name]["hard"]["top1"] > 30
    assert res["datadam"]["iterations"] == 30 and res["synthesis"]["units"]["units"] == 2
    assert (out / "preview.png").stat().st_size > 5_000 and "| distilled |" in r.stdout
