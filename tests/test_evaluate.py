"""Post-training and evaluation: a student learns sklearn digits, the random-real
picker, stored vs online replay, and the results.json dict."""
import pytest
import torch

from engine.config import load_config
from engine.data.sources import create_source
from engine.errors import EngineError
from engine.evaluate import evaluate_sets, kd_loss, param_groups, pick_random_real, train_student
from engine.labels import normalise_images, relabel_stored
from engine.models import create_model


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def digits():
    """sklearn digits (8 x 8 grey, 10 classes): train/val uint8 (N, 1, 8, 8) + labels, mean, std."""
    tr, va = create_source("digits:", "train"), create_source("digits:", "val")
    xt, yt = torch.from_numpy(tr.images)[:, None], torch.from_numpy(tr.labels)
    xv, yv = torch.from_numpy(va.images)[:, None], torch.from_numpy(va.labels)
    mean, std = float(xt.float().div(255).mean()), float(xt.float().div(255).std())
    return xt, yt, xv, yv, mean, std


def make_cfg(digits, *overrides):
    *_, mean, std = digits
    return load_config(overrides=["data.channels=1", "data.image_size=8", f"data.mean=[{mean}]",
                                  f"data.std=[{std}]", "eval.student.width=8", "eval.batch_size=50",
                                  "relabel.flip=false", *overrides])


def val_loader_fn(digits, batch=128):
    _, _, xv, yv, mean, std = digits
    xn = normalise_images(xv, [mean], [std])

    def fresh():  # an in-memory loader: normalised images + int64 labels
        return [(xn[i:i + batch], yv[i:i + batch]) for i in range(0, len(xn), batch)]
    return fresh


def small_teacher(seed=0, classes=10):
    torch.manual_seed(seed)
    return create_model("resnet18", classes, in_chans=1, small_input=True, width=8).eval()


# (e) ------------------------------------------------------------------------------------------
def test_student_learns_digits_with_hard_labels(digits):
    xt, yt, *_ = digits
    cfg = make_cfg(digits, "eval.epochs=25", "eval.lr=0.01", "relabel.crop_scale=[0.5, 1.0]")
    idx = pick_random_real(yt, 20, seed=0)
    out = train_student(xt[idx], yt[idx], None, cfg, 0, "cpu", labeler="hard",
                        val_loader_fn=val_loader_fn(digits), progress=False)
    assert out["top1"] > 60.0, out["top1"]  # chance is 10 %; measured ~90 %
    assert out["top5"] >= out["top1"] and out["val_count"] == 360
    assert out["epochs"] == 25 and len(out["history"]) == 25 and out["seconds"] > 0
    assert out["history"][-1]["loss"] < out["history"][0]["loss"]
    assert out["history"][-1]["lr"] == pytest.approx(0.0, abs=1e-12)  # cosine down to 0
    # val_limit: only the first N samples are counted.
    cfg.eval.val_limit = 100
    cfg.eval.epochs = 1
    assert train_student(xt[idx], yt[idx], None, cfg, 0, "cpu", labeler="hard",
                         val_loader_fn=val_loader_fn(digits, 64), progress=False)["val_count"] == 100


# (f) ------------------------------------------------------------------------------------------
def test_random_real_picker(digits):
    _, yt, *_ = digits
    labels = yt.tolist()
    idx = pick_random_real(labels, 7, seed=3)
    assert len(idx) == 70 and len(set(idx.tolist())) == 70
    picked = yt[idx]
    assert torch.bincount(picked, minlength=10).tolist() == [7] * 10
    assert torch.equal(idx, pick_random_real(labels, 7, seed=3))
    assert not torch.equal(idx, pick_random_real(labels, 7, seed=4))
    with pytest.raises(EngineError, match="class 1 has 2 training images"):
        pick_random_real([0, 0, 0, 1, 1], 3, seed=0)


# stored vs online ------------------------------------------------------------------------------
def test_stored_labels_replay_the_online_training(digits):
    """With top_k = num_classes and float32 values, replaying stored labels trains the
    student exactly as the online teacher does (same batches, crops, targets)."""
    xt, yt, *_ = digits
    cfg = make_cfg(digits, "eval.epochs=2", "relabel.top_k=10", "relabel.mix=cutmix")
    idx = pick_random_real(yt, 5, seed=0)
    x, y = xt[idx], yt[idx]
    teacher = small_teacher()
    online = train_student(x, y, teacher, cfg, 0, "cpu", labeler="online", progress=False)
    stored = relabel_stored(teacher, x, cfg.data.mean, cfg.data.std, 2, 50, 0, cfg.relabel, "cpu",
                            values_dtype=torch.float32, progress=False)
    replay = train_student(x, y, None, cfg, 0, "cpu", labeler="stored", stored=stored, progress=False)
    assert [h["loss"] for h in replay["history"]] == [h["loss"] for h in online["history"]]
    # fp16 values: close to the online run, not identical.
    stored16 = relabel_stored(teacher, x, cfg.data.mean, cfg.data.std, 2, 50, 0, cfg.relabel, "cpu", progress=False)
    approx = train_student(x, y, None, cfg, 0, "cpu", labeler="stored", stored=stored16, progress=False)
    assert approx["history"][0]["loss"] == pytest.approx(online["history"][0]["loss"], rel=1e-2)
    # top-3 only: a different (renormalised) target, still a finite loss.
    top3 = relabel_stored(teacher, x, cfg.data.mean, cfg.data.std, 2, 50, 0,
                          make_cfg(digits, "relabel.top_k=3", "relabel.mix=cutmix").relabel, "cpu", progress=False)
    assert top3["indices"] is not None
    out = train_student(x, y, None, cfg, 0, "cpu", labeler="stored", stored=top3, progress=False)
    assert torch.isfinite(torch.tensor(out["history"][-1]["loss"]))
    cfg.eval.batch_size = 25
    with pytest.raises(EngineError, match="batch size 50"):
        train_student(x, y, None, cfg, 0, "cpu", labeler="stored", stored=stored, progress=False)


def test_kd_loss_and_param_groups():
    s, t = torch.randn(4, 10), torch.randn(4, 10)
    assert float(kd_loss(t, t, 4.0)) == pytest.approx(0.0, abs=1e-6)
    p, q = torch.softmax(t / 4, 1), torch.softmax(s / 4, 1)
    assert float(kd_loss(s, t, 4.0)) == pytest.approx(float((p * (p.log() - q.log())).sum() / 4), rel=1e-5)
    model = small_teacher()
    decay, no_decay = param_groups(model, 0.01)
    assert decay["weight_decay"] == 0.01 and no_decay["weight_decay"] == 0.0
    assert all(p.ndim > 1 for p in decay["params"]) and all(p.ndim <= 1 for p in no_decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


# (g) ------------------------------------------------------------------------------------------
DESIGN_KEYS = {"method", "ipc", "num_classes", "teacher", "distilled", "random_real", "gain_over_random",
               "protocol", "timing_s"}
PROTOCOL_KEYS = {"label_mode", "epochs", "batch", "optimizer", "lr", "temperature", "seeds"}


@pytest.mark.parametrize("mode", ["online", "stored"])
def test_evaluate_sets_results_dict(digits, mode):
    xt, yt, *_ = digits
    cfg = make_cfg(digits, "eval.epochs=2", "eval.seeds=[0, 1]", "eval.val_limit=120", f"relabel.mode={mode}")
    distilled = pick_random_real(yt, 3, seed=10)  # stands in for distilled images
    control = pick_random_real(yt, 3, seed=cfg.seed)
    res = evaluate_sets(xt[distilled], yt[distilled], small_teacher(), cfg, "cpu", val_loader_fn(digits),
                        random_real=(xt[control], yt[control]), hard_control=(mode == "online"), progress=False)
    assert DESIGN_KEYS <= set(res)
    assert res["ipc"] == 3 and res["num_classes"] == 10 and res["method"] == "scdd"
    assert set(res["teacher"]) == {"top1", "top5"}
    assert PROTOCOL_KEYS <= set(res["protocol"])
    assert res["protocol"]["label_mode"] == mode and res["protocol"]["seeds"] == [0, 1]
    assert res["protocol"]["val_count"] == 120
    for name in ("distilled", "random_real"):
        s = res[name]
        assert {"top1", "top5", "top1_mean", "top1_std", "seeds"} <= set(s)
        assert s["seeds"] == [0, 1] and [r["seed"] for r in s["runs"]] == [0, 1]
        # Two separate runs: different students (init and, online, crop stream) -> different losses.
        assert s["runs"][0]["final_loss"] != s["runs"][1]["final_loss"]
        top1 = [r["top1"] for r in s["runs"]]
        assert s["top1"] == top1[0] and s["top1_mean"] == pytest.approx(sum(top1) / 2)
        assert s["top1_std"] == pytest.approx(abs(top1[0] - top1[1]) / 2 ** 0.5)
        if mode == "online":
            assert {"top1", "top1_mean", "top1_std"} <= set(s["hard"]) and len(s["hard"]["top1s"]) == 2
    assert res["gain_over_random"] == pytest.approx(res["distilled"]["top1_mean"] - res["random_real"]["top1_mean"])
    assert res["welch"]["soft"]["n"] == [2, 2]  # the t-test runs on the 2 + 2 student runs
    if mode == "online":
        hard = [sum(res[k]["hard"]["top1s"]) / 2 for k in ("distilled", "random_real")]
        assert res["gain_over_random_hard"] == pytest.approx(hard[0] - hard[1]) and "hard" in res["welch"]
    import json
    json.dumps(res)  # JSON-serialisable as written to results.json

    # One seed: top1/top5 only, no mean/std.
    cfg.eval.seeds = [5]
    cfg.eval.random_real = False
    one = evaluate_sets(xt[distilled], yt[distilled], None, cfg, "cpu", val_loader_fn(digits), label_mode="hard",
                        progress=False)
    assert "top1_mean" not in one["distilled"] and "random_real" not in one and "gain_over_random" not in one
