"""SC-DD recovery (engine.synth.scdd): BN-matching loss, grouped statistics,
recovery on a tiny digits teacher, reproducibility and errors. CPU, tiny models."""
from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from engine.config import ScddConfig
from engine.errors import EngineError
from engine.models import BNStatsHook, bn_layers, create_model
from engine.synth.scdd import (GroupedBNStats, _Augment, bn_matching_loss, crop_params, initial_noise,
                               recover)

MEAN, STD = [0.3], [0.4]


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_teacher(classes=5, seed=0, channels=1, size=12) -> nn.Module:
    """A narrow small-input ResNet-18 whose BN running stats are not the defaults."""
    torch.manual_seed(seed)
    m = create_model("resnet18", classes, in_chans=channels, small_input=True, width=8)
    for bn in m.modules():
        if isinstance(bn, nn.BatchNorm2d):
            bn.momentum = None  # cumulative average over the passes below
    m.train()
    with torch.no_grad():
        for _ in range(3):
            m(torch.rand(16, channels, size, size) * 2 - 0.5)
    return m.eval()


def cfg_for(**kw) -> ScddConfig:
    base = dict(iterations=20, log_every=5, random_resized_crop=False, flip=False, jitter=1)
    return ScddConfig(**{**base, **kw})


# --- (a) the BN-matching loss -------------------------------------------------

def test_bn_matching_loss_equals_direct_computation():
    model = tiny_teacher()
    x = torch.randn(10, 1, 12, 12)
    inputs = []
    handles = [m.register_forward_hook(lambda mod, inp, out: inputs.append(inp[0].detach()))
               for _, m in bn_layers(model)]
    with torch.no_grad():
        model(x)
    for h in handles:
        h.remove()
    layers = bn_layers(model)
    assert len(inputs) == len(layers) == 20
    direct = []
    for k, (inp, (_, bn)) in enumerate(zip(inputs, layers)):
        mu = torch.mean(inp, dim=(0, 2, 3))
        var = torch.var(inp, dim=(0, 2, 3), unbiased=False)
        w = 10.0 if k == 0 else 1.0
        direct.append(w * (torch.linalg.vector_norm(mu - bn.running_mean)
                           + torch.linalg.vector_norm(var - bn.running_var)))
    direct = torch.stack(direct)

    with BNStatsHook(model) as hook, torch.no_grad():
        model(x)
    total, per_layer = bn_matching_loss(hook.stats, layers, 10.0)
    torch.testing.assert_close(per_layer, direct, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(total, direct.sum(), rtol=1e-6, atol=1e-6)

    # The grouped hooks (per-sample moments, then averaged) give the same with one group.
    with GroupedBNStats(model, 1, 10.0) as g, torch.no_grad():
        model(x)
        per_group, terms = g.loss()
        for (m1, v1), (m2, v2) in zip(g.stats, hook.stats):
            torch.testing.assert_close(m1[0], m2, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(v1[0], v2, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(per_group[0], direct.sum(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(terms[0], direct, rtol=1e-6, atol=1e-6)


# --- (b) grouped statistics == separate runs ----------------------------------

def test_grouped_stats_equal_separate_single_ipc_runs():
    model = tiny_teacher().requires_grad_(False)
    B, G = 5, 2
    x = torch.randn(G * B, 1, 12, 12)  # group-major: rows g*B .. g*B+B-1 are IPC index g
    y = torch.arange(B).repeat(G)
    r_bn = 0.05

    def unit_loss(images, labels, groups):
        """Sum over groups of (CE mean over the group + r_bn * group BN loss), and its average."""
        images = images.clone().requires_grad_(True)
        with GroupedBNStats(model, groups, 10.0) as bn:
            logits = model(images)
            per_group_bn, _ = bn.loss()
        ce = F.cross_entropy(logits, labels, reduction="sum") / (len(labels) // groups)
        loss = ce + r_bn * per_group_bn.sum()
        loss.backward()
        return (loss / groups).detach(), images.grad

    grouped, grad_grouped = unit_loss(x, y, G)
    separate = [unit_loss(x[g * B:(g + 1) * B], y[g * B:(g + 1) * B], 1) for g in range(G)]
    mean_separate = torch.stack([s[0] for s in separate]).mean()
    print(f"grouped loss {grouped.item():.6f}, mean of separate runs {mean_separate.item():.6f}")
    torch.testing.assert_close(grouped, mean_separate, rtol=1e-5, atol=1e-5)
    # Each image gets the gradient of its own group's loss, as in a separate run.
    torch.testing.assert_close(grad_grouped, torch.cat([s[1] for s in separate]), rtol=1e-4, atol=1e-7)

    # bn_matching_loss on the grouped stats is the average of the groups' losses.
    with GroupedBNStats(model, G, 10.0) as bn, torch.no_grad():
        model(x)
        total, per_layer = bn_matching_loss(bn.stats, bn.layers, 10.0)
    singles = []
    for g in range(G):
        with BNStatsHook(model) as hook, torch.no_grad():
            model(x[g * B:(g + 1) * B])
        singles.append(bn_matching_loss(hook.stats, hook.layers, 10.0)[0])
    torch.testing.assert_close(total, torch.stack(singles).mean(), rtol=1e-5, atol=1e-5)


# --- (c) recovery with a trained teacher --------------------------------------

@pytest.fixture(scope="module")
def digits_teacher():
    """A narrow ResNet-18 trained for a few epochs on sklearn's 8x8 digits (~10 s)."""
    from engine.data.sources import digits

    src = digits("train")
    x = torch.from_numpy(src.images).float().div(255).unsqueeze(1)
    y = torch.from_numpy(src.labels)
    mean, std = x.mean().item(), x.std().item()
    xn = (x - mean) / std
    torch.manual_seed(0)
    model = create_model("resnet18", 10, in_chans=1, small_input=True, width=8)
    opt = torch.optim.Adam(model.parameters(), 3e-3)
    g = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(4):
        perm = torch.randperm(len(x), generator=g)
        for k in range(0, len(x), 64):
            idx = perm[k:k + 64]
            loss = F.cross_entropy(model(xn[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    val = digits("val")
    xv = (torch.from_numpy(val.images).float().div(255).unsqueeze(1) - mean) / std
    with torch.no_grad():
        acc = (model(xv).argmax(1) == torch.from_numpy(val.labels)).float().mean().item()
    print(f"digits teacher: val top-1 {acc:.3f}")
    assert acc > 0.8
    return model, [mean], [std]


def test_recovery_lowers_loss_and_teacher_recognises_images(digits_teacher):
    model, mean, std = digits_teacher
    cfg = cfg_for(iterations=250, log_every=50, r_bn=0.01, lr=0.25)
    logged = []
    out = recover(model, list(range(10)), (0, 3), cfg, mean, std, 8, 1, seed=0, device="cpu", log=logged.append)
    images, labels, losses = out["images"], out["labels"], out["losses"]
    assert images.dtype == torch.uint8 and images.shape == (30, 1, 8, 8)
    assert labels.tolist() == [c for c in range(10) for _ in range(3)]  # class-major
    assert [r["iter"] for r in losses] == [0, 50, 100, 150, 200, 249] and logged == losses
    first, last = losses[0], losses[-1]
    for r in losses:
        assert r["total"] == pytest.approx(r["ce"] + 0.01 * r["bn"], rel=1e-5)
    # The teacher on the saved uint8 images, un-augmented.
    xq = (images.float() / 255 - mean[0]) / std[0]
    with torch.no_grad():
        rate = (model(xq).argmax(1) == labels).float().mean().item()
    st = out["stats"]
    print(f"loss {first['total']:.3f} -> {last['total']:.3f} (ce {first['ce']:.3f} -> {last['ce']:.3f}, "
          f"bn {first['bn']:.2f} -> {last['bn']:.2f}); teacher assigns the target class to "
          f"{rate:.0%} of {len(labels)} images; {st['img_it_per_s']:.0f} img*it/s")
    assert last["total"] < 0.5 * first["total"]
    assert last["bn"] < first["bn"]
    assert rate >= 0.8 and st["teacher_agreement"] == pytest.approx(rate)
    assert st["groups"] == 3 and st["batch"] == 30 and st["iterations"] == 250
    assert not model.training and all(p.requires_grad for p in model.parameters())  # state restored


# --- (d) seeding and reproducibility ------------------------------------------

def test_same_seed_same_bytes_other_seed_other_bytes():
    model = tiny_teacher()
    cfg = cfg_for(random_resized_crop=True, flip=True, crop_scale=[0.5, 1.0])
    run = lambda seed: recover(model, [1, 3, 4], (2, 4), cfg, MEAN, STD, 12, 1, seed, "cpu")  # noqa: E731
    a, b, c = run(7), run(7), run(8)
    assert torch.equal(a["images"], b["images"]) and a["losses"] == b["losses"]
    assert not torch.equal(a["images"], c["images"])


def test_initial_noise_independent_of_unit():
    model = tiny_teacher()
    cfg = cfg_for(iterations=0)
    u1 = recover(model, [0, 1, 2], (0, 2), cfg, MEAN, STD, 12, 1, 5, "cpu")["images"].view(3, 2, 1, 12, 12)
    u2 = recover(model, [0, 1, 2], (1, 3), cfg, MEAN, STD, 12, 1, 5, "cpu")["images"].view(3, 2, 1, 12, 12)
    assert torch.equal(u1[:, 1], u2[:, 0])  # (class c, IPC 1) in both units
    assert not torch.equal(u1[:, 0], u1[:, 1])
    n = initial_noise(5, 2, 1, 1, 12)
    assert torch.equal(n, initial_noise(5, 2, 1, 1, 12)) and n.shape == (1, 12, 12)
    expect = torch.round(((n * STD[0] + MEAN[0]).clamp(0, 1)) * 255).to(torch.uint8)
    assert torch.equal(u1[2, 1], expect)


def test_ipc_split_gives_nearly_the_same_images():
    """Augmentation and BN statistics are per IPC group and the loss is summed over
    groups, so splitting a unit's IPC range changes only float reassociation in the
    batched kernels: after a short run the bytes agree to within a level or two
    (over hundreds of iterations the optimisation amplifies such differences)."""
    model = tiny_teacher()
    cfg = cfg_for(random_resized_crop=True, flip=True, crop_scale=[0.5, 1.0], iterations=15)
    joint = recover(model, [0, 2, 4], (0, 2), cfg, MEAN, STD, 12, 1, 3, "cpu")["images"].view(3, 2, 1, 12, 12)
    parts = [recover(model, [0, 2, 4], (i, i + 1), cfg, MEAN, STD, 12, 1, 3, "cpu")["images"] for i in (0, 1)]
    split = torch.stack(parts, 1)
    diff = (joint.int() - split.int()).abs()
    print(f"unit (0,2) vs units (0,1)+(1,2): max byte difference {diff.max().item()}, "
          f"{(diff > 0).float().mean().item():.2%} of bytes differ")
    assert diff.max().item() <= 2


def test_augment_matches_torchvision_resized_crop_flip_roll():
    from torchvision.transforms import v2
    from torchvision.transforms.v2 import functional as TF

    cfg = cfg_for(random_resized_crop=True, flip=True, jitter=2, crop_scale=[0.08, 1.0])
    B, G, S = 3, 2, 16
    aug = _Augment(cfg, seed=1, block_first=0, ipc_start=4, groups=G, per_group=B, size=S)
    x = torch.randn(G * B, 1, S, S)
    for it in range(5):
        out = aug(x, it)
        for g in range(G):
            box, flip, shift = aug.params(g, it)
            i, j, h, w = box
            expect = TF.resized_crop(x[g * B:(g + 1) * B], i, j, h, w, [S, S], antialias=True)
            if flip:
                expect = expect.flip(3)
            expect = torch.roll(expect, shift, (2, 3))
            torch.testing.assert_close(out[g * B:(g + 1) * B], expect, rtol=1e-5, atol=1e-5)
            assert all(abs(s) <= 2 for s in shift)
    # Draws are content-seeded: another ipc_start moves the groups' draws.
    other = _Augment(cfg, seed=1, block_first=0, ipc_start=5, groups=G, per_group=B, size=S)
    assert other.params(0, 3) == aug.params(1, 3)
    # Crop parameters stay inside the image, with torchvision's scale and ratio bounds.
    import random

    rng = random.Random(0)
    for _ in range(500):
        i, j, h, w = crop_params(rng, S, S, (0.08, 1.0), (3 / 4, 4 / 3))
        assert 0 <= i <= S - h and 0 <= j <= S - w and 0 < h <= S and 0 < w <= S
    assert v2.RandomResizedCrop.get_params  # the reference this mirrors


def test_init_images_round_trip_and_init_lr():
    model = tiny_teacher()
    init = torch.randint(0, 256, (4, 1, 12, 12), dtype=torch.uint8)
    out = recover(model, [1, 2], (0, 2), cfg_for(iterations=0), MEAN, STD, 12, 1, 0, "cpu", init_images=init)
    assert torch.equal(out["images"], init)  # layout and normalisation invert exactly
    out = recover(model, [1, 2], (0, 2), cfg_for(iterations=3, init_lr=0.01), MEAN, STD, 12, 1, 0, "cpu",
                  init_images=init)
    assert out["stats"]["lr"] == 0.01 and out["stats"]["init"] == "images"
    assert (out["images"].int() - init.int()).abs().max() <= 20


def test_teacher_without_bn_layers():
    """A teacher without BatchNorm (ConvNetD3: instance norm) recovers on CE alone."""
    torch.manual_seed(0)
    model = create_model("convnetd3", 4, in_chans=1, image_size=8, width=8).eval()
    out = recover(model, [0, 3], (0, 2), cfg_for(iterations=10), MEAN, STD, 8, 1, 0, "cpu")
    assert out["images"].shape == (4, 1, 8, 8)
    assert all(r["bn"] == 0 and r["total"] == r["ce"] for r in out["losses"])


# --- (e) non-finite loss --------------------------------------------------------

class NaNAfter(nn.Module):
    """Wraps a teacher; its outputs turn NaN from the k-th forward pass on."""

    def __init__(self, inner: nn.Module, k: int):
        super().__init__()
        self.inner, self.k, self.calls = inner, k, 0

    def forward(self, x):
        out = self.inner(x)
        self.calls += 1
        return out * float("nan") if self.calls > self.k else out


def test_non_finite_loss_names_block_ipc_and_iteration():
    teacher = NaNAfter(tiny_teacher(), k=7)
    with pytest.raises(EngineError) as exc:
        recover(teacher, [2, 3, 4], (3, 5), cfg_for(iterations=20, log_every=10), MEAN, STD, 12, 1, 0, "cpu")
    msg = str(exc.value)
    print(msg)
    assert "non-finite loss at iteration 7" in msg
    assert "class block 2..4" in msg and "IPC 3..4" in msg and "\n" not in msg
    assert teacher.training and not teacher.inner.training  # each module's mode restored

    with pytest.raises(EngineError, match="iteration 0 for class block 0..1"):
        recover(tiny_teacher(), [0, 1], (0, 1), cfg_for(r_bn=float("inf")), MEAN, STD, 12, 1, 0, "cpu")


# --- (f) input validation -------------------------------------------------------

@pytest.mark.parametrize("classes, ipc_range, match", [
    ([0, 5], (0, 1), "class 5 is out of range for a teacher with 5 classes"),
    ([-1], (0, 1), "class -1 is out of range"),
    ([], (0, 1), "class block is empty"),
    ([1, 1], (0, 1), "repeats a class"),
    ([0], (2, 2), r"IPC range \(2, 2\) is invalid"),
    ([0], (-1, 1), r"IPC range \(-1, 1\) is invalid"),
    ([0], (3, 1), "expected 0 <= start < end"),
])
def test_bad_classes_and_ipc_ranges(classes, ipc_range, match):
    with pytest.raises(EngineError, match=match):
        recover(tiny_teacher(), classes, ipc_range, cfg_for(), MEAN, STD, 12, 1, 0, "cpu")


def test_bad_init_images_and_normalisation():
    model = tiny_teacher()
    with pytest.raises(EngineError, match="init_images .* must be uint8"):
        recover(model, [0, 1], (0, 2), cfg_for(), MEAN, STD, 12, 1, 0, "cpu",
                init_images=torch.zeros(3, 1, 12, 12, dtype=torch.uint8))
    with pytest.raises(EngineError, match="mean/std"):
        recover(model, [0], (0, 1), cfg_for(), [0.5] * 3, [0.5] * 3, 12, 1, 0, "cpu")
    with pytest.raises(EngineError, match="iterations"):
        recover(model, [0], (0, 1), dataclasses.replace(cfg_for(), iterations=-1), MEAN, STD, 12, 1, 0, "cpu")


# --- (d) the diversity term ----------------------------------------------------

def test_feature_similarity_equals_direct_pairwise_cosine():
    from engine.synth.scdd import feature_similarity

    torch.manual_seed(0)
    G, B, D = 3, 4, 7
    f = torch.randn(G * B, D)
    pairs = [F.cosine_similarity(f[g * B + b], f[h * B + b], dim=0)
             for b in range(B) for g in range(G) for h in range(G) if g != h]
    torch.testing.assert_close(feature_similarity(f, G, B), torch.stack(pairs).mean())
    # identical IPC indices: similarity 1; the term is what the optimiser pushes down
    torch.testing.assert_close(feature_similarity(f[:B].repeat(G, 1), G, B), torch.tensor(1.0))


def _final_similarity(model, images, G, B, mean, std):
    from engine.synth.scdd import feature_similarity

    feats = []
    h = model.fc.register_forward_hook(lambda m, i, o: feats.append(i[0]))
    x = (images.float() / 255 - mean[0]) / std[0]
    # class-major (class, ipc) rows -> group-major (ipc, class)
    x = x.view(B, G, *x.shape[1:]).transpose(0, 1).reshape(G * B, *x.shape[1:])
    with torch.no_grad():
        model(x)
    h.remove()
    return float(feature_similarity(feats[0], G, B))


def test_diversity_term_lowers_feature_similarity_between_ipc_indices(digits_teacher):
    model, mean, std = digits_teacher
    classes, G = [0, 1, 2], 4
    sims, ces = {}, {}
    for r_div in (0.0, 2.0):
        res = recover(model, classes, (0, G), cfg_for(iterations=60, log_every=59, lr=0.1, r_div=r_div), mean, std,
                      8, 1, seed=0, device="cpu")
        sims[r_div] = _final_similarity(model, res["images"], G, len(classes), mean, std)
        ces[r_div] = res["losses"][-1]
        assert ("similarity" in res["losses"][-1]) == (r_div > 0) and res["stats"]["r_div"] == r_div
    print("feature similarity between IPC indices:", sims)
    assert sims[2.0] < sims[0.0] - 0.05, sims
    # one IPC index per unit: nothing to compare, the term is off and the images are those of r_div 0
    one = [recover(model, classes, (0, 1), cfg_for(iterations=5, r_div=r), mean, std, 8, 1, seed=0, device="cpu")
           for r in (0.0, 2.0)]
    assert torch.equal(one[0]["images"], one[1]["images"])
