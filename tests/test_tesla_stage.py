"""The TESLA stages (issue 5): experts, IPC-slice synthesis, soft-label evaluation, bad input.

Fast tests run the demo recipe (configs/demo/fashion_tesla.yaml) on sklearn digits (8 px) in this
process with the local backend; the slow one runs the Fashion-MNIST recipe with size overrides."""
import json
import shutil

import pytest
import torch

from conftest import run_tool
from engine import store
from engine.cli import main
from engine.errors import ConfigError, EngineError
from tests_digits import DIGITS

pytestmark = pytest.mark.usefixtures("one_thread")

RECIPE = "configs/demo/fashion_tesla.yaml"
# 2 experts x 3 epochs of a 16-wide ConvNetD3; IPC 2 as 2 slices of one IPC index; 4 iterations of 2 steps
# against epoch t -> t + 1 with t < 2; students 2 epochs.
TESLA_DIGITS = [*DIGITS, "experts.num_experts=2", "experts.epochs=3", "experts.lr=0.1", "experts.batch_size=32",
                "experts.model.width=16", "experts.train_limit=0", "synth.tesla.iterations=4",
                "synth.tesla.syn_steps=2", "synth.tesla.expert_epochs=1", "synth.tesla.max_start_epoch=2",
                "synth.tesla.batch_syn=10", "synth.tesla.log_every=2", "eval.student.width=16",
                "eval.tesla.epochs=2", "eval.tesla.batch_size=10"]


def engine_main(stage, out, *overrides):
    return main([stage, "--config", RECIPE, "--out", str(out), "--quiet", *TESLA_DIGITS, *overrides])


@pytest.fixture(scope="module")
def tesla_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("tesla") / "run"
    assert engine_main("run", out) == 0
    return out


def copy_run(src, dst, drop=()):
    shutil.copytree(src, dst)
    for d in drop:
        shutil.rmtree(dst / d)
    return dst


def one_line_error(capsys, rc, needle):
    err = capsys.readouterr().err.strip()
    assert rc == 2 and needle in err, err
    assert len(err.splitlines()) == 1 and err.startswith("error: ")


# --------------------------------------------------------------------------- experts
def test_experts_stage_writes_snapshots_and_manifest(tesla_run):
    m = store.read_manifest(str(tesla_run / "experts"), verify=True)
    assert m["stage"] == "experts" and m["num_experts"] == 2 and m["epochs"] == 3 and m["num_classes"] == 10
    assert m["model"] == {"name": "convnetd3", "num_classes": 10, "in_chans": 1, "width": 16, "norm": "instance",
                          "image_size": 8, "num_params": m["model"]["num_params"]}
    assert m["saved_epochs"] == [0, 1, 2, 3] and m["train_images"] == 1437
    assert sorted(m["files"]) == ["expert_0000.pt", "expert_0001.pt"]
    for k, e in enumerate(m["experts"]):
        assert e["index"] == k and e["file"] == f"expert_{k:04d}.pt" and e["seconds"] > 0
        assert 0 <= e["val_top1"] <= 100 and e["val_count"] == 360 and len(e["train_accuracy"]) == 3
        traj = torch.load(tesla_run / "experts" / e["file"], weights_only=True)
        assert sorted(traj["snapshots"]) == [0, 1, 2, 3]
        assert all(v.shape == (m["model"]["num_params"],) for v in traj["snapshots"].values())
    a = torch.load(tesla_run / "experts" / "expert_0000.pt", weights_only=True)["snapshots"]
    b = torch.load(tesla_run / "experts" / "expert_0001.pt", weights_only=True)["snapshots"]
    assert not torch.equal(a[0], b[0])  # seeded per expert
    assert max(e["val_top1"] for e in m["experts"]) > 20  # better than chance (10 %) after 3 epochs


def test_experts_resume_trains_only_the_missing_expert(tesla_run, tmp_path, capsys):
    out = copy_run(tesla_run, tmp_path / "copy", drop=("units/experts/expert0001",))
    for name in ("manifest.json", "expert_0001.pt"):
        (out / "experts" / name).unlink()
    capsys.readouterr()
    assert engine_main("experts", out) == 0
    assert "done (1 trained, 1 already done)" in capsys.readouterr().out
    for name in ("expert_0000.pt", "expert_0001.pt"):  # retrained expert 1 is the same, bit for bit
        old = torch.load(tesla_run / "experts" / name, weights_only=True)["snapshots"]
        new = torch.load(out / "experts" / name, weights_only=True)["snapshots"]
        assert all(torch.equal(old[e], new[e]) for e in old)
    assert engine_main("experts", out) == 0
    assert "experts: skipped, exists" in capsys.readouterr().out
    one_line_error(capsys, engine_main("experts", out, "experts.epochs=4"), "holds experts made with other settings")
    # a finished unit whose trajectory file is gone is trained again at the merge, never dropped
    for name in ("manifest.json", "expert_0000.pt"):
        (out / "experts" / name).unlink()
    assert engine_main("experts", out) == 0
    m = store.read_manifest(str(out / "experts"), verify=True)
    assert m["units"]["rerun_at_merge"] == 1 and m["units"]["ran"] == 1 and m["num_experts"] == 2
    new = torch.load(out / "experts" / "expert_0000.pt", weights_only=True)["snapshots"]
    assert torch.equal(new[3], torch.load(tesla_run / "experts" / "expert_0000.pt", weights_only=True)["snapshots"][3])


def test_save_epochs_keeps_only_those(tesla_run, tmp_path, capsys):
    out = copy_run(tesla_run, tmp_path / "copy", drop=("experts", "units", "distilled", "labels"))
    assert engine_main("experts", out, "experts.save_epochs=[0,1,2]") == 0
    m = store.read_manifest(str(out / "experts"))
    assert m["saved_epochs"] == [0, 1, 2]
    assert sorted(torch.load(out / "experts" / "expert_0001.pt", weights_only=True)["snapshots"]) == [0, 1, 2]
    capsys.readouterr()
    # max_start_epoch 2 + expert_epochs 1 reads epochs 0..2: fits; 2 + 2 needs epoch 3, which was not saved
    one_line_error(capsys, engine_main("synthesize", out, "experts.save_epochs=[0,1,2]",
                                       "synth.tesla.expert_epochs=2"), "needs epoch 3 (a start epoch beyond")


# --------------------------------------------------------------------------- synthesis + merge
def test_run_writes_distilled_soft_labels_and_results(tesla_run):
    out = tesla_run
    for rel in ("config.yaml", "experts/manifest.json", "distilled/manifest.json", "distilled/index.json",
                "labels/tesla_soft.pt", "preview.png", "results.json"):
        assert (out / rel).exists(), rel
    assert not (out / "teacher").exists()  # no squeeze: an expert labels
    r = json.loads((out / "results.json").read_text())
    assert r["method"] == "tesla" and r["ipc"] == 2 and r["num_classes"] == 10
    for key in ("teacher", "distilled", "random_real"):
        assert 0 <= r[key]["top1"] <= 100
    assert r["protocol"]["name"] == "tesla" and r["protocol"]["label_mode"] == "soft"
    t = r["tesla"]
    assert set(t["syn_lr_per_unit"]) == {"c00000-00009_i0000-0001", "c00000-00009_i0001-0002"}
    assert t["syn_lr_mean"] == pytest.approx(sum(t["syn_lr_per_unit"].values()) / 2)
    assert r["protocol"]["lr"] == pytest.approx(t["syn_lr_mean"]) == t["eval_lr"]
    assert t["label_expert"] == {"index": 0, "epoch": 2} and t["label_mode"] == "frozen"
    assert 0 <= t["agreement_final_count"] <= 20 and r["experts"]["num_experts"] == 2
    assert set(r["timing_s"]) >= {"experts", "synthesize", "evaluate"}
    for name in store.listdir(str(out / "units" / "synthesize")):
        um = store.read_json(str(out / "units" / "synthesize" / name / "manifest.json"))
        assert um["num_images"] == 10 and 0 <= um["agreement_final_count"] <= 10 and um["iterations"] == 4
        assert [h["iteration"] for h in um["losses"]] == [0, 2, 3] and um["label_expert"] == [0, 2]


def test_ipc_slices_merge_exactly_once(tesla_run):
    from engine.cluster.merge import read_distilled
    from engine.cluster.plan import plan_units
    from engine.cluster.unitstore import load_unit
    from engine.synth.tesla_stage import gather_soft_labels, load_soft_labels

    out = str(tesla_run)
    m = store.read_manifest(out + "/distilled", verify=True)
    pairs = [(e["class"], e["ipc"]) for e in m["images"]]
    assert sorted(pairs) == [(c, i) for c in range(10) for i in range(2)] and len(set(pairs)) == 20
    assert all(e["unit"] == f"c00000-00009_i{e['ipc']:04d}-{e['ipc'] + 1:04d}" for e in m["images"])
    units = plan_units("synthesize", 10, 2, 10, 1)
    assert m["units"]["units"] == 2 and [u.id for u in units] == sorted(m["tesla"]["syn_lr_per_unit"])
    images, labels, _ = read_distilled(out)
    soft = load_soft_labels(out)
    assert torch.equal(soft["classes"], labels) and soft["ipc_index"].tolist() == [0, 1] * 10
    for u in units:  # every image's soft labels are its unit's row, in (class, IPC index) order
        res, _ = load_unit(out, u)
        rows = torch.arange(10) * 2 + u.ipc_start
        assert torch.equal(soft["soft_labels"][rows], res["soft_labels"])
        assert torch.equal(images[rows], res["images"])
        assert res["images"].dtype == torch.uint8
    settings = load_unit(out, units[0])[0]["settings"]
    with pytest.raises(EngineError, match="already made by another unit"):
        gather_soft_labels(out, [units[0], units[1], units[0]], settings)
    with pytest.raises(EngineError, match="other synthesis settings"):
        gather_soft_labels(out, units, {**settings, "seed": 1})


def test_rerun_skips_and_one_lost_slice_comes_back_identical(tesla_run, tmp_path, capsys):
    capsys.readouterr()
    out = copy_run(tesla_run, tmp_path / "copy", drop=("distilled", "units/synthesize/c00000-00009_i0001-0002"))
    before = (tesla_run / "distilled" / "train-000000.tar").read_bytes()
    assert engine_main("synthesize", out) == 0
    assert "(1 run, 1 already done)" in capsys.readouterr().out
    assert (out / "distilled" / "train-000000.tar").read_bytes() == before
    assert engine_main("run", out) == 0
    text = capsys.readouterr().out
    assert "experts: skipped" in text and "synthesize: skipped" in text and "squeeze" not in text


def test_distilled_without_its_soft_labels_is_refused(tesla_run, tmp_path, capsys):
    out = copy_run(tesla_run, tmp_path / "copy", drop=("labels",))
    capsys.readouterr()
    one_line_error(capsys, engine_main("synthesize", out), "tesla_soft.pt: missing beside")


# --------------------------------------------------------------------------- evaluation
def test_kd_protocol_uses_the_labelling_expert_online(tesla_run, tmp_path):
    out = copy_run(tesla_run, tmp_path / "copy")
    assert engine_main("evaluate", out, "eval.protocol=kd", "eval.random_real=false") == 0
    r = json.loads((out / "results.json").read_text())
    assert r["protocol"]["label_mode"] == "online" and r["protocol"]["epochs"] == 2 and "name" not in r["protocol"]
    assert r["tesla"]["protocol"] == "kd" and r["tesla"]["eval_lr"] is None and "random_real" not in r


def test_soft_student_checks_its_inputs():
    from engine.config import load_config
    from engine.evaluate import evaluate_sets, train_student_soft

    cfg = load_config(RECIPE, ["data.image_size=8", "eval.tesla.epochs=1", "eval.student.width=8"])
    x = torch.randint(0, 255, (4, 1, 8, 8), dtype=torch.uint8)
    p = torch.full((4, 10), 0.1)
    with pytest.raises(ConfigError, match="finite positive"):
        train_student_soft(x, p, cfg, 0, "cpu", float("nan"), progress=False)
    with pytest.raises(EngineError, match="one probability row per image"):
        train_student_soft(x, p[:3], cfg, 0, "cpu", 0.01, progress=False)
    r = train_student_soft(x, p, cfg, 0, "cpu", 0.01, progress=False)
    assert r["label_mode"] == "soft" and r["steps"] == 1 and r["lr"] == 0.01 and r["top1"] is None
    with pytest.raises(EngineError, match="needs the soft labels"):
        evaluate_sets(x, torch.arange(4), None, cfg, "cpu", lambda: [], label_mode="soft", progress=False)


def soft_problem():
    from engine.config import load_config

    cfg = load_config(RECIPE, ["data.image_size=8", "eval.tesla.epochs=3", "eval.tesla.batch_size=10",
                               "eval.student.width=8"])
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (20, 1, 8, 8), generator=g, dtype=torch.uint8)
    return cfg, x, torch.randn(20, 10, generator=g).softmax(1)


def _soft_rank(rank, world, port, queue):
    import torch.distributed as dist

    from engine.evaluate import train_student_soft

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        cfg, x, p = soft_problem()
        r = train_student_soft(x, p, cfg, 0, "cpu", 0.01, rank=rank, world_size=world, progress=False)
        queue.put((rank, [h["loss"] for h in r["history"]], r["steps"], r["dropped_per_epoch"]))
    finally:
        dist.destroy_process_group()


def test_soft_student_data_parallel_follows_one_process():
    """2 gloo ranks, batches of 10 (nothing dropped): a ConvNet (instance norm) student under DDP takes
    the single-process steps, so the per-epoch losses agree to float tolerance."""
    import socket

    import torch.multiprocessing as mp

    from engine.evaluate import train_student_soft

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_soft_rank, args=(r, 2, port, queue)) for r in range(2)]
    for p in procs:
        p.start()
    got = dict((r, rest) for r, *rest in (queue.get(timeout=120) for _ in procs))
    for p in procs:
        p.join(timeout=60)
    cfg, x, p = soft_problem()
    one = train_student_soft(x, p, cfg, 0, "cpu", 0.01, progress=False)
    for losses, steps, dropped in got.values():
        assert steps == one["steps"] == 6 and dropped == 0
        assert losses == pytest.approx([h["loss"] for h in one["history"]], rel=1e-5)


# --------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("overrides,needle", [
    (["synth.tesla.syn_steps=0"], "'synth.tesla.syn_steps': expected at least 1, got 0"),
    (["synth.tesla.syn_lr_init=nan"], "'synth.tesla.syn_lr_init': expected a finite positive learning rate"),
    (["synth.tesla.lr_img=inf"], "'synth.tesla.lr_img': expected a finite number"),
    (["synth.tesla.max_start_epoch=4"], "needs epoch 4 (a start epoch beyond the saved snapshots)"),
    (["experts.model.width=8"], "the experts are convnetd3 (width 16, instance norm, 1 channel(s), 8 px) for 10 "
                                "classes, the config asks for convnetd3 (width 8"),
    (["experts.model.name=convnetd4"], "the config asks for convnetd4"),
    (["synth.tesla.mode=adjoint"], "'synth.tesla.mode' is 'adjoint'"),
])
def test_bad_synthesis_settings_fail_with_one_line(tesla_run, tmp_path, capsys, overrides, needle):
    out = copy_run(tesla_run, tmp_path / "copy", drop=("distilled", "units/synthesize", "labels"))
    capsys.readouterr()
    one_line_error(capsys, engine_main("synthesize", out, *overrides), needle)
    assert not (out / "distilled").exists()


def test_experts_of_another_class_count_are_refused(tesla_run, tmp_path, capsys):
    """Experts made elsewhere (experts.location) for 7 classes, data with 10."""
    out = copy_run(tesla_run, tmp_path / "copy", drop=("distilled", "units/synthesize", "labels"))
    other = tmp_path / "other_experts"
    shutil.copytree(tesla_run / "experts", other)
    m = json.loads((other / "manifest.json").read_text())
    m["model"]["num_classes"] = 7
    (other / "manifest.json").write_text(json.dumps(m))
    capsys.readouterr()
    one_line_error(capsys, engine_main("synthesize", out, f"experts.location={other}"),
                   "the experts were trained for 7 classes, the data has 10")
    one_line_error(capsys, engine_main("experts", out, f"experts.location={other}"),
                   "'experts.location'")


def test_experts_bad_settings_fail_before_training(tmp_path, capsys):
    one_line_error(capsys, engine_main("experts", tmp_path / "o", "experts.model.name=resnet18"),
                   "trajectory matching runs a ConvNet")
    one_line_error(capsys, engine_main("experts", tmp_path / "o", "experts.save_epochs=[0,9]"),
                   "'experts.save_epochs': epoch 9 outside 0..3")
    one_line_error(capsys, engine_main("experts", tmp_path / "o", "experts.lr=nan"),
                   "'experts.lr': expected a positive number")
    one_line_error(capsys, engine_main("run", tmp_path / "o", "experts.train_limit=5000"),
                   "'experts.train_limit' (5000): class 0 has 136 training images, 500 per class requested")


# --------------------------------------------------------------------------- models
def test_convnet_width_is_configurable_and_defaults_stay():
    from engine.models import create_model

    assert create_model("convnetd3", 10, in_chans=1, image_size=28).blocks[0][0].out_channels == 128
    assert create_model("convnetd3", 10, in_chans=1, image_size=28, width=32).blocks[2][0].out_channels == 32
    assert create_model("resnet18", 10).layer4[0].conv1.out_channels == 512
    assert create_model("resnet18", 10, width=16).layer4[0].conv1.out_channels == 128
    with pytest.raises(ConfigError, match="model.width"):
        create_model("convnetd3", 10, width=0)


# --------------------------------------------------------------------------- recipes and launcher
def test_imagenet_recipe_is_the_reference_and_its_launcher_checks_locations():
    from engine.config import load_config
    from engine.synth.tesla_stage import check_experts_config, check_tesla_config

    cfg = load_config("configs/imagenet1k/tesla_convd4_ipc50.yaml")
    t = cfg.synth.tesla
    assert (cfg.data.image_size, cfg.experts.model.name, cfg.synth.ipc, cfg.method) == (64, "convnetd4", 50, "tesla")
    assert (t.syn_steps, t.expert_epochs, t.max_start_epoch, t.batch_syn, t.lr_img, t.lr_lr, t.syn_lr_init) == \
        (10, 3, 10, 100, 1e4, 1e-4, 0.01)
    assert cfg.experts.epochs >= t.max_start_epoch + t.expert_epochs - 1 and cfg.eval.protocol == "tesla"
    check_tesla_config(cfg)
    check_experts_config(cfg)
    r = run_tool("launchers/imagenet_tesla.py", "--out", "relative/dir")
    assert r.returncode == 2 and "expected an absolute path or a URL" in r.stderr


# --------------------------------------------------------------------------- the real recipe
@pytest.mark.slow
def test_fashion_tesla_recipe_end_to_end_small(tmp_path):
    """configs/demo/fashion_tesla.yaml with size overrides: 2 experts x 3 epochs on 2,000 images,
    max_start_epoch 2 + expert_epochs 1, IPC 10 as 2 slices x 20 iterations, students 30 epochs,
    validation on 2,000 test images, local backend."""
    out = tmp_path / "demo"
    r = run_tool("-m", "engine", "run", "--config", RECIPE, "--out", out, "--quiet", "cluster.backend=local",
                 "threads=1",  # robust when other processes share the cores (METHODS section 6)
                 "experts.num_experts=2", "experts.epochs=3", "experts.train_limit=2000", "experts.val_limit=2000",
                 "synth.tesla.max_start_epoch=2", "synth.tesla.expert_epochs=1", "synth.tesla.iterations=20",
                 "eval.tesla.epochs=30", "eval.val_limit=2000", timeout=1800)
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads((out / "results.json").read_text())
    assert res["experts"]["val_top1_mean"] > 50 and res["teacher"]["top1"] > 50
    assert res["distilled"]["top1"] > 20 and res["random_real"]["top1"] > 20  # above chance (10 %)
    # 3x chance: 2 experts x 3 epochs on 2,000 images label 46 % of the final images as their class (CI run)
    assert res["tesla"]["agreement_final"] > 0.3 and len(res["tesla"]["syn_lr_per_unit"]) == 2
    assert (out / "preview.png").stat().st_size > 5_000 and "| distilled |" in r.stdout
