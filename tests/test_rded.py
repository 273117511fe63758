"""RDED (engine.synth.rded, engine.synth.rded_stage): crops, teacher scores, selection, stitching, the unit factory.

Tiny tensors and hand-made teachers whose logits are known functions of the input; the worker test
prepares sklearn digits (8 px) and a 1-epoch teacher through the CLI, then runs units in this process."""
import json

import pytest
import torch
from torch import nn
from torchvision.transforms.v2 import functional as TF

from engine.errors import ConfigError, EngineError
from engine.synth.rded import (rded_class, rded_unit, sample_crops, score_crops, select_and_stitch,
                               select_patches, stitch)

pytestmark = pytest.mark.usefixtures("one_thread")

MEAN, STD = [0.5], [0.5]


class BrightnessTeacher(nn.Module):
    """Logits (a * m, 0, -a * m, ...) for the mean m of the (normalised) input: class 0 prefers
    bright inputs, class 2 dark ones, class 1 is indifferent."""

    def __init__(self, num_classes=3, a=4.0):
        super().__init__()
        self.num_classes, self.a = num_classes, a

    def forward(self, x):
        m = x.float().mean((1, 2, 3))
        cols = [self.a * m, torch.zeros_like(m), -self.a * m][:self.num_classes]
        cols += [torch.zeros_like(m)] * (self.num_classes - len(cols))
        return torch.stack(cols, 1)


def small_conv_teacher(num_classes=3, channels=1, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(channels, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(4, num_classes)).eval()


def random_images(n, size=16, channels=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, channels, size, size), generator=g, dtype=torch.uint8)


def constant_images(values, size=16):
    return torch.stack([torch.full((1, size, size), int(v), dtype=torch.uint8) for v in values])


def kwargs(**over):
    base = dict(ipc=2, factor=2, candidates_per_image=3, crop_scale=(0.25, 1.0), crop_ratio=(1.0, 1.0),
                image_size=16, mean=MEAN, std=STD, seed=0, device="cpu", score_batch_size=7)
    return {**base, **over}


def sources(prov):
    return [p["real"] for p in prov]


# --------------------------------------------------------------------------- crops
def test_sample_crops_are_replayable_boxes_resized_to_the_patch():
    imgs = random_images(3, size=12)
    crops, boxes = sample_crops(imgs, 4, 6, scale=(0.2, 1.0), ratio=(0.75, 1.33), seed=5, class_index=2)
    assert crops.shape == (3, 4, 1, 6, 6) and crops.dtype == torch.uint8 and boxes.shape == (3, 4, 4)
    again, boxes2 = sample_crops(imgs, 4, 6, scale=(0.2, 1.0), ratio=(0.75, 1.33), seed=5, class_index=2)
    assert torch.equal(crops, again) and torch.equal(boxes, boxes2)
    _, other = sample_crops(imgs, 4, 6, scale=(0.2, 1.0), ratio=(0.75, 1.33), seed=6, class_index=2)
    assert not torch.equal(boxes, other)
    # each crop is its box of its image, resized (bilinear, antialias) and rounded
    j, m = 1, 2
    top, left, h, w = boxes[j, m].tolist()
    assert 0 <= top and top + h <= 12 and 0 <= left and left + w <= 12
    ref = TF.resized_crop(imgs[j].float(), top, left, h, w, [6, 6], antialias=True).round().clamp(0, 255)
    assert torch.equal(crops[j, m], ref.to(torch.uint8))
    # square crops by default (the reference's ratio (1, 1)); images of different sizes are fine
    _, sq = sample_crops([random_images(1, 20)[0], random_images(1, 9)[0]], 5, 4, seed=0)
    assert bool((sq[..., 2] == sq[..., 3]).all())


def test_score_is_the_teachers_cross_entropy_padded_or_resized():
    crops = constant_images([0, 128, 255], size=4)
    t = BrightnessTeacher()
    s = score_crops(t, crops, 0, MEAN, STD, batch_size=2)
    assert s.shape == (3,) and s.argmin() == 2 and s.argmax() == 0  # class 0 likes bright crops
    x = (crops.float() / 255 - 0.5) / 0.5
    assert torch.allclose(s, nn.functional.cross_entropy(t(x), torch.zeros(3, dtype=torch.long), reduction="none"))
    # padded with zeros (normalised space) to the image size: the mean shrinks by the area ratio
    padded = score_crops(t, crops, 0, MEAN, STD, image_size=8, score_input="pad")
    assert torch.allclose(padded, nn.functional.cross_entropy(t(x / 4), torch.zeros(3, dtype=torch.long),
                                                              reduction="none"), atol=1e-6)
    resized = score_crops(t, crops, 0, MEAN, STD, image_size=8, score_input="resize")
    assert torch.allclose(resized, s, atol=1e-5)  # a constant patch stays constant when upsampled


# --------------------------------------------------------------------------- selection and stitching
def test_stitch_puts_patch_q_at_grid_cell_q():
    patches = torch.stack([torch.full((2, 3, 3), 10 * (q + 1), dtype=torch.uint8) for q in range(4)])
    img = stitch(patches, 2)
    assert img.shape == (2, 6, 6)
    for q in range(4):
        r, c = divmod(q, 2)
        assert bool((img[:, 3 * r:3 * r + 3, 3 * c:3 * c + 3] == 10 * (q + 1)).all())


def test_selection_takes_the_lowest_cross_entropy_and_lays_out_ranks_like_the_reference():
    """Constant images of known brightness: class 0's teacher ranks them brightest first, every crop
    of an image scores the same, and IPC index t's cell q holds rank q * ipc + t."""
    values = [30, 250, 90, 200, 10, 170, 240, 60, 130, 220]
    res = rded_class(BrightnessTeacher(), constant_images(values), 0, (0, 2), **kwargs())
    ranked = sorted(range(len(values)), key=lambda j: -values[j])  # brightest first
    assert res["images"].shape == (2, 1, 16, 16) and res["labels"].tolist() == [0, 0]
    for t in range(2):
        prov = res["provenance"][t]
        assert sources(prov) == [ranked[q * 2 + t] for q in range(4)]
        assert [p["rank"] for p in prov] == [q * 2 + t for q in range(4)]
        for q, p in enumerate(prov):  # pixels: the patch of image `real` sits in its grid cell
            r, c = p["cell"]
            assert (r, c) == divmod(q, 2)
            assert bool((res["images"][t, :, 8 * r:8 * r + 8, 8 * c:8 * c + 8] == values[p["real"]]).all())
    # class 2 prefers dark images: the selection turns around
    dark = rded_class(BrightnessTeacher(), constant_images(values), 2, (0, 1), **kwargs(ipc=1))
    assert sources(dark["provenance"][0]) == sorted(range(len(values)), key=lambda j: values[j])[:4]


def test_each_image_keeps_its_best_candidate_and_the_best_images_win():
    imgs = random_images(12, seed=3)
    t = small_conv_teacher()
    k = kwargs(ipc=2)
    res = rded_class(t, imgs, 1, (0, 2), **k)
    crops, boxes = sample_crops(imgs, 3, 8, scale=k["crop_scale"], ratio=k["crop_ratio"], seed=0, class_index=1)
    scores = score_crops(t, crops, 1, MEAN, STD, image_size=16).view(12, 3)
    chosen = [p for prov in res["provenance"] for p in prov]
    for p in chosen:
        assert p["candidate"] == int(scores[p["real"]].argmin())
        assert p["score"] == pytest.approx(float(scores[p["real"]].min()), abs=1e-5)
        assert p["box"] == boxes[p["real"], p["candidate"]].tolist()
    left_out = set(range(12)) - {p["real"] for p in chosen}
    assert max(p["score"] for p in chosen) <= min(float(scores[j].min()) for j in left_out) + 1e-6
    # the same through select_and_stitch directly
    images, prov = select_and_stitch(crops, boxes, scores, 1, (0, 2), ipc=2, factor=2)
    assert torch.equal(images, res["images"])


def test_ipc_indices_never_share_a_patch_and_units_agree_with_the_whole_class():
    imgs = random_images(20, seed=1)
    t = small_conv_teacher()
    whole = rded_class(t, imgs, 0, (0, 4), **kwargs(ipc=4))
    used = [p["real"] for prov in whole["provenance"] for p in prov]
    assert len(used) == 16 and len(set(used)) == 16  # 4 images x 4 patches, 16 distinct real images
    parts = [rded_class(t, imgs, 0, r, **kwargs(ipc=4)) for r in ((0, 1), (1, 3), (3, 4))]
    assert torch.equal(torch.cat([p["images"] for p in parts]), whole["images"])
    assert [pr for p in parts for pr in p["provenance"]] == whole["provenance"]


def test_factor_one_is_the_whole_selected_crop():
    imgs = random_images(6, size=12, seed=2)
    k = kwargs(ipc=3, factor=1, image_size=12)
    res = rded_class(small_conv_teacher(), imgs, 2, (0, 3), **k)
    assert res["images"].shape == (3, 1, 12, 12)
    for t, prov in enumerate(res["provenance"]):
        (p,) = prov
        top, left, h, w = p["box"]
        ref = TF.resized_crop(imgs[p["real"]].float(), top, left, h, w, [12, 12], antialias=True).round()
        assert torch.equal(res["images"][t], ref.clamp(0, 255).to(torch.uint8))


def test_deterministic_per_seed_and_different_for_another_seed():
    imgs = random_images(10, seed=4)
    t = small_conv_teacher()
    a = rded_class(t, imgs, 1, (0, 2), **kwargs())
    b = rded_class(t, imgs, 1, (0, 2), **kwargs())
    c = rded_class(t, imgs, 1, (0, 2), **kwargs(seed=1))
    assert torch.equal(a["images"], b["images"]) and a["provenance"] == b["provenance"]
    assert not torch.equal(a["images"], c["images"])


def test_unit_is_class_major_and_keeps_the_labels():
    t = small_conv_teacher(num_classes=5)
    real = {c: random_images(8, seed=10 + c) for c in (3, 4)}
    res = rded_unit(t, real, [3, 4], (1, 3), **kwargs(ipc=3, factor=1, candidates_per_image=2))
    assert res["labels"].tolist() == [3, 3, 4, 4]
    assert [(e["class"], e["ipc"]) for e in res["provenance"]] == [(3, 1), (3, 2), (4, 1), (4, 2)]
    single = rded_class(t, real[4], 4, (1, 3), **kwargs(ipc=3, factor=1, candidates_per_image=2))
    assert torch.equal(res["images"][2:], single["images"])
    assert set(res["stats"]) == {3, 4} and 0 <= res["stats"][3]["teacher_agreement"] <= 1


# --------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("over,n,needle", [
    ({"factor": 0}, 10, "synth.rded.factor: expected an integer >= 1, got 0"),
    ({"factor": 3}, 10, "data.image_size 16 is not divisible by factor 3"),
    ({"candidates_per_image": 0}, 10, "synth.rded.candidates_per_image"),
    ({"crop_scale": (0.5, 0.2)}, 10, "synth.rded.crop_scale"),
    ({"score_input": "stretch"}, 10, "synth.rded.score_input 'stretch'"),
    ({}, 7, "class 0 has 7 real images, IPC 2 x factor 2^2 needs 8"),
    ({"num_real": 12}, 10, "class 0 has 10 real images, synth.rded.num_real asks for 12"),
])
def test_bad_input_fails_with_one_line(over, n, needle):
    with pytest.raises(EngineError) as exc:
        rded_class(BrightnessTeacher(), random_images(n), 0, (0, 2), **kwargs(**over))
    assert needle in str(exc.value) and "\n" not in str(exc.value)


def test_teacher_without_the_class_and_ranges_out_of_bounds_are_refused():
    with pytest.raises(EngineError, match="teacher outputs 2 classes, class 2 is not among them"):
        rded_class(BrightnessTeacher(num_classes=2), random_images(10), 2, (0, 2), **kwargs())
    with pytest.raises(EngineError, match=r"IPC range \[1, 3\) is not inside \[0, 2\)"):
        rded_class(BrightnessTeacher(), random_images(10), 0, (1, 3), **kwargs())
    with pytest.raises(EngineError, match="has 3 real images, 4 needed"):
        select_patches(torch.zeros(3, 2), 4)
    with pytest.raises(EngineError, match="no real images given for class 5"):
        rded_unit(BrightnessTeacher(), {4: random_images(10)}, [5], (0, 2), **kwargs())


def test_rded_settings_are_a_typed_config_section():
    from engine.config import RdedConfig, load_config
    from engine.synth.rded_stage import check_rded_config

    cfg = load_config(None, ["data.image_size=28", "synth.ipc=10"])
    assert cfg.synth.rded.factor == RdedConfig.factor == 2  # 5 candidates, 300 real images: the reference
    with pytest.raises(ConfigError, match="synth.rded.factr"):
        load_config(None, ["synth.rded.factr=1"])
    with pytest.raises(ConfigError, match="needs 160"):
        check_rded_config(load_config(None, ["data.image_size=28", "synth.ipc=10", "synth.rded.num_real=100",
                                             "synth.rded.factor=4"]))


# --------------------------------------------------------------------------- the unit factory
@pytest.fixture(scope="module")
def digits_teacher(digits_prepared_run):
    return digits_prepared_run


def digits_config(out, **rded):
    from engine.config import load_config, to_dict
    from engine.prepare import prepared_locations
    from tests_digits import DIGITS

    cfg = load_config("configs/demo/fashion_scdd.yaml", [*DIGITS, "synth.ipc=2"])
    d = to_dict(cfg)
    d["synth"]["rded"] = {"factor": 2, "candidates_per_image": 3, "num_real": 12, **rded}
    return d, prepared_locations(cfg, str(out))


def test_worker_runs_a_unit_from_the_training_shards(digits_teacher):
    from engine.cluster.plan import plan_units
    from engine.data.realsets import load_images, scan_labels
    from engine.synth.rded_stage import rded_worker

    out = digits_teacher
    config, locs = digits_config(out)
    work = rded_worker(config, str(out), locs)
    units = plan_units("synthesize", 10, 2, 5, 2)
    res, info = work(units[1])
    assert res["images"].shape == (10, 1, 8, 8) and res["images"].dtype == torch.uint8
    assert res["labels"].tolist() == [c for c in range(5, 10) for _ in range(2)]
    json.dumps(info)  # the unit manifest
    assert info["settings"]["num_real"] == 12 and info["load_seconds"] >= 0 and info["select_seconds"] > 0
    keys, labels = scan_labels(locs["train"], "train")
    label_of = dict(zip(keys, labels.tolist()))
    assert sorted(info["real_keys"]) == [str(c) for c in range(5, 10)]
    for c, pool in info["real_keys"].items():  # the pool: 12 distinct training images of the class
        assert len(set(pool)) == 12 and {label_of[k] for k in pool} == {int(c)}
    assert [(e["class"], e["ipc"]) for e in info["images"]] == [(c, i) for c in range(5, 10) for i in range(2)]
    used = [p["key"] for e in info["images"] for p in e["patches"]]
    assert len(used) == 40 and len(set(used)) == 40
    # every patch is the reported box of the reported training image, in its grid cell
    real = load_images(locs["train"], "train", used, 1)
    for n, e in enumerate(info["images"]):
        assert all(p["key"] in info["real_keys"][str(e["class"])] for p in e["patches"])
        for p in e["patches"]:
            top, left, h, w = p["box"]
            patch = TF.resized_crop(real[p["key"]].float(), top, left, h, w, [4, 4], antialias=True).round()
            r, c = p["cell"]
            assert torch.equal(res["images"][n, :, 4 * r:4 * r + 4, 4 * c:4 * c + 4], patch.to(torch.uint8))
    # replayable, and the same images when the class block's IPC range is split over two units
    again, _ = work(units[1])
    assert torch.equal(again["images"], res["images"])
    halves = [work(u)[0]["images"] for u in plan_units("synthesize", 10, 2, 5, 1)[2:4]]
    per_unit = torch.stack(halves, 1).reshape(10, 1, 8, 8)  # class-major: (class, ipc)
    assert torch.equal(per_unit, res["images"])


def test_worker_refuses_more_real_images_than_a_class_has(digits_teacher):
    from engine.cluster.plan import plan_units
    from engine.synth.rded_stage import rded_worker

    config, locs = digits_config(digits_teacher, num_real=400, factor=1)
    work = rded_worker(config, str(digits_teacher), locs)
    with pytest.raises(ConfigError, match=r"synth.rded.num_real: class 0 has 1\d\d training images, 400 requested"):
        work(plan_units("synthesize", 10, 2, 5, 2)[0])
    bad, locs = digits_config(digits_teacher, factor=3)
    with pytest.raises(ConfigError, match="not divisible by factor 3"):
        rded_worker(bad, str(digits_teacher), locs)


def test_imagenet_recipe_loads_and_passes_the_rded_checks():
    from engine.config import load_config
    from engine.synth.rded_stage import check_rded_config

    cfg = load_config("configs/imagenet1k/rded_r18_ipc50.yaml")
    assert cfg.method == "rded" and cfg.synth.ipc == 50 and cfg.data.image_size == 224
    rcfg = check_rded_config(cfg)
    assert rcfg.factor == 2 and rcfg.num_real >= cfg.synth.ipc * rcfg.factor ** 2
