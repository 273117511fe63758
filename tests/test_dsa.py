import math

import pytest
import torch

from engine.errors import ConfigError, EngineError
from engine.synth.dsa import (DEFAULT_STRATEGY, FAMILIES, DSADraw, DSAParams, apply_dsa, augment, parse_strategy,
                              sample_dsa)

pytestmark = pytest.mark.usefixtures("one_thread")


def batch(n=6, c=3, h=8, w=8, seed=0, dtype=torch.float64):
    return torch.randn(n, c, h, w, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def test_strategy_parsing():
    assert parse_strategy(DEFAULT_STRATEGY) == FAMILIES
    assert parse_strategy("none") == () and parse_strategy(None) == () and parse_strategy("") == ()
    with pytest.raises(ConfigError, match="unknown family noise"):
        parse_strategy("color_noise")


@pytest.mark.parametrize("family", FAMILIES)
def test_a_replayed_draw_reproduces_the_augmented_batch(family):
    x = batch()
    d1 = sample_dsa(family, 6, 8, 7, "stage", 3)
    d2 = sample_dsa(family, 6, 8, 7, "stage", 3)
    assert d1.family == d2.family == family
    for k in d1.params:
        assert torch.equal(torch.as_tensor(d1.params[k]), torch.as_tensor(d2.params[k]))
    y = apply_dsa(x, d1)
    assert y.shape == x.shape and torch.equal(y, apply_dsa(x, d1)) and torch.equal(y, apply_dsa(x, d2))


def test_the_seed_chooses_family_and_parameters():
    x = batch()
    fams = {sample_dsa(DEFAULT_STRATEGY, 6, 8, 0, "it", i).family for i in range(60)}
    assert fams == set(FAMILIES)                     # one family per call, all of them reachable
    outs = [apply_dsa(x, sample_dsa("rotate", 6, 8, s)) for s in range(3)]
    assert not torch.equal(outs[0], outs[1]) and not torch.equal(outs[1], outs[2])
    y, draw = augment(x, DEFAULT_STRATEGY, 5)
    assert torch.equal(y, apply_dsa(x, draw))
    assert apply_dsa(x, sample_dsa("none", 6, 8, 0)) is x


@pytest.mark.parametrize("family", FAMILIES)
def test_two_batches_under_one_draw_get_the_same_transform(family):
    """A per-batch draw (DataDAM: real and synthetic images of a class) applies to batches of any size,
    and every image gets the same transform: an image transformed in a batch of 5 equals the same image
    transformed in a batch of 2."""
    real = batch(5, seed=1)
    syn = torch.cat([real[3:4], batch(1, seed=2)])
    draw = sample_dsa(family, 5, 8, 11, "class", 4, per_batch=True)
    assert draw.per_batch
    a, b = apply_dsa(real, draw), apply_dsa(syn, draw)
    assert torch.equal(a[3], b[0])
    if family != "color":   # a geometric transform: the same on a constant-one image in both batches
        ones_a = apply_dsa(torch.ones(5, 3, 8, 8, dtype=torch.float64), draw)
        ones_b = apply_dsa(torch.ones(2, 3, 8, 8, dtype=torch.float64), draw)
        assert torch.equal(ones_a[0], ones_b[1]) and torch.equal(ones_a[0], ones_a[4])
    # a per-sample draw gives each image its own parameters and fits only its batch size
    per_sample = sample_dsa(family, 5, 8, 11, "class", 4)
    with pytest.raises(EngineError, match="per-sample draw for 5 images"):
        apply_dsa(syn, per_sample)


def test_each_family_does_what_it_says():
    x = batch(4, h=8, w=8)
    ones = torch.ones(4, 3, 8, 8, dtype=torch.float64)
    flip = DSADraw("flip", 4, (8, 8), {"flip": torch.tensor([True, False, True, False])})
    y = apply_dsa(x, flip)
    assert torch.equal(y[0], x[0].flip(2)) and torch.equal(y[1], x[1])
    crop = DSADraw("crop", 4, (8, 8), {"shift_h": torch.tensor([1, 0, -1, 0]), "shift_w": torch.tensor([0, 1, 0, -1])})
    y = apply_dsa(x, crop)
    assert torch.equal(y[0, :, :7], x[0, :, 1:]) and (y[0, :, 7] == 0).all()
    assert torch.equal(y[3, :, :, 1:], x[3, :, :, :7]) and (y[3, :, :, 0] == 0).all()
    cut = DSADraw("cutout", 4, (8, 8), {"top": torch.tensor([2, -2, 6, 0]), "left": torch.tensor([2, 0, 6, 0]),
                                         "height": 4, "width": 4})
    y = apply_dsa(ones, cut)
    assert [int((y[i, 0] == 0).sum()) for i in range(4)] == [16, 8, 4, 16]
    assert (y[0, :, 2:6, 2:6] == 0).all() and float(y[0].sum()) == 3 * 48
    ident = DSADraw("scale", 4, (8, 8), {"sx": torch.ones(4), "sy": torch.ones(4)})
    assert torch.allclose(apply_dsa(x, ident), x, atol=1e-12)
    quarter = DSADraw("rotate", 4, (8, 8), {"angle": torch.full((4,), math.pi / 2, dtype=torch.float64)})
    y = apply_dsa(x, quarter)   # +90 degrees: a counter-clockwise quarter turn, exact on the pixel grid
    assert torch.allclose(y, torch.rot90(x, 1, (2, 3)), atol=1e-12)
    col = DSADraw("color", 4, (8, 8), {"brightness": torch.zeros(4), "saturation": torch.ones(4),
                                       "contrast": torch.ones(4)})
    assert torch.allclose(apply_dsa(x, col), x, atol=1e-12)
    col = DSADraw("color", 4, (8, 8), {"brightness": torch.full((4,), 0.25), "saturation": torch.zeros(4),
                                       "contrast": torch.ones(4)})
    y = apply_dsa(x, col)     # saturation 0: every channel becomes the channel mean (+ brightness)
    assert torch.allclose(y, (x.mean(1, keepdim=True) + 0.25).expand_as(x), atol=1e-12)


def test_parameters_stay_in_the_reference_ranges():
    p = DSAParams()
    s = sample_dsa("scale", 4000, 32, 1)
    assert 1 / 1.2 <= float(s.params["sx"].min()) and float(s.params["sy"].max()) <= 1.2
    assert not torch.equal(s.params["sx"], s.params["sy"])        # independent axes
    r = sample_dsa("rotate", 4000, 32, 1).params["angle"]
    assert float(r.abs().max()) <= math.radians(p.rotate_deg) and float(r.abs().max()) > math.radians(14)
    c = sample_dsa("crop", 4000, 32, 1).params
    assert int(c["shift_h"].abs().max()) == 4 and int(c["shift_w"].abs().max()) == 4     # 32 / 8
    f = sample_dsa("flip", 4000, 32, 1).params["flip"]
    assert 0.45 < float(f.double().mean()) < 0.55
    k = sample_dsa("cutout", 4000, 32, 1).params
    assert k["height"] == k["width"] == 16 and int(k["top"].min()) == -8 and int(k["top"].max()) == 24
    col = sample_dsa("color", 4000, 32, 1).params
    assert -0.5 <= float(col["brightness"].min()) and float(col["brightness"].max()) <= 0.5
    assert 0 <= float(col["saturation"].min()) and float(col["saturation"].max()) <= 2
    assert 0.5 <= float(col["contrast"].min()) and float(col["contrast"].max()) <= 1.5


@pytest.mark.parametrize("family", FAMILIES)
def test_augmentation_is_differentiable_in_the_images(family):
    x = batch(2, 2, 6, 6, seed=3).requires_grad_(True)
    draw = sample_dsa(family, 2, 6, 2)
    assert torch.autograd.gradcheck(lambda t: apply_dsa(t, draw), (x,))


def test_a_draw_for_another_image_size_is_refused():
    with pytest.raises(EngineError, match="draw made for 8x8 images"):
        apply_dsa(batch(2, h=6, w=6), sample_dsa("crop", 2, 8, 0))
    with pytest.raises(EngineError, match="at least 1"):
        sample_dsa("crop", 0, 8, 0)
